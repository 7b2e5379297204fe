//! KV transfer: how a prefill stage's KV blocks land in decode ranks' blocks.
//!
//! A prefill stage holds some layers and every KV head; a decode rank holds
//! every layer and some KV heads. [`PoolDesc`] says which part of the model a
//! pool covers and how its blocks are laid out; [`reshard_plan`] turns a
//! (stage, rank) pair into the contiguous element runs to copy from a stage
//! block to a rank block (per layer, K and V, the rank's heads: whole runs,
//! merged where both sides are contiguous). [`Checksum`] fingerprints what was
//! sent so a receiver can tell a complete, uncorrupted transfer from any other.
//! [`transfer`] tracks one request's transfer on both sides and defines the
//! [`Transport`] trait with its QUIC and in-process backends.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use tandem_model::{BlockId, KvLayout, KvPool};

#[derive(Debug, thiserror::Error)]
pub enum KvTransferError {
    #[error("pools do not match: {0}")]
    Mismatch(String),
    #[error(transparent)]
    Kv(#[from] tandem_model::ModelError),
    #[error("transport: {0}")]
    Transport(String),
}

pub mod over_ucx;
pub mod stream_copy;
pub mod transfer;
pub mod ucx;
pub use transfer::{InProcess, Incoming, Outgoing, QuicTransport, Transport, Verdict};

pub type Result<T> = std::result::Result<T, KvTransferError>;

/// Which global layers and KV heads a pool holds, and its block layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolDesc {
    pub layers: Range<usize>,
    pub heads: Range<usize>,
    pub layout: KvLayout,
}

impl PoolDesc {
    pub fn new(
        layers: Range<usize>,
        heads: Range<usize>,
        block_size: usize,
        head_dim: usize,
        dtype: tandem_model::KvDtype,
    ) -> PoolDesc {
        let layout = KvLayout {
            layers: layers.len(),
            kv_heads: heads.len(),
            block_size,
            head_dim,
            dtype,
        };
        PoolDesc {
            layers,
            heads,
            layout,
        }
    }
}

/// Copy `len` elements from `src` (offset in a source block) to `dst`
/// (offset in a destination block).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyRun {
    pub src: usize,
    pub dst: usize,
    pub len: usize,
}

fn intersect(a: &Range<usize>, b: &Range<usize>) -> Range<usize> {
    a.start.max(b.start)..a.end.min(b.end).max(a.start.max(b.start))
}

/// The runs that move what `src` and `dst` share (layers ∩ layers, heads ∩
/// heads) from a `src` block to a `dst` block, in destination order.
pub fn reshard_plan(src: &PoolDesc, dst: &PoolDesc) -> Result<Vec<CopyRun>> {
    let (s, d) = (&src.layout, &dst.layout);
    if (s.block_size, s.head_dim, s.dtype) != (d.block_size, d.head_dim, d.dtype) {
        return Err(KvTransferError::Mismatch(format!(
            "block size {} / head dim {} / {:?} against {} / {} / {:?}",
            s.block_size, s.head_dim, s.dtype, d.block_size, d.head_dim, d.dtype
        )));
    }
    let layers = intersect(&src.layers, &dst.layers);
    let heads = intersect(&src.heads, &dst.heads);
    let mut runs: Vec<CopyRun> = Vec::new();
    if heads.is_empty() {
        return Ok(runs);
    }
    let per_head = s.block_size * s.head_dim;
    for l in layers {
        for kv in 0..2 {
            let run = CopyRun {
                src: s.offset(l - src.layers.start, kv, heads.start - src.heads.start, 0),
                dst: d.offset(l - dst.layers.start, kv, heads.start - dst.heads.start, 0),
                len: heads.len() * per_head,
            };
            match runs.last_mut() {
                Some(last) if last.src + last.len == run.src && last.dst + last.len == run.dst => {
                    last.len += run.len
                }
                _ => runs.push(run),
            }
        }
    }
    Ok(runs)
}

/// The bytes of `runs` read from one source block, in order: what goes on the wire.
pub fn gather(pool: &KvPool, block: BlockId, runs: &[CopyRun]) -> Result<Vec<u8>> {
    let mut out =
        Vec::with_capacity(runs.iter().map(|r| r.len).sum::<usize>() * pool.layout.dtype.bytes());
    for r in runs {
        out.extend(pool.read_region(block, r.src, r.len)?);
    }
    Ok(out)
}

/// Writes bytes made by [`gather`] with the same `runs` into a destination block.
pub fn scatter(pool: &mut KvPool, block: BlockId, runs: &[CopyRun], bytes: &[u8]) -> Result<()> {
    let eb = pool.layout.dtype.bytes();
    let total: usize = runs.iter().map(|r| r.len * eb).sum();
    if total != bytes.len() {
        return Err(KvTransferError::Mismatch(format!(
            "{} bytes for runs covering {total}",
            bytes.len()
        )));
    }
    let mut at = 0;
    for r in runs {
        pool.write_region(block, r.dst, &bytes[at..at + r.len * eb])?;
        at += r.len * eb;
    }
    Ok(())
}

/// A running fingerprint of everything a transfer carried, block by block.
/// Sender and receiver compute it independently; a missing, reordered or
/// corrupted block gives a different value.
#[derive(Debug, Clone, Default)]
pub struct Checksum {
    acc: u64,
    blocks: u64,
}

impl Checksum {
    pub fn add(&mut self, block: BlockId, bytes: &[u8]) {
        let h = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, u64::from(block.0));
        self.acc = self.acc.rotate_left(5) ^ h;
        self.blocks += 1;
    }

    pub fn value(&self) -> u64 {
        self.acc ^ self.blocks.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

#[cfg(test)]
mod tests;
