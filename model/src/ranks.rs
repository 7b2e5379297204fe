//! A tensor-parallel group of ranks over one layer range: each rank is an OS
//! thread that owns its weight shard ([`ModelSlice`]), its KV pool and a
//! rayon pool of its own, fed through a channel. Every role builds on it: the
//! reference engine (a group per stage), a prefill stage (one rank, its
//! layers, every head) and a decode group (every layer, `tp` ranks).
//!
//! Work reaches a rank only as a job on its channel, so a pool is touched by
//! its own thread alone; KV transfers reach it as closures ([`RankGroup::with_pool`]).

use std::ops::Range;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use crate::attention::SeqSpan;
use crate::comm::{AllReduce, ThreadGroup};
use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::kv::{BlockId, KvDtype, KvLayout, KvPool};
use crate::linear::Formats;
use crate::slice::{ModelSlice, Phase, SliceInput, SliceOutput, SliceSpec};

#[derive(Debug, Clone)]
pub struct RankGroupOptions {
    pub layers: Range<usize>,
    pub tp: usize,
    pub block_size: usize,
    pub kv_dtype: KvDtype,
    /// Blocks in each rank's pool.
    pub kv_blocks: usize,
    pub formats: Formats,
    /// Compute threads shared out among the ranks (at least one each).
    pub threads: usize,
}

/// One sequence's part of a forward pass: `n` new tokens at position `pos`,
/// their KV in `blocks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub pos: usize,
    pub n: usize,
    pub blocks: Vec<BlockId>,
}

/// The input of a pass, shared by every rank without copies.
#[derive(Debug, Clone)]
pub enum Input {
    Tokens(Vec<u32>),
    Hidden(Vec<f32>),
}

type PoolJob = Box<dyn FnOnce(&mut KvPool) + Send>;

enum Job {
    Forward {
        input: Arc<Input>,
        spans: Arc<Vec<Span>>,
        phase: Phase,
        stop: Option<Arc<AtomicBool>>,
    },
    Pool(PoolJob),
}

struct Rank {
    tx: Option<mpsc::SyncSender<Job>>,
    rx: mpsc::Receiver<Result<SliceOutput>>,
    thread: Option<JoinHandle<()>>,
}

pub struct RankGroup {
    pub layers: Range<usize>,
    pub tp: usize,
    layouts: Vec<KvLayout>,
    heads: Vec<Range<usize>>,
    ranks: Vec<Rank>,
}

impl RankGroup {
    pub fn new(file: &ModelFile, opts: &RankGroupOptions) -> Result<RankGroup> {
        let per_rank = (opts.threads / opts.tp.max(1)).max(1);
        let groups = ThreadGroup::new(opts.tp);
        let mut ranks = Vec::new();
        let mut layouts = Vec::new();
        let mut heads = Vec::new();
        let layers = opts.layers.clone();
        for (r, group) in groups.into_iter().enumerate() {
            let spec = SliceSpec {
                layers: layers.clone(),
                tp_rank: r,
                tp: opts.tp,
            };
            let slice = ModelSlice::load(file, &spec, opts.formats)?;
            let layout = slice.kv_layout(opts.block_size, opts.kv_dtype);
            layouts.push(layout.clone());
            heads.push(spec.kv_heads(&file.config));
            let kv = KvPool::new(layout, opts.kv_blocks);
            // Each rank computes on a pool of its own: its thread takes part
            // in the work instead of waking others for every parallel loop,
            // and a rank blocked in an all-reduce never holds up another's pool.
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(per_rank)
                .thread_name(move |i| format!("rank{r}-compute{i}"))
                .build()
                .map_err(|e| ModelError::Worker(format!("cannot start compute threads: {e}")))?;
            let (tx, job_rx) = mpsc::sync_channel::<Job>(1);
            let (out_tx, rx) = mpsc::sync_channel(1);
            let thread = std::thread::Builder::new()
                .name(format!("slice-{}-{}-r{r}", layers.start, layers.end))
                .spawn(move || rank_loop(slice, kv, pool, group, job_rx, out_tx))
                .map_err(|e| ModelError::Worker(format!("cannot start a rank thread: {e}")))?;
            ranks.push(Rank {
                tx: Some(tx),
                rx,
                thread: Some(thread),
            });
        }
        Ok(RankGroup {
            layers,
            tp: opts.tp,
            layouts,
            heads,
            ranks,
        })
    }

    /// The block layout of `rank`'s pool.
    pub fn layout(&self, rank: usize) -> &KvLayout {
        &self.layouts[rank]
    }

    /// The KV heads `rank` holds.
    pub fn heads(&self, rank: usize) -> Range<usize> {
        self.heads[rank].clone()
    }

    fn send(&self, rank: usize, job: Job) -> Result<()> {
        self.ranks[rank]
            .tx
            .as_ref()
            .expect("senders live until drop")
            .send(job)
            .map_err(|_| ModelError::Worker("a rank thread has stopped".into()))
    }

    /// One pass of every rank over `spans`; returns rank 0's output (hidden
    /// states, or logits on the last layers).
    pub fn forward(&self, input: Input, spans: Vec<Span>, phase: Phase) -> Result<SliceOutput> {
        self.forward_until(input, spans, phase, None)
    }

    /// [`forward`](Self::forward), stopped between layers with
    /// [`ModelError::Preempted`] once `stop` is set. Only a group of one rank
    /// honours it: ranks that stopped at different layers would leave the
    /// others waiting in an all-reduce.
    pub fn forward_until(
        &self,
        input: Input,
        spans: Vec<Span>,
        phase: Phase,
        stop: Option<Arc<AtomicBool>>,
    ) -> Result<SliceOutput> {
        let stop = stop.filter(|_| self.ranks.len() == 1);
        let input = Arc::new(input);
        let spans = Arc::new(spans);
        for r in 0..self.ranks.len() {
            self.send(
                r,
                Job::Forward {
                    input: input.clone(),
                    spans: spans.clone(),
                    phase,
                    stop: stop.clone(),
                },
            )?;
        }
        let mut first = None;
        let mut err = None;
        for rank in &self.ranks {
            match rank.rx.recv() {
                Ok(Ok(o)) => {
                    first.get_or_insert(o);
                }
                Ok(Err(e)) => {
                    err.get_or_insert(e);
                }
                Err(_) => {
                    err.get_or_insert(ModelError::Worker("a rank thread has stopped".into()));
                }
            }
        }
        match (err, first) {
            (Some(e), _) => Err(e),
            (None, Some(o)) => Ok(o),
            (None, None) => Err(ModelError::Worker("a group without ranks".into())),
        }
    }

    /// Runs `f` on `rank`'s KV pool, on the rank's own thread, and returns its result.
    pub fn with_pool<R: Send + 'static>(
        &self,
        rank: usize,
        f: impl FnOnce(&mut KvPool) -> R + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(
            rank,
            Job::Pool(Box::new(move |pool| {
                let _ = tx.send(f(pool));
            })),
        )?;
        rx.recv()
            .map_err(|_| ModelError::Worker("a rank thread has stopped".into()))
    }
}

impl Drop for RankGroup {
    fn drop(&mut self) {
        for r in self.ranks.iter_mut() {
            r.tx.take();
        }
        for r in self.ranks.iter_mut() {
            if let Some(t) = r.thread.take() {
                let _ = t.join();
            }
        }
    }
}

fn rank_loop(
    slice: ModelSlice,
    mut kv: KvPool,
    pool: rayon::ThreadPool,
    group: ThreadGroup,
    jobs: mpsc::Receiver<Job>,
    out: mpsc::SyncSender<Result<SliceOutput>>,
) {
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Pool(f) => f(&mut kv),
            Job::Forward {
                input,
                spans,
                phase,
                stop,
            } => {
                let spans: Vec<SeqSpan> = spans
                    .iter()
                    .map(|s| SeqSpan {
                        pos: s.pos,
                        n: s.n,
                        blocks: &s.blocks,
                    })
                    .collect();
                let input = match &*input {
                    Input::Tokens(t) => SliceInput::Tokens(t),
                    Input::Hidden(h) => SliceInput::Hidden(h),
                };
                let r = pool.install(|| {
                    slice.forward(
                        input,
                        &spans,
                        &mut kv,
                        &group as &dyn AllReduce,
                        phase,
                        stop.as_deref(),
                    )
                });
                if out.send(r).is_err() {
                    break;
                }
            }
        }
    }
}
