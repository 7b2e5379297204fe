//! Decode steps: which sequences the next forward pass runs (every running
//! one, plus a chunk of the oldest local prefill), what it did, and the
//! tokens it chose.

use super::*;
use tandem_model::{Draw, Phase, Sampled, Span};

/// One forward pass to run: the running sequences' next tokens and, last,
/// a chunk of a local prefill.
#[derive(Debug, Clone)]
pub struct StepPlan {
    pub batch: Vec<RequestId>,
    /// The local prefill riding along: (request, lease, tokens in the chunk).
    pub chunk: Option<(RequestId, Lease, usize)>,
    pub tokens: Vec<u32>,
    pub spans: Vec<Span>,
    /// Each span's choice of the next token.
    pub draws: Vec<Draw>,
    pub phase: Phase,
}

impl Core {
    /// The next step's work, or `None` when nothing runs. Sequences that
    /// need a block the pool cannot give fail here.
    pub fn plan_step(&mut self, now: u64) -> (Option<StepPlan>, Vec<Action>) {
        let mut out = Vec::new();
        let bs = self.cfg.limits.block_size;
        let mut ids: Vec<RequestId> = self
            .reqs
            .iter()
            .filter(|(_, r)| matches!(r.state, State::Running(_)))
            .map(|(id, _)| *id)
            .collect();
        ids.sort();
        let mut batch = Vec::new();
        for id in ids {
            let need = match &self.reqs[&id].state {
                State::Running(run) => run.tokens.len().div_ceil(bs) > run.blocks.len(),
                _ => false,
            };
            if need {
                match self.admission.grow(id) {
                    Some(b) => {
                        if let Some(State::Running(run)) =
                            self.reqs.get_mut(&id).map(|r| &mut r.state)
                        {
                            run.blocks.push(b);
                        }
                    }
                    None => {
                        let message = "the decode group ran out of KV blocks".into();
                        self.fail(id, ErrorClass::Overloaded, message, now, &mut out);
                        continue;
                    }
                }
            }
            batch.push(id);
        }
        let mut tokens = Vec::with_capacity(batch.len());
        let mut spans = Vec::with_capacity(batch.len());
        let mut draws = Vec::with_capacity(batch.len());
        for id in &batch {
            let Some(State::Running(run)) = self.reqs.get_mut(id).map(|r| &mut r.state) else {
                unreachable!("batched requests run");
            };
            tokens.push(*run.tokens.last().expect("a running sequence has tokens"));
            spans.push(Span {
                pos: run.computed,
                n: 1,
                blocks: run.blocks.clone(),
            });
            // Chosen where the logits are, from the next number of its stream.
            let (prompt, output) = run.tokens.split_at(run.prompt_len.min(run.tokens.len()));
            draws.push(run.sampler.draw(prompt, output));
        }
        let chunk = self.next_local_chunk(now);
        if let Some((id, lease, n)) = chunk {
            let r = &self.reqs[&id];
            let State::Local(l) = &r.state else {
                unreachable!("the chunk's request prefills here");
            };
            tokens.extend(&l.tokens[l.done..l.done + n]);
            spans.push(Span {
                pos: l.done,
                n,
                blocks: l.blocks.clone(),
            });
            // The last chunk's logits choose the first token: the request's
            // first draw. Earlier chunks' choices are not used.
            let draw = if l.done + n >= l.tokens.len() {
                let (prompt, output) = l.tokens.split_at(r.gen.prompt.len().min(l.tokens.len()));
                Sampler::with_constraint(&r.gen.params, r.grammar.as_ref().map(|c| c.fork()))
                    .draw(prompt, output)
            } else {
                Draw::GREEDY
            };
            draws.push(draw);
            let _ = lease;
        }
        if spans.is_empty() {
            return (None, out);
        }
        let phase = if chunk.is_some() && self.cfg.dense_prefill {
            Phase::Prefill
        } else {
            Phase::Decode
        };
        let plan = StepPlan {
            batch,
            chunk,
            tokens,
            spans,
            draws,
            phase,
        };
        (Some(plan), out)
    }

    /// The oldest local prefill still wanted: (request, lease, tokens).
    fn next_local_chunk(&mut self, now: u64) -> Option<(RequestId, Lease, usize)> {
        while let Some(&id) = self.local.front() {
            match self.reqs.get_mut(&id).map(|r| &mut r.state) {
                Some(State::Local(l)) => {
                    l.started.get_or_insert(now);
                    let n = (l.tokens.len() - l.done).min(self.cfg.local_chunk.max(1));
                    return Some((id, l.lease, n));
                }
                _ => {
                    self.local.pop_front();
                }
            }
        }
        None
    }

    /// The step's outcome: each span's chosen token, or why it failed; `us`
    /// the pass took.
    pub fn step_done(
        &mut self,
        plan: StepPlan,
        result: Result<Vec<Sampled>, String>,
        us: u64,
        now: u64,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let want = plan.batch.len() + usize::from(plan.chunk.is_some());
        let chosen = match result {
            Ok(s) if s.len() == want => s,
            other => {
                let why = match other {
                    Err(e) => e,
                    Ok(_) => "the decode ranks returned the wrong number of tokens".into(),
                };
                for id in plan.batch.iter().chain(plan.chunk.iter().map(|c| &c.0)) {
                    self.fail(*id, ErrorClass::Internal, why.clone(), now, &mut out);
                }
                return out;
            }
        };
        if let Some((id, lease, n)) = plan.chunk {
            self.local_chunk_done(
                id,
                lease,
                n,
                us,
                chosen[plan.batch.len()].clone(),
                now,
                &mut out,
            );
        }
        for (i, id) in plan.batch.iter().enumerate() {
            let Some(r) = self.reqs.get_mut(id) else {
                continue;
            };
            if r.acct.first_step_us == 0 {
                r.acct.first_step_us = us;
            }
            if let State::Running(run) = &mut r.state {
                run.computed += 1;
                self.emit(*id, chosen[i].clone(), &mut out);
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn local_chunk_done(
        &mut self,
        id: RequestId,
        lease: Lease,
        n: usize,
        us: u64,
        chosen: Sampled,
        now: u64,
        out: &mut Vec<Action>,
    ) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        let State::Local(l) = &mut r.state else {
            return;
        };
        if l.lease != lease {
            return;
        }
        l.done += n;
        l.compute_us += us;
        if l.done < l.tokens.len() {
            return;
        }
        r.acct.cached_tokens = l.cached as u32;
        r.acct.prefilled_tokens = (l.tokens.len() - l.cached) as u32;
        r.acct.prefill_compute_us = l.compute_us;
        r.acct.kv_transport = "local".into();
        let started = l.started.unwrap_or(now);
        r.acct.decode_queue_us = started.saturating_sub(r.submitted) * 1000;
        self.local.retain(|x| *x != id);
        self.local_prefills += 1;
        let actions = self.admission.kv_complete(id, lease, true, now);
        for a in actions {
            match a {
                admission::Action::Start { id, blocks } => {
                    let Some(r) = self.reqs.get_mut(&id) else {
                        continue;
                    };
                    r.state = State::Queued;
                    self.run(id, blocks, chosen.clone(), out);
                }
                other => self.admitted(vec![other], now, out),
            }
        }
    }

    /// The request runs: its first token is streamed.
    pub(crate) fn run(
        &mut self,
        id: RequestId,
        blocks: Vec<BlockId>,
        first: Sampled,
        out: &mut Vec<Action>,
    ) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        let params = r.gen.params.clone();
        let mut sampler = Sampler::with_constraint(&params, r.grammar.as_ref().map(|c| c.fork()));
        // The first token used the stream's first number (on the pipeline
        // or here), and an earlier attempt's tokens the ones after it.
        sampler.skip(1 + r.gen.generated.len());
        let mut tokens = r.gen.prompt.clone();
        tokens.extend(&r.gen.generated);
        let computed = tokens.len();
        r.state = State::Running(Running {
            prompt_len: r.gen.prompt.len(),
            tokens,
            blocks,
            computed,
            sampler,
            index: r.gen.generated.len() as u32,
        });
        r.acct.first_step_us = 0;
        out.push(Action::Stream {
            id,
            params,
            generated: r.gen.generated.clone(),
        });
        self.emit(id, first, out);
    }

    /// Streams one chosen token.
    fn emit(&mut self, id: RequestId, s: Sampled, out: &mut Vec<Action>) {
        let context = self.cfg.context;
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        let State::Running(run) = &mut r.state else {
            return;
        };
        let index = run.index;
        run.index += 1;
        run.tokens.push(s.token);
        out.push(Action::Token {
            id,
            client: r.client.clone(),
            index,
            token: s.token,
            logprob: s.logprob,
            top: s.top,
            context_full: run.tokens.len() + 1 > context,
        });
    }

    /// The request's last token was streamed: it ends here. Its KV stays
    /// cached for the conversation's next turn; the pipeline is asked to
    /// cache the answer too.
    pub fn finish(
        &mut self,
        id: RequestId,
        reason: tandem_model::FinishReason,
        now: u64,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(r) = self.reqs.remove(&id) else {
            return out;
        };
        let State::Running(run) = &r.state else {
            self.reqs.insert(id, r);
            return out;
        };
        let computed = run.tokens[..run.computed].to_vec();
        let mut acct = r.acct.clone();
        acct.gateway_queue_us = 0;
        Self::event(
            &mut out,
            &r.client,
            id,
            GenerateEvent::Finished {
                reason,
                accounting: acct,
            },
        );
        let actions = self.admission.finish(id, &computed, now);
        self.admitted(actions, now, &mut out);
        if let Some(p) = r.filled_by.as_ref().filter(|_| r.gen.session.is_some()) {
            let p = p.clone();
            self.warm(id, &p, computed, now, &mut out);
        }
        out
    }
}
