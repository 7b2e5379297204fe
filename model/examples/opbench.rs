//! Times the engine's kernels one by one (a development aid, not a benchmark of record).
use std::time::Instant;
use tandem_model::attention::{paged_attention, SeqSpan};
use tandem_model::linear::Linear;
use tandem_model::quant::QKind;
use tandem_model::*;

fn time<F: FnMut()>(name: &str, reps: usize, mut f: F) {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    println!(
        "{name:40} {:9.3} ms",
        t.elapsed().as_secs_f64() * 1e3 / reps as f64
    );
}

fn q4(rows: usize, cols: usize) -> RawTensor {
    let mut data = Vec::new();
    for i in 0..rows * cols / 32 {
        data.extend_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        data.extend_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
        for j in 0..16 {
            data.push(((i * 7 + j * 13) % 256) as u8);
        }
    }
    RawTensor::Quant(tandem_model::quant::QMat {
        kind: QKind::Q4_1,
        rows,
        cols,
        data,
    })
}

fn main() {
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build_global();
    let t = 512;
    for (name, rows, cols) in [
        ("qkv", 960, 576),
        ("o", 576, 576),
        ("gate_up", 3072, 576),
        ("down", 576, 1536),
    ] {
        let l = Linear::new(q4(rows, cols), None, Formats::BOTH).unwrap();
        let x: Vec<f32> = (0..t * cols).map(|i| (i as f32 * 0.01).sin()).collect();
        time(&format!("dense {name} t={t}"), 5, || {
            l.forward(&x, t, Format::Dense).unwrap();
        });
        time(&format!("quant {name} t=1"), 200, || {
            l.forward(&x[..cols], 1, Format::Quant).unwrap();
        });
        time(&format!("quant {name} t=8"), 50, || {
            l.forward(&x[..8 * cols], 8, Format::Quant).unwrap();
        });
    }
    let mut lm = Vec::new();
    for i in 0..49152 * 18 {
        lm.extend_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        for j in 0..32 {
            lm.push(((i + j) % 200) as u8);
        }
    }
    let l = Linear::new(
        RawTensor::Quant(tandem_model::quant::QMat {
            kind: QKind::Q8_0,
            rows: 49152,
            cols: 576,
            data: lm,
        }),
        None,
        Formats::DECODE,
    )
    .unwrap();
    let x: Vec<f32> = (0..576).map(|i| (i as f32 * 0.01).sin()).collect();
    time("lm head q8_0 t=1", 20, || {
        l.forward(&x, 1, Format::Quant).unwrap();
    });
    let layout = KvLayout {
        layers: 1,
        kv_heads: 3,
        block_size: 16,
        head_dim: 64,
        dtype: KvDtype::F32,
    };
    let pool = KvPool::new(layout, 64);
    let blocks: Vec<BlockId> = (0..32).map(BlockId).collect();
    let q: Vec<f32> = (0..t * 9 * 64).map(|i| (i as f32 * 0.001).cos()).collect();
    let mut out = vec![0f32; q.len()];
    time("attention prefill 512", 5, || {
        paged_attention(
            &pool,
            0,
            &[SeqSpan {
                pos: 0,
                n: t,
                blocks: &blocks,
            }],
            &q,
            9,
            3,
            &mut out,
        )
    });
    let mut out1 = vec![0f32; 9 * 64];
    time("attention decode ctx 256", 200, || {
        paged_attention(
            &pool,
            0,
            &[SeqSpan {
                pos: 255,
                n: 1,
                blocks: &blocks,
            }],
            &q[..9 * 64],
            9,
            3,
            &mut out1,
        )
    });
}
