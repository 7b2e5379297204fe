//! Mixture-of-experts models (Qwen3-MoE, Mixtral) against llama.cpp on the
//! same files, and across (PP, TP, EP) layouts. The files are tiny
//! random-weight models with the default model's tokenizer, made by
//! `bench/tiny_moe.py files` (CI runs it); llama.cpp's greedy answers and
//! top log-probabilities on each are recorded in `data/moe-llamacpp.json`
//! (`bench/tiny_moe.py record`).

mod common;

use std::path::PathBuf;

use tandem_model::quant::QKind;
use tandem_model::{
    Arch, Engine, EngineOptions, Formats, ModelFile, ModelSlice, Sequence, SliceSpec,
};

fn record() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/moe-llamacpp.json");
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    serde_json::from_str(&s).expect("the record parses")
}

/// Opens a recorded file after checking it is the one llama.cpp answered on.
fn open(entry: &serde_json::Value) -> ModelFile {
    common::open_recorded(
        &common::moe_file(entry["file"].as_str().expect("file name")),
        entry["sha256"].as_str().expect("sha256"),
        "bench/tiny_moe.py files",
    )
}

fn entry(name: &str) -> serde_json::Value {
    record()["files"][name].clone()
}

fn log_softmax(l: &[f32]) -> Vec<f64> {
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = l.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    l.iter().map(|&v| v as f64 - z).collect()
}

/// Per position of llama.cpp's greedy answers (replayed through prefill and
/// decode steps): the widest difference between this engine's
/// log-probability of one of llama.cpp's top tokens and llama.cpp's own,
/// and whether llama.cpp's token is within 0.5 logits of this engine's best.
fn replay(file: &ModelFile, greedy: &serde_json::Value, opts: &EngineOptions) -> Vec<(f64, bool)> {
    let mut engine = Engine::new(file, opts).expect("engine");
    let mut out = Vec::new();
    for case in greedy.as_array().expect("cases") {
        let mut seq = Sequence {
            tokens: common::ids(&case["prompt_ids"]),
            ..Default::default()
        };
        let want = common::ids(&case["greedy_ids"]);
        let tops = case["top"].as_array().expect("top tokens per position");
        let mut logits = engine.prefill(&mut seq, 512).expect("prefill");
        for (i, (&y, top)) in want.iter().zip(tops).enumerate() {
            let lp = log_softmax(&logits);
            let mut widest = 0f64;
            for t in top.as_array().expect("top list") {
                let id = t["id"].as_u64().expect("id") as usize;
                let theirs = t["logprob"].as_f64().expect("logprob");
                // Far-down tokens carry llama.cpp's rounding of tiny
                // probabilities; compare those that matter.
                if theirs > -10.0 {
                    widest = widest.max((lp[id] - theirs).abs());
                }
            }
            let best = lp.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            out.push((widest, best - lp[y as usize] < 0.5));
            if i + 1 < want.len() {
                seq.tokens.push(y);
                logits = engine.decode(&mut [&mut seq]).expect("decode");
            }
        }
        engine.release(&mut seq);
    }
    out
}

/// Checks a replay: llama.cpp's token is within 0.5 logits of this
/// engine's best at 95% of positions and, given `median_tol`, the top
/// log-probabilities agree within it at the median position and within 0.5
/// at 95% of positions.
///
/// Not every position: a router whose second and third experts nearly tie
/// picks either under rounding (llama.cpp rounds activations to f16 for
/// f16 weights and its KV cache, to 8 bits for Q8_0 weights), and the
/// output jumps. A wrong routing, normalisation or expert layout moves
/// every position by whole logits.
fn agrees(file: &ModelFile, greedy: &serde_json::Value, median_tol: Option<f64>, label: &str) {
    // llama-server keeps its KV cache in f16.
    let opts = EngineOptions {
        kv_blocks: 64,
        kv_dtype: tandem_model::KvDtype::F16,
        ..Default::default()
    };
    let r = replay(file, greedy, &opts);
    let mut gaps: Vec<f64> = r.iter().map(|p| p.0).collect();
    gaps.sort_by(f64::total_cmp);
    let n = gaps.len();
    let median = gaps[n / 2];
    let close = gaps.iter().filter(|&&g| g < 0.5).count();
    let near = r.iter().filter(|p| p.1).count();
    eprintln!(
        "{label}: top log-probabilities differ from llama.cpp's by {median:.4} at the median position, {:.4} at the 95th percentile, {:.4} at most; llama.cpp's token within 0.5 of the best at {near} of {n}",
        gaps[n * 95 / 100],
        gaps[n - 1]
    );
    if let Some(tol) = median_tol {
        assert!(median < tol, "{label}: median difference {median}");
        assert!(
            close * 100 >= n * 95,
            "{label}: only {close} of {n} positions within 0.5"
        );
    }
    assert!(
        near * 100 >= n * 95,
        "{label}: llama.cpp's token near the best at only {near} of {n}"
    );
}

/// The f32 files: llama.cpp computes them in f32 too (f16 for the
/// embedding, LM head and KV cache), so log-probabilities agree closely.
#[test]
fn moe_files_compute_what_llama_cpp_does() {
    for (name, arch) in [("qwen3moe", Arch::Qwen3Moe), ("mixtral", Arch::Mixtral)] {
        let e = entry(name);
        let file = open(&e);
        assert_eq!(file.config.arch, arch, "{name}");
        let moe = file.config.moe.expect("a mixture of experts");
        assert!(moe.used < moe.experts, "{name}: {moe:?}");
        agrees(&file, &e["greedy"], Some(0.05), name);
    }
}

/// The Q8_0 files: decode runs the experts quantized as stored (the router
/// stays f32, as llama-quantize leaves it) and computes what the dense path
/// does on the same weights; llama.cpp's greedy tokens stay near the best.
///
/// Not the log-probabilities: these random-weight models amplify a 0.4%
/// perturbation to whole logits (llama.cpp's own answers on the f32 and
/// Q8_0 files part by 0.5–8 at the first token), and llama.cpp rounds
/// activations to 8 bits for Q8_0 weights where Tandem keeps them f32.
#[test]
fn quantized_experts_decode_as_stored() {
    for name in ["qwen3moe-Q8_0", "mixtral-Q8_0"] {
        let e = entry(name);
        let file = open(&e);
        let slice = ModelSlice::load(&file, &SliceSpec::full(&file.config), Formats::DECODE)
            .expect("loads");
        let kinds = slice.decode_kinds();
        // Q/K/V, the attention output in column pieces (one per rank of
        // the finest tensor-parallel layout), and each expert's two.
        let pieces = file.config.valid_tp().into_iter().max().expect("a TP");
        let per_layer = 1 + pieces + 2 * file.config.moe.expect("moe").experts;
        assert_eq!(kinds.len(), file.config.n_layers * per_layer + 1, "{name}");
        for (i, k) in kinds.iter().enumerate() {
            assert_eq!(
                k.as_deref(),
                Some(&[QKind::Q8_0][..]),
                "{name}: weight {i} does not run as Q8_0"
            );
        }
        agrees(&file, &e["greedy"], None, name);
        // A decode step on the quantized experts against a prefill pass on
        // the same weights dequantized: f32 both, rounding apart.
        let mut engine = Engine::new(
            &file,
            &EngineOptions {
                kv_blocks: 64,
                ..Default::default()
            },
        )
        .expect("engine");
        for p in common::PROMPTS {
            let ids = common::prompt_ids(&file, p);
            let (pre, dec) = common::logits(&mut engine, &ids);
            let mut longer = ids.clone();
            longer.push(tandem_model::sampling::argmax(&pre));
            let mut seq = Sequence {
                tokens: longer,
                ..Default::default()
            };
            let dense = engine.prefill(&mut seq, 512).expect("prefill");
            engine.release(&mut seq);
            let d = common::rel_diff(&dense, &dec);
            assert!(
                d < 1e-3,
                "{name} {p:?}: quantized decode differs from dense by {d}"
            );
        }
    }
}

/// Every layout, experts cut by width (EP 1) or split between ranks
/// (EP = TP), computes what the whole model does.
#[test]
fn moe_layouts_compute_the_whole_model() {
    let file = open(&entry("qwen3moe"));
    common::layouts_equal_full(&file, &[(2, 1, 1), (1, 3, 1), (1, 3, 3), (2, 3, 3)]);
    let file = open(&entry("mixtral-Q8_0"));
    common::layouts_equal_full(&file, &[(1, 3, 3), (2, 3, 1)]);
}

#[test]
fn expert_parallelism_is_checked() {
    let file = open(&entry("qwen3moe"));
    let moe = file.config.moe.expect("moe");
    let opts = |tp, ep| EngineOptions {
        tp,
        ep,
        kv_blocks: 8,
        ..Default::default()
    };
    // EP must be 1 or TP, and divide the experts.
    let Err(err) = Engine::new(&file, &opts(1, 3)) else {
        panic!("ep 3 with tp 1 was accepted");
    };
    assert!(err.to_string().contains("must be 1 or equal tp"), "{err}");
    assert!(moe.experts.is_multiple_of(3));
    Engine::new(&file, &opts(3, 3)).expect("ep 3 with tp 3");
    // EP 3 gives each rank a third of the experts, EP 1 every expert (the
    // layout test alone would pass with EP silently ignored).
    let cfg = &file.config;
    for (ep, held) in [(3, moe.experts / 3), (1, moe.experts)] {
        for tp_rank in 0..3 {
            let spec = SliceSpec {
                layers: 0..cfg.n_layers,
                tp_rank,
                tp: 3,
                ep,
            };
            let slice = ModelSlice::load(&file, &spec, Formats::DECODE).expect("loads");
            // Per layer Q/K/V and output, then gate/up and down per expert.
            let rank0_head = usize::from(tp_rank == 0);
            assert_eq!(
                slice.decode_kinds().len(),
                cfg.n_layers * (2 + 2 * held) + rank0_head,
                "EP {ep}, rank {tp_rank}"
            );
            assert_eq!(spec.experts(cfg).len(), held);
        }
    }
    // A dense model has no experts to split.
    let dense = common::open();
    let err = dense.config.check_ep(3, 3).expect_err("dense");
    assert!(err.contains("mixture-of-experts"), "{err}");
}

/// The Hugging Face layout (one tensor per expert, as the checkpoints
/// name them) reads back and computes what the GGUF file does.
#[test]
fn an_exported_moe_model_reads_back() {
    for name in ["qwen3moe", "mixtral"] {
        let file = open(&entry(name));
        let dir = std::env::temp_dir().join(format!("tandem-moe-{name}-{}", std::process::id()));
        tandem_model::export::write_hf(&file, &dir).expect("exports");
        let back = ModelFile::open(&dir).expect("the export opens");
        assert_eq!(back.config.arch, file.config.arch);
        assert_eq!(back.config.moe, file.config.moe, "{name}");
        let ids = common::prompt_ids(&file, common::PROMPTS[0]);
        let opts = EngineOptions {
            kv_blocks: 32,
            ..Default::default()
        };
        let run = |f: &ModelFile| {
            let mut e = Engine::new(f, &opts).expect("engine");
            common::logits(&mut e, &ids)
        };
        let ((pa, da), (pb, db)) = (run(&file), run(&back));
        let d = common::rel_diff(&pa, &pb).max(common::rel_diff(&da, &db));
        // The export stores bf16 (8 bits of mantissa).
        assert!(d < 5e-2, "{name}: logits differ by {d}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
