//! `bench kv` over QUIC: the cluster's link carrying `Kv` messages, beside
//! plain quinn streams as the reference.

use super::*;
use tandem_model::BlockId;
use tandem_wire::link::{Link, NetEvent};
use tandem_wire::messages::{ByteBuf, Hello, KvChunk, KvDone, Lease, Message, RequestId, Role};
use tandem_wire::quic::Me;

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
        process: tandem_wire::node::this_process(),
    }
}

/// Accepts connections: one named "link" runs the cluster's link and echoes
/// each completion notice; others ("raw") read streams of bytes and answer
/// each batch (its first 8 bytes say how many streams it has) with its hash.
pub(super) fn quic_receiver() -> Result<()> {
    let dir = std::path::PathBuf::from(std::env::var("TANDEM_BENCH_CERTS")?);
    let id = tandem_wire::tls::load_identity(&dir, "decode")?;
    let rt = runtime()?;
    rt.block_on(async move {
        let ep = tandem_wire::quic::endpoint("127.0.0.1:0".parse()?, &id, Default::default())?;
        println!("{}", ep.local_addr()?.port());
        std::io::stdout().flush()?;
        // The sender opens the link first, then the raw connection.
        let mut accepted = 0;
        while let Some(inc) = ep.accept().await {
            let (h, peer) =
                tandem_wire::quic::accept_stream(inc, &Me::anyone(hello("decode"))).await?;
            accepted += 1;
            if accepted == 1 {
                tokio::spawn(async move {
                    let (tx, rx) = mpsc::channel();
                    let link =
                        Link::start(h, "link".into(), Role::Client, peer.process.clone(), tx);
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

pub(super) fn quic_rows(a: &BenchKvArgs, block: usize, _max_blocks: usize) -> Result<Vec<Row>> {
    let dir = std::env::temp_dir().join(format!("tandem-bench-kv-{}", std::process::id()));
    let ips = vec!["127.0.0.1".parse()?];
    tandem_wire::tls::write_cluster_certs(
        &dir,
        "bench-kv",
        &[
            ("decode".to_string(), "client", ips.clone()),
            ("prefill".to_string(), "client", ips),
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
        let (h, _, _) =
            tandem_wire::quic::connect_stream(&ep, addr, "decode", &Me::anyone(hello("prefill")))
                .await?;
        Ok::<_, anyhow::Error>(Link::start(
            h,
            "decode".into(),
            Role::Client,
            Default::default(),
            tx,
        ))
    })?;
    let raw = rt.block_on(async {
        let (h, _, _) =
            tandem_wire::quic::connect_stream(&ep, addr, "decode", &Me::anyone(hello("prefill")))
                .await?;
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
            let gbps = timed(iters_for(a, bytes), bytes, once)?;
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
            ratio: Some(tandem / best.1),
            rounds: vec![(tandem, Some(best.1))],
        });
    }
    drop(link);
    drop(peer);
    Ok(rows)
}
