//! Ending a prefill attempt, and keeping its blocks out of use while stages
//! may still write them: a stage that writes decode's mapped pools directly
//! cannot be refused by a handler, so an abandoned attempt's blocks stay
//! quarantined (in [`Admission`]) until every stage of its pipeline says it
//! stopped ([`Message::KvStopped`]) or is gone.

use super::*;

impl Group<'_> {
    /// Tells every stage of the attempt's pipeline to stop, and waits for
    /// the linked ones to confirm when its blocks are quarantined.
    pub(super) fn abort_prefill(&mut self, id: RequestId, lease: Lease, pipeline: &str) {
        if let Some(n) = self.inflight.get_mut(pipeline) {
            *n = n.saturating_sub(1);
        }
        let stages: Vec<String> = self
            .pipelines
            .iter()
            .find(|p| p.name == pipeline)
            .map(|p| p.stages.iter().map(|s| s.0.clone()).collect())
            .unwrap_or_default();
        // Every stage hears it from decode (stage 0 also passes it on), so a
        // stage whose predecessor is gone still stops and confirms. A stage
        // that is gone writes nothing: only linked ones are waited for.
        let mut waiting = HashSet::new();
        for (i, s) in stages.iter().enumerate() {
            if let Some(l) = self.links.get(s) {
                let _ = l.try_send(Message::PrefillAbort {
                    id,
                    lease,
                    decode: self.name.clone(),
                });
                waiting.insert(i as u32);
            }
        }
        if !self.admission.quarantined(id, lease) {
            return;
        }
        if waiting.is_empty() {
            let now = self.now();
            let actions = self.admission.writers_stopped(id, lease, now);
            self.carry_out(actions);
        } else {
            self.stopping
                .insert((id, lease), (pipeline.to_string(), waiting));
        }
    }

    /// Stage `stage` of the attempt's pipeline no longer writes its blocks.
    pub(super) fn writer_stopped(&mut self, id: RequestId, lease: Lease, stage: u32) {
        let done = match self.stopping.get_mut(&(id, lease)) {
            Some((_, left)) => {
                left.remove(&stage);
                left.is_empty()
            }
            None => false,
        };
        if done {
            self.stopping.remove(&(id, lease));
            let now = self.now();
            let actions = self.admission.writers_stopped(id, lease, now);
            self.carry_out(actions);
        }
    }

    /// A lost stage writes nothing more into quarantined blocks.
    pub(super) fn stage_gone(&mut self, peer: &str) {
        let gone: Vec<(RequestId, Lease, u32)> = self
            .stopping
            .iter()
            .filter_map(|(k, (pipeline, _))| {
                let p = self.pipelines.iter().find(|p| &p.name == pipeline)?;
                let i = p.stages.iter().position(|s| s.0 == peer)?;
                Some((k.0, k.1, i as u32))
            })
            .collect();
        for (id, lease, stage) in gone {
            self.writer_stopped(id, lease, stage);
        }
    }
}
