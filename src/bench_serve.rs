//! `tandem bench serve`: the TTFT/TPOT harness for any OpenAI-compatible
//! endpoint (Tandem, llama.cpp's server, vLLM, SGLang).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use tandem_bench::arrivals::Arrivals;
use tandem_bench::client::{Api, Endpoint};
use tandem_bench::metrics::{summarize, Slo};
use tandem_bench::report::{self, Point};
use tandem_bench::run::{self, Load, RunOptions};
use tandem_bench::workload::{self, LenDist, PromptSource, Shape, Workload};

use crate::Common;

#[derive(Args, Debug)]
pub struct BenchServeArgs {
    /// Base URL of the server (`http://host:port`; a trailing `/v1` is fine).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// `chat` (/v1/chat/completions) or `completions` (/v1/completions).
    #[arg(long, default_value = "chat")]
    api: String,
    /// Model name to send (default: the first one `GET /v1/models` lists).
    #[arg(long)]
    served_model: Option<String>,
    /// Tokenizer used to cut prompts to length: a GGUF file, a Hugging Face
    /// directory or a tokenizer.json (default: the embedded default model).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// synthetic, sharegpt, sessions or shared-prefix.
    #[arg(long, default_value = "synthetic")]
    workload: String,
    /// Prompt tokens (per turn for sessions; after the prefix for shared-prefix).
    #[arg(long, default_value_t = 256)]
    input_len: usize,
    /// fixed, uniform or normal.
    #[arg(long, default_value = "fixed")]
    input_dist: String,
    /// Half-width (uniform) or standard deviation (normal) of the input length.
    #[arg(long, default_value_t = 0.0)]
    input_spread: f64,
    /// Answer tokens asked for (`max_tokens`).
    #[arg(long, default_value_t = 64)]
    output_len: usize,
    #[arg(long, default_value = "fixed")]
    output_dist: String,
    #[arg(long, default_value_t = 0.0)]
    output_spread: f64,
    /// Send `ignore_eos` so every answer has its full length (vLLM, llama.cpp
    /// and Tandem honour it).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    ignore_eos: bool,
    /// ShareGPT-format JSON file (workload sharegpt).
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// ShareGPT: use this answer length instead of each reply's own.
    #[arg(long)]
    dataset_output_len: Option<usize>,
    /// Sessions (workload sessions; each is one job).
    #[arg(long, default_value_t = 20)]
    sessions: usize,
    #[arg(long, default_value_t = 5)]
    turns: usize,
    /// Pause between an answer and the session's next turn.
    #[arg(long, default_value_t = 0)]
    think_time_ms: u64,
    /// Shared-prefix groups and their prefix length.
    #[arg(long, default_value_t = 4)]
    groups: usize,
    #[arg(long, default_value_t = 512)]
    prefix_len: usize,
    /// Jobs in flight (closed loop); several values make a sweep.
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Jobs per second (open loop); several values make a sweep.
    #[arg(long, value_delimiter = ',')]
    rate: Vec<f64>,
    /// constant, poisson or gamma.
    #[arg(long, default_value = "poisson")]
    arrivals: String,
    /// Gamma shape: 1 is Poisson, below 1 burstier, above 1 more regular.
    #[arg(long, default_value_t = 1.0)]
    burstiness: f64,
    /// Open loop: at most this many jobs in flight (later ones wait).
    #[arg(long, default_value_t = 256)]
    max_concurrency: usize,
    /// Jobs per run (default 100; sessions: --sessions).
    #[arg(long)]
    requests: Option<usize>,
    /// Stop starting jobs after this many seconds instead of a count.
    #[arg(long)]
    duration: Option<f64>,
    /// Requests sent one by one before the run, not recorded.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A JSON object merged into every request body, e.g.
    /// '{"response_format": {"type": "json_object"}}' (structured outputs)
    /// or '{"temperature": 0}'.
    #[arg(long)]
    extra: Option<String>,
    /// SLOs for attainment and goodput (a request is good when both hold).
    #[arg(long)]
    slo_ttft_ms: Option<f64>,
    #[arg(long)]
    slo_tpot_ms: Option<f64>,
    /// Share of requests that must meet the SLOs for a rate to count toward
    /// the sweep's goodput.
    #[arg(long, default_value_t = 0.9)]
    slo_target: f64,
    /// Per-request timeout.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Every request's record and the summaries.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Directory for SVG plots (CDFs; latency and attainment vs rate for sweeps).
    #[arg(long)]
    plots: Option<PathBuf>,
    /// Name of this system in plots and tables.
    #[arg(long, default_value = "server")]
    label: String,
    #[arg(long)]
    no_progress: bool,
}

pub fn run(common: &Common, a: BenchServeArgs) -> Result<()> {
    let api = match a.api.as_str() {
        "chat" => Api::Chat,
        "completions" => Api::Completions,
        other => bail!("--api {other:?}: expected chat or completions"),
    };
    if !a.concurrency.is_empty() && !a.rate.is_empty() {
        bail!("give --concurrency or --rate, not both");
    }
    if a.concurrency.contains(&0) {
        bail!("--concurrency must be at least 1");
    }
    if a.requests == Some(0) || a.duration.is_some_and(|d| !(d > 0.0)) {
        bail!("--requests and --duration must be positive");
    }
    let slo = match (a.slo_ttft_ms, a.slo_tpot_ms) {
        (Some(t), Some(p)) if t > 0.0 && p > 0.0 => Some(Slo {
            ttft: t / 1e3,
            tpot: p / 1e3,
        }),
        (None, None) => None,
        _ => bail!("--slo-ttft-ms and --slo-tpot-ms go together and must be positive"),
    };
    let tok_path = match &a.tokenizer {
        Some(p) => p.clone(),
        None => common.model_path(&None)?,
    };
    let tokenizer = tandem_model::Tokenizer::load(&tok_path)
        .with_context(|| format!("loading the tokenizer from {}", tok_path.display()))?;
    let prompts = PromptSource::new(tokenizer)?;
    let input = LenDist::parse(&a.input_dist, a.input_len, a.input_spread)?;
    let output = LenDist::parse(&a.output_dist, a.output_len, a.output_spread)?;
    let shape = match a.workload.as_str() {
        "synthetic" => Shape::Synthetic { input, output },
        "sharegpt" => {
            let path = a
                .dataset
                .as_ref()
                .context("--workload sharegpt needs --dataset FILE")?;
            let entries = workload::load_sharegpt(path, &prompts, 1024, 2048, a.seed)?;
            Shape::ShareGpt {
                entries,
                output: a.dataset_output_len.map(LenDist::Fixed),
            }
        }
        "sessions" => {
            if api != Api::Chat {
                bail!("--workload sessions needs --api chat (turns are chat messages)");
            }
            if a.turns == 0 {
                bail!("--turns must be at least 1");
            }
            Shape::Sessions {
                turns: a.turns,
                input,
                output,
                think: Duration::from_millis(a.think_time_ms),
            }
        }
        "shared-prefix" => Shape::SharedPrefix {
            groups: a.groups.max(1),
            prefix: a.prefix_len.max(1),
            input,
            output,
        },
        other => {
            bail!("--workload {other:?}: expected synthetic, sharegpt, sessions or shared-prefix")
        }
    };
    let jobs = match (&shape, a.requests, a.duration) {
        (_, Some(n), _) => Some(n),
        (Shape::Sessions { .. }, None, None) => Some(a.sessions),
        (_, None, None) => Some(100),
        (_, None, Some(_)) => None,
    };
    let (addr, host, base) = Endpoint::parse(&a.url)?;
    let model = match &a.served_model {
        Some(m) => m.clone(),
        None => Endpoint::discover_model(addr, &host, &base, a.api_key.as_deref())?,
    };
    let mut extra = serde_json::Map::new();
    if a.ignore_eos {
        extra.insert("ignore_eos".into(), true.into());
    }
    if let Some(e) = &a.extra {
        match serde_json::from_str::<serde_json::Value>(e) {
            Ok(serde_json::Value::Object(m)) => extra.extend(m),
            _ => bail!("--extra must be a JSON object, got {e:?}"),
        }
    }
    let endpoint = Endpoint {
        addr,
        host,
        base,
        api,
        model: model.clone(),
        api_key: a.api_key.clone(),
        extra,
        timeout: Duration::from_secs(a.timeout_s.max(1)),
    };
    let loads: Vec<(String, Option<f64>, Load)> = if !a.rate.is_empty() {
        a.rate
            .iter()
            .map(|&r| {
                let arrivals = Arrivals::parse(&a.arrivals, r, a.burstiness)?;
                Ok((
                    format!("{} rate {r}/s", a.label),
                    Some(r),
                    Load::Rate {
                        arrivals,
                        max_concurrency: a.max_concurrency.max(1),
                    },
                ))
            })
            .collect::<Result<_>>()?
    } else {
        let list = if a.concurrency.is_empty() {
            vec![1]
        } else {
            a.concurrency.clone()
        };
        list.iter()
            .map(|&c| {
                (
                    format!("{} concurrency {c}", a.label),
                    None,
                    Load::Concurrency(c),
                )
            })
            .collect()
    };
    let run_tag = format!(
        "{}-{}",
        a.seed,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    let workload = Workload {
        shape,
        prompts,
        seed: a.seed,
        run_tag,
    };
    println!(
        "{} ({}) at {}: workload {}, model {model}",
        a.label, a.api, a.url, a.workload
    );
    let mut points = Vec::new();
    for (k, (label, rate, load)) in loads.into_iter().enumerate() {
        let opts = RunOptions {
            load,
            jobs,
            duration: a.duration,
            warmup: if k == 0 { a.warmup } else { 0 },
            seed: a.seed,
            progress: !a.no_progress,
            // Each point of a sweep sends prompts of its own.
            first_job: k * 1_000_000,
        };
        let result = run::run(&endpoint, &workload, &opts);
        let summary = summarize(&result.records, result.duration_s, slo);
        let point = Point {
            label,
            rate,
            summary,
            harness_cpu_share: result.harness_cpu_share,
            records: result.records,
        };
        print!("{}", report::table(&point));
        points.push(point);
    }
    if points.len() > 1 {
        if let Some(s) = slo {
            let good = points
                .iter()
                .filter(|p| p.summary.slo_attainment.is_some_and(|x| x >= a.slo_target))
                .filter_map(|p| p.rate)
                .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
            match good {
                Some(r) => println!(
                    "goodput: {r} req/s is the highest rate at which >= {:.0}% of requests met TTFT <= {:.0} ms and TPOT <= {:.0} ms",
                    a.slo_target * 100.0, s.ttft * 1e3, s.tpot * 1e3
                ),
                None => println!("goodput: no rate met the SLOs for {:.0}% of requests", a.slo_target * 100.0),
            }
        }
    }
    let config = serde_json::json!({
        "url": a.url, "api": a.api, "model": model, "workload": a.workload,
        "input_len": a.input_len, "input_dist": a.input_dist, "input_spread": a.input_spread,
        "output_len": a.output_len, "output_dist": a.output_dist, "output_spread": a.output_spread,
        "ignore_eos": a.ignore_eos, "sessions": a.sessions, "turns": a.turns,
        "think_time_ms": a.think_time_ms, "groups": a.groups, "prefix_len": a.prefix_len,
        "arrivals": a.arrivals, "burstiness": a.burstiness, "requests": jobs,
        "duration": a.duration, "warmup": a.warmup, "seed": a.seed,
        "slo_ttft_ms": a.slo_ttft_ms, "slo_tpot_ms": a.slo_tpot_ms,
    });
    if let Some(p) = &a.json {
        report::write_json(p, &config, &points)?;
        println!("wrote {}", p.display());
    }
    if let Some(p) = &a.csv {
        report::write_csv(p, &points)?;
        println!("wrote {}", p.display());
    }
    if let Some(dir) = &a.plots {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let cdf = dir.join("cdf.svg");
        report::plot_cdfs(&cdf, &points)?;
        println!("wrote {}", cdf.display());
        if points.iter().filter(|p| p.rate.is_some()).count() > 1 {
            let sweep = dir.join("sweep.svg");
            report::plot_sweep(&sweep, &[(a.label.clone(), points.clone())])?;
            println!("wrote {}", sweep.display());
        }
    }
    Ok(())
}
