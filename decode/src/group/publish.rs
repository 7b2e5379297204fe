//! What a decode group tells the gateway: the prefix-cache blocks it
//! stored and evicted (for KV-aware routing) and its load, with the
//! transfer counters, in the next heartbeat.

use super::*;

impl Group<'_> {
    pub(super) fn publish(&mut self) {
        // Blocks cached and evicted since the last time, for the gateway's
        // KV-aware routing.
        let ev = self.admission.cache.take_events();
        if let Some(gw) = self.links.get(&self.gateway) {
            if !ev.stored.is_empty() {
                let _ = gw.try_send(Message::CacheStored {
                    node: self.name.clone(),
                    hashes: ev.stored,
                });
            }
            if !ev.evicted.is_empty() {
                let _ = gw.try_send(Message::CacheEvicted {
                    node: self.name.clone(),
                    hashes: ev.evicted,
                });
            }
        }
        let mut b = self.beat.lock().expect("heartbeat state");
        b.load = Load {
            running: self.admission.running() as u32,
            queued: self.admission.queued() as u32,
            free_blocks: (self.admission.total_blocks() - self.admission.used_blocks()) as u32,
            total_blocks: self.admission.total_blocks() as u32,
            pipelines_up: self.pipelines_up().len() as u32,
            kv_checksum_failures: self.admission.counters.checksum_failures,
            kv_retries: self.admission.counters.retries,
            kv_quarantined_blocks: self.admission.quarantined_blocks() as u32,
            kv_quarantines_expired: self.admission.counters.quarantine_expired,
            kv_blocks_quic: self.admission.counters.blocks_quic,
            kv_blocks_ucx_direct: self.admission.counters.blocks_ucx_direct,
            kv_blocks_ucx_messages: self.admission.counters.blocks_ucx_messages,
        };
        b.gateway = self.links.get(&self.gateway).cloned();
    }
}
