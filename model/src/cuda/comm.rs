//! All-reduce between the tensor-parallel ranks of a slice on GPUs.
//!
//! Ranks on distinct GPUs reduce with NCCL (one communicator per group,
//! one GPU per rank). Ranks that share one GPU (a machine with fewer GPUs
//! than ranks) reduce on it: each rank's stream waits for every peer's
//! partial sum, adds all of them in rank order into a buffer of its own
//! (so every rank computes the same bits, as the CPU's `ThreadGroup`
//! does), waits until every peer has read its input, and copies the sum
//! back. Only the host threads meet at barriers; the GPU work stays queued.

use std::sync::{Arc, Condvar, Mutex};

use super::gpu::{err, Arg, DevBuf, Event, Stream};
use crate::error::Result;

/// How a rank combines partial sums with its peers.
pub trait DeviceComm {
    fn world(&self) -> usize;
    fn rank(&self) -> usize;
    /// Replaces the `n` f32 at `ptr` with their sum over ranks, on `stream`.
    fn all_reduce(&self, stream: &Stream, ptr: u64, n: usize) -> Result<()>;
    /// Whether the reduction can be captured in a CUDA graph.
    fn capturable(&self) -> bool;
}

/// A group of one: nothing to combine.
pub struct SoloDev;

impl DeviceComm for SoloDev {
    fn world(&self) -> usize {
        1
    }
    fn rank(&self) -> usize {
        0
    }
    fn all_reduce(&self, _: &Stream, _: u64, _: usize) -> Result<()> {
        Ok(())
    }
    fn capturable(&self) -> bool {
        true
    }
}

/// What a rank thread needs to join its group: sent to the thread, which
/// builds its [`DeviceComm`] there (an NCCL communicator stays on the
/// thread that made it).
pub enum CommSpec {
    Solo,
    Shared(SharedGpu),
    Nccl {
        id: cudarc::nccl::sys::ncclUniqueId,
        rank: usize,
        world: usize,
    },
}

impl CommSpec {
    /// One spec per rank: NCCL when every rank has a GPU of its own, the
    /// on-device reduction when all share one.
    pub fn for_ranks(ordinals: &[usize]) -> Result<Vec<CommSpec>> {
        let world = ordinals.len();
        if world == 1 {
            return Ok(vec![CommSpec::Solo]);
        }
        if ordinals.iter().all(|o| *o == ordinals[0]) {
            return Ok(SharedGpu::new(world)
                .into_iter()
                .map(CommSpec::Shared)
                .collect());
        }
        let mut distinct = ordinals.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() != world {
            return Err(err(format!(
                "tensor-parallel ranks on GPUs {ordinals:?}: give every rank its own GPU, or put all on one"
            )));
        }
        probe_nccl()?;
        let id = cudarc::nccl::result::get_uniqueid()
            .map_err(|e| err(format!("ncclGetUniqueId: {:?}", e.0)))?;
        Ok((0..world)
            .map(|rank| CommSpec::Nccl { id, rank, world })
            .collect())
    }

    /// Joins the group, on the rank's own thread.
    pub fn join(self, stream: &Stream) -> Result<Box<dyn DeviceComm>> {
        Ok(match self {
            CommSpec::Solo => Box::new(SoloDev),
            CommSpec::Shared(s) => Box::new(s),
            CommSpec::Nccl { id, rank, world } => Box::new(NcclComm::new(id, rank, world, stream)?),
        })
    }
}

/// Fails with a clear message when libnccl cannot be loaded.
pub fn probe_nccl() -> Result<()> {
    // SAFETY: only tries to dlopen the candidate names.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(err(
            "NCCL was not found as libnccl.so: install it (or `pip install nvidia-nccl-cu13`) and \
             put a directory holding libnccl.so (a link to libnccl.so.2 will do) on LD_LIBRARY_PATH",
        ))
    }
}

struct Round {
    arrived: usize,
    generation: u64,
    aborted: bool,
}

struct Shared {
    world: usize,
    /// Per rank: its buffer and the event after which it holds the partial sum.
    inputs: Mutex<Vec<Option<(u64, Arc<Event>)>>>,
    /// Per rank: the event after which it has read every peer's buffer.
    read: Mutex<Vec<Option<Arc<Event>>>>,
    round: Mutex<Round>,
    cv: Condvar,
}

impl Shared {
    fn wait(&self) -> Result<()> {
        let gone = || err("a tensor-parallel rank left its group");
        let mut st = self.round.lock().map_err(|_| gone())?;
        if st.aborted {
            return Err(gone());
        }
        let gen = st.generation;
        st.arrived += 1;
        if st.arrived == self.world {
            st.arrived = 0;
            st.generation += 1;
            self.cv.notify_all();
            return Ok(());
        }
        while st.generation == gen && !st.aborted {
            st = self.cv.wait(st).map_err(|_| gone())?;
        }
        if st.generation == gen {
            return Err(gone());
        }
        Ok(())
    }
}

/// One rank's handle on a group of ranks sharing one GPU. Dropping it (the
/// rank thread ending) releases the others from their waits with an error.
pub struct SharedGpu {
    shared: Arc<Shared>,
    rank: usize,
    /// The rank's sum, and the device array of the peers' addresses.
    scratch: Mutex<Option<(DevBuf, DevBuf)>>,
}

impl SharedGpu {
    pub fn new(world: usize) -> Vec<SharedGpu> {
        let shared = Arc::new(Shared {
            world,
            inputs: Mutex::new(vec![None; world]),
            read: Mutex::new(vec![None; world]),
            round: Mutex::new(Round {
                arrived: 0,
                generation: 0,
                aborted: false,
            }),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| SharedGpu {
                shared: shared.clone(),
                rank,
                scratch: Mutex::new(None),
            })
            .collect()
    }
}

impl Drop for SharedGpu {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.round.lock() {
            st.aborted = true;
        }
        self.shared.cv.notify_all();
    }
}

impl DeviceComm for SharedGpu {
    fn world(&self) -> usize {
        self.shared.world
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn all_reduce(&self, stream: &Stream, ptr: u64, n: usize) -> Result<()> {
        let world = self.shared.world;
        let poisoned = || err("a tensor-parallel rank panicked");
        let mut scratch = self.scratch.lock().map_err(|_| poisoned())?;
        if scratch.as_ref().is_none_or(|(s, _)| s.bytes < n * 4) {
            *scratch = Some((stream.gpu.alloc(n * 4)?, stream.gpu.alloc(world * 8)?));
        }
        let (sum, srcs) = scratch.as_ref().expect("allocated above");
        let ready = Arc::new(stream.record()?);
        self.shared.inputs.lock().map_err(|_| poisoned())?[self.rank] = Some((ptr, ready));
        self.shared.wait()?;
        let inputs: Vec<(u64, Arc<Event>)> = self
            .shared
            .inputs
            .lock()
            .map_err(|_| poisoned())?
            .iter()
            .map(|s| s.clone().ok_or_else(|| err("a rank published no buffer")))
            .collect::<Result<_>>()?;
        for (r, (_, ev)) in inputs.iter().enumerate() {
            if r != self.rank {
                stream.wait(ev)?;
            }
        }
        let ptrs: Vec<u64> = inputs.iter().map(|(p, _)| *p).collect();
        stream.htod(srcs.ptr, &ptrs)?;
        let blocks = n.div_ceil(256).min(4096) as u32;
        stream.launch(
            "sum_buffers",
            (blocks.max(1), 1, 1),
            (256, 1, 1),
            0,
            &[
                sum.arg(),
                srcs.arg(),
                Arg::I32(world as i32),
                Arg::I64(n as i64),
            ],
        )?;
        let done = Arc::new(stream.record()?);
        self.shared.read.lock().map_err(|_| poisoned())?[self.rank] = Some(done);
        self.shared.wait()?;
        let reads: Vec<Arc<Event>> = self
            .shared
            .read
            .lock()
            .map_err(|_| poisoned())?
            .iter()
            .map(|s| s.clone().ok_or_else(|| err("a rank published no event")))
            .collect::<Result<_>>()?;
        for (r, ev) in reads.iter().enumerate() {
            if r != self.rank {
                stream.wait(ev)?;
            }
        }
        stream.dtod(ptr, sum.ptr, n * 4)
    }

    fn capturable(&self) -> bool {
        false
    }
}

/// A rank of an NCCL communicator, on the thread that created it.
pub struct NcclComm {
    comm: cudarc::nccl::sys::ncclComm_t,
    rank: usize,
    world: usize,
}

impl NcclComm {
    /// Joins communicator `id` as `rank` of `world`; blocks until every
    /// rank has joined. The rank's GPU must be current on this thread.
    pub fn new(
        id: cudarc::nccl::sys::ncclUniqueId,
        rank: usize,
        world: usize,
        stream: &Stream,
    ) -> Result<NcclComm> {
        probe_nccl()?;
        if stream.raw().is_none() {
            return Err(err("NCCL needs a GPU, not the emulator"));
        }
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` is an out-parameter; every rank passes the same id.
        unsafe { cudarc::nccl::result::comm_init_rank(&mut comm, world as i32, id, rank as i32) }
            .map_err(|e| {
            err(format!(
                "ncclCommInitRank (rank {rank} of {world}): {:?}",
                e.0
            ))
        })?;
        Ok(NcclComm { comm, rank, world })
    }

    /// A communicator of one rank, for checks on a machine with one GPU.
    pub fn single(stream: &Stream) -> Result<NcclComm> {
        probe_nccl()?;
        let id = cudarc::nccl::result::get_uniqueid()
            .map_err(|e| err(format!("ncclGetUniqueId: {:?}", e.0)))?;
        NcclComm::new(id, 0, 1, stream)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: created by ncclCommInitRank and destroyed once.
        let _ = unsafe { cudarc::nccl::result::comm_destroy(self.comm) };
    }
}

impl DeviceComm for NcclComm {
    fn world(&self) -> usize {
        self.world
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn all_reduce(&self, stream: &Stream, ptr: u64, n: usize) -> Result<()> {
        let (raw, _) = stream.raw().ok_or_else(|| err("NCCL needs a GPU stream"))?;
        // SAFETY: `ptr` holds `n` f32 on this rank's GPU; in place is allowed.
        unsafe {
            cudarc::nccl::result::all_reduce(
                ptr as *const std::ffi::c_void,
                ptr as *mut std::ffi::c_void,
                n,
                cudarc::nccl::sys::ncclDataType_t::ncclFloat32,
                cudarc::nccl::sys::ncclRedOp_t::ncclSum,
                self.comm,
                raw as cudarc::nccl::sys::cudaStream_t,
            )
        }
        .map(|_| ())
        .map_err(|e| err(format!("ncclAllReduce: {:?}", e.0)))
    }

    fn capturable(&self) -> bool {
        true
    }
}
