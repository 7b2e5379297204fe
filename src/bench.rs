//! `tandem bench …`: the benchmarks.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::Common;

#[derive(Args)]
pub struct BenchEngineArgs {
    /// GGUF file or Hugging Face directory (default: the embedded default model).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    decode_steps: usize,
    /// Batch sizes for aggregate decode throughput.
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    batches: Vec<usize>,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// llama.cpp's llama-bench binary: measure it on the same model and
    /// threads right after Tandem (see bench/llamacpp.sh).
    #[arg(long, env = "TANDEM_LLAMA_BENCH")]
    llama_bench: Option<PathBuf>,
}

pub fn engine(common: &Common, threads: usize, a: BenchEngineArgs) -> Result<()> {
    let path = common.model_path(&a.model)?;
    let file = tandem_model::ModelFile::open(&path)?;
    let opts = tandem_bench::engine::EngineBenchOptions {
        prompt_tokens: a.prompt_tokens,
        decode_prompt_tokens: 128,
        decode_steps: a.decode_steps,
        batches: a.batches,
        repeats: a.repeats,
    };
    let r = tandem_bench::engine::run(&file, threads, &opts)?;
    println!("model            {}", file.config.name);
    println!("threads          {}", r.threads);
    println!(
        "prefill          {:8.1} tok/s  ({} tokens, best of {})",
        r.prefill_tokens_per_s, r.prompt_tokens, opts.repeats
    );
    println!(
        "decode batch 1   {:8.1} tok/s  ({} steps after a 128-token prompt)",
        r.decode_tokens_per_s_batch1, r.decode_steps
    );
    for (b, tps) in &r.decode_batched {
        println!("decode batch {b:<3} {tps:8.1} tok/s  (aggregate)");
    }
    let reference = match &a.llama_bench {
        Some(bin) => {
            let f = tandem_bench::llamacpp::run(
                bin,
                &path,
                threads,
                a.prompt_tokens,
                a.decode_steps,
                a.repeats,
            )
            .map_err(anyhow::Error::msg)?;
            println!();
            println!("llama.cpp llama-bench, same model and threads, measured right after:");
            println!(
                "prefill          {:8.1} tok/s   Tandem/llama.cpp = {:.2}x",
                f.prefill_tokens_per_s,
                r.prefill_tokens_per_s / f.prefill_tokens_per_s
            );
            println!(
                "decode batch 1   {:8.1} tok/s   Tandem/llama.cpp = {:.2}x",
                f.decode_tokens_per_s,
                r.decode_tokens_per_s_batch1 / f.decode_tokens_per_s
            );
            Some(f)
        }
        None => None,
    };
    if let Some(p) = a.json {
        let doc = serde_json::json!({ "tandem": r, "llama_cpp": reference });
        std::fs::write(&p, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
