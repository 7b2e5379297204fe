use proptest::prelude::*;

use super::*;

/// A prompt of `n` tokens no other prompt in the test shares.
fn toks(n: usize) -> Vec<u32> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let base = NEXT.fetch_add(n as u32, Ordering::Relaxed);
    (base..base + n as u32).collect()
}

fn limits() -> Limits {
    Limits {
        max_batch: 2,
        max_queue: 2,
        block_size: 4,
        max_attempts: 3,
        kv_timeout: 100,
    }
}

fn prefill_of(actions: &[Action]) -> Vec<(RequestId, Lease, Vec<BlockId>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Prefill {
                id, lease, blocks, ..
            } => Some((*id, *lease, blocks.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn requests_queue_run_and_give_their_blocks_back() {
    let mut a = Admission::new(limits(), 16);
    let p1 = prefill_of(&a.submit(RequestId(1), &toks(7), 0));
    assert_eq!(p1.len(), 1);
    assert_eq!(p1[0].2.len(), 2, "7 prompt tokens + 1 in blocks of 4");
    let p2 = prefill_of(&a.submit(RequestId(2), &toks(3), 0));
    assert_eq!(p2.len(), 1);
    // The batch is full: the next two wait, the one after is refused.
    assert!(a.submit(RequestId(3), &toks(3), 0).is_empty());
    assert!(a.submit(RequestId(4), &toks(3), 0).is_empty());
    assert_eq!(
        a.submit(RequestId(5), &toks(3), 0),
        vec![Action::Reject {
            id: RequestId(5),
            why: Rejection::Overloaded
        }]
    );
    let start = a.kv_complete(RequestId(1), p1[0].1, true, 1);
    assert_eq!(
        start,
        vec![Action::Start {
            id: RequestId(1),
            blocks: p1[0].2.clone()
        }]
    );
    assert!(a.grow(RequestId(1)).is_some());
    // Finishing 1 admits 3.
    let next = prefill_of(&a.release(RequestId(1), 2));
    assert_eq!(
        next.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![RequestId(3)]
    );
    // Cancelling a queued request just drops it.
    assert!(a.release(RequestId(4), 2).is_empty());
    a.release(RequestId(2), 3);
    a.release(RequestId(3), 3);
    assert_eq!(a.used_blocks(), 0);
    assert_eq!(a.queued(), 0);
}

#[test]
fn a_failed_transfer_retries_under_a_new_lease_and_old_completions_are_ignored() {
    let mut a = Admission::new(limits(), 16);
    let first = prefill_of(&a.submit(RequestId(1), &toks(5), 0)).remove(0);
    let retry = prefill_of(&a.kv_complete(RequestId(1), first.1, false, 1)).remove(0);
    assert_ne!(retry.1, first.1, "a new lease");
    assert_eq!(a.counters.checksum_failures, 1);
    // The first attempt's late completion must not start anything.
    assert!(a.kv_complete(RequestId(1), first.1, true, 2).is_empty());
    assert_eq!(a.counters.stale_completions, 1);
    assert!(matches!(
        a.kv_complete(RequestId(1), retry.1, true, 3)[..],
        [Action::Start { .. }]
    ));
}

#[test]
fn deadlines_retry_and_attempts_run_out() {
    let mut a = Admission::new(limits(), 16);
    let mut lease = prefill_of(&a.submit(RequestId(1), &toks(5), 0)).remove(0).1;
    let mut now = 0;
    for attempt in 1..3 {
        now += 100;
        let p = prefill_of(&a.tick(now));
        assert_eq!(p.len(), 1, "attempt {attempt} timed out and was retried");
        assert_ne!(p[0].1, lease);
        lease = p[0].1;
    }
    now += 100;
    assert_eq!(
        a.tick(now),
        vec![
            Action::Abandon {
                id: RequestId(1),
                lease
            },
            Action::Reject {
                id: RequestId(1),
                why: Rejection::KvFailed { attempts: 3 }
            }
        ]
    );
    assert_eq!(a.used_blocks(), 0);
    // A pipeline lost mid-transfer retries too.
    let l = prefill_of(&a.submit(RequestId(2), &toks(5), now))
        .remove(0)
        .1;
    assert_eq!(prefill_of(&a.kv_lost(RequestId(2), l, now)).len(), 1);
}

#[test]
fn a_prompt_larger_than_the_pool_is_refused_at_once() {
    let mut a = Admission::new(limits(), 4);
    assert_eq!(
        a.submit(RequestId(1), &toks(100), 0),
        vec![Action::Reject {
            id: RequestId(1),
            why: Rejection::TooLong {
                needed: 26,
                pool: 4
            }
        }]
    );
}

#[derive(Debug, Clone)]
enum Ev {
    Submit(u8, u8),
    Complete(u8, bool),
    Lost(u8),
    Grow(u8),
    Release(u8),
    Tick(u8),
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        (0u8..8, 0u8..40).prop_map(|(i, p)| Ev::Submit(i, p)),
        (0u8..8, any::<bool>()).prop_map(|(i, v)| Ev::Complete(i, v)),
        (0u8..8).prop_map(Ev::Lost),
        (0u8..8).prop_map(Ev::Grow),
        (0u8..8).prop_map(Ev::Release),
        (0u8..200).prop_map(Ev::Tick),
    ]
}

proptest! {
    /// Whatever happens, blocks in use are exactly those held by requests,
    /// no block is held twice, and releasing everything empties the pool.
    #[test]
    fn blocks_are_never_leaked_or_shared(events in prop::collection::vec(ev(), 1..200)) {
        let mut a = Admission::new(Limits { max_batch: 3, max_queue: 4, block_size: 4, max_attempts: 2, kv_timeout: 50 }, 24);
        let mut leases: HashMap<RequestId, Lease> = HashMap::new();
        let mut owned: HashMap<RequestId, Vec<BlockId>> = HashMap::new();
        let mut now = 0u64;
        for e in events {
            let actions = match e {
                Ev::Submit(i, p) => a.submit(RequestId(i as u64), &toks(p as usize), now),
                Ev::Complete(i, v) => match leases.get(&RequestId(i as u64)) { Some(l) => a.kv_complete(RequestId(i as u64), *l, v, now), None => Vec::new() },
                Ev::Lost(i) => match leases.get(&RequestId(i as u64)) { Some(l) => a.kv_lost(RequestId(i as u64), *l, now), None => Vec::new() },
                Ev::Grow(i) => {
                    if let Some(b) = a.grow(RequestId(i as u64)) { owned.entry(RequestId(i as u64)).or_default().push(b); }
                    Vec::new()
                }
                Ev::Release(i) => { owned.remove(&RequestId(i as u64)); leases.remove(&RequestId(i as u64)); a.release(RequestId(i as u64), now) }
                Ev::Tick(dt) => { now += dt as u64; a.tick(now) }
            };
            for act in actions {
                match act {
                    Action::Prefill { id, lease, blocks, .. } => { leases.insert(id, lease); owned.insert(id, blocks); }
                    Action::Start { id, .. } => { leases.remove(&id); }
                    Action::Reject { why: Rejection::Duplicate, .. } => {}
                    Action::Abandon { id, .. } | Action::Reject { id, .. } => { leases.remove(&id); owned.remove(&id); }
                }
            }
            let mut all: Vec<BlockId> = owned.values().flatten().copied().collect();
            let n = all.len();
            all.sort();
            all.dedup();
            prop_assert_eq!(all.len(), n, "a block is held twice");
            prop_assert_eq!(a.used_blocks(), n, "blocks in use are exactly those held");
        }
        // Releasing may admit queued requests, which are then released in turn.
        for _ in 0..10 {
            for i in 0..8 { a.release(RequestId(i), now); }
        }
        prop_assert_eq!(a.used_blocks(), 0);
        prop_assert_eq!(a.queued(), 0);
    }
}

#[test]
fn a_later_turn_reuses_the_blocks_of_the_conversation_so_far() {
    let mut a = Admission::new(limits(), 16);
    let turn1: Vec<u32> = (100..110).collect(); // 10 tokens: 2 full blocks of 4
    let acts = a.submit(RequestId(1), &turn1, 0);
    let [Action::Prefill {
        lease,
        blocks,
        cached,
        ..
    }] = &acts[..]
    else {
        panic!("{acts:?}")
    };
    assert_eq!(*cached, 0, "nothing cached yet");
    a.kv_complete(RequestId(1), *lease, true, 1);
    // The answer: 6 more tokens whose KV was computed, then the request ends.
    let mut convo = turn1.clone();
    convo.extend(200..206);
    assert!(a.grow(RequestId(1)).is_some());
    a.finish(RequestId(1), &convo, 2);
    assert_eq!(a.used_blocks(), 0, "cached blocks are not in use");
    // Turn 2 repeats the conversation and adds to it: 4 full blocks reused.
    let mut turn2 = convo.clone();
    turn2.extend(300..305);
    let acts = a.submit(RequestId(2), &turn2, 3);
    let [Action::Prefill {
        blocks: b2, cached, ..
    }] = &acts[..]
    else {
        panic!("{acts:?}")
    };
    assert_eq!(*cached, 16);
    assert_eq!(b2[..2], blocks[..2], "the prompt's blocks");
    assert_eq!(b2.len(), (turn2.len() + 1).div_ceil(4));
    // A prompt that is all cached still leaves its last token to compute.
    let acts = a.submit(RequestId(3), &convo[..16], 3);
    let [Action::Prefill { cached, .. }] = &acts[..] else {
        panic!("{acts:?}")
    };
    assert_eq!(*cached, 12);
}

/// An attempt whose writers put straight into its blocks: abandoned (by a
/// retry or a cancel), its blocks go to no one until the writers confirm
/// they stopped, or until the quarantine runs out; the retry gets others.
#[test]
fn an_abandoned_fenced_attempts_blocks_wait_for_its_writers() {
    let mut a = Admission::new(limits(), 4);
    let first = prefill_of(&a.submit(RequestId(1), &toks(7), 0));
    let (id, lease, blocks) = first[0].clone();
    a.fence(id, lease);
    // The transfer fails: the retry cannot have the quarantined blocks,
    // and the pool's other two are enough.
    let retry = prefill_of(&a.kv_lost(id, lease, 1));
    assert_eq!(retry.len(), 1);
    assert!(a.quarantined(id, lease));
    assert!(
        retry[0].2.iter().all(|b| !blocks.contains(b)),
        "{retry:?} {blocks:?}"
    );
    assert_eq!(a.quarantined_blocks(), 2);
    // Another request finds the pool full while the quarantine holds.
    assert!(a.submit(RequestId(2), &toks(3), 2).is_empty());
    // The writers stopped: the blocks are free and the waiting request runs.
    let next = prefill_of(&a.writers_stopped(id, lease, 3));
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].0, RequestId(2));
    assert!(!a.quarantined(id, lease));
    assert!(a.writers_stopped(id, lease, 3).is_empty(), "only once");

    // A cancelled fenced attempt waits the same way, however long: time
    // passing frees nothing.
    let (id2, lease2, _) = next[0].clone();
    a.fence(id2, lease2);
    a.release(id2, 10);
    assert!(a.quarantined(id2, lease2));
    a.tick(10 + 24 * 3_600_000);
    assert!(
        a.quarantined(id2, lease2),
        "unconfirmed, the blocks stay out of use"
    );
    a.writers_stopped(id2, lease2, 11);
    assert!(!a.quarantined(id2, lease2));

    // An unfenced attempt's blocks are free at once.
    let (id3, lease3, _) = retry[0].clone();
    a.release(id3, 20);
    assert!(!a.quarantined(id3, lease3));
    assert_eq!(a.used_blocks(), 0);
}
