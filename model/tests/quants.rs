//! Every GGUF quantization Tandem keeps for decode, end to end against
//! llama.cpp on the same files: the default model requantized by llama.cpp's
//! own llama-quantize (`bench/quants.py files`, which CI runs), with
//! llama.cpp's greedy answers on each recorded in `data/quants-llamacpp.json`
//! (`bench/quants.py record`).

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use sha2::{Digest, Sha256};
use tandem_model::ModelFile;

fn record() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/quants-llamacpp.json");
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    serde_json::from_str(&s).expect("the record parses")
}

fn quant_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("TANDEM_QUANT_DIR") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("TANDEM_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/tandem"),
        PathBuf::from,
    );
    home.join("quants")
}

/// Opens a recorded variant after checking it is the file llama.cpp answered on.
fn open(name: &str, want_sha: &str) -> ModelFile {
    let path = quant_dir().join(format!("smol-{name}.gguf"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; make the files with `bench/quants.py files` (CI does)",
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
    ModelFile::open(&path).expect("the quantized model opens")
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
    let mut kept = BTreeSet::new();
    for (name, f) in files {
        let file = open(name, f["sha256"].as_str().expect("sha256"));
        // Every 2-D tensor the file quantizes runs quantized in decode.
        for t in file.tensor_formats() {
            if t.shape.len() == 2 && t.stored != "F32" {
                assert!(
                    t.decode != "f32",
                    "{name}: {} ({}) is dequantized for decode",
                    t.name,
                    t.stored
                );
                kept.insert(t.decode.split(' ').next().expect("a name").to_string());
            }
        }
        common::greedy_agrees(&file, &cases(&f["greedy"]), name);
    }
    // The files cover every format the issue names, each on its own kernel.
    for k in tandem_model::quant::QKind::ALL {
        assert!(
            kept.contains(k.name()),
            "no recorded file runs {k}: {kept:?}"
        );
    }
}
