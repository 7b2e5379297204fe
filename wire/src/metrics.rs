//! The serving metrics every node exports on `/metrics`, named and labelled
//! as vLLM names them (`vllm:…`, with `model_name`), so that dashboards and
//! alerts written for vLLM read a Tandem node unchanged. Each node reports
//! what it sees: the gateway the whole cluster as clients see it, a decode
//! group its own queue, steps and streams, a prefill stage its chunks.

use std::time::Duration;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Seconds, from a millisecond up to a long request: vLLM's bounds with
/// finer steps at the low end, where a CPU node's token gaps fall.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5,
        5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
    ]
}

/// Token counts: 1, 2, 5 and their powers of ten up to a long context.
fn length_buckets() -> Vec<f64> {
    let mut v = Vec::new();
    let mut m = 1.0;
    while m <= 100_000.0 {
        v.extend([m, 2.0 * m, 5.0 * m]);
        m *= 10.0;
    }
    v
}

/// One request's life as the node that reports it saw it.
#[derive(Debug, Clone, Default)]
pub struct RequestTimes {
    pub prompt_tokens: usize,
    pub generation_tokens: usize,
    /// Prompt tokens whose KV was already held (prefix cache hits).
    pub cached_tokens: usize,
    /// Waiting before its work started.
    pub queue: Duration,
    /// From its start to the first token (prompt read, KV moved).
    pub prefill: Duration,
    /// From the first token to the last.
    pub decode: Duration,
    /// From arrival to the end.
    pub e2e: Duration,
    /// `stop`, `length`, `abort` or `error`.
    pub reason: &'static str,
    pub max_tokens: Option<usize>,
}

/// vLLM's request and engine families, on one registry.
pub struct Serving {
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub kv_usage: Gauge,
    pub prefix_queries: IntCounter,
    pub prefix_hits: IntCounter,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub preemptions: IntCounter,
    pub success: IntCounterVec,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub tpot: Histogram,
    pub e2e: Histogram,
    pub queue: Histogram,
    pub inference: Histogram,
    pub prefill: Histogram,
    pub decode: Histogram,
    pub prompt_len: Histogram,
    pub generation_len: Histogram,
    pub max_tokens: Histogram,
}

impl Serving {
    /// The families, registered on `registry` with `model_name` set.
    pub fn new(registry: &Registry, model: &str) -> prometheus::Result<Serving> {
        let opts = |name: &str, help: &str| {
            Opts::new(name, help).const_label("model_name", model.to_string())
        };
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::with_opts(opts(name, help))?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::with_opts(opts(name, help))?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let hist = |name: &str, help: &str, buckets: Vec<f64>| -> prometheus::Result<Histogram> {
            let h = Histogram::with_opts(HistogramOpts::from(opts(name, help)).buckets(buckets))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let kv_usage = Gauge::with_opts(opts(
            "vllm:kv_cache_usage_perc",
            "Fraction of KV-cache blocks in use (0 to 1)",
        ))?;
        registry.register(Box::new(kv_usage.clone()))?;
        let success = IntCounterVec::new(
            opts(
                "vllm:request_success_total",
                "Requests ended, by finished reason (stop, length, abort, error)",
            ),
            &["finished_reason"],
        )?;
        registry.register(Box::new(success.clone()))?;
        let lat = latency_buckets;
        Ok(Serving {
            running: gauge("vllm:num_requests_running", "Requests being worked on")?,
            waiting: gauge("vllm:num_requests_waiting", "Requests waiting to start")?,
            kv_usage,
            prefix_queries: counter(
                "vllm:prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache",
            )?,
            prefix_hits: counter(
                "vllm:prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache",
            )?,
            prompt_tokens: counter("vllm:prompt_tokens_total", "Prompt tokens processed")?,
            generation_tokens: counter("vllm:generation_tokens_total", "Tokens generated")?,
            preemptions: counter(
                "vllm:num_preemptions_total",
                "Running requests whose KV was taken back to make room (Tandem never preempts: 0)",
            )?,
            success,
            ttft: hist(
                "vllm:time_to_first_token_seconds",
                "From arrival to the first token",
                lat(),
            )?,
            itl: hist(
                "vllm:inter_token_latency_seconds",
                "Gap between successive tokens of a request",
                lat(),
            )?,
            tpot: hist(
                "vllm:time_per_output_token_seconds",
                "A request's decode time over its tokens after the first",
                lat(),
            )?,
            e2e: hist(
                "vllm:e2e_request_latency_seconds",
                "From arrival to the last token",
                lat(),
            )?,
            queue: hist(
                "vllm:request_queue_time_seconds",
                "Time waiting before work started",
                lat(),
            )?,
            inference: hist(
                "vllm:request_inference_time_seconds",
                "Time from the start of work to the end (prefill and decode)",
                lat(),
            )?,
            prefill: hist(
                "vllm:request_prefill_time_seconds",
                "From the start of work to the first token",
                lat(),
            )?,
            decode: hist(
                "vllm:request_decode_time_seconds",
                "From the first token to the last",
                lat(),
            )?,
            prompt_len: hist(
                "vllm:request_prompt_tokens",
                "Prompt length of finished requests",
                length_buckets(),
            )?,
            generation_len: hist(
                "vllm:request_generation_tokens",
                "Tokens generated by finished requests",
                length_buckets(),
            )?,
            max_tokens: hist(
                "vllm:request_params_max_tokens",
                "The max_tokens of finished requests",
                length_buckets(),
            )?,
        })
    }

    /// A request ended normally (`stop`, `length`): every histogram.
    pub fn finished(&self, r: &RequestTimes) {
        self.ended(r.reason);
        self.prompt_len.observe(r.prompt_tokens as f64);
        self.generation_len.observe(r.generation_tokens as f64);
        if let Some(m) = r.max_tokens {
            self.max_tokens.observe(m as f64);
        }
        self.queue.observe(r.queue.as_secs_f64());
        self.prefill.observe(r.prefill.as_secs_f64());
        self.decode.observe(r.decode.as_secs_f64());
        self.inference.observe((r.prefill + r.decode).as_secs_f64());
        self.e2e.observe(r.e2e.as_secs_f64());
        if r.generation_tokens > 1 {
            self.tpot
                .observe(r.decode.as_secs_f64() / (r.generation_tokens - 1) as f64);
        }
        self.prefix(r.prompt_tokens, r.cached_tokens);
    }

    /// A request ended for `reason` (counted only).
    pub fn ended(&self, reason: &str) {
        self.success.with_label_values(&[reason]).inc();
    }

    /// Prompt tokens looked up in a prefix cache, and how many were held.
    pub fn prefix(&self, queried: usize, hit: usize) {
        self.prefix_queries.inc_by(queried as u64);
        self.prefix_hits.inc_by(hit.min(queried) as u64);
    }

    /// Requests running and waiting, and KV blocks used of those there are.
    pub fn load(&self, running: usize, waiting: usize, used_blocks: usize, total_blocks: usize) {
        self.running.set(running as i64);
        self.waiting.set(waiting as i64);
        self.kv_usage.set(if total_blocks == 0 {
            0.0
        } else {
            used_blocks as f64 / total_blocks as f64
        });
    }
}

/// A counter brought up to a running total kept elsewhere (counts a node's
/// state machine keeps since start); never goes down.
pub fn raise(c: &IntCounter, total: u64) {
    let now = c.get();
    if total > now {
        c.inc_by(total - now);
    }
}

/// A prefill or decode node's `/metrics`: the serving families for its
/// model, its process (memory, CPU, files), and whatever the role adds on
/// the same registry.
pub struct NodeMetrics {
    pub registry: Registry,
    pub serving: Serving,
}

impl NodeMetrics {
    /// `role` and `node` label a `tandem_node_info` series, so that a
    /// dashboard can tell a node's figures apart by what it is.
    pub fn new(model: &str, role: &str, node: &str) -> prometheus::Result<NodeMetrics> {
        let registry = Registry::new();
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let info = IntGauge::with_opts(
            Opts::new(
                "tandem_node_info",
                "1, labelled with the node's name and role",
            )
            .const_label("node", node.to_string())
            .const_label("role", role.to_string()),
        )?;
        info.set(1);
        registry.register(Box::new(info))?;
        let serving = Serving::new(&registry, model)?;
        Ok(NodeMetrics { registry, serving })
    }

    /// A counter on this node's registry.
    pub fn counter(&self, name: &str, help: &str) -> prometheus::Result<IntCounter> {
        let c = IntCounter::new(name, help)?;
        self.registry.register(Box::new(c.clone()))?;
        Ok(c)
    }

    /// A gauge on this node's registry.
    pub fn gauge(&self, name: &str, help: &str) -> prometheus::Result<IntGauge> {
        let g = IntGauge::new(name, help)?;
        self.registry.register(Box::new(g.clone()))?;
        Ok(g)
    }

    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

/// The registry in Prometheus' text format.
pub fn encode(registry: &Registry) -> String {
    let mut buf = Vec::new();
    // Encoding gathered families into a Vec cannot fail but for a family
    // without metrics, which the registry never gathers.
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut buf) {
        tracing::warn!("metrics: {e}");
    }
    String::from_utf8(buf).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
    }

    #[test]
    fn a_finished_request_lands_in_every_family_with_the_model_name() {
        let m = NodeMetrics::new("m", "decode", "d0").expect("registers");
        m.serving.finished(&RequestTimes {
            prompt_tokens: 100,
            generation_tokens: 11,
            cached_tokens: 64,
            queue: Duration::from_millis(5),
            prefill: Duration::from_millis(50),
            decode: Duration::from_millis(100),
            e2e: Duration::from_millis(155),
            reason: "stop",
            max_tokens: Some(16),
        });
        m.serving.load(3, 2, 10, 40);
        let t = m.encode();
        assert_eq!(
            sample(
                &t,
                "vllm:request_success_total{finished_reason=\"stop\",model_name=\"m\"}"
            ),
            1.0
        );
        assert_eq!(sample(&t, "vllm:prefix_cache_queries_total"), 100.0);
        assert_eq!(sample(&t, "vllm:prefix_cache_hits_total"), 64.0);
        assert_eq!(sample(&t, "vllm:kv_cache_usage_perc"), 0.25);
        assert_eq!(sample(&t, "vllm:num_requests_waiting"), 2.0);
        // 100 ms over the 10 tokens after the first.
        assert!((sample(&t, "vllm:time_per_output_token_seconds_sum") - 0.01).abs() < 1e-9);
        assert!((sample(&t, "vllm:request_inference_time_seconds_sum") - 0.15).abs() < 1e-9);
        assert_eq!(sample(&t, "vllm:request_prompt_tokens_count"), 1.0);
        assert!(t.contains("tandem_node_info{node=\"d0\",role=\"decode\"} 1"));
        assert!(t.contains("process_resident_memory_bytes"));
    }

    #[test]
    fn a_raised_counter_follows_its_total_and_never_goes_down() {
        let c = IntCounter::new("c", "c").expect("counter");
        raise(&c, 5);
        raise(&c, 3);
        assert_eq!(c.get(), 5);
        raise(&c, 9);
        assert_eq!(c.get(), 9);
    }
}
