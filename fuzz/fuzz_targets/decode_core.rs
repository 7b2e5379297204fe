//! Decode's request logic under whatever its peers send: random messages
//! (decoded from the input, so malformed ones too) from the gateway, the
//! stages of two pipelines and a stranger, mixed with links dropping and
//! coming back, processes dying, receives draining, time passing and
//! decode steps. Nothing panics, and a block a peer may still write is
//! never handed out: quarantined blocks never exceed the pool.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_decode::admission::Limits;
use tandem_decode::core::{Action, Config, Core, PipelineSpec, UcxLanding};
use tandem_kvtransfer::PoolDesc;
use tandem_model::{BlockId, FinishReason, KvDtype, Sampled};
use tandem_wire::codec;
use tandem_wire::messages::{KvChunk, Lease, Message, ProcessId, RequestId};

const PEERS: [&str; 5] = ["gw", "p0-s0", "p0-s1", "p1-s0", "stranger"];

fn config(ucx: UcxLanding) -> Config {
    let desc = |h: std::ops::Range<usize>| PoolDesc::new(0..2, h, 4, 8, KvDtype::F32);
    Config {
        name: "d0".into(),
        gateway: "gw".into(),
        tp: 2,
        context: 128,
        vocab: 100,
        limits: Limits {
            max_batch: 3,
            max_queue: 4,
            block_size: 4,
            max_attempts: 3,
            kv_timeout: 1_000,
        },
        local_prefill_max: 4,
        local_chunk: 4,
        dense_prefill: true,
        pipelines: vec![
            PipelineSpec {
                name: "p0".into(),
                stages: vec![("p0-s0".into(), 0..1), ("p0-s1".into(), 1..2)],
                ucx: true,
            },
            PipelineSpec {
                name: "p1".into(),
                stages: vec![("p1-s0".into(), 0..2)],
                ucx: false,
            },
        ],
        rank_descs: vec![desc(0..1), desc(1..2)],
        ucx,
        grammar: None,
    }
}

fn process(n: u8) -> ProcessId {
    ProcessId {
        boot: "b".into(),
        pid: n as u32 + 1,
        start: 7,
    }
}

fuzz_target!(|data: &[u8]| {
    let ucx = match data.first().map(|b| b % 3) {
        Some(0) => UcxLanding::None,
        Some(1) => UcxLanding::Messages,
        _ => UcxLanding::Puts,
    };
    let mut core = Core::new(config(ucx), 24);
    let mut now = 1_000_000u64;
    for (i, p) in PEERS.iter().enumerate() {
        let _ = core.link_up(p, process(i as u8), now);
    }
    let mut r = data.get(1..).unwrap_or_default();
    while r.len() >= 3 {
        let peer = PEERS[r[0] as usize % PEERS.len()];
        let op = r[1];
        let len = (r[2] as usize).min(r.len() - 3);
        let body = &r[3..3 + len];
        r = &r[3 + len..];
        let b = |i: usize| body.get(i).copied().unwrap_or(0);
        let actions = match op % 8 {
            0 => match codec::decode::<Message>(body) {
                Ok(m) => match core.message(peer, m, now) {
                    Ok(a) => a,
                    Err(Message::KvLanded { id, lease, stage, rank, blocks, put }) => {
                        match core.landed_plan(peer, id, lease, stage, rank) {
                            Some(_) => {
                                let blocks = blocks.iter().map(|b| (*b, vec![1u8; 8].into())).collect();
                                let chunk = KvChunk { id, lease, stage, rank, blocks };
                                core.kv_landed(peer, chunk, put, now)
                            }
                            None => Vec::new(),
                        }
                    }
                    Err(_) => Vec::new(),
                },
                Err(_) => Vec::new(),
            },
            1 => {
                now += u64::from(b(0)) * 40;
                core.tick(now)
            }
            2 => {
                let (plan, mut a) = core.plan_step(now);
                if let Some(plan) = plan {
                    let out: Vec<Sampled> = plan
                        .spans
                        .iter()
                        .map(|_| Sampled::new(u32::from(b(0)) % 100, -1.0))
                        .collect();
                    a.extend(core.step_done(plan, Ok(out), 10, now));
                }
                a
            }
            3 => core.link_down(peer, now),
            4 => core.link_up(peer, process(b(0)), now),
            5 => core.landing_drained(RequestId(u64::from(b(0))), Lease(u128::from(b(1))), now),
            6 => core.finish(RequestId(u64::from(b(0))), FinishReason::Stop, now),
            _ => core.process_gone(&process(b(0)), now),
        };
        // What the shell would do with what comes back: drains and finishes.
        for a in actions {
            if let Action::FenceClose { id, lease } = a {
                let _ = core.landing_drained(id, lease, now);
            }
        }
        assert!(core.admission.quarantined_blocks() <= core.admission.total_blocks());
        let _ = BlockId(0);
    }
});
