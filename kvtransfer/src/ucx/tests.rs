//! Two workers in one process, each with its own context, over the
//! transports this machine has. Needs UCX installed (`.ci/run` installs it).

use super::*;

fn pair(tls: &str) -> (Worker, Worker) {
    pair_with(WorkerOptions {
        tls: Some(tls.to_string()),
        ..Default::default()
    })
}

fn pair_with(opts: WorkerOptions) -> (Worker, Worker) {
    let ucx =
        Ucx::load(None).expect("UCX must be installed for these tests (apt-get install libucx0)");
    let a = Worker::start(ucx.clone(), &opts, "ucx-a").expect("worker a");
    let b = Worker::start(ucx, &opts, "ucx-b").expect("worker b");
    (a, b)
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn put_lands(tls: &str) {
    let (a, b) = pair(tls);
    let mut target = vec![0u8; 3 << 20];
    // SAFETY: `target` outlives worker `b` (dropped at the end of this function first).
    let region = unsafe { b.map(target.as_mut_ptr(), target.len()) }.expect("map");
    let ep = a.connect(b.address()).expect("connect");
    let rkey = a.unpack(ep, &region.rkey).expect("unpack");
    let data = Arc::new(pattern(1 << 20, 7));
    a.put(
        ep,
        data.clone(),
        0..data.len(),
        region.base + (1 << 20),
        rkey,
    )
    .wait()
    .expect("put");
    a.flush(ep).wait().expect("flush");
    drop(a);
    drop(b);
    assert!(
        target[..1 << 20].iter().all(|&x| x == 0),
        "bytes before the target range"
    );
    assert_eq!(&target[1 << 20..2 << 20], &data[..]);
    assert!(
        target[2 << 20..].iter().all(|&x| x == 0),
        "bytes after the target range"
    );
}

fn am_lands_in_runs(tls: &str) {
    let (a, b) = pair(tls);
    let mut target = vec![0u8; 4096 * 4];
    let base = target.as_mut_ptr() as usize;
    let (tx, rx) = mpsc::channel();
    b.on_am(
        9,
        Box::new(move |header, len| {
            if header != b"want" {
                return Placement::Drop;
            }
            // Scatter: the first half to page 3, the second to page 1.
            let half = len / 2;
            let tx = tx.clone();
            Placement::Into {
                runs: vec![(base + 3 * 4096, half), (base + 4096, len - half)],
                done: Box::new(move |r| tx.send(r).unwrap()),
            }
        }),
    )
    .expect("handler");
    let ep = a.connect(b.address()).expect("connect");
    for rndv in [true, false] {
        let data = Arc::new(pattern(8192, rndv as u8));
        a.am_send(ep, 9, b"want".to_vec(), data.clone(), 0..8192, rndv)
            .wait()
            .expect("send");
        rx.recv_timeout(Duration::from_secs(10))
            .expect("placed")
            .expect("no error");
        assert_eq!(&target[3 * 4096..4 * 4096], &data[..4096]);
        assert_eq!(&target[4096..2 * 4096], &data[4096..]);
    }
    // A message the handler refuses is dropped; the next one still lands.
    a.am_send(
        ep,
        9,
        b"stale".to_vec(),
        Arc::new(vec![1; 8192]),
        0..8192,
        true,
    )
    .wait()
    .expect("a refused rendezvous still completes for the sender");
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    assert_eq!(target[4096], pattern(8192, 0)[4096]);
    drop(a);
    drop(b);
}

/// One message gathered from several buffers arrives as their
/// concatenation, whether it lands in one run or is scattered.
fn parts_arrive_concatenated(tls: &str) {
    parts_arrive_concatenated_with(pair(tls));
}

fn parts_arrive_concatenated_with((a, b): (Worker, Worker)) {
    let part = 96 << 10;
    let mut target = vec![0u8; part * 3 * 2];
    let base = target.as_mut_ptr() as usize;
    let (tx, rx) = mpsc::channel();
    b.on_am(
        5,
        Box::new(move |header, len| {
            let tx = tx.clone();
            let runs = if header == b"one" {
                vec![(base, len)]
            } else {
                // Second half first, then the first half, after a gap.
                let half = len / 2;
                vec![(base + len + half, half), (base + len, len - half)]
            };
            Placement::Into {
                runs,
                done: Box::new(move |r| tx.send(r).unwrap()),
            }
        }),
    )
    .expect("handler");
    let ep = a.connect(b.address()).expect("connect");
    for rndv in [true, false] {
        let bufs: Vec<Bytes> = (0..3)
            .map(|i| Arc::new(pattern(part, i + 3 * rndv as u8)))
            .collect();
        let whole: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        for header in ["one", "scattered"] {
            let parts = bufs.iter().map(|b| (b.clone(), 0..b.len())).collect();
            a.am_send_parts(ep, 5, header.as_bytes().to_vec(), parts, rndv)
                .wait()
                .expect("send");
            rx.recv_timeout(Duration::from_secs(10))
                .expect("placed")
                .expect("no error");
        }
        let n = whole.len();
        assert_eq!(&target[..n], &whole[..], "one run, rndv {rndv}");
        let half = n / 2;
        assert_eq!(
            &target[n + half..],
            &whole[..half],
            "scattered, rndv {rndv}"
        );
        assert_eq!(
            &target[n..n + half],
            &whole[half..],
            "scattered, rndv {rndv}"
        );
    }
    // A range outside its buffer is refused before anything is sent.
    let short = Arc::new(vec![0u8; 16]);
    assert!(a
        .am_send_parts(ep, 5, b"one".to_vec(), vec![(short, 0..32)], true)
        .wait()
        .is_err());
    drop(a);
    drop(b);
}

#[test]
fn parts_of_one_message_over_tcp_arrive_concatenated() {
    parts_arrive_concatenated("tcp");
}

/// With peer-failure handling, a rendezvous over TCP streams the payload as
/// fragments the receiver copies into place (rather than UCX's zero-copy put
/// protocol, the default): the bytes must land the same.
#[test]
fn parts_of_one_message_over_tcp_with_peer_failure_handling_arrive_concatenated() {
    parts_arrive_concatenated_with(pair_with(WorkerOptions {
        tls: Some("tcp".into()),
        peer_failure: true,
        ..Default::default()
    }));
}

#[test]
fn parts_of_one_message_over_shared_memory_arrive_concatenated() {
    parts_arrive_concatenated("sm,self");
}

#[test]
fn put_over_tcp_writes_exactly_the_target_range() {
    put_lands("tcp");
}

#[test]
fn put_over_shared_memory_writes_exactly_the_target_range() {
    put_lands("sm,self");
}

#[test]
fn active_messages_over_tcp_land_in_the_runs_the_receiver_names() {
    am_lands_in_runs("tcp");
}

#[test]
fn active_messages_over_shared_memory_land_in_the_runs_the_receiver_names() {
    am_lands_in_runs("sm,self");
}

#[test]
fn a_wrong_library_path_is_a_clear_error() {
    let e = Ucx::load(Some("/nonexistent/libucp.so.0"))
        .err()
        .expect("must fail");
    assert!(e.to_string().contains("/nonexistent/libucp.so.0"), "{e}");
}

#[test]
fn version_is_at_least_1_13() {
    let ucx = Ucx::load(None).expect("UCX");
    let v = ucx.version();
    let mut it = v.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
    let (maj, min) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    assert!((maj, min) >= (1, 13), "{v}");
}
