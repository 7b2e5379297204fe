//! Collective communication between the tensor-parallel ranks of a slice.
//!
//! Each transformer layer ends its attention and its MLP with a partial sum
//! per rank; [`AllReduce`] combines them. Expert parallelism sends each
//! token to the rank holding its expert and back with [`AllToAll`].
//! [`ThreadGroup`] implements both for ranks that are threads of one process
//! (shared memory). The GPU ranks have an NCCL all-reduce of their own
//! (`cuda::comm`); an NCCL all-to-all is not built yet.

use std::sync::{Arc, Condvar, Mutex};

use crate::error::{ModelError, Result};

pub trait AllReduce: Send + Sync {
    fn world(&self) -> usize;
    fn rank(&self) -> usize;
    /// Replaces `buf` on every rank with the element-wise sum over ranks.
    /// Every rank gets bit-identical results.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
}

pub trait AllToAll: Send + Sync {
    /// Sends `send[d]` to rank `d` (one buffer per rank, any lengths, its
    /// own included) and returns what every rank sent this one, by source.
    fn all_to_all(&self, send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>>;

    /// Leaves the group: every rank's pending and later collectives fail.
    /// A rank that fails where the others go on to a collective calls it,
    /// so that they get an error instead of waiting for it forever.
    fn abort(&self);
}

/// Everything a slice's ranks need from their group.
pub trait Collectives: AllReduce + AllToAll {}

impl<C: AllReduce + AllToAll> Collectives for C {}

/// Sums column pieces ([`crate::linear::ColumnPieces`]) over the group in
/// one fixed order: every rank's pieces, rank by rank, each rank's in order,
/// starting from the first piece itself. A whole model holding every piece
/// sums them in that same order, so each layout gets the same bits. Every
/// piece is `[t, rows]` of one length; a rank holds `pieces / world` of them.
pub fn sum_pieces(comm: &dyn Collectives, pieces: Vec<Vec<f32>>) -> Result<Vec<f32>> {
    let len = pieces.first().map_or(0, Vec::len);
    if len == 0 || pieces.iter().any(|p| p.len() != len) {
        return Err(ModelError::Worker(
            "column pieces of different lengths (or none) to sum".into(),
        ));
    }
    let all = if comm.world() == 1 {
        pieces
    } else {
        let flat = pieces.concat();
        let got = comm.all_to_all(vec![flat; comm.world()])?;
        if got
            .iter()
            .any(|g| g.is_empty() || !g.len().is_multiple_of(len))
        {
            return Err(ModelError::Worker(
                "a rank sent column pieces of another length".into(),
            ));
        }
        got.iter()
            .flat_map(|g| g.chunks_exact(len).map(<[f32]>::to_vec))
            .collect()
    };
    let mut all = all.into_iter();
    let mut out = all.next().expect("at least one piece");
    for p in all {
        for (o, v) in out.iter_mut().zip(&p) {
            *o += v;
        }
    }
    Ok(out)
}

/// The trivial group of one rank.
pub struct Solo;

impl AllToAll for Solo {
    fn all_to_all(&self, send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        check_sends(&send, 1)?;
        Ok(send)
    }

    fn abort(&self) {}
}

fn check_sends(send: &[Vec<f32>], world: usize) -> Result<()> {
    if send.len() != world {
        return Err(ModelError::Worker(format!(
            "an all-to-all over {world} ranks got {} buffers",
            send.len()
        )));
    }
    Ok(())
}

impl AllReduce for Solo {
    fn world(&self) -> usize {
        1
    }
    fn rank(&self) -> usize {
        0
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
}

struct BarrierState {
    arrived: usize,
    generation: u64,
    aborted: bool,
}

struct Shared {
    world: usize,
    slots: Vec<Mutex<Vec<f32>>>,
    /// Per source rank, the buffers it sends in an all-to-all, by destination.
    mail: Vec<Mutex<Vec<Vec<f32>>>>,
    state: Mutex<BarrierState>,
    cv: Condvar,
}

impl Shared {
    /// Waits until every rank arrives; fails once any rank has left the group.
    fn wait(&self) -> Result<()> {
        let mut st = self.state.lock().map_err(|_| aborted())?;
        if st.aborted {
            return Err(aborted());
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
            st = self.cv.wait(st).map_err(|_| aborted())?;
        }
        if st.generation == gen {
            return Err(aborted());
        }
        Ok(())
    }

    fn abort(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.aborted = true;
        }
        self.cv.notify_all();
    }
}

fn aborted() -> ModelError {
    ModelError::Worker("a tensor-parallel rank left its group".into())
}

/// One rank's handle on a group of ranks that are threads of one process.
/// Dropping a handle (a rank thread ending or panicking) releases every other
/// rank from its wait with an error instead of leaving it blocked.
pub struct ThreadGroup {
    shared: Arc<Shared>,
    rank: usize,
}

impl ThreadGroup {
    /// Handles for ranks `0..world`.
    pub fn new(world: usize) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            world,
            slots: (0..world).map(|_| Mutex::new(Vec::new())).collect(),
            mail: (0..world).map(|_| Mutex::new(Vec::new())).collect(),
            state: Mutex::new(BarrierState {
                arrived: 0,
                generation: 0,
                aborted: false,
            }),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| ThreadGroup {
                shared: shared.clone(),
                rank,
            })
            .collect()
    }
}

impl Drop for ThreadGroup {
    fn drop(&mut self) {
        self.shared.abort();
    }
}

impl AllReduce for ThreadGroup {
    fn world(&self) -> usize {
        self.shared.world
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        if self.shared.world == 1 {
            return Ok(());
        }
        {
            let mut slot = self.shared.slots[self.rank].lock().map_err(|_| aborted())?;
            slot.clear();
            slot.extend_from_slice(buf);
        }
        self.shared.wait()?;
        // Sum in rank order so every rank computes the same bits.
        buf.fill(0.0);
        for s in &self.shared.slots {
            let s = s.lock().map_err(|_| aborted())?;
            for (b, v) in buf.iter_mut().zip(s.iter()) {
                *b += v;
            }
        }
        // Nobody may overwrite a slot before every rank has read it.
        self.shared.wait()
    }
}

impl AllToAll for ThreadGroup {
    fn all_to_all(&self, send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        let world = self.shared.world;
        check_sends(&send, world)?;
        if world == 1 {
            return Ok(send);
        }
        *self.shared.mail[self.rank].lock().map_err(|_| aborted())? = send;
        self.shared.wait()?;
        // Each rank takes only its own buffer from every source's mail.
        let mut out = Vec::with_capacity(world);
        for m in &self.shared.mail {
            let mut m = m.lock().map_err(|_| aborted())?;
            out.push(std::mem::take(&mut m[self.rank]));
        }
        // Nobody may post new mail before every rank has taken its part.
        self.shared.wait()?;
        Ok(out)
    }

    fn abort(&self) {
        self.shared.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `rounds` rounds of `f(group, round)` on each of `world` rank
    /// threads; every rank's results, by rank.
    fn on_ranks<R: Send + 'static>(
        world: usize,
        rounds: usize,
        f: fn(&ThreadGroup, usize) -> R,
    ) -> Vec<Vec<R>> {
        let handles: Vec<_> = ThreadGroup::new(world)
            .into_iter()
            .map(|g| std::thread::spawn(move || (0..rounds).map(|r| f(&g, r)).collect()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    }

    #[test]
    fn all_to_all_delivers_each_buffer_to_its_rank() {
        // Rank r sends d + 1 + round % 2 values of 100 r + d to rank d.
        let results = on_ranks(3, 20, |g, round| {
            let send = (0..3)
                .map(|d| vec![(100 * g.rank() + d) as f32; d + 1 + round % 2])
                .collect();
            g.all_to_all(send).expect("all ranks alive")
        });
        for (me, rounds) in results.iter().enumerate() {
            for (round, got) in rounds.iter().enumerate() {
                for (src, buf) in got.iter().enumerate() {
                    assert_eq!(buf, &vec![(100 * src + me) as f32; me + 1 + round % 2]);
                }
            }
        }
        assert!(Solo.all_to_all(vec![vec![1.0], vec![2.0]]).is_err());
    }

    #[test]
    fn threads_sum_identically() {
        let results = on_ranks(3, 50, |g, round| {
            let mut buf: Vec<f32> = (0..7)
                .map(|i| (g.rank() * 100 + i + round) as f32 * 0.1)
                .collect();
            g.all_reduce_sum(&mut buf).expect("all ranks alive");
            buf
        });
        assert_eq!(results[0], results[1]);
        assert_eq!(results[1], results[2]);
        let want: f32 = (0..3).map(|r| (r * 100 + 2 + 5) as f32 * 0.1).sum();
        assert!((results[0][5][2] - want).abs() < 1e-4);
    }

    #[test]
    fn a_departed_rank_releases_the_others() {
        type Op = fn(&ThreadGroup) -> Result<()>;
        let ops: [Op; 2] = [
            |g| g.all_reduce_sum(&mut [1.0]),
            |g| g.all_to_all(vec![vec![1.0], vec![2.0]]).map(|_| ()),
        ];
        // A rank that aborts releases the others as one that leaves does.
        let mut groups = ThreadGroup::new(2);
        let g1 = groups.pop().expect("two handles");
        let g0 = groups.pop().expect("two handles");
        let h = std::thread::spawn(move || g0.all_reduce_sum(&mut [1.0]));
        g1.abort();
        assert!(h.join().expect("thread").is_err());
        assert!(
            g1.all_reduce_sum(&mut [1.0]).is_err(),
            "the group stays closed"
        );
        for op in ops {
            let mut groups = ThreadGroup::new(2);
            let g1 = groups.pop().expect("two handles");
            let g0 = groups.pop().expect("two handles");
            let h = std::thread::spawn(move || op(&g0));
            drop(g1);
            assert!(h.join().expect("thread").is_err());
        }
    }
}
