//! Benchmarks.
//!
//! - `tandem bench engine` ([`engine`]) measures the model engine alone and,
//!   given llama.cpp's `llama-bench` ([`llamacpp`]), the reference beside it.
//! - [`http`]: a light blocking HTTP client with per-event timestamps, for
//!   `tandem bench ttft` and the serving harness.
//! - The serving harness for any OpenAI-compatible endpoint is being built:
//!   [`metrics`] (TTFT, TPOT, ITL, E2E, throughput, percentiles, SLO
//!   attainment and goodput from per-request timestamps) and [`arrivals`]
//!   (constant, Poisson and gamma request schedules) are done; the client,
//!   workloads and reports come with the benchmark-harness issue.

pub mod arrivals;
pub mod engine;
pub mod http;
pub mod llamacpp;
pub mod metrics;
