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
    F32(PoolBuf<f32>),
    F16(PoolBuf<f16>),
    Bf16(PoolBuf<bf16>),
    /// In GPU memory: reads and writes are copies on the rank's stream.
    Device(crate::cuda::DevicePool),
}

/// A pool's elements: a vector of its own, or memory a transport allocated
/// for it ([`KvPool::adopt`]): a decode rank's pool in a UCX segment that
/// prefill stages on the same host write with one copy.
pub struct PoolBuf<T> {
    own: Vec<T>,
    external: Option<External>,
}

struct External {
    ptr: *mut u8,
    /// Elements.
    len: usize,
    /// Keeps the memory allocated; dropping it frees it.
    _keep: Box<dyn Send + Sync>,
}

// SAFETY: the external memory is owned by the buffer alone (see
// `KvPool::adopt`), like a `Vec<T>`'s; `T` is a plain number type.
unsafe impl<T: Send> Send for PoolBuf<T> {}
// SAFETY: as above; shared access only reads.
unsafe impl<T: Sync> Sync for PoolBuf<T> {}

impl<T> From<Vec<T>> for PoolBuf<T> {
    fn from(own: Vec<T>) -> Self {
        PoolBuf {
            own,
            external: None,
        }
    }
}

impl<T> std::ops::Deref for PoolBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.external {
            // SAFETY: `adopt` checked size and alignment; the memory lives
            // as long as `_keep`, which lives as long as `self`.
            Some(e) => unsafe { std::slice::from_raw_parts(e.ptr as *const T, e.len) },
            None => &self.own,
        }
    }
}

impl<T> std::ops::DerefMut for PoolBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.external {
            // SAFETY: as in `deref`, and `&mut self` makes this the only
            // reference through the buffer.
            Some(e) => unsafe { std::slice::from_raw_parts_mut(e.ptr as *mut T, e.len) },
            None => &mut self.own,
        }
    }
}

impl<T> std::fmt::Debug for PoolBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuf")
            .field("len", &self.len())
            .field("external", &self.external.is_some())
            .finish()
    }
}

impl<T: Copy> PoolBuf<T> {
    /// Moves the elements into `ptr`, which then backs the buffer.
    ///
    /// # Safety
    /// As [`KvPool::adopt`].
    unsafe fn adopt(
        &mut self,
        ptr: *mut u8,
        bytes: usize,
        keep: Box<dyn Send + Sync>,
    ) -> Result<()> {
        let len = self.len();
        if bytes != std::mem::size_of_val::<[T]>(self) {
            return Err(ModelError::Kv(format!(
                "{bytes} bytes offered for a pool of {} bytes",
                std::mem::size_of_val::<[T]>(self)
            )));
        }
        if ptr.is_null() || !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return Err(ModelError::Kv("pool memory is not aligned".into()));
        }
        // SAFETY: the caller gives `bytes` writable bytes at `ptr`, aligned
        // (checked), disjoint from this buffer's current elements.
        unsafe { std::ptr::copy_nonoverlapping(self.as_ptr(), ptr as *mut T, len) };
        self.external = Some(External {
            ptr,
            len,
            _keep: keep,
        });
        self.own = Vec::new();
        Ok(())
    }
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
    /// `None` for a pool in GPU memory.
    pub fn raw_bytes(&mut self) -> Option<(*mut u8, usize)> {
        match &mut self.storage {
            KvStorage::F32(v) => Some((v.as_mut_ptr() as *mut u8, v.len() * 4)),
            KvStorage::F16(v) => Some((v.as_mut_ptr() as *mut u8, v.len() * 2)),
            KvStorage::Bf16(v) => Some((v.as_mut_ptr() as *mut u8, v.len() * 2)),
            KvStorage::Device(_) => None,
        }
    }

    /// Whether the pool lives in GPU memory.
    pub fn on_device(&self) -> bool {
        matches!(self.storage, KvStorage::Device(_))
    }

    /// A pool of `n_blocks` zeroed blocks in the memory of `stream`'s GPU.
    pub fn new_on_device(
        layout: KvLayout,
        n_blocks: usize,
        stream: std::sync::Arc<crate::cuda::Stream>,
    ) -> Result<KvPool> {
        Ok(KvPool {
            layout,
            n_blocks,
            storage: KvStorage::Device(crate::cuda::DevicePool::new(layout, n_blocks, stream)?),
        })
    }

    /// Moves the pool into `bytes` bytes at `ptr`, which back it from then
    /// on; dropping `keep` (when the pool drops) frees them.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `bytes` bytes until
    /// `keep` is dropped, and nothing else may use that memory meanwhile
    /// except writers of blocks the pool's owner handed them (a transport
    /// landing KV the owner does not read until it is verified).
    pub unsafe fn adopt(
        &mut self,
        ptr: *mut u8,
        bytes: usize,
        keep: Box<dyn Send + Sync>,
    ) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe {
            match &mut self.storage {
                KvStorage::F32(v) => v.adopt(ptr, bytes, keep),
                KvStorage::F16(v) => v.adopt(ptr, bytes, keep),
                KvStorage::Bf16(v) => v.adopt(ptr, bytes, keep),
                KvStorage::Device(_) => Err(ModelError::Kv(
                    "a pool in GPU memory cannot move into host memory".into(),
                )),
            }
        }
    }

    pub fn new(layout: KvLayout, n_blocks: usize) -> KvPool {
        let n = layout.block_elems() * n_blocks;
        let storage = match layout.dtype {
            KvDtype::F32 => KvStorage::F32(vec![0.0; n].into()),
            KvDtype::F16 => KvStorage::F16(vec![f16::ZERO; n].into()),
            KvDtype::Bf16 => KvStorage::Bf16(vec![bf16::ZERO; n].into()),
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
        if let KvStorage::Device(d) = &self.storage {
            return d.write(block, layer, kv, head, slot, v);
        }
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
            KvStorage::Device(_) => unreachable!("handled above"),
        }
        Ok(())
    }

    /// Bytes `[off, off + len)` elements of a block, little-endian, as stored.
    pub fn read_region(&self, block: BlockId, off: usize, len: usize) -> Result<Vec<u8>> {
        if let KvStorage::Device(d) = &self.storage {
            return d.read_region(block, off, len);
        }
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
            KvStorage::Device(_) => unreachable!("handled above"),
        })
    }

    /// Writes little-endian `bytes` (as stored) at element `off` of a block.
    pub fn write_region(&mut self, block: BlockId, off: usize, bytes: &[u8]) -> Result<()> {
        if let KvStorage::Device(d) = &self.storage {
            return d.write_region(block, off, bytes);
        }
        let eb = self.layout.dtype.bytes();
        let len = bytes.len() / eb;
        if !bytes.len().is_multiple_of(eb) || off + len > self.layout.block_elems() {
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
            KvStorage::Device(_) => unreachable!("handled above"),
        }
        Ok(())
    }

    /// A whole block as f32 values (for tests, checksums and transfers).
    pub fn block_f32(&self, block: BlockId) -> Result<Vec<f32>> {
        if let KvStorage::Device(d) = &self.storage {
            return d.block_f32(block);
        }
        let base = self.check(block)?;
        let n = self.layout.block_elems();
        Ok(match &self.storage {
            KvStorage::F32(s) => s[base..base + n].to_vec(),
            KvStorage::F16(s) => s[base..base + n].iter().map(|v| v.to_f32()).collect(),
            KvStorage::Bf16(s) => s[base..base + n].iter().map(|v| v.to_f32()).collect(),
            KvStorage::Device(_) => unreachable!("handled above"),
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

    /// A pool moved into outside memory keeps its contents, reads and
    /// writes there, and frees it (drops `keep`) only when the pool drops;
    /// memory of the wrong size is refused and the pool stays as it was.
    #[test]
    fn an_adopted_pool_keeps_its_data_and_frees_the_memory_with_it() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let l = KvLayout {
            layers: 1,
            kv_heads: 1,
            block_size: 2,
            head_dim: 4,
            dtype: KvDtype::F32,
        };
        let mut p = KvPool::new(l, 2);
        p.write(BlockId(1), 0, 1, 0, 1, &[1.0, 2.0, 3.0, 4.0])
            .unwrap();
        let bytes = p.raw_bytes().expect("host pool").1;
        struct Keep {
            _mem: Vec<f32>,
            freed: Arc<AtomicBool>,
        }
        impl Drop for Keep {
            fn drop(&mut self) {
                self.freed.store(true, Ordering::SeqCst);
            }
        }
        let freed = Arc::new(AtomicBool::new(false));
        let mut mem = vec![9.0f32; bytes / 4];
        let ptr = mem.as_mut_ptr() as *mut u8;
        // SAFETY: `mem`'s heap buffer moves into `keep` and lives as long as it.
        let wrong = unsafe { p.adopt(ptr, bytes - 4, Box::new(())) };
        assert!(wrong.is_err());
        assert_eq!(
            p.block_f32(BlockId(1)).unwrap()[12..16],
            [1.0, 2.0, 3.0, 4.0]
        );
        // SAFETY: as above.
        unsafe {
            p.adopt(
                ptr,
                bytes,
                Box::new(Keep {
                    _mem: mem,
                    freed: freed.clone(),
                }),
            )
        }
        .unwrap();
        assert_eq!(
            p.raw_bytes().expect("host pool").0,
            ptr,
            "the pool now lives in the given memory"
        );
        assert_eq!(
            p.block_f32(BlockId(1)).unwrap()[12..16],
            [1.0, 2.0, 3.0, 4.0]
        );
        assert_eq!(p.block_f32(BlockId(0)).unwrap(), vec![0.0; 16]);
        p.write(BlockId(0), 0, 0, 0, 0, &[5.0; 4]).unwrap();
        assert_eq!(p.block_f32(BlockId(0)).unwrap()[..4], [5.0; 4]);
        assert!(!freed.load(Ordering::SeqCst));
        drop(p);
        assert!(
            freed.load(Ordering::SeqCst),
            "the memory goes with the pool"
        );
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
