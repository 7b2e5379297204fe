//! `tandem gpu-check`: the GPU engine against the CPU engine on one
//! machine, a pass/fail line per check (tandem_model::cuda::check), for
//! `bench/gpu-check.sh`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use tandem_model::cuda::check::{kernel_checks, model_checks, Check, CheckPlan};
use tandem_model::{ChatMessage, Device, KvDtype, ModelFile};

use crate::Common;

/// The prompts of `shared/reference/smollm2-llamacpp.json`, whose greedy
/// continuations llama.cpp recorded.
const PROMPTS: [&str; 5] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a GPU is in one sentence.",
    "List the first five prime numbers.",
    "Translate 'good morning' into Spanish.",
];

#[derive(Args)]
pub struct GpuCheckArgs {
    /// GGUF file or Hugging Face directory (default: the embedded default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The GPU (or `emu`, the emulator).
    #[arg(long, default_value = "cuda:0")]
    device: Device,
    /// Weight precisions to check, each a full round.
    #[arg(long, value_delimiter = ',', default_value = "bf16,f32")]
    dtypes: Vec<String>,
    /// KV storage on the device: f32, f16 or bf16.
    #[arg(long, default_value = "bf16")]
    kv_dtype: String,
    /// Tokens of each greedy continuation.
    #[arg(long, default_value_t = 64)]
    greedy_tokens: usize,
    /// Prompt tokens of the chunked-prefill check.
    #[arg(long, default_value_t = 300)]
    long_prompt: usize,
    /// Only the checks that need no model (sampling, attention, all-reduce).
    #[arg(long)]
    kernels_only: bool,
}

pub fn run(common: &Common, a: GpuCheckArgs) -> Result<()> {
    let Some(kv_dtype) = KvDtype::parse(&a.kv_dtype) else {
        bail!("--kv-dtype must be f32, f16 or bf16");
    };
    let gpus = tandem_model::cuda::probe(&a.device, 1)?;
    for g in &gpus {
        println!("device: {}", g.describe());
    }
    if let Ok((major, minor)) = tandem_model::cuda::nvrtc::version() {
        println!("NVRTC {major}.{minor}");
    }
    let t0 = std::time::Instant::now();
    let print = |c: &Check| println!("{c}  [{:.1}s]", t0.elapsed().as_secs_f64());
    let mut checks = kernel_checks(&a.device, print);
    if !a.kernels_only {
        let path = common.model_path(&a.model)?;
        let file = ModelFile::open(&path)?;
        let t = file
            .chat_template
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the model has no chat template"))?;
        let prompts = PROMPTS
            .iter()
            .map(|p| {
                Ok(file
                    .tokenizer
                    .encode_prompt(&t.render(&[ChatMessage::new("user", p)], true)?)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let long_prompt = tandem_bench::engine::prompt_tokens(&file, a.long_prompt)?;
        for d in &a.dtypes {
            let dtype = crate::parse_gpu_dtype(d).map_err(anyhow::Error::msg)?;
            println!("-- {d} weights, {} KV", a.kv_dtype);
            let plan = CheckPlan {
                device: a.device.clone(),
                dtype,
                prompts: prompts.clone(),
                greedy_tokens: a.greedy_tokens,
                long_prompt: long_prompt.clone(),
                chunks: vec![1, 7, 16, 100, 256],
                layouts: vec![(2, 1), (3, 1), (1, 3)],
                kv_dtype,
            };
            checks.extend(model_checks(&file, &plan, print));
        }
    }
    let failed = checks.iter().filter(|c| !c.pass).count();
    println!(
        "gpu-check: {} passed, {failed} failed ({:.1}s)",
        checks.len() - failed,
        t0.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} GPU checks failed");
    }
    Ok(())
}
