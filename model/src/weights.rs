//! The tensors a slice holds, read once for every backend: which rows and
//! columns of each weight belong to a layer range times a KV-head shard.
//! The CPU slice ([`crate::ModelSlice`]) and the GPU slice
//! ([`crate::cuda::CudaSlice`]) turn them into their own formats.
//!
//! A tensor-parallel shard holds the Q/K/V rows of its KV heads and their
//! query groups, the matching input columns of the attention output, and
//! `1/tp` of the MLP's intermediate dimension.

use crate::config::MoeConfig;
use crate::error::{ModelError, Result};
use crate::file::{ModelFile, Naming, M, T};
use crate::quant::QKind;
use crate::slice::SliceSpec;
use crate::source::RawTensor;

pub(crate) struct LayerTensors {
    pub attn_norm: Vec<f32>,
    /// Q, K and V rows stacked, `[(n_q + 2 n_kv) * hd, hidden]`.
    pub qkv: RawTensor,
    pub qkv_bias: Option<Vec<f32>>,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    /// `[hidden, n_q * hd]`.
    pub o: RawTensor,
    pub ffn_norm: Vec<f32>,
    pub ffn: FfnTensors,
}

pub(crate) enum FfnTensors {
    Dense {
        /// Gate and up rows stacked, `[2 * inter, hidden]`.
        gate_up: RawTensor,
        /// `[hidden, inter]`.
        down: RawTensor,
    },
    Moe {
        /// `[experts, hidden]`, f32: every rank routes with all of it.
        router: Vec<f32>,
        /// The experts this slice holds, from expert `first` on.
        first: usize,
        experts: Vec<ExpertTensors>,
    },
}

/// One expert's SwiGLU FFN (its width, or a tensor-parallel share of it).
pub(crate) struct ExpertTensors {
    /// Gate and up rows stacked, `[2 * width, hidden]`.
    pub gate_up: RawTensor,
    /// `[hidden, width]`.
    pub down: RawTensor,
}

pub(crate) struct Head {
    pub norm: Vec<f32>,
    /// `[vocab, hidden]`.
    pub lm: RawTensor,
    /// The LM head is the embedding table (the file has no output tensor).
    pub tied: bool,
}

pub(crate) struct SliceTensors {
    pub layers: Vec<LayerTensors>,
    /// `[vocab, hidden]`, on the first stage.
    pub embed: Option<RawTensor>,
    /// On the last stage's rank 0.
    pub head: Option<Head>,
    /// RoPE inverse frequencies, `[head_dim / 2]`.
    pub inv_freq: Vec<f32>,
    pub n_q: usize,
    pub n_kv: usize,
    pub inter: usize,
}

/// Reads what `spec` covers. Quantized tensors stay quantized when
/// `keep_quant`; the embedding and LM head always do (callers convert them).
pub(crate) fn read(file: &ModelFile, spec: &SliceSpec, keep_quant: bool) -> Result<SliceTensors> {
    let cfg = &file.config;
    spec.validate(cfg)?;
    let src = &file.source;
    let (h, hd) = (cfg.hidden, cfg.head_dim);
    let kvh = spec.kv_heads(cfg);
    let qh = kvh.start * cfg.group_size()..kvh.end * cfg.group_size();
    let inter = spec.intermediate(cfg);
    let name = |t: T, l: usize| file.tensor_name(t, l);
    let vec1 = |t: T, l: usize, n: usize| -> Result<Vec<f32>> {
        Ok(src.load_shaped(&name(t, l), &[n], false)?.f32_data())
    };

    let mut layers = Vec::with_capacity(spec.layers.len());
    for l in spec.layers.clone() {
        let q = src.load_shaped(&name(T::Q, l), &[cfg.n_heads * hd, h], keep_quant)?;
        let k = src.load_shaped(&name(T::K, l), &[cfg.n_kv_heads * hd, h], keep_quant)?;
        let v = src.load_shaped(&name(T::V, l), &[cfg.n_kv_heads * hd, h], keep_quant)?;
        let qkv = RawTensor::concat_rows(vec![
            q.slice_rows(qh.start * hd, qh.end * hd),
            k.slice_rows(kvh.start * hd, kvh.end * hd),
            v.slice_rows(kvh.start * hd, kvh.end * hd),
        ]);
        let qkv_bias = if cfg.qkv_bias {
            let mut b = vec1(T::QBias, l, cfg.n_heads * hd)?[qh.start * hd..qh.end * hd].to_vec();
            b.extend_from_slice(
                &vec1(T::KBias, l, cfg.n_kv_heads * hd)?[kvh.start * hd..kvh.end * hd],
            );
            b.extend_from_slice(
                &vec1(T::VBias, l, cfg.n_kv_heads * hd)?[kvh.start * hd..kvh.end * hd],
            );
            Some(b)
        } else {
            None
        };
        let o = src.load_shaped(&name(T::O, l), &[h, cfg.n_heads * hd], keep_quant)?;
        let ffn = match cfg.moe {
            None => {
                let gate =
                    src.load_shaped(&name(T::Gate, l), &[cfg.intermediate, h], keep_quant)?;
                let up = src.load_shaped(&name(T::Up, l), &[cfg.intermediate, h], keep_quant)?;
                let down =
                    src.load_shaped(&name(T::Down, l), &[h, cfg.intermediate], keep_quant)?;
                FfnTensors::Dense {
                    gate_up: RawTensor::concat_rows(vec![
                        gate.slice_rows(inter.start, inter.end),
                        up.slice_rows(inter.start, inter.end),
                    ]),
                    down: down.slice_cols(inter.start, inter.end),
                }
            }
            Some(m) => read_experts(file, spec, l, keep_quant, m)?,
        };
        let (q_norm, k_norm) = if cfg.qk_norm {
            (Some(vec1(T::QNorm, l, hd)?), Some(vec1(T::KNorm, l, hd)?))
        } else {
            (None, None)
        };
        layers.push(LayerTensors {
            attn_norm: vec1(T::AttnNorm, l, h)?,
            qkv,
            qkv_bias,
            q_norm,
            k_norm,
            o: o.slice_cols(qh.start * hd, qh.end * hd),
            ffn_norm: vec1(T::FfnNorm, l, h)?,
            ffn,
        });
    }

    let embed = if spec.first() {
        Some(src.load_shaped(&name(T::Embed, 0), &[cfg.vocab_size, h], true)?)
    } else {
        None
    };
    let head = if spec.last(cfg) && spec.tp_rank == 0 {
        let tied = !src.has(&name(T::Output, 0));
        let out_name = if tied { T::Embed } else { T::Output };
        Some(Head {
            norm: vec1(T::OutNorm, 0, h)?,
            lm: src.load_shaped(&name(out_name, 0), &[cfg.vocab_size, h], true)?,
            tied,
        })
    } else {
        None
    };
    let mut inv_freq: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / hd as f32))
        .collect();
    if src.has(&name(T::RopeFreqs, 0)) {
        let f = src
            .load_shaped(&name(T::RopeFreqs, 0), &[hd / 2], false)?
            .f32_data();
        for (v, f) in inv_freq.iter_mut().zip(f) {
            *v /= f;
        }
    }
    Ok(SliceTensors {
        layers,
        embed,
        head,
        inv_freq,
        n_q: qh.len(),
        n_kv: kvh.len(),
        inter: inter.len(),
    })
}

/// The router and the experts `spec` holds of layer `l`: all of them, each
/// cut to the shard's share of the width (EP 1), or whole experts, the
/// shard's share of them (EP = TP).
fn read_experts(
    file: &ModelFile,
    spec: &SliceSpec,
    l: usize,
    keep_quant: bool,
    m: MoeConfig,
) -> Result<FfnTensors> {
    let (cfg, src) = (&file.config, &file.source);
    let (h, w) = (cfg.hidden, m.intermediate);
    let owned = spec.experts(cfg);
    let cut = spec.expert_width(cfg);
    let router = src
        .load_shaped(&file.moe_name(M::Router, l, 0), &[m.experts, h], false)?
        .f32_data();
    let expert = |gate: RawTensor, up: RawTensor, down: RawTensor| ExpertTensors {
        gate_up: RawTensor::concat_rows(vec![
            gate.slice_rows(cut.start, cut.end),
            up.slice_rows(cut.start, cut.end),
        ]),
        down: down.slice_cols(cut.start, cut.end),
    };
    let experts = match file.naming {
        Naming::Gguf => {
            let stack = |t: M, rows: usize, cols: usize| {
                src.load_stack(&file.moe_name(t, l, 0), [m.experts, rows, cols], keep_quant)
            };
            let gate = stack(M::Gate, w, h)?;
            let up = stack(M::Up, w, h)?;
            let down = stack(M::Down, h, w)?;
            block_aligned(&down, &cut, spec, &file.moe_name(M::Down, l, 0))?;
            owned
                .clone()
                .map(|e| {
                    expert(
                        gate.slice_rows(e * w, (e + 1) * w),
                        up.slice_rows(e * w, (e + 1) * w),
                        down.slice_rows(e * h, (e + 1) * h),
                    )
                })
                .collect()
        }
        Naming::Hf => owned
            .clone()
            .map(|e| -> Result<ExpertTensors> {
                let one = |t: M, shape: &[usize]| {
                    src.load_shaped(&file.moe_name(t, l, e), shape, keep_quant)
                };
                Ok(expert(
                    one(M::Gate, &[w, h])?,
                    one(M::Up, &[w, h])?,
                    one(M::Down, &[h, w])?,
                ))
            })
            .collect::<Result<Vec<_>>>()?,
    };
    Ok(FfnTensors::Moe {
        router,
        first: owned.start,
        experts,
    })
}

/// At EP 1 each rank takes a range of every expert's down-projection
/// columns; a range that splits quantized blocks would turn every expert's
/// matrix into f32 (a dense MLP accepts that for one matrix; times the
/// expert count it is the model's size several times over), so it is
/// refused with the way out.
fn block_aligned(
    down: &RawTensor,
    cut: &std::ops::Range<usize>,
    spec: &SliceSpec,
    name: &str,
) -> Result<()> {
    let kinds: Vec<QKind> = match down {
        RawTensor::Quant(q) => vec![q.kind],
        RawTensor::QuantRows(qs) => qs.iter().map(|q| q.kind).collect(),
        RawTensor::F32 { .. } => return Ok(()),
    };
    for k in kinds {
        let b = k.block_elems();
        if !cut.start.is_multiple_of(b) || !cut.end.is_multiple_of(b) {
            return Err(ModelError::InvalidSlice(format!(
                "tp {} cuts each expert's width into {} columns, which splits the {k} blocks of {b} in {name}; every expert would be dequantized to f32. Give each rank whole experts with ep = {}",
                spec.tp,
                cut.len(),
                spec.tp
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QMat;

    #[test]
    fn expert_shards_that_split_blocks_are_refused() {
        let kind = QKind::Q8_0;
        let down = RawTensor::Quant(QMat {
            kind,
            rows: 4,
            cols: 96,
            data: vec![0; 4 * 96 / kind.block_elems() * kind.block_bytes()],
        });
        let spec = |tp| SliceSpec {
            layers: 0..1,
            tp_rank: 0,
            tp,
            ep: 1,
        };
        // 96 / 3 = 32 columns: whole blocks.
        block_aligned(&down, &(0..32), &spec(3), "d").expect("aligned");
        // 96 / 2 = 48: every expert would be dequantized.
        let err = block_aligned(&down, &(48..96), &spec(2), "d").expect_err("splits blocks");
        assert!(err.to_string().contains("ep = 2"), "{err}");
        let dense = RawTensor::F32 {
            shape: vec![4, 96],
            data: vec![0.0; 4 * 96],
        };
        block_aligned(&dense, &(48..96), &spec(2), "d").expect("f32 is cut anywhere");
    }
}
