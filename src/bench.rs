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

#[derive(Args)]
pub struct BenchTtftArgs {
    /// GGUF file or Hugging Face directory (default: the embedded default model).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    prompt_tokens: usize,
    /// Measured requests per layout (after one warm-up).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Prefill pipeline depths to measure, one cluster each (e.g. --pp 1 --pp 2).
    #[arg(long, default_values_t = vec![1])]
    pp: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    tp: usize,
    #[arg(long, default_value_t = 256)]
    chunk: usize,
    /// Pin prefill stage i to CPU i with one thread each.
    #[arg(long)]
    pin_stages: bool,
    /// Also time the single-process reference (`tandem generate`'s prefill) in this process.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    reference: bool,
    #[arg(long)]
    json: Option<PathBuf>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// One TTFT measurement: a prompt of exact token ids, one generated token.
struct Ttft {
    ttft: f64,
    kv_bytes: u64,
    kv_transfer: f64,
    prefill_compute: f64,
}

fn ttft_request(addr: std::net::SocketAddr, model: &str, prompt: &[u32]) -> Result<Ttft> {
    let body = serde_json::json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": 1,
        "temperature": 0,
        "stream": true,
        "ignore_eos": true,
    })
    .to_string();
    let r = tandem_bench::http::post(
        addr,
        "/v1/completions",
        &body,
        std::time::Duration::from_secs(600),
    )?;
    if r.status != 200 {
        anyhow::bail!("status {}: {}", r.status, r.body);
    }
    let first = r
        .events
        .first()
        .ok_or_else(|| anyhow::anyhow!("no events"))?
        .0
        .as_secs_f64();
    let t = r
        .events
        .iter()
        .filter_map(|(_, d)| serde_json::from_str::<serde_json::Value>(d).ok())
        .find_map(|v| v.get("tandem").cloned())
        .ok_or_else(|| anyhow::anyhow!("no accounting in the stream"))?;
    let us = |k: &str| t[k].as_u64().unwrap_or(0) as f64 / 1e6;
    Ok(Ttft {
        ttft: first,
        kv_bytes: t["kv_bytes"].as_u64().unwrap_or(0),
        kv_transfer: us("kv_transfer_us"),
        prefill_compute: us("prefill_compute_us"),
    })
}

/// Prefill of `prompt` in this process, as `tandem generate` runs it.
fn reference_prefill(
    engine: &mut tandem_model::Engine,
    prompt: &[u32],
    chunk: usize,
) -> Result<f64> {
    let mut seq = tandem_model::Sequence {
        tokens: prompt.to_vec(),
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let r = engine.prefill(&mut seq, chunk);
    let secs = t0.elapsed().as_secs_f64();
    engine.release(&mut seq);
    r?;
    Ok(secs)
}

pub fn ttft(common: &Common, threads: usize, a: BenchTtftArgs) -> Result<()> {
    let path = common.model_path(&a.model)?;
    let file = tandem_model::ModelFile::open(&path)?;
    let model = crate::node::served_name(&file);
    // Real text, repeated to the length wanted; each run starts at another
    // offset so no two prompts are the same.
    let seed = file.tokenizer.encode(
        "The history of the city begins with a small settlement on the river, where traders met to exchange grain, salt and cloth. Over centuries it grew into a market town, then a port, and finally a capital whose libraries, bridges and workshops drew people from every region. ",
    )?;
    let prompt_at = |k: usize| -> Vec<u32> {
        (0..a.prompt_tokens)
            .map(|i| seed[(i + k * 7) % seed.len()])
            .collect()
    };
    let mut engine = if a.reference {
        Some(tandem_model::Engine::new(
            &file,
            &tandem_model::EngineOptions {
                kv_blocks: a.prompt_tokens.div_ceil(16) + 2,
                threads,
                ..Default::default()
            },
        )?)
    } else {
        None
    };
    let mut report = Vec::new();
    let mut reference_times = Vec::new();
    println!(
        "TTFT of a {}-token prompt (1 generated token), {} runs per layout, chunk {}",
        a.prompt_tokens, a.runs, a.chunk
    );
    for &pp in &a.pp {
        let mut args = vec![
            "--pp".to_string(),
            pp.to_string(),
            "--tp".into(),
            a.tp.to_string(),
            "--chunk".into(),
            a.chunk.to_string(),
            "--model".into(),
            path.display().to_string(),
        ];
        if a.pin_stages {
            args.push("--pin-stages".into());
        }
        let cluster = crate::serve::ServeChild::start(common, &args)?;
        ttft_request(cluster.http, &model, &prompt_at(1000))?; // warm-up
        let mut ttfts = Vec::new();
        let mut transfer = Vec::new();
        let mut compute = Vec::new();
        let mut bytes = 0;
        for k in 0..a.runs {
            // Alternate with the reference so both see the same machine.
            if let Some(e) = engine.as_mut() {
                reference_times.push(reference_prefill(e, &prompt_at(k), a.chunk)?);
            }
            let t = ttft_request(cluster.http, &model, &prompt_at(k))?;
            ttfts.push(t.ttft);
            transfer.push(t.kv_transfer);
            compute.push(t.prefill_compute);
            bytes = t.kv_bytes;
        }
        drop(cluster);
        let m = median(&mut ttfts);
        let c = median(&mut compute);
        let x = median(&mut transfer);
        println!(
            "cluster PP {pp} TP {}{}: TTFT median {:7.1} ms (min {:.1}, max {:.1}); last stage's compute {:.1} ms; KV {:.1} MB per request, prefill request to verified KV {:.1} ms (after the last stage's compute: {:.1} ms)",
            a.tp,
            if a.pin_stages { " (stages pinned)" } else { "" },
            m * 1e3,
            ttfts.first().copied().unwrap_or(f64::NAN) * 1e3,
            ttfts.last().copied().unwrap_or(f64::NAN) * 1e3,
            c * 1e3,
            bytes as f64 / 1e6,
            x * 1e3,
            (x - c).max(0.0) * 1e3
        );
        report.push(serde_json::json!({
            "pp": pp, "tp": a.tp, "pinned": a.pin_stages, "ttft_median_s": m,
            "ttft_s": ttfts, "prefill_compute_median_s": c, "kv_bytes": bytes,
            "kv_request_to_verified_median_s": x,
        }));
    }
    let reference = median(&mut reference_times);
    if engine.is_some() {
        println!(
            "reference (tandem generate's prefill, this process, {threads} threads): median {:7.1} ms",
            reference * 1e3
        );
        for r in &report {
            let m = r["ttft_median_s"].as_f64().unwrap_or(f64::NAN);
            println!(
                "  PP {}: cluster TTFT / reference prefill = {:.2}x",
                r["pp"],
                m / reference
            );
        }
    }
    if report.len() > 1 {
        let first = report[0]["ttft_median_s"].as_f64().unwrap_or(f64::NAN);
        for r in &report[1..] {
            let m = r["ttft_median_s"].as_f64().unwrap_or(f64::NAN);
            println!(
                "  PP {} vs PP {}: TTFT speed-up {:.2}x",
                r["pp"],
                report[0]["pp"],
                first / m
            );
        }
    }
    if let Some(p) = a.json {
        let doc = serde_json::json!({ "prompt_tokens": a.prompt_tokens, "layouts": report, "reference_prefill_median_s": reference });
        std::fs::write(&p, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

#[derive(Args)]
pub struct BenchSessionsArgs {
    /// GGUF file or Hugging Face directory (default: the embedded default model).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 20)]
    sessions: usize,
    #[arg(long, default_value_t = 5)]
    turns: usize,
    /// Sessions in flight at once (each runs its turns in order).
    #[arg(long, default_value_t = 3)]
    concurrency: usize,
    /// Tokens of new user text per turn (the context grows by this plus the answer).
    #[arg(long, default_value_t = 150)]
    turn_tokens: usize,
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Routing policies to compare, one cluster each.
    #[arg(long, value_delimiter = ',', default_value = "sessions,round-robin")]
    routing: Vec<String>,
    #[arg(long, default_value_t = 3)]
    decode_groups: usize,
    #[arg(long, default_value_t = 3)]
    pipelines: usize,
    /// Decode groups prefill uncached suffixes up to this long themselves.
    #[arg(long, default_value_t = 0)]
    local_prefill_max: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One turn's measurements.
#[derive(Debug, Clone, serde::Serialize)]
struct TurnRecord {
    session: usize,
    turn: usize,
    ttft_s: f64,
    prompt_tokens: u64,
    cached_tokens: u64,
    prefilled_tokens: u64,
    decode: String,
}

fn session_turn(
    addr: std::net::SocketAddr,
    model: &str,
    session: &str,
    messages: &[serde_json::Value],
    max_tokens: usize,
) -> Result<(TurnRecord, String)> {
    let body = serde_json::json!({
        "model": model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let r = tandem_bench::http::post_with(
        addr,
        "/v1/chat/completions",
        &body,
        &[("X-Session-Id", session)],
        std::time::Duration::from_secs(600),
    )?;
    if r.status != 200 {
        anyhow::bail!("status {}: {}", r.status, r.body);
    }
    let mut text = String::new();
    let mut ttft = None;
    let mut rec = TurnRecord {
        session: 0,
        turn: 0,
        ttft_s: 0.0,
        prompt_tokens: 0,
        cached_tokens: 0,
        prefilled_tokens: 0,
        decode: String::new(),
    };
    for (t, data) in &r.events {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
            continue;
        };
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            if !c.is_empty() && ttft.is_none() {
                ttft = Some(t.as_secs_f64());
            }
            text.push_str(c);
        }
        if let Some(a) = v.get("tandem") {
            rec.cached_tokens = a["cached_tokens"].as_u64().unwrap_or(0);
            rec.prefilled_tokens = a["prefilled_tokens"].as_u64().unwrap_or(0);
            rec.decode = a["nodes"][0].as_str().unwrap_or("").to_string();
            ttft.get_or_insert(t.as_secs_f64());
        }
        if let Some(p) = v["usage"]["prompt_tokens"].as_u64() {
            rec.prompt_tokens = p;
        }
    }
    rec.ttft_s = ttft.ok_or_else(|| anyhow::anyhow!("no tokens in the stream"))?;
    Ok((rec, text))
}

pub fn sessions(common: &Common, a: BenchSessionsArgs) -> Result<()> {
    let path = common.model_path(&a.model)?;
    let file = tandem_model::ModelFile::open(&path)?;
    let model = crate::node::served_name(&file);
    // Real text, cut into per-turn pieces of `turn_tokens` tokens; every
    // session and turn starts at its own offset, so sessions share nothing
    // but the chat template's system prompt.
    let corpus = file.tokenizer.encode(
        "Rivers shape the land they cross. Over thousands of years a river carves valleys, deposits silt on its floodplain, and builds deltas where it meets the sea. Towns grow along its banks because water brings trade, food and power. Engineers later straighten channels, raise levees and build dams, trading floods for electricity and irrigation, and ecologists study what those changes do to fish, birds and the wetlands that once filtered the water. ",
    )?;
    let piece = |s: usize, t: usize| -> String {
        let start = (s * 131 + t * 37) % corpus.len();
        let ids: Vec<u32> = (0..a.turn_tokens)
            .map(|i| corpus[(start + i) % corpus.len()])
            .collect();
        format!(
            "Read this and answer briefly: {}",
            file.tokenizer.decode(&ids)
        )
    };
    println!(
        "{} sessions x {} turns ({} at a time), ~{} new tokens per turn, {} answer tokens; {} decode groups, {} prefill pipelines",
        a.sessions, a.turns, a.concurrency, a.turn_tokens, a.max_tokens, a.decode_groups, a.pipelines
    );
    let mut all: Vec<(String, Vec<TurnRecord>)> = Vec::new();
    for routing in &a.routing {
        let args = vec![
            "--model".to_string(),
            path.display().to_string(),
            "--decode-groups".into(),
            a.decode_groups.to_string(),
            "--pipelines".into(),
            a.pipelines.to_string(),
            "--routing".into(),
            routing.clone(),
            "--kv-blocks".into(),
            "1024".into(),
            "--local-prefill-max".into(),
            a.local_prefill_max.to_string(),
        ];
        let cluster = crate::serve::ServeChild::start(common, &args)?;
        let addr = cluster.http;
        // Warm-up, not measured.
        session_turn(
            addr,
            &model,
            "warm-up",
            &[serde_json::json!({"role": "user", "content": "Hello"})],
            4,
        )?;
        let next = std::sync::atomic::AtomicUsize::new(0);
        let records = std::sync::Mutex::new(Vec::new());
        let failure = std::sync::Mutex::new(None::<String>);
        std::thread::scope(|scope| {
            for _ in 0..a.concurrency.max(1) {
                scope.spawn(|| loop {
                    let s = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if s >= a.sessions {
                        return;
                    }
                    let id = format!("bench-{routing}-{s}");
                    let mut messages = Vec::new();
                    for t in 0..a.turns {
                        messages.push(serde_json::json!({"role": "user", "content": piece(s, t)}));
                        match session_turn(addr, &model, &id, &messages, a.max_tokens) {
                            Ok((mut rec, answer)) => {
                                rec.session = s;
                                rec.turn = t + 1;
                                records.lock().expect("records").push(rec);
                                messages.push(
                                    serde_json::json!({"role": "assistant", "content": answer}),
                                );
                            }
                            Err(e) => {
                                *failure.lock().expect("failure") =
                                    Some(format!("session {s} turn {}: {e}", t + 1));
                                return;
                            }
                        }
                    }
                });
            }
        });
        drop(cluster);
        if let Some(f) = failure.into_inner().expect("failure") {
            anyhow::bail!("routing {routing}: {f}");
        }
        let records = records.into_inner().expect("records");
        println!("\nrouting {routing}:");
        println!("  turn  prompt tok  TTFT median  TTFT p90   decode had  pipeline computed");
        for t in 1..=a.turns {
            let rs: Vec<&TurnRecord> = records.iter().filter(|r| r.turn == t).collect();
            let mut ttft: Vec<f64> = rs.iter().map(|r| r.ttft_s).collect();
            ttft.sort_by(f64::total_cmp);
            let p90 = ttft[((ttft.len() as f64 * 0.9).ceil() as usize)
                .saturating_sub(1)
                .min(ttft.len() - 1)];
            let prompt: u64 = rs.iter().map(|r| r.prompt_tokens).sum();
            let cached: u64 = rs.iter().map(|r| r.cached_tokens).sum();
            let computed: u64 = rs.iter().map(|r| r.prefilled_tokens).sum();
            println!(
                "  {t:>4}  {:>10.0}  {:>9.1} ms  {:>7.1} ms  {:>9.1}%  {:>16.1}%",
                prompt as f64 / rs.len() as f64,
                median(&mut ttft) * 1e3,
                p90 * 1e3,
                100.0 * cached as f64 / prompt.max(1) as f64,
                100.0 * computed as f64 / prompt.max(1) as f64,
            );
        }
        all.push((routing.clone(), records));
    }
    if all.len() > 1 {
        let turn_median = |recs: &[TurnRecord], t: usize| {
            let mut v: Vec<f64> = recs
                .iter()
                .filter(|r| r.turn == t)
                .map(|r| r.ttft_s)
                .collect();
            median(&mut v)
        };
        let base = &all[all.len() - 1];
        println!();
        for (routing, recs) in &all[..all.len() - 1] {
            for t in 1..=a.turns {
                println!(
                    "turn {t}: median TTFT {routing} / {} = {:.2}x",
                    base.0,
                    turn_median(recs, t) / turn_median(&base.1, t)
                );
            }
        }
    }
    if let Some(p) = a.json {
        let doc: serde_json::Value = all
            .iter()
            .map(|(r, recs)| (r.clone(), serde_json::json!(recs)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        std::fs::write(&p, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
