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
    /// Prompt lengths whose prefill is timed (the first is compared with llama.cpp).
    #[arg(long, value_delimiter = ',', default_value = "512")]
    prompt_tokens: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    decode_steps: usize,
    /// Batch sizes for aggregate decode throughput.
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    batches: Vec<usize>,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Tensor-parallel ranks (threads sharing --threads).
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Expert parallelism (mixture-of-experts models): 1, or --tp.
    #[arg(long, default_value_t = 1)]
    ep: usize,
    /// KV storage: f32, f16 or bf16 (default: f32 on the CPU, bf16 on a GPU).
    #[arg(long)]
    kv_dtype: Option<String>,
    #[command(flatten)]
    device: crate::DeviceArgs,
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
    let on_gpu = !a.device.device.is_cpu();
    let kv_dtype = match &a.kv_dtype {
        Some(k) => tandem_model::KvDtype::parse(k)
            .ok_or_else(|| anyhow::anyhow!("--kv-dtype must be f32, f16 or bf16"))?,
        None if on_gpu => tandem_model::KvDtype::Bf16,
        None => tandem_model::KvDtype::F32,
    };
    let opts = tandem_bench::engine::EngineBenchOptions {
        prompt_tokens: a.prompt_tokens.clone(),
        decode_prompt_tokens: 128,
        decode_steps: a.decode_steps,
        batches: a.batches,
        repeats: a.repeats,
        tp: a.tp,
        ep: a.ep,
        device: a.device.device.clone(),
        gpu_dtype: a.device.gpu_dtype,
        kv_dtype,
    };
    let r = tandem_bench::engine::run(&file, threads, &opts)?;
    println!("model            {}", file.config.name);
    if a.tp > 1 || a.ep > 1 {
        println!("layout           TP {}, EP {}", a.tp, a.ep);
    }
    if on_gpu {
        for g in tandem_model::cuda::probe(&a.device.device, 1)? {
            println!(
                "device           {} ({:?} weights, {kv_dtype:?} KV)",
                g.describe(),
                a.device.gpu_dtype
            );
        }
    } else {
        println!("threads          {}", r.threads);
    }
    for (n, secs, tps) in &r.prefill {
        println!(
            "prefill {n:<5}    {tps:8.1} tok/s  ({:.2} ms, best of {})",
            secs * 1e3,
            opts.repeats
        );
    }
    println!(
        "decode batch 1   {:8.1} tok/s  ({} steps after a 128-token prompt; ITL p50 {:.3} ms)",
        r.decode_tokens_per_s_batch1, r.decode_steps, r.itl_ms_batch1
    );
    for (b, tps) in &r.decode_batched {
        println!("decode batch {b:<3} {tps:8.1} tok/s  (aggregate)");
    }
    let mut limit = None;
    if on_gpu {
        let bw = tandem_bench::engine::device_bandwidth(&a.device.device)?;
        let bytes = tandem_bench::engine::weight_params(&file)
            * match a.device.gpu_dtype {
                tandem_model::cuda::GpuDtype::Bf16 => 2,
                tandem_model::cuda::GpuDtype::F32 => 4,
            };
        let floor = bytes as f64 / bw;
        println!(
            "physical limit   {:8.1} tok/s  at batch 1: {:.1} MB of weights per step / {:.0} GB/s measured device-to-device = {:.1} us",
            1.0 / floor,
            bytes as f64 / 1e6,
            bw / 1e9,
            floor * 1e6
        );
        limit = Some(
            serde_json::json!({"weight_bytes": bytes, "bandwidth_bytes_per_s": bw, "floor_s": floor}),
        );
    }
    let reference = match &a.llama_bench {
        Some(bin) => {
            let f = tandem_bench::llamacpp::run(
                bin,
                &path,
                threads,
                r.prompt_tokens,
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
        let doc =
            serde_json::json!({ "tandem": r, "llama_cpp": reference, "physical_limit": limit });
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
    /// Pause between an answer and the session's next turn (a user reading).
    #[arg(long, default_value_t = 0)]
    think_time_ms: u64,
    /// Routing policies to compare, one cluster each.
    #[arg(long, value_delimiter = ',', default_value = "sessions,round-robin")]
    routing: Vec<String>,
    #[arg(long, default_value_t = 3)]
    decode_groups: usize,
    #[arg(long, default_value_t = 3)]
    pipelines: usize,
    /// Decode groups prefill uncached suffixes up to this long themselves;
    /// several values compare them (one cluster per routing and value).
    #[arg(long, value_delimiter = ',', default_value = "256")]
    local_prefill_max: Vec<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Median of the records' TTFTs for one turn.
fn turn_median(recs: &[tandem_bench::metrics::RequestRecord], turn: usize) -> f64 {
    tandem_bench::metrics::stats(
        recs.iter()
            .filter(|r| r.ok() && r.turn == turn)
            .filter_map(|r| r.ttft()),
    )
    .map_or(f64::NAN, |s| s.median)
}

pub fn sessions(common: &Common, a: BenchSessionsArgs) -> Result<()> {
    use tandem_bench::client::{Api, Endpoint};
    use tandem_bench::run::{Load, RunOptions};
    use tandem_bench::workload::{LenDist, PromptSource, Shape, Workload};
    let path = common.model_path(&a.model)?;
    let file = tandem_model::ModelFile::open(&path)?;
    let model = crate::node::served_name(&file);
    println!(
        "{} sessions x {} turns ({} at a time), {} new tokens per turn, {} answer tokens, think time {} ms; {} decode groups, {} prefill pipelines",
        a.sessions, a.turns, a.concurrency, a.turn_tokens, a.max_tokens, a.think_time_ms, a.decode_groups, a.pipelines
    );
    let workload = Workload {
        shape: Shape::Sessions {
            turns: a.turns,
            input: LenDist::Fixed(a.turn_tokens),
            output: LenDist::Fixed(a.max_tokens),
            think: std::time::Duration::from_millis(a.think_time_ms),
        },
        prompts: PromptSource::new(tandem_model::Tokenizer::load(&path)?)?,
        seed: a.seed,
        run_tag: format!("{}", tandem_wire::node::now_ms()),
    };
    let mut all: Vec<(String, Vec<tandem_bench::metrics::RequestRecord>)> = Vec::new();
    for lpm in &a.local_prefill_max {
        for routing in &a.routing {
            let name = if a.local_prefill_max.len() > 1 {
                format!("{routing} (local prefill <= {lpm})")
            } else {
                routing.clone()
            };
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
                lpm.to_string(),
            ];
            let cluster = crate::serve::ServeChild::start(common, &args)?;
            let ep = Endpoint {
                addr: cluster.http,
                host: cluster.http.to_string(),
                base: String::new(),
                api: Api::Chat,
                model: model.clone(),
                api_key: None,
                extra: serde_json::Map::from_iter([("ignore_eos".to_string(), true.into())]),
                timeout: std::time::Duration::from_secs(600),
            };
            let result = tandem_bench::run::run(
                &ep,
                &workload,
                &RunOptions {
                    load: Load::Concurrency(a.concurrency.max(1)),
                    jobs: Some(a.sessions),
                    duration: None,
                    warmup: 1,
                    seed: a.seed,
                    progress: true,
                    first_job: 0,
                },
            );
            drop(cluster);
            let records = result.records;
            if let Some(r) = records.iter().find(|r| r.error.is_some()) {
                anyhow::bail!(
                    "{name}: session {} turn {} failed: {}",
                    r.job,
                    r.turn + 1,
                    r.error.as_deref().unwrap_or("")
                );
            }
            println!("\n{name}:");
            println!("  turn  prompt tok  TTFT median  TTFT p90   decode had  pipeline computed");
            for t in 0..a.turns {
                let rs: Vec<_> = records.iter().filter(|r| r.turn == t).collect();
                let st = tandem_bench::metrics::stats(rs.iter().filter_map(|r| r.ttft()));
                let prompt: usize = rs.iter().map(|r| r.input_tokens).sum();
                let field = |f: fn(&tandem_bench::metrics::TandemPhases) -> u64| -> u64 {
                    rs.iter().filter_map(|r| r.tandem.as_ref()).map(f).sum()
                };
                println!(
                    "  {:>4}  {:>10.0}  {:>9.1} ms  {:>7.1} ms  {:>9.1}%  {:>16.1}%",
                    t + 1,
                    prompt as f64 / rs.len().max(1) as f64,
                    st.map_or(f64::NAN, |s| s.median) * 1e3,
                    st.map_or(f64::NAN, |s| s.p90) * 1e3,
                    100.0 * field(|p| p.cached_tokens) as f64 / prompt.max(1) as f64,
                    100.0 * field(|p| p.prefilled_tokens) as f64 / prompt.max(1) as f64,
                );
            }
            let sum = tandem_bench::metrics::summarize(&records, result.duration_s, None);
            let ms = |s: Option<tandem_bench::metrics::Stats>,
                      f: fn(&tandem_bench::metrics::Stats) -> f64| {
                s.map_or(f64::NAN, |s| f(&s) * 1e3)
            };
            println!(
                "  all turns: TPOT median {:.1} ms, p90 {:.1} ms; ITL p99 {:.1} ms, max {:.1} ms",
                ms(sum.tpot, |s| s.median),
                ms(sum.tpot, |s| s.p90),
                ms(sum.itl, |s| s.p99),
                ms(sum.itl, |s| s.max)
            );
            all.push((name, records));
        }
    }
    if a.routing.len() > 1 {
        // Each policy against the last one listed, per local-prefill value.
        for group in all.chunks(a.routing.len()) {
            let base = &group[group.len() - 1];
            println!();
            for (name, recs) in &group[..group.len() - 1] {
                for t in 0..a.turns {
                    println!(
                        "turn {}: median TTFT {name} / {} = {:.2}x",
                        t + 1,
                        base.0,
                        turn_median(recs, t) / turn_median(&base.1, t)
                    );
                }
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
