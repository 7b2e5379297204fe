//! Shared helpers for tests that run the real default model.
#![allow(dead_code)]

use std::path::PathBuf;

use tandem_model::ModelFile;

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
