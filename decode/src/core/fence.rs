//! Ending an attempt, and keeping its blocks out of use while anything may
//! still write them. Two kinds of writer can outlive an attempt:
//! - a stage that writes decode's pools directly (UCX shared memory, same
//!   host): such a write cannot be refused, so the blocks wait until that
//!   very process says it stopped ([`Message::KvStopped`]) or is known
//!   dead (it no longer runs: the process checks with
//!   [`Core::processes_to_check`]). A link that drops proves neither: the
//!   stage hears of the abort again when it links back;
//! - this group's own UCX worker, still receiving an active message into
//!   the blocks: they wait for [`Core::landing_drained`].
//!
//! Until both are settled the blocks stay quarantined in [`Admission`],
//! counted in `/metrics`.

use super::*;

/// An abandoned attempt whose blocks someone may still write.
#[derive(Debug)]
pub(crate) struct Fence {
    pub pipeline: String,
    /// Stages (by index) that may write the blocks directly and have not
    /// confirmed they stopped, with the process each was. A stage whose
    /// process changed while a stage before it may still pass the request
    /// on appears with the new process too: the request can reach it.
    pub writers: Vec<(u32, ProcessId)>,
    /// This group's worker may still be receiving into the blocks.
    pub receiving: bool,
}

impl Core {
    /// Tells every stage of the attempt's pipeline to stop, closes its
    /// landing, and quarantines its blocks while anything may write them.
    pub(crate) fn end_attempt(
        &mut self,
        id: RequestId,
        a: Attempt,
        _now: u64,
        out: &mut Vec<Action>,
    ) {
        let lease = a.lease;
        let Some(p) = self.cfg.pipelines.iter().find(|p| p.name == a.pipeline) else {
            return;
        };
        // Every stage hears it from decode (stage 0 also passes it on), so a
        // stage whose predecessor is gone still stops and confirms. A stage
        // not linked now hears it when it links again.
        for (name, _) in &p.stages {
            if self.linked.contains_key(name) {
                Self::send(
                    out,
                    name,
                    Message::PrefillAbort {
                        id,
                        lease,
                        decode: self.cfg.name.clone(),
                    },
                );
            }
        }
        let ucx = p.ucx && self.cfg.ucx != UcxLanding::None;
        if ucx {
            out.push(Action::FenceClose { id, lease });
        }
        if !self.admission.quarantined(id, lease) {
            return;
        }
        self.fences.insert(
            (id, lease),
            Fence {
                pipeline: a.pipeline,
                writers: a.writers,
                receiving: ucx,
            },
        );
    }

    /// Sends the aborts a stage that linked (again) has not confirmed. A
    /// new process of a stage is a writer of every abandoned attempt that
    /// a stage before it may still pass on: it may receive the request
    /// (its predecessor forwards it) without ever having heard the abort,
    /// which the process it replaced had confirmed.
    pub(crate) fn remind(&mut self, peer: &str, out: &mut Vec<Action>) {
        let mut keys: Vec<(RequestId, Lease)> = self.fences.keys().copied().collect();
        keys.sort_by_key(|k| (k.0, k.1 .0));
        let process = self.linked.get(peer).cloned();
        for key in keys {
            let pipelines = &self.cfg.pipelines;
            let Some(f) = self.fences.get_mut(&key) else {
                continue;
            };
            let Some(stage) = pipelines
                .iter()
                .find(|p| p.name == f.pipeline)
                .and_then(|p| p.stages.iter().position(|s| s.0 == peer))
                .map(|s| s as u32)
            else {
                continue;
            };
            if let Some(p) = &process {
                let upstream = f.writers.iter().any(|(s, _)| *s < stage);
                if upstream && !f.writers.contains(&(stage, p.clone())) {
                    f.writers.push((stage, p.clone()));
                }
            }
            if f.writers.iter().any(|(s, _)| *s == stage) {
                Self::send(
                    out,
                    peer,
                    Message::PrefillAbort {
                        id: key.0,
                        lease: key.1,
                        decode: self.cfg.name.clone(),
                    },
                );
            }
        }
    }

    /// A stage says nothing of it writes the attempt's blocks any more.
    /// Only the process that may write them can say so.
    pub fn kv_stopped(
        &mut self,
        from: &str,
        id: RequestId,
        lease: Lease,
        stage: u32,
        now: u64,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(f) = self.fences.get_mut(&(id, lease)) else {
            return out;
        };
        let is_that_stage = self
            .cfg
            .pipelines
            .iter()
            .find(|p| p.name == f.pipeline)
            .and_then(|p| p.stages.get(stage as usize))
            .is_some_and(|s| s.0 == from);
        if let (true, Some(p)) = (is_that_stage, self.linked.get(from)) {
            f.writers.retain(|w| *w != (stage, p.clone()));
        }
        self.settle(id, lease, now, &mut out);
        out
    }

    /// This group's worker finished every receive into the attempt's blocks.
    pub fn landing_drained(&mut self, id: RequestId, lease: Lease, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        self.closed(id, lease, now, &mut out);
        if let Some(f) = self.fences.get_mut(&(id, lease)) {
            f.receiving = false;
        }
        self.settle(id, lease, now, &mut out);
        out
    }

    /// Processes that may still write quarantined blocks and are not linked
    /// as themselves: the process asks the host whether they still run.
    pub fn processes_to_check(&self) -> Vec<ProcessId> {
        let mut v: Vec<ProcessId> = self
            .fences
            .values()
            .flat_map(|f| f.writers.iter().map(|(_, p)| p))
            .filter(|p| !self.linked.values().any(|l| l == *p))
            .cloned()
            .collect();
        v.sort_by_key(|a| (a.pid, a.start));
        v.dedup();
        v
    }

    /// `p` no longer runs: it writes nothing any more.
    pub fn process_gone(&mut self, p: &ProcessId, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let keys: Vec<(RequestId, Lease)> = self.fences.keys().copied().collect();
        for k in keys {
            if let Some(f) = self.fences.get_mut(&k) {
                f.writers.retain(|(_, w)| w != p);
            }
            self.settle(k.0, k.1, now, &mut out);
        }
        out
    }

    /// Frees the attempt's blocks once nothing may write them.
    fn settle(&mut self, id: RequestId, lease: Lease, now: u64, out: &mut Vec<Action>) {
        let done = self
            .fences
            .get(&(id, lease))
            .is_some_and(|f| f.writers.is_empty() && !f.receiving);
        if done {
            self.fences.remove(&(id, lease));
            let actions = self.admission.writers_stopped(id, lease, now);
            self.admitted(actions, now, out);
        }
    }
}
