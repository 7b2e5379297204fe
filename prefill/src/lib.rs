//! A prefill pipeline stage: one process holding a contiguous range of
//! layers (every KV head), reading prompts in chunks.
//!
//! Stage 0 receives [`PrefillRequest`]s from decode groups, cuts each prompt
//! into chunks of the pipeline's size and runs them in arrival order; every
//! stage passes each chunk's hidden states to the next stage as soon as it
//! has them, so while stage 1 works on chunk *i*, stage 0 already computes
//! chunk *i + 1* (and the next prompt after the last chunk). After each chunk
//! a stage sends the KV of the blocks that chunk completed for its layers
//! straight to the decode ranks, each rank only its heads, so transfer
//! overlaps the next chunk's compute. At the end of a prompt each stage
//! sends one completion notice per rank with a checksum, and the last stage
//! samples the first token.
//!
//! Threads: tokio runs the links; one OS thread (the loop in [`run`]) owns
//! the stage's [`RankGroup`] and every request's state, fed by the node's
//! event channel.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_kvtransfer::over_ucx::{PutTarget, UcxTransport};
use tandem_kvtransfer::ucx::{EpId, Ucx, Worker, WorkerOptions};
use tandem_kvtransfer::{PoolDesc, QuicTransport, Transport};
use tandem_model::{
    Formats, ModelError, ModelFile, Phase, RankGroup, RankGroupOptions, Sampler, SliceOutput, Span,
};
use tandem_wire::config::KvTransport;
use tandem_wire::config::Pipeline;
use tandem_wire::link::{spawn_acceptor, spawn_dialer, Change, Links, NetEvent};
use tandem_wire::messages::{Activations, ErrorClass, Load, Message, Role};
use tandem_wire::node::{now_ms, Beat, NodeSetup};

mod run;
mod sequencer;

use sequencer::{Key, Send, SeqConfig, Sequencer, Work};

pub use run::run;
pub use tandem_wire::node::NodeError as PrefillError;

pub type Result<T> = std::result::Result<T, PrefillError>;

/// The stage process around its [`Sequencer`]: links, the model's layers,
/// UCX, fault switches.
pub struct Stage {
    name: String,
    pipeline: Pipeline,
    desc: PoolDesc,
    group: RankGroup,
    seq: Sequencer,
    block_size: usize,
    links: Links,
    beat: Arc<Mutex<Beat>>,
    /// KV over UCX: the worker, and an endpoint per decode group that sent
    /// its address, with its pools when they are mapped into this stage.
    /// Groups without one get KV on the QUIC link.
    ucx: Option<Arc<Worker>>,
    ucx_peers: HashMap<String, (EpId, Option<Arc<PutTarget>>)>,
    faults: Faults,
    /// Set when real work (a prompt or a real request's activations) arrives:
    /// a cache-warming pass in progress stops at its next layer and goes back
    /// in the queue, behind the work someone waits for.
    preempt: Arc<AtomicBool>,
    /// The vocabulary for requests with a grammar (the last stage chooses
    /// their first token inside it).
    grammar: Option<tandem_model::GrammarEnv>,
    /// What `/metrics` reports.
    metrics: Arc<tandem_wire::metrics::NodeMetrics>,
    /// Each request's span here (a child of decode's attempt) and, until
    /// its first chunk runs, its `queue` span.
    spans: HashMap<sequencer::Key, (tracing::Span, Option<tracing::Span>)>,
}

/// Why a chunk failed, with the class decode acts on: a deadline is not
/// retried, anything else is (elsewhere).
#[derive(Debug)]
struct ChunkError {
    class: ErrorClass,
    message: String,
}

impl From<String> for ChunkError {
    fn from(message: String) -> ChunkError {
        ChunkError {
            class: ErrorClass::Internal,
            message,
        }
    }
}

impl From<&str> for ChunkError {
    fn from(message: &str) -> ChunkError {
        message.to_string().into()
    }
}

/// Fault injection for tests and benchmarks, off unless set in the stage's
/// environment:
/// - `TANDEM_FAULT_CORRUPT_KV=N`: corrupt one byte of the first KV message of
///   the next N requests, after its checksum was taken;
/// - `TANDEM_FAULT_DELAY_KV_MS=M`: hold every KV message M ms before sending;
/// - `TANDEM_FAULT_STALL_MS=M`: stall M ms before computing each chunk;
/// - `TANDEM_FAULT_EXIT_AFTER=N`: the process aborts when its (N+1)-th
///   request arrives (a node dropping out mid-work);
/// - `TANDEM_FAULT_WRITE_AFTER_ABORT_MS=M`: told to abort an attempt whose
///   blocks it writes directly, the stage goes on writing garbage into
///   them for M ms before it stops and says so (a stage that lags its
///   aborts: decode must keep those blocks from every other request).
#[derive(Debug, Default)]
struct Faults {
    corrupt_left: u32,
    delay_kv: Duration,
    stall: Duration,
    exit_after: Option<u64>,
    admitted: u64,
    write_after_abort: Duration,
}

impl Faults {
    fn from_env() -> Faults {
        let num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        let f = Faults {
            corrupt_left: num("TANDEM_FAULT_CORRUPT_KV").unwrap_or(0) as u32,
            delay_kv: Duration::from_millis(num("TANDEM_FAULT_DELAY_KV_MS").unwrap_or(0)),
            stall: Duration::from_millis(num("TANDEM_FAULT_STALL_MS").unwrap_or(0)),
            exit_after: num("TANDEM_FAULT_EXIT_AFTER"),
            admitted: 0,
            write_after_abort: Duration::from_millis(
                num("TANDEM_FAULT_WRITE_AFTER_ABORT_MS").unwrap_or(0),
            ),
        };
        if f.corrupt_left > 0
            || !f.delay_kv.is_zero()
            || !f.stall.is_zero()
            || f.exit_after.is_some()
            || !f.write_after_abort.is_zero()
        {
            tracing::warn!("fault injection is on: {f:?}");
        }
        f
    }
}

impl Stage {
    fn last(&self) -> bool {
        self.seq.index() + 1 == self.pipeline.stages.len()
    }

    /// Sends what the sequencer asked for. A request the next stage cannot
    /// take fails (to its decode group).
    fn send(&mut self, sends: Vec<Send>) {
        let mut queue: std::collections::VecDeque<Send> = sends.into();
        while let Some(Send { to, msg }) = queue.pop_front() {
            let key = match &msg {
                Message::Prefill(r) => Some((r.id, r.lease)),
                _ => None,
            };
            let sent = self
                .links
                .get(&to)
                .is_some_and(|l| l.blocking_send(msg).is_ok());
            if let (false, Some(key)) = (sent, key) {
                let why = "the next stage went away".to_string();
                let more = self
                    .seq
                    .chunk_failed(key, ErrorClass::NodeLost, why, Instant::now());
                queue.extend(more);
            } else if !sent {
                tracing::debug!(
                    "{}: {to} is not linked; a message to it is dropped",
                    self.name
                );
            }
        }
    }

    fn on_event(&mut self, ev: NetEvent) {
        let now = Instant::now();
        let sends = match self.links.apply(&self.name, ev) {
            Change::Up { peer, replaced, .. } => {
                let mut out = Vec::new();
                if replaced {
                    out.extend(self.peer_lost(&peer, now));
                }
                out.extend(self.seq.link_up(&peer, now));
                out
            }
            Change::Down(peer) => self.peer_lost(&peer, now),
            Change::Message { peer, msg } => self.on_message(&peer, msg, now),
            Change::Nothing => Vec::new(),
        };
        self.send(sends);
    }

    /// Work that depended on `peer` cannot finish.
    fn peer_lost(&mut self, peer: &str, now: Instant) -> Vec<Send> {
        if let (Some((ep, _)), Some(w)) = (self.ucx_peers.remove(peer), &self.ucx) {
            w.close(ep);
        }
        self.seq.link_down(peer, now)
    }

    fn on_message(&mut self, peer: &str, msg: Message, now: Instant) -> Vec<Send> {
        match msg {
            Message::Prefill(req) => {
                self.faults.admitted += 1;
                if self
                    .faults
                    .exit_after
                    .is_some_and(|n| self.faults.admitted > n)
                {
                    tracing::error!("{}: fault injection: dropping out", self.name);
                    std::process::abort();
                }
                if !req.warm {
                    let span = tracing::info_span!(
                        parent: None,
                        "prefill",
                        request = req.id.0,
                        node = self.name.as_str(),
                        tokens = req.tokens.len(),
                        reused = req.reuse_from,
                        request_id = req.trace.request_id.as_str()
                    );
                    tandem_wire::trace::set_parent(&span, &req.trace.traceparent);
                    let queue = tracing::info_span!(parent: &span, "queue");
                    self.spans.insert((req.id, req.lease), (span, Some(queue)));
                }
                self.seq.prefill(peer, req, now)
            }
            Message::PrefillAbort { id, lease, decode } => {
                if !self.faults.write_after_abort.is_zero() {
                    self.write_after_abort((id, lease));
                }
                self.seq.abort(peer, id, lease, decode, now)
            }
            Message::Activations(a) => {
                self.seq.activations(peer, a);
                Vec::new()
            }
            Message::Heartbeat { .. } => Vec::new(),
            Message::UcxHello { address, pools } => {
                self.ucx_hello(peer, &address, &pools);
                Vec::new()
            }
            other => {
                tracing::warn!(
                    "{}: ignoring an unexpected message from {peer}: {:?}",
                    self.name,
                    std::mem::discriminant(&other)
                );
                Vec::new()
            }
        }
    }

    /// A decode group's UCX address (and pools): KV to it goes over UCX.
    fn ucx_hello(&mut self, peer: &str, address: &[u8], pools: &[tandem_wire::messages::UcxPool]) {
        let Some(w) = &self.ucx else { return };
        match w.connect(address) {
            Ok(ep) => {
                let puts = match PutTarget::reach(w, ep, pools) {
                    Ok(t) => t.map(Arc::new),
                    Err(e) => {
                        tracing::warn!("{}: {peer}'s KV pools: {e}", self.name);
                        None
                    }
                };
                let how = if puts.is_some() {
                    "writes into its pools, mapped here (shared memory)"
                } else {
                    "active messages"
                };
                if let Some((old, _)) = self.ucx_peers.insert(peer.to_string(), (ep, puts)) {
                    w.close(old);
                }
                tracing::info!("{}: KV to {peer} over UCX, {how}", self.name);
            }
            Err(e) => tracing::warn!(
                "{}: UCX to {peer} failed ({e}); KV goes over QUIC",
                self.name
            ),
        }
    }

    /// Fault injection: writes garbage into the attempt's blocks in
    /// decode's pools for a while, as a stage lagging its aborts would.
    fn write_after_abort(&self, key: Key) {
        let Some(r) = self.seq.reqs.get(&key) else {
            return;
        };
        let Some((_, Some(put))) = self.ucx_peers.get(&r.req.decode) else {
            return;
        };
        let Some(out) = r.out.as_ref() else {
            return;
        };
        let place = out.placements(self.desc.layout.dtype.bytes());
        tracing::warn!(
            "{}: fault injection: writing request {}'s blocks after its abort",
            self.name,
            key.0 .0
        );
        let until = Instant::now() + self.faults.write_after_abort;
        let mut round = 0u8;
        while Instant::now() < until {
            round = round.wrapping_add(1);
            for t in &r.req.targets {
                let Some(runs) = place.get(&t.rank) else {
                    continue;
                };
                let len: usize = runs.iter().map(|x| x.2).sum();
                let junk = vec![0x5a ^ round; len];
                // The blocks it sends: decode already holds the cached prefix.
                let from = (r.req.cached as usize / self.block_size).min(t.blocks.len());
                for b in &t.blocks[from..] {
                    let _ = put.write(t.rank, *b, &junk, runs);
                }
            }
            tandem_kvtransfer::stream_copy::fence();
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs one chunk; errors fail its request.
    fn step(&mut self, w: Work) {
        let key = w.key;
        if let Err(e) = self.run_chunk(w) {
            if let Some(r) = self.seq.reqs.get(&key) {
                let req = r.req.clone();
                // A UCX endpoint given up on (a transfer that did not
                // complete) carries nothing more: KV to that group goes over
                // QUIC until it sends its address again.
                if let (Some(wk), Some((ep, _))) = (&self.ucx, self.ucx_peers.get(&req.decode)) {
                    if wk.failed(*ep) {
                        tracing::warn!(
                            "{}: UCX to {} given up; KV goes over QUIC",
                            self.name,
                            req.decode
                        );
                        self.ucx_peers.remove(&req.decode);
                    }
                }
            }
            self.metrics.serving.ended("error");
            let sends = self
                .seq
                .chunk_failed(key, e.class, e.message, Instant::now());
            self.send(sends);
        }
    }

    fn run_chunk(&mut self, w: Work) -> std::result::Result<(), ChunkError> {
        let is_last = self.last();
        let chunk = match self.spans.get_mut(&w.key) {
            Some((span, queue)) => {
                *queue = None;
                tracing::info_span!(parent: &*span, "chunk", pos = w.pos, n = w.n)
            }
            None => tracing::Span::none(),
        };
        let _in_chunk = chunk.enter();
        let Some(r) = self.seq.reqs.get_mut(&w.key) else {
            return Ok(());
        };
        if now_ms() > r.req.deadline_ms {
            return Err(ChunkError {
                class: ErrorClass::DeadlineExceeded,
                message: "the request's deadline passed during prefill".into(),
            });
        }
        if !self.faults.stall.is_zero() {
            std::thread::sleep(self.faults.stall);
        }
        let t0 = Instant::now();
        let total = r.req.tokens.len();
        let span = Span {
            pos: w.pos,
            n: w.n,
            blocks: r.local.clone(),
        };
        // Cache warming yields to real work between layers; its chunk runs
        // again from the start (rewriting the same KV) once that is done.
        let warm = w.warm;
        let again = warm.then(|| Work {
            key: w.key,
            pos: w.pos,
            n: w.n,
            input: w.input.clone(),
            warm: true,
        });
        let stop = warm.then(|| self.preempt.clone());
        // The last stage chooses the first token on its device, with the
        // first number of the request's seeded stream.
        let draw = if is_last && w.pos + w.n == total && !r.req.targets.is_empty() {
            let (prompt, output) = r
                .req
                .tokens
                .split_at((r.req.output_from as usize).min(total));
            let mut s =
                Sampler::constrained(&r.req.params, self.grammar.as_ref()).map_err(|e| {
                    ChunkError {
                        class: ErrorClass::BadRequest,
                        message: e.to_string(),
                    }
                })?;
            Some(s.draw(prompt, output))
        } else {
            None
        };
        let pass = match draw {
            Some(d) => self
                .group
                .forward_sampled(w.input, vec![span], Phase::Prefill, vec![d], stop)
                .map(SliceOutput::Sampled),
            None => self
                .group
                .forward_until(w.input, vec![span], Phase::Prefill, stop),
        };
        let out = match pass {
            Err(ModelError::Preempted) => {
                tracing::debug!(
                    "{}: cache warming of request {} yields to real work",
                    self.name,
                    w.key.0 .0
                );
                // At the front: its request's later chunks must follow it.
                if let Some(w) = again {
                    self.seq.requeue_front(w);
                }
                return Ok(());
            }
            r => r.map_err(|e| e.to_string())?,
        };
        let end = w.pos + w.n;
        let last_chunk = end == total;
        self.metrics.serving.prompt_tokens.inc_by(w.n as u64);
        // Hidden states go on before this stage spends time on KV.
        let mut first = None;
        match out {
            SliceOutput::Hidden(hidden) => {
                let next = self
                    .seq
                    .next()
                    .ok_or("a middle stage without a next stage")?
                    .to_string();
                let link = self
                    .links
                    .get(&next)
                    .ok_or_else(|| format!("the next stage {next} is not linked"))?;
                link.blocking_send(Message::Activations(Activations {
                    id: w.key.0,
                    lease: w.key.1,
                    pos: w.pos as u32,
                    n: w.n as u32,
                    hidden,
                    warm,
                }))
                .map_err(|e| e.to_string())?;
            }
            SliceOutput::Sampled(s) => first = s.into_iter().next(),
            // An earlier chunk's logits on the last stage: nothing to choose yet.
            SliceOutput::Logits(_) => {}
            SliceOutput::Nothing => return Err("the stage produced nothing".into()),
        }
        // KV of the blocks this chunk completed.
        let r = self.seq.reqs.get_mut(&w.key).expect("checked above");
        let complete = if last_chunk {
            total.div_ceil(self.block_size)
        } else {
            end / self.block_size
        };
        let decode = self
            .links
            .get(&r.req.decode)
            .cloned()
            .ok_or_else(|| format!("decode group {} is not linked", r.req.decode))?;
        let elem_bytes = self.desc.layout.dtype.bytes();
        let transport: Box<dyn Transport> = match (&self.ucx, self.ucx_peers.get(&r.req.decode)) {
            (Some(w), Some((ep, puts))) => Box::new(UcxTransport {
                worker: w.clone(),
                ep: *ep,
                link: decode.clone(),
                puts: puts.as_ref().and_then(|t| {
                    let place = r.out.as_ref()?.placements(elem_bytes);
                    Some((t.clone(), place))
                }),
            }),
            _ => Box::new(QuicTransport {
                link: decode.clone(),
            }),
        };
        if complete > r.sent {
            let range: Range<usize> = r.sent..complete;
            let mut outgoing = r.out.take().expect("outgoing lives with the request");
            let local = r.local.clone();
            let max = transport.chunk_bytes();
            let (outgoing, chunks) = self
                .group
                .with_pool(0, move |pool| {
                    let chunks = outgoing.gather(pool, &local, range, max);
                    (outgoing, chunks)
                })
                .map_err(|e| e.to_string())?;
            r.out = Some(outgoing);
            let first = r.sent == 0;
            r.sent = complete;
            let mut chunks = chunks.map_err(|e| e.to_string())?;
            if first && self.faults.corrupt_left > 0 {
                if let Some(b) = chunks.first_mut().and_then(|c| c.blocks.first_mut()) {
                    self.faults.corrupt_left -= 1;
                    b.1[0] ^= 0x5a;
                    tracing::warn!(
                        "{}: fault injection: corrupted KV of request {}",
                        self.name,
                        w.key.0 .0
                    );
                }
            }
            if self.faults.delay_kv.is_zero() {
                let blocks: usize = chunks.iter().map(|c| c.blocks.len()).sum();
                let _send = (!chunk.is_disabled())
                    .then(|| tracing::info_span!("kv_send", blocks).entered());
                transport.put_all(chunks).map_err(|e| e.to_string())?;
            } else {
                for c in chunks {
                    std::thread::sleep(self.faults.delay_kv);
                    transport.put(c).map_err(|e| e.to_string())?;
                }
            }
        }
        r.compute += t0.elapsed();
        if !last_chunk {
            return Ok(());
        }
        for d in r.out.as_ref().expect("outgoing").finish() {
            transport.done(d).map_err(|e| e.to_string())?;
        }
        if let Some(s) = first {
            decode
                .blocking_send(Message::FirstToken {
                    id: w.key.0,
                    lease: w.key.1,
                    token: s.token,
                    logprob: s.logprob,
                    top: s.top,
                    queue_us: (r.started - r.arrived).as_micros() as u64,
                    compute_us: r.compute.as_micros() as u64,
                    prefilled: r.req.tokens.len() as u32 - r.req.reuse_from,
                })
                .map_err(|e| e.to_string())?;
        }
        tracing::debug!(
            "{}: request {} done, {} KV bytes sent",
            self.name,
            w.key.0 .0,
            r.out.as_ref().map_or(0, |o| o.bytes)
        );
        if !r.req.warm {
            observe_done(&self.metrics.serving, r);
        }
        let sends = self.seq.finished(w.key, Instant::now());
        self.send(sends);
        Ok(())
    }
}

/// A prompt this stage read to its end, for `/metrics` (its request goes
/// on in decode: only the prefill families apply here).
fn observe_done(s: &tandem_wire::metrics::Serving, r: &sequencer::Req) {
    let now = Instant::now();
    let prompt = r.req.tokens.len();
    s.queue.observe((r.started - r.arrived).as_secs_f64());
    s.prefill.observe((now - r.started).as_secs_f64());
    s.prompt_len.observe(prompt as f64);
    s.prefix(prompt, r.req.reuse_from as usize);
}
