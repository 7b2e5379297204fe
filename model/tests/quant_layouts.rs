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

/// With f32 activations, the default mix (8-bit for the K-quants and Q5_0)
/// or 8-bit for every format, every layout computes the whole model's bits:
/// tensor-parallel ranks sum their column pieces in the whole model's
/// order, so no rounding difference reaches an 8-bit activation (before
/// column pieces, TP 3 differed from the whole by 2-3% of the logits with
/// 8-bit activations on this file). The default model too, with 8-bit
/// activations for its Q4_1 and Q8_0 (its own tests cover the default mode).
#[test]
fn a_k_quant_mix_gives_the_same_answers_in_every_layout() {
    use tandem_model::qrows::{set_activations, Activations};
    let file = q4_k_m();
    for a in [Activations::F32, Activations::Auto, Activations::Int8] {
        set_activations(a);
        common::composed_equal_full(&file, &[(2, 1), (1, 3), (2, 3)]);
        common::layouts_bit_identical(&file, &[(2, 1), (1, 3), (2, 3)]);
    }
    common::layouts_bit_identical(&common::open(), &[(1, 3), (2, 3)]);
}
