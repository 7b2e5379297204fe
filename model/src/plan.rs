//! `tandem plan`: a PP/TP layout per role for a model on some hardware, with
//! the memory arithmetic behind it.
//!
//! Rules, from the parallelism background in `shared/seeds/`:
//! - decode tensor parallelism never exceeds the KV-head count (beyond it KV
//!   heads would be replicated) and must divide it; TP stays within a node
//!   (it all-reduces twice per layer), pipeline stages span nodes;
//! - prefill prefers pipeline parallelism: activations cross stage boundaries
//!   once per chunk, so it tolerates slower links;
//! - an instance gets the fewest GPUs whose memory holds its weights in at
//!   most half of it, leaving the rest for KV cache (a GPU nearly full of
//!   weights leaves too little KV for efficient serving), rounded up so that
//!   instances tile the cluster with no GPU left over.

use serde::Serialize;

use crate::config::ModelConfig;

/// What the planner needs of a model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelShape {
    pub name: String,
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Total parameters (all experts of a mixture-of-experts model).
    pub params: f64,
    /// KV elements per token per layer when not `2 * kv_heads * head_dim`
    /// (multi-head latent attention caches one compressed vector).
    pub kv_elems_per_layer: Option<usize>,
    /// A mixture of experts: routed experts per layer, and how many each
    /// token runs.
    pub experts: Option<(usize, usize)>,
}

impl ModelShape {
    pub fn from_config(cfg: &ModelConfig) -> ModelShape {
        let h = cfg.hidden as f64;
        let attn = h * (cfg.n_heads * cfg.head_dim) as f64 * 2.0
            + h * (cfg.n_kv_heads * cfg.head_dim) as f64 * 2.0;
        let mlp = match cfg.moe {
            Some(m) => m.experts as f64 * (3.0 * h * m.intermediate as f64 + h),
            None => 3.0 * h * cfg.intermediate as f64,
        };
        let params = cfg.n_layers as f64 * (attn + mlp + 2.0 * h) + 2.0 * cfg.vocab_size as f64 * h;
        ModelShape {
            name: cfg.name.clone(),
            layers: cfg.n_layers,
            kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            params,
            kv_elems_per_layer: None,
            experts: cfg.moe.map(|m| (m.experts, m.used)),
        }
    }

    fn kv_elems_per_token(&self) -> usize {
        self.layers
            * self
                .kv_elems_per_layer
                .unwrap_or(2 * self.kv_heads * self.head_dim)
    }
}

/// Well-known models by name (case-insensitive), with published shapes.
pub fn known_model(name: &str) -> Option<ModelShape> {
    let m = |name: &str,
             layers,
             kv_heads,
             head_dim,
             params: f64,
             mla: Option<usize>,
             experts: Option<(usize, usize)>| ModelShape {
        name: name.to_string(),
        layers,
        kv_heads,
        head_dim,
        params,
        kv_elems_per_layer: mla,
        experts,
    };
    let all = [
        m("Llama-3-8B", 32, 8, 128, 8.03e9, None, None),
        m("Llama-3-70B", 80, 8, 128, 70.6e9, None, None),
        m("Llama-3-405B", 126, 8, 128, 405.9e9, None, None),
        m("Qwen3-235B-A22B", 94, 4, 128, 235.1e9, None, Some((128, 8))),
        m("Qwen3-32B", 64, 8, 128, 32.8e9, None, None),
        m("Mixtral-8x7B", 32, 8, 128, 46.7e9, None, Some((8, 2))),
        m("Mixtral-8x22B", 56, 8, 128, 141.0e9, None, Some((8, 2))),
        // Multi-head latent attention: one 512 + 64 element latent per layer, shared by all heads.
        m(
            "DeepSeek-V3",
            61,
            1,
            576,
            671.0e9,
            Some(576),
            Some((256, 8)),
        ),
    ];
    all.into_iter().find(|s| s.name.eq_ignore_ascii_case(name))
}

pub fn known_names() -> Vec<&'static str> {
    vec![
        "Llama-3-8B",
        "Llama-3-70B",
        "Llama-3-405B",
        "Qwen3-235B-A22B",
        "Qwen3-32B",
        "Mixtral-8x7B",
        "Mixtral-8x22B",
        "DeepSeek-V3",
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Interconnect {
    Nvlink,
    Pcie,
    Ib,
}

#[derive(Debug, Clone, Serialize)]
pub struct Hardware {
    pub nodes: usize,
    pub gpus_per_node: usize,
    pub gpu_mem_gb: f64,
    pub interconnect: Interconnect,
    /// Bytes per weight (bf16 2, fp8 1, int4 0.5).
    pub weight_bytes: f64,
    /// Bytes per KV element (bf16 2, fp8 1; int4 keeps KV in fp8).
    pub kv_bytes: f64,
}

/// One role's layout and its arithmetic.
#[derive(Debug, Clone, Serialize)]
pub struct RolePlan {
    pub role: &'static str,
    pub tp: usize,
    /// Expert parallelism: each of the TP ranks holds `experts / ep` whole
    /// experts (1: every rank holds every expert, cut by width).
    pub ep: usize,
    pub pp: usize,
    pub gpus: usize,
    pub instances: usize,
    pub weights_per_gpu_gb: f64,
    pub kv_bytes_per_token: f64,
    pub kv_capacity_tokens: f64,
    pub reasoning: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub model: ModelShape,
    pub weights_gb: f64,
    pub max_decode_tp: usize,
    pub prefill: RolePlan,
    pub decode: RolePlan,
}

/// Fraction of a GPU's memory weights may take.
const WEIGHT_SHARE: f64 = 0.5;
/// Fraction of a GPU's memory usable at all (the rest: activations, runtime).
const USABLE: f64 = 0.9;

pub fn plan(model: &ModelShape, hw: &Hardware) -> Result<Plan, String> {
    if hw.nodes == 0 || hw.gpus_per_node == 0 || !(hw.gpu_mem_gb > 0.0) {
        return Err("nodes, GPUs per node and GPU memory must be positive".into());
    }
    let gb = 1e9;
    let weights = model.params * hw.weight_bytes;
    let total_gpus = hw.nodes * hw.gpus_per_node;
    let budget = hw.gpu_mem_gb * gb * WEIGHT_SHARE;
    let min_shards = (weights / budget).ceil().max(1.0) as usize;
    if min_shards > total_gpus {
        return Err(format!(
            "{:.3} GB of weights need at least {min_shards} GPUs at {:.0}% of {} GB each; the cluster has {total_gpus}",
            weights / gb,
            WEIGHT_SHARE * 100.0,
            hw.gpu_mem_gb
        ));
    }
    let kv_per_token = model.kv_elems_per_token() as f64 * hw.kv_bytes;
    let cap = (1..=model.kv_heads.min(hw.gpus_per_node))
        .filter(|t| model.kv_heads.is_multiple_of(*t))
        .max()
        .unwrap_or(1);
    let link = match hw.interconnect {
        Interconnect::Nvlink => "NVLink",
        Interconnect::Pcie => "PCIe",
        Interconnect::Ib => "InfiniBand",
    };

    // Decode: TP within a node (the smallest divisor of the KV heads that,
    // with the fewest pipeline stages, holds the weights), capped at the KV heads.
    let tps: Vec<usize> = (1..=cap)
        .filter(|t| model.kv_heads.is_multiple_of(*t))
        .collect();
    // An instance's GPU count divides the cluster, so no GPU is stranded.
    let fits =
        |gpus: usize| gpus >= min_shards && gpus <= total_gpus && total_gpus.is_multiple_of(gpus);
    let mut best: Option<(usize, usize)> = None;
    for &tp in &tps {
        for pp in min_shards.div_ceil(tp).max(1)..=model.layers {
            if fits(tp * pp) {
                if best.is_none_or(|(bt, bp)| tp * pp < bt * bp || (tp * pp == bt * bp && tp > bt))
                {
                    best = Some((tp, pp));
                }
                break;
            }
        }
    }
    let (tp, pp) = best.ok_or_else(|| {
        format!(
            "no TP <= {cap} and PP <= {} layout holds the weights on {total_gpus} GPUs",
            model.layers
        )
    })?;
    let role = |name: &'static str, tp: usize, ep: usize, pp: usize, mut reasoning: Vec<String>| {
        let gpus = tp * pp;
        let per_gpu = weights / gpus as f64;
        let kv_room = (hw.gpu_mem_gb * gb * USABLE - per_gpu).max(0.0) * gpus as f64;
        let tokens = kv_room / kv_per_token;
        reasoning.push(format!(
            "KV: {:.0} GB free across {gpus} GPUs ({:.0}% of {:.0} GB usable each, minus {:.1} GB of weights) / {:.0} bytes per token = {:.0} tokens",
            kv_room / gb,
            USABLE * 100.0,
            hw.gpu_mem_gb,
            per_gpu / gb,
            kv_per_token,
            tokens
        ));
        RolePlan {
            role: name,
            tp,
            ep,
            pp,
            gpus,
            instances: total_gpus / gpus,
            weights_per_gpu_gb: per_gpu / gb,
            kv_bytes_per_token: kv_per_token,
            kv_capacity_tokens: tokens,
            reasoning,
        }
    };
    let shards_line = format!(
        "weights: {:.3e} params x {} bytes = {:.1} GB; at most {:.0}% of {:.0} GB per GPU -> at least {min_shards} shards",
        model.params,
        hw.weight_bytes,
        weights / gb,
        WEIGHT_SHARE * 100.0,
        hw.gpu_mem_gb
    );
    let mut dr = vec![shards_line.clone()];
    dr.push(format!(
        "decode TP must divide the {} KV heads and stay within a node of {} GPUs: TP <= {cap}{}",
        model.kv_heads,
        hw.gpus_per_node,
        if model.kv_elems_per_layer.is_some() {
            " (latent attention caches one vector shared by all heads)"
        } else {
            ""
        }
    ));
    dr.push(format!("TP = {tp} within a node over {link}; PP = {pp} stage(s) hold the rest: {tp} x {pp} = {} GPUs per instance", tp * pp));
    if hw.interconnect == Interconnect::Pcie && tp > 2 {
        dr.push("on PCIe, TP above 2 spends ~25% of a step in all-reduce: benchmark TP = 2 with more PP".into());
    }
    // Experts: whole experts per rank where TP divides them (EP = TP). The
    // memory per GPU is the same either way; what changes is the traffic.
    let ep = match model.experts {
        Some((e, k)) if tp > 1 && e.is_multiple_of(tp) => {
            dr.push(format!(
                "experts: EP = TP = {tp}: each rank holds {} of the {e} experts whole (1/{tp} of the expert weights, as TP would cut them); per layer a token's hidden state goes to the ranks of its {k} experts and back (two all-to-alls of at most {k} x hidden values per token) and an all-gather replaces the FFN's all-reduce",
                e / tp
            ));
            tp
        }
        Some((e, _)) if tp > 1 => {
            dr.push(format!(
                "experts: TP = {tp} does not divide the {e} experts: EP = 1, each rank holds 1/{tp} of every expert's width"
            ));
            1
        }
        Some((e, k)) => {
            dr.push(format!(
                "experts: one rank holds all {e} experts ({k} per token): EP = 1"
            ));
            1
        }
        None => 1,
    };
    if model.experts.is_some() {
        dr.push("Tandem runs mixture-of-experts models on the CPU only today: this layout is arithmetic, not something `serve --device cuda` accepts".into());
    }
    let decode = role("decode", tp, ep, pp, dr);

    // Prefill: pipeline stages first (one activation hand-off per chunk), TP only when layers run out.
    let ppp = (min_shards..=model.layers.min(total_gpus))
        .find(|g| fits(*g))
        .unwrap_or(min_shards.min(model.layers));
    let ptp = min_shards.div_ceil(ppp);
    let pr = vec![
        shards_line,
        format!("prefill prefers pipeline stages (activations cross a boundary once per chunk; chunked prompts keep every stage busy): PP = {ppp}, TP = {ptp}"),
    ];
    let prefill = role("prefill", ptp, 1, ppp, pr);
    Ok(Plan {
        model: model.clone(),
        weights_gb: weights / gb,
        max_decode_tp: cap,
        prefill,
        decode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hw(nodes: usize, gpus: usize, mem: f64) -> Hardware {
        Hardware {
            nodes,
            gpus_per_node: gpus,
            gpu_mem_gb: mem,
            interconnect: Interconnect::Nvlink,
            weight_bytes: 2.0,
            kv_bytes: 2.0,
        }
    }

    #[test]
    fn qwen3_235b_on_two_nodes_of_eight_h100() {
        let p = plan(
            &known_model("qwen3-235b-a22b").expect("known"),
            &hw(2, 8, 80.0),
        )
        .expect("fits");
        assert!((p.weights_gb - 470.0).abs() < 2.0, "{}", p.weights_gb);
        assert_eq!(p.max_decode_tp, 4, "capped at the 4 KV heads");
        assert_eq!(
            (p.decode.tp, p.decode.pp, p.decode.gpus),
            (4, 4, 16),
            "TP 4 x PP 4: 16 shards"
        );
        assert!((p.decode.weights_per_gpu_gb - 29.4).abs() < 0.5);
        assert!(p.decode.tp <= 4);
        // 128 experts: each of the 4 ranks holds 32 whole.
        assert_eq!(p.decode.ep, 4);
        assert!(
            p.decode
                .reasoning
                .iter()
                .any(|r| r.contains("holds 32 of the 128 experts")),
            "{:?}",
            p.decode.reasoning
        );
    }

    #[test]
    fn llama3_70b_on_four_a100() {
        let p = plan(&known_model("Llama-3-70B").expect("known"), &hw(1, 4, 80.0)).expect("fits");
        assert_eq!((p.decode.tp, p.decode.pp), (4, 1));
        assert_eq!((p.prefill.tp, p.prefill.pp), (1, 4));
        assert_eq!(p.decode.ep, 1, "a dense model");
        for r in [&p.decode, &p.prefill] {
            assert!(
                (r.weights_per_gpu_gb - 35.3).abs() < 0.5,
                "{}",
                r.weights_per_gpu_gb
            );
        }
        // 80 layers x 8 heads x 128 x 2 (K, V) x 2 bytes
        assert_eq!(p.decode.kv_bytes_per_token, 327_680.0);
    }

    #[test]
    fn too_little_memory_is_explained() {
        let e = plan(
            &known_model("Llama-3-405B").expect("known"),
            &hw(1, 8, 24.0),
        )
        .expect_err("does not fit");
        assert!(
            e.contains("need at least") && e.contains("cluster has 8"),
            "{e}"
        );
    }
}
