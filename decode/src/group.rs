//! The decode group process: the shell around [`Core`]. It owns what the
//! core must not: the QUIC links, the `tp` rank threads with their KV pools
//! (every layer, each rank its KV heads), the UCX worker and its landing
//! table, and the text each stream turns into. One loop reads everything
//! that happens from one channel, hands it to the core with the time, and
//! carries out what the core returns; between events it runs the decode
//! step the core plans (continuous batching: every running sequence, plus
//! a chunk of a local prefill) on the ranks.
//!
//! Messages to a peer go out in order through a per-peer outbox: what its
//! link cannot queue now is sent later, never dropped (only a lost link
//! drops them, and the core knows what to repeat when it comes back).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_kvtransfer::{scatter, PoolDesc};
use tandem_model::{
    FinishReason, Formats, Input, ModelFile, RankGroup, RankGroupOptions, StopState, Tokenizer,
};
use tandem_wire::link::{spawn_acceptor, spawn_dialer, Change, Links, NetEvent};
use tandem_wire::messages::{GenerateEvent, Lease, Load, Message, RequestId, Role};
use tandem_wire::node::{now_ms, Beat, NodeSetup};

use crate::admission::Limits;
use crate::core::{Action, Config, Core, PipelineSpec, UcxLanding};

pub use tandem_wire::node::NodeError as DecodeError;

pub type Result<T> = std::result::Result<T, DecodeError>;

mod observe;
mod ucx;

/// Attempts at a request's KV (first try and retries) before it fails.
const MAX_ATTEMPTS: u32 = 3;
/// How long one prefill attempt may take before it is retried.
const KV_TIMEOUT_MS: u64 = 120_000;
/// How often time passes for the core (retries, deadlines, liveness of
/// processes that may still write quarantined blocks) and the load is
/// published.
const TICK: Duration = Duration::from_millis(50);

/// What the loop reads: the links' events, and the landing table's.
pub(crate) enum LoopEvent {
    Net(NetEvent),
    Landing(tandem_kvtransfer::over_ucx::LandingEvent),
}

pub struct Group<'m> {
    core: Core,
    tok: &'m Tokenizer,
    /// KV over UCX, when a pipeline uses it. Declared before `group`: the
    /// worker, which has the ranks' pools registered, is dropped first.
    ucx: Option<ucx::DecodeUcx>,
    group: RankGroup,
    links: Links,
    /// Messages a link could not queue yet, per peer, in order.
    outbox: HashMap<String, VecDeque<Message>>,
    /// Each streaming request's text and stop state.
    streams: HashMap<RequestId, StopState>,
    /// An attempt's messages held behind a UCX notice whose blocks are
    /// still being received, in the order they came (a stage's notices
    /// must be taken in order).
    held: HashMap<(RequestId, Lease), VecDeque<(String, Message)>>,
    beat: Arc<Mutex<Beat>>,
    gateway: String,
    /// Decode steps run (for the wedge fault switch).
    steps: u64,
    /// What `/metrics` reports.
    observe: observe::Observer,
}

impl Group<'_> {
    fn act(&mut self, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            let more = self.carry_out(a);
            // Whatever an action leads to follows it, before later ones.
            for m in more.into_iter().rev() {
                queue.push_front(m);
            }
        }
    }

    fn carry_out(&mut self, a: Action) -> Vec<Action> {
        let now = now_ms();
        match a {
            Action::Send { to, mut msg } => {
                if let Message::Prefill(req) = &mut msg {
                    if !req.warm {
                        self.observe.attempt(&to, req);
                    }
                }
                self.send(&to, msg);
                Vec::new()
            }
            Action::WriteKv {
                id,
                lease,
                rank,
                runs,
                blocks,
            } => {
                let r = self.group.with_pool(rank as usize, move |pool| {
                    for (b, bytes) in &blocks {
                        scatter(pool, *b, &runs, bytes)?;
                    }
                    Ok::<(), tandem_kvtransfer::KvTransferError>(())
                });
                match r
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                {
                    Ok(()) => Vec::new(),
                    Err(e) => self.core.kv_write_failed(id, lease, &e, now),
                }
            }
            Action::FenceOpen {
                id,
                lease,
                allowed,
                plans,
            } => {
                if let Some(u) = &self.ucx {
                    u.landing.open(id, lease, allowed, plans);
                }
                Vec::new()
            }
            Action::FenceClose { id, lease } => {
                let drained = self.ucx.as_ref().is_none_or(|u| u.landing.close(id, lease));
                self.held.remove(&(id, lease));
                if drained {
                    self.core.landing_drained(id, lease, now)
                } else {
                    Vec::new()
                }
            }
            Action::Stream {
                id,
                params,
                generated,
            } => {
                self.observe.streaming(id);
                let mut s = StopState::new(self.tok, &params);
                for t in generated {
                    s.push(self.tok, t);
                }
                self.streams.insert(id, s);
                Vec::new()
            }
            Action::Token {
                id,
                client,
                index,
                token,
                logprob,
                top,
                context_full,
            } => {
                let Some(s) = self.streams.get_mut(&id) else {
                    return Vec::new();
                };
                self.observe.token(id);
                let mut step = s.push(self.tok, token);
                if step.finished.is_none() && context_full {
                    step = s.finish(FinishReason::Length, true);
                }
                let event = GenerateEvent::Token {
                    index,
                    token,
                    logprob,
                    top,
                    text: step.text,
                };
                self.send(&client, Message::Event { id, event });
                match step.finished {
                    Some(reason) => {
                        self.streams.remove(&id);
                        self.core.finish(id, reason, now)
                    }
                    None => Vec::new(),
                }
            }
            Action::End { id, client, event } => {
                self.streams.remove(&id);
                self.observe.ended(id, &event);
                self.send(&client, Message::Event { id, event });
                Vec::new()
            }
        }
    }

    /// Queues `msg` for `to` behind anything still waiting for its link.
    fn send(&mut self, to: &str, msg: Message) {
        let Some(link) = self.links.get(to) else {
            return;
        };
        let q = self.outbox.entry(to.to_string()).or_default();
        let msg = if q.is_empty() {
            match link.try_send_back(msg) {
                Ok(()) => return,
                Err(m) => m,
            }
        } else {
            msg
        };
        q.push_back(msg);
    }

    /// Moves what waits in the outboxes onto links that have room.
    fn flush(&mut self) {
        for (peer, q) in self.outbox.iter_mut() {
            let Some(link) = self.links.get(peer) else {
                q.clear();
                continue;
            };
            while let Some(m) = q.pop_front() {
                if let Err(back) = link.try_send_back(m) {
                    q.push_front(back);
                    break;
                }
            }
        }
        self.outbox.retain(|_, q| !q.is_empty());
    }

    fn on_input(&mut self, input: LoopEvent) {
        let now = now_ms();
        let actions = match input {
            LoopEvent::Net(ev) => match self.links.apply(self.core.name(), ev) {
                Change::Up { peer, process, .. } => {
                    self.outbox.remove(&peer);
                    self.ucx_hello(&peer);
                    self.core.link_up(&peer, process, now)
                }
                Change::Down(peer) => {
                    self.outbox.remove(&peer);
                    self.core.link_down(&peer, now)
                }
                Change::Message { peer, msg } => self.on_message(&peer, msg, now),
                Change::Nothing => Vec::new(),
            },
            LoopEvent::Landing(e) => self.on_landing(e, now),
        };
        self.act(actions);
    }

    fn on_message(&mut self, peer: &str, msg: Message, now: u64) -> Vec<Action> {
        // Behind a notice still waiting for its blocks, an attempt's later
        // messages wait too.
        let key = match &msg {
            Message::Kv(k) => Some((k.id, k.lease)),
            Message::KvDone(d) => Some((d.id, d.lease)),
            Message::KvLanded { id, lease, .. } | Message::FirstToken { id, lease, .. } => {
                Some((*id, *lease))
            }
            _ => None,
        };
        if let Some(q) = key.and_then(|k| self.held.get_mut(&k)) {
            q.push_back((peer.to_string(), msg));
            return Vec::new();
        }
        match &msg {
            Message::Generate(g) if peer == self.gateway => {
                let node = self.core.name().to_string();
                self.observe.arrived(&node, g)
            }
            Message::Cancel { id } if peer == self.gateway => self.observe.cancelled(*id),
            Message::FirstToken { id, .. } => self.observe.last_chunk_done(*id),
            _ => {}
        }
        match self.core.message(peer, msg, now) {
            Ok(actions) => actions,
            Err(Message::KvLanded {
                id,
                lease,
                stage,
                rank,
                blocks,
                put,
            }) => self.on_landed(ucx::Notice {
                from: peer.to_string(),
                id,
                lease,
                stage,
                rank,
                blocks,
                put,
            }),
            Err(_) => Vec::new(),
        }
    }

    /// Time passes for the core; processes that may still write
    /// quarantined blocks are asked after.
    fn tick(&mut self) {
        let now = now_ms();
        let mut actions = self.core.tick(now);
        for p in self.core.processes_to_check() {
            if tandem_wire::node::process_gone(&p) {
                tracing::info!(
                    "{}: process {} is gone: it writes nothing any more",
                    self.core.name(),
                    p.pid
                );
                actions.extend(self.core.process_gone(&p, now));
            }
        }
        self.act(actions);
        self.publish();
    }

    /// One decode step over every running sequence (and a local prefill's chunk).
    fn step(&mut self) {
        let now = now_ms();
        let (plan, actions) = self.core.plan_step(now);
        self.act(actions);
        let Some(plan) = plan else {
            return;
        };
        self.steps += 1;
        // One span per step, linked to the requests in its batch.
        let span = tracing::info_span!(
            "step",
            batch = plan.batch.len(),
            tokens = plan.tokens.len(),
            prefill_chunk = plan.chunk.map_or(0, |c| c.2)
        );
        if !span.is_disabled() {
            for id in plan.batch.iter().chain(plan.chunk.as_ref().map(|c| &c.0)) {
                tandem_wire::trace::link(&span, self.observe.traceparent(*id));
            }
        }
        let _in_step = span.enter();
        let t0 = Instant::now();
        let out = self
            .group
            .forward_sampled(
                Input::Tokens(plan.tokens.clone()),
                plan.spans.clone(),
                plan.phase,
                plan.draws.clone(),
                None,
            )
            .map_err(|e| e.to_string());
        let us = t0.elapsed().as_micros() as u64;
        let actions = self.core.step_done(plan, out, us, now_ms());
        self.act(actions);
    }

    /// The prefix-cache blocks stored and evicted since the last time (for
    /// the gateway's KV-aware routing), and the load for the next heartbeat.
    fn publish(&mut self) {
        let ev = self.core.admission.cache.take_events();
        let name = self.core.name().to_string();
        if !ev.stored.is_empty() {
            let gw = self.gateway.clone();
            self.send(
                &gw,
                Message::CacheStored {
                    node: name.clone(),
                    hashes: ev.stored,
                },
            );
        }
        if !ev.evicted.is_empty() {
            let gw = self.gateway.clone();
            self.send(
                &gw,
                Message::CacheEvicted {
                    node: name,
                    hashes: ev.evicted,
                },
            );
        }
        let a = &self.core.admission;
        let load = Load {
            running: a.running() as u32,
            queued: a.queued() as u32,
            free_blocks: (a.total_blocks() - a.used_blocks()) as u32,
            total_blocks: a.total_blocks() as u32,
            pipelines_up: self.core.pipelines_up().len() as u32,
            kv_checksum_failures: a.counters.checksum_failures,
            kv_retries: a.counters.retries,
            kv_quarantined_blocks: a.quarantined_blocks() as u32,
            kv_quarantined_attempts: self.core.fenced_attempts() as u32,
            kv_blocks_quic: a.counters.blocks_quic,
            kv_blocks_ucx_direct: a.counters.blocks_ucx_direct,
            kv_blocks_ucx_messages: a.counters.blocks_ucx_messages,
        };
        self.observe.tick(a, self.core.fenced_attempts(), now_ms());
        let mut b = self.beat.lock().expect("heartbeat state");
        b.load = load;
        b.gateway = self.links.get(&self.gateway).cloned();
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
            ep: d.ep,
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
    let (in_tx, in_rx) = mpsc::channel::<LoopEvent>();
    let ucx = ucx::start(&setup.name, &group, d.tp, &cluster.pipelines, in_tx.clone())?;
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
    let landing = match &ucx {
        None => UcxLanding::None,
        Some(u) if u.pools.is_empty() => UcxLanding::Messages,
        Some(_) => UcxLanding::Puts,
    };
    let grammar = match tandem_model::GrammarEnv::new(&file.tokenizer) {
        Ok(g) => Some(g),
        Err(e) => {
            tracing::warn!("{}: no structured outputs: {e}", setup.name);
            None
        }
    };
    let core = Core::new(
        Config {
            name: setup.name.clone(),
            gateway: cluster.file.gateway.name.clone(),
            tp: d.tp,
            context: cfg.context_length,
            vocab: file.tokenizer.vocab_size(),
            limits: Limits {
                max_batch: d.max_batch,
                max_queue: d.max_queue,
                block_size,
                max_attempts: MAX_ATTEMPTS,
                kv_timeout: KV_TIMEOUT_MS,
            },
            local_prefill_max: d.local_prefill_max,
            local_chunk: d.local_prefill_chunk,
            dense_prefill,
            pipelines: cluster
                .pipelines
                .iter()
                .map(|p| PipelineSpec {
                    name: p.name.clone(),
                    stages: p
                        .stages
                        .iter()
                        .map(|s| (s.0.clone(), s.2.clone()))
                        .collect(),
                    ucx: p.kv_transport != tandem_wire::config::KvTransport::Quic,
                })
                .collect(),
            rank_descs,
            ucx: landing,
            grammar,
        },
        d.kv_blocks,
    );
    let rt = tandem_wire::node::io_runtime(&setup.name)?;
    let (net_tx, net_rx) = mpsc::channel();
    // The links' events join the landing table's in the loop's one channel.
    let fwd = in_tx.clone();
    std::thread::Builder::new()
        .name(format!("{}-events", setup.name))
        .spawn(move || {
            for ev in net_rx {
                if fwd.send(LoopEvent::Net(ev)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| DecodeError::Setup(format!("cannot start a thread: {e}")))?;
    drop(in_tx);
    let beat = Arc::new(Mutex::new(Beat::default()));
    let metrics = setup.metrics("decode", &setup.model_name(file))?;
    let observe = observe::Observer::new(metrics.clone())
        .map_err(|e| DecodeError::Setup(format!("metrics: {e}")))?;
    let hello = setup.me(Role::Decode {
        group: d.name.clone(),
    });
    {
        let _g = rt.enter();
        let ep = tandem_wire::quic::endpoint(d.addr.bind(), &setup.identity, setup.liveness())?;
        spawn_acceptor(ep.clone(), hello.clone(), net_tx.clone());
        let gw = &cluster.file.gateway;
        spawn_dialer(ep, gw.quic.clone(), gw.name.clone(), hello, net_tx);
        setup.spawn_services(&beat, metrics.clone())?;
    }
    let mut g = Group {
        core,
        tok: &file.tokenizer,
        ucx,
        group,
        links: Links::default(),
        outbox: HashMap::new(),
        streams: HashMap::new(),
        held: HashMap::new(),
        beat,
        gateway: cluster.file.gateway.name.clone(),
        steps: 0,
        observe,
    };
    tracing::info!(
        "{}: decode group (tp {}) ready at {}",
        setup.name,
        d.tp,
        d.addr
    );
    // Fault switch for tests, `TANDEM_FAULT_WEDGE=NODE:STEPS`: after that
    // many steps this group's loop wedges (it sleeps, holding its
    // requests) while the process, its links and its heartbeat task live on.
    let wedge_after: Option<u64> = std::env::var("TANDEM_FAULT_WEDGE").ok().and_then(|v| {
        let (node, steps) = v.split_once(':')?;
        (node == setup.name).then(|| steps.parse().ok()).flatten()
    });
    {
        let mut b = g.beat.lock().expect("heartbeat state");
        b.stall = Some(Duration::from_millis(
            cluster.file.limits.loop_stall_ms.max(1),
        ));
        b.turned = Some(Instant::now());
    }
    let mut last_tick = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        g.beat.lock().expect("heartbeat state").turned = Some(Instant::now());
        if wedge_after.is_some_and(|n| g.steps >= n) {
            tracing::error!("{}: fault injection: the decode loop wedges", setup.name);
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
            break;
        }
        let first = if g.core.busy() {
            in_rx.try_recv().ok()
        } else {
            match in_rx.recv_timeout(Duration::from_millis(20)) {
                Ok(ev) => Some(ev),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        };
        if let Some(ev) = first {
            g.on_input(ev);
            while let Ok(ev) = in_rx.try_recv() {
                g.on_input(ev);
            }
        }
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            g.tick();
        }
        g.step();
        g.flush();
    }
    drop(g);
    rt.shutdown_timeout(Duration::from_millis(200));
    Ok(())
}
