//! A slice of the model: a layer range `[a, b)` times a KV-head shard (rank
//! `r` of `tp`). Every role runs one: the single-process reference holds the
//! whole model, a prefill stage a layer range with all heads, a decode rank
//! all layers with its heads.
//!
//! A tensor-parallel shard holds the Q/K/V rows of its KV heads and their
//! query groups, the matching input columns of the attention output, and
//! `1/tp` of the MLP's intermediate dimension. Each layer's attention output
//! and MLP down projection yield partial sums that [`AllReduce`] combines.
//! A mixture-of-experts layer either cuts every expert the same way (EP 1)
//! or gives each rank whole experts and moves tokens to them with
//! [`AllToAll`](crate::comm::AllToAll) (EP = TP).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::attention::{paged_attention, SeqSpan};
use crate::comm::{sum_pieces, Collectives};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::kv::{KvDtype, KvLayout, KvPool};
use crate::linear::{swiglu_pieces, ColumnPieces, Format, Formats, Linear};
use crate::moe::Moe;
use crate::quant::QMat;
use crate::source::RawTensor;
use crate::weights::FfnTensors;

/// Which part of the model a slice holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceSpec {
    pub layers: Range<usize>,
    pub tp_rank: usize,
    pub tp: usize,
    /// Expert parallelism: 1 (every rank holds every expert, cut to its
    /// share of the width) or `tp` (each rank holds whole experts, its
    /// share of them).
    #[serde(default = "one")]
    pub ep: usize,
}

fn one() -> usize {
    1
}

impl SliceSpec {
    pub fn full(cfg: &ModelConfig) -> SliceSpec {
        SliceSpec {
            layers: 0..cfg.n_layers,
            tp_rank: 0,
            tp: 1,
            ep: 1,
        }
    }

    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        if self.layers.start >= self.layers.end || self.layers.end > cfg.n_layers {
            return Err(ModelError::InvalidSlice(format!(
                "layer range {}..{} is empty or outside the model's {} layers",
                self.layers.start, self.layers.end, cfg.n_layers
            )));
        }
        if self.tp == 0 || !cfg.valid_tp().contains(&self.tp) {
            return Err(ModelError::InvalidSlice(format!(
                "tensor-parallel degree {} does not divide the model's {} KV heads; valid values: {:?}",
                self.tp,
                cfg.n_kv_heads,
                cfg.valid_tp()
            )));
        }
        if self.tp_rank >= self.tp {
            return Err(ModelError::InvalidSlice(format!(
                "rank {} is not below tp {}",
                self.tp_rank, self.tp
            )));
        }
        cfg.check_ep(self.ep, self.tp)
            .map_err(ModelError::InvalidSlice)
    }

    /// The experts this shard holds (mixture-of-experts models).
    pub fn experts(&self, cfg: &ModelConfig) -> Range<usize> {
        let n = cfg.moe.map_or(0, |m| m.experts);
        if self.ep <= 1 {
            return 0..n;
        }
        let per = n / self.ep;
        self.tp_rank * per..(self.tp_rank + 1) * per
    }

    /// The part of each held expert's width this shard computes.
    pub fn expert_width(&self, cfg: &ModelConfig) -> Range<usize> {
        let w = cfg.moe.map_or(0, |m| m.intermediate);
        if self.ep > 1 {
            return 0..w;
        }
        let per = w / self.tp;
        self.tp_rank * per..(self.tp_rank + 1) * per
    }

    pub fn first(&self) -> bool {
        self.layers.start == 0
    }

    pub fn last(&self, cfg: &ModelConfig) -> bool {
        self.layers.end == cfg.n_layers
    }

    /// KV heads held by this shard.
    pub fn kv_heads(&self, cfg: &ModelConfig) -> Range<usize> {
        let per = cfg.n_kv_heads / self.tp;
        self.tp_rank * per..(self.tp_rank + 1) * per
    }

    /// Intermediate (MLP) columns held by this shard.
    pub fn intermediate(&self, cfg: &ModelConfig) -> Range<usize> {
        let per = cfg.intermediate / self.tp;
        self.tp_rank * per..(self.tp_rank + 1) * per
    }

    /// Splits `n_layers` into `pp` contiguous ranges as evenly as possible.
    pub fn even_split(n_layers: usize, pp: usize) -> Result<Vec<Range<usize>>> {
        if pp == 0 || pp > n_layers {
            return Err(ModelError::InvalidSlice(format!(
                "cannot split {n_layers} layers into {pp} pipeline stages (1..={n_layers})"
            )));
        }
        let (base, extra) = (n_layers / pp, n_layers % pp);
        let mut start = 0;
        Ok((0..pp)
            .map(|i| {
                let len = base + usize::from(i < extra);
                let r = start..start + len;
                start += len;
                r
            })
            .collect())
    }
}

/// Which weight format a pass runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Prompt processing: dense weights, one GEMM per chunk.
    Prefill,
    /// Token generation: quantized matrix-vector products.
    Decode,
}

impl Phase {
    fn format(self) -> Format {
        match self {
            Phase::Prefill => Format::Dense,
            Phase::Decode => Format::Quant,
        }
    }
}

/// What enters a slice: token ids (first stage) or hidden states `[tokens, hidden]`.
#[derive(Debug, Clone)]
pub enum SliceInput<'a> {
    Tokens(&'a [u32]),
    Hidden(&'a [f32]),
}

/// What leaves a slice: hidden states for the next stage, or (last stage,
/// rank 0) the logits of each sequence's last new token, `[seqs, vocab]`.
#[derive(Debug, Clone)]
pub enum SliceOutput {
    Hidden(Vec<f32>),
    Logits(Vec<f32>),
    /// Last-stage ranks other than 0: their part is already in rank 0's logits.
    Nothing,
    /// The last stage's choice for each sequence, when asked to sample.
    Sampled(Vec<crate::sampling::Sampled>),
}

enum Table {
    Quant(QMat),
    Dense { cols: usize, data: Vec<f32> },
}

struct Layer {
    attn_norm: Vec<f32>,
    qkv: Linear,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    o: ColumnPieces,
    ffn_norm: Vec<f32>,
    ffn: Ffn,
}

enum Ffn {
    /// A SwiGLU MLP (this shard's share of its width).
    Dense {
        gate_up: Linear,
        down: ColumnPieces,
    },
    Moe(Moe),
}

impl Ffn {
    fn linears(&self) -> Vec<&Linear> {
        match self {
            Ffn::Dense { gate_up, down } => [gate_up].into_iter().chain(&down.pieces).collect(),
            Ffn::Moe(m) => m.linears().collect(),
        }
    }
}

struct Head {
    norm: Vec<f32>,
    lm: Linear,
}

/// Weights of one slice and the code that runs them.
pub struct ModelSlice {
    pub config: ModelConfig,
    pub spec: SliceSpec,
    embed: Option<Table>,
    layers: Vec<Layer>,
    head: Option<Head>,
    inv_freq: Vec<f32>,
    n_q: usize,
    n_kv: usize,
    inter: usize,
}

impl std::fmt::Debug for ModelSlice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSlice")
            .field("spec", &self.spec)
            .finish()
    }
}

impl ModelSlice {
    /// Loads the weights `spec` covers, in the formats asked for.
    pub fn load(file: &ModelFile, spec: &SliceSpec, formats: Formats) -> Result<ModelSlice> {
        let t = crate::weights::read(file, spec, formats.quant)?;
        let mut layers = Vec::with_capacity(t.layers.len());
        let cfg = &file.config;
        let pieces = column_pieces(cfg, spec);
        let exact = crate::linear::exact_layers(cfg);
        for l in t.layers {
            let ffn = match l.ffn {
                FfnTensors::Dense { gate_up, down } => Ffn::Dense {
                    gate_up: Linear::build(gate_up, None, formats, exact)?,
                    down: ColumnPieces::new(down, pieces, formats, exact)?,
                },
                FfnTensors::Moe {
                    router,
                    first,
                    experts,
                } => Ffn::Moe(Moe::load(router, first, experts, cfg, spec, formats)?),
            };
            layers.push(Layer {
                attn_norm: l.attn_norm,
                qkv: Linear::build(l.qkv, l.qkv_bias, formats, exact)?,
                q_norm: l.q_norm,
                k_norm: l.k_norm,
                o: ColumnPieces::new(l.o, pieces, formats, exact)?,
                ffn_norm: l.ffn_norm,
                ffn,
            });
        }
        let table = |raw: RawTensor| match raw {
            RawTensor::Quant(q) => Table::Quant(q),
            RawTensor::F32 { shape, data } => Table::Dense {
                cols: shape[1],
                data,
            },
            raw @ RawTensor::QuantRows(_) => Table::Dense {
                cols: raw.shape()[1],
                data: raw.f32_data(),
            },
        };
        // The LM head runs once per sequence per step, so it keeps its
        // quantized form in every phase (dense only when the file has no other).
        let head = match t.head {
            Some(hd) => Some(Head {
                norm: hd.norm,
                lm: Linear::head(hd.lm)?,
            }),
            None => None,
        };
        Ok(ModelSlice {
            config: file.config.clone(),
            spec: spec.clone(),
            embed: t.embed.map(table),
            layers,
            head,
            inv_freq: t.inv_freq,
            n_q: t.n_q,
            n_kv: t.n_kv,
            inter: t.inter,
        })
    }

    /// The KV layout of this slice's pool.
    pub fn kv_layout(&self, block_size: usize, dtype: KvDtype) -> KvLayout {
        KvLayout {
            layers: self.layers.len(),
            kv_heads: self.n_kv,
            block_size,
            head_dim: self.config.head_dim,
            dtype,
        }
    }

    pub fn has_head(&self) -> bool {
        self.head.is_some()
    }

    /// What decode's kernels run each weight matrix in: every layer's
    /// Q/K/V, output, gate/up and down, then the LM head (see
    /// [`Linear::quant_kinds`]).
    pub fn decode_kinds(&self) -> Vec<Option<Vec<crate::quant::QKind>>> {
        self.linears().map(Linear::quant_kinds).collect()
    }

    /// Every weight matrix, in the order of [`decode_kinds`](Self::decode_kinds)
    /// (a mixture of experts' router, f32 in every phase, left out).
    fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers
            .iter()
            .flat_map(|l| {
                std::iter::once(&l.qkv)
                    .chain(&l.o.pieces)
                    .chain(l.ffn.linears())
            })
            .chain(self.head.as_ref().map(|h| &h.lm))
    }

    pub fn weight_bytes(&self) -> usize {
        self.linears().map(Linear::weight_bytes).sum::<usize>()
            + self
                .layers
                .iter()
                .map(|l| match &l.ffn {
                    Ffn::Moe(m) => m.router_bytes(),
                    Ffn::Dense { .. } => 0,
                })
                .sum::<usize>()
    }

    /// Runs the slice over a batch: each span's new tokens, in order. Writes
    /// their K/V into `pool` at the spans' blocks and attends over everything
    /// cached before them.
    pub fn forward(
        &self,
        input: SliceInput,
        seqs: &[SeqSpan],
        pool: &mut KvPool,
        comm: &dyn Collectives,
        phase: Phase,
        stop: Option<&AtomicBool>,
    ) -> Result<SliceOutput> {
        let h = self.config.hidden;
        let t: usize = seqs.iter().map(|s| s.n).sum();
        let mut x = match input {
            SliceInput::Tokens(ids) => {
                let table = self.embed.as_ref().ok_or_else(|| {
                    ModelError::InvalidSlice("token input to a slice without the embedding".into())
                })?;
                if ids.len() != t {
                    return Err(ModelError::Invalid(format!(
                        "{} tokens for spans covering {t}",
                        ids.len()
                    )));
                }
                let mut x = vec![0f32; t * h];
                for (row, id) in x.chunks_mut(h).zip(ids) {
                    let id = *id as usize;
                    if id >= self.config.vocab_size {
                        return Err(ModelError::Invalid(format!(
                            "token id {id} is outside the vocabulary of {}",
                            self.config.vocab_size
                        )));
                    }
                    match table {
                        Table::Quant(q) => q.dequantize_row(id, row),
                        Table::Dense { cols, data } => {
                            row.copy_from_slice(&data[id * cols..(id + 1) * cols])
                        }
                    }
                }
                x
            }
            SliceInput::Hidden(x) => {
                if x.len() != t * h {
                    return Err(ModelError::Invalid(format!(
                        "hidden state of {} values for {t} tokens of width {h}",
                        x.len()
                    )));
                }
                x.to_vec()
            }
        };
        if pool.on_device() {
            return Err(ModelError::Kv(
                "a CPU slice cannot compute on a pool in GPU memory".into(),
            ));
        }
        let layout = pool.layout;
        if layout.layers != self.layers.len() || layout.kv_heads != self.n_kv {
            return Err(ModelError::Kv(
                "pool layout does not match the slice".into(),
            ));
        }
        for s in seqs {
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
        }
        let positions: Vec<usize> = seqs.iter().flat_map(|s| s.pos..s.pos + s.n).collect();
        let rope = RopeTable::new(&self.inv_freq, &positions);
        for (li, layer) in self.layers.iter().enumerate() {
            if stop.is_some_and(|s| s.load(Ordering::Acquire)) {
                return Err(ModelError::Preempted);
            }
            self.layer_forward(
                layer,
                li,
                &mut x,
                t,
                seqs,
                pool,
                comm,
                phase.format(),
                &rope,
            )?;
        }
        let Some(head) = &self.head else {
            return Ok(if self.spec.last(&self.config) {
                SliceOutput::Nothing
            } else {
                SliceOutput::Hidden(x)
            });
        };
        // Logits for each sequence's last new token only.
        let mut last = Vec::with_capacity(seqs.len() * h);
        let mut end = 0;
        for s in seqs {
            end += s.n;
            last.extend_from_slice(&x[(end - 1) * h..end * h]);
        }
        rms_norm_rows(&mut last, &head.norm, self.config.rms_eps, h);
        Ok(SliceOutput::Logits(head.lm.forward(
            &last,
            seqs.len(),
            Format::Quant,
        )?))
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        l: &Layer,
        li: usize,
        x: &mut [f32],
        t: usize,
        seqs: &[SeqSpan],
        pool: &mut KvPool,
        comm: &dyn Collectives,
        fmt: Format,
        rope: &RopeTable,
    ) -> Result<()> {
        let (h, hd, eps) = (
            self.config.hidden,
            self.config.head_dim,
            self.config.rms_eps,
        );
        let (nq, nkv) = (self.n_q, self.n_kv);
        let mut xn = x.to_vec();
        rms_norm_rows(&mut xn, &l.attn_norm, eps, h);
        let qkv = l.qkv.forward(&xn, t, fmt)?;
        let w = (nq + 2 * nkv) * hd;
        let mut q = vec![0f32; t * nq * hd];
        let mut k = vec![0f32; t * nkv * hd];
        let mut v = vec![0f32; t * nkv * hd];
        for ti in 0..t {
            let row = &qkv[ti * w..(ti + 1) * w];
            q[ti * nq * hd..(ti + 1) * nq * hd].copy_from_slice(&row[..nq * hd]);
            k[ti * nkv * hd..(ti + 1) * nkv * hd].copy_from_slice(&row[nq * hd..(nq + nkv) * hd]);
            v[ti * nkv * hd..(ti + 1) * nkv * hd].copy_from_slice(&row[(nq + nkv) * hd..]);
        }
        if let Some(n) = &l.q_norm {
            rms_norm_rows(&mut q, n, eps, hd);
        }
        if let Some(n) = &l.k_norm {
            rms_norm_rows(&mut k, n, eps, hd);
        }
        rope.apply(&mut q, nq, hd, self.config.rope_neox);
        rope.apply(&mut k, nkv, hd, self.config.rope_neox);
        let bs = pool.layout.block_size;
        let mut ti = 0;
        for s in seqs {
            for i in 0..s.n {
                let (block, slot) = s.locate(s.pos + i, bs);
                for head in 0..nkv {
                    let off = (ti * nkv + head) * hd;
                    pool.write(block, li, 0, head, slot, &k[off..off + hd])?;
                    pool.write(block, li, 1, head, slot, &v[off..off + hd])?;
                }
                ti += 1;
            }
        }
        let mut attn = vec![0f32; t * nq * hd];
        paged_attention(pool, li, seqs, &q, nq, nq / nkv, &mut attn);
        let o = sum_pieces(comm, l.o.forward(&attn, t, fmt)?)?;
        for (x, o) in x.iter_mut().zip(&o) {
            *x += o;
        }
        let mut xn = x.to_vec();
        rms_norm_rows(&mut xn, &l.ffn_norm, eps, h);
        let d = match &l.ffn {
            Ffn::Dense { gate_up, down } => {
                sum_pieces(comm, swiglu_pieces(gate_up, down, &xn, t, self.inter, fmt)?)?
            }
            Ffn::Moe(m) => m.forward(&xn, t, comm, fmt)?,
        };
        for (x, d) in x.iter_mut().zip(&d) {
            *x += d;
        }
        Ok(())
    }
}

/// How many column pieces ([`ColumnPieces`]) a shard holds of each weight
/// that tensor parallelism splits by input column: the model's finest shards
/// (the least common multiple of its tensor-parallel degrees, itself one of
/// them) over this shard's `tp`.
fn column_pieces(cfg: &ModelConfig, spec: &SliceSpec) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let finest = cfg.valid_tp().into_iter().fold(1, |l, t| l / gcd(l, t) * t);
    if finest.is_multiple_of(spec.tp) {
        finest / spec.tp
    } else {
        1
    }
}

fn rms_norm_rows(x: &mut [f32], w: &[f32], eps: f32, width: usize) {
    for row in x.chunks_mut(width) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let s = 1.0 / (ms + eps).sqrt();
        for (v, w) in row.iter_mut().zip(w) {
            *v *= s * w;
        }
    }
}

/// cos/sin of every (position, frequency) pair in a batch.
struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    fn new(inv_freq: &[f32], positions: &[usize]) -> RopeTable {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for p in positions {
            for f in inv_freq {
                let a = *p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        RopeTable { half, cos, sin }
    }

    /// Rotates `x`, `[tokens, heads * hd]`, in place.
    fn apply(&self, x: &mut [f32], heads: usize, hd: usize, neox: bool) {
        for (ti, row) in x.chunks_mut(heads * hd).enumerate() {
            let c = &self.cos[ti * self.half..(ti + 1) * self.half];
            let s = &self.sin[ti * self.half..(ti + 1) * self.half];
            for head in row.chunks_mut(hd) {
                for i in 0..self.half {
                    let (a, b) = if neox {
                        (i, i + self.half)
                    } else {
                        (2 * i, 2 * i + 1)
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * c[i] - x1 * s[i];
                    head[b] = x0 * s[i] + x1 * c[i];
                }
            }
        }
    }
}
