//! A slice's weights read from the model file and converted for the
//! device on the host (bf16 or f32), before the rank's thread uploads them.

use super::gpu::DType;
use super::slice::{MAX_GROUP, MAX_HEAD_DIM};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::kv::{KvDtype, KvLayout};
use crate::slice::SliceSpec;
use crate::source::RawTensor;
use crate::weights::FfnTensors;

/// Weight precision on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuDtype {
    /// bf16 weights and GEMM inputs, f32 accumulation and residual stream.
    #[default]
    Bf16,
    /// f32 throughout (no TF32): the path held to the CPU's results.
    F32,
}

impl GpuDtype {
    pub fn parse(s: &str) -> Option<GpuDtype> {
        match s {
            "bf16" => Some(GpuDtype::Bf16),
            "f32" => Some(GpuDtype::F32),
            _ => None,
        }
    }

    pub(crate) fn dtype(self) -> DType {
        match self {
            GpuDtype::Bf16 => DType::Bf16,
            GpuDtype::F32 => DType::F32,
        }
    }
}

/// A weight matrix converted for the device, on the host.
pub(crate) struct HostMat {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// Row-major, in the slice's weight type.
    pub(crate) bytes: Vec<u8>,
}

pub(crate) fn convert(raw: RawTensor, d: DType) -> HostMat {
    let shape = raw.shape();
    let (rows, cols) = (shape[0], shape[1..].iter().product());
    let data = raw.f32_data();
    let bytes = match d {
        DType::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::Bf16 => data
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
    };
    HostMat { rows, cols, bytes }
}

pub(crate) struct HostLayer {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) qkv: HostMat,
    pub(crate) qkv_bias: Option<Vec<f32>>,
    pub(crate) q_norm: Option<Vec<f32>>,
    pub(crate) k_norm: Option<Vec<f32>>,
    pub(crate) o: HostMat,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) gate_up: HostMat,
    pub(crate) down: HostMat,
}

/// A slice's weights read and converted on the loading thread, ready to
/// upload on the rank's own thread ([`CudaSlice::upload`]).
pub struct CudaWeights {
    pub(crate) config: ModelConfig,
    pub(crate) spec: SliceSpec,
    pub(crate) dtype: GpuDtype,
    pub(crate) layers: Vec<HostLayer>,
    pub(crate) embed: Option<HostMat>,
    /// The final norm, and the LM head unless it is the embedding held here.
    pub(crate) head: Option<(Vec<f32>, Option<HostMat>)>,
    pub(crate) inv_freq: Vec<f32>,
    pub(crate) n_q: usize,
    pub(crate) n_kv: usize,
    pub(crate) inter: usize,
}

impl CudaWeights {
    pub fn read(file: &ModelFile, spec: &SliceSpec, dtype: GpuDtype) -> Result<CudaWeights> {
        let cfg = &file.config;
        if cfg.head_dim > MAX_HEAD_DIM || !cfg.head_dim.is_multiple_of(2) {
            return Err(ModelError::Unsupported(format!(
                "head dimension {} on a GPU (at most {MAX_HEAD_DIM}, even)",
                cfg.head_dim
            )));
        }
        if cfg.group_size() > MAX_GROUP {
            return Err(ModelError::Unsupported(format!(
                "{} query heads per KV head on a GPU (at most {MAX_GROUP})",
                cfg.group_size()
            )));
        }
        if cfg.moe.is_some() {
            return Err(ModelError::Unsupported(
                "mixture-of-experts models on a GPU (they run on the CPU)".into(),
            ));
        }
        let t = crate::weights::read(file, spec, true)?;
        let d = dtype.dtype();
        let layers = t
            .layers
            .into_iter()
            .map(|l| {
                let FfnTensors::Dense { gate_up, down } = l.ffn else {
                    return Err(ModelError::Unsupported(
                        "mixture-of-experts layers on a GPU".into(),
                    ));
                };
                Ok(HostLayer {
                    attn_norm: l.attn_norm,
                    qkv: convert(l.qkv, d),
                    qkv_bias: l.qkv_bias,
                    q_norm: l.q_norm,
                    k_norm: l.k_norm,
                    o: convert(l.o, d),
                    ffn_norm: l.ffn_norm,
                    gate_up: convert(gate_up, d),
                    down: convert(down, d),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let has_embed = t.embed.is_some();
        let head = t.head.map(|h| {
            let lm = if h.tied && has_embed {
                None
            } else {
                Some(convert(h.lm, d))
            };
            (h.norm, lm)
        });
        Ok(CudaWeights {
            config: cfg.clone(),
            spec: spec.clone(),
            dtype,
            layers,
            embed: t.embed.map(|e| convert(e, d)),
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
}
