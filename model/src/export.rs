//! Writing a model as a Hugging Face directory: `config.json`, the weights
//! as bf16 safetensors in Hugging Face's names and layout, and the
//! tokenizer (`tokenizer.json`, `tokenizer_config.json` with the chat
//! template). A GGUF llama file's Q and K rows are stored permuted for
//! RoPE on adjacent pairs; they are put back in the order Hugging Face's
//! rotate-half RoPE expects. Used for reference runs of other frameworks
//! on the very weights Tandem's GPU path computes with.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, View};

use crate::error::{ModelError, Result};
use crate::file::{Naming, M, T};
use crate::ModelFile;

struct Bf16 {
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Bf16 {
    fn dtype(&self) -> Dtype {
        Dtype::BF16
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn bf16(shape: Vec<usize>, v: &[f32]) -> Bf16 {
    Bf16 {
        shape,
        data: v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
    }
}

/// GGUF's row order for RoPE on adjacent pairs back to Hugging Face's:
/// within each head, row `a * hd/2 + b` of the result is row `2b + a` of `w`.
pub fn unpermute_rows(w: &[f32], heads: usize, hd: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    let half = hd / 2;
    for h in 0..heads {
        for a in 0..2 {
            for b in 0..half {
                let dst = (h * hd + a * half + b) * cols;
                let src = (h * hd + 2 * b + a) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

fn io(dir: &Path, name: &str) -> impl Fn(std::io::Error) -> ModelError {
    let path = dir.join(name);
    move |err| ModelError::Io {
        path: path.clone(),
        err,
    }
}

/// The tokenizer files of a Hugging Face directory.
pub fn write_tokenizer(file: &ModelFile, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir, ""))?;
    let tok = &file.tokenizer;
    let name = |id: Option<u32>| id.map(|i| tok.token_text(i));
    let mut config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": file.config.context_length,
        "bos_token": name(tok.bos),
        "eos_token": name(tok.eos),
        "add_bos_token": tok.add_bos,
    });
    if let Some(t) = &file.chat_template {
        config["chat_template"] = t.source().into();
    }
    std::fs::write(dir.join("tokenizer.json"), tok.to_hf_json()?)
        .map_err(io(dir, "tokenizer.json"))?;
    let text = serde_json::to_string_pretty(&config).expect("JSON values serialise");
    std::fs::write(dir.join("tokenizer_config.json"), text)
        .map_err(io(dir, "tokenizer_config.json"))?;
    Ok(())
}

/// Writes `file` as a Hugging Face llama-family directory in `dir`.
pub fn write_hf(file: &ModelFile, dir: &Path) -> Result<()> {
    let cfg = &file.config;
    write_tokenizer(file, dir)?;
    let src = &file.source;
    let (h, hd) = (cfg.hidden, cfg.head_dim);
    let load = |t: T, l: usize, shape: &[usize]| -> Result<Vec<f32>> {
        Ok(src
            .load_shaped(&file.tensor_name(t, l), shape, false)?
            .f32_data())
    };
    let load_named = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        Ok(src.load_shaped(name, shape, false)?.f32_data())
    };
    let mut tensors: BTreeMap<String, Bf16> = BTreeMap::new();
    let put =
        |tensors: &mut BTreeMap<String, Bf16>, t: T, l: usize, shape: Vec<usize>, v: &[f32]| {
            tensors.insert(Naming::Hf.name(t, l), bf16(shape, v));
        };
    let rows = |n: usize| if cfg.rope_neox { None } else { Some(n) };
    for l in 0..cfg.n_layers {
        for (t, heads) in [(T::Q, cfg.n_heads), (T::K, cfg.n_kv_heads)] {
            let w = load(t, l, &[heads * hd, h])?;
            let w = match rows(heads) {
                Some(n) => unpermute_rows(&w, n, hd, h),
                None => w,
            };
            put(&mut tensors, t, l, vec![heads * hd, h], &w);
        }
        put(
            &mut tensors,
            T::V,
            l,
            vec![cfg.n_kv_heads * hd, h],
            &load(T::V, l, &[cfg.n_kv_heads * hd, h])?,
        );
        put(
            &mut tensors,
            T::O,
            l,
            vec![h, cfg.n_heads * hd],
            &load(T::O, l, &[h, cfg.n_heads * hd])?,
        );
        if let Some(m) = cfg.moe {
            // GGUF stacks the experts; the Hugging Face layout names each.
            let w = m.intermediate;
            let name = |t: M, e: usize| file.moe_name(t, l, e);
            let router = load_named(&name(M::Router, 0), &[m.experts, h])?;
            tensors.insert(
                Naming::Hf.moe_name(cfg.arch, M::Router, l, 0),
                bf16(vec![m.experts, h], &router),
            );
            for (t, rows, cols) in [(M::Gate, w, h), (M::Up, w, h), (M::Down, h, w)] {
                let stack = src.load_stack(&name(t, 0), [m.experts, rows, cols], false)?;
                let data = stack.f32_data();
                for e in 0..m.experts {
                    tensors.insert(
                        Naming::Hf.moe_name(cfg.arch, t, l, e),
                        bf16(
                            vec![rows, cols],
                            &data[e * rows * cols..(e + 1) * rows * cols],
                        ),
                    );
                }
            }
        } else {
            for t in [T::Gate, T::Up] {
                put(
                    &mut tensors,
                    t,
                    l,
                    vec![cfg.intermediate, h],
                    &load(t, l, &[cfg.intermediate, h])?,
                );
            }
            put(
                &mut tensors,
                T::Down,
                l,
                vec![h, cfg.intermediate],
                &load(T::Down, l, &[h, cfg.intermediate])?,
            );
        }
        for t in [T::AttnNorm, T::FfnNorm] {
            put(&mut tensors, t, l, vec![h], &load(t, l, &[h])?);
        }
        if cfg.qkv_bias {
            for (t, n) in [
                (T::QBias, cfg.n_heads),
                (T::KBias, cfg.n_kv_heads),
                (T::VBias, cfg.n_kv_heads),
            ] {
                put(&mut tensors, t, l, vec![n * hd], &load(t, l, &[n * hd])?);
            }
        }
        if cfg.qk_norm {
            for t in [T::QNorm, T::KNorm] {
                put(&mut tensors, t, l, vec![hd], &load(t, l, &[hd])?);
            }
        }
    }
    put(
        &mut tensors,
        T::Embed,
        0,
        vec![cfg.vocab_size, h],
        &load(T::Embed, 0, &[cfg.vocab_size, h])?,
    );
    put(
        &mut tensors,
        T::OutNorm,
        0,
        vec![h],
        &load(T::OutNorm, 0, &[h])?,
    );
    let tied = !src.has(&file.tensor_name(T::Output, 0));
    if !tied {
        put(
            &mut tensors,
            T::Output,
            0,
            vec![cfg.vocab_size, h],
            &load(T::Output, 0, &[cfg.vocab_size, h])?,
        );
    }
    let weights = dir.join("model.safetensors");
    safetensors::serialize_to_file(tensors.iter().map(|(k, v)| (k.as_str(), v)), None, &weights)
        .map_err(|e| ModelError::malformed(&weights, e.to_string()))?;
    let model_type = match cfg.arch {
        crate::Arch::Llama => "llama",
        crate::Arch::Mistral => "mistral",
        crate::Arch::Qwen2 => "qwen2",
        crate::Arch::Qwen3 => "qwen3",
        crate::Arch::Qwen3Moe => "qwen3_moe",
        crate::Arch::Mixtral => "mixtral",
    };
    let arch_class = match cfg.arch {
        crate::Arch::Llama => "LlamaForCausalLM",
        crate::Arch::Mistral => "MistralForCausalLM",
        crate::Arch::Qwen2 => "Qwen2ForCausalLM",
        crate::Arch::Qwen3 => "Qwen3ForCausalLM",
        crate::Arch::Qwen3Moe => "Qwen3MoeForCausalLM",
        crate::Arch::Mixtral => "MixtralForCausalLM",
    };
    let mut config = serde_json::json!({
        "architectures": [arch_class],
        "model_type": model_type,
        "hidden_size": h,
        "intermediate_size": cfg.intermediate,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "num_hidden_layers": cfg.n_layers,
        "head_dim": hd,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": tied,
        "attention_bias": cfg.qkv_bias,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "bos_token_id": file.tokenizer.bos,
        "eos_token_id": file.tokenizer.eos,
    });
    if let Some(m) = cfg.moe {
        let c = &mut config;
        c["num_experts_per_tok"] = m.used.into();
        if cfg.arch == crate::Arch::Mixtral {
            c["num_local_experts"] = m.experts.into();
            c["intermediate_size"] = m.intermediate.into();
        } else {
            c["num_experts"] = m.experts.into();
            c["moe_intermediate_size"] = m.intermediate.into();
            c["norm_topk_prob"] = m.norm_topk.into();
            c["decoder_sparse_step"] = 1.into();
            c["mlp_only_layers"] = serde_json::json!([]);
        }
    }
    let text = serde_json::to_string_pretty(&config).expect("JSON values serialise");
    std::fs::write(dir.join("config.json"), text).map_err(io(dir, "config.json"))?;
    Ok(())
}
