//! The load driver: sends a workload's jobs at a fixed concurrency or on an
//! arrival schedule (constant, Poisson, gamma), for a job count or a
//! duration, after warm-up requests that are not recorded.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::arrivals::Arrivals;
use crate::client::Endpoint;
use crate::metrics::RequestRecord;
use crate::workload::{Job, Workload};

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Load {
    /// This many jobs in flight at all times (closed loop).
    Concurrency(usize),
    /// Jobs start on the schedule (open loop), at most `max_concurrency` at once.
    Rate {
        arrivals: Arrivals,
        max_concurrency: usize,
    },
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub load: Load,
    /// Stop after this many jobs (sessions count as one job each)…
    pub jobs: Option<usize>,
    /// …or stop starting jobs after this many seconds.
    pub duration: Option<f64>,
    /// Requests sent one at a time first and not recorded.
    pub warmup: usize,
    pub seed: u64,
    pub progress: bool,
    /// Index of the first job: runs against the same server should not
    /// share jobs (their prompts would be prefix-cache hits).
    pub first_job: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub records: Vec<RequestRecord>,
    /// First send to last completion.
    pub duration_s: f64,
    /// CPU seconds the harness process used during the measured run, and
    /// their share of one core: its own overhead on the machine.
    pub harness_cpu_s: f64,
    pub harness_cpu_share: f64,
}

/// CPU time (user + system) of this process so far, from `/proc/self/stat`.
pub fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start at ")".
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    (ticks(11) + ticks(12)) / 100.0
}

/// Sends a job's turns in order; each turn carries the conversation so far.
/// A failed turn ends its session (the rest would build on a missing answer).
fn run_job(ep: &Endpoint, job: &Job, start: Instant, out: &mut dyn FnMut(RequestRecord)) {
    let mut messages: Vec<Value> = Vec::new();
    for (t, turn) in job.turns.iter().enumerate() {
        if t > 0 && !job.think.is_zero() {
            std::thread::sleep(job.think);
        }
        messages.push(json!({"role": "user", "content": turn.content}));
        let (mut rec, answer) = ep.send(
            start,
            &messages,
            turn.max_tokens,
            turn.input_tokens,
            job.session.as_deref(),
        );
        rec.job = job.index;
        rec.turn = t;
        let failed = rec.error.is_some();
        out(rec);
        if failed {
            return;
        }
        messages.push(json!({"role": "assistant", "content": answer}));
    }
}

/// Warm-up jobs use indices far from the measured ones, so a run sends the
/// same measured jobs with or without warm-up.
const WARMUP_BASE: usize = 1 << 40;

pub fn run(ep: &Endpoint, workload: &Workload, opts: &RunOptions) -> RunResult {
    for i in 0..opts.warmup {
        let mut job = workload.job(WARMUP_BASE + i);
        job.turns.truncate(1);
        job.session = job.session.map(|s| format!("{s}-warmup"));
        run_job(ep, &job, Instant::now(), &mut |_| {});
    }
    let per_job = workload.turns_per_job();
    let bar = if opts.progress {
        let (len, template) = match (opts.jobs, opts.duration) {
            (Some(j), _) => (
                (j * per_job) as u64,
                "{elapsed_precise} [{bar:40}] {pos}/{len} requests {msg}",
            ),
            (None, Some(_)) => (0, "{elapsed_precise} {pos} requests {msg}"),
            (None, None) => (0, "{pos} requests"),
        };
        let b = indicatif::ProgressBar::new(len);
        if let Ok(s) = indicatif::ProgressStyle::with_template(template) {
            b.set_style(s.progress_chars("=> "));
        }
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let records = Mutex::new(Vec::new());
    let errors = AtomicUsize::new(0);
    let push = |r: RequestRecord| {
        if r.error.is_some() {
            let e = errors.fetch_add(1, Ordering::Relaxed) + 1;
            bar.set_message(format!("({e} errors)"));
        }
        records.lock().expect("records").push(r);
        bar.inc(1);
    };
    let cpu0 = process_cpu_seconds();
    let start = Instant::now();
    let deadline = opts.duration.map(|d| start + Duration::from_secs_f64(d));
    let more =
        |i: usize| opts.jobs.is_none_or(|j| i < j) && deadline.is_none_or(|d| Instant::now() < d);
    match opts.load {
        Load::Concurrency(n) => {
            let next = AtomicUsize::new(0);
            std::thread::scope(|s| {
                for _ in 0..n.max(1) {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if !more(i) {
                            return;
                        }
                        run_job(ep, &workload.job(opts.first_job + i), start, &mut |r| {
                            push(r)
                        });
                    });
                }
            });
        }
        Load::Rate {
            arrivals,
            max_concurrency,
        } => {
            let n = match (opts.jobs, opts.duration) {
                (Some(j), _) => j,
                (None, Some(d)) => (arrivals.rate() * d * 2.0).ceil() as usize + 64,
                (None, None) => 0,
            };
            let times = arrivals.schedule(n, opts.seed);
            let in_flight = (Mutex::new(0usize), Condvar::new());
            std::thread::scope(|s| {
                for (i, at) in times.into_iter().enumerate() {
                    if !more(i) {
                        break;
                    }
                    let due = start + Duration::from_secs_f64(at);
                    if deadline.is_some_and(|d| due >= d) {
                        break;
                    }
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    {
                        let (m, cv) = &in_flight;
                        let mut k = m.lock().expect("in flight");
                        while *k >= max_concurrency.max(1) {
                            k = cv.wait(k).expect("in flight");
                        }
                        *k += 1;
                    }
                    let (push, in_flight) = (&push, &in_flight);
                    s.spawn(move || {
                        run_job(ep, &workload.job(opts.first_job + i), start, &mut |r| {
                            push(r)
                        });
                        let (m, cv) = in_flight;
                        *m.lock().expect("in flight") -= 1;
                        cv.notify_one();
                    });
                }
            });
        }
    }
    bar.finish_and_clear();
    let wall = start.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds() - cpu0;
    let mut records = records.into_inner().expect("records");
    records.sort_by(|a, b| a.sent.total_cmp(&b.sent));
    let duration_s = records.iter().map(|r| r.done).fold(0.0, f64::max);
    RunResult {
        records,
        duration_s,
        harness_cpu_s: cpu,
        harness_cpu_share: if wall > 0.0 { cpu / wall } else { 0.0 },
    }
}
