//! The GPU engine's code path, run by the CUDA emulator on the CPU,
//! against the CPU engine on the default model: the checks `tandem
//! gpu-check` runs on a GPU (kernels against references, logits and greedy
//! continuations against the CPU, chunked prefill, PP/TP layouts, decode
//! graphs), here with fewer prompts and tokens.

mod common;

use common::prompt_ids;
use tandem_model::cuda::check::{run_all, CheckPlan};
use tandem_model::cuda::GpuDtype;
use tandem_model::{Device, KvDtype, ModelFile};

fn plan(file: &ModelFile, dtype: GpuDtype, kv_dtype: KvDtype) -> CheckPlan {
    let long =
        "Tell me about lighthouses, the keepers who lived in them, and the ships they guided home.";
    CheckPlan {
        device: Device::Emu,
        dtype,
        prompts: vec![
            prompt_ids(file, "What is the capital of France?"),
            prompt_ids(file, "List the first five prime numbers."),
        ],
        greedy_tokens: 12,
        long_prompt: prompt_ids(file, long),
        chunks: vec![1, 7, 16],
        layouts: vec![(2, 1), (3, 1), (1, 3)],
        kv_dtype,
    }
}

fn assert_all_pass(file: &ModelFile, plan: &CheckPlan) {
    let t0 = std::time::Instant::now();
    let checks = run_all(file, plan, |c| eprintln!("{c} [{:.1?}]", t0.elapsed()));
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.pass)
        .map(|c| c.to_string())
        .collect();
    assert!(failed.is_empty(), "failed checks:\n{}", failed.join("\n"));
}

#[test]
fn emulated_gpu_with_f32_weights_equals_the_cpu() {
    let file = common::open();
    assert_all_pass(&file, &plan(&file, GpuDtype::F32, KvDtype::F32));
}

#[test]
fn emulated_gpu_with_bf16_weights_stays_within_its_tolerance() {
    let file = common::open();
    assert_all_pass(&file, &plan(&file, GpuDtype::Bf16, KvDtype::Bf16));
}
