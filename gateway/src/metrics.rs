//! The gateway's Prometheus metrics: request counts and outcomes, latency
//! histograms, and each node's load as its last heartbeat reported it; and
//! vLLM's families ([`Serving`]) for the cluster as its clients see it.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tandem_model::FinishReason;
use tandem_wire::messages::{Accounting, Load, Role};
use tandem_wire::metrics::{RequestTimes, Serving};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub errors: IntCounterVec,
    pub rejected: IntCounter,
    pub cancelled: IntCounter,
    pub sticky: IntCounter,
    pub redispatched: IntCounter,
    pub resumed: IntCounter,
    pub repinned: IntCounter,
    pub cached_tokens: IntCounter,
    pub in_flight: IntGauge,
    pub connections: IntGauge,
    pub http_timeouts: IntCounter,
    pub tokens_out: IntCounter,
    pub prompt_tokens: IntCounter,
    pub finished: IntCounter,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub kv_bytes: IntCounter,
    pub kv_transfer: Histogram,
    pub prefill_compute: Histogram,
    node_up: IntGaugeVec,
    node_running: IntGaugeVec,
    node_queued: IntGaugeVec,
    kv_used: IntGaugeVec,
    kv_total: IntGaugeVec,
    kv_checksum_failures: IntCounterVec,
    kv_retries: IntCounterVec,
    kv_quarantined: IntGaugeVec,
    kv_quarantined_attempts: IntGaugeVec,
    kv_landed: IntCounterVec,
    /// vLLM's families for the whole cluster.
    pub serving: Serving,
}

fn buckets() -> Vec<f64> {
    vec![
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]
}

impl Metrics {
    pub fn new(model: &str) -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let serving = Serving::new(&registry, model)?;
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let hist = |name: &str, help: &str| -> prometheus::Result<Histogram> {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets()))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        // Counts a node keeps since it started, as its heartbeat reports
        // them: set whole at each scrape (a restarted node's go back to 0,
        // which Prometheus reads as a counter reset).
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let gauge_vec =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntGaugeVec> {
                let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(g.clone()))?;
                Ok(g)
            };
        let requests = IntCounterVec::new(
            Opts::new(
                "tandem_requests_total",
                "HTTP generation requests by endpoint",
            ),
            &["endpoint"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        let errors = IntCounterVec::new(
            Opts::new(
                "tandem_request_errors_total",
                "Requests answered with an error, by HTTP status",
            ),
            &["status"],
        )?;
        registry.register(Box::new(errors.clone()))?;
        let in_flight = IntGauge::new(
            "tandem_requests_in_flight",
            "Requests the gateway is serving",
        )?;
        registry.register(Box::new(in_flight.clone()))?;
        // The process itself: resident memory, CPU, open files.
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let connections = IntGauge::new("tandem_http_connections", "Open HTTP connections")?;
        registry.register(Box::new(connections.clone()))?;
        Ok(Metrics {
            requests,
            errors,
            rejected: counter(
                "tandem_requests_rejected_overload_total",
                "Requests refused with 429",
            )?,
            cancelled: counter(
                "tandem_requests_cancelled_total",
                "Requests whose client left before the end",
            )?,
            redispatched: counter(
                "tandem_requests_redispatched_total",
                "Requests sent again after their decode group was lost before streaming",
            )?,
            resumed: counter(
                "tandem_requests_resumed_total",
                "Streams continued on another decode group after theirs was lost mid-answer",
            )?,
            sticky: counter(
                "tandem_session_sticky_total",
                "Requests routed to their session's pinned nodes",
            )?,
            repinned: counter(
                "tandem_session_pinned_total",
                "Sessions pinned (new, expired, or moved off a lost or busy node)",
            )?,
            cached_tokens: counter(
                "tandem_cached_prompt_tokens_total",
                "Prompt tokens whose KV decode already held",
            )?,
            in_flight,
            connections,
            http_timeouts: counter(
                "tandem_http_timeouts_total",
                "Connections closed for sending no complete request head in time (idle or slow)",
            )?,
            tokens_out: counter(
                "tandem_generated_tokens_total",
                "Tokens streamed to clients",
            )?,
            prompt_tokens: counter(
                "tandem_prompt_tokens_total",
                "Prompt tokens of finished requests",
            )?,
            finished: counter(
                "tandem_requests_finished_total",
                "Requests that ran to their end",
            )?,
            ttft: hist(
                "tandem_time_to_first_token_seconds",
                "From submission to the first token",
            )?,
            itl: hist(
                "tandem_inter_token_latency_seconds",
                "Gap between streamed tokens",
            )?,
            e2e: hist(
                "tandem_request_duration_seconds",
                "From submission to the last token",
            )?,
            kv_bytes: counter(
                "tandem_kv_transfer_bytes_total",
                "KV bytes moved from prefill to decode",
            )?,
            kv_transfer: hist(
                "tandem_kv_transfer_seconds",
                "From prefill request to verified KV",
            )?,
            prefill_compute: hist(
                "tandem_prefill_compute_seconds",
                "Prefill pipeline compute per request",
            )?,
            node_up: gauge_vec(
                "tandem_node_up",
                "1 for every node linked to the gateway",
                &["node", "role"],
            )?,
            node_running: gauge_vec(
                "tandem_node_running",
                "Requests a node is working on",
                &["node"],
            )?,
            node_queued: gauge_vec(
                "tandem_node_queued",
                "Requests waiting at a node",
                &["node"],
            )?,
            kv_used: gauge_vec(
                "tandem_kv_blocks_used",
                "KV blocks allocated on a node",
                &["node"],
            )?,
            kv_total: gauge_vec(
                "tandem_kv_blocks_capacity",
                "KV blocks a node has",
                &["node"],
            )?,
            kv_checksum_failures: counter_vec(
                "tandem_kv_checksum_failures_total",
                "KV transfers a decode group refused for a checksum mismatch, since it started",
                &["node"],
            )?,
            kv_retries: counter_vec(
                "tandem_kv_retries_total",
                "Prefill attempts a decode group retried (lost stage, timeout, bad KV), since it started",
                &["node"],
            )?,
            kv_quarantined: gauge_vec(
                "tandem_kv_blocks_quarantined",
                "KV blocks of abandoned attempts held until nothing may write them: every stage that may write them directly confirmed it stopped or is known dead, and every receive into them completed",
                &["node"],
            )?,
            kv_quarantined_attempts: gauge_vec(
                "tandem_kv_quarantined_attempts",
                "Abandoned attempts whose blocks wait until nothing may write them (time passing frees none)",
                &["node"],
            )?,
            kv_landed: counter_vec(
                "tandem_kv_blocks_landed_total",
                "KV blocks a decode group received since it started, by path: quic, ucx-direct (written into its pools by a stage on its host), ucx-am (active messages)",
                &["node", "path"],
            )?,
            serving,
            registry,
        })
    }

    /// A request's first token, `ttft` after it was submitted.
    pub fn first_token(&self, ttft: Duration) {
        self.ttft.observe(ttft.as_secs_f64());
        self.serving.ttft.observe(ttft.as_secs_f64());
    }

    /// A token streamed; `gap` since the one before, for all but the first.
    pub fn token(&self, gap: Option<Duration>) {
        self.tokens_out.inc();
        self.serving.generation_tokens.inc();
        if let Some(g) = gap {
            self.itl.observe(g.as_secs_f64());
            self.serving.itl.observe(g.as_secs_f64());
        }
    }

    /// A request ran to its end: `e2e` after it was submitted, its first
    /// token at `ttft`, `generated` tokens.
    pub fn finish(
        &self,
        prompt: usize,
        generated: usize,
        (ttft, e2e): (Duration, Duration),
        reason: FinishReason,
        a: &Accounting,
    ) {
        let queue =
            Duration::from_micros(a.gateway_queue_us + a.decode_queue_us + a.prefill_queue_us);
        self.serving.prompt_tokens.inc_by(prompt as u64);
        self.serving.finished(&RequestTimes {
            prompt_tokens: prompt,
            generation_tokens: generated,
            cached_tokens: a.cached_tokens as usize,
            queue,
            prefill: ttft.saturating_sub(queue),
            decode: e2e.saturating_sub(ttft),
            e2e,
            reason: match reason {
                FinishReason::Stop => "stop",
                FinishReason::Length => "length",
            },
            max_tokens: None,
        });
        self.finished.inc();
        self.prompt_tokens.inc_by(prompt as u64);
        self.cached_tokens.inc_by(a.cached_tokens.into());
        self.e2e.observe(e2e.as_secs_f64());
        self.kv_bytes.inc_by(a.kv_bytes);
        self.kv_transfer.observe(a.kv_transfer_us as f64 / 1e6);
        self.prefill_compute
            .observe(a.prefill_compute_us as f64 / 1e6);
    }

    /// Node gauges from the latest heartbeats; nodes gone since are dropped.
    /// The cluster's running, waiting and KV usage are its decode groups'.
    pub fn set_nodes<'a>(&self, nodes: impl Iterator<Item = (&'a str, &'a Role, Option<Load>)>) {
        let (mut running, mut waiting, mut used, mut total) = (0, 0, 0, 0);
        for g in [
            &self.node_up,
            &self.node_running,
            &self.node_queued,
            &self.kv_used,
            &self.kv_total,
            &self.kv_quarantined,
            &self.kv_quarantined_attempts,
        ] {
            g.reset();
        }
        for c in [
            &self.kv_checksum_failures,
            &self.kv_retries,
            &self.kv_landed,
        ] {
            c.reset();
        }
        for (name, role, load) in nodes {
            let role = match role {
                Role::Gateway => "gateway",
                Role::Prefill { .. } => "prefill",
                Role::Decode { .. } => "decode",
                Role::Client => "client",
            };
            self.node_up.with_label_values(&[name, role]).set(1);
            let Some(l) = load else { continue };
            for (gauge, v) in [
                (&self.node_running, l.running.into()),
                (&self.node_queued, l.queued.into()),
                (
                    &self.kv_used,
                    i64::from(l.total_blocks) - i64::from(l.free_blocks),
                ),
                (&self.kv_total, l.total_blocks.into()),
            ] {
                gauge.with_label_values(&[name]).set(v);
            }
            // What KV reached a decode group, and how: prefill nodes have none.
            if role != "decode" {
                continue;
            }
            running += l.running as usize;
            waiting += l.queued as usize;
            used += l.total_blocks.saturating_sub(l.free_blocks) as usize;
            total += l.total_blocks as usize;
            for (counter, v) in [
                (&self.kv_checksum_failures, l.kv_checksum_failures),
                (&self.kv_retries, l.kv_retries),
            ] {
                counter.with_label_values(&[name]).inc_by(v);
            }
            for (gauge, v) in [
                (&self.kv_quarantined, l.kv_quarantined_blocks.into()),
                (
                    &self.kv_quarantined_attempts,
                    l.kv_quarantined_attempts as i64,
                ),
            ] {
                gauge.with_label_values(&[name]).set(v);
            }
            for (path, n) in [
                ("quic", l.kv_blocks_quic),
                ("ucx-direct", l.kv_blocks_ucx_direct),
                ("ucx-am", l.kv_blocks_ucx_messages),
            ] {
                self.kv_landed.with_label_values(&[name, path]).inc_by(n);
            }
        }
        self.serving.load(running, waiting, used, total);
    }

    pub fn encode(&self) -> Result<String, String> {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .map_err(|e| e.to_string())?;
        String::from_utf8(buf).map_err(|e| e.to_string())
    }
}
