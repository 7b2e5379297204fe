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
use crate::comm::{Collectives, ThreadGroup};
use crate::cuda::{CommSpec, CudaSlice, CudaWeights, Gpu, GpuDtype};
use crate::device::Device;
use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::kv::{BlockId, KvDtype, KvLayout, KvPool};
use crate::linear::Formats;
use crate::sampling::{select, Draw, Sampled};
use crate::slice::{ModelSlice, Phase, SliceInput, SliceOutput, SliceSpec};

#[derive(Debug, Clone)]
pub struct RankGroupOptions {
    pub layers: Range<usize>,
    pub tp: usize,
    /// Expert parallelism for a mixture-of-experts model: 1, or `tp`.
    pub ep: usize,
    pub block_size: usize,
    pub kv_dtype: KvDtype,
    /// Blocks in each rank's pool.
    pub kv_blocks: usize,
    pub formats: Formats,
    /// Compute threads shared out among the ranks (at least one each); CPU only.
    pub threads: usize,
    /// Where the ranks compute.
    pub device: Device,
    /// Weight precision on a GPU.
    pub gpu_dtype: GpuDtype,
}

impl Default for RankGroupOptions {
    fn default() -> Self {
        RankGroupOptions {
            layers: 0..1,
            tp: 1,
            ep: 1,
            block_size: KvLayout::DEFAULT_BLOCK_SIZE,
            kv_dtype: KvDtype::F32,
            kv_blocks: 64,
            formats: Formats::BOTH,
            threads: 0,
            device: Device::Cpu,
            gpu_dtype: GpuDtype::Bf16,
        }
    }
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
        /// Choose each sequence's token on the rank (last stage).
        draws: Option<Arc<Vec<Draw>>>,
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
    pub device: Device,
    layouts: Vec<KvLayout>,
    heads: Vec<Range<usize>>,
    ranks: Vec<Rank>,
    /// What each rank computes on, e.g. "GPU 0 (NVIDIA H200, sm_90)".
    pub placement: Vec<String>,
}

impl RankGroup {
    pub fn new(file: &ModelFile, opts: &RankGroupOptions) -> Result<RankGroup> {
        if opts.device.is_cpu() {
            Self::on_cpu(file, opts)
        } else {
            Self::on_gpu(file, opts)
        }
    }

    fn on_cpu(file: &ModelFile, opts: &RankGroupOptions) -> Result<RankGroup> {
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
                ep: opts.ep,
            };
            let slice = ModelSlice::load(file, &spec, opts.formats)?;
            let layout = slice.kv_layout(opts.block_size, opts.kv_dtype);
            layouts.push(layout);
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
            device: Device::Cpu,
            layouts,
            heads,
            ranks,
            placement: vec!["cpu".into(); opts.tp],
        })
    }

    /// Ranks on GPUs: the weights are read and converted here, then each
    /// rank thread uploads its own, joins the group's all-reduce and makes
    /// its pool; this returns once every rank is ready or one failed.
    fn on_gpu(file: &ModelFile, opts: &RankGroupOptions) -> Result<RankGroup> {
        let gpus: Vec<Gpu> = crate::cuda::probe(&opts.device, opts.tp)?;
        let ordinals: Vec<usize> = gpus.iter().map(|g| g.ordinal).collect();
        let specs = CommSpec::for_ranks(&ordinals)?;
        let layers = opts.layers.clone();
        let mut ranks = Vec::new();
        let mut layouts = Vec::new();
        let mut heads = Vec::new();
        let mut ready = Vec::new();
        for (r, (gpu, comm)) in gpus.iter().cloned().zip(specs).enumerate() {
            let spec = SliceSpec {
                layers: layers.clone(),
                tp_rank: r,
                tp: opts.tp,
                ep: opts.ep,
            };
            let weights = CudaWeights::read(file, &spec, opts.gpu_dtype)?;
            let layout = weights.kv_layout(opts.block_size, opts.kv_dtype);
            layouts.push(layout);
            heads.push(spec.kv_heads(&file.config));
            let n_blocks = opts.kv_blocks;
            let (tx, job_rx) = mpsc::sync_channel::<Job>(1);
            let (out_tx, rx) = mpsc::sync_channel(1);
            let (ready_tx, ready_rx) = mpsc::sync_channel(1);
            let thread = std::thread::Builder::new()
                .name(format!("gpu-slice-{}-{}-r{r}", layers.start, layers.end))
                .spawn(move || {
                    let init = (|| -> Result<(CudaSlice, KvPool)> {
                        let stream = Arc::new(gpu.stream()?);
                        let comm = comm.join(&stream)?;
                        let kv = KvPool::new_on_device(layout, n_blocks, stream.clone())?;
                        let slice = CudaSlice::upload(weights, stream, comm)?;
                        Ok((slice, kv))
                    })();
                    match init {
                        Ok((slice, kv)) => {
                            let _ = ready_tx.send(Ok(()));
                            gpu_rank_loop(slice, kv, job_rx, out_tx);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
                .map_err(|e| ModelError::Worker(format!("cannot start a rank thread: {e}")))?;
            ready.push(ready_rx);
            ranks.push(Rank {
                tx: Some(tx),
                rx,
                thread: Some(thread),
            });
        }
        let group = RankGroup {
            layers,
            tp: opts.tp,
            device: opts.device.clone(),
            layouts,
            heads,
            ranks,
            placement: gpus.iter().map(Gpu::describe).collect(),
        };
        for (r, rx) in ready.into_iter().enumerate() {
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(ModelError::Worker(format!(
                        "GPU rank {r} stopped while loading"
                    )))
                }
            }
        }
        Ok(group)
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
        self.pass(input, spans, phase, stop, None)
    }

    /// A pass of the last layers that chooses each span's next token with
    /// its draw, on the device that computed the logits: only the tokens
    /// and their log-probabilities come back.
    pub fn forward_sampled(
        &self,
        input: Input,
        spans: Vec<Span>,
        phase: Phase,
        draws: Vec<Draw>,
        stop: Option<Arc<AtomicBool>>,
    ) -> Result<Vec<Sampled>> {
        if draws.len() != spans.len() {
            return Err(ModelError::Invalid(format!(
                "{} draws for {} sequences",
                draws.len(),
                spans.len()
            )));
        }
        match self.pass(input, spans, phase, stop, Some(Arc::new(draws)))? {
            SliceOutput::Sampled(s) => Ok(s),
            _ => Err(ModelError::Worker(
                "a sampled pass over layers without the LM head".into(),
            )),
        }
    }

    fn pass(
        &self,
        input: Input,
        spans: Vec<Span>,
        phase: Phase,
        stop: Option<Arc<AtomicBool>>,
        draws: Option<Arc<Vec<Draw>>>,
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
                    draws: draws.clone(),
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
                draws,
            } => {
                let spans = seq_spans(&spans);
                let input = slice_input(&input);
                let r = pool.install(|| {
                    slice.forward(
                        input,
                        &spans,
                        &mut kv,
                        &group as &dyn Collectives,
                        phase,
                        stop.as_deref(),
                    )
                });
                // The CPU chooses from the logits exactly as the GPU's kernel does.
                let r = sample_rows(
                    r,
                    draws.as_deref().map(Vec::as_slice),
                    slice.config.vocab_size,
                );
                if out.send(r).is_err() {
                    break;
                }
            }
        }
    }
}

/// Chooses each sequence's token from its row of logits on the host (on
/// the CPU always, on a GPU when a draw needs more than its kernel).
fn sample_rows(
    r: Result<SliceOutput>,
    draws: Option<&[Draw]>,
    vocab: usize,
) -> Result<SliceOutput> {
    match (r, draws) {
        (Ok(SliceOutput::Logits(l)), Some(d)) => Ok(SliceOutput::Sampled(
            l.chunks(vocab)
                .zip(d)
                .map(|(row, d)| select(row, d))
                .collect(),
        )),
        (r, _) => r,
    }
}

fn seq_spans(spans: &[Span]) -> Vec<SeqSpan<'_>> {
    spans
        .iter()
        .map(|s| SeqSpan {
            pos: s.pos,
            n: s.n,
            blocks: &s.blocks,
        })
        .collect()
}

fn slice_input(input: &Input) -> SliceInput<'_> {
    match input {
        Input::Tokens(t) => SliceInput::Tokens(t),
        Input::Hidden(h) => SliceInput::Hidden(h),
    }
}

fn gpu_rank_loop(
    mut slice: CudaSlice,
    mut kv: KvPool,
    jobs: mpsc::Receiver<Job>,
    out: mpsc::SyncSender<Result<SliceOutput>>,
) {
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Pool(f) => f(&mut kv),
            Job::Forward {
                input,
                spans,
                stop,
                draws,
                ..
            } => {
                let spans = seq_spans(&spans);
                // Logit processors, min-p and top log-probabilities run on
                // the host: a pass with any of them brings its logits back.
                let host = draws
                    .as_deref()
                    .filter(|d| d.iter().any(|d| d.shape.is_some()));
                let r = slice.forward(
                    slice_input(&input),
                    &spans,
                    &mut kv,
                    stop.as_deref(),
                    draws
                        .as_deref()
                        .filter(|_| host.is_none())
                        .map(|d| d.as_slice()),
                );
                let r = sample_rows(r, host.map(|d| d.as_slice()), slice.config.vocab_size);
                if out.send(r).is_err() {
                    break;
                }
            }
        }
    }
}
