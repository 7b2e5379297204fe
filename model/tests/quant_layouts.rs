//! Layouts on a mixed-quantization file (Q5_0, Q4_K, Q6_K and Q8_0 from
//! `bench/quants.py files`). Its own test binary: it switches the process's
//! decode activations, which other tests must not see.

mod common;

use tandem_model::ModelFile;

fn q4_k_m() -> ModelFile {
    let path = common::quant_file("Q4_K_M");
    ModelFile::open(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; make the files with `bench/quants.py files` (CI does)",
            path.display()
        )
    })
}

/// With f32 or 8-bit activations, every layout computes the whole model's
/// bits: tensor-parallel ranks sum their column pieces in the whole model's
/// order, so no rounding difference reaches an 8-bit activation (before
/// column pieces, TP 3 differed from the whole by 2-3% of the logits with
/// 8-bit activations on this file).
#[test]
fn a_k_quant_mix_gives_the_same_answers_in_every_layout() {
    let file = q4_k_m();
    for int8 in [false, true] {
        tandem_model::qrows::set_int8_activations(int8);
        common::composed_equal_full(&file, &[(2, 1), (1, 3), (2, 3)]);
        common::layouts_bit_identical(&file, &[(2, 1), (1, 3), (2, 3)]);
    }
}
