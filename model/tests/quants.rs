//! Every GGUF quantization Tandem keeps for decode, end to end against
//! llama.cpp on the same files: the default model requantized by llama.cpp's
//! own llama-quantize (`bench/quants.py files`, which CI runs), with
//! llama.cpp's greedy answers on each recorded in `data/quants-llamacpp.json`
//! (`bench/quants.py record`).

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use tandem_model::quant::QKind;
use tandem_model::{Formats, ModelFile, ModelSlice, SliceSpec};

fn record() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/quants-llamacpp.json");
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    serde_json::from_str(&s).expect("the record parses")
}

/// Opens a recorded variant after checking it is the file llama.cpp answered on.
fn open(name: &str, want_sha: &str) -> ModelFile {
    common::open_recorded(&common::quant_file(name), want_sha, "bench/quants.py files")
}

fn cases(v: &serde_json::Value) -> Vec<(Vec<u32>, Vec<u32>)> {
    v.as_array()
        .expect("greedy cases")
        .iter()
        .map(|c| (common::ids(&c["prompt_ids"]), common::ids(&c["greedy_ids"])))
        .collect()
}

#[test]
fn every_quantization_decodes_as_llama_cpp_does() {
    let r = record();
    let files = r["files"].as_object().expect("files");
    let mut stored = BTreeSet::new();
    for (name, f) in files {
        let file = open(name, f["sha256"].as_str().expect("sha256"));
        stored.extend(runs_quantized(&file, name));
        common::greedy_agrees(&file, &cases(&f["greedy"]), name);
    }
    // The files cover every format kept for decode.
    for k in QKind::ALL {
        assert!(
            stored.contains(&k),
            "no recorded file holds {k}: {stored:?}"
        );
    }
}

/// Checks that decode's loaded weights run in the formats the file stores
/// them in (Q4_0 on the Q4_1 kernel), none dequantized; returns the stored
/// formats of the layers' weights and the LM head.
fn runs_quantized(file: &ModelFile, name: &str) -> BTreeSet<QKind> {
    let kernel = |k: QKind| if k == QKind::Q4_0 { QKind::Q4_1 } else { k };
    let slice = ModelSlice::load(file, &SliceSpec::full(&file.config), Formats::DECODE)
        .expect("the whole model loads");
    let mut running = BTreeSet::new();
    for (i, kinds) in slice.decode_kinds().into_iter().enumerate() {
        let kinds = kinds.unwrap_or_else(|| panic!("{name}: weight {i} runs dense f32 in decode"));
        running.extend(kinds);
    }
    let stored: BTreeSet<QKind> = file
        .tensor_formats()
        .into_iter()
        .filter_map(|t| t.quant)
        .collect();
    let want: BTreeSet<QKind> = stored.iter().copied().map(kernel).collect();
    assert_eq!(
        running, want,
        "{name}: the kernels' formats against the file's"
    );
    stored
}
