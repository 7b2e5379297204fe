//! Getting a request's KV: choosing a pipeline (or prefilling here),
//! asking it for exactly the blocks decode lacks, checking what its stages
//! send, and starting the request once every notice verified.

use super::*;
use tandem_wire::messages::{KvChunk, KvDone, PrefillRequest, RankTarget};

impl Core {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start_prefill(
        &mut self,
        id: RequestId,
        lease: Lease,
        blocks: Vec<BlockId>,
        cached: usize,
        attempt: u32,
        now: u64,
        out: &mut Vec<Action>,
    ) {
        let Some(r) = self.reqs.get(&id) else {
            // Gone while queued: give the blocks back.
            let actions = self.admission.release(id, now);
            return self.admitted(actions, now, out);
        };
        let up: Vec<String> = self.pipelines_up().iter().map(|p| p.name.clone()).collect();
        let pick = match r.gen.pipeline.as_ref().filter(|p| up.contains(p)) {
            Some(p) => Some(p.clone()),
            None => up.iter().min_by_key(|p| self.inflight(p)).cloned(),
        };
        let mut tokens = r.gen.prompt.clone();
        tokens.extend(&r.gen.generated);
        let queued_us = now.saturating_sub(r.submitted) * 1000;
        // Conditional disaggregation: a short uncached suffix is cheaper to
        // prefill here than to ship to a pipeline and back; with no pipeline
        // up, every prefill happens here.
        let pipeline = match pick {
            Some(p) if tokens.len() - cached > self.cfg.local_prefill_max => p,
            _ => {
                let r = self.reqs.get_mut(&id).expect("checked above");
                r.acct.decode_queue_us = queued_us;
                r.state = State::Local(Local {
                    lease,
                    tokens,
                    blocks,
                    cached,
                    done: cached,
                    compute_us: 0,
                    started: None,
                });
                self.local.push_back(id);
                return;
            }
        };
        let p = self
            .cfg
            .pipelines
            .iter()
            .find(|p| p.name == pipeline)
            .expect("picked from the list")
            .clone();
        let targets: Vec<RankTarget> = self
            .cfg
            .rank_descs
            .iter()
            .enumerate()
            .map(|(rank, d)| RankTarget {
                rank: rank as u32,
                heads: (d.heads.start as u32, d.heads.end as u32),
                blocks: blocks.clone(),
            })
            .collect();
        let req = PrefillRequest {
            id,
            lease,
            decode: self.cfg.name.clone(),
            tokens,
            cached: cached as u32,
            reuse_from: 0,
            // A retry may follow a stage whose cache lost the prefix: recompute.
            reuse: attempt == 1,
            targets,
            params: r.gen.params.clone(),
            output_from: r.gen.prompt.len() as u32,
            deadline_ms: r.gen.deadline_ms,
            warm: false,
            trace: Default::default(),
        };
        let allowed = vec![blocks.clone(); self.cfg.tp];
        let mut writers = Vec::new();
        if p.ucx && self.cfg.ucx != UcxLanding::None {
            if self.cfg.ucx == UcxLanding::Puts {
                // Every stage is linked (the pipeline is up): these are the
                // processes that may write the blocks.
                for (i, (name, _)) in p.stages.iter().enumerate() {
                    if let Some(proc) = self.linked.get(name) {
                        writers.push((i as u32, proc.clone()));
                    }
                }
            }
            let mut plans = HashMap::new();
            for s in 0..p.stages.len() as u32 {
                for rank in 0..self.cfg.tp as u32 {
                    if let Some(plan) = self.plan(&pipeline, s, rank) {
                        plans.insert((s, rank), plan);
                    }
                }
            }
            out.push(Action::FenceOpen {
                id,
                lease,
                allowed: allowed.clone(),
                plans,
            });
            // Abandoned, its blocks wait until nothing writes them.
            self.admission.fence(id, lease);
        }
        let r = self.reqs.get_mut(&id).expect("checked above");
        r.acct.decode_queue_us = queued_us;
        r.acct.cached_tokens = cached as u32;
        r.state = State::Fetching(Attempt {
            lease,
            pipeline: pipeline.clone(),
            incoming: Incoming::new(lease, p.stages.len() as u32, allowed),
            verdict: None,
            first: None,
            sent: now,
            first_at: 0,
            over_ucx: false,
            writers,
            closing: false,
        });
        Self::send(out, &p.stages[0].0, Message::Prefill(req));
    }

    /// The attempt under `lease` cannot finish: retried (or failed after
    /// its attempts), its blocks freed or quarantined.
    pub(crate) fn kv_lost(&mut self, id: RequestId, lease: Lease, now: u64, out: &mut Vec<Action>) {
        if !self.is_current(id, lease) {
            return;
        }
        let actions = self.admission.kv_lost(id, lease, now);
        self.admitted(actions, now, out);
    }

    /// Admission abandoned the attempt (a retry follows, or a rejection).
    pub(crate) fn abandon(&mut self, id: RequestId, lease: Lease, now: u64, out: &mut Vec<Action>) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        match std::mem::replace(&mut r.state, State::Queued) {
            State::Fetching(a) if a.lease == lease => self.end_attempt(id, a, now, out),
            State::Local(l) if l.lease == lease => self.local.retain(|x| *x != id),
            other => r.state = other,
        }
    }

    /// The attempt a message names, when it is the request's current one
    /// and comes from a stage of its pipeline.
    fn attempt_from(
        &mut self,
        from: &str,
        id: RequestId,
        lease: Lease,
    ) -> Option<(&mut Attempt, Option<u32>)> {
        let stage_of = |pipelines: &[PipelineSpec], p: &str| {
            pipelines
                .iter()
                .find(|x| x.name == p)
                .and_then(|x| x.stages.iter().position(|s| s.0 == from))
                .map(|i| i as u32)
        };
        let pipelines = &self.cfg.pipelines;
        match self.reqs.get_mut(&id).map(|r| &mut r.state) {
            Some(State::Fetching(a)) if a.lease == lease => {
                let s = stage_of(pipelines, &a.pipeline);
                s.is_some().then_some((a, s))
            }
            _ => None,
        }
    }

    /// KV over the QUIC link: checked, then written by the process.
    pub fn kv_chunk(&mut self, from: &str, c: KvChunk, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let name = self.cfg.name.clone();
        let Some((a, stage)) = self.attempt_from(from, c.id, c.lease) else {
            // A write from an abandoned attempt: its blocks may belong to
            // someone else now, so it is dropped unread.
            return out;
        };
        if stage != Some(c.stage) {
            tracing::warn!("{name}: {from} sent KV as stage {}", c.stage);
            let lease = a.lease;
            self.kv_lost(c.id, lease, now, &mut out);
            return out;
        }
        if let Err(e) = a.incoming.accept(&c) {
            tracing::warn!("{name}: refusing KV for request {}: {e}", c.id.0);
            let lease = a.lease;
            self.kv_lost(c.id, lease, now, &mut out);
            return out;
        }
        let pipeline = a.pipeline.clone();
        let Some(runs) = self.plan(&pipeline, c.stage, c.rank) else {
            self.kv_lost(c.id, c.lease, now, &mut out);
            return out;
        };
        self.admission.counters.blocks_quic += c.blocks.len() as u64;
        out.push(Action::WriteKv {
            id: c.id,
            lease: c.lease,
            rank: c.rank,
            runs,
            blocks: c.blocks,
        });
        out
    }

    /// A [`Action::WriteKv`] did not fit the pool.
    pub fn kv_write_failed(
        &mut self,
        id: RequestId,
        lease: Lease,
        why: &str,
        now: u64,
    ) -> Vec<Action> {
        tracing::warn!(
            "{}: KV for request {} did not fit: {why}",
            self.cfg.name,
            id.0
        );
        let mut out = Vec::new();
        self.kv_lost(id, lease, now, &mut out);
        out
    }

    /// The copy plan to read back blocks a stage reported written over UCX,
    /// when the notice is for the current attempt and from its stage.
    pub fn landed_plan(
        &mut self,
        from: &str,
        id: RequestId,
        lease: Lease,
        stage: u32,
        rank: u32,
    ) -> Option<Vec<CopyRun>> {
        let (a, s) = self.attempt_from(from, id, lease)?;
        if s != Some(stage) {
            return None;
        }
        let pipeline = a.pipeline.clone();
        let runs = self.plan(&pipeline, stage, rank)?;
        Some(
            runs.iter()
                .map(|r| CopyRun {
                    src: r.dst,
                    dst: r.dst,
                    len: r.len,
                })
                .collect(),
        )
    }

    /// Blocks a stage wrote over UCX, read back from the pool for the
    /// checksum; `put` when written by one-sided puts.
    pub fn kv_landed(&mut self, from: &str, c: KvChunk, put: bool, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let puts_allowed = self.cfg.ucx == UcxLanding::Puts;
        let name = self.cfg.name.clone();
        let Some((a, stage)) = self.attempt_from(from, c.id, c.lease) else {
            return out;
        };
        let lease = a.lease;
        if stage != Some(c.stage) || (put && !puts_allowed) {
            tracing::warn!("{name}: {from} reported KV this group cannot take");
            self.kv_lost(c.id, lease, now, &mut out);
            return out;
        }
        a.over_ucx = true;
        if let Err(e) = a.incoming.accept(&c) {
            tracing::warn!("{name}: refusing KV for request {}: {e}", c.id.0);
            self.kv_lost(c.id, lease, now, &mut out);
            return out;
        }
        let n = c.blocks.len() as u64;
        let k = &mut self.admission.counters;
        if put {
            k.blocks_ucx_direct += n;
        } else {
            k.blocks_ucx_messages += n;
        }
        out
    }

    /// A UCX transfer for the attempt failed on this side.
    pub fn kv_failed(&mut self, id: RequestId, lease: Lease, why: &str, now: u64) -> Vec<Action> {
        tracing::warn!(
            "{}: KV for request {} over UCX failed: {why}",
            self.cfg.name,
            id.0
        );
        let mut out = Vec::new();
        self.kv_lost(id, lease, now, &mut out);
        out
    }

    /// A stage's completion notice for one rank.
    pub fn kv_done(&mut self, from: &str, d: KvDone, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let Some((a, stage)) = self.attempt_from(from, d.id, d.lease) else {
            return out;
        };
        if stage != Some(d.stage) {
            let lease = a.lease;
            self.kv_lost(d.id, lease, now, &mut out);
            return out;
        }
        if let Some(v) = a.incoming.done(d) {
            a.verdict = Some(v);
            self.maybe_complete(d.id, now, &mut out);
        }
        out
    }

    /// The last stage's first token.
    #[allow(clippy::too_many_arguments)]
    pub fn first_token(
        &mut self,
        from: &str,
        id: RequestId,
        lease: Lease,
        first: Sampled,
        acct: (u64, u64, u32),
        now: u64,
    ) -> Vec<Action> {
        let token = first.token;
        let mut out = Vec::new();
        let vocab = self.cfg.vocab;
        let last = self
            .reqs
            .get(&id)
            .and_then(|r| match &r.state {
                State::Fetching(a) => self.cfg.pipelines.iter().find(|p| p.name == a.pipeline),
                _ => None,
            })
            .and_then(|p| p.stages.last())
            .is_some_and(|s| s.0 == from);
        if !last || !self.is_current(id, lease) {
            return out;
        }
        // A token outside the vocabulary would index past the embedding:
        // the attempt counts as failed and is retried.
        if token as usize >= vocab {
            tracing::warn!(
                "{}: {from} sent token {token} for request {}",
                self.cfg.name,
                id.0
            );
            self.kv_lost(id, lease, now, &mut out);
            return out;
        }
        let r = self.reqs.get_mut(&id).expect("current");
        (
            r.acct.prefill_queue_us,
            r.acct.prefill_compute_us,
            r.acct.prefilled_tokens,
        ) = acct;
        if let State::Fetching(a) = &mut r.state {
            a.first = Some(first);
            a.first_at = now;
        }
        self.maybe_complete(id, now, &mut out);
        out
    }

    /// A stage gave up on the attempt.
    pub fn prefill_failed(
        &mut self,
        from: &str,
        id: RequestId,
        lease: Lease,
        class: ErrorClass,
        message: String,
        now: u64,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        if self.attempt_from(from, id, lease).is_none() {
            return out;
        }
        match class {
            // The request itself is at fault, or out of time: retrying
            // cannot help.
            ErrorClass::BadRequest | ErrorClass::DeadlineExceeded => {
                self.fail(id, class, message, now, &mut out)
            }
            _ => {
                tracing::warn!(
                    "{}: prefill of {} failed ({message}); retrying",
                    self.cfg.name,
                    id.0
                );
                self.kv_lost(id, lease, now, &mut out);
            }
        }
        out
    }

    /// Every notice and the first token are in: verify and start, or retry.
    /// A verified attempt whose KV may land over UCX first closes its
    /// landing and starts once nothing is being received into its blocks
    /// ([`Core::landing_drained`]): a stray message still arriving could
    /// otherwise write into them after the request let them go.
    pub(crate) fn maybe_complete(&mut self, id: RequestId, now: u64, out: &mut Vec<Action>) {
        let ucx = self.cfg.ucx != UcxLanding::None;
        let pipelines = &self.cfg.pipelines;
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        let State::Fetching(a) = &mut r.state else {
            return;
        };
        if a.closing {
            return;
        }
        let verified = match (&a.verdict, &a.first) {
            (Some(Verdict::Verified), Some(_)) => true,
            (Some(Verdict::Mismatch(bad)), _) => {
                tracing::warn!(
                    "{}: KV checksum mismatch for request {} from (stage, rank) {bad:?}; prefilling again",
                    self.cfg.name,
                    id.0
                );
                false
            }
            _ => return,
        };
        let lease = a.lease;
        if verified {
            r.acct.kv_bytes = a.incoming.bytes;
            r.acct.kv_transport = if a.over_ucx { "ucx" } else { "quic" }.into();
            r.acct.kv_transfer_us = now.saturating_sub(a.sent) * 1000;
            r.acct.kv_wait_us = now.saturating_sub(a.first_at) * 1000;
            let lands = ucx && pipelines.iter().any(|p| p.name == a.pipeline && p.ucx);
            if lands {
                a.closing = true;
                out.push(Action::FenceClose { id, lease });
                return;
            }
        }
        let actions = self.admission.kv_complete(id, lease, verified, now);
        self.admitted(actions, now, out);
    }

    /// A verified attempt's landing drained: it completes.
    pub(crate) fn closed(&mut self, id: RequestId, lease: Lease, now: u64, out: &mut Vec<Action>) {
        let closing = matches!(
            self.reqs.get(&id).map(|r| &r.state),
            Some(State::Fetching(a)) if a.lease == lease && a.closing
        );
        if closing {
            let actions = self.admission.kv_complete(id, lease, true, now);
            self.admitted(actions, now, out);
        }
    }

    /// Admission verified the KV: the request runs from the next step.
    pub(crate) fn start(&mut self, id: RequestId, blocks: Vec<BlockId>, out: &mut Vec<Action>) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        let first = match std::mem::replace(&mut r.state, State::Queued) {
            State::Fetching(a) => {
                r.filled_by = Some(a.pipeline);
                a.first
            }
            State::Local(l) => {
                r.state = State::Local(l);
                return;
            }
            other => {
                r.state = other;
                return;
            }
        };
        let Some(first) = first else {
            return;
        };
        self.run(id, blocks, first, out);
    }

    /// Asks the pipeline that filled a finished turn to compute and cache
    /// it (prompt and answer), so the next turn computes only what is new.
    pub(crate) fn warm(
        &mut self,
        id: RequestId,
        pipeline: &str,
        tokens: Vec<u32>,
        now: u64,
        out: &mut Vec<Action>,
    ) {
        let Some(stage0) = self
            .cfg
            .pipelines
            .iter()
            .find(|p| p.name == pipeline)
            .map(|p| p.stages[0].0.clone())
        else {
            return;
        };
        if !self.linked.contains_key(&stage0) {
            return;
        }
        let lease = self.admission.new_key();
        Self::send(
            out,
            &stage0,
            Message::Prefill(PrefillRequest {
                id,
                lease,
                decode: self.cfg.name.clone(),
                output_from: tokens.len() as u32,
                tokens,
                cached: 0,
                reuse_from: 0,
                reuse: true,
                targets: Vec::new(),
                params: SamplingParams::greedy(1),
                deadline_ms: now + 60_000,
                warm: true,
                trace: Default::default(),
            }),
        );
    }
}
