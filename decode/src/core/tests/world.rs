//! The scripted world the core's tests run against (see `tests.rs`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use tandem_kvtransfer::{Checksum, PoolDesc};
use tandem_model::{BlockId, FinishReason, KvDtype, Sampled, SamplingParams};
use tandem_wire::messages::{
    ByteBuf, Generate, GenerateEvent, KvChunk, KvDone, Lease, Message, ProcessId, RequestId,
};

use crate::admission::Limits;
use crate::core::{Action, Config, Core, PipelineSpec, UcxLanding};

pub(super) const GW: &str = "gw";
pub(super) const STAGES: [&str; 3] = ["p0-s0", "p0-s1", "p1-s0"];

fn config(ucx: UcxLanding, local_prefill_max: usize) -> Config {
    let desc = |heads: std::ops::Range<usize>| PoolDesc::new(0..2, heads, 4, 8, KvDtype::F32);
    Config {
        name: "d0".into(),
        gateway: GW.into(),
        tp: 2,
        context: 256,
        vocab: 100,
        limits: Limits {
            max_batch: 3,
            max_queue: 4,
            block_size: 4,
            max_attempts: 3,
            kv_timeout: 1_000,
        },
        local_prefill_max,
        local_chunk: 4,
        dense_prefill: true,
        pipelines: vec![
            PipelineSpec {
                name: "p0".into(),
                stages: vec![("p0-s0".into(), 0..1), ("p0-s1".into(), 1..2)],
                ucx: true,
            },
            PipelineSpec {
                name: "p1".into(),
                stages: vec![("p1-s0".into(), 0..2)],
                ucx: false,
            },
        ],
        rank_descs: vec![desc(0..1), desc(1..2)],
        ucx,
        grammar: None,
    }
}

/// Work a stage process took on and has not finished.
#[derive(Debug, Clone)]
pub(super) struct Job {
    pub id: RequestId,
    pub lease: Lease,
    pub blocks: Vec<BlockId>,
    /// It writes decode's blocks directly (UCX puts) while it works.
    pub puts: bool,
}

/// A fake stage process.
#[derive(Debug)]
pub(super) struct Stage {
    pub pipeline: &'static str,
    pub index: u32,
    pub last: bool,
    pub proc: ProcessId,
    pub linked: bool,
    /// Messages to read, with who sent them ("d0" is decode).
    pub inbox: VecDeque<(&'static str, Message)>,
    pub outbox: VecDeque<Message>,
    pub jobs: Vec<Job>,
    /// Attempts aborted before their request arrived from the stage
    /// before (as the real stages keep them): a request arriving later
    /// is refused, so a confirmation stays true.
    pub tombstones: HashSet<(RequestId, Lease)>,
}

fn proc(pid: u32) -> ProcessId {
    ProcessId {
        boot: "boot".into(),
        pid,
        start: 1000 + pid as u64,
    }
}

/// The bytes a stage writes for a block.
fn bytes(id: RequestId, lease: Lease, stage: u32, rank: u32, b: BlockId) -> ByteBuf {
    let l = lease.0 as u64;
    let v = (id.0 * 7)
        .wrapping_add(l.wrapping_mul(3))
        .wrapping_add(stage as u64 * 11 + rank as u64 * 5 + b.0 as u64) as u8;
    ByteBuf::from(vec![v; 8])
}

pub(super) struct World {
    pub core: Core,
    pub now: u64,
    pub ucx: UcxLanding,
    pub stages: BTreeMap<&'static str, Stage>,
    pub next_pid: u32,
    pub dead: HashSet<ProcessId>,
    pub attempt_blocks: HashMap<(RequestId, Lease), Vec<BlockId>>,
    /// Attempts with a receive still in flight after their fence closed.
    pub receiving: HashSet<(RequestId, Lease)>,
    pub ended: HashMap<RequestId, u32>,
    pub tokens_after_end: u32,
    /// Streams, and the tokens each has left before it finishes.
    pub streams: HashMap<RequestId, u32>,
    pub submitted: Vec<RequestId>,
    pub corrupt_next: bool,
    /// Every message stages sent, for replays.
    pub sent_log: Vec<(&'static str, Message)>,
    pub gateway_linked: bool,
    /// Blocks computed into by steps and handed to pipelines, checked.
    pub checked: usize,
    /// Requests that finished (not failed).
    pub finished: usize,
}

impl World {
    pub fn new(ucx: UcxLanding, local_prefill_max: usize) -> World {
        let mut w = World {
            core: Core::with_keys(
                config(ucx, local_prefill_max),
                24,
                crate::admission::Keys::seeded(7),
            ),
            now: 1_000_000,
            ucx,
            stages: BTreeMap::new(),
            next_pid: 10,
            dead: HashSet::new(),
            attempt_blocks: HashMap::new(),
            receiving: HashSet::new(),
            ended: HashMap::new(),
            tokens_after_end: 0,
            streams: HashMap::new(),
            submitted: Vec::new(),
            corrupt_next: false,
            sent_log: Vec::new(),
            gateway_linked: false,
            checked: 0,
            finished: 0,
        };
        w.link_gateway();
        for name in STAGES {
            w.next_pid += 1;
            let (pipeline, index, last) = match name {
                "p0-s0" => ("p0", 0, false),
                "p0-s1" => ("p0", 1, true),
                _ => ("p1", 0, true),
            };
            w.stages.insert(
                name,
                Stage {
                    pipeline,
                    index,
                    last,
                    proc: proc(w.next_pid),
                    linked: false,
                    inbox: VecDeque::new(),
                    outbox: VecDeque::new(),
                    jobs: Vec::new(),
                    tombstones: HashSet::new(),
                },
            );
            w.link(name);
        }
        w
    }

    pub fn link_gateway(&mut self) {
        if !self.gateway_linked {
            self.gateway_linked = true;
            let a = self.core.link_up(GW, proc(1), self.now);
            self.apply(a);
        }
    }

    pub fn unlink_gateway(&mut self) {
        if self.gateway_linked {
            self.gateway_linked = false;
            let a = self.core.link_down(GW, self.now);
            self.apply(a);
        }
    }

    pub fn link(&mut self, name: &'static str) {
        let s = self.stages.get_mut(name).expect("a stage");
        if s.linked {
            return;
        }
        s.linked = true;
        let p = s.proc.clone();
        let a = self.core.link_up(name, p, self.now);
        self.apply(a);
    }

    /// The link drops; the process goes on (writing, if it was).
    pub fn unlink(&mut self, name: &'static str) {
        let s = self.stages.get_mut(name).expect("a stage");
        if !s.linked {
            return;
        }
        s.linked = false;
        // What was in flight on the link is lost both ways.
        s.inbox.clear();
        s.outbox.clear();
        let a = self.core.link_down(name, self.now);
        self.apply(a);
    }

    /// The stage process dies; another starts under its name.
    pub fn restart(&mut self, name: &'static str) {
        self.unlink(name);
        self.next_pid += 1;
        let s = self.stages.get_mut(name).expect("a stage");
        let old = std::mem::replace(&mut s.proc, proc(self.next_pid));
        s.jobs.clear();
        s.tombstones.clear();
        self.dead.insert(old);
        self.link(name);
    }

    /// Who may write each block now: stage jobs writing directly, and
    /// receives in flight.
    pub fn writers(&self) -> HashMap<BlockId, HashSet<(RequestId, Lease)>> {
        let mut w: HashMap<BlockId, HashSet<(RequestId, Lease)>> = HashMap::new();
        for s in self.stages.values() {
            for j in s.jobs.iter().filter(|j| j.puts) {
                for b in &j.blocks {
                    w.entry(*b).or_default().insert((j.id, j.lease));
                }
            }
        }
        for key in &self.receiving {
            for b in self.attempt_blocks.get(key).into_iter().flatten() {
                w.entry(*b).or_default().insert(*key);
            }
        }
        w
    }

    /// Fails the test if any of `blocks` may be written by an attempt
    /// other than `owner`.
    pub fn check_free(
        &mut self,
        blocks: &[BlockId],
        owner: Option<(RequestId, Lease)>,
        what: &str,
    ) {
        let writers = self.writers();
        for b in blocks {
            for w in writers.get(b).into_iter().flatten() {
                assert_eq!(
                    Some(*w),
                    owner,
                    "{what}: block {} may still be written by attempt {w:?}",
                    b.0
                );
            }
        }
        self.checked += blocks.len();
    }

    pub fn apply(&mut self, actions: Vec<Action>) {
        let mut q: VecDeque<Action> = actions.into();
        while let Some(a) = q.pop_front() {
            let more = self.carry_out(a);
            for m in more.into_iter().rev() {
                q.push_front(m);
            }
        }
        assert_eq!(self.tokens_after_end, 0, "a token after the request ended");
        for (id, n) in &self.ended {
            assert!(*n <= 1, "request {} got {n} terminal events", id.0);
        }
    }

    pub fn carry_out(&mut self, a: Action) -> Vec<Action> {
        if std::env::var_os("WORLD_TRACE").is_some() {
            eprintln!(
                "  ACT {}",
                format!("{a:?}").chars().take(300).collect::<String>()
            );
        }
        let now = self.now;
        match a {
            Action::Send { to, msg } => {
                if to == GW {
                    return Vec::new();
                }
                if let Message::Prefill(p) = &msg {
                    if !p.warm {
                        let blocks = p
                            .targets
                            .first()
                            .map(|t| t.blocks.clone())
                            .unwrap_or_default();
                        self.check_free(&blocks, Some((p.id, p.lease)), "a prefill's target");
                        self.attempt_blocks.insert((p.id, p.lease), blocks);
                    }
                }
                if let Some(s) = self
                    .stages
                    .iter_mut()
                    .find(|(n, _)| **n == to)
                    .map(|(_, s)| s)
                {
                    if s.linked {
                        s.inbox.push_back(("d0", msg));
                    }
                }
                Vec::new()
            }
            Action::WriteKv { .. } | Action::FenceOpen { .. } => Vec::new(),
            Action::FenceClose { id, lease } => {
                // Some of the time a receive is still in flight.
                if u128::from(id.0).wrapping_add(lease.0) % 3 == 0 && self.ucx != UcxLanding::None {
                    self.receiving.insert((id, lease));
                    Vec::new()
                } else {
                    self.core.landing_drained(id, lease, now)
                }
            }
            Action::Stream { id, .. } => {
                self.streams.insert(id, 1 + (id.0 % 4) as u32);
                Vec::new()
            }
            Action::Token {
                id, context_full, ..
            } => {
                if self.ended.contains_key(&id) {
                    self.tokens_after_end += 1;
                    return Vec::new();
                }
                let left = self
                    .streams
                    .get_mut(&id)
                    .expect("a token of a started stream");
                *left -= 1;
                if *left == 0 || context_full {
                    self.streams.remove(&id);
                    return self.core.finish(id, FinishReason::Length, now);
                }
                Vec::new()
            }
            Action::End { id, event, .. } => {
                if matches!(event, GenerateEvent::Finished { .. }) {
                    self.finished += 1;
                }
                *self.ended.entry(id).or_default() += 1;
                self.streams.remove(&id);
                Vec::new()
            }
        }
    }

    pub fn submit(&mut self, len: usize, session: bool, pinned: bool, short_deadline: bool) {
        let id = RequestId(self.submitted.len() as u64 + 1);
        self.submitted.push(id);
        let g = Generate {
            id,
            prompt: (0..len.max(1) as u32)
                .map(|t| (t * 7 + id.0 as u32) % 100)
                .collect(),
            generated: Vec::new(),
            params: SamplingParams::greedy(8),
            deadline_ms: self.now + if short_deadline { 300 } else { 600_000 },
            session: session.then(|| format!("s{}", id.0 % 3)),
            pipeline: pinned.then(|| "p0".to_string()),
            trace: Default::default(),
        };
        if !self.gateway_linked {
            // Nobody could have sent it: it ends at once, as the gateway sees it.
            *self.ended.entry(id).or_default() += 1;
            return;
        }
        let a = self.core.submit(GW, g, self.now);
        self.apply(a);
    }

    pub fn cancel(&mut self, pick: usize) {
        let live: Vec<RequestId> = self
            .submitted
            .iter()
            .copied()
            .filter(|id| !self.ended.contains_key(id))
            .collect();
        if live.is_empty() || !self.gateway_linked {
            return;
        }
        let id = live[pick % live.len()];
        let a = self.core.cancel(GW, id, self.now);
        self.apply(a);
        // The gateway ends a cancelled request itself.
        self.ended.entry(id).or_insert(1);
        self.streams.remove(&id);
    }

    /// The stage handles the next message it got, as the real stages do.
    pub fn stage_reads(&mut self, name: &'static str) {
        let puts = self.ucx == UcxLanding::Puts;
        let s = self.stages.get_mut(name).expect("a stage");
        let Some((from, msg)) = s.inbox.pop_front() else {
            return;
        };
        if std::env::var_os("WORLD_TRACE").is_some() {
            eprintln!(
                "  READS {name} {}",
                format!("{msg:?}").chars().take(160).collect::<String>()
            );
        }
        let mut forward = None;
        match msg {
            Message::Prefill(p) if !p.warm => {
                if s.tombstones.contains(&(p.id, p.lease)) {
                    return;
                }
                s.jobs.push(Job {
                    id: p.id,
                    lease: p.lease,
                    blocks: p
                        .targets
                        .first()
                        .map(|t| t.blocks.clone())
                        .unwrap_or_default(),
                    puts: puts && s.pipeline == "p0",
                });
                // Stage 0 passes the request on.
                if s.pipeline == "p0" && s.index == 0 {
                    forward = Some(Message::Prefill(p));
                }
            }
            Message::PrefillAbort { id, lease, decode } => {
                let known = s.jobs.iter().any(|j| j.id == id && j.lease == lease);
                s.jobs.retain(|j| !(j.id == id && j.lease == lease));
                if s.index > 0 {
                    if from == "d0" && !known {
                        // Its request may still come from the stage before.
                        s.tombstones.insert((id, lease));
                    } else if from != "d0" {
                        // The stage before passed it on after the request:
                        // nothing of this attempt can come any more.
                        s.tombstones.remove(&(id, lease));
                    }
                }
                let stage = s.index;
                s.outbox.push_back(Message::KvStopped { id, lease, stage });
                if s.pipeline == "p0" && s.index == 0 && from == "d0" {
                    forward = Some(Message::PrefillAbort { id, lease, decode });
                }
            }
            _ => {}
        }
        if let Some(m) = forward {
            if let Some(next) = self.stages.get_mut("p0-s1") {
                if next.linked {
                    next.inbox.push_back(("p0-s0", m));
                }
            }
        }
    }

    /// The stage finishes its oldest job: the KV for both ranks, its
    /// notices, and from the last stage the first token.
    pub fn stage_works(&mut self, name: &'static str) {
        let corrupt = std::mem::take(&mut self.corrupt_next);
        let s = self.stages.get_mut(name).expect("a stage");
        if s.jobs.is_empty() {
            self.corrupt_next = corrupt;
            return;
        }
        let j = s.jobs.remove(0);
        let stage = s.index;
        for rank in 0..2u32 {
            let blocks: Vec<(BlockId, ByteBuf)> = j
                .blocks
                .iter()
                .map(|b| (*b, bytes(j.id, j.lease, stage, rank, *b)))
                .collect();
            let mut sum = Checksum::default();
            for (b, v) in &blocks {
                sum.add(*b, v);
            }
            if s.pipeline == "p0" {
                s.outbox.push_back(Message::KvLanded {
                    id: j.id,
                    lease: j.lease,
                    stage,
                    rank,
                    blocks: j.blocks.clone(),
                    put: j.puts,
                });
            } else {
                s.outbox.push_back(Message::Kv(KvChunk {
                    id: j.id,
                    lease: j.lease,
                    stage,
                    rank,
                    blocks,
                }));
            }
            let bad = corrupt && rank == 0;
            s.outbox.push_back(Message::KvDone(KvDone {
                id: j.id,
                lease: j.lease,
                stage,
                rank,
                blocks: j.blocks.len() as u32,
                checksum: sum.value() ^ u64::from(bad),
            }));
        }
        if s.last {
            s.outbox.push_back(Message::FirstToken {
                id: j.id,
                lease: j.lease,
                token: (j.id.0 % 90) as u32,
                logprob: -0.5,
                top: Vec::new(),
                queue_us: 1,
                compute_us: 2,
                prefilled: 3,
            });
        }
    }

    /// Decode gets the stage's next message.
    pub fn deliver(&mut self, name: &'static str) {
        let s = self.stages.get_mut(name).expect("a stage");
        if !s.linked {
            return;
        }
        let Some(msg) = s.outbox.pop_front() else {
            return;
        };
        self.sent_log.push((name, msg.clone()));
        if std::env::var_os("WORLD_TRACE").is_some() {
            eprintln!(
                "  DELIVER {name} {}",
                format!("{msg:?}").chars().take(200).collect::<String>()
            );
        }
        self.decode_gets(name, msg);
    }

    /// What the decode shell does with a stage's message.
    pub fn decode_gets(&mut self, from: &'static str, msg: Message) {
        let now = self.now;
        let a = match msg {
            Message::Kv(c) => self.core.kv_chunk(from, c, now),
            Message::KvDone(d) => self.core.kv_done(from, d, now),
            Message::KvLanded {
                id,
                lease,
                stage,
                rank,
                blocks,
                put,
            } => match self.core.landed_plan(from, id, lease, stage, rank) {
                // The blocks are in the pool; read back, they are what it wrote.
                Some(_) => {
                    let chunk = KvChunk {
                        id,
                        lease,
                        stage,
                        rank,
                        blocks: blocks
                            .iter()
                            .map(|b| (*b, bytes(id, lease, stage, rank, *b)))
                            .collect(),
                    };
                    self.core.kv_landed(from, chunk, put, now)
                }
                None => Vec::new(),
            },
            Message::FirstToken {
                id,
                lease,
                token,
                logprob,
                ..
            } => self.core.first_token(
                from,
                id,
                lease,
                Sampled::new(token, logprob),
                (1, 2, 3),
                now,
            ),
            Message::KvStopped { id, lease, stage } => {
                self.core.kv_stopped(from, id, lease, stage, now)
            }
            Message::PrefillFailed {
                id,
                lease,
                class,
                message,
            } => self
                .core
                .prefill_failed(from, id, lease, class, message, now),
            _ => Vec::new(),
        };
        self.apply(a);
    }

    /// A linked stage sends what only others may: a cancel or a request
    /// under the gateway's ids, and stops for another stage's writes.
    /// None of it may change anything.
    pub fn forge(&mut self, pick: usize, who: usize) {
        let from = STAGES[who % STAGES.len()];
        if !self.stages.get(from).is_some_and(|s| s.linked) {
            return;
        }
        let now = self.now;
        let live: Vec<RequestId> = self
            .submitted
            .iter()
            .copied()
            .filter(|id| !self.ended.contains_key(id))
            .collect();
        if let Some(&id) = live.get(pick % live.len().max(1)) {
            let a = self.core.cancel(from, id, now);
            self.apply(a);
            let g = Generate {
                id,
                prompt: vec![1, 2, 3],
                generated: Vec::new(),
                params: SamplingParams::greedy(8),
                deadline_ms: now + 600_000,
                session: None,
                pipeline: None,
                trace: Default::default(),
            };
            let a = self.core.submit(from, g, now);
            self.apply(a);
        }
        let fresh = Generate {
            id: RequestId(1_000_000 + pick as u64 % 1_000),
            prompt: vec![1, 2, 3],
            generated: Vec::new(),
            params: SamplingParams::greedy(8),
            deadline_ms: now + 600_000,
            session: None,
            pipeline: None,
            trace: Default::default(),
        };
        let a = self.core.submit(from, fresh, now);
        assert!(a.is_empty(), "a stage's request was taken: {a:?}");
        let mut keys: Vec<(RequestId, Lease)> = self.attempt_blocks.keys().copied().collect();
        keys.sort_by_key(|k| (k.0, k.1 .0));
        if let Some(&(id, lease)) = keys.get(pick % keys.len().max(1)) {
            // Every stage index but its own (about its own writes a stage
            // is the authority).
            let own = self.stages[from].index;
            for stage in (0..2).filter(|s| *s != own) {
                let a = self.core.kv_stopped(from, id, lease, stage, now);
                self.apply(a);
            }
        }
    }

    pub fn drain_one(&mut self, pick: usize) {
        let mut keys: Vec<(RequestId, Lease)> = self.receiving.iter().copied().collect();
        keys.sort_by_key(|k| (k.0, k.1 .0));
        if keys.is_empty() {
            return;
        }
        let k = keys[pick % keys.len()];
        self.receiving.remove(&k);
        let a = self.core.landing_drained(k.0, k.1, self.now);
        self.apply(a);
    }

    /// One decode step: the blocks it computes into must be its own.
    pub fn step(&mut self, fail: bool) {
        let (plan, a) = self.core.plan_step(self.now);
        self.apply(a);
        let Some(plan) = plan else {
            return;
        };
        for s in &plan.spans {
            let blocks = s.blocks.clone();
            self.check_free(&blocks, None, "a step's blocks");
        }
        let result = if fail {
            Err("a rank failed".to_string())
        } else {
            Ok(plan
                .spans
                .iter()
                .enumerate()
                .map(|(i, _)| Sampled::new((i as u32 * 13 + 5) % 90, -1.0))
                .collect())
        };
        let a = self.core.step_done(plan, result, 100, self.now);
        self.apply(a);
    }

    pub fn tick(&mut self, ms: u64) {
        self.now += ms;
        let a = self.core.tick(self.now);
        self.apply(a);
        for p in self.core.processes_to_check() {
            if self.dead.contains(&p) {
                let a = self.core.process_gone(&p, self.now);
                self.apply(a);
            }
        }
    }

    /// Faults stop: links come back, every process works and answers,
    /// receives complete, time passes. Everything must end.
    pub fn settle(&mut self) {
        self.corrupt_next = false;
        self.link_gateway();
        for name in STAGES {
            self.link(name);
        }
        for round in 0..400 {
            for name in STAGES {
                while !self.stages[name].inbox.is_empty() {
                    self.stage_reads(name);
                }
                while !self.stages[name].jobs.is_empty() {
                    self.stage_works(name);
                }
                while !self.stages[name].outbox.is_empty() {
                    self.deliver(name);
                }
            }
            while !self.receiving.is_empty() {
                self.drain_one(0);
            }
            self.step(false);
            self.tick(if round % 10 == 9 { 1_500 } else { 20 });
            let idle = self.core.requests() == 0
                && self.core.fenced_attempts() == 0
                && self
                    .stages
                    .values()
                    .all(|s| s.inbox.is_empty() && s.outbox.is_empty() && s.jobs.is_empty());
            if idle {
                break;
            }
        }
        for id in &self.submitted {
            assert_eq!(
                self.ended.get(id),
                Some(&1),
                "request {} did not end exactly once",
                id.0
            );
        }
        if std::env::var_os("TANDEM_WORLD_STATS").is_some() {
            let k = &self.core.admission.counters;
            eprintln!(
                "requests {} finished {} checked blocks {} retries {} checksum failures {} local {}",
                self.submitted.len(),
                self.finished,
                self.checked,
                k.retries,
                k.checksum_failures,
                self.core.local_prefills
            );
        }
        assert_eq!(self.core.requests(), 0);
        assert_eq!(
            self.core.fenced_attempts(),
            0,
            "a quarantine was never released"
        );
        assert_eq!(self.core.admission.quarantined_blocks(), 0);
        assert_eq!(self.core.admission.used_blocks(), 0, "blocks leaked");
        for p in &self.core.cfg.pipelines {
            assert_eq!(self.core.inflight(&p.name), 0);
        }
    }
}
