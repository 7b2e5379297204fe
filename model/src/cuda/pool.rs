//! A KV pool in device memory, with the CPU pool's block-major layout
//! ([`crate::kv`]), so the reshard plan and the transfer protocol address
//! it the same way; only the copies differ. Besides the pool's blocks it
//! holds one spare block that padded rows of a captured decode step write
//! into, so they never touch a sequence's KV.

use std::sync::Arc;

use half::{bf16, f16};

use super::gpu::{DevBuf, Stream};
use crate::error::{ModelError, Result};
use crate::kv::{BlockId, KvDtype, KvLayout};

pub struct DevicePool {
    pub layout: KvLayout,
    pub n_blocks: usize,
    pub buf: DevBuf,
    pub stream: Arc<Stream>,
}

impl std::fmt::Debug for DevicePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevicePool")
            .field("n_blocks", &self.n_blocks)
            .field("gpu", &self.stream.gpu)
            .finish()
    }
}

/// The kernels' code for a KV element type.
pub fn dtype_code(d: KvDtype) -> i32 {
    match d {
        KvDtype::F32 => 0,
        KvDtype::F16 => 1,
        KvDtype::Bf16 => 2,
    }
}

impl DevicePool {
    /// `n_blocks` zeroed blocks (and the spare) on the stream's GPU.
    pub fn new(layout: KvLayout, n_blocks: usize, stream: Arc<Stream>) -> Result<DevicePool> {
        let bytes = layout.block_bytes() * (n_blocks + 1);
        let buf = stream.gpu.alloc(bytes)?;
        stream.zero(buf.ptr, bytes)?;
        Ok(DevicePool {
            layout,
            n_blocks,
            buf,
            stream,
        })
    }

    /// The block that padded rows of a captured step write into.
    pub fn spare(&self) -> BlockId {
        BlockId(self.n_blocks as u32)
    }

    fn check(&self, block: BlockId) -> Result<usize> {
        let b = block.0 as usize;
        if b >= self.n_blocks {
            return Err(ModelError::Kv(format!(
                "block {b} is outside the pool of {} blocks",
                self.n_blocks
            )));
        }
        Ok(b * self.layout.block_bytes())
    }

    /// Bytes of elements `[off, off + len)` of a block, as stored.
    pub fn read_region(&self, block: BlockId, off: usize, len: usize) -> Result<Vec<u8>> {
        let base = self.check(block)?;
        if off + len > self.layout.block_elems() {
            return Err(ModelError::Kv(format!(
                "region {off}+{len} is outside a block of {}",
                self.layout.block_elems()
            )));
        }
        let eb = self.layout.dtype.bytes();
        self.stream
            .read::<u8>(self.buf.at(base + off * eb), len * eb)
    }

    /// Writes `bytes` (as stored) at element `off` of a block.
    pub fn write_region(&self, block: BlockId, off: usize, bytes: &[u8]) -> Result<()> {
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
        let base = self.check(block)?;
        self.stream.htod(self.buf.at(base + off * eb), bytes)
    }

    /// One position's vector for one layer, K or V, and head, from f32.
    pub fn write(
        &self,
        block: BlockId,
        layer: usize,
        kv: usize,
        head: usize,
        slot: usize,
        v: &[f32],
    ) -> Result<()> {
        let off = self.layout.offset(layer, kv, head, slot);
        let bytes: Vec<u8> = match self.layout.dtype {
            KvDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            KvDtype::F16 => v
                .iter()
                .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                .collect(),
            KvDtype::Bf16 => v
                .iter()
                .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
                .collect(),
        };
        self.write_region(block, off, &bytes)
    }

    /// A whole block as f32 values.
    pub fn block_f32(&self, block: BlockId) -> Result<Vec<f32>> {
        let b = self.read_region(block, 0, self.layout.block_elems())?;
        Ok(match self.layout.dtype {
            KvDtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            KvDtype::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            KvDtype::Bf16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        })
    }
}
