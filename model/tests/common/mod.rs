//! Shared helpers for tests that run the real default model.
#![allow(dead_code)]

use std::path::PathBuf;

use tandem_model::{ChatMessage, Engine, EngineOptions, ModelFile, SamplingParams, Sequence};

/// The default model, as `.ci/run` (or `tandem fetch-model`) stores it.
/// `TANDEM_TEST_MODEL` points elsewhere. A missing model fails the test
/// rather than skipping it: CI installs the model before testing.
pub fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TANDEM_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let p = tandem_model::fetch::cached_default_model();
    assert!(
        p.is_file(),
        "default model missing at {}: run `tandem fetch-model` (CI does) or set TANDEM_TEST_MODEL",
        p.display()
    );
    p
}

/// A requantized variant of the default model made by `bench/quants.py
/// files`: `$TANDEM_QUANT_DIR` (default `${TANDEM_HOME:-~/.cache/tandem}/quants`)
/// `/smol-NAME.gguf`.
pub fn quant_file(name: &str) -> PathBuf {
    let dir = std::env::var_os("TANDEM_QUANT_DIR").map_or_else(
        || {
            let home = std::env::var_os("TANDEM_HOME").map_or_else(
                || PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/tandem"),
                PathBuf::from,
            );
            home.join("quants")
        },
        PathBuf::from,
    );
    dir.join(format!("smol-{name}.gguf"))
}

/// A tiny random-weight mixture-of-experts file made by `bench/tiny_moe.py
/// files`: `${TANDEM_HOME:-~/.cache/tandem}/moe/NAME`.
pub fn moe_file(name: &str) -> PathBuf {
    let home = std::env::var_os("TANDEM_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/tandem"),
        PathBuf::from,
    );
    home.join("moe").join(name)
}

/// Opens a model file after checking its SHA-256 is `want_sha`: the file
/// llama.cpp's recorded answers were made on. `make` says how to make it.
pub fn open_recorded(path: &std::path::Path, want_sha: &str, make: &str) -> ModelFile {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; make the files with `{make}` (CI does)",
            path.display()
        )
    });
    let sha = format!("{:x}", Sha256::digest(&bytes));
    assert_eq!(
        sha,
        want_sha,
        "{} is not the file llama.cpp's answers were recorded on",
        path.display()
    );
    ModelFile::open(path).expect("the model opens")
}

pub fn open() -> ModelFile {
    ModelFile::open(&model_path()).expect("the default model opens")
}

pub fn reference() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/reference/smollm2-llamacpp.json");
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    serde_json::from_str(&s).expect("reference JSON parses")
}

/// max |a - b| / max |a|
pub fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// llama.cpp's greedy answers, `(prompt, answer)` pairs, replayed through
/// the engine: the prompt's prefill, then one decode step (the quantized
/// kernels) per answer token. At every position llama.cpp's token must be
/// within 0.5 logits of the engine's best, and the engine's best must be
/// llama.cpp's token at 80% of them or more. llama.cpp multiplies
/// quantized weights by 8-bit activations, so near-ties may go either way; a
/// wrong kernel shows as wide gaps. Replaying rather than generating checks
/// every position, not only those before the first near-tie.
pub fn greedy_agrees(file: &ModelFile, cases: &[(Vec<u32>, Vec<u32>)], label: &str) {
    let mut engine = Engine::new(
        file,
        &EngineOptions {
            kv_blocks: 64,
            ..Default::default()
        },
    )
    .expect("engine");
    let (mut positions, mut same) = (0, 0);
    let mut widest = 0f32;
    // How far below this engine's best llama.cpp's token may be (a near-tie).
    // With 8-bit activations for every format both engines round
    // activations everywhere, differently
    // (llama.cpp per 256 values for K-quant weights, Tandem per 32), and the
    // two roundings add: measured up to 0.71 logits on the K-quant files,
    // against 0.39 with f32 activations.
    let limit = if tandem_model::qrows::activations() == tandem_model::qrows::Activations::Int8 {
        1.0
    } else {
        0.5
    };
    for (prompt_ids, want) in cases {
        let mut seq = Sequence {
            tokens: prompt_ids.clone(),
            ..Default::default()
        };
        let mut logits = engine.prefill(&mut seq, 512).expect("prefill");
        for (i, &y) in want.iter().enumerate() {
            let best = argmax(&logits);
            let gap = logits[best] - logits[y as usize];
            assert!(
                gap < limit,
                "{label}: at token {i} llama.cpp chose {y}, {gap} logits below this engine's {best}"
            );
            widest = widest.max(gap);
            positions += 1;
            same += usize::from(best == y as usize);
            if i + 1 < want.len() {
                seq.tokens.push(y);
                logits = engine.decode(&mut [&mut seq]).expect("decode");
            }
        }
        engine.release(&mut seq);
    }
    eprintln!(
        "{label}: llama.cpp's token is this engine's best at {same} of {positions} positions; widest gap {widest:.3} logits"
    );
    assert!(
        same * 5 >= positions * 4,
        "{label}: llama.cpp's token is this engine's best at only {same} of {positions} positions"
    );
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

pub const PROMPTS: [&str; 3] = [
    "What is the capital of France?",
    "Write a short poem about a lighthouse keeper who counts the waves.",
    "List three uses of a paperclip.",
];

pub fn prompt_ids(file: &ModelFile, p: &str) -> Vec<u32> {
    let t = file.chat_template.as_ref().expect("chat template");
    file.tokenizer
        .encode_prompt(
            &t.render(&[ChatMessage::new("user", p)], true)
                .expect("renders"),
        )
        .expect("encodes")
}

/// Prefill logits, then the logits of one decode step after the greedy token.
pub fn logits(engine: &mut Engine, ids: &[u32]) -> (Vec<f32>, Vec<f32>) {
    logits_after(engine, ids, None)
}

/// Prefill logits, and the next step's after `next` (default: the prefill's
/// best), so that engines compared can be given the same token and a
/// near-tie flip cannot change what follows.
pub fn logits_after(engine: &mut Engine, ids: &[u32], next: Option<u32>) -> (Vec<f32>, Vec<f32>) {
    let mut seq = Sequence {
        tokens: ids.to_vec(),
        ..Default::default()
    };
    let pre = engine.prefill(&mut seq, 512).expect("prefill");
    seq.tokens
        .push(next.unwrap_or_else(|| tandem_model::sampling::argmax(&pre)));
    let dec = engine.decode(&mut [&mut seq]).expect("decode");
    engine.release(&mut seq);
    (pre, dec)
}

pub fn continuation(engine: &mut Engine, file: &ModelFile, ids: &[u32]) -> Vec<u32> {
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(64)
    };
    tandem_model::generate(engine, &file.tokenizer, ids, &params, 512, |_| {})
        .expect("generates")
        .tokens
}

/// Each (PP, TP) layout computes what the whole model does: prefill and
/// decode logits within 1e-3 relative, identical 64-token greedy continuations.
pub fn composed_equal_full(file: &ModelFile, layouts: &[(usize, usize)]) {
    let with_ep: Vec<_> = layouts.iter().map(|&(pp, tp)| (pp, tp, 1)).collect();
    layouts_equal_full(file, &with_ep);
}

/// As [`composed_equal_full`], for (PP, TP, EP) layouts.
pub fn layouts_equal_full(file: &ModelFile, layouts: &[(usize, usize, usize)]) {
    let opts = |pp, tp, ep| EngineOptions {
        pp,
        tp,
        ep,
        kv_blocks: 64,
        ..Default::default()
    };
    let mut full = Engine::new(file, &opts(1, 1, 1)).expect("full model");
    let reference: Vec<_> = PROMPTS
        .iter()
        .map(|p| {
            let ids = prompt_ids(file, p);
            (logits(&mut full, &ids), continuation(&mut full, file, &ids))
        })
        .collect();
    drop(full);
    for &(pp, tp, ep) in layouts {
        let mut e = Engine::new(file, &opts(pp, tp, ep)).expect("composed engine");
        for (p, ((pre, dec), cont)) in PROMPTS.iter().zip(&reference) {
            let ids = prompt_ids(file, p);
            let (pre2, dec2) = logits(&mut e, &ids);
            let (dp, dd) = (rel_diff(pre, &pre2), rel_diff(dec, &dec2));
            assert!(
                dp <= 1e-3,
                "PP={pp} TP={tp} EP={ep} {p:?}: prefill logits differ by {dp}"
            );
            assert!(
                dd <= 1e-3,
                "PP={pp} TP={tp} EP={ep} {p:?}: decode logits differ by {dd}"
            );
            assert_eq!(
                &continuation(&mut e, file, &ids),
                cont,
                "PP={pp} TP={tp} EP={ep} {p:?}: greedy continuation"
            );
        }
        assert_eq!(e.free_blocks(), 64, "every block is returned");
    }
}

/// Prefill logits and those of 16 greedy decode steps, one after another.
pub fn step_logits(engine: &mut Engine, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut seq = Sequence {
        tokens: ids.to_vec(),
        ..Default::default()
    };
    let mut all = vec![engine.prefill(&mut seq, 512).expect("prefill")];
    for _ in 0..16 {
        seq.tokens
            .push(tandem_model::sampling::argmax(all.last().expect("logits")));
        all.push(engine.decode(&mut [&mut seq]).expect("decode"));
    }
    engine.release(&mut seq);
    all
}

/// Each (PP, TP) layout gives the whole model's logits bit for bit, in
/// prefill and over 16 decode steps.
pub fn layouts_bit_identical(file: &ModelFile, layouts: &[(usize, usize)]) {
    let opts = |pp, tp| EngineOptions {
        pp,
        tp,
        kv_blocks: 64,
        ..Default::default()
    };
    let mut full = Engine::new(file, &opts(1, 1)).expect("full model");
    let reference: Vec<_> = PROMPTS
        .iter()
        .map(|p| step_logits(&mut full, &prompt_ids(file, p)))
        .collect();
    drop(full);
    for &(pp, tp) in layouts {
        let mut e = Engine::new(file, &opts(pp, tp)).expect("composed engine");
        for (p, want) in PROMPTS.iter().zip(&reference) {
            let got = step_logits(&mut e, &prompt_ids(file, p));
            for (step, (w, g)) in want.iter().zip(&got).enumerate() {
                let differ = w
                    .iter()
                    .zip(g)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                assert!(
                    differ == 0,
                    "PP={pp} TP={tp} {p:?} step {step}: {differ} logits differ from the whole model's (largest relative difference {})",
                    rel_diff(w, g)
                );
            }
        }
    }
}
