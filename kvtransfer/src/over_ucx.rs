//! KV over UCX: the stage's [`UcxTransport`] and the decode group's
//! [`Landing`].
//!
//! Decode ranks' pools live in memory UCX allocated where it can (over
//! shared memory, a segment other processes on the host map). A stage into
//! which UCX maps every rank's pool (`ucp_rkey_ptr`, [`PutTarget::reach`])
//! writes each block straight into its place there itself, with streaming
//! stores ([`crate::stream_copy`]), then fences: one copy, no UCX call on
//! the path. Such a write cannot be refused, so decode keeps an abandoned
//! attempt's blocks out of use until every stage confirms it stopped
//! ([`Message::KvStopped`]); a stage writes only from its main loop, which
//! is also where it answers.
//!
//! Elsewhere (TCP, RDMA) a stage sends each block as one active message in
//! rendezvous: a small header (request, lease, stage, rank, the block) and
//! the block's bytes. The decode side's handler checks that header against
//! the attempts it is waiting for (the lease fences off every abandoned
//! attempt) and names where the bytes go: the rank's registered pool, at
//! the block's runs of the reshard plan. UCX then moves them there without
//! a bounce buffer on the receiver. The handler also takes several blocks
//! in one message.
//!
//! Either way, once a rank's blocks of a step are in, the stage sends a
//! [`Message::KvLanded`] notice for them on its QUIC link, followed, as
//! with QUIC, by the completion notice with the checksum, which the decode
//! group checks against what it reads back from its pool.
//!
//! By measurement (`tandem bench kv`, paired rounds against `ucx_perftest`):
//! over shared memory, writing the mapped pool with streaming stores beats
//! `ucx_perftest`'s put, UCX's own put from each block reaches about 0.8x
//! of it, and active messages half or less; over TCP, UCX emulates puts
//! about 4x slower than active messages. One message per block, because a
//! chunk's blocks sent as one message (11 MiB) were no faster from a buffer
//! already holding them and 30-75% slower once the stage copies them into
//! one; and gathering them by UCX from each block's own buffer (an iov) is
//! about 3x slower over TCP.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tandem_model::BlockId;
use tandem_wire::link::Link;
use tandem_wire::messages::{KvChunk, KvDone, Lease, Message, RequestId, UcxPool};

use crate::ucx::{EpId, Placement, RkeyId, Worker};
use crate::{CopyRun, KvTransferError, Result, Transport};

/// The active-message id KV blocks travel under.
pub const KV_AM: u16 = 0x4b56;

/// How long one chunk's sends may take before the transfer is given up
/// (sooner when the QUIC link to the receiver closes).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// A stage gathers up to this much of a chunk's KV for a rank at once: its
/// blocks go out together and one notice covers them.
pub const MAX_MESSAGE: usize = 64 << 20;

/// What travels with each message: the bytes of `blocks`, in that order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvHeader {
    pub id: RequestId,
    pub lease: Lease,
    pub stage: u32,
    pub rank: u32,
    pub blocks: Vec<BlockId>,
}

/// Merges runs that touch into one: (address, length) in order.
fn coalesce(runs: impl Iterator<Item = (usize, usize)>) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (a, l) in runs {
        match out.last_mut() {
            Some((pa, pl)) if *pa + *pl == a => *pl += l,
            _ => out.push((a, l)),
        }
    }
    out
}

/// A decode group's pools as a stage on the same host writes them: per
/// rank, where the pool is mapped into this process and its geometry.
pub struct PutTarget {
    ranks: Vec<PutRank>,
    /// The unpacked remote keys, which keep the mappings: released (and the
    /// pools unmapped from this process) when the target is dropped, so a
    /// stage that reconnects to a group maps its pools once, not once more
    /// per link-up.
    rkeys: Vec<RkeyId>,
    worker: Arc<Worker>,
}

impl Drop for PutTarget {
    fn drop(&mut self) {
        for k in self.rkeys.drain(..) {
            self.worker.release(k);
        }
    }
}

struct PutRank {
    /// The pool's first byte in this process.
    local: usize,
    bytes: u64,
    block_bytes: u64,
}

impl PutTarget {
    /// The group's `pools` as reached over `ep`, when every one of them is
    /// mapped into this process whole (the same host, memory UCX allocated
    /// in a shared segment): a block is then written with one copy, by the
    /// stage. `None` otherwise, and the stage sends active messages.
    pub fn reach(
        worker: &Arc<Worker>,
        ep: EpId,
        pools: &[UcxPool],
    ) -> crate::ucx::Result<Option<PutTarget>> {
        if pools.is_empty() {
            return Ok(None);
        }
        // Built as it goes, so on every early return its drop releases the
        // keys unpacked so far.
        let mut target = PutTarget {
            ranks: Vec::with_capacity(pools.len()),
            rkeys: Vec::with_capacity(pools.len()),
            worker: worker.clone(),
        };
        for p in pools {
            // Every number here is the peer's: nothing may wrap.
            let Some(end) = p.base.checked_add(p.bytes.saturating_sub(1)) else {
                return Ok(None);
            };
            if p.block_bytes == 0 || p.bytes == 0 || usize::try_from(p.bytes).is_err() {
                return Ok(None);
            }
            let rkey = worker.unpack(ep, &p.rkey)?;
            target.rkeys.push(rkey);
            let (Some(local), Some(last)) = (
                worker.local_address(rkey, p.base),
                worker.local_address(rkey, end),
            ) else {
                return Ok(None);
            };
            if local.checked_add(p.bytes as usize - 1) != Some(last) {
                return Ok(None);
            }
            target.ranks.push(PutRank {
                local,
                bytes: p.bytes,
                block_bytes: p.block_bytes,
            });
        }
        Ok(Some(target))
    }

    /// Writes one gathered block of `rank` into its place: `runs` as
    /// [`crate::Outgoing::placements`] gives them. Call
    /// [`crate::stream_copy::fence`] before announcing it.
    pub fn write(
        &self,
        rank: u32,
        block: BlockId,
        bytes: &[u8],
        runs: &[(usize, usize, usize)],
    ) -> Result<()> {
        let Some(r) = self.ranks.get(rank as usize) else {
            return Err(transport_err(format!("rank {rank} has no pool to write")));
        };
        // The pool's geometry came from the peer: every offset is checked,
        // none may wrap.
        let start = u64::from(block.0).checked_mul(r.block_bytes);
        let fits = start
            .and_then(|s| s.checked_add(r.block_bytes))
            .is_some_and(|end| end <= r.bytes)
            && runs.iter().try_fold(0usize, |a, x| a.checked_add(x.2)) == Some(bytes.len())
            && runs.iter().all(|&(s, d, l)| {
                s.checked_add(l).is_some_and(|e| e <= bytes.len())
                    && d.checked_add(l).is_some_and(|e| e as u64 <= r.block_bytes)
            });
        let Some(start) = start.filter(|_| fits) else {
            return Err(transport_err(format!(
                "block {} ({} bytes) does not fit rank {rank}'s pool",
                block.0,
                bytes.len()
            )));
        };
        for &(s, d, l) in runs {
            let dst = r.local + start as usize + d;
            // SAFETY: `dst..dst + l` lies inside the rank's pool (checked
            // above), which `reach` found mapped into this process whole and
            // which stays mapped while the worker holds the remote key; it is
            // another process's memory, aliased by nothing in this one. The
            // decode group handed this block to the transfer and does not
            // read it until the transfer is verified.
            unsafe { crate::stream_copy::copy(dst as *mut u8, &bytes[s..s + l]) };
        }
        Ok(())
    }
}

/// Where a rank's gathered block goes in its block:
/// [`crate::Outgoing::placements`].
pub type Placements = HashMap<u32, Vec<(usize, usize, usize)>>;

/// A stage's transport to one decode group over UCX.
pub struct UcxTransport {
    pub worker: Arc<Worker>,
    pub ep: EpId,
    /// The QUIC link to the same group, for the notices.
    pub link: Link,
    /// Writes into the group's mapped pools, placed so; active messages
    /// when `None`.
    pub puts: Option<(Arc<PutTarget>, Placements)>,
}

fn transport_err(e: impl std::fmt::Display) -> KvTransferError {
    KvTransferError::Transport(e.to_string())
}

impl UcxTransport {
    /// Waits for a send, giving up after [`SEND_TIMEOUT`] or as soon as the
    /// QUIC link to the receiver closes: endpoints have no peer-failure
    /// handling (see [`crate::ucx::WorkerOptions::peer_failure`]), so a
    /// receiver that died never completes one.
    fn wait(&self, mut p: crate::ucx::Pending) -> Result<()> {
        let deadline = Instant::now() + SEND_TIMEOUT;
        loop {
            if let Some(r) = p.poll_for(Duration::from_millis(100)) {
                return r.map_err(transport_err);
            }
            if self.link.is_closed() {
                return Err(transport_err("the link to the receiver closed"));
            }
            if Instant::now() >= deadline {
                return Err(transport_err(format!(
                    "a send did not complete within {SEND_TIMEOUT:?}"
                )));
            }
        }
    }

    /// Each block written straight into its place in the rank's pool, by
    /// this thread, then a store fence and the notices. Nothing is left in
    /// flight when this returns, whatever it returns.
    fn put_blocks(
        &self,
        target: &PutTarget,
        place: &Placements,
        chunks: Vec<KvChunk>,
    ) -> Result<()> {
        if self.link.is_closed() {
            return Err(transport_err("the link to the receiver closed"));
        }
        let mut notices = Vec::with_capacity(chunks.len());
        let mut written = Ok(());
        for chunk in chunks {
            let Some(runs) = place.get(&chunk.rank) else {
                written = Err(transport_err(format!("no plan for rank {}", chunk.rank)));
                break;
            };
            let mut ids = Vec::with_capacity(chunk.blocks.len());
            for (block, bytes) in &chunk.blocks {
                written = target.write(chunk.rank, *block, bytes, runs);
                if written.is_err() {
                    break;
                }
                ids.push(*block);
            }
            if written.is_err() {
                break;
            }
            notices.push(Message::KvLanded {
                id: chunk.id,
                lease: chunk.lease,
                stage: chunk.stage,
                rank: chunk.rank,
                blocks: ids,
                put: true,
            });
        }
        crate::stream_copy::fence();
        written?;
        for n in notices {
            self.link.blocking_send(n).map_err(transport_err)?;
        }
        Ok(())
    }
}

impl Transport for UcxTransport {
    fn put(&self, chunk: KvChunk) -> Result<()> {
        self.put_all(vec![chunk])
    }

    fn put_all(&self, chunks: Vec<KvChunk>) -> Result<()> {
        if let Some((target, place)) = &self.puts {
            return self.put_blocks(target, place, chunks);
        }
        let mut sent = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let mut pending = Vec::with_capacity(chunk.blocks.len());
            let mut ids = Vec::with_capacity(chunk.blocks.len());
            for (block, bytes) in chunk.blocks {
                let header = KvHeader {
                    id: chunk.id,
                    lease: chunk.lease,
                    stage: chunk.stage,
                    rank: chunk.rank,
                    blocks: vec![block],
                };
                let header = tandem_wire::codec::encode(&header).map_err(transport_err)?;
                let data = Arc::new(bytes.into_vec());
                let n = data.len();
                pending.push(
                    self.worker
                        .am_send(self.ep, KV_AM, header, data, 0..n, true),
                );
                ids.push(block);
            }
            sent.push((chunk.id, chunk.lease, chunk.stage, chunk.rank, ids, pending));
        }
        // Rendezvous completion: the receiver holds every byte where its
        // handler put them (or refused them).
        for (id, lease, stage, rank, blocks, pending) in sent {
            for p in pending {
                self.wait(p)?;
            }
            self.link
                .blocking_send(Message::KvLanded {
                    id,
                    lease,
                    stage,
                    rank,
                    blocks,
                    put: false,
                })
                .map_err(transport_err)?;
        }
        Ok(())
    }

    fn chunk_bytes(&self) -> usize {
        MAX_MESSAGE
    }

    fn done(&self, done: KvDone) -> Result<()> {
        self.link
            .blocking_send(Message::KvDone(done))
            .map_err(transport_err)
    }

    fn name(&self) -> &'static str {
        "ucx"
    }
}

/// One rank's pool as the handler writes it.
#[derive(Debug, Clone, Copy)]
pub struct RankMemory {
    pub base: usize,
    pub n_blocks: usize,
    pub block_bytes: usize,
    pub elem_bytes: usize,
}

/// An attempt whose blocks may be written.
struct Fenced {
    lease: Lease,
    /// Per rank, the request's blocks (a set: each message's blocks are
    /// checked against it, on the worker thread).
    allowed: Vec<std::collections::HashSet<BlockId>>,
    /// Per (stage, rank), the destination runs of a block.
    plans: HashMap<(u32, u32), Vec<CopyRun>>,
    /// Messages being received into its blocks right now.
    inflight: usize,
    /// (stage, rank, block) whose bytes are all in place.
    landed: std::collections::HashSet<(u32, u32, BlockId)>,
    failed: Option<String>,
}

#[derive(Default)]
struct Table {
    open: HashMap<RequestId, Fenced>,
    /// Closed attempts with receives still in flight into their blocks:
    /// the blocks stay the attempt's until the count reaches zero.
    closed: HashMap<(RequestId, Lease), usize>,
}

/// What the decode loop hears from the landing table, from the worker
/// thread: a receive for an open attempt completed (a waiting notice may
/// now be satisfied), or a closed attempt's last receive completed (its
/// blocks are no longer written by anyone on this side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandingEvent {
    Progress { id: RequestId, lease: Lease },
    Drained { id: RequestId, lease: Lease },
}

/// Where blocks a stage reported stand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LandedStatus {
    Landed,
    /// Some are still being received (a [`LandingEvent::Progress`] follows).
    Pending,
    Failed(String),
    /// The attempt is not open (abandoned or finished).
    Closed,
}

type Wake = Arc<dyn Fn(LandingEvent) + Send + Sync>;

/// The decode group's side: which attempts may write where. Nothing here
/// waits: a notice whose blocks are still arriving is answered
/// [`LandedStatus::Pending`] and the caller hears a [`LandingEvent`] when
/// that changes.
#[derive(Clone)]
pub struct Landing {
    table: Arc<Mutex<Table>>,
    ranks: Arc<Vec<RankMemory>>,
    wake: Wake,
}

impl Landing {
    /// Installs the handler on `worker` for pools laid out as `ranks`;
    /// `wake` is called (on the worker's thread) as receives complete.
    pub fn install(
        worker: &Worker,
        ranks: Vec<RankMemory>,
        wake: impl Fn(LandingEvent) + Send + Sync + 'static,
    ) -> crate::ucx::Result<Landing> {
        let landing = Landing::detached(ranks, wake);
        let l = landing.clone();
        worker.on_am(KV_AM, Box::new(move |h, len| l.place(h, len)))?;
        Ok(landing)
    }

    /// The table alone, not installed on a worker (what [`Landing::place`]
    /// decides can then be checked without UCX: the fuzz target).
    pub fn detached(
        ranks: Vec<RankMemory>,
        wake: impl Fn(LandingEvent) + Send + Sync + 'static,
    ) -> Landing {
        Landing {
            table: Arc::new(Mutex::new(Table::default())),
            ranks: Arc::new(ranks),
            wake: Arc::new(wake),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The data callback: checks the header against the open attempts
    /// before anything is allocated or written. Every byte of `header` and
    /// `len` is the peer's.
    pub fn place(&self, header: &[u8], len: usize) -> Placement {
        let Ok(h) = tandem_wire::codec::decode::<KvHeader>(header) else {
            return Placement::Drop;
        };
        let mut t = self.lock();
        let Some(f) = t.open.get_mut(&h.id).filter(|f| f.lease == h.lease) else {
            // An abandoned attempt: its blocks may be someone else's now.
            return Placement::Drop;
        };
        let (Some(mem), Some(allowed), Some(plan)) = (
            self.ranks.get(h.rank as usize),
            f.allowed.get(h.rank as usize),
            f.plans.get(&(h.stage, h.rank)),
        ) else {
            f.failed = Some(format!(
                "stage {} rank {} is not part of the transfer",
                h.stage, h.rank
            ));
            return Placement::Drop;
        };
        let blocks = h.blocks;
        let per_block: usize = plan.iter().map(|r| r.len * mem.elem_bytes).sum();
        // Each block once: the payload is laid out block after block.
        let mut once = blocks.clone();
        once.sort_unstable();
        once.dedup();
        let fits = once.len() == blocks.len()
            && blocks
                .iter()
                .all(|b| allowed.contains(b) && (b.0 as usize) < mem.n_blocks);
        if blocks.is_empty() || !fits || per_block.checked_mul(blocks.len()) != Some(len) {
            f.failed = Some(format!(
                "blocks {:?} ({len} bytes) are not ones the request expects on rank {}",
                blocks.iter().map(|b| b.0).collect::<Vec<_>>(),
                h.rank
            ));
            return Placement::Drop;
        }
        let runs = coalesce(blocks.iter().flat_map(|b| {
            let start = mem.base + b.0 as usize * mem.block_bytes;
            plan.iter()
                .map(move |r| (start + r.dst * mem.elem_bytes, r.len * mem.elem_bytes))
        }));
        f.inflight += 1;
        let me = self.clone();
        let (id, lease) = (h.id, h.lease);
        Placement::Into {
            runs,
            done: Box::new(move |r| me.completed(id, lease, h.stage, h.rank, &blocks, r)),
        }
    }

    /// The completion of a receive: counts only for the attempt it was
    /// accepted under, open or closed.
    fn completed(
        &self,
        id: RequestId,
        lease: Lease,
        stage: u32,
        rank: u32,
        blocks: &[BlockId],
        r: crate::ucx::Result<()>,
    ) {
        let event = {
            let mut t = self.lock();
            match t.open.get_mut(&id).filter(|f| f.lease == lease) {
                Some(f) => {
                    f.inflight = f.inflight.saturating_sub(1);
                    match r {
                        Ok(()) => f.landed.extend(blocks.iter().map(|b| (stage, rank, *b))),
                        Err(e) => f.failed = Some(e.to_string()),
                    }
                    Some(LandingEvent::Progress { id, lease })
                }
                None => match t.closed.get_mut(&(id, lease)) {
                    Some(n) if *n > 1 => {
                        *n -= 1;
                        None
                    }
                    Some(_) => {
                        t.closed.remove(&(id, lease));
                        Some(LandingEvent::Drained { id, lease })
                    }
                    None => None,
                },
            }
        };
        if let Some(e) = event {
            (self.wake)(e);
        }
    }

    /// Lets the attempt under `lease` write `allowed[rank]` with `plans`.
    /// Any earlier attempt of the request must have been closed.
    pub fn open(
        &self,
        id: RequestId,
        lease: Lease,
        allowed: Vec<Vec<BlockId>>,
        plans: HashMap<(u32, u32), Vec<CopyRun>>,
    ) {
        let mut t = self.lock();
        if let Some(old) = t.open.remove(&id) {
            if old.inflight > 0 {
                t.closed.insert((id, old.lease), old.inflight);
            }
        }
        t.open.insert(
            id,
            Fenced {
                lease,
                allowed: allowed
                    .into_iter()
                    .map(|r| r.into_iter().collect())
                    .collect(),
                plans,
                inflight: 0,
                landed: Default::default(),
                failed: None,
            },
        );
    }

    /// Fences the attempt off: no new message lands in its blocks. Returns
    /// whether nothing is being received into them any more; else a
    /// [`LandingEvent::Drained`] follows once the last receive completes.
    pub fn close(&self, id: RequestId, lease: Lease) -> bool {
        let mut t = self.lock();
        match t.open.get(&id) {
            Some(f) if f.lease == lease => {
                let f = t.open.remove(&id).expect("present");
                if f.inflight > 0 {
                    t.closed.insert((id, lease), f.inflight);
                    return false;
                }
                true
            }
            _ => !t.closed.contains_key(&(id, lease)),
        }
    }

    /// Whether every one of `blocks` from (stage, rank) is in this side's
    /// pool. The stage's notice follows its own completions, which can run
    /// ahead of the receiver's by a few microseconds: then `Pending`.
    pub fn status(
        &self,
        id: RequestId,
        lease: Lease,
        stage: u32,
        rank: u32,
        blocks: &[BlockId],
    ) -> LandedStatus {
        let t = self.lock();
        let Some(f) = t.open.get(&id).filter(|f| f.lease == lease) else {
            return LandedStatus::Closed;
        };
        if let Some(why) = &f.failed {
            return LandedStatus::Failed(why.clone());
        }
        if blocks.iter().all(|b| f.landed.contains(&(stage, rank, *b))) {
            LandedStatus::Landed
        } else {
            LandedStatus::Pending
        }
    }

    /// Blocks of closed attempts still being received into (for `/metrics`).
    pub fn draining(&self) -> usize {
        self.lock().closed.len()
    }
}

#[cfg(test)]
mod tests;
