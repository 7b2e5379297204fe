//! llama.cpp's `llama-bench`, run on the same model and threads right after
//! Tandem's own measurement so both figures come from one run.
//! `bench/llamacpp.sh build` builds it from the llama-cpp-python sdist.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct LlamaCppFigures {
    /// Prompt-processing tokens/s (`pp<prompt>`).
    pub prefill_tokens_per_s: f64,
    /// Generation tokens/s at batch 1 (`tg<gen>`).
    pub decode_tokens_per_s: f64,
}

/// Runs `llama-bench -m MODEL -t THREADS -p PROMPT -n GEN -o json`.
pub fn run(
    bin: &Path,
    model: &Path,
    threads: usize,
    prompt: usize,
    gen: usize,
    repeats: usize,
) -> Result<LlamaCppFigures, String> {
    let out = Command::new(bin)
        .arg("-m")
        .arg(model)
        .args([
            "-t",
            &threads.to_string(),
            "-p",
            &prompt.to_string(),
            "-n",
            &gen.to_string(),
            "-r",
            &repeats.max(1).to_string(),
            "-o",
            "json",
        ])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse(&String::from_utf8_lossy(&out.stdout))
}

/// Reads `avg_ts` of the prompt-only and generation-only entries.
pub fn parse(json: &str) -> Result<LlamaCppFigures, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("llama-bench output is not JSON: {e}"))?;
    let rows = v.as_array().ok_or("llama-bench output is not a list")?;
    let pick = |prompt: bool| {
        rows.iter()
            .find(|r| {
                let (p, g) = (
                    r["n_prompt"].as_u64().unwrap_or(0),
                    r["n_gen"].as_u64().unwrap_or(0),
                );
                if prompt {
                    p > 0 && g == 0
                } else {
                    p == 0 && g > 0
                }
            })
            .and_then(|r| r["avg_ts"].as_f64())
    };
    Ok(LlamaCppFigures {
        prefill_tokens_per_s: pick(true)
            .ok_or("no prompt-processing entry in llama-bench output")?,
        decode_tokens_per_s: pick(false).ok_or("no generation entry in llama-bench output")?,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_llama_bench_json() {
        let j = r#"[{"n_prompt": 512, "n_gen": 0, "avg_ts": 226.5}, {"n_prompt": 0, "n_gen": 128, "avg_ts": 96.1}]"#;
        let f = super::parse(j).expect("parses");
        assert_eq!(
            (f.prefill_tokens_per_s, f.decode_tokens_per_s),
            (226.5, 96.1)
        );
        assert!(super::parse("[]").is_err());
    }
}
