//! CUDA graphs for decode steps. A step whose spans are all single tokens
//! is padded to a batch-size bucket and replays the graph captured for that
//! bucket the first time it was seen: the whole step (embedding, every
//! layer, LM head and sampling) is one launch instead of hundreds. The
//! graph reads its tokens, positions and block tables from one metadata
//! buffer at a fixed address, rewritten before each replay; padded rows
//! attend to, and write, only the pool's spare block, and their results are
//! dropped.

use std::collections::HashMap;

use super::gpu::Graph;
use super::pool::DevicePool;
use super::slice::{build_meta, CudaSlice, Offsets, Out, Plan, Scratch, DECODE_PART};
use crate::attention::SeqSpan;
use crate::error::Result;
use crate::sampling::{Draw, Sampled};
use crate::slice::SliceOutput;

/// Batch sizes graphs are captured for; larger steps run eagerly.
pub const BUCKETS: [usize; 16] = [
    1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 256,
];

/// How decode steps run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphMode {
    /// Replay captured graphs.
    On,
    /// The graph's padded step, queued kernel by kernel (what the graph
    /// must equal bit for bit).
    Padded,
    /// The general pass, unpadded.
    Off,
}

pub(crate) struct Graphs {
    pub mode: GraphMode,
    /// Set when a capture failed: every step runs eagerly from then on.
    failed: bool,
    scratch: Option<Scratch>,
    captured: HashMap<(usize, bool, u64), Graph>,
}

impl Default for Graphs {
    fn default() -> Self {
        Graphs {
            mode: GraphMode::On,
            failed: false,
            scratch: None,
            captured: HashMap::new(),
        }
    }
}

impl Graphs {
    pub fn captured(&self) -> usize {
        self.captured.len()
    }
}

pub fn bucket_for(n: usize) -> Option<usize> {
    BUCKETS.iter().copied().find(|b| *b >= n)
}

pub(crate) fn eligible(slice: &CudaSlice, seqs: &[SeqSpan]) -> bool {
    let g = &slice.graphs;
    g.mode != GraphMode::Off
        && !g.failed
        && slice.comm_capturable()
        && seqs.iter().all(|s| s.n == 1)
        && bucket_for(seqs.len()).is_some()
}

/// One padded decode step: replays (capturing first if needed) or queues
/// the bucket's pass, and returns the real rows' results.
pub(crate) fn step(
    slice: &mut CudaSlice,
    ids: &[u32],
    seqs: &[SeqSpan],
    pool: &DevicePool,
    draws: Option<&[Draw]>,
    out: Out,
) -> Result<SliceOutput> {
    let n = seqs.len();
    let b = bucket_for(n).expect("eligible steps fit a bucket");
    let cfg = &slice.config;
    let bs = pool.layout.block_size;
    let width = cfg.context_length.div_ceil(bs);
    let parts = cfg.context_length.div_ceil(DECODE_PART);
    let max_b = *BUCKETS.last().expect("buckets");
    if slice.graphs.scratch.is_none() {
        let meta_len = Offsets::new(max_b, max_b, max_b, 0, max_b * width).len;
        let sc = slice.scratch(max_b, max_b, parts, meta_len)?;
        slice.graphs.scratch = Some(sc);
    }
    let plan = Plan {
        t: b,
        s: b,
        sd: b,
        sp: 0,
        max_parts: parts,
        max_n: 1,
        tokens_in: true,
        out,
        off: Offsets::new(b, b, b, 0, b * width),
    };
    let spare = [pool.spare()];
    let mut padded: Vec<SeqSpan> = seqs.to_vec();
    padded.resize(
        b,
        SeqSpan {
            pos: 0,
            n: 1,
            blocks: &spare,
        },
    );
    let mut pids = ids.to_vec();
    pids.resize(b, 0);
    let meta = build_meta(
        &plan,
        Some(&pids),
        &padded,
        bs,
        draws,
        cfg.vocab_size,
        Some((width, pool.spare().0)),
    );
    let sc = slice.graphs.scratch.take().expect("allocated above");
    let r = run(slice, &plan, &sc, &meta, pool, out, n);
    slice.graphs.scratch = Some(sc);
    r
}

fn run(
    slice: &mut CudaSlice,
    plan: &Plan,
    sc: &Scratch,
    meta: &[i32],
    pool: &DevicePool,
    out: Out,
    n: usize,
) -> Result<SliceOutput> {
    slice.stream.htod(sc.meta.ptr, meta)?;
    let key = (plan.s, out == Out::Sample, pool.buf.ptr);
    match slice.graphs.mode {
        GraphMode::Padded | GraphMode::Off => slice.enqueue(plan, sc, pool, None)?,
        GraphMode::On => {
            if !slice.graphs.captured.contains_key(&key) {
                slice.stream.begin_capture()?;
                let queued = slice.enqueue(plan, sc, pool, None);
                let graph = slice.stream.end_capture();
                match (queued, graph) {
                    (Ok(()), Ok(g)) => {
                        slice.graphs.captured.insert(key, g);
                    }
                    (q, g) => {
                        let why = q
                            .err()
                            .or(g.err())
                            .map(|e| e.to_string())
                            .unwrap_or_default();
                        tracing::warn!(
                            "decode steps run without CUDA graphs: capture failed: {why}"
                        );
                        slice.graphs.failed = true;
                        slice.enqueue(plan, sc, pool, None)?;
                        return read(slice, plan, sc, out, n);
                    }
                }
            }
            slice.graphs.captured[&key].launch()?;
        }
    }
    read(slice, plan, sc, out, n)
}

/// The first `n` rows' results of a padded pass.
fn read(slice: &CudaSlice, plan: &Plan, sc: &Scratch, out: Out, n: usize) -> Result<SliceOutput> {
    let st = &slice.stream;
    match out {
        Out::Sample => {
            let v = st.read::<u32>(sc.sampled.ptr, 2 * plan.s)?;
            Ok(SliceOutput::Sampled(
                (0..n)
                    .map(|i| Sampled::new(v[i], f32::from_bits(v[plan.s + i])))
                    .collect(),
            ))
        }
        Out::Logits => Ok(SliceOutput::Logits(
            st.read::<f32>(sc.logits.ptr, n * slice.config.vocab_size)?,
        )),
        Out::Hidden => Ok(SliceOutput::Hidden(
            st.read::<f32>(sc.x.ptr, n * slice.config.hidden)?,
        )),
    }
}
