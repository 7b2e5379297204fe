//! What the wire codec costs on the two large messages: a prefill
//! stage's activations and a KV chunk (`cargo run --release -p
//! tandem-wire --example codec_cost`).

use std::time::Instant;
use tandem_model::BlockId;
use tandem_wire::messages::*;

fn time<F: FnMut()>(mut f: F, iters: usize) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    t.elapsed().as_secs_f64() / iters as f64 * 1e6
}

fn main() {
    // A 16-token chunk's activations of a 576-wide model, and one rank's KV
    // for 4 blocks of 16 tokens x 30 layers' worth of bytes.
    let act = Message::Activations(Activations {
        id: RequestId(7),
        lease: Lease(u128::MAX / 3),
        pos: 512,
        n: 16,
        hidden: (0..16 * 576).map(|i| i as f32 * 0.37).collect(),
        warm: false,
    });
    let kv = Message::Kv(KvChunk {
        id: RequestId(7),
        lease: Lease(u128::MAX / 3),
        stage: 0,
        rank: 0,
        blocks: (0..4)
            .map(|b| {
                (
                    BlockId(b),
                    serde_bytes::ByteBuf::from(vec![b as u8; 30 * 2 * 16 * 64 * 2]),
                )
            })
            .collect(),
    });
    for (name, m) in [
        ("Activations 16x576 f32", &act),
        ("Kv 4 blocks x 122,880 B", &kv),
    ] {
        let bytes = tandem_wire::codec::encode(m).expect("encodes");
        let n = 200;
        let enc = time(
            || {
                std::hint::black_box(tandem_wire::codec::encode(m).expect("encodes"));
            },
            n,
        );
        let dec = time(
            || {
                let x: Message = tandem_wire::codec::decode(&bytes).expect("decodes");
                std::hint::black_box(x);
            },
            n,
        );
        println!(
            "{name}: {} bytes, encode {enc:.1} us, decode {dec:.1} us",
            bytes.len()
        );
    }
}
