//! Moving one request's KV from a prefill stage to the ranks of a decode
//! group, whatever carries the bytes.
//!
//! The sending stage keeps an [`Outgoing`] per request: for each target rank
//! the reshard plan and a running [`Checksum`]. After every chunk it gathers
//! the blocks that chunk completed into [`KvChunk`]s and hands them to a
//! [`Transport`]; after the last, one [`KvDone`] per rank carries the count
//! and checksum. The decode group keeps an [`Incoming`] per request and
//! attempt: it scatters each chunk into the rank's pool with the same plan,
//! checksums what arrived, and reports the transfer complete only when every
//! stage's notice for every rank is in and matches.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::mpsc;

use tandem_model::{BlockId, KvPool};
use tandem_wire::link::Link;
use tandem_wire::messages::{ByteBuf, KvChunk, KvDone, Lease, Message, RankTarget, RequestId};

use crate::{gather, reshard_plan, Checksum, CopyRun, KvTransferError, PoolDesc, Result};

/// Largest KV message on a link: big enough to stream well, small enough to
/// interleave with the link's other messages.
pub const MESSAGE_BYTES: usize = 4 << 20;

/// Carries KV chunks and completion notices from a stage to decode ranks.
/// Calls may block while the receiver catches up (backpressure).
pub trait Transport: Send {
    fn put(&self, chunk: KvChunk) -> Result<()>;
    /// Puts several chunks; a backend may keep them all in flight at once.
    fn put_all(&self, chunks: Vec<KvChunk>) -> Result<()> {
        chunks.into_iter().try_for_each(|c| self.put(c))
    }
    /// The largest chunk to gather for it (bytes of KV per rank).
    fn chunk_bytes(&self) -> usize {
        MESSAGE_BYTES
    }
    fn done(&self, done: KvDone) -> Result<()>;
    /// What the backend is, for logs and metrics.
    fn name(&self) -> &'static str;
}

/// KV as messages on the stage's QUIC link to the decode group, in order on
/// one stream, so a notice always follows the chunks it covers.
pub struct QuicTransport {
    pub link: Link,
}

impl Transport for QuicTransport {
    fn put(&self, chunk: KvChunk) -> Result<()> {
        self.link
            .blocking_send(Message::Kv(chunk))
            .map_err(|e| KvTransferError::Transport(e.to_string()))
    }
    fn done(&self, done: KvDone) -> Result<()> {
        self.link
            .blocking_send(Message::KvDone(done))
            .map_err(|e| KvTransferError::Transport(e.to_string()))
    }
    fn name(&self) -> &'static str {
        "quic"
    }
}

/// KV handed over inside one process (tests, and stages that share a process
/// with their decode group).
pub struct InProcess {
    pub tx: mpsc::Sender<Message>,
}

impl Transport for InProcess {
    fn put(&self, chunk: KvChunk) -> Result<()> {
        self.tx
            .send(Message::Kv(chunk))
            .map_err(|_| KvTransferError::Transport("the receiver is gone".into()))
    }
    fn done(&self, done: KvDone) -> Result<()> {
        self.tx
            .send(Message::KvDone(done))
            .map_err(|_| KvTransferError::Transport("the receiver is gone".into()))
    }
    fn name(&self) -> &'static str {
        "in-process"
    }
}

struct Target {
    rank: u32,
    blocks: Vec<BlockId>,
    runs: Vec<CopyRun>,
    sum: Checksum,
    sent: u32,
}

/// A stage's side of one request's transfer.
pub struct Outgoing {
    pub id: RequestId,
    pub lease: Lease,
    pub stage: u32,
    targets: Vec<Target>,
    /// Bytes put on the transport so far.
    pub bytes: u64,
}

/// The pool a decode rank holds: every layer, the target's heads.
pub fn rank_desc(n_layers: usize, t: &RankTarget, like: &PoolDesc) -> PoolDesc {
    PoolDesc::new(
        0..n_layers,
        t.heads.0 as usize..t.heads.1 as usize,
        like.layout.block_size,
        like.layout.head_dim,
        like.layout.dtype,
    )
}

impl Outgoing {
    /// `src` is the stage's pool; `n_layers` the model's layer count.
    pub fn new(
        id: RequestId,
        lease: Lease,
        stage: u32,
        src: &PoolDesc,
        n_layers: usize,
        targets: &[RankTarget],
    ) -> Result<Outgoing> {
        let mut out = Vec::new();
        for t in targets {
            if t.heads.0 >= t.heads.1 || t.heads.1 as usize > src.heads.end {
                return Err(KvTransferError::Mismatch(format!(
                    "rank {} asks for heads {}..{}, the model has {}",
                    t.rank, t.heads.0, t.heads.1, src.heads.end
                )));
            }
            let runs = reshard_plan(src, &rank_desc(n_layers, t, src))?;
            out.push(Target {
                rank: t.rank,
                blocks: t.blocks.clone(),
                runs,
                sum: Checksum::default(),
                sent: 0,
            });
        }
        Ok(Outgoing {
            id,
            lease,
            stage,
            targets: out,
            bytes: 0,
        })
    }

    /// Gathers the request's blocks `range` (indices into its block list;
    /// `local` are the stage's own blocks) for every rank, in chunks of about
    /// `max_bytes`, updating the checksums in the order they will be sent.
    pub fn gather(
        &mut self,
        pool: &KvPool,
        local: &[BlockId],
        range: Range<usize>,
        max_bytes: usize,
    ) -> Result<Vec<KvChunk>> {
        let mut chunks = Vec::new();
        for t in &mut self.targets {
            let mut cur: Vec<(BlockId, ByteBuf)> = Vec::new();
            let mut size = 0;
            for i in range.clone() {
                let (Some(&src), Some(&dst)) = (local.get(i), t.blocks.get(i)) else {
                    return Err(KvTransferError::Mismatch(format!(
                        "block {i} of the request is missing on the stage or on rank {}",
                        t.rank
                    )));
                };
                let bytes = gather(pool, src, &t.runs)?;
                t.sum.add(dst, &bytes);
                t.sent += 1;
                size += bytes.len();
                self.bytes += bytes.len() as u64;
                cur.push((dst, ByteBuf::from(bytes)));
                if size >= max_bytes {
                    chunks.push(self::chunk(
                        self.id, self.lease, self.stage, t.rank, &mut cur,
                    ));
                    size = 0;
                }
            }
            if !cur.is_empty() {
                chunks.push(self::chunk(
                    self.id, self.lease, self.stage, t.rank, &mut cur,
                ));
            }
        }
        Ok(chunks)
    }

    /// Per rank, where a gathered block's bytes go in the rank's block, in
    /// bytes: (offset in the gathered block, offset in the rank's block,
    /// length), runs that touch on both sides merged. A transport that
    /// writes the ranks' pools itself (puts) places them so.
    pub fn placements(&self, elem_bytes: usize) -> HashMap<u32, Vec<(usize, usize, usize)>> {
        self.targets
            .iter()
            .map(|t| {
                let mut out: Vec<(usize, usize, usize)> = Vec::new();
                let mut at = 0;
                for r in &t.runs {
                    let (dst, len) = (r.dst * elem_bytes, r.len * elem_bytes);
                    match out.last_mut() {
                        Some((s, d, l)) if *s + *l == at && *d + *l == dst => *l += len,
                        _ => out.push((at, dst, len)),
                    }
                    at += len;
                }
                (t.rank, out)
            })
            .collect()
    }

    /// The completion notices, one per rank.
    pub fn finish(&self) -> Vec<KvDone> {
        self.targets
            .iter()
            .map(|t| KvDone {
                id: self.id,
                lease: self.lease,
                stage: self.stage,
                rank: t.rank,
                blocks: t.sent,
                checksum: t.sum.value(),
            })
            .collect()
    }
}

fn chunk(
    id: RequestId,
    lease: Lease,
    stage: u32,
    rank: u32,
    cur: &mut Vec<(BlockId, ByteBuf)>,
) -> KvChunk {
    KvChunk {
        id,
        lease,
        stage,
        rank,
        blocks: std::mem::take(cur),
    }
}

#[derive(Default)]
struct Received {
    sum: Checksum,
    blocks: u32,
    done: Option<KvDone>,
}

/// A decode group's side of one attempt at a request's KV.
pub struct Incoming {
    pub lease: Lease,
    stages: u32,
    ranks: u32,
    /// The blocks each rank may receive: anything else is refused.
    allowed: Vec<Vec<BlockId>>,
    got: HashMap<(u32, u32), Received>,
    pub bytes: u64,
}

/// How a transfer ended, once every notice is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Verified,
    /// Which (stage, rank) pairs did not match what was sent.
    Mismatch(Vec<(u32, u32)>),
}

impl Incoming {
    /// `allowed[r]` are rank `r`'s blocks for this request.
    pub fn new(lease: Lease, stages: u32, allowed: Vec<Vec<BlockId>>) -> Incoming {
        Incoming {
            lease,
            stages,
            ranks: allowed.len() as u32,
            allowed,
            got: HashMap::new(),
            bytes: 0,
        }
    }

    /// Checks a chunk before it is written: the stage and rank exist, the
    /// blocks belong to the request, and no notice for them came before.
    pub fn accept(&mut self, c: &KvChunk) -> Result<()> {
        if c.stage >= self.stages || c.rank >= self.ranks {
            return Err(KvTransferError::Mismatch(format!(
                "stage {} rank {} is outside {} stages x {} ranks",
                c.stage, c.rank, self.stages, self.ranks
            )));
        }
        let allowed = &self.allowed[c.rank as usize];
        if let Some((b, _)) = c.blocks.iter().find(|(b, _)| !allowed.contains(b)) {
            return Err(KvTransferError::Mismatch(format!(
                "block {} is not one of the request's blocks on rank {}",
                b.0, c.rank
            )));
        }
        let r = self.got.entry((c.stage, c.rank)).or_default();
        if r.done.is_some() {
            return Err(KvTransferError::Mismatch(format!(
                "KV from stage {} for rank {} after its completion notice",
                c.stage, c.rank
            )));
        }
        for (b, bytes) in &c.blocks {
            r.sum.add(*b, bytes);
            r.blocks += 1;
            self.bytes += bytes.len() as u64;
        }
        Ok(())
    }

    /// Records a notice; once all are in, returns the verdict.
    pub fn done(&mut self, d: KvDone) -> Option<Verdict> {
        if d.stage >= self.stages || d.rank >= self.ranks {
            return Some(Verdict::Mismatch(vec![(d.stage, d.rank)]));
        }
        self.got.entry((d.stage, d.rank)).or_default().done = Some(d);
        self.verdict()
    }

    fn verdict(&self) -> Option<Verdict> {
        let mut bad = Vec::new();
        for s in 0..self.stages {
            for r in 0..self.ranks {
                let got = self.got.get(&(s, r))?;
                let done = got.done.as_ref()?;
                if done.blocks != got.blocks || done.checksum != got.sum.value() {
                    bad.push((s, r));
                }
            }
        }
        Some(if bad.is_empty() {
            Verdict::Verified
        } else {
            Verdict::Mismatch(bad)
        })
    }
}
