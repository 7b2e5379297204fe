//! Tandem's engine on NVIDIA GPUs: the same slices, paged KV layout,
//! sampling semantics and rank groups as on the CPU, computed on the device.
//!
//! - [`gpu`]: the device layer (memory, copies, launches checked against
//!   the kernels' signatures, cuBLAS GEMMs, events, graphs) with two
//!   backends: [`real`] (the CUDA driver through cudarc, every library
//!   loaded at run time) and [`emu`] (the same kernels run on the CPU, for
//!   tests on machines without a GPU).
//! - `kernels.cu`: the CUDA C kernels, compiled at run time by [`nvrtc`].
//! - [`slice`]: a model slice's weights on the device and its forward pass;
//!   [`graph`]: decode steps as CUDA graphs; [`pool`]: the KV pool in
//!   device memory; [`comm`]: the tensor-parallel all-reduce (NCCL, or on
//!   the device for ranks that share one GPU).
//!
//! Nothing here links against CUDA: a binary built without it starts on
//! any machine, and `--device cuda` on a machine without a driver, a GPU
//! or one of the libraries fails at start with a message naming what is
//! missing ([`probe`]).

pub mod check;
pub mod comm;
pub mod emu;
pub mod gpu;
pub mod graph;
mod host_weights;
mod meta;
pub mod nvrtc;
pub mod pool;
pub mod real;
pub mod slice;

pub use comm::{CommSpec, DeviceComm};
pub use gpu::{Arg, DevBuf, Gpu, Stream};
pub use graph::GraphMode;
pub use pool::DevicePool;
pub use slice::{CudaSlice, CudaWeights, GpuDtype};

use crate::device::Device;
use crate::error::Result;

/// Checks that `device` can be used for `ranks` ranks: the driver, a GPU
/// for each rank, NVRTC and cuBLAS (and compiles the kernels); a clear
/// error naming what is missing otherwise. The CPU always can.
pub fn probe(device: &Device, ranks: usize) -> Result<Vec<Gpu>> {
    if device.is_cpu() {
        return Ok(Vec::new());
    }
    (0..ranks.max(1)).map(|r| Gpu::open(device, r)).collect()
}

#[cfg(test)]
mod tests;
