//! `tandem generate`: the single-process reference path.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use tandem_model::{
    ChatMessage, Engine, EngineOptions, Grammar, KvDtype, ModelFile, SamplingParams,
};

use crate::Common;

#[derive(Args)]
pub struct GenerateArgs {
    /// GGUF file or Hugging Face directory (default: the embedded default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Raw prompt text, tokenized as is.
    #[arg(long, conflicts_with = "chat")]
    prompt: Option<String>,
    /// A user message, wrapped in the model's chat template.
    #[arg(long)]
    chat: Option<String>,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// A whole conversation as OpenAI-style JSON messages
    /// (`[{"role": "user", "content": "..."}, ...]`), wrapped in the chat template.
    #[arg(long, conflicts_with_all = ["chat", "prompt"])]
    messages: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Drop tokens less likely than this times the most likely one (0: off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Divide (multiply, when negative) the logits of tokens already in the
    /// prompt or the answer by this (1: off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Subtract this from the logits of tokens the answer holds.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    presence_penalty: f32,
    /// Subtract this once per time the answer holds a token.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    frequency_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Keep the answer to JSON matching this JSON schema (`{"type":"object"}`: any object).
    #[arg(long, conflicts_with = "regex")]
    json_schema: Option<String>,
    /// Keep the answer to text matching this regular expression.
    #[arg(long)]
    regex: Option<String>,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Pipeline stages, run in sequence in this process.
    #[arg(long, default_value_t = 1)]
    pp: usize,
    /// Tensor-parallel ranks per stage, run as threads.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Expert parallelism (mixture-of-experts models): 1, or --tp to give
    /// each rank its share of whole experts.
    #[arg(long, default_value_t = 1)]
    ep: usize,
    /// Prefill chunk size in tokens.
    #[arg(long, default_value_t = 512)]
    chunk: usize,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// KV storage: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    kv_dtype: String,
    /// Print token ids and timings to stderr.
    #[arg(long)]
    verbose: bool,
    #[command(flatten)]
    device: crate::DeviceArgs,
}

pub fn run(common: &Common, a: GenerateArgs) -> Result<()> {
    let Some(kv_dtype) = KvDtype::parse(&a.kv_dtype) else {
        bail!("--kv-dtype must be f32, f16 or bf16, not '{}'", a.kv_dtype);
    };
    if a.block_size == 0 {
        bail!("--block-size must be at least 1");
    }
    let path = common.model_path(&a.model)?;
    let file = ModelFile::open(&path)?;
    let text = match (&a.prompt, &a.chat) {
        _ if a.messages.is_some() => {
            let Some(t) = &file.chat_template else {
                bail!("{} has no chat template; use --prompt", path.display());
            };
            let v: Vec<serde_json::Value> =
                serde_json::from_str(a.messages.as_deref().unwrap_or_default()).map_err(|e| {
                    anyhow::anyhow!("--messages is not a JSON list of messages: {e}")
                })?;
            let mut msgs = Vec::new();
            for (i, m) in v.iter().enumerate() {
                let (Some(role), Some(content)) = (m["role"].as_str(), m["content"].as_str())
                else {
                    bail!("--messages[{i}] needs a string role and content");
                };
                msgs.push(ChatMessage::new(role, content));
            }
            t.render(&msgs, true)?
        }
        (Some(p), None) => p.clone(),
        (None, Some(c)) => {
            let Some(t) = &file.chat_template else {
                bail!("{} has no chat template; use --prompt", path.display());
            };
            let mut msgs = Vec::new();
            if let Some(s) = &a.system {
                msgs.push(ChatMessage::new("system", s));
            }
            msgs.push(ChatMessage::new("user", c));
            t.render(&msgs, true)?
        }
        _ => bail!("give --prompt TEXT, --chat MESSAGE or --messages JSON"),
    };
    let prompt = file.tokenizer.encode_prompt(&text)?;
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        max_tokens: a.max_tokens,
        stop_token_ids: Vec::new(),
        stop: a.stop.clone(),
        ignore_eos: a.ignore_eos,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        logit_bias: Vec::new(),
        top_logprobs: 0,
        grammar: match (&a.json_schema, &a.regex) {
            (Some(j), _) => Some(Grammar::JsonSchema(j.clone())),
            (None, Some(r)) => Some(Grammar::Regex(r.clone())),
            (None, None) => None,
        },
    };
    params.validate()?;
    let need_blocks = (prompt.len() + a.max_tokens + 1).div_ceil(a.block_size) + 1;
    let opts = EngineOptions {
        pp: a.pp,
        tp: a.tp,
        ep: a.ep,
        block_size: a.block_size,
        kv_dtype,
        kv_blocks: need_blocks,
        device: a.device.device.clone(),
        gpu_dtype: a.device.gpu_dtype,
        ..Default::default()
    };
    if a.verbose {
        print_formats(&file);
    }
    let mut engine = Engine::new(&file, &opts)?;
    let mut stdout = std::io::stdout();
    let g = tandem_model::generate(
        &mut engine,
        &file.tokenizer,
        &prompt,
        &params,
        a.chunk,
        |t| {
            let _ = stdout.write_all(t.as_bytes());
            let _ = stdout.flush();
        },
    )?;
    println!();
    if a.verbose {
        eprintln!("prompt ids: {prompt:?}");
        eprintln!("output ids: {:?}", g.tokens);
        let lps: Vec<String> = g.logprobs.iter().map(|l| format!("{l:.3}")).collect();
        eprintln!("logprobs:   [{}]", lps.join(", "));
        eprintln!(
            "prompt {} tokens, prefill {:.3}s ({:.1} tok/s); {} tokens generated in {:.3}s ({:.1} tok/s); finish: {:?}",
            g.prompt_tokens,
            g.prefill_secs,
            g.prompt_tokens as f64 / g.prefill_secs,
            g.tokens.len(),
            g.decode_secs,
            g.tokens.len().saturating_sub(1) as f64 / g.decode_secs.max(1e-9),
            g.finish
        );
    }
    Ok(())
}

/// Which format each tensor is stored in and computed in, with a summary.
fn print_formats(file: &tandem_model::ModelFile) {
    let formats = file.tensor_formats();
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for f in &formats {
        *counts.entry(f.decode.as_str()).or_default() += 1;
    }
    let summary: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
    eprintln!("tensors (decode runs on): {}", summary.join(", "));
    let w = formats.iter().map(|f| f.name.len()).max().unwrap_or(0);
    for f in &formats {
        eprintln!(
            "  {:w$}  {:<5} {:<12} decode {:<26} prefill {}",
            f.name,
            f.stored,
            format!("{:?}", f.shape),
            f.decode,
            f.prefill,
        );
    }
}
