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

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_kvtransfer::over_ucx::{PutTarget, UcxTransport};
use tandem_kvtransfer::ucx::{EpId, Ucx, Worker, WorkerOptions};
use tandem_kvtransfer::{Outgoing, PoolDesc, QuicTransport, Transport};
use tandem_model::{
    block_hashes, BlockId, Formats, Input, ModelError, ModelFile, Phase, PrefixCache, RankGroup,
    RankGroupOptions, Sampler, SliceOutput, Span,
};
use tandem_wire::config::KvTransport;
use tandem_wire::config::Pipeline;
use tandem_wire::link::{spawn_acceptor, spawn_dialer, Change, Links, NetEvent};
use tandem_wire::messages::{
    Activations, ErrorClass, Lease, Load, Message, PrefillRequest, RequestId, Role,
};
use tandem_wire::node::{now_ms, Beat, NodeSetup};

mod run;

pub use run::run;
pub use tandem_wire::node::NodeError as PrefillError;

pub type Result<T> = std::result::Result<T, PrefillError>;

type Key = (RequestId, Lease);

struct Req {
    req: PrefillRequest,
    local: Vec<BlockId>,
    out: Option<Outgoing>,
    /// Blocks of the request already sent (indices into its block list).
    sent: usize,
    arrived: Instant,
    started: Instant,
    compute: Duration,
}

struct Work {
    key: Key,
    pos: usize,
    n: usize,
    input: Input,
    /// Of a cache-warming pass: runs after everything else.
    warm: bool,
}

pub struct Stage {
    name: String,
    index: usize,
    pipeline: Pipeline,
    n_layers: usize,
    n_kv_heads: usize,
    desc: PoolDesc,
    group: RankGroup,
    /// The stage's pool, with a prefix cache keyed like decode's.
    cache: PrefixCache,
    block_size: usize,
    links: Links,
    reqs: HashMap<Key, Req>,
    waiting: VecDeque<PrefillRequest>,
    work: VecDeque<Work>,
    /// Chunks that arrived for prompts still waiting to start.
    early: HashMap<Key, Vec<Work>>,
    beat: Arc<Mutex<Beat>>,
    /// KV over UCX: the worker, and an endpoint per decode group that sent
    /// its address, with its pools when they are mapped into this stage.
    /// Groups without one get KV on the QUIC link.
    ucx: Option<Arc<Worker>>,
    ucx_peers: HashMap<String, (EpId, Option<Arc<PutTarget>>)>,
    faults: Faults,
    /// Attempts decode aborted before their request came from the stage
    /// before; a request arriving for one later is refused.
    tombstones: Tombstones,
    /// Set when real work (a prompt or a real request's activations) arrives:
    /// a cache-warming pass in progress stops at its next layer and goes back
    /// in the queue, behind the work someone waits for.
    preempt: Arc<AtomicBool>,
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

/// A bounded set of aborted attempts (the oldest forgotten first).
#[derive(Debug, Default)]
struct Tombstones {
    set: std::collections::HashSet<Key>,
    order: VecDeque<Key>,
}

impl Tombstones {
    /// More than any stage sees aborted before their request arrives.
    const MAX: usize = 1 << 20;

    fn insert(&mut self, k: Key) {
        if self.set.insert(k) {
            self.order.push_back(k);
            if self.order.len() > Self::MAX {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    fn remove(&mut self, k: &Key) {
        if self.set.remove(k) {
            self.order.retain(|x| x != k);
        }
    }

    fn contains(&self, k: &Key) -> bool {
        self.set.contains(k)
    }
}

/// Fault injection for tests and benchmarks, off unless set in the stage's
/// environment:
/// - `TANDEM_FAULT_CORRUPT_KV=N`: corrupt one byte of the first KV message of
///   the next N requests, after its checksum was taken;
/// - `TANDEM_FAULT_DELAY_KV_MS=M`: hold every KV message M ms before sending;
/// - `TANDEM_FAULT_STALL_MS=M`: stall M ms before computing each chunk;
/// - `TANDEM_FAULT_EXIT_AFTER=N`: the process aborts when its (N+1)-th
///   request arrives (a node dropping out mid-work).
#[derive(Debug, Default)]
struct Faults {
    corrupt_left: u32,
    delay_kv: Duration,
    stall: Duration,
    exit_after: Option<u64>,
    admitted: u64,
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
        };
        if f.corrupt_left > 0
            || !f.delay_kv.is_zero()
            || !f.stall.is_zero()
            || f.exit_after.is_some()
        {
            tracing::warn!("fault injection is on: {f:?}");
        }
        f
    }
}

impl Stage {
    fn last(&self) -> bool {
        self.index + 1 == self.pipeline.stages.len()
    }

    fn next_name(&self) -> Option<String> {
        self.pipeline
            .stages
            .get(self.index + 1)
            .map(|s| s.0.clone())
    }

    fn fail(&self, req: &PrefillRequest, class: ErrorClass, message: String) {
        tracing::warn!("prefill of request {} failed: {message}", req.id.0);
        if let Some(link) = self.links.get(&req.decode) {
            let _ = link.try_send(Message::PrefillFailed {
                id: req.id,
                lease: req.lease,
                class,
                message,
            });
        }
    }

    fn on_event(&mut self, ev: NetEvent) {
        match self.links.apply(&self.name, ev) {
            Change::Up { peer, replaced, .. } => {
                if replaced {
                    self.peer_lost(&peer);
                }
                self.start_waiting();
            }
            Change::Down(peer) => self.peer_lost(&peer),
            Change::Message { peer, msg } => self.on_message(&peer, msg),
            Change::Nothing => {}
        }
    }

    /// Work that depended on `peer` cannot finish.
    fn peer_lost(&mut self, peer: &str) {
        if let (Some((ep, _)), Some(w)) = (self.ucx_peers.remove(peer), &self.ucx) {
            w.close(ep);
        }
        let next = self.next_name();
        let keys: Vec<Key> = self
            .reqs
            .iter()
            .filter(|(_, r)| r.req.decode == peer || next.as_deref() == Some(peer))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            if let Some(r) = self.reqs.get(&k) {
                let req = r.req.clone();
                if req.decode != peer {
                    self.fail(
                        &req,
                        ErrorClass::NodeLost,
                        format!("prefill stage {peer} was lost"),
                    );
                }
            }
            self.drop_req(k, false);
        }
        self.waiting.retain(|r| r.decode != peer);
        let waiting: Vec<Key> = self.waiting.iter().map(|r| (r.id, r.lease)).collect();
        self.early.retain(|k, _| waiting.contains(k));
    }

    fn on_message(&mut self, peer: &str, msg: Message) {
        match msg {
            Message::Prefill(req) => {
                // Aborted before it got here (decode's abort overtook the
                // stage before's request): confirmed stopped, so refused.
                if self.tombstones.contains(&(req.id, req.lease)) {
                    tracing::debug!("{}: request {} was aborted before it arrived", self.name, req.id.0);
                    return;
                }
                self.admit(req)
            }
            Message::PrefillAbort { id, lease, decode } => {
                let key = (id, lease);
                let known = self.reqs.contains_key(&key)
                    || self.waiting.iter().any(|r| (r.id, r.lease) == key);
                self.waiting.retain(|r| !(r.id == id && r.lease == lease));
                self.drop_req(key, false);
                if self.index > 0 {
                    if peer == decode && !known {
                        // Its request may still come from the stage before:
                        // once confirmed stopped, it must be refused then.
                        self.tombstones.insert(key);
                    } else if peer != decode {
                        // The stage before passes the abort on after the
                        // request, on the same link: nothing more can come.
                        self.tombstones.remove(&key);
                    }
                }
                // Chunks run on this thread, which writes a mapped pool
                // itself and waits for (or cancels) whatever UCX sends, so
                // none of this attempt's writes is still under way: tell
                // decode its blocks are free of this stage.
                if let Some(l) = self.links.get(&decode) {
                    let _ = l.blocking_send(Message::KvStopped {
                        id,
                        lease,
                        stage: self.index as u32,
                    });
                }
                if peer == decode {
                    if let Some(next) = self.next_name().and_then(|n| self.links.get(&n)) {
                        let _ = next.try_send(Message::PrefillAbort { id, lease, decode });
                    }
                }
            }
            Message::Activations(a) => {
                let key = (a.id, a.lease);
                let w = Work {
                    key,
                    pos: a.pos as usize,
                    n: a.n as usize,
                    input: Input::Hidden(a.hidden),
                    warm: a.warm,
                };
                if self.reqs.contains_key(&key) {
                    self.work.push_back(w);
                } else if self.waiting.iter().any(|r| (r.id, r.lease) == key) {
                    // Its prompt waits here (blocks, or the next stage):
                    // keep the chunk until it starts.
                    self.early.entry(key).or_default().push(w);
                }
            }
            Message::Heartbeat { .. } => {}
            Message::UcxHello { address, pools } => {
                let Some(w) = &self.ucx else { return };
                match w.connect(&address) {
                    Ok(ep) => {
                        let puts = match PutTarget::reach(w, ep, &pools) {
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
                        if let Some((old, _)) = self.ucx_peers.insert(peer.to_string(), (ep, puts))
                        {
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
            other => tracing::warn!(
                "{}: ignoring an unexpected message from {peer}: {:?}",
                self.name,
                std::mem::discriminant(&other)
            ),
        }
    }

    fn check(&self, req: &PrefillRequest) -> std::result::Result<(), String> {
        if req.tokens.is_empty() {
            return Err("the prompt is empty".into());
        }
        let need = req.tokens.len().div_ceil(self.block_size);
        for t in &req.targets {
            if t.blocks.len() < need {
                return Err(format!(
                    "rank {} offers {} blocks for {} tokens ({need} needed)",
                    t.rank,
                    t.blocks.len(),
                    req.tokens.len()
                ));
            }
            if t.heads.0 >= t.heads.1 || t.heads.1 as usize > self.n_kv_heads {
                return Err(format!("rank {} has heads {:?}", t.rank, t.heads));
            }
        }
        if req.cached as usize % self.block_size != 0 || req.cached as usize >= req.tokens.len() {
            return Err(format!(
                "{} cached tokens is not a whole number of blocks below the prompt",
                req.cached
            ));
        }
        // Stage 0 sets reuse_from for the stages after it; a value that does
        // not leave the last token to compute would underflow the accounting.
        if req.reuse_from as usize % self.block_size != 0
            || req.reuse_from as usize >= req.tokens.len()
        {
            return Err(format!(
                "reusing {} tokens is not a whole number of blocks below the prompt",
                req.reuse_from
            ));
        }
        if need > self.cache.total() {
            return Err(format!(
                "{} tokens need {need} blocks; the stage has {}",
                req.tokens.len(),
                self.cache.total()
            ));
        }
        Ok(())
    }

    fn admit(&mut self, req: PrefillRequest) {
        self.faults.admitted += 1;
        if self
            .faults
            .exit_after
            .is_some_and(|n| self.faults.admitted > n)
        {
            tracing::error!("{}: fault injection: dropping out", self.name);
            std::process::abort();
        }
        if let Err(why) = self.check(&req) {
            self.fail(&req, ErrorClass::BadRequest, why);
            return;
        }
        self.waiting.push_back(req);
        self.start_waiting();
    }

    /// Starts waiting prompts, in order, while the pool has their blocks.
    fn start_waiting(&mut self) {
        while let Some(req) = self.waiting.front() {
            // Until the next stage is linked (at start, or while it
            // reconnects) prompts wait; decode's deadline bounds the wait.
            if let Some(next) = self.next_name() {
                if !self.links.contains(&next) {
                    break;
                }
            }
            let bs = self.block_size;
            let need = req.tokens.len().div_ceil(bs);
            // Reuse this stage's cached prefix: stage 0 decides how much (the
            // blocks before the last token, whose logits are needed); later
            // stages must hold at least that much themselves.
            let reusable = (req.tokens.len() - 1) / bs;
            let hashes = block_hashes(&req.tokens[..reusable * bs], bs);
            let hit = match (req.reuse, self.index) {
                (false, _) => Vec::new(),
                (true, 0) => self.cache.lookup(&hashes),
                (true, _) => self
                    .cache
                    .lookup(&hashes[..(req.reuse_from as usize / bs).min(reusable)]),
            };
            if self.index > 0 && hit.len() * bs < req.reuse_from as usize {
                self.cache.release(&hit);
                // Stage 0 may have cached a prompt whose part here is still
                // computing: wait for what is in flight before giving up.
                if !self.reqs.is_empty() {
                    break;
                }
                let req = self.waiting.pop_front().expect("front exists");
                self.fail(
                    &req,
                    ErrorClass::Internal,
                    format!(
                        "stage {} does not cache the prompt's first {} tokens",
                        self.index, req.reuse_from
                    ),
                );
                continue;
            }
            let Some(fresh) = self.cache.alloc(need - hit.len()) else {
                self.cache.release(&hit);
                if self.index > 0 && self.reqs.is_empty() {
                    // Cannot happen with equal pools; refuse rather than wait forever.
                    let req = self.waiting.pop_front().expect("front exists");
                    self.fail(&req, ErrorClass::Overloaded, "no KV blocks".into());
                    continue;
                }
                break;
            };
            let from = hit.len() * bs;
            let mut local = hit;
            local.extend(fresh);
            let mut req = self.waiting.pop_front().expect("front exists");
            req.reuse_from = from as u32;
            let out = match Outgoing::new(
                req.id,
                req.lease,
                self.index as u32,
                &self.desc,
                self.n_layers,
                &req.targets,
            ) {
                Ok(o) => o,
                Err(e) => {
                    self.cache.release(&local);
                    self.fail(&req, ErrorClass::BadRequest, e.to_string());
                    continue;
                }
            };
            let key = (req.id, req.lease);
            if let Some(l) = self.next_name().and_then(|n| self.links.get(&n)) {
                if l.blocking_send(Message::Prefill(req.clone())).is_err() {
                    self.cache.release(&local);
                    self.fail(
                        &req,
                        ErrorClass::NodeLost,
                        "the next stage went away".into(),
                    );
                    continue;
                }
            }
            if self.index == 0 {
                let chunk = self.pipeline.chunk;
                let mut pos = from;
                while pos < req.tokens.len() {
                    let n = chunk.min(req.tokens.len() - pos);
                    self.work.push_back(Work {
                        key,
                        pos,
                        n,
                        input: Input::Tokens(req.tokens[pos..pos + n].to_vec()),
                        warm: req.warm,
                    });
                    pos += n;
                }
            }
            self.work
                .extend(self.early.remove(&key).unwrap_or_default());
            let sent = req.cached as usize / self.block_size;
            self.reqs.insert(
                key,
                Req {
                    req,
                    local,
                    out: Some(out),
                    sent,
                    arrived: Instant::now(),
                    started: Instant::now(),
                    compute: Duration::ZERO,
                },
            );
        }
    }

    /// Forgets a request; `done` when its KV is complete, so its full
    /// blocks stay cached for prompts that share them.
    fn drop_req(&mut self, key: Key, done: bool) {
        if let Some(r) = self.reqs.remove(&key) {
            if done {
                let t = &r.req.tokens;
                let full = t.len() / self.block_size * self.block_size;
                self.cache
                    .insert(&r.local, &block_hashes(&t[..full], self.block_size));
            }
            self.cache.release(&r.local);
        }
        self.work.retain(|w| w.key != key);
        self.early.remove(&key);
        self.start_waiting();
    }

    /// Runs one chunk; errors fail its request.
    fn step(&mut self, w: Work) {
        let key = w.key;
        if let Err(e) = self.run_chunk(w) {
            if let Some(r) = self.reqs.get(&key) {
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
                self.fail(&req, e.class, e.message);
            }
            self.drop_req(key, false);
        }
    }

    fn run_chunk(&mut self, w: Work) -> std::result::Result<(), ChunkError> {
        let is_last = self.last();
        let Some(r) = self.reqs.get_mut(&w.key) else {
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
        let draw = (is_last && w.pos + w.n == total && !r.req.targets.is_empty())
            .then(|| Sampler::new(&r.req.params).draw());
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
                    self.work.push_front(w);
                }
                return Ok(());
            }
            r => r.map_err(|e| e.to_string())?,
        };
        let end = w.pos + w.n;
        let last_chunk = end == total;
        // Hidden states go on before this stage spends time on KV.
        let mut first = None;
        match out {
            SliceOutput::Hidden(hidden) => {
                let next = self
                    .next_name()
                    .ok_or("a middle stage without a next stage")?;
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
            SliceOutput::Sampled(s) => first = s.first().copied(),
            // An earlier chunk's logits on the last stage: nothing to choose yet.
            SliceOutput::Logits(_) => {}
            SliceOutput::Nothing => return Err("the stage produced nothing".into()),
        }
        // KV of the blocks this chunk completed.
        let r = self.reqs.get_mut(&w.key).expect("checked above");
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
        self.drop_req(w.key, true);
        Ok(())
    }
}
