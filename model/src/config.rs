//! The model's shape, read from GGUF metadata or a Hugging Face `config.json`.

use serde::{Deserialize, Serialize};

/// Llama-family architectures Tandem runs. They share one transformer; the
/// differences are flags on [`ModelConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    /// Qwen3 attention with mixture-of-experts FFNs.
    Qwen3Moe,
    /// Llama attention with mixture-of-experts FFNs (GGUF calls it `llama`
    /// with an expert count).
    Mixtral,
}

impl Arch {
    pub fn parse(name: &str) -> Option<Arch> {
        match name {
            "llama" => Some(Arch::Llama),
            "mistral" => Some(Arch::Mistral),
            "qwen2" => Some(Arch::Qwen2),
            "qwen3" => Some(Arch::Qwen3),
            "qwen3moe" | "qwen3_moe" => Some(Arch::Qwen3Moe),
            "mixtral" => Some(Arch::Mixtral),
            _ => None,
        }
    }

    pub const SUPPORTED: &'static str = "llama, mistral, qwen2, qwen3, qwen3moe, mixtral";
}

/// Shape and numerics of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub name: String,
    pub arch: Arch,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// RoPE rotates the two halves of a head (GPT-NeoX style) rather than
    /// adjacent pairs. GGUF llama files have Q/K permuted for adjacent pairs;
    /// Qwen GGUFs and every Hugging Face checkpoint use halves.
    pub rope_neox: bool,
    /// Q/K/V projections carry a bias (Qwen2).
    pub qkv_bias: bool,
    /// Per-head RMS norm on Q and K before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Mixture-of-experts FFNs in place of the dense MLP.
    #[serde(default)]
    pub moe: Option<MoeConfig>,
}

/// A mixture-of-experts FFN: a router scores every expert per token, the
/// `used` best run (SwiGLU FFNs of width `intermediate`), and their outputs
/// are summed weighted by the router's softmax probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoeConfig {
    pub experts: usize,
    /// Experts each token runs (top-k).
    pub used: usize,
    /// One expert's FFN width.
    pub intermediate: usize,
    /// The chosen experts' probabilities are rescaled to sum to 1 (Mixtral
    /// always; Qwen3-MoE's `norm_topk_prob`).
    pub norm_topk: bool,
}

impl ModelConfig {
    /// Query heads per KV head (GQA group size).
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// The tensor-parallel degrees this model accepts: divisors of the
    /// KV-head count that also split the MLP's width (a mixture of experts:
    /// each expert's width, or the experts themselves with EP = TP).
    pub fn valid_tp(&self) -> Vec<usize> {
        let ffn = |t: usize| match self.moe {
            Some(m) => m.intermediate.is_multiple_of(t) || m.experts.is_multiple_of(t),
            None => self.intermediate.is_multiple_of(t),
        };
        (1..=self.n_kv_heads)
            .filter(|&t| self.n_kv_heads.is_multiple_of(t) && ffn(t))
            .collect()
    }

    /// Checks an expert-parallel degree for a decode group of `tp` ranks.
    /// EP 1 keeps every expert on every rank, each rank holding `1/tp` of
    /// each expert's width as for a dense MLP; EP `tp` gives each rank
    /// `experts / tp` whole experts.
    pub fn check_ep(&self, ep: usize, tp: usize) -> Result<(), String> {
        if ep == 1 {
            return match self.moe {
                Some(m) if !m.intermediate.is_multiple_of(tp) => Err(format!(
                    "ep 1 cuts each expert's width of {} into tp = {tp} shares, which does not divide it; give each rank whole experts with ep = {tp}",
                    m.intermediate
                )),
                _ => Ok(()),
            };
        }
        let Some(m) = self.moe else {
            return Err(format!(
                "expert parallelism (ep {ep}) needs a mixture-of-experts model; {} is dense",
                self.name
            ));
        };
        if ep != tp {
            return Err(format!(
                "ep {ep} must be 1 or equal tp ({tp}): the group's ranks split the experts between them"
            ));
        }
        if !m.experts.is_multiple_of(ep) {
            return Err(format!(
                "ep {ep} does not divide the model's {} experts",
                m.experts
            ));
        }
        Ok(())
    }

    /// Bytes of KV per token for the whole model at `elem_bytes` per element.
    pub fn kv_bytes_per_token(&self, elem_bytes: usize) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.head_dim * elem_bytes
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        let pos = [
            ("block_count", self.n_layers),
            ("embedding_length", self.hidden),
            ("head_count", self.n_heads),
            ("head_count_kv", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("feed_forward_length", self.intermediate),
            ("vocab_size", self.vocab_size),
        ];
        for (name, v) in pos {
            if v == 0 {
                return Err(format!("{name} is 0"));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(format!(
                "head_count {} is not a multiple of head_count_kv {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head dimension {} is odd", self.head_dim));
        }
        if !(self.rope_theta > 0.0) || !(self.rms_eps > 0.0) {
            return Err("rope theta and RMS epsilon must be positive".into());
        }
        if let Some(m) = self.moe {
            if m.experts == 0 || m.intermediate == 0 || m.used == 0 || m.used > m.experts {
                return Err(format!(
                    "expert count {}, experts used {} and expert width {} do not make a mixture of experts",
                    m.experts, m.used, m.intermediate
                ));
            }
        }
        Ok(())
    }
}
