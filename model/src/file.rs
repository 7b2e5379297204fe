//! Opening a model: GGUF or the Hugging Face layout (`config.json`,
//! `*.safetensors`, `tokenizer.json`). [`ModelFile`] holds the configuration,
//! tokenizer and chat template, and builds any [`crate::ModelSlice`] on demand.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;

use crate::chat::ChatTemplate;
use crate::config::{Arch, ModelConfig, MoeConfig};
use crate::defaults::GenerationDefaults;
use crate::error::{ModelError, Result};
use crate::source::TensorSource;
use crate::tokenizer::Tokenizer;

/// How one tensor of the file is stored and computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorFormat {
    pub name: String,
    /// The file's type for it (a GGUF type, or a safetensors dtype).
    pub stored: String,
    pub shape: Vec<usize>,
    /// The quantized format it is stored in, when decode keeps it.
    pub quant: Option<crate::quant::QKind>,
    /// What decode's matrix products run on.
    pub decode: String,
    /// What prefill's run on.
    pub prefill: String,
}

/// How tensors are named in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Naming {
    Gguf,
    Hf,
}

/// Tensors of a Llama-family model, by role.
#[derive(Debug, Clone, Copy)]
pub(crate) enum T {
    Embed,
    OutNorm,
    Output,
    RopeFreqs,
    AttnNorm,
    Q,
    K,
    V,
    QBias,
    KBias,
    VBias,
    QNorm,
    KNorm,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

/// Tensors of a mixture-of-experts FFN.
#[derive(Debug, Clone, Copy)]
pub(crate) enum M {
    /// The router, `[experts, hidden]`.
    Router,
    Gate,
    Up,
    Down,
}

impl Naming {
    /// A mixture-of-experts tensor of `layer`. GGUF stacks every expert's
    /// matrix in one 3-D tensor (`expert` is ignored); the Hugging Face
    /// layout names each expert's, as the architecture does.
    pub fn moe_name(self, arch: Arch, m: M, layer: usize, expert: usize) -> String {
        match self {
            Naming::Gguf => format!(
                "blk.{layer}.{}.weight",
                match m {
                    M::Router => "ffn_gate_inp",
                    M::Gate => "ffn_gate_exps",
                    M::Up => "ffn_up_exps",
                    M::Down => "ffn_down_exps",
                }
            ),
            Naming::Hf => {
                let (block, router, [gate, up, down]) = match arch {
                    Arch::Mixtral => ("block_sparse_moe", "gate", ["w1", "w3", "w2"]),
                    _ => ("mlp", "gate", ["gate_proj", "up_proj", "down_proj"]),
                };
                let p = format!("model.layers.{layer}.{block}");
                match m {
                    M::Router => format!("{p}.{router}.weight"),
                    M::Gate => format!("{p}.experts.{expert}.{gate}.weight"),
                    M::Up => format!("{p}.experts.{expert}.{up}.weight"),
                    M::Down => format!("{p}.experts.{expert}.{down}.weight"),
                }
            }
        }
    }

    pub fn name(self, t: T, layer: usize) -> String {
        match self {
            Naming::Gguf => {
                let l = |s: &str| format!("blk.{layer}.{s}");
                match t {
                    T::Embed => "token_embd.weight".into(),
                    T::OutNorm => "output_norm.weight".into(),
                    T::Output => "output.weight".into(),
                    T::RopeFreqs => "rope_freqs.weight".into(),
                    T::AttnNorm => l("attn_norm.weight"),
                    T::Q => l("attn_q.weight"),
                    T::K => l("attn_k.weight"),
                    T::V => l("attn_v.weight"),
                    T::QBias => l("attn_q.bias"),
                    T::KBias => l("attn_k.bias"),
                    T::VBias => l("attn_v.bias"),
                    T::QNorm => l("attn_q_norm.weight"),
                    T::KNorm => l("attn_k_norm.weight"),
                    T::O => l("attn_output.weight"),
                    T::FfnNorm => l("ffn_norm.weight"),
                    T::Gate => l("ffn_gate.weight"),
                    T::Up => l("ffn_up.weight"),
                    T::Down => l("ffn_down.weight"),
                }
            }
            Naming::Hf => {
                let l = |s: &str| format!("model.layers.{layer}.{s}");
                match t {
                    T::Embed => "model.embed_tokens.weight".into(),
                    T::OutNorm => "model.norm.weight".into(),
                    T::Output => "lm_head.weight".into(),
                    T::RopeFreqs => "rope_freqs.weight".into(),
                    T::AttnNorm => l("input_layernorm.weight"),
                    T::Q => l("self_attn.q_proj.weight"),
                    T::K => l("self_attn.k_proj.weight"),
                    T::V => l("self_attn.v_proj.weight"),
                    T::QBias => l("self_attn.q_proj.bias"),
                    T::KBias => l("self_attn.k_proj.bias"),
                    T::VBias => l("self_attn.v_proj.bias"),
                    T::QNorm => l("self_attn.q_norm.weight"),
                    T::KNorm => l("self_attn.k_norm.weight"),
                    T::O => l("self_attn.o_proj.weight"),
                    T::FfnNorm => l("post_attention_layernorm.weight"),
                    T::Gate => l("mlp.gate_proj.weight"),
                    T::Up => l("mlp.up_proj.weight"),
                    T::Down => l("mlp.down_proj.weight"),
                }
            }
        }
    }
}

/// An opened model: shape, tokenizer, chat template and the tensors on disk.
pub struct ModelFile {
    pub path: PathBuf,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// The sampling defaults the model ships with.
    pub generation: GenerationDefaults,
    pub(crate) source: TensorSource,
    pub(crate) naming: Naming,
}

impl std::fmt::Debug for ModelFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFile")
            .field("path", &self.path)
            .field("config", &self.config)
            .finish()
    }
}

impl ModelFile {
    /// How each tensor is stored and which format each phase computes it in,
    /// for a whole-model slice (tensor-parallel shards whose columns split a
    /// block are dequantized instead).
    pub fn tensor_formats(&self) -> Vec<TensorFormat> {
        // The LM head: the output tensor, or the embedding table when the
        // file ties them.
        let output = self.naming.name(T::Output, 0);
        let head = if self.source.has(&output) {
            output
        } else {
            self.naming.name(T::Embed, 0)
        };
        self.source
            .tensors()
            .into_iter()
            .map(|(name, stored, shape, kind)| {
                // Matrices, and the 3-D stacks of a mixture of experts.
                let matrix = matches!(shape.len(), 2 | 3);
                let decode = match (kind, matrix) {
                    (Some(k), true) => {
                        // Every LM head has layout-exact inputs (see
                        // `int8_decode`), and a dense model's layers.
                        let exact = name == head || crate::linear::exact_layers(&self.config);
                        let acts =
                            if crate::linear::int8_decode(k, exact) && crate::qlanes::available() {
                                "8-bit"
                            } else {
                                "f32"
                            };
                        match k {
                            crate::quant::QKind::Q4_0 => {
                                format!("Q4_0 (as Q4_1), {acts} activations")
                            }
                            k => format!("{k}, {acts} activations"),
                        }
                    }
                    _ => "f32".to_string(),
                };
                // The LM head keeps its quantized form in both phases.
                let prefill = if name == head || kind.is_none() || !matrix {
                    decode.clone()
                } else {
                    "f32 (dequantized on load)".to_string()
                };
                TensorFormat {
                    name,
                    stored,
                    quant: kind.filter(|_| matrix),
                    shape,
                    decode,
                    prefill,
                }
            })
            .collect()
    }

    /// Opens a `.gguf` file or a Hugging Face model directory.
    pub fn open(path: &Path) -> Result<ModelFile> {
        let meta = std::fs::metadata(path).map_err(|err| ModelError::Io {
            path: path.to_path_buf(),
            err,
        })?;
        if meta.is_dir() {
            return Self::open_hf(path);
        }
        let mut magic = [0u8; 4];
        {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(|err| ModelError::Io {
                path: path.to_path_buf(),
                err,
            })?;
            f.read_exact(&mut magic)
                .map_err(|_| ModelError::malformed(path, "file is shorter than a GGUF header"))?;
        }
        if &magic != b"GGUF" {
            return Err(ModelError::malformed(
                path,
                "not a GGUF file (no GGUF magic); pass a .gguf file or a directory with config.json and safetensors",
            ));
        }
        Self::open_gguf(path)
    }

    fn open_gguf(path: &Path) -> Result<ModelFile> {
        let (source, md) = TensorSource::open_gguf(path)?;
        let bad = |r: String| ModelError::malformed(path, r);
        let arch_name = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| bad("metadata general.architecture is missing".into()))?
            .clone();
        let arch = Arch::parse(&arch_name).ok_or_else(|| {
            ModelError::Unsupported(format!(
                "architecture '{arch_name}' in {} (supported: {})",
                path.display(),
                Arch::SUPPORTED
            ))
        })?;
        let get = |k: &str| md.get(&format!("{arch_name}.{k}"));
        // Mixtral is `llama` with experts in GGUF.
        let experts = get("expert_count").and_then(value_usize).unwrap_or(0);
        let arch = match arch {
            Arch::Llama | Arch::Mistral if experts > 0 => Arch::Mixtral,
            a => a,
        };
        let req_u = |k: &str| -> Result<usize> {
            get(k).and_then(value_usize).ok_or_else(|| {
                bad(format!(
                    "metadata {arch_name}.{k} is missing or not an integer"
                ))
            })
        };
        let n_heads = req_u("attention.head_count")?;
        let hidden = req_u("embedding_length")?;
        let moe = match arch {
            Arch::Qwen3Moe | Arch::Mixtral => {
                let ffn = if arch == Arch::Qwen3Moe {
                    "expert_feed_forward_length"
                } else {
                    "feed_forward_length"
                };
                Some(MoeConfig {
                    experts,
                    used: req_u("expert_used_count")?,
                    intermediate: req_u(ffn)?,
                    // llama.cpp renormalises the chosen experts' weights
                    // for both (Qwen3-MoE checkpoints set norm_topk_prob).
                    norm_topk: get("expert_weights_norm")
                        .and_then(|v| v.to_bool().ok())
                        .unwrap_or(true),
                })
            }
            _ => None,
        };
        let tokenizer = Tokenizer::from_gguf(path, &md)?;
        let vocab_size = get("vocab_size")
            .and_then(value_usize)
            .unwrap_or(tokenizer.vocab_size());
        let config = ModelConfig {
            name: md
                .get("general.name")
                .and_then(|v| v.to_string().ok())
                .cloned()
                .unwrap_or_else(|| {
                    path.file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default()
                }),
            arch,
            n_layers: req_u("block_count")?,
            hidden,
            n_heads,
            n_kv_heads: get("attention.head_count_kv")
                .and_then(value_usize)
                .unwrap_or(n_heads),
            head_dim: get("attention.key_length")
                .and_then(value_usize)
                .unwrap_or(hidden.checked_div(n_heads).unwrap_or(0)),
            intermediate: match moe {
                Some(m) => get("feed_forward_length")
                    .and_then(value_usize)
                    .unwrap_or(m.intermediate),
                None => req_u("feed_forward_length")?,
            },
            vocab_size,
            context_length: get("context_length").and_then(value_usize).unwrap_or(4096),
            rope_theta: get("rope.freq_base")
                .and_then(|v| v.to_f32().ok())
                .unwrap_or(10_000.0),
            rms_eps: get("attention.layer_norm_rms_epsilon")
                .and_then(|v| v.to_f32().ok())
                .unwrap_or(1e-5),
            rope_neox: matches!(arch, Arch::Qwen2 | Arch::Qwen3 | Arch::Qwen3Moe),
            qkv_bias: source.has(&Naming::Gguf.name(T::QBias, 0)),
            qk_norm: source.has(&Naming::Gguf.name(T::QNorm, 0)),
            moe,
        };
        config.validate().map_err(bad)?;
        let chat_template = md
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .map(|t| ChatTemplate::new(t, &tokenizer))
            .transpose()?;
        Ok(ModelFile {
            path: path.to_path_buf(),
            config,
            tokenizer,
            chat_template,
            generation: GenerationDefaults::from_gguf(&md),
            source,
            naming: Naming::Gguf,
        })
    }

    fn open_hf(dir: &Path) -> Result<ModelFile> {
        let read = |name: &str| -> Result<String> {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|err| ModelError::Io { path: p, err })
        };
        let cfg: serde_json::Value = serde_json::from_str(&read("config.json")?)
            .map_err(|e| ModelError::malformed(&dir.join("config.json"), e.to_string()))?;
        let bad = |r: String| ModelError::malformed(&dir.join("config.json"), r);
        let model_type = cfg["model_type"].as_str().unwrap_or("llama");
        let arch = Arch::parse(model_type).ok_or_else(|| {
            ModelError::Unsupported(format!(
                "model_type '{model_type}' (supported: {})",
                Arch::SUPPORTED
            ))
        })?;
        let u = |k: &str| cfg[k].as_u64().map(|v| v as usize);
        let req = |k: &str| u(k).ok_or_else(|| bad(format!("{k} is missing")));
        let moe = match arch {
            Arch::Mixtral => Some(MoeConfig {
                experts: req("num_local_experts")?,
                used: req("num_experts_per_tok")?,
                intermediate: req("intermediate_size")?,
                norm_topk: true,
            }),
            Arch::Qwen3Moe => Some(MoeConfig {
                experts: req("num_experts")?,
                used: req("num_experts_per_tok")?,
                intermediate: req("moe_intermediate_size")?,
                norm_topk: cfg["norm_topk_prob"].as_bool().unwrap_or(false),
            }),
            _ => None,
        };
        if arch == Arch::Qwen3Moe
            && (u("decoder_sparse_step").is_some_and(|s| s != 1)
                || cfg["mlp_only_layers"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty()))
        {
            return Err(ModelError::Unsupported(
                "Qwen3-MoE with dense layers between sparse ones (decoder_sparse_step, mlp_only_layers)".into(),
            ));
        }
        let n_heads = req("num_attention_heads")?;
        let hidden = req("hidden_size")?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|err| ModelError::Io {
                path: dir.to_path_buf(),
                err,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ModelError::malformed(dir, "no .safetensors files"));
        }
        let source = TensorSource::open_safetensors(dir, &files)?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_hf_file(&tok_path, dir)?;
        let config = ModelConfig {
            name: dir
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            arch,
            n_layers: req("num_hidden_layers")?,
            hidden,
            n_heads,
            n_kv_heads: u("num_key_value_heads").unwrap_or(n_heads),
            head_dim: u("head_dim").unwrap_or(hidden.checked_div(n_heads).unwrap_or(0)),
            intermediate: req("intermediate_size")?,
            vocab_size: req("vocab_size")?,
            context_length: u("max_position_embeddings").unwrap_or(4096),
            rope_theta: cfg["rope_theta"].as_f64().unwrap_or(10_000.0) as f32,
            rms_eps: cfg["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32,
            rope_neox: true,
            qkv_bias: source.has(&Naming::Hf.name(T::QBias, 0)),
            qk_norm: source.has(&Naming::Hf.name(T::QNorm, 0)),
            moe,
        };
        config.validate().map_err(bad)?;
        let chat_template = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["chat_template"].as_str().map(str::to_owned))
            .map(|t| ChatTemplate::new(&t, &tokenizer))
            .transpose()?;
        Ok(ModelFile {
            path: dir.to_path_buf(),
            config,
            tokenizer,
            chat_template,
            generation: GenerationDefaults::from_hf_dir(dir)?,
            source,
            naming: Naming::Hf,
        })
    }

    pub(crate) fn tensor_name(&self, t: T, layer: usize) -> String {
        self.naming.name(t, layer)
    }

    pub(crate) fn moe_name(&self, m: M, layer: usize, expert: usize) -> String {
        self.naming.moe_name(self.config.arch, m, layer, expert)
    }
}

fn value_usize(v: &Value) -> Option<usize> {
    match v {
        Value::U8(x) => Some(*x as usize),
        Value::I8(x) => usize::try_from(*x).ok(),
        Value::U16(x) => Some(*x as usize),
        Value::I16(x) => usize::try_from(*x).ok(),
        Value::U32(x) => Some(*x as usize),
        Value::I32(x) => usize::try_from(*x).ok(),
        Value::U64(x) => usize::try_from(*x).ok(),
        Value::I64(x) => usize::try_from(*x).ok(),
        _ => None,
    }
}

pub(crate) fn metadata_strings(md: &HashMap<String, Value>, key: &str) -> Option<Vec<String>> {
    let arr = md.get(key)?.to_vec().ok()?;
    arr.iter().map(|v| v.to_string().ok().cloned()).collect()
}

pub(crate) fn metadata_ints(md: &HashMap<String, Value>, key: &str) -> Option<Vec<i64>> {
    let arr = md.get(key)?.to_vec().ok()?;
    arr.iter()
        .map(|v| match v {
            Value::I32(x) => Some(*x as i64),
            Value::U32(x) => Some(*x as i64),
            Value::I64(x) => Some(*x),
            Value::U8(x) => Some(*x as i64),
            Value::I8(x) => Some(*x as i64),
            _ => None,
        })
        .collect()
}

pub(crate) fn metadata_u32(md: &HashMap<String, Value>, key: &str) -> Option<u32> {
    md.get(key).and_then(value_usize).map(|v| v as u32)
}

#[cfg(test)]
mod moe_name_tests {
    use super::*;

    /// The names the published checkpoints use (an export read back would
    /// not notice two of them swapped).
    #[test]
    fn expert_tensors_have_the_checkpoints_names() {
        let hf = |arch, m, e| Naming::Hf.moe_name(arch, m, 3, e);
        let mixtral = "model.layers.3.block_sparse_moe";
        assert_eq!(
            hf(Arch::Mixtral, M::Router, 0),
            format!("{mixtral}.gate.weight")
        );
        assert_eq!(
            hf(Arch::Mixtral, M::Gate, 5),
            format!("{mixtral}.experts.5.w1.weight")
        );
        assert_eq!(
            hf(Arch::Mixtral, M::Up, 5),
            format!("{mixtral}.experts.5.w3.weight")
        );
        assert_eq!(
            hf(Arch::Mixtral, M::Down, 5),
            format!("{mixtral}.experts.5.w2.weight")
        );
        let qwen = "model.layers.3.mlp";
        assert_eq!(
            hf(Arch::Qwen3Moe, M::Router, 0),
            format!("{qwen}.gate.weight")
        );
        assert_eq!(
            hf(Arch::Qwen3Moe, M::Gate, 7),
            format!("{qwen}.experts.7.gate_proj.weight")
        );
        assert_eq!(
            hf(Arch::Qwen3Moe, M::Up, 7),
            format!("{qwen}.experts.7.up_proj.weight")
        );
        assert_eq!(
            hf(Arch::Qwen3Moe, M::Down, 7),
            format!("{qwen}.experts.7.down_proj.weight")
        );
        let gguf = |m| Naming::Gguf.moe_name(Arch::Qwen3Moe, m, 3, 9);
        assert_eq!(gguf(M::Router), "blk.3.ffn_gate_inp.weight");
        assert_eq!(gguf(M::Gate), "blk.3.ffn_gate_exps.weight");
        assert_eq!(gguf(M::Up), "blk.3.ffn_up_exps.weight");
        assert_eq!(gguf(M::Down), "blk.3.ffn_down_exps.weight");
    }
}
