//! Benchmarks: `tandem bench engine` measures the model engine alone
//! (prefill and decode throughput); the serving harness for any
//! OpenAI-compatible endpoint joins it with the benchmark-harness issue.

pub mod engine;
pub mod llamacpp;
