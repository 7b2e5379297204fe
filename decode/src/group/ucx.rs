//! KV over UCX on the decode side: a worker whose address goes to every
//! stage of a UCX pipeline when its link comes up, the ranks' pools
//! registered with it once, and the landing table that lets only a live
//! attempt's stages write its blocks.

use super::*;
use tandem_kvtransfer::over_ucx::{Landing, RankMemory};
use tandem_kvtransfer::ucx::{Region, Ucx, Worker, WorkerOptions};
use tandem_wire::config::KvTransport;
use tandem_wire::messages::UcxPool;

pub(super) struct DecodeUcx {
    pub worker: Arc<Worker>,
    pub landing: Landing,
    /// Per rank, the pool as stages reach it for puts; empty when a pool is
    /// not in memory UCX allocated (stages then send active messages).
    pub pools: Vec<UcxPool>,
}

fn setup_err(e: impl std::fmt::Display) -> DecodeError {
    DecodeError::Setup(e.to_string())
}

/// UCX-allocated memory backing a rank's pool; freed when the pool drops.
struct PoolMemory {
    worker: Arc<Worker>,
    region: Region,
}

impl Drop for PoolMemory {
    fn drop(&mut self) {
        self.worker.unmap(&self.region);
    }
}

/// Moves rank `r`'s pool into memory UCX allocates, which over shared
/// memory is a segment stages on this host map and write with one copy.
/// `None` (the pool stays where it is) when UCX cannot allocate it or
/// `/dev/shm` has no room for it: a full tmpfs would fault the pool later.
fn move_pool(worker: &Arc<Worker>, group: &RankGroup, r: usize, len: usize) -> Option<UcxPool> {
    let room = tandem_kvtransfer::ucx::shm_free_bytes().unwrap_or(0);
    if room < len as u64 + (64 << 20) {
        tracing::info!(
            "rank {r}'s KV pool ({} MiB) stays in ordinary memory: /dev/shm has {} MiB free",
            len >> 20,
            room >> 20
        );
        return None;
    }
    let block_bytes = group.with_pool(r, |p| p.layout.block_bytes()).ok()?;
    let region = match worker.alloc(len) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("rank {r}'s KV pool stays in ordinary memory: {e}");
            return None;
        }
    };
    let base = region.base;
    let pool = UcxPool {
        base,
        bytes: region.len as u64,
        block_bytes: block_bytes as u64,
        rkey: region.rkey.clone().into(),
    };
    let keep = PoolMemory {
        worker: worker.clone(),
        region,
    };
    let moved = group.with_pool(r, move |p| {
        // SAFETY: the region is `len` bytes UCX allocated for this pool
        // alone; `keep` unmaps it only when the pool drops. Stages write
        // only blocks the decode group handed to a transfer, which the rank
        // does not read until the transfer is verified.
        unsafe { p.adopt(base as *mut u8, len, Box::new(keep)) }.map_err(|e| e.to_string())
    });
    // A pool that could not move frees the region with `keep`.
    match moved.map_err(|e| e.to_string()).and_then(|r| r) {
        Ok(()) => Some(pool),
        Err(e) => {
            tracing::warn!("rank {r}'s KV pool stays in ordinary memory: {e}");
            None
        }
    }
}

/// Starts UCX when a pipeline wants it: `ucx` without the library is an
/// error, `auto` falls back to QUIC with a warning.
pub(super) fn start(
    name: &str,
    group: &RankGroup,
    tp: usize,
    pipelines: &[Pipeline],
) -> Result<Option<DecodeUcx>> {
    let wanted: Vec<KvTransport> = pipelines
        .iter()
        .map(|p| p.kv_transport)
        .filter(|t| *t != KvTransport::Quic)
        .collect();
    if wanted.is_empty() {
        return Ok(None);
    }
    if group.with_pool(0, |p| p.on_device())? {
        // UCX here moves host memory; a GPU group's KV comes over QUIC.
        tracing::info!("{name}: KV pools are in GPU memory; KV comes over QUIC");
        return Ok(None);
    }
    let ucx = match Ucx::load(None) {
        Ok(u) => u,
        Err(e) if wanted.contains(&KvTransport::Ucx) => {
            return Err(DecodeError::Setup(format!(
            "kv_transport is \"ucx\" but {e}; install UCX (libucx0) or set kv_transport = \"quic\""
        )))
        }
        Err(e) => {
            tracing::warn!("{name}: {e}; KV comes over QUIC");
            return Ok(None);
        }
    };
    let worker = Arc::new(
        Worker::start(ucx.clone(), &WorkerOptions::default(), "ucx-decode").map_err(setup_err)?,
    );
    let mut ranks = Vec::new();
    let mut pools = Vec::new();
    for r in 0..tp {
        let len = group
            .with_pool(r, |pool| pool.raw_bytes().map(|b| b.1))?
            .ok_or_else(|| setup_err("a KV pool is not in host memory"))?;
        let moved = move_pool(&worker, group, r, len);
        let (ptr, len, layout, n_blocks) = group.with_pool(r, |pool| {
            let (p, l) = pool.raw_bytes().unwrap_or((std::ptr::null_mut(), 0));
            (p as usize, l, pool.layout, pool.n_blocks)
        })?;
        if let Some(p) = moved {
            pools.push(p);
        } else {
            // SAFETY: a rank's pool is allocated once and lives until the
            // rank group is dropped, after this worker (`Group::ucx` is
            // declared before `Group::group`). Stages write only blocks the
            // landing table allows, which the ranks do not read until the
            // transfer is verified.
            unsafe { worker.map(ptr as *mut u8, len) }.map_err(setup_err)?;
        }
        ranks.push(RankMemory {
            base: ptr,
            n_blocks,
            block_bytes: layout.block_bytes(),
            elem_bytes: layout.dtype.bytes(),
        });
    }
    // Puts only when every rank's pool can take them.
    if pools.len() != tp {
        pools.clear();
    }
    let landing = Landing::install(&worker, ranks).map_err(setup_err)?;
    tracing::info!(
        "{name}: KV over UCX {} ({}); pools {}",
        ucx.version(),
        ucx.path,
        if pools.is_empty() {
            "take active messages"
        } else {
            "in UCX memory, open to puts from stages on this host"
        }
    );
    Ok(Some(DecodeUcx {
        worker,
        landing,
        pools,
    }))
}

impl Group<'_> {
    /// A stage of a UCX pipeline came up: tell it where to send KV.
    pub(super) fn ucx_hello(&self, peer: &str) {
        let Some(u) = &self.ucx else { return };
        let wants = self
            .pipelines
            .iter()
            .any(|p| p.kv_transport != KvTransport::Quic && p.stages.iter().any(|s| s.0 == peer));
        if let (true, Some(l)) = (wants, self.links.get(peer)) {
            let _ = l.try_send(Message::UcxHello {
                address: u.worker.address().to_vec().into(),
                pools: u.pools.clone(),
            });
        }
    }

    /// Lets the attempt's stages write its blocks (before they are asked to).
    pub(super) fn fence_open(
        &mut self,
        id: RequestId,
        lease: Lease,
        pipeline: &str,
        blocks: &[BlockId],
    ) {
        if self.ucx.is_none() {
            return;
        }
        let stages = self
            .pipelines
            .iter()
            .find(|p| p.name == pipeline)
            .map_or(0, |p| p.stages.len());
        let mut plans = HashMap::new();
        for s in 0..stages as u32 {
            for r in 0..self.group.tp as u32 {
                if let Some(p) = self.plan(pipeline, s, r) {
                    plans.insert((s, r), p);
                }
            }
        }
        let allowed = vec![blocks.to_vec(); self.group.tp];
        if let Some(u) = &self.ucx {
            u.landing.open(id, lease, allowed, plans);
            // Stages on this host may put into the pools: an abandoned
            // attempt's blocks wait until they confirm they stopped.
            let puts = !u.pools.is_empty()
                && self
                    .pipelines
                    .iter()
                    .any(|p| p.name == pipeline && p.kv_transport != KvTransport::Quic);
            if puts {
                self.admission.fence(id, lease);
            }
        }
    }

    /// No more writes into the request's blocks from any attempt.
    pub(super) fn fence_close(&self, id: RequestId) {
        if let Some(u) = &self.ucx {
            u.landing.close(id);
        }
    }

    /// Blocks a stage wrote over UCX: checksum them from the pool.
    pub(super) fn on_kv_landed(
        &mut self,
        id: RequestId,
        lease: Lease,
        stage: u32,
        rank: u32,
        blocks: Vec<BlockId>,
        put: bool,
    ) {
        let Some(a) = self
            .reqs
            .get(&id)
            .and_then(|r| r.attempt.as_ref())
            .filter(|a| a.lease == lease)
        else {
            return;
        };
        // Active messages: the handler saw them land. Puts: the stage
        // flushed them before its notice, and only pools open to puts take
        // them.
        let landed = self.ucx.as_ref().map(|u| match put {
            false => u
                .landing
                .landed(id, lease, stage, rank, &blocks, Duration::from_secs(2)),
            true if u.pools.is_empty() => Err("puts into pools not open to them".to_string()),
            true => Ok(()),
        });
        if let Some(Err(why)) = landed {
            tracing::warn!(
                "{}: KV for request {} over UCX failed: {why}",
                self.name,
                id.0
            );
            return self.kv_lost(id, lease);
        }
        let pipeline = a.pipeline.clone();
        let Some(runs) = self.plan(&pipeline, stage, rank) else {
            return self.kv_lost(id, lease);
        };
        let n = blocks.len() as u64;
        // Read back what landed, in the order it was sent, for the checksum.
        let back: Vec<CopyRun> = runs
            .iter()
            .map(|r| CopyRun {
                src: r.dst,
                dst: r.dst,
                len: r.len,
            })
            .collect();
        let read = self.group.with_pool(rank as usize, move |pool| {
            blocks
                .iter()
                .map(|b| tandem_kvtransfer::gather(pool, *b, &back).map(|v| (*b, v.into())))
                .collect::<std::result::Result<Vec<_>, _>>()
        });
        let chunk = match read {
            Ok(Ok(blocks)) => KvChunk {
                id,
                lease,
                stage,
                rank,
                blocks,
            },
            _ => return self.kv_lost(id, lease),
        };
        let a = self
            .reqs
            .get_mut(&id)
            .and_then(|r| r.attempt.as_mut())
            .expect("checked above");
        a.over_ucx = true;
        if let Err(e) = a.incoming.accept(&chunk) {
            tracing::warn!("{}: refusing KV for request {}: {e}", self.name, id.0);
            return self.kv_lost(id, lease);
        }
        let c = &mut self.admission.counters;
        if put {
            c.blocks_ucx_direct += n;
        } else {
            c.blocks_ucx_messages += n;
        }
    }
}
