//! Decode's request logic as a plain state machine: no links, no threads,
//! no clock. The process around it ([`crate::group`]) feeds it what
//! happens — a request arrives or is cancelled, a peer links or is lost, a
//! stage sends KV, a notice, the first token or a failure, a decode step
//! ran, time passed — with `now` in milliseconds since the Unix epoch, and
//! carries out the [`Action`]s it returns: messages to send, KV to write
//! into a rank's pool, landing fences to open and close, tokens to stream.
//!
//! It owns everything that decides a request's fate:
//! - [`Admission`]: the bounded queue, blocks, leases, retries, the prefix
//!   cache and the quarantine of blocks a peer may still write;
//! - each request's typed state ([`State`]): queued, fetching its KV from a
//!   pipeline under a lease, prefilling here, or running;
//! - which pipeline an attempt goes to (the session's, else the one with
//!   the fewest attempts in flight, counted from the states themselves);
//! - fences: an abandoned attempt's blocks are reused only once nothing
//!   can write them any more — every stage that may write them directly
//!   confirmed it stopped (or its process is known dead), and this group's
//!   own UCX worker finished every receive into them. Never because time
//!   passed, and never because a link dropped (a link can blip while the
//!   stage process, still mapping the pool, goes on writing).
//! - which sequences the next step runs, and a local prefill's chunk.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use tandem_kvtransfer::{reshard_plan, CopyRun, Incoming, PoolDesc, Verdict};
use tandem_model::{BlockId, Sampled, Sampler, SamplingParams};
use tandem_wire::messages::ByteBuf;
use tandem_wire::messages::{
    Accounting, ErrorClass, Generate, GenerateEvent, Lease, Message, ProcessId, RequestId,
};

use crate::admission::{self, Admission, Keys, Limits, Rejection};

mod fence;
mod fetch;
mod step;
#[cfg(test)]
mod tests;

pub use step::StepPlan;

/// A prefill pipeline as the cluster file gives it.
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    pub name: String,
    /// Stage node names and their layer ranges, in order.
    pub stages: Vec<(String, Range<usize>)>,
    /// Its stages may send KV over UCX (else only over QUIC).
    pub ucx: bool,
}

/// How KV can land in this group's pools besides the QUIC link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UcxLanding {
    /// No UCX here.
    None,
    /// Active messages, received by this process's UCX worker.
    Messages,
    /// Also one-sided writes by stages on this host into the mapped pools.
    Puts,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    /// The cluster's gateway: the only peer whose requests are taken.
    pub gateway: String,
    pub tp: usize,
    pub context: usize,
    pub vocab: usize,
    pub limits: Limits,
    /// Uncached suffixes this short are prefilled here...
    pub local_prefill_max: usize,
    /// ...in chunks of at most this many tokens, one per decode step.
    pub local_chunk: usize,
    /// Dense weights are loaded: a pass carrying a prefill chunk runs on them.
    pub dense_prefill: bool,
    pub pipelines: Vec<PipelineSpec>,
    /// Each rank's pool, for the reshard plans.
    pub rank_descs: Vec<PoolDesc>,
    pub ucx: UcxLanding,
    /// The vocabulary for requests with a grammar (structured outputs).
    pub grammar: Option<tandem_model::GrammarEnv>,
}

/// What the process around the core does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Sends a message to a linked peer.
    Send { to: String, msg: Message },
    /// Writes a chunk's blocks into a rank's pool along `runs`; a failure
    /// comes back as [`Core::kv_write_failed`].
    WriteKv {
        id: RequestId,
        lease: Lease,
        rank: u32,
        runs: Vec<CopyRun>,
        blocks: Vec<(BlockId, ByteBuf)>,
    },
    /// Lets the attempt's stages land active messages in its blocks.
    FenceOpen {
        id: RequestId,
        lease: Lease,
        allowed: Vec<Vec<BlockId>>,
        plans: HashMap<(u32, u32), Vec<CopyRun>>,
    },
    /// Refuses anything more for the attempt; once nothing is being
    /// received into its blocks, the process calls [`Core::landing_drained`].
    FenceClose { id: RequestId, lease: Lease },
    /// The request starts streaming; `generated` tokens were streamed by an
    /// earlier attempt elsewhere.
    Stream {
        id: RequestId,
        params: SamplingParams,
        generated: Vec<u32>,
    },
    /// A token to stream as text; after the last, the process calls
    /// [`Core::finish`]. `context_full`: no room for another.
    Token {
        id: RequestId,
        client: String,
        index: u32,
        token: u32,
        logprob: f32,
        top: Vec<(u32, f32)>,
        context_full: bool,
    },
    /// The request's one terminal event (finished or failed).
    End {
        id: RequestId,
        client: String,
        event: GenerateEvent,
    },
}

/// One attempt at a request's KV by a pipeline.
pub(crate) struct Attempt {
    pub lease: Lease,
    pub pipeline: String,
    pub incoming: Incoming,
    pub verdict: Option<Verdict>,
    pub first: Option<Sampled>,
    pub sent: u64,
    /// When the last stage's first token arrived: it is sent right after
    /// the last chunk's compute, so from here to verified KV is the wait
    /// for KV still in flight.
    pub first_at: u64,
    /// Some of its KV came over UCX.
    pub over_ucx: bool,
    /// Stages that may write its blocks directly, with the process each
    /// is (a stage may appear with several processes: one that died and
    /// the one that replaced it).
    pub writers: Vec<(u32, ProcessId)>,
    /// Verified, its landing closed: it completes once this side's UCX
    /// worker receives nothing more into its blocks.
    pub closing: bool,
}

/// A prompt prefilled on this group's ranks, chunk by chunk.
#[derive(Debug)]
pub(crate) struct Local {
    pub lease: Lease,
    pub tokens: Vec<u32>,
    pub blocks: Vec<BlockId>,
    pub cached: usize,
    /// Tokens whose KV is in the blocks.
    pub done: usize,
    pub compute_us: u64,
    pub started: Option<u64>,
}

pub(crate) struct Running {
    pub tokens: Vec<u32>,
    /// Where the answer starts in `tokens` (the penalties count the rest).
    pub prompt_len: usize,
    pub blocks: Vec<BlockId>,
    /// Tokens whose KV is in the blocks.
    pub computed: usize,
    pub sampler: Sampler,
    /// Tokens streamed so far, counting an earlier attempt's.
    pub index: u32,
}

/// Where a request stands.
pub(crate) enum State {
    /// In the admission queue: not yet admitted, or between attempts.
    Queued,
    Fetching(Attempt),
    Local(Local),
    Running(Running),
}

pub(crate) struct Request {
    pub gen: Generate,
    /// The gateway that asked; events go back to it.
    pub client: String,
    pub acct: Accounting,
    pub submitted: u64,
    pub state: State,
    /// The pipeline whose attempt filled its KV (warmed after the turn).
    pub filled_by: Option<String>,
    /// Its grammar, compiled once on arrival, nothing consumed.
    pub grammar: Option<tandem_model::grammar::Constraint>,
}

/// The decode group's request logic.
pub struct Core {
    pub(crate) cfg: Config,
    pub admission: Admission,
    pub(crate) reqs: HashMap<RequestId, Request>,
    /// Linked peers and the process each is.
    pub(crate) linked: HashMap<String, ProcessId>,
    /// Local prefills, oldest first.
    pub(crate) local: VecDeque<RequestId>,
    pub(crate) fences: HashMap<(RequestId, Lease), fence::Fence>,
    plans: HashMap<(String, u32, u32), Vec<CopyRun>>,
    pub local_prefills: u64,
}

pub(crate) fn class_of(why: &Rejection) -> (ErrorClass, String) {
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

impl Core {
    pub fn new(cfg: Config, kv_blocks: usize) -> Core {
        Core::with_keys(cfg, kv_blocks, Keys::from_os())
    }

    /// A core whose attempt keys come from `keys` (tests: a seeded
    /// generator, so that a failing case replays).
    pub fn with_keys(cfg: Config, kv_blocks: usize, keys: Keys) -> Core {
        Core {
            admission: Admission::with_keys(cfg.limits, kv_blocks, keys),
            cfg,
            reqs: HashMap::new(),
            linked: HashMap::new(),
            local: VecDeque::new(),
            fences: HashMap::new(),
            plans: HashMap::new(),
            local_prefills: 0,
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Requests here, in any state.
    pub fn requests(&self) -> usize {
        self.reqs.len()
    }

    /// Whether a step has work: a running sequence or a local prefill.
    pub fn busy(&self) -> bool {
        !self.local.is_empty()
            || self
                .reqs
                .values()
                .any(|r| matches!(r.state, State::Running(_)))
    }

    pub fn pipelines(&self) -> &[PipelineSpec] {
        &self.cfg.pipelines
    }

    /// Pipelines whose every stage is linked.
    pub fn pipelines_up(&self) -> Vec<&PipelineSpec> {
        self.cfg
            .pipelines
            .iter()
            .filter(|p| p.stages.iter().all(|s| self.linked.contains_key(&s.0)))
            .collect()
    }

    /// Attempts in flight on `pipeline`, counted from the requests' states.
    pub fn inflight(&self, pipeline: &str) -> usize {
        self.reqs
            .values()
            .filter(|r| matches!(&r.state, State::Fetching(a) if a.pipeline == pipeline))
            .count()
    }

    /// Abandoned attempts whose blocks wait until nothing writes them.
    pub fn fenced_attempts(&self) -> usize {
        self.fences.len()
    }

    /// Whether `lease` is the request's current attempt at its KV.
    pub fn is_current(&self, id: RequestId, lease: Lease) -> bool {
        matches!(self.reqs.get(&id).map(|r| &r.state), Some(State::Fetching(a)) if a.lease == lease)
    }

    pub(crate) fn plan(&mut self, pipeline: &str, stage: u32, rank: u32) -> Option<Vec<CopyRun>> {
        let key = (pipeline.to_string(), stage, rank);
        if let Some(p) = self.plans.get(&key) {
            return Some(p.clone());
        }
        let p = self.cfg.pipelines.iter().find(|p| p.name == pipeline)?;
        let (_, layers) = p.stages.get(stage as usize)?;
        let dst = self.cfg.rank_descs.get(rank as usize)?;
        let heads = self.cfg.rank_descs.iter().map(|d| d.heads.end).max()?;
        let src = PoolDesc::new(
            layers.clone(),
            0..heads,
            dst.layout.block_size,
            dst.layout.head_dim,
            dst.layout.dtype,
        );
        let plan = reshard_plan(&src, dst).ok()?;
        self.plans.insert(key, plan.clone());
        Some(plan)
    }

    fn send(out: &mut Vec<Action>, to: &str, msg: Message) {
        out.push(Action::Send {
            to: to.to_string(),
            msg,
        });
    }

    fn event(out: &mut Vec<Action>, client: &str, id: RequestId, event: GenerateEvent) {
        out.push(Action::End {
            id,
            client: client.to_string(),
            event,
        });
    }

    /// A new request from the gateway `client`.
    pub fn submit(&mut self, client: &str, g: Generate, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if client != self.cfg.gateway {
            tracing::warn!(
                "{}: {client} is not the gateway; its request is ignored",
                self.cfg.name
            );
            return out;
        }
        let id = g.id;
        let total = g.prompt.len() + g.generated.len();
        let bad = if g.prompt.is_empty() {
            Some("the prompt is empty".to_string())
        } else if total >= self.cfg.context {
            Some(format!(
                "the prompt has {total} tokens; the context holds {}",
                self.cfg.context
            ))
        } else if let Err(e) = g.params.validate() {
            Some(e.to_string())
        } else if g
            .prompt
            .iter()
            .chain(&g.generated)
            .any(|&t| t as usize >= self.cfg.vocab)
        {
            Some("a token id is outside the vocabulary".into())
        } else if self.reqs.contains_key(&id) {
            Some("a request with this id is already running".into())
        } else {
            None
        };
        let mut bad = bad;
        let grammar = match (&g.params.grammar, bad.is_some()) {
            (Some(gr), false) => match self.cfg.grammar.as_ref().map(|env| env.compile(gr)) {
                Some(Ok(c)) => Some(c),
                Some(Err(e)) => {
                    bad = Some(e.to_string());
                    None
                }
                None => {
                    bad = Some("this decode group has no grammar support".into());
                    None
                }
            },
            _ => None,
        };
        let fail = bad.map(|m| (ErrorClass::BadRequest, m)).or_else(|| {
            (g.deadline_ms <= now).then(|| {
                (
                    ErrorClass::DeadlineExceeded,
                    "the request's deadline passed before decode got it".to_string(),
                )
            })
        });
        if let Some((class, message)) = fail {
            Self::event(
                &mut out,
                client,
                id,
                GenerateEvent::Failed { class, message },
            );
            return out;
        }
        // A colocated group (no pipelines in the cluster) prefills everything
        // itself; one whose pipelines are all down sends the request back,
        // so the gateway can pick a group that has one.
        if !self.cfg.pipelines.is_empty() && self.pipelines_up().is_empty() {
            let class = ErrorClass::NodeLost;
            let message = "no prefill pipeline is linked to this decode group".into();
            Self::event(
                &mut out,
                client,
                id,
                GenerateEvent::Failed { class, message },
            );
            return out;
        }
        let mut tokens = g.prompt.clone();
        tokens.extend(&g.generated);
        self.reqs.insert(
            id,
            Request {
                gen: g,
                client: client.to_string(),
                acct: Accounting {
                    nodes: vec![self.cfg.name.clone()],
                    ..Default::default()
                },
                submitted: now,
                state: State::Queued,
                filled_by: None,
                grammar,
            },
        );
        let actions = self.admission.submit(id, &tokens, now);
        self.admitted(actions, now, &mut out);
        out
    }

    /// Carries out what admission decided.
    pub(crate) fn admitted(
        &mut self,
        actions: Vec<admission::Action>,
        now: u64,
        out: &mut Vec<Action>,
    ) {
        for a in actions {
            match a {
                admission::Action::Prefill {
                    id,
                    lease,
                    blocks,
                    cached,
                    attempt,
                } => self.start_prefill(id, lease, blocks, cached, attempt, now, out),
                admission::Action::Abandon { id, lease } => self.abandon(id, lease, now, out),
                admission::Action::Start { id, blocks } => self.start(id, blocks, out),
                admission::Action::Reject { id, why } => {
                    let (class, message) = class_of(&why);
                    if let Some(r) = self.reqs.remove(&id) {
                        self.local.retain(|l| *l != id);
                        Self::event(out, &r.client, id, GenerateEvent::Failed { class, message });
                    }
                }
            }
        }
    }

    /// Ends a request with an error: its blocks freed (or quarantined),
    /// its attempt abandoned, its client told.
    pub(crate) fn fail(
        &mut self,
        id: RequestId,
        class: ErrorClass,
        message: String,
        now: u64,
        out: &mut Vec<Action>,
    ) {
        let Some(r) = self.reqs.remove(&id) else {
            return;
        };
        tracing::info!("{}: request {} failed: {message}", self.cfg.name, id.0);
        self.local.retain(|l| *l != id);
        let client = r.client.clone();
        let actions = self.admission.release(id, now);
        if let State::Fetching(a) = r.state {
            self.end_attempt(id, a, now, out);
        }
        Self::event(out, &client, id, GenerateEvent::Failed { class, message });
        self.admitted(actions, now, out);
    }

    /// The gateway cancelled the request (or its client left).
    pub fn cancel(&mut self, from: &str, id: RequestId, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        // Only the gateway that asked may cancel.
        let Some(r) = self.reqs.get(&id).filter(|r| r.client == from) else {
            return out;
        };
        let _ = r;
        tracing::debug!("{}: request {} cancelled", self.cfg.name, id.0);
        let r = self.reqs.remove(&id).expect("checked above");
        self.local.retain(|l| *l != id);
        let actions = self.admission.release(id, now);
        if let State::Fetching(a) = r.state {
            self.end_attempt(id, a, now, &mut out);
        }
        self.admitted(actions, now, &mut out);
        out
    }

    /// A message from `from`, for every kind the core takes; a
    /// [`Message::KvLanded`] comes back: its blocks must be checked in the
    /// landing table and read back from the pool first ([`Core::landed_plan`],
    /// [`Core::kv_landed`]).
    pub fn message(&mut self, from: &str, msg: Message, now: u64) -> Result<Vec<Action>, Message> {
        Ok(match msg {
            Message::Generate(g) => self.submit(from, g, now),
            Message::Cancel { id } => self.cancel(from, id, now),
            Message::KvStopped { id, lease, stage } => self.kv_stopped(from, id, lease, stage, now),
            Message::Kv(k) => self.kv_chunk(from, k, now),
            Message::KvDone(d) => self.kv_done(from, d, now),
            Message::FirstToken {
                id,
                lease,
                token,
                logprob,
                top,
                queue_us,
                compute_us,
                prefilled,
            } => self.first_token(
                from,
                id,
                lease,
                Sampled {
                    token,
                    logprob,
                    top,
                },
                (queue_us, compute_us, prefilled),
                now,
            ),
            Message::PrefillFailed {
                id,
                lease,
                class,
                message,
            } => self.prefill_failed(from, id, lease, class, message, now),
            m @ Message::KvLanded { .. } => return Err(m),
            Message::Heartbeat { .. } => Vec::new(),
            other => {
                tracing::warn!(
                    "{}: ignoring an unexpected message from {from}: {:?}",
                    self.cfg.name,
                    std::mem::discriminant(&other)
                );
                Vec::new()
            }
        })
    }

    /// A peer linked (again).
    pub fn link_up(&mut self, peer: &str, process: ProcessId, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(old) = self.linked.insert(peer.to_string(), process) {
            // It replaced a link not yet reported down: whatever was in
            // flight on the old one is lost.
            let _ = old;
            self.lost(peer, now, &mut out);
        }
        // Stages that have not confirmed an abandoned attempt hear of it again.
        self.remind(peer, &mut out);
        out
    }

    /// A peer's link went down.
    pub fn link_down(&mut self, peer: &str, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        self.linked.remove(peer);
        self.lost(peer, now, &mut out);
        out
    }

    fn lost(&mut self, peer: &str, now: u64, out: &mut Vec<Action>) {
        // Requests of a lost gateway have no one to stream to.
        let mut orphans: Vec<RequestId> = self
            .reqs
            .iter()
            .filter(|(_, r)| r.client == peer)
            .map(|(id, _)| *id)
            .collect();
        orphans.sort();
        for id in orphans {
            let message = format!("the gateway {peer} is gone");
            self.fail(id, ErrorClass::Cancelled, message, now, out);
        }
        // Attempts on a pipeline that lost a stage are retried.
        let mut lost: Vec<(RequestId, Lease)> = self
            .reqs
            .iter()
            .filter_map(|(id, r)| match &r.state {
                State::Fetching(a) => {
                    let p = self.cfg.pipelines.iter().find(|p| p.name == a.pipeline)?;
                    p.stages
                        .iter()
                        .any(|s| s.0 == peer)
                        .then_some((*id, a.lease))
                }
                _ => None,
            })
            .collect();
        lost.sort_by_key(|(id, _)| *id);
        for (id, lease) in lost {
            self.kv_lost(id, lease, now, out);
        }
    }

    /// Time passes: attempts past their timeout are retried, requests past
    /// their deadline before streaming end with a deadline error.
    pub fn tick(&mut self, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let mut late: Vec<RequestId> = self
            .reqs
            .iter()
            .filter(|(_, r)| !matches!(r.state, State::Running(_)) && r.gen.deadline_ms <= now)
            .map(|(id, _)| *id)
            .collect();
        late.sort();
        for id in late {
            let message = "the request's deadline passed before its first token".into();
            self.fail(id, ErrorClass::DeadlineExceeded, message, now, &mut out);
        }
        let actions = self.admission.tick(now);
        self.admitted(actions, now, &mut out);
        out
    }
}
