//! `tandem bench engine`: prefill tokens/s for one long prompt, decode
//! tokens/s at batch 1, and aggregate decode tokens/s at larger batches, on
//! the single-process engine with a fixed number of threads.

use std::time::Instant;

use serde::Serialize;
use tandem_model::{Engine, EngineOptions, ModelFile, Result, Sequence};

#[derive(Debug, Clone)]
pub struct EngineBenchOptions {
    pub prompt_tokens: usize,
    pub decode_prompt_tokens: usize,
    pub decode_steps: usize,
    pub batches: Vec<usize>,
    pub repeats: usize,
}

impl Default for EngineBenchOptions {
    fn default() -> Self {
        EngineBenchOptions {
            prompt_tokens: 512,
            decode_prompt_tokens: 128,
            decode_steps: 128,
            batches: vec![8, 32],
            repeats: 3,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineBenchReport {
    pub threads: usize,
    pub prompt_tokens: usize,
    /// Best of `repeats` runs.
    pub prefill_tokens_per_s: f64,
    pub decode_steps: usize,
    pub decode_tokens_per_s_batch1: f64,
    /// (batch, aggregate tokens/s)
    pub decode_batched: Vec<(usize, f64)>,
}

/// Deterministic prompt tokens: ordinary English text, tokenized and repeated.
pub fn prompt_tokens(file: &ModelFile, n: usize) -> Result<Vec<u32>> {
    const TEXT: &str = "The history of computing is a story of people who wanted to calculate faster than \
        they could by hand. Early machines used gears and levers; later ones used relays, vacuum tubes, \
        transistors and finally integrated circuits holding billions of switches. Each step made machines \
        smaller, cheaper and more reliable, and each opened new uses that their inventors never imagined. ";
    let base = file.tokenizer.encode(TEXT)?;
    Ok(base.iter().copied().cycle().take(n).collect())
}

pub fn run(
    file: &ModelFile,
    threads: usize,
    opts: &EngineBenchOptions,
) -> Result<EngineBenchReport> {
    let max_batch = opts.batches.iter().copied().max().unwrap_or(1).max(1);
    let per_seq = (opts.decode_prompt_tokens + opts.decode_steps + 1).div_ceil(16);
    let blocks = (per_seq * max_batch).max(opts.prompt_tokens.div_ceil(16)) + 16;
    let mut engine = Engine::new(
        file,
        &EngineOptions {
            kv_blocks: blocks,
            ..Default::default()
        },
    )?;

    let prompt = prompt_tokens(file, opts.prompt_tokens)?;
    let mut best = f64::INFINITY;
    for _ in 0..opts.repeats.max(1) {
        let mut seq = Sequence {
            tokens: prompt.clone(),
            ..Default::default()
        };
        let t = Instant::now();
        engine.prefill(&mut seq, opts.prompt_tokens)?;
        best = best.min(t.elapsed().as_secs_f64());
        engine.release(&mut seq);
    }
    let prefill_tps = opts.prompt_tokens as f64 / best;

    let b1 = decode_rate(&mut engine, file, 1, opts)?;
    let mut batched = Vec::new();
    for &b in &opts.batches {
        batched.push((b, decode_rate(&mut engine, file, b, opts)?));
    }
    Ok(EngineBenchReport {
        threads,
        prompt_tokens: opts.prompt_tokens,
        prefill_tokens_per_s: prefill_tps,
        decode_steps: opts.decode_steps,
        decode_tokens_per_s_batch1: b1,
        decode_batched: batched,
    })
}

/// Aggregate tokens/s of `steps` greedy decode steps over `batch` sequences.
fn decode_rate(
    engine: &mut Engine,
    file: &ModelFile,
    batch: usize,
    opts: &EngineBenchOptions,
) -> Result<f64> {
    let prompt = prompt_tokens(file, opts.decode_prompt_tokens + batch)?;
    let mut seqs: Vec<Sequence> = (0..batch)
        .map(|i| Sequence {
            tokens: prompt[i..i + opts.decode_prompt_tokens].to_vec(),
            ..Default::default()
        })
        .collect();
    let mut next = Vec::new();
    for s in seqs.iter_mut() {
        let logits = engine.prefill(s, 512)?;
        next.push(tandem_model::sampling::argmax(&logits));
    }
    let vocab = file.config.vocab_size;
    let t = Instant::now();
    for _ in 0..opts.decode_steps {
        for (s, n) in seqs.iter_mut().zip(&next) {
            s.tokens.push(*n);
        }
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        let logits = engine.decode(&mut refs)?;
        next = logits
            .chunks(vocab)
            .map(tandem_model::sampling::argmax)
            .collect();
    }
    let secs = t.elapsed().as_secs_f64();
    for s in seqs.iter_mut() {
        engine.release(s);
    }
    Ok((batch * opts.decode_steps) as f64 / secs)
}
