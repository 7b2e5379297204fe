//! The paged KV cache: a pool of fixed-size blocks per model slice, and the
//! allocator that hands them out.
//!
//! # Block layout
//!
//! A block holds `block_size` consecutive token positions of one sequence for
//! every layer and KV head of the slice that owns the pool. It is one
//! contiguous region, so it can be sent in one piece. Inside a block, elements
//! are ordered
//!
//! ```text
//! [layer][K=0 | V=1][kv_head][slot][head_dim]
//! ```
//!
//! so one layer's K (or V) for a range of heads is also contiguous: the piece
//! a prefill stage sends to a decode rank that holds those heads.

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Index of a block in a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockId(pub u32);

/// Element type of KV storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvDtype {
    F32,
    F16,
    Bf16,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 | KvDtype::Bf16 => 2,
        }
    }

    pub fn parse(s: &str) -> Option<KvDtype> {
        match s {
            "f32" => Some(KvDtype::F32),
            "f16" => Some(KvDtype::F16),
            "bf16" => Some(KvDtype::Bf16),
            _ => None,
        }
    }
}

/// Shape of one block: which layers and heads it spans and how it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    pub layers: usize,
    pub kv_heads: usize,
    pub block_size: usize,
    pub head_dim: usize,
    pub dtype: KvDtype,
}

impl KvLayout {
    pub const DEFAULT_BLOCK_SIZE: usize = 16;

    pub fn block_elems(&self) -> usize {
        self.layers * 2 * self.kv_heads * self.block_size * self.head_dim
    }

    pub fn block_bytes(&self) -> usize {
        self.block_elems() * self.dtype.bytes()
    }

    /// Element offset, within a block, of one position's head vector.
    pub fn offset(&self, layer: usize, kv: usize, head: usize, slot: usize) -> usize {
        ((layer * 2 + kv) * self.kv_heads + head) * self.block_size * self.head_dim
            + slot * self.head_dim
    }

    /// Number of blocks a sequence of `tokens` positions needs.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }
}

/// Conversion between storage elements and f32.
pub trait KvElem: Copy + Send + Sync + Default + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// The slice itself when the storage is already f32 (fast paths read it directly).
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        let _ = s;
        None
    }
}

impl KvElem for f32 {
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        v
    }
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
}

impl KvElem for f16 {
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl KvElem for bf16 {
    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

#[derive(Debug)]
pub enum KvStorage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

/// The KV memory of one slice: `n_blocks` blocks of `layout`.
#[derive(Debug)]
pub struct KvPool {
    pub layout: KvLayout,
    pub n_blocks: usize,
    pub storage: KvStorage,
}

impl KvPool {
    /// The pool's memory as bytes: where a transport may write blocks
    /// directly. The storage is allocated once and never resized, so the
    /// address holds for the pool's life.
    pub fn raw_bytes(&mut self) -> (*mut u8, usize) {
        match &mut self.storage {
            KvStorage::F32(v) => (v.as_mut_ptr() as *mut u8, v.len() * 4),
            KvStorage::F16(v) => (v.as_mut_ptr() as *mut u8, v.len() * 2),
            KvStorage::Bf16(v) => (v.as_mut_ptr() as *mut u8, v.len() * 2),
        }
    }

    pub fn new(layout: KvLayout, n_blocks: usize) -> KvPool {
        let n = layout.block_elems() * n_blocks;
        let storage = match layout.dtype {
            KvDtype::F32 => KvStorage::F32(vec![0.0; n]),
            KvDtype::F16 => KvStorage::F16(vec![f16::ZERO; n]),
            KvDtype::Bf16 => KvStorage::Bf16(vec![bf16::ZERO; n]),
        };
        KvPool {
            layout,
            n_blocks,
            storage,
        }
    }

    fn check(&self, block: BlockId) -> Result<usize> {
        let b = block.0 as usize;
        if b >= self.n_blocks {
            return Err(ModelError::Kv(format!(
                "block {b} is outside the pool of {} blocks",
                self.n_blocks
            )));
        }
        Ok(b * self.layout.block_elems())
    }

    /// Writes one position's vector for one layer, K or V, and head.
    pub fn write(
        &mut self,
        block: BlockId,
        layer: usize,
        kv: usize,
        head: usize,
        slot: usize,
        v: &[f32],
    ) -> Result<()> {
        let base = self.check(block)? + self.layout.offset(layer, kv, head, slot);
        let hd = self.layout.head_dim;
        fn put<T: KvElem>(dst: &mut [T], v: &[f32]) {
            for (d, s) in dst.iter_mut().zip(v) {
                *d = T::from_f32(*s);
            }
        }
        match &mut self.storage {
            KvStorage::F32(s) => put(&mut s[base..base + hd], v),
            KvStorage::F16(s) => put(&mut s[base..base + hd], v),
            KvStorage::Bf16(s) => put(&mut s[base..base + hd], v),
        }
        Ok(())
    }

    /// Bytes `[off, off + len)` elements of a block, little-endian, as stored.
    pub fn read_region(&self, block: BlockId, off: usize, len: usize) -> Result<Vec<u8>> {
        let base = self.check(block)? + off;
        if off + len > self.layout.block_elems() {
            return Err(ModelError::Kv(format!(
                "region {off}+{len} is outside a block of {}",
                self.layout.block_elems()
            )));
        }
        Ok(match &self.storage {
            KvStorage::F32(s) => s[base..base + len]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            KvStorage::F16(s) => s[base..base + len]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            KvStorage::Bf16(s) => s[base..base + len]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        })
    }

    /// Writes little-endian `bytes` (as stored) at element `off` of a block.
    pub fn write_region(&mut self, block: BlockId, off: usize, bytes: &[u8]) -> Result<()> {
        let eb = self.layout.dtype.bytes();
        let len = bytes.len() / eb;
        if bytes.len() % eb != 0 || off + len > self.layout.block_elems() {
            return Err(ModelError::Kv(format!(
                "{} bytes at element {off} do not fit a block of {} {}-byte elements",
                bytes.len(),
                self.layout.block_elems(),
                eb
            )));
        }
        let base = self.check(block)? + off;
        match &mut self.storage {
            KvStorage::F32(s) => {
                for (d, c) in s[base..base + len].iter_mut().zip(bytes.chunks_exact(4)) {
                    *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            KvStorage::F16(s) => {
                for (d, c) in s[base..base + len].iter_mut().zip(bytes.chunks_exact(2)) {
                    *d = f16::from_le_bytes([c[0], c[1]]);
                }
            }
            KvStorage::Bf16(s) => {
                for (d, c) in s[base..base + len].iter_mut().zip(bytes.chunks_exact(2)) {
                    *d = bf16::from_le_bytes([c[0], c[1]]);
                }
            }
        }
        Ok(())
    }

    /// A whole block as f32 values (for tests, checksums and transfers).
    pub fn block_f32(&self, block: BlockId) -> Result<Vec<f32>> {
        let base = self.check(block)?;
        let n = self.layout.block_elems();
        Ok(match &self.storage {
            KvStorage::F32(s) => s[base..base + n].to_vec(),
            KvStorage::F16(s) => s[base..base + n].iter().map(|v| v.to_f32()).collect(),
            KvStorage::Bf16(s) => s[base..base + n].iter().map(|v| v.to_f32()).collect(),
        })
    }

    /// A whole block's bytes, little-endian, as stored.
    pub fn block_bytes(&self, block: BlockId) -> Result<Vec<u8>> {
        self.read_region(block, 0, self.layout.block_elems())
    }
}

/// Hands out blocks of one pool and counts references to them, so a block
/// shared by several sequences (a cached prefix) is freed only by its last user.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free: Vec<BlockId>,
    refs: Vec<u32>,
}

impl BlockAllocator {
    pub fn new(n_blocks: usize) -> BlockAllocator {
        BlockAllocator {
            free: (0..n_blocks as u32).rev().map(BlockId).collect(),
            refs: vec![0; n_blocks],
        }
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    pub fn used_count(&self) -> usize {
        self.total() - self.free_count()
    }

    /// `n` fresh blocks, each with one reference, or `None` (nothing taken)
    /// when fewer than `n` are free.
    pub fn alloc(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free.len() {
            return None;
        }
        let out = self.free.split_off(self.free.len() - n);
        for b in &out {
            self.refs[b.0 as usize] = 1;
        }
        Some(out)
    }

    pub fn retain(&mut self, b: BlockId) {
        let r = &mut self.refs[b.0 as usize];
        assert!(*r > 0, "retain of a free block {b:?}");
        *r += 1;
    }

    /// Drops one reference; returns true when the block became free.
    pub fn release(&mut self, b: BlockId) -> bool {
        let r = &mut self.refs[b.0 as usize];
        assert!(*r > 0, "release of a free block {b:?}");
        *r -= 1;
        if *r == 0 {
            self.free.push(b);
            true
        } else {
            false
        }
    }

    pub fn release_all(&mut self, blocks: &[BlockId]) {
        for b in blocks {
            self.release(*b);
        }
    }

    pub fn refcount(&self, b: BlockId) -> u32 {
        self.refs[b.0 as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_counts_references() {
        let mut a = BlockAllocator::new(4);
        let b = a.alloc(3).expect("3 of 4 free");
        assert_eq!(a.free_count(), 1);
        assert!(a.alloc(2).is_none());
        assert_eq!(a.free_count(), 1, "a failed allocation takes nothing");
        a.retain(b[0]);
        assert!(!a.release(b[0]));
        assert!(a.release(b[0]));
        a.release_all(&b[1..]);
        assert_eq!(a.free_count(), 4);
    }

    #[test]
    fn layout_offsets_are_block_major_and_disjoint() {
        let l = KvLayout {
            layers: 2,
            kv_heads: 3,
            block_size: 4,
            head_dim: 8,
            dtype: KvDtype::F32,
        };
        let mut seen = std::collections::HashSet::new();
        for layer in 0..2 {
            for kv in 0..2 {
                for h in 0..3 {
                    for s in 0..4 {
                        let o = l.offset(layer, kv, h, s);
                        assert!(o + 8 <= l.block_elems());
                        assert!(seen.insert(o));
                    }
                }
            }
        }
        // one layer's K for heads 1..3 is one contiguous run
        assert_eq!(l.offset(0, 0, 2, 0) - l.offset(0, 0, 1, 0), 4 * 8);
    }

    #[test]
    fn half_precision_round_trips_approximately() {
        for dtype in [KvDtype::F16, KvDtype::Bf16] {
            let l = KvLayout {
                layers: 1,
                kv_heads: 1,
                block_size: 2,
                head_dim: 4,
                dtype,
            };
            let mut p = KvPool::new(l, 2);
            p.write(BlockId(1), 0, 1, 0, 1, &[1.0, -2.5, 0.125, 3.0])
                .expect("in range");
            let b = p.block_f32(BlockId(1)).expect("in range");
            assert_eq!(
                &b[l.offset(0, 1, 0, 1)..l.offset(0, 1, 0, 1) + 4],
                &[1.0, -2.5, 0.125, 3.0]
            );
            assert!(p.write(BlockId(2), 0, 0, 0, 0, &[0.0; 4]).is_err());
        }
    }
}
