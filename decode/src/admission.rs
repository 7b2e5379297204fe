//! Which requests hold KV blocks, as a plain state machine (no I/O, time
//! passed in): callers feed it events and carry out the [`Action`]s it
//! returns.
//!
//! A request is *queued* until the batch has room and the pool has its
//! blocks; then it is *awaiting KV* under a fresh [`Lease`] while a prefill
//! pipeline fills exactly those blocks; then *running* until it finishes or
//! is cancelled. A transfer that fails (checksum mismatch, lost pipeline,
//! deadline) frees the blocks and retries under a new lease; a completion
//! carrying an old lease is ignored, so a late write from a failed attempt
//! can never start a sequence on blocks now used for something else.

use std::collections::{HashMap, VecDeque};

use tandem_model::{block_hashes, BlockId, PrefixCache};

pub use tandem_wire::messages::{Lease, RequestId};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_batch: usize,
    pub max_queue: usize,
    pub block_size: usize,
    /// Attempts at a request's KV before it fails.
    pub max_attempts: u32,
    /// How long one attempt may take, in the caller's time unit (ms).
    pub kv_timeout: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The admission queue is full (HTTP 429).
    Overloaded,
    /// The request needs more blocks than the whole pool has.
    TooLong { needed: usize, pool: usize },
    /// Every attempt at its KV failed.
    KvFailed { attempts: u32 },
    /// A request with this id is already here.
    Duplicate,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask a prefill pipeline to fill `blocks` with the prompt's KV; the
    /// first `cached` tokens' blocks already hold it (a cached prefix).
    Prefill {
        id: RequestId,
        lease: Lease,
        blocks: Vec<BlockId>,
        cached: usize,
        /// 1 for the first attempt.
        attempt: u32,
    },
    /// The KV is complete and verified: decode may run the request.
    Start { id: RequestId, blocks: Vec<BlockId> },
    /// The attempt under `lease` is abandoned and its blocks are free again:
    /// tell its pipeline to stop. The request itself waits for another attempt.
    Abandon { id: RequestId, lease: Lease },
    /// The request is over for this node; tell its client.
    Reject { id: RequestId, why: Rejection },
}

#[derive(Debug)]
struct Queued {
    id: RequestId,
    prompt: usize,
    /// Hashes of the prompt's full blocks.
    hashes: Vec<u64>,
    attempts: u32,
}

#[derive(Debug)]
struct Held {
    prompt: usize,
    hashes: Vec<u64>,
    blocks: Vec<BlockId>,
    state: HeldState,
    /// Writers of the current attempt put into its blocks directly: if it
    /// is abandoned, they stay out of use until the writers stopped.
    fenced: bool,
}

/// Blocks of an abandoned attempt that something may still write. They
/// come back only through [`Admission::writers_stopped`]: never because
/// time passed.
#[derive(Debug)]
struct Quarantined {
    blocks: Vec<BlockId>,
}

#[derive(Debug, PartialEq)]
enum HeldState {
    AwaitingKv {
        lease: Lease,
        deadline: u64,
        attempts: u32,
    },
    Running,
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub retries: u64,
    pub checksum_failures: u64,
    pub stale_completions: u64,
    pub rejected_overload: u64,
    /// KV blocks that arrived, by path: `Kv` messages on the QUIC link,
    /// written by the stage into the mapped pool (UCX, same host), and
    /// active messages (UCX elsewhere).
    pub blocks_quic: u64,
    pub blocks_ucx_direct: u64,
    pub blocks_ucx_messages: u64,
}

pub struct Admission {
    limits: Limits,
    pub cache: PrefixCache,
    queue: VecDeque<Queued>,
    held: HashMap<RequestId, Held>,
    quarantine: HashMap<(RequestId, Lease), Quarantined>,
    keys: Keys,
    pub counters: Counters,
}

/// Where attempt keys ([`Lease`]) come from: a cryptographic generator,
/// seeded by the operating system in a node, or by a test.
pub struct Keys(rand::rngs::StdRng);

impl Keys {
    pub fn from_os() -> Keys {
        use rand::SeedableRng;
        Keys(rand::rngs::StdRng::from_os_rng())
    }

    pub fn seeded(seed: u64) -> Keys {
        use rand::SeedableRng;
        Keys(rand::rngs::StdRng::seed_from_u64(seed))
    }

    pub fn fresh(&mut self) -> Lease {
        use rand::Rng;
        Lease(self.0.random())
    }
}

impl Admission {
    pub fn new(limits: Limits, blocks: usize) -> Admission {
        Admission::with_keys(limits, blocks, Keys::from_os())
    }

    pub fn with_keys(limits: Limits, blocks: usize, keys: Keys) -> Admission {
        Admission {
            limits,
            cache: PrefixCache::new(blocks),
            queue: VecDeque::new(),
            held: HashMap::new(),
            quarantine: HashMap::new(),
            keys,
            counters: Counters::default(),
        }
    }

    /// A fresh attempt key for work that holds no blocks (cache warming).
    pub fn new_key(&mut self) -> Lease {
        self.keys.fresh()
    }

    pub fn used_blocks(&self) -> usize {
        self.cache.used_count()
    }

    pub fn total_blocks(&self) -> usize {
        self.cache.total()
    }

    /// The lease of the request's current attempt, while it awaits its KV.
    pub fn lease_of(&self, id: RequestId) -> Option<Lease> {
        match self.held.get(&id).map(|h| &h.state) {
            Some(HeldState::AwaitingKv { lease, .. }) => Some(*lease),
            _ => None,
        }
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn running(&self) -> usize {
        self.held
            .values()
            .filter(|h| h.state == HeldState::Running)
            .count()
    }

    /// A new request whose prompt is `tokens` (with any tokens an earlier
    /// attempt generated).
    pub fn submit(&mut self, id: RequestId, tokens: &[u32], now: u64) -> Vec<Action> {
        let prompt = tokens.len();
        if self.held.contains_key(&id) || self.queue.iter().any(|q| q.id == id) {
            return vec![Action::Reject {
                id,
                why: Rejection::Duplicate,
            }];
        }
        let needed = self.blocks_for(prompt);
        if needed > self.cache.total() {
            return vec![Action::Reject {
                id,
                why: Rejection::TooLong {
                    needed,
                    pool: self.cache.total(),
                },
            }];
        }
        if self.queue.len() >= self.limits.max_queue {
            self.counters.rejected_overload += 1;
            return vec![Action::Reject {
                id,
                why: Rejection::Overloaded,
            }];
        }
        // The last prompt token is always computed (its logits give the
        // first generated token), so only blocks before it may be reused.
        let reusable = prompt.saturating_sub(1) / self.limits.block_size * self.limits.block_size;
        let hashes = block_hashes(&tokens[..reusable], self.limits.block_size);
        self.queue.push_back(Queued {
            id,
            prompt,
            hashes,
            attempts: 0,
        });
        self.pump(now)
    }

    /// Blocks for the prompt plus the first generated token.
    fn blocks_for(&self, prompt: usize) -> usize {
        (prompt + 1).div_ceil(self.limits.block_size)
    }

    /// Admits queued requests while the batch and the pool have room, in order.
    fn pump(&mut self, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        while self.held.len() < self.limits.max_batch {
            let Some(q) = self.queue.front() else { break };
            let hashes = q.hashes.clone();
            let mut blocks = self.cache.lookup(&hashes);
            let need = self.blocks_for(q.prompt) - blocks.len();
            let Some(fresh) = self.cache.alloc(need) else {
                self.cache.release(&blocks);
                break;
            };
            let cached = blocks.len() * self.limits.block_size;
            blocks.extend(fresh);
            let q = self.queue.pop_front().expect("front exists");
            let lease = self.keys.fresh();
            out.push(Action::Prefill {
                id: q.id,
                lease,
                blocks: blocks.clone(),
                cached,
                attempt: q.attempts + 1,
            });
            let state = HeldState::AwaitingKv {
                lease,
                deadline: now + self.limits.kv_timeout,
                attempts: q.attempts + 1,
            };
            self.held.insert(
                q.id,
                Held {
                    prompt: q.prompt,
                    hashes: q.hashes,
                    blocks,
                    state,
                    fenced: false,
                },
            );
        }
        out
    }

    /// Every stage's KV for every rank arrived for `lease`; `verified` says
    /// whether the checksums matched.
    pub fn kv_complete(
        &mut self,
        id: RequestId,
        lease: Lease,
        verified: bool,
        now: u64,
    ) -> Vec<Action> {
        match self.held.get(&id).map(|h| &h.state) {
            Some(HeldState::AwaitingKv { lease: current, .. }) if *current == lease => {}
            _ => {
                self.counters.stale_completions += 1;
                return Vec::new();
            }
        }
        if !verified {
            self.counters.checksum_failures += 1;
            return self.retry(id, now);
        }
        let h = self.held.get_mut(&id).expect("checked above");
        h.state = HeldState::Running;
        // The prompt's full blocks now hold verified KV: later requests may reuse them.
        self.cache.insert(&h.blocks, &h.hashes);
        vec![Action::Start {
            id,
            blocks: h.blocks.clone(),
        }]
    }

    /// The attempt under `lease` cannot finish (its pipeline is gone).
    pub fn kv_lost(&mut self, id: RequestId, lease: Lease, now: u64) -> Vec<Action> {
        match self.held.get(&id).map(|h| &h.state) {
            Some(HeldState::AwaitingKv { lease: current, .. }) if *current == lease => {
                self.retry(id, now)
            }
            _ => Vec::new(),
        }
    }

    /// The attempt under `lease` writes its blocks with one-sided puts:
    /// abandoned, they are quarantined until [`Admission::writers_stopped`].
    pub fn fence(&mut self, id: RequestId, lease: Lease) {
        if let Some(h) = self.held.get_mut(&id) {
            if matches!(h.state, HeldState::AwaitingKv { lease: l, .. } if l == lease) {
                h.fenced = true;
            }
        }
    }

    /// Whether the abandoned attempt's blocks wait for its writers.
    pub fn quarantined(&self, id: RequestId, lease: Lease) -> bool {
        self.quarantine.contains_key(&(id, lease))
    }

    /// Blocks held back from abandoned attempts.
    pub fn quarantined_blocks(&self) -> usize {
        self.quarantine.values().map(|q| q.blocks.len()).sum()
    }

    /// Nothing writes the abandoned attempt's blocks any more: free them.
    pub fn writers_stopped(&mut self, id: RequestId, lease: Lease, now: u64) -> Vec<Action> {
        match self.quarantine.remove(&(id, lease)) {
            Some(q) => {
                self.cache.release(&q.blocks);
                self.pump(now)
            }
            None => Vec::new(),
        }
    }

    /// Frees a held request's blocks, or quarantines them when its attempt
    /// is still awaiting KV from writers that put into them directly.
    fn free(&mut self, id: RequestId, h: &Held) {
        match h.state {
            HeldState::AwaitingKv { lease, .. } if h.fenced => {
                self.quarantine.insert(
                    (id, lease),
                    Quarantined {
                        blocks: h.blocks.clone(),
                    },
                );
            }
            _ => self.cache.release(&h.blocks),
        }
    }

    /// Frees the attempt's blocks and queues the request again at the front,
    /// or fails it when it has had its attempts.
    fn retry(&mut self, id: RequestId, now: u64) -> Vec<Action> {
        let h = self.held.remove(&id).expect("callers hold the request");
        self.free(id, &h);
        let HeldState::AwaitingKv {
            attempts, lease, ..
        } = h.state
        else {
            unreachable!("only awaiting requests retry")
        };
        let mut out = vec![Action::Abandon { id, lease }];
        if attempts >= self.limits.max_attempts {
            out.push(Action::Reject {
                id,
                why: Rejection::KvFailed { attempts },
            });
        } else {
            self.counters.retries += 1;
            self.queue.push_front(Queued {
                id,
                prompt: h.prompt,
                hashes: h.hashes,
                attempts,
            });
        }
        out.extend(self.pump(now));
        out
    }

    /// Time passes: attempts past their deadline are retried.
    pub fn tick(&mut self, now: u64) -> Vec<Action> {
        let late: Vec<RequestId> = self
            .held
            .iter()
            .filter(|(_, h)| matches!(h.state, HeldState::AwaitingKv { deadline, .. } if deadline <= now))
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::new();
        for id in late {
            out.extend(self.retry(id, now));
        }
        out.extend(self.pump(now));
        out
    }

    /// A running request grew past its blocks: one more, or `None` when the
    /// pool is exhausted (the caller then preempts or fails it).
    pub fn grow(&mut self, id: RequestId) -> Option<BlockId> {
        let h = self
            .held
            .get_mut(&id)
            .filter(|h| h.state == HeldState::Running)?;
        let b = self.cache.alloc(1)?.pop()?;
        h.blocks.push(b);
        Some(b)
    }

    /// The request finished: its full blocks (`computed` are the tokens
    /// whose KV they hold, prompt and generated) stay cached for the turns
    /// that follow; then everything it holds is freed.
    pub fn finish(&mut self, id: RequestId, computed: &[u32], now: u64) -> Vec<Action> {
        if let Some(h) = self.held.get(&id).filter(|h| h.state == HeldState::Running) {
            let hashes = block_hashes(computed, self.limits.block_size);
            self.cache.insert(&h.blocks, &hashes);
        }
        self.release(id, now)
    }

    /// The request was cancelled or its client left: free whatever it holds.
    pub fn release(&mut self, id: RequestId, now: u64) -> Vec<Action> {
        if let Some(h) = self.held.remove(&id) {
            self.free(id, &h);
        } else {
            self.queue.retain(|q| q.id != id);
        }
        self.pump(now)
    }
}

#[cfg(test)]
mod tests;
