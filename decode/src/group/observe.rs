//! What the decode group reports, read off the core's inputs and actions as
//! the loop carries them out. For `/metrics`: when each request arrived, its
//! first and later tokens, and how it ended; the queue, the KV pool and the
//! transfer counts at each tick. For traces: each request's span (a child of
//! the gateway's), with its time in the queue, each prefill attempt (whose
//! context every prefill stage's spans take as parent), the wait for KV
//! after the pipeline's last chunk, and the stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use tandem_model::FinishReason;
use tandem_wire::messages::{ErrorClass, GenerateEvent, PrefillRequest, RequestId};
use tandem_wire::metrics::{raise, NodeMetrics, RequestTimes};

use crate::admission::Admission;

/// One request while it is here.
struct Timing {
    arrived: Instant,
    prompt: usize,
    max_tokens: usize,
    first: Option<Instant>,
    last: Option<Instant>,
    tokens: usize,
    /// Milliseconds since the Unix epoch after which it is forgotten even
    /// if no end was seen.
    deadline_ms: u64,
    spans: Spans,
}

/// A request's open spans here; each closes when dropped.
struct Spans {
    request: tracing::Span,
    /// Its context, for the steps that link to it.
    traceparent: String,
    /// Its `x-request-id`, passed on to the stages.
    request_id: String,
    queue: Option<tracing::Span>,
    attempt: Option<tracing::Span>,
    kv_wait: Option<tracing::Span>,
    stream: Option<tracing::Span>,
}

/// Counts kept by the admission state since start, as counters.
struct KvCounters {
    checksum_failures: IntCounter,
    retries: IntCounter,
    /// By path: quic, ucx-direct, ucx-am.
    landed: IntCounterVec,
    quarantined_blocks: IntGauge,
    quarantined_attempts: IntGauge,
}

pub(crate) struct Observer {
    pub metrics: Arc<NodeMetrics>,
    kv: KvCounters,
    reqs: HashMap<RequestId, Timing>,
}

impl Observer {
    pub fn new(metrics: Arc<NodeMetrics>) -> prometheus::Result<Observer> {
        let m = &metrics;
        let kv = KvCounters {
            checksum_failures: m.counter(
                "tandem_kv_checksum_failures_total",
                "KV transfers refused for a checksum mismatch",
            )?,
            retries: m.counter(
                "tandem_kv_retries_total",
                "Prefill attempts retried (lost stage, timeout, bad KV)",
            )?,
            landed: {
                let c = IntCounterVec::new(
                    Opts::new(
                        "tandem_kv_blocks_landed_total",
                        "KV blocks received, by path: quic, ucx-direct (written into the pools by a stage on this host), ucx-am (active messages)",
                    ),
                    &["path"],
                )?;
                m.registry.register(Box::new(c.clone()))?;
                c
            },
            quarantined_blocks: m.gauge(
                "tandem_kv_blocks_quarantined",
                "KV blocks of abandoned attempts held until nothing may write them",
            )?,
            quarantined_attempts: m.gauge(
                "tandem_kv_quarantined_attempts",
                "Abandoned attempts whose blocks wait until nothing may write them",
            )?,
        };
        Ok(Observer {
            metrics,
            kv,
            reqs: HashMap::new(),
        })
    }

    /// A request came in from the gateway (a first attempt, or one resumed
    /// from another group).
    pub fn arrived(&mut self, node: &str, g: &tandem_wire::messages::Generate) {
        let request = tracing::info_span!(
            parent: None,
            "decode",
            request = g.id.0,
            node,
            prompt_tokens = g.prompt.len(),
            resumed_after = g.generated.len(),
            request_id = g.trace.request_id.as_str()
        );
        tandem_wire::trace::set_parent(&request, &g.trace.traceparent);
        let spans = Spans {
            queue: Some(tracing::info_span!(parent: &request, "queue")),
            traceparent: tandem_wire::trace::traceparent(&request),
            request_id: g.trace.request_id.clone(),
            request,
            attempt: None,
            kv_wait: None,
            stream: None,
        };
        self.reqs.insert(
            g.id,
            Timing {
                arrived: Instant::now(),
                prompt: g.prompt.len(),
                max_tokens: g.params.max_tokens,
                first: None,
                last: None,
                tokens: 0,
                deadline_ms: g.deadline_ms,
                spans,
            },
        );
    }

    /// A prefill attempt goes to pipeline stage `to`: it carries the
    /// attempt's span context to every stage.
    pub fn attempt(&mut self, to: &str, req: &mut PrefillRequest) {
        let Some(t) = self.reqs.get_mut(&req.id) else {
            return;
        };
        let sp = &mut t.spans;
        sp.queue = None;
        sp.kv_wait = None;
        let attempt = tracing::info_span!(
            parent: &sp.request,
            "attempt",
            lease = req.lease.0 as u64,
            stage0 = to,
            cached = req.cached,
            tokens = req.tokens.len()
        );
        req.trace = tandem_wire::messages::TraceContext {
            traceparent: tandem_wire::trace::traceparent(&attempt),
            request_id: sp.request_id.clone(),
        };
        sp.attempt = Some(attempt);
    }

    /// The pipeline's last stage computed the prompt's last chunk: from
    /// here decode waits only for KV to land and verify.
    pub fn last_chunk_done(&mut self, id: RequestId) {
        let Some(t) = self.reqs.get_mut(&id) else {
            return;
        };
        let sp = &mut t.spans;
        let parent = sp.attempt.as_ref().unwrap_or(&sp.request);
        sp.kv_wait = Some(tracing::info_span!(parent: parent, "kv_wait"));
    }

    /// The request's KV is all here: it streams.
    pub fn streaming(&mut self, id: RequestId) {
        let Some(t) = self.reqs.get_mut(&id) else {
            return;
        };
        let sp = &mut t.spans;
        sp.queue = None;
        sp.kv_wait = None;
        sp.attempt = None;
        sp.stream = Some(tracing::info_span!(parent: &sp.request, "generate"));
    }

    /// The context of request `id`'s span, for a step to link to.
    pub fn traceparent(&self, id: RequestId) -> &str {
        self.reqs
            .get(&id)
            .map_or("", |t| t.spans.traceparent.as_str())
    }

    /// A token was streamed.
    pub fn token(&mut self, id: RequestId) {
        let Some(t) = self.reqs.get_mut(&id) else {
            return;
        };
        let now = Instant::now();
        let s = &self.metrics.serving;
        match t.last {
            Some(last) => s.itl.observe((now - last).as_secs_f64()),
            None => s.ttft.observe((now - t.arrived).as_secs_f64()),
        }
        t.first.get_or_insert(now);
        t.last = Some(now);
        t.tokens += 1;
        s.generation_tokens.inc();
    }

    /// The request's terminal event went out.
    pub fn ended(&mut self, id: RequestId, event: &GenerateEvent) {
        let Some(t) = self.reqs.remove(&id) else {
            return;
        };
        let s = &self.metrics.serving;
        match event {
            GenerateEvent::Finished { reason, accounting } => {
                let now = Instant::now();
                let queue = Duration::from_micros(accounting.decode_queue_us);
                let first = t.first.unwrap_or(now);
                s.prompt_tokens
                    .inc_by(u64::from(accounting.prefilled_tokens));
                s.finished(&RequestTimes {
                    prompt_tokens: t.prompt,
                    generation_tokens: t.tokens,
                    cached_tokens: accounting.cached_tokens as usize,
                    queue,
                    prefill: first.saturating_duration_since(t.arrived + queue),
                    decode: now - first,
                    e2e: now - t.arrived,
                    reason: match reason {
                        FinishReason::Stop => "stop",
                        FinishReason::Length => "length",
                    },
                    max_tokens: Some(t.max_tokens),
                });
            }
            GenerateEvent::Failed { class, .. } => s.ended(match class {
                ErrorClass::Cancelled => "abort",
                _ => "error",
            }),
            GenerateEvent::Token { .. } => {}
        }
    }

    /// The gateway cancelled it (its client left).
    pub fn cancelled(&mut self, id: RequestId) {
        if self.reqs.remove(&id).is_some() {
            self.metrics.serving.ended("abort");
        }
    }

    /// The load and the KV counts at a tick; requests long past their
    /// deadline with no end seen are forgotten.
    pub fn tick(&mut self, a: &Admission, fenced_attempts: usize, now_ms: u64) {
        self.reqs
            .retain(|_, t| t.deadline_ms.saturating_add(60_000) > now_ms);
        self.metrics
            .serving
            .load(a.running(), a.queued(), a.used_blocks(), a.total_blocks());
        let c = &a.counters;
        raise(&self.kv.checksum_failures, c.checksum_failures);
        raise(&self.kv.retries, c.retries);
        for (path, n) in [
            ("quic", c.blocks_quic),
            ("ucx-direct", c.blocks_ucx_direct),
            ("ucx-am", c.blocks_ucx_messages),
        ] {
            raise(&self.kv.landed.with_label_values(&[path]), n);
        }
        self.kv
            .quarantined_blocks
            .set(a.quarantined_blocks() as i64);
        self.kv.quarantined_attempts.set(fenced_attempts as i64);
    }
}
