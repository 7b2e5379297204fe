use super::*;

fn ids(v: &[u32]) -> Vec<BlockId> {
    v.iter().copied().map(BlockId).collect()
}

/// A stage's worker and a decode group's, over `tls`.
fn stage_and_decode(tls: &str) -> (Arc<Worker>, Worker) {
    let ucx = crate::ucx::Ucx::load(None).expect("UCX must be installed");
    let opts = crate::ucx::WorkerOptions {
        tls: Some(tls.into()),
        ..Default::default()
    };
    let stage = Worker::start(ucx.clone(), &opts, "stage").expect("worker");
    let decode = Worker::start(ucx, &opts, "decode").expect("worker");
    (Arc::new(stage), decode)
}

#[test]
fn touching_runs_merge_and_gaps_stay() {
    let runs = coalesce([(0, 10), (10, 5), (20, 5), (25, 1), (100, 2)].into_iter());
    assert_eq!(runs, vec![(0, 15), (20, 6), (100, 2)]);
}

/// A stage on the decode group's host maps its pools once per target:
/// each block written lands in place, and dropping the target (a new
/// link-up replaces it) releases the mapping instead of keeping one
/// more per reconnect.
#[test]
fn a_put_target_writes_in_place_and_releases_its_mapping() {
    let (stage, decode) = stage_and_decode("sm,self");
    let block = 64 << 10;
    let region = decode.alloc(4 * block).expect("alloc");
    let pool = UcxPool {
        base: region.base,
        bytes: (4 * block) as u64,
        block_bytes: block as u64,
        rkey: region.rkey.clone().into(),
    };
    let ep = stage.connect(decode.address()).expect("connect");
    for round in 0..3u8 {
        let target = PutTarget::reach(&stage, ep, std::slice::from_ref(&pool))
            .expect("reach")
            .expect("the pool is mapped here over shared memory");
        assert_eq!(stage.rkeys(), 1, "one key while the target lives");
        let bytes: Vec<u8> = (0..block).map(|i| (i as u8) ^ round).collect();
        target
            .write(0, BlockId(2), &bytes, &[(0, 0, block)])
            .expect("write");
        crate::stream_copy::fence();
        // SAFETY: the region is `4 * block` bytes UCX allocated in this
        // process for `decode`, alive until it is unmapped below.
        let pool = unsafe { std::slice::from_raw_parts(region.base as *const u8, 4 * block) };
        assert_eq!(&pool[2 * block..3 * block], &bytes[..]);
        assert!(pool[..2 * block].iter().all(|&x| x == 0));
        drop(target);
        assert_eq!(stage.rkeys(), 0, "the key is released with the target");
    }
    decode.unmap(&region);
}

/// A receive accepted under an old attempt that completes after a new
/// attempt opened changes nothing of the new one; the old attempt's
/// blocks count as written until that completion, which reports them
/// drained.
#[test]
fn a_late_completion_of_an_old_attempt_changes_nothing_and_drains_it() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let landing = Landing {
        table: Arc::new(Mutex::new(Table::default())),
        ranks: Arc::new(Vec::new()),
        wake: Arc::new(move |e| seen.lock().unwrap().push(e)),
    };
    let (id, old, new) = (RequestId(1), Lease(10), Lease(11));
    landing.open(id, old, vec![ids(&[1, 2])], HashMap::new());
    // A receive into the old attempt's blocks is in flight...
    landing.lock().open.get_mut(&id).unwrap().inflight = 1;
    assert!(!landing.close(id, old), "closing waits for the receive");
    landing.open(id, new, vec![ids(&[1, 2])], HashMap::new());
    // ...and completes late.
    landing.completed(id, old, 0, 0, &ids(&[1, 2]), Ok(()));
    assert_eq!(
        landing.status(id, new, 0, 0, &ids(&[1, 2])),
        LandedStatus::Pending,
        "the old attempt's bytes do not count for the new one"
    );
    assert_eq!(landing.lock().open[&id].inflight, 0);
    assert_eq!(
        *events.lock().unwrap(),
        vec![LandingEvent::Drained { id, lease: old }]
    );
    assert_eq!(landing.draining(), 0);
    // A completion for an attempt nobody knows changes nothing at all.
    landing.completed(id, Lease(99), 0, 0, &ids(&[1]), Ok(()));
    assert_eq!(events.lock().unwrap().len(), 1);
}

/// The handler as decode installs it: batched blocks land where the
/// plan says, each block counted as landed; a stale lease or a block
/// the request does not own is refused without touching memory.
#[test]
fn batched_blocks_land_in_the_pool_and_stale_or_foreign_ones_do_not() {
    let (stage, decode) = stage_and_decode("tcp");
    let (block_elems, elem) = (4096usize, 4usize);
    let block_bytes = block_elems * elem;
    let n_blocks = 8;
    let mut pool = vec![0u8; block_bytes * n_blocks];
    let (id, lease) = (RequestId(7), Lease(3));
    let (wake_tx, wake_rx) = std::sync::mpsc::channel();
    let landing = Landing::install(
        &decode,
        vec![RankMemory {
            base: pool.as_mut_ptr() as usize,
            n_blocks,
            block_bytes,
            elem_bytes: elem,
        }],
        move |e| {
            let _ = wake_tx.send(e);
        },
    )
    .expect("install");
    // Waits (by the events, not by polling) until the blocks' status settles.
    let settle = |lease: Lease, blocks: &[BlockId]| loop {
        match landing.status(id, lease, 0, 0, blocks) {
            LandedStatus::Pending => {
                wake_rx
                    .recv_timeout(Duration::from_secs(10))
                    .expect("a receive completes");
            }
            other => break other,
        }
    };
    // Each block of this rank is two runs: the plan swaps its halves.
    let half = block_elems / 2;
    let plan = vec![
        CopyRun {
            src: 0,
            dst: half,
            len: half,
        },
        CopyRun {
            src: half,
            dst: 0,
            len: half,
        },
    ];
    let allowed = ids(&[2, 3, 4, 6]);
    landing.open(
        id,
        lease,
        vec![allowed.clone()],
        HashMap::from([((0, 0), plan.clone())]),
    );
    let ep = stage.connect(decode.address()).expect("connect");
    // Block b's bytes: its first half b + 1, its second half b + 101.
    let block = |b: u32| {
        let mut v = vec![b as u8 + 1; block_bytes];
        v[block_bytes / 2..].fill(b as u8 + 101);
        Arc::new(v)
    };
    let send = |lease: Lease, blocks: &[u32]| {
        let header = KvHeader {
            id,
            lease,
            stage: 0,
            rank: 0,
            blocks: ids(blocks),
        };
        let parts = blocks.iter().map(|&b| (block(b), 0..block_bytes)).collect();
        stage
            .am_send_parts(
                ep,
                KV_AM,
                tandem_wire::codec::encode(&header).unwrap(),
                parts,
                true,
            )
            .wait_for(SEND_TIMEOUT)
            .expect("a rendezvous completes even when refused");
    };
    let at = |b: usize| pool[b * block_bytes..(b + 1) * block_bytes].to_vec();
    // An abandoned attempt's message is dropped: nothing lands.
    send(Lease(2), &[2, 3, 4]);
    assert!((0..n_blocks).all(|b| at(b).iter().all(|&x| x == 0)));
    send(lease, &[2, 3, 4]);
    send(lease, &[6]);
    assert_eq!(settle(lease, &allowed), LandedStatus::Landed);
    for b in [2u32, 3, 4, 6] {
        let got = at(b as usize);
        let (first, second) = got.split_at(block_bytes / 2);
        assert!(
            first.iter().all(|&x| x == b as u8 + 101),
            "block {b}, halves swapped"
        );
        assert!(
            second.iter().all(|&x| x == b as u8 + 1),
            "block {b}, halves swapped"
        );
    }
    for b in [0, 1, 5, 7] {
        assert!(at(b).iter().all(|&x| x == 0), "block {b} untouched");
    }
    // A block the request does not own fails the transfer, unwritten.
    send(lease, &[6, 7]);
    let LandedStatus::Failed(e) = settle(lease, &ids(&[7])) else {
        panic!("a foreign block is refused");
    };
    assert!(e.contains("not ones the request expects"), "{e}");
    assert!(at(7).iter().all(|&x| x == 0));
    // So does a message naming one block twice.
    assert!(landing.close(id, lease), "nothing in flight");
    let lease = Lease(4);
    landing.open(
        id,
        lease,
        vec![allowed.clone()],
        HashMap::from([((0, 0), plan)]),
    );
    send(lease, &[3, 3]);
    let LandedStatus::Failed(e) = settle(lease, &ids(&[3])) else {
        panic!("a block named twice is refused");
    };
    assert!(e.contains("not ones the request expects"), "{e}");
    assert!(landing.close(id, lease));
    assert_eq!(
        landing.status(id, lease, 0, 0, &ids(&[3])),
        LandedStatus::Closed
    );
    drop(stage);
    drop(decode);
    drop(pool);
}

/// Resident memory of this process, from the kernel.
fn rss_bytes() -> usize {
    let s = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: usize = s
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .expect("resident");
    pages * 4096
}

/// What a peer without the attempt's key, or with a length of its own
/// choosing, can make the decode side do: nothing. Over TCP and shared
/// memory, a message under a wrong key, one under the right key with a
/// 1 GiB payload, and one whose header is garbage are each dropped
/// before anything is allocated or written: the pool is untouched and
/// the process's resident memory does not grow by the payload.
#[test]
fn a_wrong_key_or_a_huge_length_is_dropped_with_nothing_allocated_or_written() {
    for tls in ["tcp", "sm,self"] {
        let (stage, decode) = stage_and_decode(tls);
        let block_bytes = 16 << 10;
        let n_blocks = 4;
        let mut pool = vec![0u8; block_bytes * n_blocks];
        let landing = Landing::install(
            &decode,
            vec![RankMemory {
                base: pool.as_mut_ptr() as usize,
                n_blocks,
                block_bytes,
                elem_bytes: 4,
            }],
            |_| {},
        )
        .expect("install");
        let id = RequestId(1);
        let lease = Lease(0x5eed_0000_0000_0000_0000_0000_0000_0001);
        let plan = vec![CopyRun {
            src: 0,
            dst: 0,
            len: block_bytes / 4,
        }];
        landing.open(
            id,
            lease,
            vec![ids(&[0, 1, 2, 3])],
            HashMap::from([((0, 0), plan)]),
        );
        let ep = stage.connect(decode.address()).expect("connect");
        // A gigabyte the sender never touches (zero pages): only a
        // receiver that took it would make it resident.
        let huge = Arc::new(vec![0u8; 1 << 30]);
        let send = |header: Vec<u8>, data: Arc<Vec<u8>>| {
            let n = data.len();
            stage
                .am_send(ep, KV_AM, header, data, 0..n, true)
                .wait_for(SEND_TIMEOUT)
                .expect("a refused rendezvous still completes for its sender");
        };
        let header = |lease: Lease, blocks: &[u32]| {
            tandem_wire::codec::encode(&KvHeader {
                id,
                lease,
                stage: 0,
                rank: 0,
                blocks: ids(blocks),
            })
            .unwrap()
        };
        let before = rss_bytes();
        // The right blocks, the right size, a wrong key (one bit off).
        let wrong = Lease(lease.0 ^ 1 << 77);
        send(header(wrong, &[0, 1]), Arc::new(vec![9u8; 2 * block_bytes]));
        // The right key and a huge length.
        send(header(lease, &[0]), huge.clone());
        // Garbage, and a header claiming a billion blocks.
        send(vec![0xff; 64], huge.clone());
        let mut liar = header(lease, &[0]);
        liar.truncate(liar.len() - 2);
        liar.extend_from_slice(&[0xfc, 0, 0, 0, 0x40]);
        send(liar, huge.clone());
        let grew = rss_bytes().saturating_sub(before);
        assert!(
            grew < 256 << 20,
            "{tls}: resident memory grew by {grew} bytes for dropped messages"
        );
        assert!(
            pool.iter().all(|&x| x == 0),
            "{tls}: a dropped message wrote into the pool"
        );
        // The attempt saw the oversized message under its key and failed
        // it; the wrong key left no trace on it.
        match landing.status(id, lease, 0, 0, &ids(&[0])) {
            LandedStatus::Failed(e) => assert!(e.contains("bytes"), "{e}"),
            other => panic!("{tls}: {other:?}"),
        }
        drop(stage);
        drop(decode);
    }
}
