//! The `tandem` binary: parses arguments and calls into the crates.

mod bench;
mod bench_goodput;
mod bench_kv;
mod bench_serve;
mod cluster;
mod generate;
mod gpu_check;
mod node;
mod plan;
mod serve;
mod telemetry;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Disaggregated LLM serving: gateway, pipeline-parallel prefill, tensor-parallel decode"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
pub struct Common {
    /// Cache directory for the default model.
    #[arg(long, global = true, env = "TANDEM_HOME")]
    home: Option<PathBuf>,
    /// Compute threads (default: every core).
    #[arg(long, global = true, env = "TANDEM_THREADS")]
    threads: Option<usize>,
    /// Python interpreter used to fetch the default model with pip.
    #[arg(long, global = true, env = "TANDEM_PYTHON", default_value = "python3")]
    python: String,
    /// Log lines as text or JSON (one object per line, with the request's
    /// span fields such as `request_id`).
    #[arg(
        long,
        global = true,
        env = "TANDEM_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Export traces to this OTLP/HTTP collector (base URL such as
    /// http://127.0.0.1:4318; OTLP/JSON to its /v1/traces). Off when unset.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Where a process computes.
#[derive(Args, Clone, Debug)]
pub struct DeviceArgs {
    /// cpu, cuda (tensor-parallel rank r on GPU r), cuda:N (every rank on
    /// GPU N) or cuda:N,M,... (one GPU per rank). CUDA libraries are found
    /// through LD_LIBRARY_PATH (see the README).
    #[arg(long, default_value = "cpu")]
    pub device: tandem_model::Device,
    /// Weight precision on a GPU: bf16 or f32.
    #[arg(long, default_value = "bf16", value_parser = parse_gpu_dtype)]
    pub gpu_dtype: tandem_model::cuda::GpuDtype,
}

pub fn parse_gpu_dtype(s: &str) -> std::result::Result<tandem_model::cuda::GpuDtype, String> {
    tandem_model::cuda::GpuDtype::parse(s).ok_or_else(|| format!("{s:?} is not bf16 or f32"))
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text in one process (the reference path every layout is compared with).
    Generate(generate::GenerateArgs),
    /// Download the default model (SmolLM2-135M-Instruct) into the cache,
    /// unless it is there already (`--force` replaces it).
    FetchModel {
        #[arg(long)]
        force: bool,
    },
    /// Write a model's tokenizer as a Hugging Face tokenizer directory
    /// (tokenizer.json, tokenizer_config.json), for tools such as AIPerf.
    ExportTokenizer(ExportTokenizerArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Create the cluster CA and a certificate for every node of a cluster file.
    Certs(cluster::CertsArgs),
    /// Validate a cluster file against its model and print the layout.
    CheckConfig(cluster::CheckArgs),
    /// Pick PP/TP per role for a model and hardware, with the memory arithmetic.
    Plan(plan::PlanArgs),
    /// Run a whole cluster on this machine: gateway, prefill pipeline, decode group.
    Serve(serve::ServeArgs),
    /// Run the gateway of a cluster file.
    Gateway(node::RoleArgs),
    /// Run one prefill stage of a cluster file.
    Prefill(node::RoleArgs),
    /// Run one decode group of a cluster file.
    Decode(node::RoleArgs),
    /// Check the GPU engine against the CPU engine and print a pass/fail
    /// line per check (see bench/gpu-check.sh).
    GpuCheck(gpu_check::GpuCheckArgs),
    /// Write a model as a Hugging Face directory (config.json, bf16
    /// safetensors, tokenizer), e.g. for a PyTorch reference run.
    ExportHf(ExportHfArgs),
}

#[derive(Args)]
struct ExportHfArgs {
    /// GGUF file or Hugging Face directory (default: the embedded default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Directory to write (created if missing).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct ExportTokenizerArgs {
    /// GGUF file or Hugging Face directory (default: the embedded default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Directory to write (created if missing).
    #[arg(long)]
    out: PathBuf,
}

fn export_tokenizer(common: &Common, a: ExportTokenizerArgs) -> Result<()> {
    let path = common.model_path(&a.model)?;
    let file = tandem_model::ModelFile::open(&path)?;
    tandem_model::export::write_tokenizer(&file, &a.out)?;
    println!("{}", a.out.display());
    Ok(())
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Prefill and decode throughput of the model engine.
    Engine(bench::BenchEngineArgs),
    /// Time to first token through a local cluster, beside the single-process prefill.
    Ttft(bench::BenchTtftArgs),
    /// The serving harness: TTFT, TPOT, ITL, throughput and goodput of any
    /// OpenAI-compatible endpoint under a workload and load.
    Serve(bench_serve::BenchServeArgs),
    /// Disaggregated vs colocated vs llama.cpp's server on the same cores:
    /// SLO attainment and goodput over a sweep of request rates.
    Goodput(bench_goodput::BenchGoodputArgs),
    /// Multi-turn sessions: TTFT per turn under each routing policy, in one run.
    Sessions(bench::BenchSessionsArgs),
    /// KV transfer between two processes over UCX (shared memory, TCP) and
    /// QUIC, beside ucx_perftest and plain quinn.
    Kv(bench_kv::BenchKvArgs),
}

impl Common {
    pub fn cache_dir(&self) -> PathBuf {
        self.home.clone().unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."));
            home.join(".cache").join("tandem")
        })
    }

    /// The model to use: `--model`, else the default model (fetched if needed).
    pub fn model_path(&self, model: &Option<PathBuf>) -> Result<PathBuf> {
        match model {
            Some(p) => Ok(p.clone()),
            None => Ok(tandem_model::fetch::ensure_default_model(
                &self.cache_dir(),
                &self.python,
            )?),
        }
    }

    fn init_threads(&self) -> usize {
        let n = self
            .threads
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            })
            .max(1);
        // candle sizes its GEMM parallelism from this variable.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
        n
    }
}

fn main() {
    let cli = Cli::parse();
    // Nodes a local cluster starts read these from the environment.
    // SAFETY: no other thread runs yet.
    unsafe {
        std::env::set_var("TANDEM_LOG_FORMAT", cli.common.log_format.name());
        if let Some(e) = &cli.common.otlp_endpoint {
            std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", e);
        }
    }
    // Nodes and `generate` export traces; `serve` leaves that to its nodes.
    let (role, node) = match &cli.cmd {
        Cmd::Gateway(a) => ("gateway", a.node.as_str()),
        Cmd::Prefill(a) => ("prefill", a.node.as_str()),
        Cmd::Decode(a) => ("decode", a.node.as_str()),
        Cmd::Generate(_) => ("generate", "generate"),
        _ => ("cli", ""),
    };
    let otlp = cli
        .common
        .otlp_endpoint
        .as_deref()
        .filter(|_| role != "cli");
    let telemetry = match telemetry::init(cli.common.log_format, otlp, role, node) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let r = run(cli);
    drop(telemetry);
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let threads = cli.common.init_threads();
    match cli.cmd {
        Cmd::Generate(args) => generate::run(&cli.common, args),
        Cmd::FetchModel { force } => {
            let fetch = if force {
                tandem_model::fetch::fetch_default_model
            } else {
                tandem_model::fetch::ensure_default_model
            };
            let p = fetch(&cli.common.cache_dir(), &cli.common.python)?;
            println!("{}", p.display());
            Ok(())
        }
        Cmd::ExportTokenizer(a) => export_tokenizer(&cli.common, a),
        Cmd::Bench(BenchCmd::Engine(a)) => bench::engine(&cli.common, threads, a),
        Cmd::Bench(BenchCmd::Ttft(a)) => bench::ttft(&cli.common, threads, a),
        Cmd::Bench(BenchCmd::Serve(a)) => bench_serve::run(&cli.common, a),
        Cmd::Bench(BenchCmd::Goodput(a)) => bench_goodput::run(&cli.common, a),
        Cmd::Bench(BenchCmd::Sessions(a)) => bench::sessions(&cli.common, a),
        Cmd::Bench(BenchCmd::Kv(a)) => bench_kv::run(a),
        Cmd::Certs(a) => cluster::certs(&cli.common, a),
        Cmd::CheckConfig(a) => cluster::check(&cli.common, a),
        Cmd::Plan(a) => plan::run(a),
        Cmd::Serve(a) => serve::run(&cli.common, threads, a),
        Cmd::Gateway(a) => node::gateway(&cli.common, a),
        Cmd::Prefill(a) => node::prefill(&cli.common, threads, a),
        Cmd::Decode(a) => node::decode(&cli.common, threads, a),
        Cmd::GpuCheck(a) => gpu_check::run(&cli.common, a),
        Cmd::ExportHf(a) => {
            let path = cli.common.model_path(&a.model)?;
            let file = tandem_model::ModelFile::open(&path)?;
            tandem_model::export::write_hf(&file, &a.out)?;
            println!("{}", a.out.display());
            Ok(())
        }
    }
}
