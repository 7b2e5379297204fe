//! Benchmarks.
//!
//! - `tandem bench engine` ([`engine`]) measures the model engine alone and,
//!   given llama.cpp's `llama-bench` ([`llamacpp`]), the reference beside it.
//! - `tandem bench goodput` concludes from sweeps over several seeds with
//!   [`goodput`].
//! - `tandem bench serve` is the serving harness for any OpenAI-compatible
//!   endpoint: [`workload`] (what is sent), [`run`] (when: concurrency or an
//!   arrival process from [`arrivals`]), [`client`] and [`http`] (how, with
//!   a timestamp per streamed chunk), [`metrics`] (TTFT, TPOT, ITL, E2E,
//!   throughput, percentiles, SLO attainment, goodput, Tandem's phases) and
//!   [`report`] (table, JSON, CSV, SVG plots).

pub mod arrivals;
pub mod client;
pub mod engine;
pub mod goodput;
pub mod http;
pub mod llamacpp;
pub mod metrics;
pub mod report;
pub mod run;
pub mod workload;

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("drawing a plot: {0}")]
    Plot(String),
}
