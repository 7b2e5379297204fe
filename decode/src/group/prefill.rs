//! Getting a request's KV: asking a pipeline for exactly the blocks decode
//! lacks (or prefilling a short suffix here), receiving and checking what
//! the stages write, and asking a pipeline to cache a finished turn.

use super::*;

impl Group<'_> {
    pub(super) fn start_prefill(
        &mut self,
        id: RequestId,
        lease: Lease,
        blocks: Vec<BlockId>,
        cached: usize,
        attempt: u32,
    ) {
        let Some(r) = self.reqs.get(&id) else {
            // Cancelled while queued: give the blocks back.
            let now = self.now();
            let actions = self.admission.release(id, now);
            return self.carry_out(actions);
        };
        let up: Vec<String> = self.pipelines_up().iter().map(|p| p.name.clone()).collect();
        let pick = match r.gen.pipeline.as_ref().filter(|p| up.contains(p)) {
            Some(p) => Some(p.clone()),
            None => up
                .iter()
                .min_by_key(|p| self.inflight.get(*p).copied().unwrap_or(0))
                .cloned(),
        };
        let mut tokens = r.gen.prompt.clone();
        tokens.extend(&r.gen.generated);
        // Conditional disaggregation: a short uncached suffix is cheaper to
        // prefill here than to ship to a pipeline and back; with no pipeline
        // up, every prefill happens here.
        if tokens.len() - cached <= self.local_prefill_max || pick.is_none() {
            return self.prefill_locally(id, lease, tokens, blocks, cached);
        }
        let Some(pipeline) = pick else {
            unreachable!("handled above")
        };
        let p = self
            .pipelines
            .iter()
            .find(|p| p.name == pipeline)
            .expect("picked from the list")
            .clone();
        let targets: Vec<RankTarget> = (0..self.group.tp)
            .map(|rank| {
                let h = self.group.heads(rank);
                RankTarget {
                    rank: rank as u32,
                    heads: (h.start as u32, h.end as u32),
                    blocks: blocks.clone(),
                }
            })
            .collect();
        let req = PrefillRequest {
            id,
            lease,
            decode: self.name.clone(),
            tokens,
            cached: cached as u32,
            reuse_from: 0,
            // A retry may follow a stage whose cache lost the prefix: recompute.
            reuse: attempt == 1,
            targets,
            params: r.gen.params.clone(),
            deadline_ms: r.gen.deadline_ms,
        };
        let queued = r.submitted.elapsed().as_micros() as u64;
        self.fence_open(id, lease, &pipeline, &blocks);
        let stage0 = &p.stages[0].0;
        let sent = self
            .links
            .get(stage0)
            .map(|l| l.try_send(Message::Prefill(req)).is_ok())
            .unwrap_or(false);
        let allowed = vec![blocks; self.group.tp];
        let r = self.reqs.get_mut(&id).expect("checked above");
        r.acct.decode_queue_us = queued;
        r.acct.cached_tokens = cached as u32;
        r.attempt = Some(Attempt {
            lease,
            pipeline: pipeline.clone(),
            incoming: Incoming::new(lease, p.stages.len() as u32, allowed),
            verdict: None,
            first: None,
            sent: Instant::now(),
            over_ucx: false,
        });
        *self.inflight.entry(pipeline.clone()).or_default() += 1;
        if !sent {
            tracing::warn!(
                "{}: could not reach {stage0}; retrying request {}",
                self.name,
                id.0
            );
            self.kv_lost(id, lease);
        }
    }

    /// Asks `pipeline` to compute and cache `tokens` (nothing comes back).
    pub(super) fn warm_pipeline(&self, id: RequestId, pipeline: &str, tokens: Vec<u32>) {
        let Some(stage0) = self
            .pipelines
            .iter()
            .find(|p| p.name == pipeline)
            .map(|p| p.stages[0].0.clone())
        else {
            return;
        };
        if let Some(l) = self.links.get(&stage0) {
            let _ = l.try_send(Message::Prefill(PrefillRequest {
                id,
                lease: WARM_LEASE,
                decode: self.name.clone(),
                tokens,
                cached: 0,
                reuse_from: 0,
                reuse: true,
                targets: Vec::new(),
                params: tandem_model::SamplingParams::greedy(1),
                deadline_ms: tandem_wire::node::now_ms() + 60_000,
            }));
        }
    }

    /// Queues `tokens[cached..]` for prefill on this group's own ranks
    /// (quantized weights: logits within a stated tolerance of the
    /// pipeline's, not bit-equal). The decode loop feeds it in chunks of at
    /// most `local_chunk` tokens, each in the same forward pass as a decode
    /// step of every running sequence, so running streams never stall for a
    /// whole prompt.
    pub(super) fn prefill_locally(
        &mut self,
        id: RequestId,
        lease: Lease,
        tokens: Vec<u32>,
        blocks: Vec<BlockId>,
        cached: usize,
    ) {
        self.local.push_back(LocalPrefill {
            id,
            lease,
            tokens,
            blocks,
            cached,
            done: cached,
            compute_us: 0,
            started: None,
        });
    }

    /// The next chunk of the oldest local prefill still wanted: its tokens
    /// and span. Prefills whose request went away or moved to a new lease
    /// are dropped here, before anything is written to their blocks.
    pub(super) fn next_local_chunk(&mut self) -> Option<(Vec<u32>, Span)> {
        while let Some(l) = self.local.front_mut() {
            let live =
                self.reqs.contains_key(&l.id) && self.admission.lease_of(l.id) == Some(l.lease);
            if !live {
                self.local.pop_front();
                continue;
            }
            l.started.get_or_insert_with(Instant::now);
            let n = (l.tokens.len() - l.done).min(self.local_chunk.max(1));
            let span = Span {
                pos: l.done,
                n,
                blocks: l.blocks.clone(),
            };
            return Some((l.tokens[l.done..l.done + n].to_vec(), span));
        }
        None
    }

    /// The draw for the head local prefill's chunk of `n` tokens: the
    /// request's first when the chunk is its last (its token is the first
    /// of the answer), else none (greedy, nothing of the stream used).
    pub(super) fn local_chunk_draw(&self, n: usize) -> Draw {
        let Some(l) = self.local.front() else {
            return Draw::GREEDY;
        };
        match self.reqs.get(&l.id) {
            Some(r) if l.done + n >= l.tokens.len() => Sampler::new(&r.gen.params).draw(),
            _ => Draw::GREEDY,
        }
    }

    /// Records that the head local prefill's chunk of `n` tokens was
    /// computed in `us`; when it was the last, `chosen` (from its draw) is
    /// the first token and the request starts.
    pub(super) fn local_chunk_done(&mut self, n: usize, us: u64, chosen: Sampled) {
        let Some(l) = self.local.front_mut() else {
            return;
        };
        l.done += n;
        l.compute_us += us;
        if l.done < l.tokens.len() {
            return;
        }
        let l = self.local.pop_front().expect("front");
        let Some(r) = self.reqs.get_mut(&l.id) else {
            return;
        };
        let s = chosen;
        let started = l.started.unwrap_or_else(Instant::now);
        r.acct.cached_tokens = l.cached as u32;
        r.acct.prefilled_tokens = (l.tokens.len() - l.cached) as u32;
        r.acct.prefill_compute_us = l.compute_us;
        r.acct.kv_transport = "local".into();
        r.acct.decode_queue_us = started.saturating_duration_since(r.submitted).as_micros() as u64;
        self.local_prefills += 1;
        let now = self.now();
        let actions = self.admission.kv_complete(l.id, l.lease, true, now);
        // Start reads the first token from the attempt.
        if let Some(r) = self.reqs.get_mut(&l.id) {
            r.attempt = Some(Attempt {
                lease: l.lease,
                pipeline: String::new(),
                incoming: Incoming::new(l.lease, 0, Vec::new()),
                verdict: Some(Verdict::Verified),
                first: Some((s.token, s.logprob)),
                sent: started,
                over_ucx: false,
            });
        }
        self.carry_out(actions);
    }

    pub(super) fn plan(&mut self, pipeline: &str, stage: u32, rank: u32) -> Option<Vec<CopyRun>> {
        let key = (pipeline.to_string(), stage, rank);
        if let Some(p) = self.plans.get(&key) {
            return Some(p.clone());
        }
        let p = self.pipelines.iter().find(|p| p.name == pipeline)?;
        let (_, _, layers) = p.stages.get(stage as usize)?;
        let dst = self.rank_descs.get(rank as usize)?;
        let src = PoolDesc::new(
            layers.clone(),
            0..self.rank_descs.iter().map(|d| d.heads.end).max()?,
            self.block_size,
            dst.layout.head_dim,
            dst.layout.dtype,
        );
        let plan = reshard_plan(&src, dst).ok()?;
        self.plans.insert(key, plan.clone());
        Some(plan)
    }

    pub(super) fn on_kv(&mut self, c: KvChunk) {
        let Some(a) = self
            .reqs
            .get_mut(&c.id)
            .and_then(|r| r.attempt.as_mut())
            .filter(|a| a.lease == c.lease)
        else {
            // A write from an abandoned attempt: its blocks may belong to
            // someone else now, so it is dropped unread.
            return;
        };
        if let Err(e) = a.incoming.accept(&c) {
            let lease = a.lease;
            tracing::warn!("{}: refusing KV for request {}: {e}", self.name, c.id.0);
            return self.kv_lost(c.id, lease);
        }
        let pipeline = a.pipeline.clone();
        let Some(runs) = self.plan(&pipeline, c.stage, c.rank) else {
            return self.kv_lost(c.id, c.lease);
        };
        let blocks = c.blocks;
        let n = blocks.len() as u64;
        let r = self.group.with_pool(c.rank as usize, move |pool| {
            for (b, bytes) in &blocks {
                scatter(pool, *b, &runs, bytes)?;
            }
            Ok::<(), tandem_kvtransfer::KvTransferError>(())
        });
        if let Err(e) = r
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            tracing::warn!("{}: KV for request {} did not fit: {e}", self.name, c.id.0);
            return self.kv_lost(c.id, c.lease);
        }
        self.admission.counters.blocks_quic += n;
    }

    pub(super) fn on_kv_done(&mut self, d: KvDone) {
        let Some(a) = self
            .reqs
            .get_mut(&d.id)
            .and_then(|r| r.attempt.as_mut())
            .filter(|a| a.lease == d.lease)
        else {
            return;
        };
        if let Some(v) = a.incoming.done(d) {
            a.verdict = Some(v);
            self.maybe_complete(d.id);
        }
    }

    /// Every notice and the first token are in: verify and start, or retry.
    pub(super) fn maybe_complete(&mut self, id: RequestId) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        let Some(a) = r.attempt.as_ref() else { return };
        let verified = match (&a.verdict, a.first) {
            (Some(Verdict::Verified), Some(_)) => true,
            (Some(Verdict::Mismatch(bad)), _) => {
                tracing::warn!(
                    "{}: KV checksum mismatch for request {} from (stage, rank) {bad:?}; prefilling again",
                    self.name,
                    id.0
                );
                false
            }
            _ => return,
        };
        let lease = a.lease;
        r.acct.kv_bytes = a.incoming.bytes;
        r.acct.kv_transport = match (a.pipeline.is_empty(), a.over_ucx) {
            (true, _) => "local",
            (false, true) => "ucx",
            (false, false) => "quic",
        }
        .into();
        r.acct.kv_transfer_us = a.sent.elapsed().as_micros() as u64;
        let pipeline = a.pipeline.clone();
        if let Some(n) = self.inflight.get_mut(&pipeline) {
            *n = n.saturating_sub(1);
        }
        // Every notice is in: nothing more may land in these blocks.
        self.fence_close(id);
        let now = self.now();
        let actions = self.admission.kv_complete(id, lease, verified, now);
        self.carry_out(actions);
    }
}
