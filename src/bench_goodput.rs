//! `tandem bench goodput`: DistServe's comparison on this machine — the same
//! cores serving the same model disaggregated (a prefill stage on one core,
//! a decode group on the other), colocated (one decode group on every core,
//! prefilling locally in chunks mixed into decode steps) and, as an outside
//! reference, llama.cpp's server; chat, long-prompt and multi-turn mixes
//! under Poisson arrivals at a sweep of rates; SLO attainment and goodput.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use tandem_bench::arrivals::Arrivals;
use tandem_bench::client::{Api, Endpoint};
use tandem_bench::goodput::{wilson, Goodput, Spread, Verdict};
use tandem_bench::metrics::{summarize, Slo};
use tandem_bench::report::{self, Point};
use tandem_bench::run::{self, Load, RunOptions};
use tandem_bench::workload::{LenDist, PromptSource, Shape, Workload};

use crate::Common;

#[derive(Args)]
pub struct BenchGoodputArgs {
    /// GGUF file (default: the embedded default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// llama.cpp's `llama-server` (`bench/llamacpp.sh build` builds it);
    /// without it that system is skipped.
    #[arg(long, env = "TANDEM_LLAMA_SERVER")]
    llama_server: Option<PathBuf>,
    /// disaggregated, colocated, llamacpp.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "disaggregated,colocated,llamacpp"
    )]
    systems: Vec<String>,
    /// chat, long, sessions.
    #[arg(long, value_delimiter = ',', default_value = "chat,long,sessions")]
    workloads: Vec<String>,
    /// Request rates (jobs/s) per workload.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    chat_rates: Vec<f64>,
    #[arg(long, value_delimiter = ',', default_value = "0.05,0.1,0.2")]
    long_rates: Vec<f64>,
    #[arg(long, value_delimiter = ',', default_value = "0.3,0.6,1.2")]
    sessions_rates: Vec<f64>,
    /// Jobs per rate: chat requests, long requests, and sessions of
    /// --turns requests each.
    #[arg(long, default_value_t = 20)]
    requests: usize,
    #[arg(long, default_value_t = 6)]
    long_requests: usize,
    #[arg(long, default_value_t = 12)]
    sessions: usize,
    #[arg(long, default_value_t = 3)]
    turns: usize,
    /// SLOs per workload, "TTFT_MS:TPOT_MS", fixed before any run so that a
    /// noisy lone request cannot move them. TPOT 100 ms is ten tokens a
    /// second, faster than anyone reads.
    #[arg(long, default_value = "2000:100")]
    chat_slo: String,
    #[arg(long, default_value = "15000:100")]
    long_slo: String,
    #[arg(long, default_value = "2000:100")]
    sessions_slo: String,
    /// Instead of the fixed SLOs: multiples of the best lone-request median
    /// any system reached on the workload (--lone-requests each, measured
    /// first in the same run).
    #[arg(long)]
    slo_from_lone: bool,
    #[arg(long, default_value_t = 5)]
    lone_requests: usize,
    #[arg(long, default_value_t = 4.0)]
    ttft_scale: f64,
    #[arg(long, default_value_t = 3.0)]
    tpot_scale: f64,
    /// Colocated: prompt tokens per decode step.
    #[arg(long, default_value_t = 128)]
    colocated_chunk: usize,
    /// Share of requests that must meet both SLOs.
    #[arg(long, default_value_t = 0.9)]
    target: f64,
    /// Each rate runs once per seed (arrivals, prompts and lengths all
    /// follow it); a claim is made only where every seed agrees.
    #[arg(long, alias = "seed", value_delimiter = ',', default_value = "1,2,3")]
    seeds: Vec<u64>,
    /// Directory for JSON, CSV and plots.
    #[arg(long, default_value = "goodput")]
    out: PathBuf,
}

/// A running system under test (dropping it stops it).
enum System {
    Tandem(#[allow(dead_code)] crate::serve::ServeChild),
    Llama(Child),
}

impl Drop for System {
    fn drop(&mut self) {
        if let System::Llama(c) = self {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start(
    common: &Common,
    a: &BenchGoodputArgs,
    name: &str,
    model: &std::path::Path,
) -> Result<(System, SocketAddr)> {
    let m = model.display().to_string();
    let tandem = |extra: &[&str]| -> Result<(System, SocketAddr)> {
        let mut args: Vec<String> = vec![
            "--model".into(),
            m.clone(),
            "--kv-blocks".into(),
            "2048".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let c = crate::serve::ServeChild::start(common, &args)?;
        let addr = c.http;
        Ok((System::Tandem(c), addr))
    };
    match name {
        // One core each: the prefill stage on CPU 0, the decode group on CPU 1.
        "disaggregated" => tandem(&[
            "--pipelines",
            "1",
            "--pp",
            "1",
            "--pin-stages",
            "--decode-groups",
            "1",
            "--decode-threads",
            "1",
            "--decode-cpus",
            "1",
            "--local-prefill-max",
            "0",
        ]),
        // One decode group on both cores, every prefill local and chunked.
        "colocated" => {
            let chunk = a.colocated_chunk.to_string();
            tandem(&[
                "--pipelines",
                "0",
                "--decode-groups",
                "1",
                "--decode-threads",
                "2",
                "--decode-cpus",
                "0-1",
                "--local-prefill-chunk",
                &chunk,
            ])
        }
        "llamacpp" => {
            let bin = a
                .llama_server
                .as_ref()
                .context("--llama-server is not set")?;
            let port = free_port()?;
            let child = Command::new("taskset")
                .args(["-c", "0-1"])
                .arg(bin)
                .arg("-m")
                .arg(model)
                .args([
                    "-t",
                    "2",
                    "-c",
                    "16384",
                    "-np",
                    "4",
                    "--port",
                    &port.to_string(),
                    "--host",
                    "127.0.0.1",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let t0 = Instant::now();
            loop {
                let ok = tandem_bench::http::get(
                    addr,
                    &addr.to_string(),
                    "/health",
                    &[],
                    Duration::from_secs(2),
                )
                .is_ok_and(|r| r.status == 200);
                if ok {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(120) {
                    bail!("llama-server did not become healthy in 120 s");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok((System::Llama(child), addr))
        }
        other => bail!("unknown system {other:?} (disaggregated, colocated, llamacpp)"),
    }
}

fn parse_slo(s: &str) -> Result<Slo> {
    let (t, p) = s.split_once(':').context("an SLO is TTFT_MS:TPOT_MS")?;
    let (t, p): (f64, f64) = (t.parse()?, p.parse()?);
    if !(t > 0.0 && p > 0.0) {
        bail!("SLO {s}: both bounds must be positive");
    }
    Ok(Slo {
        ttft: t / 1e3,
        tpot: p / 1e3,
    })
}

struct Mix {
    name: &'static str,
    shape: Shape,
    rates: Vec<f64>,
    jobs: usize,
    slo: Slo,
}

/// One system's sweep of one mix: per seed, a point per rate.
type Sweeps = Vec<(u64, Vec<Point>)>;

/// The goodput each seed's sweep gives.
fn goodputs(sweeps: &Sweeps, target: f64) -> Vec<Goodput> {
    sweeps
        .iter()
        .filter_map(|(_, pts)| {
            let att: Vec<(f64, f64)> = pts
                .iter()
                .map(|p| {
                    (
                        p.rate.unwrap_or(0.0),
                        p.summary.slo_attainment.unwrap_or(0.0),
                    )
                })
                .collect();
            Goodput::of(&att, target)
        })
        .collect()
}

/// Per rate: attainment's spread over seeds, and every seed's requests
/// pooled into one point (for the plots).
fn pooled(sweeps: &Sweeps, label: &str, slo: Slo) -> (Vec<Spread>, Vec<Point>) {
    let mut rates: Vec<f64> = sweeps
        .iter()
        .flat_map(|(_, pts)| pts.iter().filter_map(|p| p.rate))
        .collect();
    rates.sort_by(f64::total_cmp);
    rates.dedup();
    let mut spreads = Vec::new();
    let mut points = Vec::new();
    for rate in rates {
        let at: Vec<&Point> = sweeps
            .iter()
            .flat_map(|(_, pts)| pts.iter().filter(|p| p.rate == Some(rate)))
            .collect();
        let att = |p: &&Point| p.summary.slo_attainment.unwrap_or(0.0);
        let records: Vec<_> = at.iter().flat_map(|p| p.records.iter().cloned()).collect();
        spreads.push(Spread {
            rate,
            min: at.iter().map(att).fold(f64::INFINITY, f64::min),
            max: at.iter().map(att).fold(0.0, f64::max),
            good: records.iter().filter(|r| slo.met(r)).count(),
            requests: records.len(),
        });
        let duration: f64 = at.iter().map(|p| p.summary.duration_s).sum();
        points.push(Point {
            label: format!("{label} {rate}/s, {} seeds", at.len()),
            rate: Some(rate),
            summary: summarize(&records, duration, Some(slo)),
            harness_cpu_share: at.iter().map(|p| p.harness_cpu_share).fold(0.0, f64::max),
            records,
        });
    }
    (spreads, points)
}

pub fn run(common: &Common, a: BenchGoodputArgs) -> Result<()> {
    if a.seeds.is_empty() {
        bail!("--seeds: give at least one seed");
    }
    if !(a.target > 0.0 && a.target <= 1.0) {
        bail!("--target {} is not a share in (0, 1]", a.target);
    }
    let model = common.model_path(&a.model)?;
    let tok = || -> Result<PromptSource> {
        Ok(PromptSource::new(tandem_model::Tokenizer::load(&model)?)?)
    };
    let mut mixes = Vec::new();
    for w in &a.workloads {
        mixes.push(match w.as_str() {
            // Short prompts, medium answers.
            "chat" => Mix {
                name: "chat",
                shape: Shape::Synthetic {
                    input: LenDist::Uniform { lo: 64, hi: 256 },
                    output: LenDist::Uniform { lo: 64, hi: 192 },
                },
                rates: a.chat_rates.clone(),
                jobs: a.requests,
                slo: parse_slo(&a.chat_slo).context("--chat-slo")?,
            },
            // RAG-like: 2,000-token prompts, short answers.
            "long" => Mix {
                name: "long",
                shape: Shape::Synthetic {
                    input: LenDist::Fixed(2000),
                    output: LenDist::Fixed(32),
                },
                rates: a.long_rates.clone(),
                jobs: a.long_requests,
                slo: parse_slo(&a.long_slo).context("--long-slo")?,
            },
            // Conversations: each turn adds ~150 tokens and asks for ~64.
            "sessions" => Mix {
                name: "sessions",
                shape: Shape::Sessions {
                    turns: a.turns,
                    input: LenDist::Uniform { lo: 100, hi: 200 },
                    output: LenDist::Uniform { lo: 32, hi: 96 },
                    think: Duration::from_millis(1000),
                },
                rates: a.sessions_rates.clone(),
                jobs: a.sessions,
                slo: parse_slo(&a.sessions_slo).context("--sessions-slo")?,
            },
            other => bail!("unknown workload {other:?} (chat, long, sessions)"),
        });
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    // results[mix][system] = per seed, the points over the rate sweep.
    let mut results: Vec<Vec<(String, Sweeps)>> = mixes.iter().map(|_| Vec::new()).collect();
    let mut lone: Vec<(String, String, f64, f64)> = Vec::new();
    for sys in &a.systems {
        if sys == "llamacpp" && a.llama_server.is_none() {
            println!("skipping llamacpp: no --llama-server (bench/llamacpp.sh build makes one)");
            continue;
        }
        let (system, addr) = start(common, &a, sys, &model)?;
        let api_model = match &system {
            System::Tandem(_) => crate::node::served_name(&tandem_model::ModelFile::open(&model)?),
            System::Llama(_) => "default".into(),
        };
        let ep = Endpoint {
            addr,
            host: addr.to_string(),
            base: String::new(),
            api: Api::Chat,
            model: api_model,
            api_key: None,
            extra: serde_json::Map::from_iter([("ignore_eos".to_string(), true.into())]),
            timeout: Duration::from_secs(900),
        };
        for (mi, mix) in mixes.iter().enumerate() {
            let workload = |seed: u64| -> Result<Workload> {
                Ok(Workload {
                    shape: mix.shape.clone(),
                    prompts: tok()?,
                    seed,
                    run_tag: format!("{sys}-{}", tandem_wire::node::now_ms()),
                })
            };
            // Lone requests first: what an idle server gives, for reading
            // the sweep (and the SLOs, with --slo-from-lone).
            let alone = run::run(
                &ep,
                &workload(a.seeds[0])?,
                &RunOptions {
                    load: Load::Concurrency(1),
                    jobs: Some(a.lone_requests.max(1)),
                    duration: None,
                    warmup: 1,
                    seed: a.seeds[0],
                    progress: false,
                    first_job: 900_000_000,
                },
            );
            let s = summarize(&alone.records, alone.duration_s, None);
            let (t, p) = (
                s.ttft.map_or(f64::NAN, |x| x.median),
                s.tpot.map_or(f64::NAN, |x| x.median),
            );
            println!(
                "{sys} / {}: lone requests (median of {}): TTFT {:.0} ms, TPOT {:.1} ms",
                mix.name,
                s.completed,
                t * 1e3,
                p * 1e3
            );
            lone.push((sys.clone(), mix.name.to_string(), t, p));
            let mut sweeps = Vec::new();
            for &seed in &a.seeds {
                let workload = workload(seed)?;
                let mut points = Vec::new();
                for (k, &rate) in mix.rates.iter().enumerate() {
                    let opts = RunOptions {
                        load: Load::Rate {
                            arrivals: Arrivals::Poisson { rate },
                            max_concurrency: 256,
                        },
                        jobs: Some(mix.jobs),
                        duration: None,
                        warmup: 0,
                        seed,
                        progress: true,
                        // Fresh prompts per rate: the servers cache prefixes.
                        first_job: k * 1_000_000,
                    };
                    let r = run::run(&ep, &workload, &opts);
                    // Lone-derived SLOs are known only at the end.
                    let live = (!a.slo_from_lone).then_some(mix.slo);
                    let summary = summarize(&r.records, r.duration_s, live);
                    let p = Point {
                        label: format!("{sys} {} {rate}/s seed {seed}", mix.name),
                        rate: Some(rate),
                        summary,
                        harness_cpu_share: r.harness_cpu_share,
                        records: r.records,
                    };
                    print!("{}", report::table(&p));
                    points.push(p);
                }
                sweeps.push((seed, points));
            }
            results[mi].push((sys.clone(), sweeps));
        }
        drop(system);
    }
    // With --slo-from-lone: a multiple of the best lone median any system had.
    let mut slos = Vec::new();
    for (mix, res) in mixes.iter().zip(results.iter_mut()) {
        let best = |f: fn(&(String, String, f64, f64)) -> f64| {
            lone.iter()
                .filter(|l| l.1 == mix.name)
                .map(f)
                .filter(|x| x.is_finite())
                .fold(f64::INFINITY, f64::min)
        };
        let slo = if a.slo_from_lone {
            Slo {
                ttft: a.ttft_scale * best(|l| l.2),
                tpot: a.tpot_scale * best(|l| l.3),
            }
        } else {
            mix.slo
        };
        for (_, sweeps) in res.iter_mut() {
            for p in sweeps.iter_mut().flat_map(|(_, pts)| pts.iter_mut()) {
                p.summary = summarize(&p.records, p.summary.duration_s, Some(slo));
            }
        }
        slos.push(slo);
    }
    println!(
        "\ngoodput: per seed, the highest rate at which it and every lower rate had >= {:.0}% of requests meet both SLOs; seeds {:?}",
        a.target * 100.0,
        a.seeds
    );
    let mut doc = serde_json::json!({
        "target": a.target, "seeds": a.seeds, "slo_from_lone": a.slo_from_lone,
        "ttft_scale": a.ttft_scale, "tpot_scale": a.tpot_scale,
        "lone": lone.iter().map(|(s, m, t, p)| serde_json::json!({"system": s, "mix": m, "ttft_s": t, "tpot_s": p})).collect::<Vec<_>>(),
        "mixes": {},
    });
    for ((mix, res), slo) in mixes.iter().zip(&results).zip(&slos) {
        println!(
            "\n{}: SLO TTFT <= {:.0} ms, TPOT <= {:.0} ms{}",
            mix.name,
            slo.ttft * 1e3,
            slo.tpot * 1e3,
            if a.slo_from_lone {
                " (from lone requests)"
            } else {
                " (fixed)"
            }
        );
        let mut series = Vec::new();
        let mut per_system = serde_json::Map::new();
        let mut goodput_of = Vec::new();
        for (sys, sweeps) in res {
            let (spreads, points) = pooled(sweeps, &format!("{sys} {}", mix.name), *slo);
            let g = goodputs(sweeps, a.target);
            println!(
                "  {sys:<14} goodput per seed: {}",
                g.iter()
                    .map(|g| g.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for (s, p) in spreads.iter().zip(&points) {
                let st = &p.summary;
                let q = |x: &Option<tandem_bench::metrics::Stats>,
                         f: fn(&tandem_bench::metrics::Stats) -> f64| {
                    x.as_ref().map_or(f64::NAN, |s| f(s) * 1e3)
                };
                println!(
                    "    {:>5}/s: attainment {s}, TTFT p50 {:>6.0} p90 {:>6.0} ms, TPOT p50 {:>5.1} p90 {:>5.1} ms, {}/{} ok",
                    s.rate,
                    q(&st.ttft, |s| s.median),
                    q(&st.ttft, |s| s.p90),
                    q(&st.tpot, |s| s.median),
                    q(&st.tpot, |s| s.p90),
                    st.completed,
                    st.requests
                );
            }
            per_system.insert(
                sys.clone(),
                serde_json::json!({
                    "goodput_per_seed": g.iter().map(|g| g.to_string()).collect::<Vec<_>>(),
                    "points": spreads.iter().zip(&points).map(|(s, p)| serde_json::json!({
                        "rate": s.rate, "attainment_pooled": s.pooled(),
                        "attainment_min": s.min, "attainment_max": s.max,
                        "attainment_ci95": wilson(s.good, s.requests),
                        "summary": p.summary,
                    })).collect::<Vec<_>>(),
                    "per_seed": sweeps.iter().map(|(seed, pts)| serde_json::json!({
                        "seed": seed,
                        "attainment": pts.iter().map(|p| (p.rate, p.summary.slo_attainment)).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                }),
            );
            goodput_of.push((sys.clone(), g));
            series.push((sys.clone(), points));
        }
        let mut verdicts = serde_json::Map::new();
        for (i, (x, gx)) in goodput_of.iter().enumerate() {
            for (y, gy) in &goodput_of[i + 1..] {
                if let Some(v) = Verdict::of(gx, gy) {
                    println!("  {x} against {y}: goodput {v}");
                    verdicts.insert(format!("{x} vs {y}"), v.to_string().into());
                }
            }
        }
        let plot = a.out.join(format!("{}.svg", mix.name));
        report::plot_sweep(&plot, &series)?;
        println!("  wrote {}", plot.display());
        let all: Vec<Point> = res
            .iter()
            .flat_map(|(_, s)| s.iter().flat_map(|(_, p)| p.iter().cloned()))
            .collect();
        report::write_csv(&a.out.join(format!("{}.csv", mix.name)), &all)?;
        doc["mixes"][mix.name] = serde_json::json!({
            "slo_ttft_s": slo.ttft, "slo_tpot_s": slo.tpot,
            "systems": per_system, "verdicts": verdicts,
        });
    }
    let path = a.out.join("goodput.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
    println!(
        "wrote {} (per-request records in the CSV files)",
        path.display()
    );
    Ok(())
}
