//! Layouts on a mixed-quantization file (Q5_0, Q4_K, Q6_K and Q8_0 from
//! `bench/quants.py files`). Its own test binary: it switches the process's
//! decode activations, which other tests must not see.

mod common;

use tandem_model::{Engine, EngineOptions, ModelFile};

fn q4_k_m() -> ModelFile {
    let path = common::quant_file("Q4_K_M");
    ModelFile::open(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; make the files with `bench/quants.py files` (CI does)",
            path.display()
        )
    })
}

/// With f32 activations every layout computes what the whole does, as on
/// the default model. With 8-bit activations pipeline layouts still do (a
/// stage passes its hidden states on exactly), and tensor-parallel ones stay
/// within a few percent of the logits.
#[test]
fn a_k_quant_mix_gives_the_same_answers_in_every_layout() {
    let file = q4_k_m();
    tandem_model::qrows::set_int8_activations(false);
    common::composed_equal_full(&file, &[(2, 1), (1, 3), (2, 3)]);

    tandem_model::qrows::set_int8_activations(true);
    common::composed_equal_full(&file, &[(2, 1), (3, 1)]);
    let opts = |tp| EngineOptions {
        tp,
        kv_blocks: 64,
        ..Default::default()
    };
    let mut whole = Engine::new(&file, &opts(1)).expect("whole");
    let mut tp3 = Engine::new(&file, &opts(3)).expect("TP 3");
    for p in common::PROMPTS {
        let ids = common::prompt_ids(&file, p);
        let (pre, dec) = common::logits(&mut whole, &ids);
        let (pre3, dec3) = common::logits(&mut tp3, &ids);
        let (dp, dd) = (common::rel_diff(&pre, &pre3), common::rel_diff(&dec, &dec3));
        eprintln!(
            "8-bit activations, TP 3 against the whole, {p:?}: prefill {dp:.2e}, decode {dd:.2e}"
        );
        assert!(
            dp <= 1e-3,
            "{p:?}: prefill (f32 activations) differs by {dp}"
        );
        assert!(dd <= 0.05, "{p:?}: decode logits differ by {dd}");
    }
}
