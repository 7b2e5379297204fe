//! KV over UCX on the decode side: a worker whose address goes to every
//! stage of a UCX pipeline when its link comes up, the ranks' pools
//! registered with it once, and the landing table that lets only a live
//! attempt's stages write its blocks.

use super::*;
use tandem_kvtransfer::over_ucx::{LandedStatus, Landing, LandingEvent, RankMemory};
use tandem_kvtransfer::ucx::{Region, Ucx, Worker, WorkerOptions};
use tandem_model::BlockId;
use tandem_wire::config::KvTransport;
use tandem_wire::config::Pipeline;
use tandem_wire::messages::UcxPool;
use tandem_wire::messages::{KvChunk, Lease};

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
    events: mpsc::Sender<LoopEvent>,
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
    // The landing table's events wake the decode loop: nothing there waits.
    let landing = Landing::install(&worker, ranks, move |e| {
        let _ = events.send(LoopEvent::Landing(e));
    })
    .map_err(setup_err)?;
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

/// A stage's notice that blocks were written over UCX.
pub(super) struct Notice {
    pub from: String,
    pub id: RequestId,
    pub lease: Lease,
    pub stage: u32,
    pub rank: u32,
    pub blocks: Vec<BlockId>,
    pub put: bool,
}

impl Group<'_> {
    /// A stage of a UCX pipeline came up: tell it where to send KV.
    pub(super) fn ucx_hello(&mut self, peer: &str) {
        let Some(u) = &self.ucx else { return };
        let wants = self
            .core
            .pipelines()
            .iter()
            .any(|p| p.ucx && p.stages.iter().any(|s| s.0 == peer));
        if wants {
            let msg = Message::UcxHello {
                address: u.worker.address().to_vec().into(),
                pools: u.pools.clone(),
            };
            self.send(peer, msg);
        }
    }

    /// A stage says blocks were written over UCX: once this side has them
    /// all (active messages: the handler saw them land; puts: the stage
    /// flushed them before its notice), read them back for the checksum.
    /// Blocks still arriving wait for the landing table's event.
    pub(super) fn on_landed(&mut self, n: Notice) -> Vec<Action> {
        let now = now_ms();
        let Some(runs) = self
            .core
            .landed_plan(&n.from, n.id, n.lease, n.stage, n.rank)
        else {
            return Vec::new();
        };
        if !n.put {
            let Some(u) = &self.ucx else {
                return self.core.kv_failed(n.id, n.lease, "no UCX here", now);
            };
            match u.landing.status(n.id, n.lease, n.stage, n.rank, &n.blocks) {
                LandedStatus::Landed => {}
                LandedStatus::Pending => {
                    let key = (n.id, n.lease);
                    let msg = Message::KvLanded {
                        id: n.id,
                        lease: n.lease,
                        stage: n.stage,
                        rank: n.rank,
                        blocks: n.blocks,
                        put: n.put,
                    };
                    self.held.entry(key).or_default().push_front((n.from, msg));
                    return Vec::new();
                }
                LandedStatus::Failed(why) => return self.core.kv_failed(n.id, n.lease, &why, now),
                LandedStatus::Closed => return Vec::new(),
            }
        }
        let blocks = n.blocks.clone();
        let read = self.group.with_pool(n.rank as usize, move |pool| {
            blocks
                .iter()
                .map(|b| tandem_kvtransfer::gather(pool, *b, &runs).map(|v| (*b, v.into())))
                .collect::<std::result::Result<Vec<_>, _>>()
        });
        match read {
            Ok(Ok(blocks)) => {
                let chunk = KvChunk {
                    id: n.id,
                    lease: n.lease,
                    stage: n.stage,
                    rank: n.rank,
                    blocks,
                };
                self.core.kv_landed(&n.from, chunk, n.put, now)
            }
            _ => self
                .core
                .kv_failed(n.id, n.lease, "cannot read the blocks back", now),
        }
    }

    /// The landing table moved: notices waiting on the attempt are looked
    /// at again; a closed attempt's last receive completed.
    pub(super) fn on_landing(&mut self, e: LandingEvent, now: u64) -> Vec<Action> {
        match e {
            LandingEvent::Progress { id, lease } => {
                // Take the held messages again, in order; the first notice
                // still waiting holds the rest back once more.
                let Some(q) = self.held.remove(&(id, lease)) else {
                    return Vec::new();
                };
                let mut out = Vec::new();
                let mut q = q;
                while let Some((from, msg)) = q.pop_front() {
                    out.extend(self.on_message(&from, msg, now));
                    if let Some(h) = self.held.get_mut(&(id, lease)) {
                        h.extend(q);
                        break;
                    }
                }
                out
            }
            LandingEvent::Drained { id, lease } => self.core.landing_drained(id, lease, now),
        }
    }
}
