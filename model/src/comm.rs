//! Collective communication between the tensor-parallel ranks of a slice.
//!
//! Each transformer layer ends its attention and its MLP with a partial sum
//! per rank; [`AllReduce`] combines them. [`ThreadGroup`] implements it for
//! ranks that are threads of one process (shared memory); a GPU build would
//! put NCCL behind the same trait.

use std::sync::{Arc, Condvar, Mutex};

use crate::error::{ModelError, Result};

pub trait AllReduce: Send + Sync {
    fn world(&self) -> usize;
    fn rank(&self) -> usize;
    /// Replaces `buf` on every rank with the element-wise sum over ranks.
    /// Every rank gets bit-identical results.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
}

/// The trivial group of one rank.
pub struct Solo;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_sum_identically() {
        let groups = ThreadGroup::new(3);
        let handles: Vec<_> = groups
            .into_iter()
            .map(|g| {
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    for round in 0..50 {
                        let mut buf: Vec<f32> = (0..7)
                            .map(|i| (g.rank() * 100 + i + round) as f32 * 0.1)
                            .collect();
                        g.all_reduce_sum(&mut buf).expect("all ranks alive");
                        out.push(buf);
                    }
                    out
                })
            })
            .collect();
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect();
        assert_eq!(results[0], results[1]);
        assert_eq!(results[1], results[2]);
        let want: f32 = (0..3).map(|r| (r * 100 + 2 + 5) as f32 * 0.1).sum();
        assert!((results[0][5][2] - want).abs() < 1e-4);
    }

    #[test]
    fn a_departed_rank_releases_the_others() {
        let mut groups = ThreadGroup::new(2);
        let g1 = groups.pop().expect("two handles");
        let g0 = groups.pop().expect("two handles");
        let h = std::thread::spawn(move || g0.all_reduce_sum(&mut [1.0]));
        drop(g1);
        assert!(h.join().expect("thread").is_err());
    }
}
