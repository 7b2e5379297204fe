//! `tandem bench engine`: prefill tokens/s for long prompts, decode
//! tokens/s and inter-token latency at batch 1, and aggregate decode
//! tokens/s at larger batches, on the single-process engine (CPU threads
//! or a GPU). Tokens are chosen on the device that computed the logits, as
//! in serving.

use std::time::Instant;

use serde::Serialize;
use tandem_model::cuda::GpuDtype;
use tandem_model::{Device, Draw, Engine, EngineOptions, KvDtype, ModelFile, Result, Sequence};

#[derive(Debug, Clone)]
pub struct EngineBenchOptions {
    /// Prompt lengths whose prefill is timed (the first is the headline).
    pub prompt_tokens: Vec<usize>,
    pub decode_prompt_tokens: usize,
    pub decode_steps: usize,
    pub batches: Vec<usize>,
    pub repeats: usize,
    /// Tensor and expert parallelism of the engine measured (ranks as
    /// threads sharing the thread count).
    pub tp: usize,
    pub ep: usize,
    pub device: Device,
    pub gpu_dtype: GpuDtype,
    pub kv_dtype: KvDtype,
}

impl Default for EngineBenchOptions {
    fn default() -> Self {
        EngineBenchOptions {
            prompt_tokens: vec![512],
            decode_prompt_tokens: 128,
            decode_steps: 128,
            batches: vec![8, 32],
            repeats: 3,
            tp: 1,
            ep: 1,
            device: Device::Cpu,
            gpu_dtype: GpuDtype::Bf16,
            kv_dtype: KvDtype::F32,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineBenchReport {
    pub device: String,
    pub threads: usize,
    pub prompt_tokens: usize,
    /// Best of `repeats` runs, for the first prompt length.
    pub prefill_tokens_per_s: f64,
    /// (prompt tokens, best prefill seconds, tokens/s) for every length.
    pub prefill: Vec<(usize, f64, f64)>,
    pub decode_steps: usize,
    pub decode_tokens_per_s_batch1: f64,
    /// Median time of one batch-1 decode step, milliseconds.
    pub itl_ms_batch1: f64,
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

/// Parameters a batch-1 decode step reads once (every projection and the
/// LM head; of a mixture of experts, the router and the experts one token
/// runs).
pub fn weight_params(file: &ModelFile) -> usize {
    let c = &file.config;
    let attn =
        c.hidden * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.hidden;
    let mlp = match c.moe {
        Some(m) => 3 * c.hidden * m.intermediate * m.used + c.hidden * m.experts,
        None => 3 * c.hidden * c.intermediate,
    };
    c.n_layers * (attn + mlp) + c.vocab_size * c.hidden
}

pub fn run(
    file: &ModelFile,
    threads: usize,
    opts: &EngineBenchOptions,
) -> Result<EngineBenchReport> {
    let max_batch = opts.batches.iter().copied().max().unwrap_or(1).max(1);
    let per_seq = (opts.decode_prompt_tokens + opts.decode_steps + 2).div_ceil(16);
    let longest = opts.prompt_tokens.iter().copied().max().unwrap_or(1);
    let blocks = (per_seq * max_batch).max(longest.div_ceil(16)) + 16;
    let mut engine = Engine::new(
        file,
        &EngineOptions {
            kv_blocks: blocks,
            kv_dtype: opts.kv_dtype,
            tp: opts.tp,
            ep: opts.ep,
            threads,
            device: opts.device.clone(),
            gpu_dtype: opts.gpu_dtype,
            ..Default::default()
        },
    )?;
    let mut prefill = Vec::new();
    for &n in &opts.prompt_tokens {
        let prompt = prompt_tokens(file, n)?;
        let mut best = f64::INFINITY;
        // One untimed pass first: kernel loading, allocations, caches.
        for rep in 0..opts.repeats.max(1) + 1 {
            let mut seq = Sequence {
                tokens: prompt.clone(),
                ..Default::default()
            };
            let t = Instant::now();
            engine.prefill_sampled(&mut seq, n, Draw::GREEDY)?;
            if rep > 0 {
                best = best.min(t.elapsed().as_secs_f64());
            }
            engine.release(&mut seq);
        }
        prefill.push((n, best, n as f64 / best));
    }
    let (b1, steps) = decode_rate(&mut engine, file, 1, opts)?;
    let mut steps = steps;
    steps.sort_by(f64::total_cmp);
    let itl = steps.get(steps.len() / 2).copied().unwrap_or(f64::NAN) * 1e3;
    let mut batched = Vec::new();
    for &b in &opts.batches {
        batched.push((b, decode_rate(&mut engine, file, b, opts)?.0));
    }
    Ok(EngineBenchReport {
        device: opts.device.to_string(),
        threads,
        prompt_tokens: prefill.first().map_or(0, |p| p.0),
        prefill_tokens_per_s: prefill.first().map_or(0.0, |p| p.2),
        prefill,
        decode_steps: opts.decode_steps,
        decode_tokens_per_s_batch1: b1,
        itl_ms_batch1: itl,
        decode_batched: batched,
    })
}

/// Aggregate tokens/s of `steps` greedy decode steps over `batch`
/// sequences, and each step's seconds.
fn decode_rate(
    engine: &mut Engine,
    file: &ModelFile,
    batch: usize,
    opts: &EngineBenchOptions,
) -> Result<(f64, Vec<f64>)> {
    let prompt = prompt_tokens(file, opts.decode_prompt_tokens + batch)?;
    let mut seqs: Vec<Sequence> = (0..batch)
        .map(|i| Sequence {
            tokens: prompt[i..i + opts.decode_prompt_tokens].to_vec(),
            ..Default::default()
        })
        .collect();
    let mut next = Vec::new();
    for s in seqs.iter_mut() {
        next.push(engine.prefill_sampled(s, 512, Draw::GREEDY)?.token);
    }
    let mut step = |seqs: &mut Vec<Sequence>, next: &mut Vec<u32>| -> Result<()> {
        for (s, n) in seqs.iter_mut().zip(next.iter()) {
            s.tokens.push(*n);
        }
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        let out = engine.decode_sampled(&mut refs, vec![Draw::GREEDY; batch])?;
        *next = out.iter().map(|s| s.token).collect();
        Ok(())
    };
    // A warm-up step (a GPU captures its graph for this batch size here).
    step(&mut seqs, &mut next)?;
    let mut times = Vec::with_capacity(opts.decode_steps);
    let t = Instant::now();
    for _ in 0..opts.decode_steps {
        let s = Instant::now();
        step(&mut seqs, &mut next)?;
        times.push(s.elapsed().as_secs_f64());
    }
    let secs = t.elapsed().as_secs_f64();
    for s in seqs.iter_mut() {
        engine.release(s);
    }
    Ok(((batch * opts.decode_steps) as f64 / secs, times))
}

/// Device memory bandwidth from device-to-device copies (bytes read plus
/// written per second), for the decode step's physical limit.
pub fn device_bandwidth(device: &Device) -> Result<f64> {
    let gpu = tandem_model::cuda::Gpu::open(device, 0)?;
    let st = gpu.stream()?;
    let bytes = if gpu.is_emulated() { 64 << 20 } else { 1 << 30 };
    let a = gpu.alloc(bytes)?;
    let b = gpu.alloc(bytes)?;
    st.dtod(b.ptr, a.ptr, bytes)?;
    st.sync()?;
    let reps = 10;
    let t = Instant::now();
    for _ in 0..reps {
        st.dtod(b.ptr, a.ptr, bytes)?;
    }
    st.sync()?;
    Ok(2.0 * (bytes * reps) as f64 / t.elapsed().as_secs_f64())
}
