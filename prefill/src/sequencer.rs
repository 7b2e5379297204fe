//! A stage's chunk sequencer as a plain state machine: which prompts wait,
//! which run (with their blocks in the stage's pool and prefix cache), the
//! chunks queued to compute, and what aborts and lost peers mean. No links,
//! no model, no clock of its own: the stage ([`crate::Stage`]) feeds it
//! what arrives (with the time) and sends what it returns.
//!
//! Stage 0 receives prefill requests from decode groups and cuts each
//! prompt into chunks; a later stage receives each request from the stage
//! before, then its chunks' hidden states. A request aborted before it got
//! here (decode's abort overtaking the stage before's request) leaves a
//! tombstone: the stage has said it stopped, so a request arriving later
//! is refused. The stage before passes the abort on after the request on
//! the same link, which clears the tombstone: nothing more can come.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use tandem_kvtransfer::{Outgoing, PoolDesc};
use tandem_model::{block_hashes, BlockId, Input, PrefixCache};
use tandem_wire::messages::{Activations, ErrorClass, Lease, Message, PrefillRequest, RequestId};

pub(crate) type Key = (RequestId, Lease);

/// A request being prefilled here.
pub(crate) struct Req {
    pub req: PrefillRequest,
    /// Its blocks in this stage's pool.
    pub local: Vec<BlockId>,
    /// Its transfer to decode (taken while a chunk's KV is gathered).
    pub out: Option<Outgoing>,
    /// Blocks of the request already sent (indices into its block list).
    pub sent: usize,
    pub arrived: Instant,
    pub started: Instant,
    pub compute: Duration,
}

/// One chunk to compute.
pub(crate) struct Work {
    pub key: Key,
    pub pos: usize,
    pub n: usize,
    pub input: Input,
    /// Of a cache-warming pass: runs after everything else.
    pub warm: bool,
}

/// What the stage sends.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Send {
    pub to: String,
    pub msg: Message,
}

/// A bounded set of aborted attempts (the oldest forgotten first).
#[derive(Debug, Default)]
struct Tombstones {
    set: HashSet<Key>,
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

pub(crate) struct SeqConfig {
    /// This stage's index in its pipeline, and the names of the stages
    /// before and after it.
    pub index: usize,
    pub prev: Option<String>,
    pub next: Option<String>,
    /// The cluster's decode groups: the only peers that send stage 0
    /// requests and abort them.
    pub decode_groups: Vec<String>,
    /// Prompt tokens per chunk.
    pub chunk: usize,
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub n_layers: usize,
    /// The stage's pool: its layers, every KV head.
    pub desc: PoolDesc,
}

pub(crate) struct Sequencer {
    cfg: SeqConfig,
    /// The stage's pool, with a prefix cache keyed like decode's.
    pub cache: PrefixCache,
    pub waiting: VecDeque<PrefillRequest>,
    pub reqs: HashMap<Key, Req>,
    work: VecDeque<Work>,
    /// Chunks that arrived for prompts still waiting to start.
    early: HashMap<Key, Vec<Work>>,
    tombstones: Tombstones,
    /// The next stage is linked (a prompt starts only then).
    next_linked: bool,
}

fn failed(req: &PrefillRequest, class: ErrorClass, message: String) -> Send {
    tracing::warn!("prefill of request {} failed: {message}", req.id.0);
    Send {
        to: req.decode.clone(),
        msg: Message::PrefillFailed {
            id: req.id,
            lease: req.lease,
            class,
            message,
        },
    }
}

impl Sequencer {
    pub fn new(cfg: SeqConfig, blocks: usize) -> Sequencer {
        Sequencer {
            cfg,
            cache: PrefixCache::new(blocks),
            waiting: VecDeque::new(),
            reqs: HashMap::new(),
            work: VecDeque::new(),
            early: HashMap::new(),
            tombstones: Tombstones::default(),
            next_linked: false,
        }
    }

    pub fn index(&self) -> usize {
        self.cfg.index
    }

    pub fn next(&self) -> Option<&str> {
        self.cfg.next.as_deref()
    }

    /// Whether `from` may send this stage a request for decode group
    /// `decode`, or abort one: at stage 0 only that decode group itself,
    /// later only the stage before (for a real decode group); a decode
    /// group may also abort at any stage.
    fn may_speak_for(&self, from: &str, decode: &str, abort: bool) -> bool {
        let is_group = self.cfg.decode_groups.iter().any(|g| g == decode);
        let from_prev = self.cfg.prev.as_deref() == Some(from);
        is_group
            && if self.cfg.index == 0 {
                from == decode
            } else {
                from_prev || (abort && from == decode)
            }
    }

    /// A prefill request, from decode (stage 0) or the stage before.
    pub fn prefill(&mut self, from: &str, req: PrefillRequest, now: Instant) -> Vec<Send> {
        let mut out = Vec::new();
        if !self.may_speak_for(from, &req.decode, false) {
            tracing::warn!(
                "{from} may not send this stage a request for {:?}; ignored",
                req.decode
            );
            return out;
        }
        // Aborted before it got here: confirmed stopped, so refused.
        if self.tombstones.contains(&(req.id, req.lease)) {
            tracing::debug!("request {} was aborted before it arrived", req.id.0);
            return out;
        }
        if let Err(why) = self.check(&req) {
            out.push(failed(&req, ErrorClass::BadRequest, why));
            return out;
        }
        self.waiting.push_back(req);
        self.start_waiting(now, &mut out);
        out
    }

    /// Stop the attempt: from decode, or passed on by the stage before.
    /// Says so to decode (nothing of this stage writes the attempt's blocks
    /// any more: chunks run on the stage's one thread, between whose chunks
    /// this is read) and, at stage 0, passes it on.
    pub fn abort(
        &mut self,
        from: &str,
        id: RequestId,
        lease: Lease,
        decode: String,
        now: Instant,
    ) -> Vec<Send> {
        let mut out = Vec::new();
        if !self.may_speak_for(from, &decode, true) {
            tracing::warn!("{from} may not abort {decode:?}'s requests here; ignored");
            return out;
        }
        // The attempt is decode's: another group cannot abort it.
        let owner = self
            .reqs
            .get(&(id, lease))
            .map(|r| r.req.decode.as_str())
            .or_else(|| {
                self.waiting
                    .iter()
                    .find(|r| (r.id, r.lease) == (id, lease))
                    .map(|r| r.decode.as_str())
            });
        if owner.is_some_and(|o| o != decode) {
            tracing::warn!("{from} named {decode:?} aborting another group's attempt; ignored");
            return out;
        }
        let key = (id, lease);
        let known =
            self.reqs.contains_key(&key) || self.waiting.iter().any(|r| (r.id, r.lease) == key);
        self.waiting.retain(|r| !(r.id == id && r.lease == lease));
        self.drop_req(key, false, now, &mut out);
        if self.cfg.index > 0 {
            if from == decode && !known {
                // Its request may still come from the stage before.
                self.tombstones.insert(key);
            } else if from != decode {
                self.tombstones.remove(&key);
            }
        }
        out.push(Send {
            to: decode.clone(),
            msg: Message::KvStopped {
                id,
                lease,
                stage: self.cfg.index as u32,
            },
        });
        if from == decode {
            if let Some(next) = &self.cfg.next {
                out.push(Send {
                    to: next.clone(),
                    msg: Message::PrefillAbort { id, lease, decode },
                });
            }
        }
        out
    }

    /// A chunk's hidden states from the stage before.
    pub fn activations(&mut self, from: &str, a: Activations) {
        if self.cfg.prev.as_deref() != Some(from) {
            tracing::warn!("activations from {from}, not the stage before; ignored");
            return;
        }
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
            // Its prompt waits here (blocks, or the next stage): keep the
            // chunk until it starts.
            self.early.entry(key).or_default().push(w);
        }
    }

    /// A peer linked: prompts waiting for the next stage may start.
    pub fn link_up(&mut self, peer: &str, now: Instant) -> Vec<Send> {
        let mut out = Vec::new();
        if self.cfg.next.as_deref() == Some(peer) {
            self.next_linked = true;
        }
        self.start_waiting(now, &mut out);
        out
    }

    /// Work that depended on `peer` cannot finish: a lost decode group's
    /// requests are dropped, and every request is failed (to its decode
    /// group) when the next stage is lost.
    pub fn link_down(&mut self, peer: &str, now: Instant) -> Vec<Send> {
        let mut out = Vec::new();
        let next_lost = self.cfg.next.as_deref() == Some(peer);
        if next_lost {
            self.next_linked = false;
        }
        let mut keys: Vec<Key> = self
            .reqs
            .iter()
            .filter(|(_, r)| r.req.decode == peer || next_lost)
            .map(|(k, _)| *k)
            .collect();
        keys.sort_by_key(|k| (k.0, k.1 .0));
        for k in keys {
            if let Some(r) = self.reqs.get(&k) {
                if r.req.decode != peer {
                    out.push(failed(
                        &r.req,
                        ErrorClass::NodeLost,
                        format!("prefill stage {peer} was lost"),
                    ));
                }
            }
            self.drop_req(k, false, now, &mut out);
        }
        self.waiting.retain(|r| r.decode != peer);
        let waiting: Vec<Key> = self.waiting.iter().map(|r| (r.id, r.lease)).collect();
        self.early.retain(|k, _| waiting.contains(k));
        out
    }

    /// The next chunk to compute: requests someone waits for before cache
    /// warming.
    pub fn next_work(&mut self) -> Option<Work> {
        let i = self
            .work
            .iter()
            .position(|w| !w.warm)
            .or((!self.work.is_empty()).then_some(0))?;
        self.work.remove(i)
    }

    /// A warming chunk that yielded to real work: first again, its
    /// request's later chunks must follow it.
    pub fn requeue_front(&mut self, w: Work) {
        self.work.push_front(w);
    }

    pub fn has_work(&self) -> bool {
        !self.work.is_empty()
    }

    /// The request's chunk failed: its decode group hears why.
    pub fn chunk_failed(
        &mut self,
        key: Key,
        class: ErrorClass,
        message: String,
        now: Instant,
    ) -> Vec<Send> {
        let mut out = Vec::new();
        if let Some(r) = self.reqs.get(&key) {
            out.push(failed(&r.req, class, message));
        }
        self.drop_req(key, false, now, &mut out);
        out
    }

    /// The request's last chunk is done here: its full blocks stay cached
    /// for prompts that share them.
    pub fn finished(&mut self, key: Key, now: Instant) -> Vec<Send> {
        let mut out = Vec::new();
        self.drop_req(key, true, now, &mut out);
        out
    }

    fn check(&self, req: &PrefillRequest) -> std::result::Result<(), String> {
        let bs = self.cfg.block_size;
        if req.tokens.is_empty() {
            return Err("the prompt is empty".into());
        }
        let need = req.tokens.len().div_ceil(bs);
        for t in &req.targets {
            if t.blocks.len() < need {
                return Err(format!(
                    "rank {} offers {} blocks for {} tokens ({need} needed)",
                    t.rank,
                    t.blocks.len(),
                    req.tokens.len()
                ));
            }
            if t.heads.0 >= t.heads.1 || t.heads.1 as usize > self.cfg.n_kv_heads {
                return Err(format!("rank {} has heads {:?}", t.rank, t.heads));
            }
        }
        if !(req.cached as usize).is_multiple_of(bs) || req.cached as usize >= req.tokens.len() {
            return Err(format!(
                "{} cached tokens is not a whole number of blocks below the prompt",
                req.cached
            ));
        }
        // Stage 0 sets reuse_from for the stages after it; a value that does
        // not leave the last token to compute would underflow the accounting.
        if !(req.reuse_from as usize).is_multiple_of(bs)
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

    /// Starts waiting prompts, in order, while the pool has their blocks.
    fn start_waiting(&mut self, now: Instant, out: &mut Vec<Send>) {
        let (index, bs) = (self.cfg.index, self.cfg.block_size);
        while let Some(req) = self.waiting.front() {
            // Until the next stage is linked (at start, or while it
            // reconnects) prompts wait; decode's deadline bounds the wait.
            if self.cfg.next.is_some() && !self.next_linked {
                break;
            }
            let need = req.tokens.len().div_ceil(bs);
            // Reuse this stage's cached prefix: stage 0 decides how much (the
            // blocks before the last token, whose logits are needed); later
            // stages must hold at least that much themselves.
            let reusable = (req.tokens.len() - 1) / bs;
            let hashes = block_hashes(&req.tokens[..reusable * bs], bs);
            let hit = match (req.reuse, index) {
                (false, _) => Vec::new(),
                (true, 0) => self.cache.lookup(&hashes),
                (true, _) => self
                    .cache
                    .lookup(&hashes[..(req.reuse_from as usize / bs).min(reusable)]),
            };
            if index > 0 && hit.len() * bs < req.reuse_from as usize {
                self.cache.release(&hit);
                // Stage 0 may have cached a prompt whose part here is still
                // computing: wait for what is in flight before giving up.
                if !self.reqs.is_empty() {
                    break;
                }
                let req = self.waiting.pop_front().expect("front exists");
                let why = format!(
                    "stage {index} does not cache the prompt's first {} tokens",
                    req.reuse_from
                );
                out.push(failed(&req, ErrorClass::Internal, why));
                continue;
            }
            let Some(fresh) = self.cache.alloc(need - hit.len()) else {
                self.cache.release(&hit);
                if index > 0 && self.reqs.is_empty() {
                    // Cannot happen with equal pools; refuse rather than wait forever.
                    let req = self.waiting.pop_front().expect("front exists");
                    out.push(failed(&req, ErrorClass::Overloaded, "no KV blocks".into()));
                    continue;
                }
                break;
            };
            let from = hit.len() * bs;
            let mut local = hit;
            local.extend(fresh);
            let mut req = self.waiting.pop_front().expect("front exists");
            req.reuse_from = from as u32;
            let transfer = Outgoing::new(
                req.id,
                req.lease,
                index as u32,
                &self.cfg.desc,
                self.cfg.n_layers,
                &req.targets,
            );
            let transfer = match transfer {
                Ok(o) => o,
                Err(e) => {
                    self.cache.release(&local);
                    out.push(failed(&req, ErrorClass::BadRequest, e.to_string()));
                    continue;
                }
            };
            let key = (req.id, req.lease);
            if let Some(next) = &self.cfg.next {
                out.push(Send {
                    to: next.clone(),
                    msg: Message::Prefill(req.clone()),
                });
            }
            if index == 0 {
                let mut pos = from;
                while pos < req.tokens.len() {
                    let n = self.cfg.chunk.max(1).min(req.tokens.len() - pos);
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
            let sent = req.cached as usize / bs;
            self.reqs.insert(
                key,
                Req {
                    req,
                    local,
                    out: Some(transfer),
                    sent,
                    arrived: now,
                    started: now,
                    compute: Duration::ZERO,
                },
            );
        }
    }

    /// Forgets a request; `done` when its KV is complete, so its full
    /// blocks stay cached for prompts that share them.
    fn drop_req(&mut self, key: Key, done: bool, now: Instant, out: &mut Vec<Send>) {
        if let Some(r) = self.reqs.remove(&key) {
            if done {
                let t = &r.req.tokens;
                let bs = self.cfg.block_size;
                let full = t.len() / bs * bs;
                self.cache.insert(&r.local, &block_hashes(&t[..full], bs));
            }
            self.cache.release(&r.local);
        }
        self.work.retain(|w| w.key != key);
        self.early.remove(&key);
        self.start_waiting(now, out);
    }
}

#[cfg(test)]
mod tests;
