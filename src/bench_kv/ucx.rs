//! `bench kv` over UCX: the receiving process's side, the sending side's
//! rows (puts and active messages, with and without peer-failure handling)
//! and `ucx_perftest` as the reference.

use super::*;
use tandem_kvtransfer::ucx::{Placement, Ucx, Worker, WorkerOptions};

/// Registers a buffer, prints how to reach it, then answers `hash OFF LEN
/// [WANT]` (the bytes' hash) and `zero OFF LEN [WANT]` (clears them), each
/// once WANT bytes of active messages have landed since the last `zero`.
pub(super) fn ucx_receiver(capacity: usize, heap: bool) -> Result<()> {
    let ucx = Ucx::load(None)?;
    let worker = Worker::start(ucx, &WorkerOptions::default(), "ucx-bench")?;
    let mut heap_buf = vec![0u8; if heap { capacity } else { 0 }];
    let region = if heap {
        // SAFETY: `heap_buf` lives until this function returns, after the worker is dropped.
        unsafe { worker.map(heap_buf.as_mut_ptr(), capacity) }?
    } else {
        worker.alloc(capacity)?
    };
    let base = region.base as usize;
    // SAFETY: the region is `capacity` bytes, allocated or registered above,
    // and stays mapped until the worker is dropped at the end. The sender
    // writes it only between this loop's requests, each of which it sends
    // after its transfers completed.
    let buf = unsafe { std::slice::from_raw_parts_mut(base as *mut u8, capacity) };
    // Active messages carry their offset in the header and land there; the
    // counter is what landed since the last `zero`.
    let landed = Arc::new(AtomicUsize::new(0));
    let counter = landed.clone();
    worker.on_am(
        1,
        Box::new(move |h, len| {
            let Some(off) = h
                .get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
            else {
                return Placement::Drop;
            };
            if off + len > capacity {
                return Placement::Drop;
            }
            let landed = counter.clone();
            Placement::Into {
                runs: vec![(base + off, len)],
                done: Box::new(move |r| {
                    if r.is_ok() {
                        landed.fetch_add(len, Ordering::SeqCst);
                    }
                }),
            }
        }),
    )?;
    println!(
        "{} {} {} {}",
        hex(worker.address()),
        region.base,
        region.len,
        hex(&region.rkey)
    );
    std::io::stdout().flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let v: Vec<usize> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let (off, len, want) = match v[..] {
            [off, len] => (off, len, 0),
            [off, len, want] => (off, len, want),
            _ => (usize::MAX, 0, 0),
        };
        let Some(range) = off
            .checked_add(len)
            .filter(|&e| e <= capacity)
            .map(|e| off..e)
        else {
            println!("bad request {line:?}");
            std::io::stdout().flush()?;
            continue;
        };
        // Puts were flushed before the sender asked, so they are in. A
        // rendezvous active message can complete for the sender a little
        // before it does here: first wait for `want` bytes to have landed.
        let deadline = Instant::now() + Duration::from_secs(10);
        while landed.load(Ordering::SeqCst) < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(50));
        }
        if line.starts_with("zero") {
            buf[range].fill(0);
            landed.store(0, Ordering::SeqCst);
            println!("ok");
        } else {
            println!("{}", hash(&buf[range]));
        }
        std::io::stdout().flush()?;
    }
    drop(worker);
    drop(heap_buf);
    Ok(())
}

pub(super) fn ucx_rows(
    a: &BenchKvArgs,
    tls: &str,
    block: usize,
    max_blocks: usize,
) -> Result<Vec<Row>> {
    let tls_env = if tls == "sm" { "sm,self" } else { "tcp" };
    let capacity = block * max_blocks;
    let kind = if a.receiver_memory == "heap" {
        "ucx-heap"
    } else {
        "ucx"
    };
    let mut peer = Peer::spawn(kind, capacity, &[("UCX_TLS", tls_env)])?;
    let info = peer.line()?;
    let f: Vec<&str> = info.split_whitespace().collect();
    let [addr, base, _len, rkey] = f[..] else {
        bail!("the receiver said {info:?}");
    };
    let base: u64 = base.parse()?;
    let ucx = Ucx::load(None)?;
    let opts = WorkerOptions {
        tls: Some(tls_env.to_string()),
        ..Default::default()
    };
    let worker = Worker::start(ucx.clone(), &opts, "ucx-bench")?;
    let ep = worker.connect(&unhex(addr)?)?;
    let rk = worker.unpack(ep, &unhex(rkey)?)?;
    // Over TCP a second worker connects without peer-failure handling, which
    // the cluster keeps on: UCX then writes rendezvous payloads straight
    // into the receiver's memory instead of streaming them as fragments, and
    // the row shows what the handling costs. Shared-memory endpoints have
    // no such handling to begin with.
    let plain = if tls == "tcp" {
        let w = Worker::start(
            ucx,
            &WorkerOptions {
                without_peer_failure: true,
                ..opts.clone()
            },
            "ucx-bench-plain",
        )?;
        let e = w.connect(&unhex(addr)?)?;
        Some((w, e))
    } else {
        None
    };
    let mut rows = Vec::new();
    // Active messages: one per block (what the cluster sends), and batched
    // per prefill chunk or up to 64 MiB, either gathered by UCX from each
    // block's own buffer (iov) or from one buffer holding the blocks.
    let chunk_blocks = a.chunk.div_ceil(a.block_size).max(1);
    let most_blocks = ((64usize << 20) / block).max(1);
    let method = |label: String, per_message, iov, plain| Method {
        label,
        per_message,
        iov,
        plain,
    };
    let mut methods = vec![
        method("put".into(), 0, false, false),
        method("am, 1 block/message".into(), 1, false, false),
        method(
            format!("am, {}-token chunks, iov", a.chunk),
            chunk_blocks,
            true,
            false,
        ),
        method(
            format!("am, {}-token chunks", a.chunk),
            chunk_blocks,
            false,
            false,
        ),
        method("am, ≤64 MiB messages".into(), most_blocks, false, false),
    ];
    if plain.is_some() {
        methods.push(method(
            "am, 1 block/msg, no peer-fail".into(),
            1,
            false,
            true,
        ));
        methods.push(method(
            format!("am, {}-tok chunks, no peer-fail", a.chunk),
            chunk_blocks,
            false,
            true,
        ));
    }
    for &tokens in &a.tokens {
        let n = tokens.div_ceil(a.block_size);
        let bytes = n * block;
        // The sender's side: each block in its own buffer, as a stage gathers
        // them, and one buffer holding them all.
        let blocks: Vec<Arc<Vec<u8>>> = (0..n)
            .map(|i| Arc::new(pattern(block, i as u64 + tokens as u64)))
            .collect();
        let data: Arc<Vec<u8>> = Arc::new(blocks.iter().flat_map(|b| b.iter().copied()).collect());
        let expect = hash(&data);
        let reference = if a.no_perftest {
            ("-".to_string(), None)
        } else {
            best_perftest(tls_env, bytes)
        };
        for m in &methods {
            let (worker, ep) = match (&plain, m.plain) {
                (Some((w, e)), true) => (w, *e),
                _ => (&worker, ep),
            };
            let once = || -> Result<Duration> {
                let t0 = Instant::now();
                if m.per_message == 0 {
                    let parts = (0..n)
                        .map(|i| (i * block..(i + 1) * block, base + (i * block) as u64))
                        .collect();
                    worker.put_many(ep, data.clone(), parts, rk).wait()?;
                    worker.flush(ep).wait()?;
                } else {
                    let pending: Vec<_> = (0..n)
                        .step_by(m.per_message)
                        .map(|first| {
                            let last = (first + m.per_message).min(n);
                            let parts = if m.iov {
                                blocks[first..last]
                                    .iter()
                                    .map(|b| (b.clone(), 0..b.len()))
                                    .collect()
                            } else {
                                vec![(data.clone(), first * block..last * block)]
                            };
                            let offset = ((first * block) as u64).to_le_bytes().to_vec();
                            worker.am_send_parts(ep, 1, offset, parts, true)
                        })
                        .collect();
                    for p in pending {
                        p.wait()?;
                    }
                }
                Ok(t0.elapsed())
            };
            once()?;
            // Active messages: wait until the receiver saw them all land.
            let want = if m.per_message == 0 { 0 } else { bytes };
            let got: u64 = peer.ask(&format!("hash 0 {bytes} {want}"))?.parse()?;
            if got != expect {
                bail!(
                    "{tls} {}: the receiver's bytes do not match what was sent",
                    m.label
                );
            }
            let gbps = timed(a.iters, bytes, &once)?;
            let (reference, reference_gbps) = reference.clone();
            rows.push(Row {
                transport: tls.into(),
                method: m.label.clone(),
                tokens,
                bytes,
                gbps,
                reference,
                reference_gbps,
            });
            println!("{tls} {} {tokens} tokens: {gbps:.2} GB/s", m.label);
            // Zero the receiver's bytes between methods, so a method that
            // moved nothing cannot pass on the previous one's data.
            // Once the active messages sent so far have all landed.
            let sent = want * (1 + a.iters);
            peer.ask(&format!("zero 0 {bytes} {sent}"))?;
        }
    }
    Ok(rows)
}

/// One way of moving a transfer in `bench kv`'s UCX rows.
struct Method {
    label: String,
    /// Blocks per active message; 0 means one-sided puts and a flush.
    per_message: usize,
    /// The message's blocks are gathered by UCX from their own buffers.
    iov: bool,
    /// Sent by the worker connected without peer-failure handling.
    plain: bool,
}

/// The best of `ucx_perftest`'s put, active-message and tagged bandwidth
/// for this transport with messages of the transfer's size (so both touch
/// the same amount of memory).
fn best_perftest(tls: &str, size: usize) -> (String, Option<f64>) {
    let mut best = ("ucx_perftest not installed".to_string(), None);
    for test in ["ucp_put_bw", "ucp_am_bw", "tag_bw"] {
        if let (label, Some(g)) = perftest(tls, test, size) {
            if best.1.is_none_or(|b| g > b) {
                best = (label, Some(g));
            }
        }
    }
    best
}

/// `ucx_perftest`'s bandwidth for one test and message size, run as a
/// server and client pair on loopback.
fn perftest(tls: &str, test: &str, size: usize) -> (String, Option<f64>) {
    let label = format!("ucx_perftest {test}");
    let iters = ((1usize << 30) / size.max(1)).clamp(10, 400);
    let port = 13000 + (std::process::id() % 2000) as u16;
    let args = |server: bool| {
        let mut c = Command::new("ucx_perftest");
        if !server {
            c.arg("127.0.0.1");
        }
        c.args([
            "-t",
            test,
            "-s",
            &size.to_string(),
            "-n",
            &iters.to_string(),
            "-p",
            &port.to_string(),
        ])
        .env("UCX_TLS", tls)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        c
    };
    let Ok(mut server) = args(true).spawn() else {
        return ("ucx_perftest not installed".into(), None);
    };
    std::thread::sleep(Duration::from_millis(500));
    let out = args(false).output();
    let _ = server.kill();
    let _ = server.wait();
    let mbps = out.ok().and_then(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.trim_start().starts_with("Final:"))
            .and_then(|l| {
                l.split_whitespace()
                    .nth(5)
                    .and_then(|x| x.parse::<f64>().ok())
            })
    });
    // ucx_perftest reports MB/s in units of 2^20 bytes.
    (label, mbps.map(|m| m * (1 << 20) as f64 / 1e9))
}
