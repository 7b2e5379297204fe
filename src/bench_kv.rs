//! `tandem bench kv`: KV blocks of the default model's layout moved from a
//! prefill-like process (this one) to a decode-like process (a child,
//! `tandem bench kv --receiver …`), over each transport and a few prompt
//! lengths, beside the references measured in the same run: `ucx_perftest`
//! for UCX, plain quinn streams for QUIC.
//!
//! A transfer is one prompt's KV: one operation per block (a put, or an
//! active message in rendezvous), then the completion the cluster waits for
//! (a flush for puts, every send's completion for active messages). QUIC
//! sends the cluster's own `Kv` messages (4 MiB) on a link and waits for
//! the receiver's echo of the completion notice. Every transfer is checked:
//! the receiver hashes what landed and the hash must match what was sent.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use tandem_kvtransfer::ucx::{Placement, Ucx, Worker, WorkerOptions};
use tandem_model::BlockId;
use tandem_wire::link::{Link, NetEvent};
use tandem_wire::messages::{ByteBuf, Hello, KvChunk, KvDone, Lease, Message, RequestId, Role};

#[derive(Args)]
pub struct BenchKvArgs {
    /// Transports: sm and tcp (UCX), quic.
    #[arg(long, value_delimiter = ',', default_value = "sm,tcp,quic")]
    transports: Vec<String>,
    /// Prompt lengths in tokens: each transfer moves that prompt's KV blocks.
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
    tokens: Vec<usize>,
    /// Transfers per point (after one warm-up).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// KV layout: the default model (30 layers, 3 KV heads of 64) with the
    /// cluster's default blocks (16 tokens of f32).
    #[arg(long, default_value_t = 30)]
    layers: usize,
    #[arg(long, default_value_t = 3)]
    kv_heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    #[arg(long, default_value_t = 4)]
    dtype_bytes: usize,
    /// Prompt tokens per prefill chunk (the cluster's `chunk`): the batch
    /// size of the batched active-message rows.
    #[arg(long, default_value_t = 256)]
    chunk: usize,
    /// QUIC reference: plain quinn with this many parallel streams (besides 1).
    #[arg(long, default_value_t = 4)]
    quinn_streams: usize,
    /// Where the receiving process's buffer lives: `ucx` (allocated and
    /// registered through UCX, as decode's KV pools are) or `heap`
    /// (ordinary memory, registered).
    #[arg(long, default_value = "ucx")]
    receiver_memory: String,
    /// Skip `ucx_perftest` even when it is installed.
    #[arg(long)]
    no_perftest: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Internal: run as the receiving process for this transport.
    #[arg(long, hide = true)]
    receiver: Option<String>,
    /// Internal: the receiver's buffer size in bytes.
    #[arg(long, hide = true, default_value_t = 0)]
    capacity: usize,
}

#[derive(serde::Serialize)]
struct Row {
    transport: String,
    method: String,
    tokens: usize,
    bytes: usize,
    gbps: f64,
    reference: String,
    reference_gbps: Option<f64>,
}

pub fn run(a: BenchKvArgs) -> Result<()> {
    if let Some(t) = a.receiver.clone() {
        return receiver(&t, a.capacity);
    }
    let block = a.layers * 2 * a.kv_heads * a.block_size * a.head_dim * a.dtype_bytes;
    let max_blocks = a
        .tokens
        .iter()
        .map(|t| t.div_ceil(a.block_size))
        .max()
        .unwrap_or(1);
    println!(
        "KV block: {} layers x K,V x {} heads x {} tokens x {} dims x {} bytes = {} KiB",
        a.layers,
        a.kv_heads,
        a.block_size,
        a.head_dim,
        a.dtype_bytes,
        block / 1024
    );
    let mut rows = Vec::new();
    for t in &a.transports {
        match t.as_str() {
            "sm" | "tcp" => rows.extend(ucx_rows(&a, t, block, max_blocks)?),
            "quic" => rows.extend(quic_rows(&a, block, max_blocks)?),
            other => bail!("unknown transport '{other}' (sm, tcp, quic)"),
        }
    }
    println!(
        "\n{:<6} {:<32} {:>7} {:>9} {:>9}   {:<26} {:>9} {:>6}",
        "link", "method", "tokens", "MiB", "GB/s", "reference", "GB/s", "ratio"
    );
    for r in &rows {
        let (rg, ratio) = match r.reference_gbps {
            Some(g) => (format!("{g:.2}"), format!("{:.2}", r.gbps / g)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<6} {:<32} {:>7} {:>9.1} {:>9.2}   {:<26} {:>9} {:>6}",
            r.transport,
            r.method,
            r.tokens,
            r.bytes as f64 / (1 << 20) as f64,
            r.gbps,
            r.reference,
            rg,
            ratio
        );
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}

/// The receiving process, driven over its stdin/stdout.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
}

impl Peer {
    fn spawn(transport: &str, capacity: usize, env: &[(&str, &str)]) -> Result<Peer> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.args(["bench", "kv", "--receiver", transport, "--capacity"])
            .arg(capacity.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("starting the receiving process")?;
        let stdin = child.stdin.take().expect("piped");
        let out = BufReader::new(child.stdout.take().expect("piped"));
        Ok(Peer { child, stdin, out })
    }

    fn line(&mut self) -> Result<String> {
        let mut s = String::new();
        if self.out.read_line(&mut s)? == 0 {
            bail!("the receiving process exited");
        }
        Ok(s.trim().to_string())
    }

    fn ask(&mut self, q: &str) -> Result<String> {
        writeln!(self.stdin, "{q}")?;
        self.stdin.flush()?;
        self.line()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// GB/s over `iters` transfers of `bytes`, each timed by `once`.
fn timed(iters: usize, bytes: usize, once: &dyn Fn() -> Result<Duration>) -> Result<f64> {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        total += once()?;
    }
    Ok((bytes * iters) as f64 / total.as_secs_f64() / 1e9)
}

fn hash(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2).unwrap_or("x"), 16).map_err(|e| anyhow!("{e}")))
        .collect()
}

fn receiver(transport: &str, capacity: usize) -> Result<()> {
    match transport {
        "ucx" => ucx_receiver(capacity, false),
        "ucx-heap" => ucx_receiver(capacity, true),
        "quic" => quic_receiver(),
        other => bail!("unknown receiver {other}"),
    }
}

/// Registers a buffer, prints how to reach it, then answers `hash OFF LEN
/// [WANT]` (the bytes' hash) and `zero OFF LEN [WANT]` (clears them), each
/// once WANT bytes of active messages have landed since the last `zero`.
fn ucx_receiver(capacity: usize, heap: bool) -> Result<()> {
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

fn ucx_rows(a: &BenchKvArgs, tls: &str, block: usize, max_blocks: usize) -> Result<Vec<Row>> {
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn hello(node: &str) -> Hello {
    Hello {
        protocol: tandem_wire::messages::PROTOCOL_VERSION,
        cluster: "bench-kv".into(),
        node: node.into(),
        role: Role::Client,
    }
}

/// Accepts connections: one named "link" runs the cluster's link and echoes
/// each completion notice; others ("raw") read streams of bytes and answer
/// each batch (its first 8 bytes say how many streams it has) with its hash.
fn quic_receiver() -> Result<()> {
    let dir = std::path::PathBuf::from(std::env::var("TANDEM_BENCH_CERTS")?);
    let id = tandem_wire::tls::load_identity(&dir, "decode")?;
    let rt = runtime()?;
    rt.block_on(async move {
        let ep = tandem_wire::quic::endpoint("127.0.0.1:0".parse()?, &id, Default::default())?;
        println!("{}", ep.local_addr()?.port());
        std::io::stdout().flush()?;
        while let Some(inc) = ep.accept().await {
            let (h, peer) = tandem_wire::quic::accept_stream(inc, &hello("decode")).await?;
            if peer.node == "link" {
                tokio::spawn(async move {
                    let (tx, rx) = mpsc::channel();
                    let link = Link::start(h, "link".into(), Role::Client, tx);
                    let _ = tokio::task::spawn_blocking(move || {
                        let mut sum = 0u64;
                        while let Ok(ev) = rx.recv() {
                            match ev {
                                NetEvent::Message {
                                    msg: Message::Kv(c),
                                    ..
                                } => {
                                    for (_, b) in &c.blocks {
                                        sum = sum.rotate_left(7) ^ hash(b);
                                    }
                                }
                                NetEvent::Message {
                                    msg: Message::KvDone(mut d),
                                    ..
                                } => {
                                    d.checksum = sum;
                                    sum = 0;
                                    let _ = link.blocking_send(Message::KvDone(d));
                                }
                                NetEvent::Down { .. } => break,
                                _ => {}
                            }
                        }
                    })
                    .await;
                });
            } else {
                let conn = h.conn;
                tokio::spawn(async move {
                    loop {
                        // A batch: its streams, each starting with the batch size.
                        let mut parts = Vec::new();
                        let mut want = 1usize;
                        while parts.len() < want {
                            let Ok(mut r) = conn.accept_uni().await else {
                                return;
                            };
                            let Ok(v) = r.read_to_end(1 << 31).await else {
                                return;
                            };
                            let word = |at: usize| {
                                v.get(at..at + 8)
                                    .and_then(|b| b.try_into().ok())
                                    .map(u64::from_le_bytes)
                            };
                            let (Some(n), Some(index)) = (word(0), word(8)) else {
                                return;
                            };
                            want = n as usize;
                            parts.push((index, hash(&v[16..])));
                        }
                        parts.sort();
                        let h = parts.iter().fold(0u64, |a, p| a.rotate_left(7) ^ p.1);
                        let Ok(mut s) = conn.open_uni().await else {
                            return;
                        };
                        let _ = s.write_all(&h.to_le_bytes()).await;
                        let _ = s.finish();
                    }
                });
            }
        }
        Ok::<_, anyhow::Error>(())
    })
}

fn quic_rows(a: &BenchKvArgs, block: usize, _max_blocks: usize) -> Result<Vec<Row>> {
    let dir = std::env::temp_dir().join(format!("tandem-bench-kv-{}", std::process::id()));
    let ips = vec!["127.0.0.1".parse()?];
    tandem_wire::tls::write_cluster_certs(
        &dir,
        "bench-kv",
        &[
            ("decode".to_string(), ips.clone()),
            ("prefill".to_string(), ips),
        ],
    )?;
    let mut peer = Peer::spawn(
        "quic",
        0,
        &[("TANDEM_BENCH_CERTS", dir.to_str().unwrap_or("."))],
    )?;
    let port: u16 = peer.line()?.parse()?;
    let id = tandem_wire::tls::load_identity(&dir, "prefill")?;
    let _ = std::fs::remove_dir_all(&dir);
    let rt = runtime()?;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let ep = rt.block_on(async { tandem_wire::quic::client_endpoint(&id, Default::default()) })?;
    // The cluster's path: a link carrying `Kv` messages.
    let (tx, events) = mpsc::channel();
    let link = rt.block_on(async {
        let (h, _) = tandem_wire::quic::connect_stream(&ep, addr, "decode", &hello("link")).await?;
        Ok::<_, anyhow::Error>(Link::start(h, "decode".into(), Role::Client, tx))
    })?;
    let raw = rt.block_on(async {
        let (h, _) = tandem_wire::quic::connect_stream(&ep, addr, "decode", &hello("raw")).await?;
        Ok::<_, anyhow::Error>(h.conn)
    })?;
    let mut rows = Vec::new();
    for &tokens in &a.tokens {
        let n = tokens.div_ceil(a.block_size);
        let bytes = n * block;
        let blocks: Vec<Vec<u8>> = (0..n)
            .map(|i| pattern(block, i as u64 + tokens as u64))
            .collect();
        let expect = blocks.iter().fold(0u64, |s, b| s.rotate_left(7) ^ hash(b));
        // Tandem's QUIC transport: 4 MiB `Kv` messages, then the notice.
        let per = (4usize << 20).div_ceil(block).max(1);
        let link_once = || -> Result<Duration> {
            let t0 = Instant::now();
            for (c, group) in blocks.chunks(per).enumerate() {
                let chunk = KvChunk {
                    id: RequestId(1),
                    lease: Lease(1),
                    stage: 0,
                    rank: 0,
                    blocks: group
                        .iter()
                        .enumerate()
                        .map(|(i, b)| (BlockId((c * per + i) as u32), ByteBuf::from(b.clone())))
                        .collect(),
                };
                link.blocking_send(Message::Kv(chunk))?;
            }
            link.blocking_send(Message::KvDone(KvDone {
                id: RequestId(1),
                lease: Lease(1),
                stage: 0,
                rank: 0,
                blocks: n as u32,
                checksum: 0,
            }))?;
            loop {
                match events.recv_timeout(Duration::from_secs(60))? {
                    NetEvent::Message {
                        msg: Message::KvDone(d),
                        ..
                    } => {
                        if d.checksum != expect {
                            bail!("quic link: the receiver's bytes do not match");
                        }
                        return Ok(t0.elapsed());
                    }
                    NetEvent::Down { reason, .. } => bail!("link lost: {reason}"),
                    _ => {}
                }
            }
        };
        let point = |method: String, once: &dyn Fn() -> Result<Duration>| -> Result<f64> {
            once()?;
            let gbps = timed(a.iters, bytes, once)?;
            println!("quic {method} {tokens} tokens: {gbps:.2} GB/s");
            Ok(gbps)
        };
        let tandem = point("link".into(), &link_once)?;
        // Plain quinn: the same bytes on k streams (1 MiB writes), no framing.
        let mut best = (String::new(), 0.0f64);
        for k in [1, a.quinn_streams.max(1)] {
            let raw_once = || -> Result<Duration> {
                let t0 = Instant::now();
                let h = rt.block_on(async {
                    let per = n.div_ceil(k);
                    let mut tasks = Vec::new();
                    for (i, part) in blocks.chunks(per).enumerate() {
                        let conn = raw.clone();
                        let part: Vec<Vec<u8>> = part.to_vec();
                        let parts = n.div_ceil(per);
                        tasks.push(tokio::spawn(async move {
                            let mut s = conn.open_uni().await?;
                            let mut head = (parts as u64).to_le_bytes().to_vec();
                            head.extend((i as u64).to_le_bytes());
                            s.write_all(&head).await?;
                            for b in &part {
                                for w in b.chunks(1 << 20) {
                                    s.write_all(w).await?;
                                }
                            }
                            s.finish()?;
                            Ok::<_, anyhow::Error>(())
                        }));
                    }
                    for t in tasks {
                        t.await??;
                    }
                    let mut r = raw.accept_uni().await?;
                    let v = r.read_to_end(8).await?;
                    Ok::<_, anyhow::Error>(u64::from_le_bytes(v[..8].try_into()?))
                })?;
                let _ = h;
                Ok(t0.elapsed())
            };
            let g = point(format!("quinn x{k}"), &raw_once)?;
            if g > best.1 {
                best = (format!("plain quinn, {k} stream(s)"), g);
            }
        }
        rows.push(Row {
            transport: "quic".into(),
            method: "tandem link, 4 MiB messages".into(),
            tokens,
            bytes,
            gbps: tandem,
            reference: best.0,
            reference_gbps: Some(best.1),
        });
    }
    drop(link);
    drop(peer);
    Ok(rows)
}
