//! The decode group process: `tp` ranks as threads over every layer, each
//! with its KV heads' pool, and one scheduler thread (this module's loop)
//! that owns the requests.
//!
//! A [`Generate`] from the gateway goes through [`Admission`]: once the
//! batch and the pool have room, the request's blocks are allocated on every
//! rank (the same block ids: the ranks' pools are allocated in step) and a
//! prefill pipeline is asked to fill exactly those. Its stages write KV
//! chunks straight into the ranks' pools; the request starts only when every
//! stage's completion notice for every rank has arrived with a matching
//! checksum and the last stage's first token is in. Every step then decodes
//! one token for all running sequences (continuous batching: new sequences
//! join at the next step, finished ones leave), streams each token to the
//! gateway, and frees the blocks at the end, on cancel or on failure.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_kvtransfer::{reshard_plan, scatter, CopyRun, Incoming, PoolDesc, Verdict};
use tandem_model::{
    BlockId, FinishReason, Formats, Input, ModelFile, Phase, RankGroup, RankGroupOptions, Sampler, Draw, Sampled,
    Span, StopState, Tokenizer,
};
use tandem_wire::config::Pipeline;
use tandem_wire::link::{spawn_acceptor, spawn_dialer, Change, Links, NetEvent};
use tandem_wire::messages::{
    Accounting, ErrorClass, Generate, GenerateEvent, KvChunk, KvDone, Lease, Load, Message,
    PrefillRequest, RankTarget, RequestId, Role, WARM_LEASE,
};
use tandem_wire::node::{Beat, NodeSetup};

use crate::admission::{Action, Admission, Limits, Rejection};

pub use tandem_wire::node::NodeError as DecodeError;

pub type Result<T> = std::result::Result<T, DecodeError>;

mod fence;
mod prefill;
mod publish;
mod ucx;

/// Attempts at a request's KV (first try and retries) before it fails.
const MAX_ATTEMPTS: u32 = 3;
/// How long one prefill attempt may take before it is retried.
const KV_TIMEOUT_MS: u64 = 120_000;

/// One attempt at the request's KV.
struct Attempt {
    lease: Lease,
    pipeline: String,
    incoming: Incoming,
    verdict: Option<Verdict>,
    first: Option<(u32, f32)>,
    sent: Instant,
    /// Some of its KV came over UCX.
    over_ucx: bool,
}

struct Running {
    tokens: Vec<u32>,
    blocks: Vec<BlockId>,
    computed: usize,
    sampler: Sampler,
    stop: StopState,
    /// Tokens streamed so far, counting those of an earlier attempt.
    index: u32,
}

/// A prompt being prefilled on this group's ranks, chunk by chunk.
struct LocalPrefill {
    id: RequestId,
    lease: Lease,
    tokens: Vec<u32>,
    blocks: Vec<BlockId>,
    cached: usize,
    /// Tokens whose KV is in the blocks.
    done: usize,
    compute_us: u64,
    started: Option<Instant>,
}

struct Req {
    gen: Generate,
    /// The gateway link that asked; events go back on it.
    client: String,
    attempt: Option<Attempt>,
    running: Option<Running>,
    acct: Accounting,
    submitted: Instant,
    /// The pipeline that prefilled it (none when prefilled here).
    pipeline: Option<String>,
}

pub struct Group<'m> {
    name: String,
    tok: &'m Tokenizer,
    context: usize,
    n_layers: usize,
    block_size: usize,
    /// KV over UCX, when a pipeline uses it. Declared before `group`: the
    /// worker, which has the ranks' pools registered, is dropped first.
    ucx: Option<ucx::DecodeUcx>,
    group: RankGroup,
    rank_descs: Vec<PoolDesc>,
    pipelines: Vec<Pipeline>,
    /// Reshard plan per (pipeline, stage, rank).
    plans: HashMap<(String, u32, u32), Vec<CopyRun>>,
    admission: Admission,
    links: Links,
    reqs: HashMap<RequestId, Req>,
    /// Prefills in flight per pipeline, for routing.
    inflight: HashMap<String, usize>,
    /// Abandoned attempts whose blocks are quarantined: the pipeline and
    /// the stages (indices) that have not yet confirmed they stopped.
    stopping: HashMap<(RequestId, Lease), (String, HashSet<u32>)>,
    epoch: Instant,
    beat: Arc<Mutex<Beat>>,
    gateway: String,
    /// Uncached suffixes this short are prefilled here…
    local_prefill_max: usize,
    /// …in chunks of at most this many tokens, one per decode step.
    local_chunk: usize,
    local: std::collections::VecDeque<LocalPrefill>,
    /// Dense weights are loaded: a pass carrying a prefill chunk runs on them.
    dense_prefill: bool,
    local_prefills: u64,
}

fn class_of(why: &Rejection) -> (ErrorClass, String) {
    match why {
        Rejection::Overloaded => (
            ErrorClass::Overloaded,
            "the decode group's admission queue is full; retry later".into(),
        ),
        Rejection::TooLong { needed, pool } => (
            ErrorClass::BadRequest,
            format!("the prompt needs {needed} KV blocks; the decode group has {pool}"),
        ),
        Rejection::KvFailed { attempts } => (
            ErrorClass::NodeLost,
            format!("the prompt's KV could not be prefilled in {attempts} attempts"),
        ),
        Rejection::Duplicate => (
            ErrorClass::BadRequest,
            "a request with this id is already running".into(),
        ),
    }
}

impl Group<'_> {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Pipelines whose every stage is linked to this group.
    fn pipelines_up(&self) -> Vec<&Pipeline> {
        self.pipelines
            .iter()
            .filter(|p| p.stages.iter().all(|s| self.links.contains(&s.0)))
            .collect()
    }

    fn send_event(&self, client: &str, id: RequestId, event: GenerateEvent) {
        if let Some(l) = self.links.get(client) {
            if l.blocking_send(Message::Event { id, event }).is_err() {
                tracing::debug!(
                    "{}: the gateway link closed under request {}",
                    self.name,
                    id.0
                );
            }
        }
    }

    fn fail(&mut self, id: RequestId, class: ErrorClass, message: String) {
        // Freed (or quarantined) first, so ending the attempt can tell
        // whether its writers must confirm they stopped.
        let now = self.now();
        let actions = self.admission.release(id, now);
        if let Some(r) = self.reqs.remove(&id) {
            tracing::info!("{}: request {} failed: {message}", self.name, id.0);
            self.send_event(&r.client, id, GenerateEvent::Failed { class, message });
            self.end_attempt(&r);
        }
        self.carry_out(actions);
    }

    /// Tells the pipeline of a request's open attempt to stop.
    fn end_attempt(&mut self, r: &Req) {
        self.fence_close(r.gen.id);
        if let Some(a) = &r.attempt {
            self.abort_prefill(r.gen.id, a.lease, &a.pipeline);
        }
    }

    fn on_event(&mut self, ev: NetEvent) {
        match self.links.apply(&self.name, ev) {
            Change::Up { peer, replaced } => {
                if replaced {
                    self.peer_lost(&peer);
                }
                self.ucx_hello(&peer);
            }
            Change::Down(peer) => self.peer_lost(&peer),
            Change::Message { peer, msg } => self.on_message(&peer, msg),
            Change::Nothing => {}
        }
    }

    fn peer_lost(&mut self, peer: &str) {
        // Requests of a lost gateway have no one to stream to.
        let orphans: Vec<RequestId> = self
            .reqs
            .iter()
            .filter(|(_, r)| r.client == peer)
            .map(|(id, _)| *id)
            .collect();
        for id in orphans {
            self.fail(
                id,
                ErrorClass::Cancelled,
                format!("the gateway {peer} is gone"),
            );
        }
        // Attempts on a pipeline that lost a stage are retried.
        let lost: Vec<(RequestId, Lease)> = self
            .reqs
            .iter()
            .filter_map(|(id, r)| {
                let a = r.attempt.as_ref()?;
                let p = self.pipelines.iter().find(|p| p.name == a.pipeline)?;
                p.stages
                    .iter()
                    .any(|s| s.0 == peer)
                    .then_some((*id, a.lease))
            })
            .collect();
        for (id, lease) in lost {
            self.kv_lost(id, lease);
        }
        self.stage_gone(peer);
    }

    fn kv_lost(&mut self, id: RequestId, lease: Lease) {
        if self.admission.lease_of(id) == Some(lease) {
            self.fence_close(id);
        }
        let now = self.now();
        let actions = self.admission.kv_lost(id, lease, now);
        self.carry_out(actions);
    }

    fn on_message(&mut self, peer: &str, msg: Message) {
        match msg {
            Message::Generate(g) => self.submit(peer, g),
            Message::Cancel { id } => {
                if let Some(r) = self.reqs.remove(&id) {
                    tracing::debug!("{}: request {} cancelled", self.name, id.0);
                    let now = self.now();
                    let actions = self.admission.release(id, now);
                    self.end_attempt(&r);
                    self.carry_out(actions);
                }
            }
            Message::KvStopped { id, lease, stage } => self.writer_stopped(id, lease, stage),
            Message::Kv(c) => self.on_kv(c),
            Message::KvDone(d) => self.on_kv_done(d),
            Message::KvLanded {
                id,
                lease,
                stage,
                rank,
                blocks,
                put,
            } => self.on_kv_landed(id, lease, stage, rank, blocks, put),
            Message::FirstToken {
                id,
                lease,
                token,
                logprob,
                queue_us,
                compute_us,
                prefilled,
            } => {
                // A token outside the vocabulary would index past the
                // embedding: the attempt is treated as failed and retried.
                if token as usize >= self.tok.vocab_size() {
                    tracing::warn!(
                        "{}: {peer} sent token {token} for request {}; retrying",
                        self.name,
                        id.0
                    );
                    return self.kv_lost(id, lease);
                }
                if let Some(r) = self.reqs.get_mut(&id) {
                    if let Some(a) = r.attempt.as_mut().filter(|a| a.lease == lease) {
                        a.first = Some((token, logprob));
                        r.acct.prefill_queue_us = queue_us;
                        r.acct.prefill_compute_us = compute_us;
                        r.acct.prefilled_tokens = prefilled;
                        self.maybe_complete(id);
                    }
                }
            }
            Message::PrefillFailed {
                id,
                lease,
                class,
                message,
            } => {
                let current = self
                    .reqs
                    .get(&id)
                    .and_then(|r| r.attempt.as_ref())
                    .is_some_and(|a| a.lease == lease);
                if !current {
                    return;
                }
                if class == ErrorClass::BadRequest {
                    self.fail(id, class, message);
                } else {
                    tracing::warn!(
                        "{}: prefill of {} failed ({message}); retrying",
                        self.name,
                        id.0
                    );
                    self.kv_lost(id, lease);
                }
            }
            Message::Heartbeat { .. } => {}
            other => tracing::warn!(
                "{}: ignoring an unexpected message from {peer}: {:?}",
                self.name,
                std::mem::discriminant(&other)
            ),
        }
    }

    fn submit(&mut self, client: &str, g: Generate) {
        let id = g.id;
        let total = g.prompt.len() + g.generated.len();
        let bad = if g.prompt.is_empty() {
            Some("the prompt is empty".to_string())
        } else if total >= self.context {
            Some(format!(
                "the prompt has {total} tokens; the context holds {}",
                self.context
            ))
        } else if let Err(e) = g.params.validate() {
            Some(e.to_string())
        } else if g
            .prompt
            .iter()
            .chain(&g.generated)
            .any(|&t| t as usize >= self.tok.vocab_size())
        {
            Some("a token id is outside the vocabulary".into())
        } else {
            None
        };
        if let Some(message) = bad {
            let ev = GenerateEvent::Failed {
                class: ErrorClass::BadRequest,
                message,
            };
            let _ = self
                .links
                .get(client)
                .map(|l| l.blocking_send(Message::Event { id, event: ev }));
            return;
        }
        // A colocated group (no pipelines in the cluster) prefills everything
        // itself; one whose pipelines are all down sends the request back,
        // so the gateway can pick a group that has one.
        if !self.pipelines.is_empty() && self.pipelines_up().is_empty() {
            let ev = GenerateEvent::Failed {
                class: ErrorClass::NodeLost,
                message: "no prefill pipeline is linked to this decode group".into(),
            };
            let _ = self
                .links
                .get(client)
                .map(|l| l.blocking_send(Message::Event { id, event: ev }));
            return;
        }
        if self.reqs.contains_key(&id) {
            return self.send_event(
                client,
                id,
                GenerateEvent::Failed {
                    class: ErrorClass::BadRequest,
                    message: "a request with this id is already running".into(),
                },
            );
        }
        self.reqs.insert(
            id,
            Req {
                gen: g,
                client: client.to_string(),
                attempt: None,
                running: None,
                acct: Accounting {
                    nodes: vec![self.name.clone()],
                    ..Default::default()
                },
                submitted: Instant::now(),
                pipeline: None,
            },
        );
        let now = self.now();
        let r = &self.reqs[&id];
        let mut tokens = r.gen.prompt.clone();
        tokens.extend(&r.gen.generated);
        let actions = self.admission.submit(id, &tokens, now);
        self.carry_out(actions);
    }

    fn carry_out(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Prefill {
                    id,
                    lease,
                    blocks,
                    cached,
                    attempt,
                } => self.start_prefill(id, lease, blocks, cached, attempt),
                Action::Abandon { id, lease } => {
                    let pipeline = self
                        .reqs
                        .get_mut(&id)
                        .and_then(|r| r.attempt.take())
                        .filter(|a| a.lease == lease)
                        .map(|a| a.pipeline);
                    if let Some(p) = pipeline {
                        self.abort_prefill(id, lease, &p);
                    }
                }
                Action::Start { id, blocks } => self.start(id, blocks),
                Action::Reject { id, why } => {
                    let (class, message) = class_of(&why);
                    if let Some(r) = self.reqs.remove(&id) {
                        self.send_event(&r.client, id, GenerateEvent::Failed { class, message });
                    }
                }
            }
        }
    }

    fn start(&mut self, id: RequestId, blocks: Vec<BlockId>) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        let Some(a) = r.attempt.take() else { return };
        r.pipeline = Some(a.pipeline.clone()).filter(|p| !p.is_empty());
        let (first, logprob) = a.first.expect("started only with a first token");
        let params = &r.gen.params;
        let mut sampler = Sampler::new(params);
        sampler.skip(1 + r.gen.generated.len());
        let mut stop = StopState::new(self.tok, params);
        for &t in &r.gen.generated {
            stop.push(self.tok, t);
        }
        let mut tokens = r.gen.prompt.clone();
        tokens.extend(&r.gen.generated);
        let computed = tokens.len();
        r.running = Some(Running {
            tokens,
            blocks,
            computed,
            sampler,
            stop,
            index: r.gen.generated.len() as u32,
        });
        r.acct.first_step_us = 0;
        self.emit(id, first, logprob);
    }

    /// Streams one sampled token; ends the request when it is the last.
    fn emit(&mut self, id: RequestId, token: u32, logprob: f32) {
        let context = self.context;
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        let Some(run) = r.running.as_mut() else {
            return;
        };
        let mut step = run.stop.push(self.tok, token);
        if step.finished.is_none() && run.tokens.len() + 1 >= context {
            step = run.stop.finish(FinishReason::Length, true);
        }
        let index = run.index;
        run.index += 1;
        run.tokens.push(token);
        let client = r.client.clone();
        self.send_event(
            &client,
            id,
            GenerateEvent::Token {
                index,
                token,
                logprob,
                text: step.text,
            },
        );
        if let Some(reason) = step.finished {
            let r = self.reqs.remove(&id).expect("present");
            let run = r.running.as_ref().expect("a finishing request runs");
            let computed = run.tokens[..run.computed].to_vec();
            let mut acct = r.acct;
            acct.gateway_queue_us = 0;
            self.send_event(
                &client,
                id,
                GenerateEvent::Finished {
                    reason,
                    accounting: acct,
                },
            );
            let now = self.now();
            // Its KV stays cached for the conversation's next turn; the
            // pipeline is asked to cache the answer too, so that turn only
            // computes what is new there as well.
            let actions = self.admission.finish(id, &computed, now);
            self.carry_out(actions);
            if let Some(p) = r.pipeline.as_ref().filter(|_| r.gen.session.is_some()) {
                self.warm_pipeline(id, p, computed);
            }
        }
    }

    /// One decode step over every running sequence.
    fn step(&mut self) {
        let mut ids: Vec<RequestId> = self
            .reqs
            .iter()
            .filter(|(_, r)| r.running.is_some())
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() && self.local.is_empty() {
            return;
        }
        ids.sort();
        // Every sequence needs a slot for the token it is about to compute.
        let mut batch = Vec::new();
        for id in ids {
            let r = self.reqs.get_mut(&id).expect("listed");
            let run = r.running.as_mut().expect("filtered");
            let need = run.tokens.len().div_ceil(self.block_size);
            if need > run.blocks.len() {
                match self.admission.grow(id) {
                    Some(b) => run.blocks.push(b),
                    None => {
                        self.fail(
                            id,
                            ErrorClass::Overloaded,
                            "the decode group ran out of KV blocks".into(),
                        );
                        continue;
                    }
                }
            }
            batch.push(id);
        }
        let mut tokens = Vec::with_capacity(batch.len());
        let mut spans = Vec::with_capacity(batch.len());
        for id in &batch {
            let run = self.reqs[id].running.as_ref().expect("batched");
            tokens.push(*run.tokens.last().expect("a sequence has tokens"));
            spans.push(Span {
                pos: run.computed,
                n: 1,
                blocks: run.blocks.clone(),
            });
        }
        // A chunk of a local prefill rides along in the same pass.
        let chunk = self.next_local_chunk().map(|(t, span)| {
            tokens.extend(t);
            let n = span.n;
            spans.push(span);
            n
        });
        if spans.is_empty() {
            return;
        }
        // Each sequence's next token is chosen where its logits are (on the
        // GPU for a GPU group), from the next number of its seeded stream.
        let mut draws: Vec<Draw> = batch
            .iter()
            .map(|id| {
                let run = self.reqs.get_mut(id).and_then(|r| r.running.as_mut());
                run.map_or(Draw::GREEDY, |run| run.sampler.draw())
            })
            .collect();
        if let Some(n) = chunk {
            draws.push(self.local_chunk_draw(n));
        }
        let phase = if chunk.is_some() && self.dense_prefill {
            Phase::Prefill
        } else {
            Phase::Decode
        };
        let t0 = Instant::now();
        let out = self
            .group
            .forward_sampled(Input::Tokens(tokens), spans, phase, draws, None);
        let chosen = match out {
            Ok(s) if s.len() == batch.len() + usize::from(chunk.is_some()) => s,
            other => {
                let why = match other {
                    Err(e) => e.to_string(),
                    Ok(_) => "the decode ranks returned the wrong number of tokens".into(),
                };
                for id in batch {
                    self.fail(id, ErrorClass::Internal, why.clone());
                }
                if chunk.is_some() {
                    if let Some(l) = self.local.pop_front() {
                        self.fail(l.id, ErrorClass::Internal, why);
                    }
                }
                return;
            }
        };
        let step_us = t0.elapsed().as_micros() as u64;
        if let Some(n) = chunk {
            self.local_chunk_done(n, step_us, chosen[batch.len()]);
        }
        for (i, id) in batch.into_iter().enumerate() {
            let r = self.reqs.get_mut(&id).expect("batched");
            if r.acct.first_step_us == 0 {
                r.acct.first_step_us = step_us;
            }
            let run = r.running.as_mut().expect("batched");
            run.computed += 1;
            self.emit(id, chosen[i].token, chosen[i].logprob);
        }
    }
}

/// Runs decode group `node` until `stop` is set. Call from a plain thread:
/// it starts its own tokio runtime for the links.
pub fn run(
    file: &ModelFile,
    setup: NodeSetup,
    threads: usize,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let cluster = &setup.cluster;
    let d = cluster
        .file
        .decode
        .iter()
        .find(|d| d.name == setup.name)
        .cloned()
        .ok_or_else(|| {
            DecodeError::Setup(format!(
                "'{}' is not a decode group in the cluster file",
                setup.name
            ))
        })?;
    let cfg = &file.config;
    let block_size = cluster.file.cluster.block_size;
    // A group that prefills (colocated, or short suffixes) keeps dense
    // weights too: a prefill chunk is a GEMM, several times faster dense
    // than on quantized blocks.
    let dense_prefill = d.local_prefill_max > 0 || cluster.pipelines.is_empty();
    let group = RankGroup::new(
        file,
        &RankGroupOptions {
            layers: 0..cfg.n_layers,
            tp: d.tp,
            block_size,
            kv_dtype: cluster.kv_dtype,
            kv_blocks: d.kv_blocks,
            formats: if dense_prefill {
                Formats::BOTH
            } else {
                Formats::DECODE
            },
            threads,
            device: d.device.clone(),
            gpu_dtype: cluster.gpu_dtype,
        },
    )?;
    let ucx = ucx::start(&setup.name, &group, d.tp, &cluster.pipelines)?;
    let rank_descs = (0..d.tp)
        .map(|r| {
            PoolDesc::new(
                0..cfg.n_layers,
                group.heads(r),
                block_size,
                cfg.head_dim,
                cluster.kv_dtype,
            )
        })
        .collect();
    let limits = Limits {
        max_batch: d.max_batch,
        max_queue: d.max_queue,
        block_size,
        max_attempts: MAX_ATTEMPTS,
        kv_timeout: KV_TIMEOUT_MS,
    };
    let rt = tandem_wire::node::io_runtime(&setup.name)?;
    let (tx, rx) = mpsc::channel();
    let beat = Arc::new(Mutex::new(Beat::default()));
    let hello = setup.hello(Role::Decode {
        group: d.name.clone(),
    });
    {
        let _g = rt.enter();
        let ep = tandem_wire::quic::endpoint(d.addr.bind(), &setup.identity, setup.liveness())?;
        spawn_acceptor(ep.clone(), hello.clone(), tx.clone());
        let gw = &cluster.file.gateway;
        spawn_dialer(ep, gw.quic.clone(), gw.name.clone(), hello, tx.clone());
        setup.spawn_services(&beat)?;
    }
    let mut g = Group {
        name: setup.name.clone(),
        tok: &file.tokenizer,
        context: cfg.context_length,
        n_layers: cfg.n_layers,
        block_size,
        ucx,
        group,
        rank_descs,
        pipelines: cluster.pipelines.clone(),
        plans: HashMap::new(),
        admission: Admission::new(limits, d.kv_blocks),
        links: Links::default(),
        reqs: HashMap::new(),
        inflight: HashMap::new(),
        stopping: HashMap::new(),
        epoch: Instant::now(),
        beat,
        gateway: cluster.file.gateway.name.clone(),
        local_prefill_max: d.local_prefill_max,
        local_chunk: d.local_prefill_chunk,
        dense_prefill,
        local: Default::default(),
        local_prefills: 0,
    };
    let _ = g.n_layers;
    tracing::info!("{}: decode group (tp {}) ready at {}", g.name, d.tp, d.addr);
    let mut last_tick = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let busy = !g.local.is_empty() || g.reqs.values().any(|r| r.running.is_some());
        let first = if busy {
            rx.try_recv().ok()
        } else {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(ev) => Some(ev),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        };
        if let Some(ev) = first {
            g.on_event(ev);
            while let Ok(ev) = rx.try_recv() {
                g.on_event(ev);
            }
        }
        if last_tick.elapsed() >= Duration::from_millis(50) {
            last_tick = Instant::now();
            let now = g.now();
            let expired = g.admission.counters.quarantine_expired;
            let actions = g.admission.tick(now);
            if g.admission.counters.quarantine_expired > expired {
                tracing::warn!(
                    "{}: freed the blocks of {} abandoned attempt(s) whose stages never confirmed they stopped writing",
                    g.name,
                    g.admission.counters.quarantine_expired - expired
                );
            }
            let a = &g.admission;
            g.stopping.retain(|k, _| a.quarantined(k.0, k.1));
            g.carry_out(actions);
            g.publish();
        }
        g.step();
    }
    drop(g);
    rt.shutdown_timeout(Duration::from_millis(200));
    Ok(())
}
