//! A block pool with a prefix cache: blocks are reference-counted; a full
//! block whose tokens are known is keyed by a hash chain (its parent's hash
//! and its token ids), so a later sequence that starts with the same tokens
//! reuses it instead of recomputing it. A cached block nobody references
//! stays cached and is evicted least-recently-used when fresh blocks run out;
//! a referenced block is never evicted.

use std::collections::{BTreeMap, HashMap};

use crate::kv::BlockId;

/// The chained hash of every full block of `tokens`, in order.
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(tokens.len() / block_size.max(1));
    let mut parent = 0x7A4D_E11A_u64;
    for block in tokens.chunks_exact(block_size.max(1)) {
        let mut bytes = Vec::with_capacity(8 + block.len() * 4);
        bytes.extend_from_slice(&parent.to_le_bytes());
        for t in block {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        parent = xxhash_rust::xxh3::xxh3_64(&bytes);
        out.push(parent);
    }
    out
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub lookups: u64,
    pub evictions: u64,
}

/// What changed in the cache, for nodes that publish it (KV-aware routing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheEvents {
    pub stored: Vec<u64>,
    pub evicted: Vec<u64>,
}

#[derive(Debug, Clone)]
pub struct PrefixCache {
    refs: Vec<u32>,
    /// Never used, or evicted: no KV worth keeping.
    free: Vec<BlockId>,
    by_hash: HashMap<u64, BlockId>,
    hash_of: HashMap<BlockId, u64>,
    /// Unreferenced cached blocks by last use (oldest first).
    idle: BTreeMap<u64, BlockId>,
    idle_since: HashMap<BlockId, u64>,
    tick: u64,
    pub stats: CacheStats,
    events: CacheEvents,
}

impl PrefixCache {
    pub fn new(n_blocks: usize) -> PrefixCache {
        PrefixCache {
            refs: vec![0; n_blocks],
            free: (0..n_blocks as u32).rev().map(BlockId).collect(),
            by_hash: HashMap::new(),
            hash_of: HashMap::new(),
            idle: BTreeMap::new(),
            idle_since: HashMap::new(),
            tick: 0,
            stats: CacheStats::default(),
            events: CacheEvents::default(),
        }
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks a new allocation can get: free ones and evictable cached ones.
    pub fn available(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Blocks some sequence references.
    pub fn used_count(&self) -> usize {
        self.total() - self.available()
    }

    pub fn cached_count(&self) -> usize {
        self.by_hash.len()
    }

    pub fn refcount(&self, b: BlockId) -> u32 {
        self.refs[b.0 as usize]
    }

    pub fn is_cached(&self, b: BlockId) -> bool {
        self.hash_of.contains_key(&b)
    }

    fn take_idle(&mut self, b: BlockId) {
        if let Some(t) = self.idle_since.remove(&b) {
            self.idle.remove(&t);
        }
    }

    /// The cached blocks of the longest cached prefix of `hashes`, each with
    /// a reference taken for the caller.
    pub fn lookup(&mut self, hashes: &[u64]) -> Vec<BlockId> {
        self.stats.lookups += 1;
        let mut out = Vec::new();
        for h in hashes {
            let Some(&b) = self.by_hash.get(h) else { break };
            self.take_idle(b);
            self.refs[b.0 as usize] += 1;
            out.push(b);
        }
        if !out.is_empty() {
            self.stats.hits += 1;
        }
        out
    }

    /// `n` blocks with one reference each: free ones first, then the least
    /// recently used cached ones (their cache entries go). `None`, taking
    /// nothing, when fewer than `n` are available.
    pub fn alloc(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.available() {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let b = match self.free.pop() {
                Some(b) => b,
                None => {
                    let (&t, &b) = self.idle.iter().next().expect("counted above");
                    self.idle.remove(&t);
                    self.idle_since.remove(&b);
                    let h = self.hash_of.remove(&b).expect("idle blocks are cached");
                    self.by_hash.remove(&h);
                    self.events.evicted.push(h);
                    self.stats.evictions += 1;
                    b
                }
            };
            self.refs[b.0 as usize] = 1;
            out.push(b);
        }
        Some(out)
    }

    /// One more reference to a block already referenced.
    pub fn retain(&mut self, b: BlockId) {
        assert!(
            self.refs[b.0 as usize] > 0,
            "retain of an unreferenced block {b:?}"
        );
        self.refs[b.0 as usize] += 1;
    }

    /// Keys referenced, full blocks by their hashes (`blocks[i]` holds the
    /// tokens of `hashes[i]`) once their KV is complete. A hash already
    /// cached in another block stays with that one.
    pub fn insert(&mut self, blocks: &[BlockId], hashes: &[u64]) {
        for (&b, &h) in blocks.iter().zip(hashes) {
            if self.by_hash.contains_key(&h) || self.hash_of.contains_key(&b) {
                continue;
            }
            debug_assert!(self.refs[b.0 as usize] > 0);
            self.by_hash.insert(h, b);
            self.hash_of.insert(b, h);
            self.events.stored.push(h);
        }
    }

    /// Drops one reference to each block. A block nobody references any more
    /// stays cached (evictable) if it is keyed, else it is free again.
    pub fn release(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            let r = &mut self.refs[b.0 as usize];
            assert!(*r > 0, "release of an unreferenced block {b:?}");
            *r -= 1;
            if *r == 0 {
                if self.hash_of.contains_key(&b) {
                    self.tick += 1;
                    self.idle.insert(self.tick, b);
                    self.idle_since.insert(b, self.tick);
                } else {
                    self.free.push(b);
                }
            }
        }
    }

    /// Hashes stored and evicted since the last call.
    pub fn take_events(&mut self) -> CacheEvents {
        std::mem::take(&mut self.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_shared_prefix_is_found_and_kept_until_evicted() {
        let bs = 4;
        let a: Vec<u32> = (0..12).collect();
        let mut b = a[..8].to_vec();
        b.extend([99, 98, 97, 96]);
        let (ha, hb) = (block_hashes(&a, bs), block_hashes(&b, bs));
        assert_eq!(ha[..2], hb[..2]);
        assert_ne!(
            ha[2], hb[2],
            "the chain makes a block depend on all before it"
        );
        assert_eq!(block_hashes(&a[..11], bs).len(), 2, "only full blocks");

        let mut c = PrefixCache::new(4);
        let blocks = c.alloc(3).expect("room");
        c.insert(&blocks, &ha);
        c.release(&blocks);
        assert_eq!(c.available(), 4, "cached but evictable");
        let hit = c.lookup(&hb);
        assert_eq!(hit, blocks[..2].to_vec());
        let fresh = c.alloc(2).expect("one free, one evicted");
        assert!(
            !fresh.iter().any(|f| hit.contains(f)),
            "referenced blocks are never evicted"
        );
        assert_eq!(c.take_events().evicted, vec![ha[2]]);
        assert!(c.alloc(1).is_none());
        c.release(&hit);
        c.release(&fresh);
        assert_eq!(c.used_count(), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Seq { prefix: u8, len: u8 },
        Finish(usize),
    }

    proptest! {
        /// Random sequences sharing random prefixes come and go on a small
        /// pool: a block someone references is never handed out again, the
        /// blocks found for a prefix hold that prefix's tokens, and the
        /// counts add up.
        #[test]
        fn eviction_never_frees_a_block_in_use(ops in prop::collection::vec(
            prop_oneof![
                (0u8..4, 1u8..20).prop_map(|(prefix, len)| Op::Seq { prefix, len }),
                (0usize..8).prop_map(Op::Finish),
            ], 1..60)) {
            let bs = 4;
            let mut c = PrefixCache::new(12);
            // What each block holds (the hash of the tokens written to it).
            let mut content: HashMap<BlockId, u64> = HashMap::new();
            let mut live: Vec<Vec<BlockId>> = Vec::new();
            for op in ops {
                match op {
                    Op::Seq { prefix, len } => {
                        let tokens: Vec<u32> = (0..len as u32).map(|i| if i < 8 { prefix as u32 * 1000 + i } else { 7 + i }).collect();
                        let hashes = block_hashes(&tokens, bs);
                        let hit = c.lookup(&hashes);
                        for (i, b) in hit.iter().enumerate() {
                            prop_assert_eq!(content.get(b), Some(&hashes[i]), "a hit holds its prefix");
                        }
                        let need = (tokens.len().div_ceil(bs)).saturating_sub(hit.len());
                        match c.alloc(need) {
                            Some(fresh) => {
                                for b in &fresh {
                                    prop_assert!(!live.iter().flatten().any(|l| l == b), "block {b:?} is in use");
                                    content.remove(b);
                                }
                                let mut all = hit.clone();
                                all.extend(fresh);
                                for (i, b) in all.iter().enumerate().skip(hit.len()) {
                                    if let Some(h) = hashes.get(i) {
                                        content.insert(*b, *h);
                                    }
                                }
                                c.insert(&all, &hashes);
                                live.push(all);
                            }
                            None => c.release(&hit),
                        }
                    }
                    Op::Finish(i) => {
                        if !live.is_empty() {
                            let blocks = live.remove(i % live.len());
                            c.release(&blocks);
                        }
                    }
                }
                let referenced: usize = {
                    let mut all: Vec<BlockId> = live.iter().flatten().copied().collect();
                    all.sort();
                    all.dedup();
                    all.len()
                };
                prop_assert_eq!(c.used_count(), referenced);
            }
        }
    }
}
