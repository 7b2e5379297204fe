//! A model slice on a GPU: the same layer range times KV-head shard as the
//! CPU's [`crate::ModelSlice`], its weights in device memory (bf16, or f32
//! where asked) and a forward pass that keeps everything on the device:
//! embedding lookup, RMSNorm, the projections through cuBLAS (f32
//! accumulation), Q/K norms, RoPE and KV writes in one kernel, paged
//! attention (split-KV for one-token spans, flash-style tiles for prefill
//! chunks), SiLU-and-multiply, the tensor-parallel all-reduce, and the LM
//! head with sampling. Only the chosen tokens and their log-probabilities
//! (or hidden states for the next pipeline stage) come back to the host.
//!
//! A decode step whose spans are all single tokens replays a CUDA graph
//! captured for its batch-size bucket ([`super::graph`]), padded with rows
//! that write only the pool's spare block.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::comm::DeviceComm;
use super::gpu::{err, Arg, DType, DevBuf, Gemm, Stream};
use super::pool::{dtype_code, DevicePool};
use crate::attention::SeqSpan;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::kv::{KvPool, KvStorage};
use crate::sampling::{Draw, Sampled};
use crate::slice::{SliceInput, SliceOutput, SliceSpec};

use super::host_weights::HostMat;
pub use super::host_weights::{CudaWeights, GpuDtype};
pub(crate) use super::meta::{build_meta, Offsets, Out, Plan};

/// Keys per part of split-KV decode attention (DECODE_PART in kernels.cu).
pub const DECODE_PART: usize = 256;
/// Query rows per block of prefill attention (PREFILL_BQ in kernels.cu).
const PREFILL_BQ: usize = 64;
/// Largest GQA group and head dimension the attention kernels take.
pub(super) const MAX_GROUP: usize = 16;
pub(super) const MAX_HEAD_DIM: usize = 256;

struct Mat {
    buf: DevBuf,
    rows: usize,
    cols: usize,
}

struct Layer {
    attn_norm: DevBuf,
    qkv: Mat,
    qkv_bias: Option<DevBuf>,
    q_norm: Option<DevBuf>,
    k_norm: Option<DevBuf>,
    o: Mat,
    ffn_norm: DevBuf,
    gate_up: Mat,
    down: Mat,
}

struct Head {
    norm: DevBuf,
    /// `None`: the LM head is the embedding table.
    lm: Option<Mat>,
}

/// Device scratch for passes of up to `tokens` tokens and `seqs` sequences.
pub(crate) struct Scratch {
    pub tokens: usize,
    pub seqs: usize,
    pub parts: usize,
    pub meta_len: usize,
    pub x: DevBuf,
    xn: DevBuf,
    qkv: DevBuf,
    q: DevBuf,
    attn: DevBuf,
    o: DevBuf,
    gu: DevBuf,
    act: DevBuf,
    d: DevBuf,
    part_acc: DevBuf,
    part_ml: DevBuf,
    xl: DevBuf,
    pub logits: DevBuf,
    /// Chosen token (i32) then log-probability (f32 bits), per sequence.
    pub sampled: DevBuf,
    pub meta: DevBuf,
    bad: DevBuf,
}

pub struct CudaSlice {
    pub config: ModelConfig,
    pub spec: SliceSpec,
    pub stream: Arc<Stream>,
    comm: Box<dyn DeviceComm>,
    wdt: DType,
    embed: Option<Mat>,
    layers: Vec<Layer>,
    head: Option<Head>,
    inv_freq: DevBuf,
    n_q: usize,
    n_kv: usize,
    inter: usize,
    eager: Option<Scratch>,
    pub(crate) graphs: super::graph::Graphs,
}

impl CudaSlice {
    /// Uploads `w` on the rank's thread, which owns `stream` and `comm`.
    pub fn upload(
        w: CudaWeights,
        stream: Arc<Stream>,
        comm: Box<dyn DeviceComm>,
    ) -> Result<CudaSlice> {
        let s = &stream;
        let mat = |m: HostMat| -> Result<Mat> {
            Ok(Mat {
                buf: s.upload(&m.bytes)?,
                rows: m.rows,
                cols: m.cols,
            })
        };
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in w.layers {
            layers.push(Layer {
                attn_norm: s.upload(&l.attn_norm)?,
                qkv: mat(l.qkv)?,
                qkv_bias: l.qkv_bias.map(|b| s.upload(&b)).transpose()?,
                q_norm: l.q_norm.map(|b| s.upload(&b)).transpose()?,
                k_norm: l.k_norm.map(|b| s.upload(&b)).transpose()?,
                o: mat(l.o)?,
                ffn_norm: s.upload(&l.ffn_norm)?,
                gate_up: mat(l.gate_up)?,
                down: mat(l.down)?,
            });
        }
        let embed = w.embed.map(mat).transpose()?;
        let head = match w.head {
            Some((norm, lm)) => Some(Head {
                norm: s.upload(&norm)?,
                lm: lm.map(mat).transpose()?,
            }),
            None => None,
        };
        let inv_freq = s.upload(&w.inv_freq)?;
        s.sync()?;
        Ok(CudaSlice {
            config: w.config,
            spec: w.spec,
            stream: stream.clone(),
            comm,
            wdt: w.dtype.dtype(),
            embed,
            layers,
            head,
            inv_freq,
            n_q: w.n_q,
            n_kv: w.n_kv,
            inter: w.inter,
            eager: None,
            graphs: super::graph::Graphs::default(),
        })
    }

    pub fn has_head(&self) -> bool {
        self.head.is_some()
    }

    pub(crate) fn comm_capturable(&self) -> bool {
        self.comm.capturable()
    }

    /// How decode steps run: captured graphs (the default), their padded
    /// steps queued kernel by kernel, or the general pass.
    pub fn set_graph_mode(&mut self, mode: super::graph::GraphMode) {
        self.graphs.mode = mode;
    }

    /// Graphs captured so far (one per batch-size bucket and output kind).
    pub fn graphs_captured(&self) -> usize {
        self.graphs.captured()
    }

    pub fn weight_bytes(&self) -> usize {
        let m = |m: &Mat| m.buf.bytes;
        self.layers
            .iter()
            .map(|l| m(&l.qkv) + m(&l.o) + m(&l.gate_up) + m(&l.down))
            .sum::<usize>()
            + self.embed.as_ref().map_or(0, m)
            + self.head.as_ref().and_then(|h| h.lm.as_ref()).map_or(0, m)
    }

    /// Device scratch for `tokens` tokens and `seqs` sequences.
    pub(crate) fn scratch(
        &self,
        tokens: usize,
        seqs: usize,
        parts: usize,
        meta_len: usize,
    ) -> Result<Scratch> {
        let g = &self.stream.gpu;
        let (h, hd) = (self.config.hidden, self.config.head_dim);
        let ab = self.wdt.bytes();
        let w = (self.n_q + 2 * self.n_kv) * hd;
        let vocab = if self.head.is_some() {
            self.config.vocab_size
        } else {
            1
        };
        let (t, s, p) = (tokens.max(1), seqs.max(1), parts.max(1));
        Ok(Scratch {
            tokens: t,
            seqs: s,
            parts: p,
            meta_len,
            x: g.alloc(t * h * 4)?,
            xn: g.alloc(t * h * ab)?,
            qkv: g.alloc(t * w * 4)?,
            q: g.alloc(t * self.n_q * hd * 4)?,
            attn: g.alloc(t * self.n_q * hd * ab)?,
            o: g.alloc(t * h * 4)?,
            gu: g.alloc(t * 2 * self.inter * 4)?,
            act: g.alloc(t * self.inter * ab)?,
            d: g.alloc(t * h * 4)?,
            part_acc: g.alloc(s * self.n_q * p * hd * 4)?,
            part_ml: g.alloc(s * self.n_q * p * 2 * 4)?,
            xl: g.alloc(s * h * ab)?,
            logits: g.alloc(s * vocab * 4)?,
            sampled: g.alloc(s * 2 * 4)?,
            meta: g.alloc(meta_len.max(1) * 4)?,
            bad: g.alloc(4)?,
        })
    }

    /// Checks a pass's spans as the CPU slice does.
    fn check(&self, input: &SliceInput, seqs: &[SeqSpan], pool: &DevicePool) -> Result<()> {
        let t: usize = seqs.iter().map(|s| s.n).sum();
        let h = self.config.hidden;
        match input {
            SliceInput::Tokens(ids) => {
                if self.embed.is_none() {
                    return Err(ModelError::InvalidSlice(
                        "token input to a slice without the embedding".into(),
                    ));
                }
                if ids.len() != t {
                    return Err(ModelError::Invalid(format!(
                        "{} tokens for spans covering {t}",
                        ids.len()
                    )));
                }
                if let Some(id) = ids
                    .iter()
                    .find(|id| **id as usize >= self.config.vocab_size)
                {
                    return Err(ModelError::Invalid(format!(
                        "token id {id} is outside the vocabulary of {}",
                        self.config.vocab_size
                    )));
                }
            }
            SliceInput::Hidden(x) => {
                if x.len() != t * h {
                    return Err(ModelError::Invalid(format!(
                        "hidden state of {} values for {t} tokens of width {h}",
                        x.len()
                    )));
                }
            }
        }
        let layout = pool.layout;
        if layout.layers != self.layers.len() || layout.kv_heads != self.n_kv {
            return Err(ModelError::Kv(
                "pool layout does not match the slice".into(),
            ));
        }
        for s in seqs {
            if s.n == 0 {
                return Err(ModelError::Invalid("a span without tokens".into()));
            }
            if layout.blocks_for(s.pos + s.n) > s.blocks.len() {
                return Err(ModelError::Kv(format!(
                    "{} blocks cannot hold {} positions",
                    s.blocks.len(),
                    s.pos + s.n
                )));
            }
            if s.pos + s.n > self.config.context_length {
                return Err(ModelError::Invalid(format!(
                    "position {} is beyond the model's context length {}",
                    s.pos + s.n,
                    self.config.context_length
                )));
            }
            if let Some(b) = s.blocks.iter().find(|b| b.0 as usize >= pool.n_blocks) {
                return Err(ModelError::Kv(format!(
                    "block {} is outside the pool of {} blocks",
                    b.0, pool.n_blocks
                )));
            }
        }
        Ok(())
    }

    /// Runs the slice over a batch, as [`crate::ModelSlice::forward`] does;
    /// with `draws` (the last stage), chooses each sequence's next token on
    /// the device and returns [`SliceOutput::Sampled`].
    pub fn forward(
        &mut self,
        input: SliceInput,
        seqs: &[SeqSpan],
        pool: &mut KvPool,
        stop: Option<&AtomicBool>,
        draws: Option<&[Draw]>,
    ) -> Result<SliceOutput> {
        let KvStorage::Device(dp) = &pool.storage else {
            return Err(ModelError::Kv(
                "a GPU slice needs a pool in GPU memory".into(),
            ));
        };
        self.check(&input, seqs, dp)?;
        if seqs.is_empty() {
            return Ok(SliceOutput::Nothing);
        }
        let out = if self.head.is_none() {
            if self.spec.last(&self.config) {
                None
            } else {
                Some(Out::Hidden)
            }
        } else if draws.is_some() {
            Some(Out::Sample)
        } else {
            Some(Out::Logits)
        };
        if let (SliceInput::Tokens(ids), Some(o)) = (&input, out) {
            if o != Out::Hidden && super::graph::eligible(self, seqs) {
                return super::graph::step(self, ids, seqs, dp, draws, o);
            }
        }
        self.eager(input, seqs, dp, stop, draws, out)
    }

    #[allow(clippy::too_many_arguments)]
    fn eager(
        &mut self,
        input: SliceInput,
        seqs: &[SeqSpan],
        pool: &DevicePool,
        stop: Option<&AtomicBool>,
        draws: Option<&[Draw]>,
        out: Option<Out>,
    ) -> Result<SliceOutput> {
        let bs = pool.layout.block_size;
        let t: usize = seqs.iter().map(|s| s.n).sum();
        let s = seqs.len();
        let sd = seqs.iter().filter(|s| s.n == 1).count();
        let sp = s - sd;
        let tables: usize = seqs.iter().map(|s| (s.pos + s.n).div_ceil(bs)).sum();
        let max_ctx = seqs
            .iter()
            .filter(|s| s.n == 1)
            .map(|s| s.pos + 1)
            .max()
            .unwrap_or(0);
        let max_parts = max_ctx.div_ceil(DECODE_PART);
        let max_n = seqs.iter().map(|s| s.n).max().unwrap_or(0);
        let plan = Plan {
            t,
            s,
            sd,
            sp,
            max_parts,
            max_n,
            tokens_in: matches!(input, SliceInput::Tokens(_)),
            out: out.unwrap_or(Out::Hidden),
            off: Offsets::new(t, s, sd, sp, tables),
        };
        let ids = match &input {
            SliceInput::Tokens(ids) => Some(*ids),
            SliceInput::Hidden(_) => None,
        };
        let meta = build_meta(&plan, ids, seqs, bs, draws, self.config.vocab_size, None);
        let fits = self.eager.as_ref().is_some_and(|sc| {
            sc.tokens >= t && sc.seqs >= s && sc.parts >= max_parts && sc.meta_len >= meta.len()
        });
        if !fits {
            let grow = |need: usize, have: Option<usize>| need.max(have.unwrap_or(0));
            let have = self.eager.as_ref();
            let sc = self.scratch(
                grow(t, have.map(|h| h.tokens)),
                grow(s, have.map(|h| h.seqs)),
                grow(max_parts, have.map(|h| h.parts)),
                grow(meta.len(), have.map(|h| h.meta_len)),
            )?;
            self.eager = Some(sc);
        }
        let sc = self.eager.take().expect("allocated above");
        let r = (|| {
            self.stream.htod(sc.meta.ptr, &meta)?;
            if let SliceInput::Hidden(x) = &input {
                self.stream.htod(sc.x.ptr, x)?;
            }
            self.enqueue(&plan, &sc, pool, stop)?;
            self.collect(&plan, &sc, out)
        })();
        self.eager = Some(sc);
        r
    }

    /// Reads a pass's result back.
    pub(crate) fn collect(
        &self,
        plan: &Plan,
        sc: &Scratch,
        out: Option<Out>,
    ) -> Result<SliceOutput> {
        match out {
            None => {
                self.stream.sync()?;
                Ok(SliceOutput::Nothing)
            }
            Some(Out::Hidden) => Ok(SliceOutput::Hidden(
                self.stream
                    .read::<f32>(sc.x.ptr, plan.t * self.config.hidden)?,
            )),
            Some(Out::Logits) => Ok(SliceOutput::Logits(
                self.stream
                    .read::<f32>(sc.logits.ptr, plan.s * self.config.vocab_size)?,
            )),
            Some(Out::Sample) => {
                let v = self.stream.read::<u32>(sc.sampled.ptr, 2 * plan.s)?;
                Ok(SliceOutput::Sampled(
                    (0..plan.s)
                        .map(|i| Sampled::new(v[i], f32::from_bits(v[plan.s + i])))
                        .collect(),
                ))
            }
        }
    }

    fn meta(&self, sc: &Scratch, off: usize) -> Arg {
        Arg::Ptr(sc.meta.at(off * 4))
    }

    fn act_bf16(&self) -> i32 {
        i32::from(self.wdt == DType::Bf16)
    }

    fn linear(&self, w: &Mat, x: u64, t: usize, y: u64) -> Result<()> {
        self.stream.gemm(&Gemm::linear(
            w.buf.ptr, self.wdt, w.rows, w.cols, x, self.wdt, t, y,
        ))
    }

    fn elementwise_grid(n: usize) -> (u32, u32, u32) {
        (n.div_ceil(256).clamp(1, 8192) as u32, 1, 1)
    }

    /// Queues a whole pass on the stream, reading its metadata from the
    /// scratch's meta buffer: what eager passes run and graphs capture.
    pub(crate) fn enqueue(
        &self,
        plan: &Plan,
        sc: &Scratch,
        pool: &DevicePool,
        stop: Option<&AtomicBool>,
    ) -> Result<()> {
        let st = &self.stream;
        let cfg = &self.config;
        let (h, hd, t) = (cfg.hidden, cfg.head_dim, plan.t);
        let o = &plan.off;
        let abf = self.act_bf16();
        let layout = pool.layout;
        let kvt = dtype_code(layout.dtype);
        let block_elems = layout.block_elems() as i64;
        if plan.tokens_in {
            let e = self
                .embed
                .as_ref()
                .ok_or_else(|| err("no embedding on this slice"))?;
            st.launch(
                "embed_rows",
                (t as u32, 1, 1),
                (256, 1, 1),
                0,
                &[
                    sc.x.arg(),
                    e.buf.arg(),
                    Arg::I32(abf),
                    self.meta(sc, o.ids),
                    Arg::I32(t as i32),
                    Arg::I32(h as i32),
                    Arg::I32(cfg.vocab_size as i32),
                    sc.bad.arg(),
                ],
            )?;
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let mut pending: Option<u64> = None;
        for (li, l) in self.layers.iter().enumerate() {
            if stop.is_some_and(|s| s.load(Ordering::Acquire)) {
                return Err(ModelError::Preempted);
            }
            // x += pending MLP output; xn = norm(x).
            st.launch(
                "rms_norm",
                (t as u32, 1, 1),
                (256, 1, 1),
                0,
                &[
                    sc.xn.arg(),
                    Arg::I32(abf),
                    sc.x.arg(),
                    Arg::Ptr(pending.unwrap_or(0)),
                    l.attn_norm.arg(),
                    Arg::Ptr(0),
                    Arg::I32(t as i32),
                    Arg::I32(h as i32),
                    Arg::F32(cfg.rms_eps),
                ],
            )?;
            self.linear(&l.qkv, sc.xn.ptr, t, sc.qkv.ptr)?;
            st.launch(
                "qkv_rope_store",
                (t as u32, 1, 1),
                (256, 1, 1),
                0,
                &[
                    sc.q.arg(),
                    sc.qkv.arg(),
                    Arg::Ptr(l.qkv_bias.as_ref().map_or(0, |b| b.ptr)),
                    Arg::Ptr(l.q_norm.as_ref().map_or(0, |b| b.ptr)),
                    Arg::Ptr(l.k_norm.as_ref().map_or(0, |b| b.ptr)),
                    self.inv_freq.arg(),
                    self.meta(sc, o.tok_pos),
                    self.meta(sc, o.tok_block),
                    pool.buf.arg(),
                    Arg::I32(kvt),
                    Arg::I32(li as i32),
                    Arg::I32(self.n_q as i32),
                    Arg::I32(self.n_kv as i32),
                    Arg::I32(hd as i32),
                    Arg::I32(layout.block_size as i32),
                    Arg::I64(block_elems),
                    Arg::I32(i32::from(cfg.rope_neox)),
                    Arg::F32(cfg.rms_eps),
                    Arg::I32(t as i32),
                ],
            )?;
            if plan.sd > 0 {
                st.launch(
                    "attn_decode_part",
                    (plan.max_parts as u32, self.n_kv as u32, plan.sd as u32),
                    (128, 1, 1),
                    0,
                    &[
                        sc.part_acc.arg(),
                        sc.part_ml.arg(),
                        sc.q.arg(),
                        pool.buf.arg(),
                        Arg::I32(kvt),
                        self.meta(sc, o.dec_tok),
                        self.meta(sc, o.dec_ctx),
                        self.meta(sc, o.tables),
                        self.meta(sc, o.dec_toff),
                        Arg::I32(li as i32),
                        Arg::I32(self.n_q as i32),
                        Arg::I32(self.n_kv as i32),
                        Arg::I32(hd as i32),
                        Arg::I32(layout.block_size as i32),
                        Arg::I64(block_elems),
                        Arg::F32(scale),
                        Arg::I32(plan.max_parts as i32),
                    ],
                )?;
                st.launch(
                    "attn_decode_reduce",
                    (self.n_q as u32, plan.sd as u32, 1),
                    (hd.div_ceil(32).min(8) as u32 * 32, 1, 1),
                    0,
                    &[
                        sc.attn.arg(),
                        Arg::I32(abf),
                        sc.part_acc.arg(),
                        sc.part_ml.arg(),
                        self.meta(sc, o.dec_tok),
                        self.meta(sc, o.dec_ctx),
                        Arg::I32(self.n_q as i32),
                        Arg::I32(hd as i32),
                        Arg::I32(plan.max_parts as i32),
                    ],
                )?;
            }
            if plan.sp > 0 {
                let hpl = hd.div_ceil(32).next_power_of_two().max(2);
                st.launch(
                    &format!("attn_prefill_{hpl}"),
                    (
                        plan.max_n.div_ceil(PREFILL_BQ) as u32,
                        self.n_q as u32,
                        plan.sp as u32,
                    ),
                    (256, 1, 1),
                    super::real::prefill_smem_bytes(hd) as u32,
                    &[
                        sc.attn.arg(),
                        Arg::I32(abf),
                        sc.q.arg(),
                        pool.buf.arg(),
                        Arg::I32(kvt),
                        self.meta(sc, o.pre_tok),
                        self.meta(sc, o.pre_pos),
                        self.meta(sc, o.pre_n),
                        self.meta(sc, o.tables),
                        self.meta(sc, o.pre_toff),
                        Arg::I32(li as i32),
                        Arg::I32(self.n_q as i32),
                        Arg::I32(self.n_kv as i32),
                        Arg::I32(hd as i32),
                        Arg::I32(layout.block_size as i32),
                        Arg::I64(block_elems),
                        Arg::F32(scale),
                    ],
                )?;
            }
            self.linear(&l.o, sc.attn.ptr, t, sc.o.ptr)?;
            self.comm.all_reduce(st, sc.o.ptr, t * h)?;
            // x += attention output; xn = norm(x).
            st.launch(
                "rms_norm",
                (t as u32, 1, 1),
                (256, 1, 1),
                0,
                &[
                    sc.xn.arg(),
                    Arg::I32(abf),
                    sc.x.arg(),
                    sc.o.arg(),
                    l.ffn_norm.arg(),
                    Arg::Ptr(0),
                    Arg::I32(t as i32),
                    Arg::I32(h as i32),
                    Arg::F32(cfg.rms_eps),
                ],
            )?;
            self.linear(&l.gate_up, sc.xn.ptr, t, sc.gu.ptr)?;
            st.launch(
                "silu_mul",
                Self::elementwise_grid(t * self.inter),
                (256, 1, 1),
                0,
                &[
                    sc.act.arg(),
                    Arg::I32(abf),
                    sc.gu.arg(),
                    Arg::I32(t as i32),
                    Arg::I32(self.inter as i32),
                ],
            )?;
            self.linear(&l.down, sc.act.ptr, t, sc.d.ptr)?;
            self.comm.all_reduce(st, sc.d.ptr, t * h)?;
            pending = Some(sc.d.ptr);
        }
        if let Some(d) = pending {
            st.launch(
                "add_inplace",
                Self::elementwise_grid(t * h),
                (256, 1, 1),
                0,
                &[sc.x.arg(), Arg::Ptr(d), Arg::I64((t * h) as i64)],
            )?;
        }
        let Some(head) = &self.head else {
            return Ok(());
        };
        if plan.out == Out::Hidden {
            return Ok(());
        }
        st.launch(
            "rms_norm",
            (plan.s as u32, 1, 1),
            (256, 1, 1),
            0,
            &[
                sc.xl.arg(),
                Arg::I32(abf),
                sc.x.arg(),
                Arg::Ptr(0),
                head.norm.arg(),
                self.meta(sc, o.last_row),
                Arg::I32(plan.s as i32),
                Arg::I32(h as i32),
                Arg::F32(cfg.rms_eps),
            ],
        )?;
        let lm = match (&head.lm, &self.embed) {
            (Some(m), _) | (None, Some(m)) => m,
            (None, None) => return Err(err("the LM head has no weights")),
        };
        self.linear(lm, sc.xl.ptr, plan.s, sc.logits.ptr)?;
        if plan.out == Out::Sample {
            let s = plan.s;
            st.launch(
                "sample_rows",
                (s as u32, 1, 1),
                (1024, 1, 1),
                0,
                &[
                    sc.sampled.arg(),
                    Arg::Ptr(sc.sampled.at(s * 4)),
                    sc.logits.arg(),
                    Arg::I32(cfg.vocab_size as i32),
                    self.meta(sc, o.temperature),
                    self.meta(sc, o.top_k),
                    self.meta(sc, o.top_p),
                    self.meta(sc, o.u),
                ],
            )?;
        }
        Ok(())
    }
}
