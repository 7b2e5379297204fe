//! Serving metrics from per-request timestamps, as vLLM's `bench serve`,
//! AIPerf and GuideLLM define them, and goodput as DistServe defines it.
//!
//! - TTFT: first token time − send time.
//! - TPOT: (last token − first token) / (output tokens − 1), per request
//!   with ≥ 2 tokens (E2E − TTFT without the stream's closing chunks).
//! - ITL: every gap between consecutive tokens.
//! - Goodput: requests per second that met both SLOs (TTFT ≤ X and TPOT ≤ Y).

use std::collections::BTreeMap;

use serde::Serialize;

/// Tandem's per-request accounting (the `tandem` object of the last chunk).
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TandemPhases {
    pub nodes: Vec<String>,
    pub cached_tokens: u64,
    pub prefilled_tokens: u64,
    pub kv_bytes: u64,
    pub gateway_us: u64,
    pub decode_queue_us: u64,
    pub prefill_queue_us: u64,
    pub prefill_compute_us: u64,
    pub kv_transfer_us: u64,
    /// From the last stage's first token to verified KV (servers before
    /// protocol 7 do not report it).
    pub kv_wait_us: u64,
    pub first_step_us: u64,
}

/// Medians of Tandem's phase times over the requests that reported them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseSummary {
    pub requests: usize,
    pub gateway_ms: f64,
    pub decode_queue_ms: f64,
    pub prefill_queue_ms: f64,
    pub prefill_compute_ms: f64,
    /// Decode asking a pipeline to verified KV (queue, compute and transfer).
    pub kv_transfer_ms: f64,
    /// What that round trip spent beyond the last stage's queue and
    /// compute: earlier stages' pipeline fill, hops, KV in flight, checks.
    pub kv_tail_ms: f64,
    /// Waiting for KV after the last stage's last chunk: from its first
    /// token to verified KV.
    pub kv_wait_ms: f64,
    pub first_step_ms: f64,
    /// Share of prompt tokens found in decode's prefix cache (all requests).
    pub cached_share: f64,
    /// Share of prompt tokens the prefill pipeline computed.
    pub prefilled_share: f64,
    pub kv_mb_per_request: f64,
}

/// What the harness saw of one request; times in seconds from the run's start.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestRecord {
    /// The job (session) this request belongs to, and its turn (from 0).
    pub job: usize,
    pub turn: usize,
    pub sent: f64,
    /// Arrival time of every content-bearing token (or chunk).
    pub tokens: Vec<f64>,
    pub done: f64,
    pub input_tokens: usize,
    /// Output tokens as the server counted them (usage), else `tokens.len()`.
    pub output_tokens: usize,
    /// Failure class ("http_429", "timeout", "malformed_stream", …), if it failed.
    pub error: Option<String>,
    /// Tandem's accounting, when the server is Tandem.
    pub tandem: Option<TandemPhases>,
}

impl RequestRecord {
    pub fn ok(&self) -> bool {
        self.error.is_none() && !self.tokens.is_empty()
    }

    pub fn ttft(&self) -> Option<f64> {
        self.tokens.first().map(|t| t - self.sent)
    }

    pub fn e2e(&self) -> f64 {
        self.done - self.sent
    }

    /// From the first to the last token with text, per token after the
    /// first (AIPerf's definition; the usage chunk and `[DONE]` after the
    /// last token do not count).
    pub fn tpot(&self) -> Option<f64> {
        let first = *self.tokens.first()?;
        let last = *self.tokens.last()?;
        (self.output_tokens >= 2).then(|| (last - first) / (self.output_tokens - 1) as f64)
    }

    pub fn itls(&self) -> impl Iterator<Item = f64> + '_ {
        self.tokens.windows(2).map(|w| w[1] - w[0])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    pub count: usize,
    pub mean: f64,
    pub median: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

/// The `q`-quantile with linear interpolation between order statistics (numpy's default).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

pub fn stats(values: impl IntoIterator<Item = f64>) -> Option<Stats> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(Stats {
        count: v.len(),
        mean: v.iter().sum::<f64>() / v.len() as f64,
        median: quantile(&v, 0.5),
        p90: quantile(&v, 0.9),
        p95: quantile(&v, 0.95),
        p99: quantile(&v, 0.99),
        max: v[v.len() - 1],
    })
}

/// Service-level objectives, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Slo {
    pub ttft: f64,
    pub tpot: f64,
}

impl Slo {
    /// A request meets the SLOs when it succeeded within both bounds (one
    /// with a single output token has no TPOT and is judged on TTFT).
    pub fn met(&self, r: &RequestRecord) -> bool {
        r.ok()
            && r.ttft().is_some_and(|t| t <= self.ttft)
            && r.tpot().is_none_or(|t| t <= self.tpot)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub requests: usize,
    pub completed: usize,
    pub errors: BTreeMap<String, usize>,
    pub duration_s: f64,
    pub request_throughput: f64,
    pub input_token_throughput: f64,
    pub output_token_throughput: f64,
    pub ttft: Option<Stats>,
    pub tpot: Option<Stats>,
    pub itl: Option<Stats>,
    pub e2e: Option<Stats>,
    pub slo: Option<Slo>,
    /// Share of all requests that met the SLOs.
    pub slo_attainment: Option<f64>,
    /// Requests per second that met the SLOs.
    pub goodput: Option<f64>,
    /// Where TTFT went, when the server is Tandem.
    pub phases: Option<PhaseSummary>,
}

fn phases(ok: &[&RequestRecord]) -> Option<PhaseSummary> {
    let t: Vec<(&TandemPhases, usize)> = ok
        .iter()
        .filter_map(|r| r.tandem.as_ref().map(|t| (t, r.input_tokens)))
        .collect();
    if t.is_empty() {
        return None;
    }
    let med = |f: fn(&TandemPhases) -> u64| {
        stats(t.iter().map(|(p, _)| f(p) as f64 / 1e3)).map_or(0.0, |s| s.median)
    };
    let prompt: usize = t.iter().map(|(_, n)| n).sum::<usize>().max(1);
    Some(PhaseSummary {
        requests: t.len(),
        gateway_ms: med(|p| p.gateway_us),
        decode_queue_ms: med(|p| p.decode_queue_us),
        prefill_queue_ms: med(|p| p.prefill_queue_us),
        prefill_compute_ms: med(|p| p.prefill_compute_us),
        kv_transfer_ms: med(|p| p.kv_transfer_us),
        kv_tail_ms: stats(
            t.iter()
                .filter(|(p, _)| p.kv_transfer_us > 0)
                .map(|(p, _)| {
                    p.kv_transfer_us
                        .saturating_sub(p.prefill_queue_us + p.prefill_compute_us)
                        as f64
                        / 1e3
                }),
        )
        .map_or(0.0, |s| s.median),
        kv_wait_ms: stats(
            t.iter()
                .filter(|(p, _)| p.kv_transfer_us > 0)
                .map(|(p, _)| p.kv_wait_us as f64 / 1e3),
        )
        .map_or(0.0, |s| s.median),
        first_step_ms: med(|p| p.first_step_us),
        cached_share: t.iter().map(|(p, _)| p.cached_tokens).sum::<u64>() as f64 / prompt as f64,
        prefilled_share: t.iter().map(|(p, _)| p.prefilled_tokens).sum::<u64>() as f64
            / prompt as f64,
        kv_mb_per_request: t.iter().map(|(p, _)| p.kv_bytes).sum::<u64>() as f64
            / 1e6
            / t.len() as f64,
    })
}

/// Summarizes a run that lasted `duration_s` seconds.
pub fn summarize(records: &[RequestRecord], duration_s: f64, slo: Option<Slo>) -> Summary {
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.ok()).collect();
    let mut errors = BTreeMap::new();
    for r in records.iter().filter(|r| !r.ok()) {
        *errors
            .entry(r.error.clone().unwrap_or_else(|| "no_tokens".into()))
            .or_insert(0) += 1;
    }
    let per_s = |n: f64| {
        if duration_s > 0.0 {
            n / duration_s
        } else {
            0.0
        }
    };
    let good = slo.map(|s| records.iter().filter(|r| s.met(r)).count());
    Summary {
        requests: records.len(),
        completed: ok.len(),
        errors,
        duration_s,
        request_throughput: per_s(ok.len() as f64),
        input_token_throughput: per_s(ok.iter().map(|r| r.input_tokens).sum::<usize>() as f64),
        output_token_throughput: per_s(ok.iter().map(|r| r.output_tokens).sum::<usize>() as f64),
        ttft: stats(ok.iter().filter_map(|r| r.ttft())),
        tpot: stats(ok.iter().filter_map(|r| r.tpot())),
        itl: stats(ok.iter().flat_map(|r| r.itls())),
        e2e: stats(ok.iter().map(|r| r.e2e())),
        slo,
        slo_attainment: good.map(|g| {
            if records.is_empty() {
                0.0
            } else {
                g as f64 / records.len() as f64
            }
        }),
        goodput: good.map(|g| per_s(g as f64)),
        phases: phases(&ok),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(sent: f64, tokens: &[f64], error: Option<&str>) -> RequestRecord {
        RequestRecord {
            job: 0,
            turn: 0,
            sent,
            tokens: tokens.to_vec(),
            done: tokens.last().copied().unwrap_or(sent) + 0.001,
            input_tokens: 100,
            output_tokens: tokens.len(),
            error: error.map(str::to_owned),
            tandem: None,
        }
    }

    #[test]
    fn scripted_timings_give_exact_metrics() {
        // Request A: TTFT 0.2, then tokens every 0.05 s; B: TTFT 0.5, tokens every 0.1 s.
        let a = rec(0.0, &[0.2, 0.25, 0.30, 0.35], None);
        let b = rec(1.0, &[1.5, 1.6, 1.7], None);
        let failed = rec(2.0, &[], Some("http_429"));
        let s = summarize(
            &[a.clone(), b.clone(), failed],
            4.0,
            Some(Slo {
                ttft: 0.3,
                tpot: 0.08,
            }),
        );
        assert_eq!((s.requests, s.completed), (3, 2));
        assert_eq!(s.errors.get("http_429"), Some(&1));
        let ttft = s.ttft.expect("ttft");
        assert!((ttft.mean - 0.35).abs() < 1e-9 && (ttft.max - 0.5).abs() < 1e-9);
        assert!((a.tpot().expect("tpot") - (0.35 - 0.2) / 3.0).abs() < 1e-9);
        let itl = s.itl.expect("itl");
        assert_eq!(itl.count, 5);
        assert!((itl.max - 0.1).abs() < 1e-9);
        // Only A meets TTFT <= 0.3 and TPOT <= 0.08.
        assert_eq!(s.slo_attainment, Some(1.0 / 3.0));
        assert_eq!(s.goodput, Some(0.25));
        assert_eq!(s.request_throughput, 0.5);
        assert_eq!(s.output_token_throughput, 7.0 / 4.0);
    }

    #[test]
    fn quantiles_interpolate_like_numpy() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        let s = stats(v).expect("non-empty");
        assert_eq!((s.median, s.max), (5.5, 10.0));
        assert!((s.p90 - 9.1).abs() < 1e-9);
        assert!((s.p99 - 9.91).abs() < 1e-9);
        assert!(stats(Vec::<f64>::new()).is_none());
    }
}
