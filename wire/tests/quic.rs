//! Node-to-node QUIC: mutual TLS against the cluster CA, the versioned
//! handshake, and noticing a peer that went silent.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tandem_wire::codec::{read_frame, write_frame, MAX_FRAME};
use tandem_wire::messages::{Hello, Role, PROTOCOL_VERSION};
use tandem_wire::quic::{self, Liveness, Me, Roster};
use tandem_wire::tls::{self, ClusterCa, NodeIdentity};
use tandem_wire::WireError;

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn hello(node: &str, role: Role) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        cluster: "test".into(),
        node: node.into(),
        role,
        process: tandem_wire::node::this_process(),
    }
}

fn any_port() -> SocketAddr {
    (LOCAL, 0).into()
}

/// Accepts one connection, answers the handshake, echoes one frame back.
fn serve_one(
    ep: quinn::Endpoint,
    me: impl Into<Me>,
) -> tokio::task::JoinHandle<Result<Hello, WireError>> {
    let me: Me = me.into();
    tokio::spawn(async move {
        let incoming = ep
            .accept()
            .await
            .ok_or_else(|| WireError::Connection("endpoint closed".into()))?;
        let (conn, peer) = quic::accept(incoming, &me).await?;
        if let Ok((mut send, mut recv)) = conn.accept_bi().await {
            if let Some(msg) = read_frame::<_, String>(&mut recv, MAX_FRAME).await? {
                write_frame(&mut send, &format!("echo: {msg}")).await?;
                let _ = send.finish();
                let _ = conn.closed().await;
            }
        }
        Ok(peer)
    })
}

fn pair(ca: &ClusterCa) -> (NodeIdentity, NodeIdentity) {
    (
        ca.identity("decode-0", "decode", &[LOCAL]).expect("cert"),
        ca.identity("gateway", "gateway", &[LOCAL]).expect("cert"),
    )
}

#[tokio::test]
async fn cluster_nodes_connect_and_talk() {
    let ca = ClusterCa::generate("test").expect("ca");
    let (server_id, client_id) = pair(&ca);
    let server = quic::endpoint(any_port(), &server_id, Liveness::default()).expect("listen");
    let addr = server.local_addr().expect("bound");
    let task = serve_one(
        server,
        hello(
            "decode-0",
            Role::Decode {
                group: "decode-0".into(),
            },
        ),
    );
    let client = quic::client_endpoint(&client_id, Liveness::default()).expect("client");
    let (conn, role) = quic::connect(
        &client,
        addr,
        "decode-0",
        &hello("gateway", Role::Gateway).into(),
    )
    .await
    .expect("handshake");
    assert_eq!(
        role,
        Role::Decode {
            group: "decode-0".into()
        }
    );
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    write_frame(&mut send, &"hi".to_string())
        .await
        .expect("send");
    let _ = send.finish();
    let reply: Option<String> = read_frame(&mut recv, MAX_FRAME).await.expect("reply");
    assert_eq!(reply.as_deref(), Some("echo: hi"));
    conn.close(0u32.into(), b"done");
    let peer = task.await.expect("task").expect("server side");
    assert_eq!(peer.node, "gateway");
}

/// A certificate from another CA is refused by the server: the intruder
/// itself trusts the cluster's CA (so it would accept the server), and
/// it is the server that must turn it away.
#[tokio::test]
async fn a_node_without_a_cluster_certificate_is_refused() {
    let ca = ClusterCa::generate("test").expect("ca");
    let foreign = ClusterCa::generate("test").expect("another ca with the same name");
    let server_id = ca.identity("decode-0", "decode", &[LOCAL]).expect("cert");
    let mut intruder = foreign
        .identity("gateway", "gateway", &[LOCAL])
        .expect("cert");
    intruder.ca = ca.cert_der().clone();
    let server = quic::endpoint(any_port(), &server_id, Liveness::default()).expect("listen");
    let addr = server.local_addr().expect("bound");
    let task = serve_one(
        server,
        hello("decode-0", Role::Decode { group: "d".into() }),
    );
    let client = quic::client_endpoint(&intruder, Liveness::default()).expect("client");
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        quic::connect(
            &client,
            addr,
            "decode-0",
            &hello("gateway", Role::Gateway).into(),
        ),
    )
    .await
    .expect("refusal, not a hang");
    assert!(r.is_err(), "a foreign certificate must not get a session");
    let server_side = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("server returns")
        .expect("task");
    let e = server_side.expect_err("the server refused the peer");
    let msg = e.to_string().to_lowercase();
    assert!(
        msg.contains("certificate") || msg.contains("issuer") || msg.contains("connection"),
        "refused for its certificate: {e}"
    );
}

/// A cluster certificate for one node cannot be used to claim another
/// node or another role, and a node the cluster file does not list, or
/// lists in another role, is refused even with a matching certificate.
#[tokio::test]
async fn a_node_can_only_be_who_its_certificate_says() {
    let ca = ClusterCa::generate("test").expect("ca");
    let server_id = ca.identity("decode-0", "decode", &[LOCAL]).expect("cert");
    let mut roster = Roster::new();
    roster.insert("gateway".into(), Role::Gateway);
    roster.insert(
        "decode-0".into(),
        Role::Decode {
            group: "decode-0".into(),
        },
    );
    roster.insert(
        "p0-s0".into(),
        Role::Prefill {
            pipeline: "p0".into(),
            stage: 0,
        },
    );
    let me = Me {
        hello: hello(
            "decode-0",
            Role::Decode {
                group: "decode-0".into(),
            },
        ),
        roster: Some(std::sync::Arc::new(roster)),
    };
    let cases: Vec<(NodeIdentity, Hello, &str)> = vec![
        // A stage's certificate claiming to be the gateway.
        (
            ca.identity("p0-s0", "prefill", &[LOCAL]).expect("cert"),
            hello("gateway", Role::Gateway),
            "certificate is for prefill \"p0-s0\"",
        ),
        // The right name in another role.
        (
            ca.identity("p0-s0", "prefill", &[LOCAL]).expect("cert"),
            hello(
                "p0-s0",
                Role::Decode {
                    group: "p0-s0".into(),
                },
            ),
            "claims to be decode",
        ),
        // A genuine certificate for a node the cluster file does not have.
        (
            ca.identity("d9", "decode", &[LOCAL]).expect("cert"),
            hello("d9", Role::Decode { group: "d9".into() }),
            "not a node of the cluster file",
        ),
        // Listed, but as a stage of another pipeline.
        (
            ca.identity("p0-s0", "prefill", &[LOCAL]).expect("cert"),
            hello(
                "p0-s0",
                Role::Prefill {
                    pipeline: "p1".into(),
                    stage: 0,
                },
            ),
            "in the cluster file",
        ),
    ];
    for (id, claim, want) in cases {
        let server = quic::endpoint(any_port(), &server_id, Liveness::default()).expect("listen");
        let addr = server.local_addr().expect("bound");
        let task = serve_one(server, me.clone());
        let client = quic::client_endpoint(&id, Liveness::default()).expect("client");
        let r = quic::connect(&client, addr, "decode-0", &claim.clone().into()).await;
        assert!(r.is_err(), "{claim:?} got a session");
        let e = task.await.expect("task").expect_err("refused");
        assert!(e.to_string().contains(want), "{claim:?}: {e}");
    }
    // The one it is: admitted.
    let server = quic::endpoint(any_port(), &server_id, Liveness::default()).expect("listen");
    let addr = server.local_addr().expect("bound");
    let task = serve_one(server, me.clone());
    let id = ca.identity("p0-s0", "prefill", &[LOCAL]).expect("cert");
    let client = quic::client_endpoint(&id, Liveness::default()).expect("client");
    let claim = hello(
        "p0-s0",
        Role::Prefill {
            pipeline: "p0".into(),
            stage: 0,
        },
    );
    let (conn, _) = quic::connect(&client, addr, "decode-0", &claim.into())
        .await
        .expect("admitted");
    conn.close(0u32.into(), b"done");
    let _ = task.await;
}

#[tokio::test]
async fn other_versions_and_clusters_are_refused_at_the_handshake() {
    let ca = ClusterCa::generate("test").expect("ca");
    for (mut h, want) in [
        (hello("gateway", Role::Gateway), "version".to_string()),
        (
            Hello {
                cluster: "other".into(),
                ..hello("gateway", Role::Gateway)
            },
            "cluster 'other'".to_string(),
        ),
    ] {
        let want = if want == "version" {
            h.protocol = PROTOCOL_VERSION + 1;
            format!(
                "protocol {} is not {PROTOCOL_VERSION}",
                PROTOCOL_VERSION + 1
            )
        } else {
            want
        };
        let (server_id, client_id) = pair(&ca);
        let server = quic::endpoint(any_port(), &server_id, Liveness::default()).expect("listen");
        let addr = server.local_addr().expect("bound");
        let task = serve_one(
            server,
            hello("decode-0", Role::Decode { group: "d".into() }),
        );
        let client = quic::client_endpoint(&client_id, Liveness::default()).expect("client");
        let err = quic::connect(&client, addr, "decode-0", &h.into())
            .await
            .expect_err("refused");
        let msg = err.to_string();
        assert!(
            msg.contains(&want) || matches!(err, WireError::Version { .. }),
            "{msg}"
        );
        assert!(task.await.expect("task").is_err());
    }
}

#[tokio::test]
async fn a_silent_peer_is_noticed() {
    let ca = ClusterCa::generate("test").expect("ca");
    let (server_id, client_id) = pair(&ca);
    let live = Liveness {
        keep_alive: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(500),
    };
    // The peer runs on a runtime of its own, which is then shut down: its
    // connection neither answers nor says goodbye, as after a kill -9.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (up_tx, up_rx) = std::sync::mpsc::channel();
    let peer = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.spawn(async move {
            let server = quic::endpoint(any_port(), &server_id, live).expect("listen");
            addr_tx
                .send(server.local_addr().expect("bound"))
                .expect("send addr");
            let incoming = server.accept().await.expect("incoming");
            let (conn, _) = quic::accept(
                incoming,
                &hello("decode-0", Role::Decode { group: "d".into() }).into(),
            )
            .await
            .expect("handshake");
            std::future::pending::<()>().await;
            drop((conn, server));
        });
        // Wait until the client has its handshake, then fall silent.
        up_rx.recv().expect("client connected");
        rt.shutdown_background();
    });
    let addr = tokio::task::spawn_blocking(move || addr_rx.recv().expect("addr"))
        .await
        .expect("addr");
    let client = quic::client_endpoint(&client_id, live).expect("client");
    let (conn, _) = quic::connect(
        &client,
        addr,
        "decode-0",
        &hello("gateway", Role::Gateway).into(),
    )
    .await
    .expect("handshake");
    up_tx.send(()).expect("signal the peer");
    tokio::task::spawn_blocking(move || peer.join().expect("peer thread"))
        .await
        .expect("join");
    let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the silence is noticed");
    assert!(
        matches!(reason, quinn::ConnectionError::TimedOut),
        "{reason:?}"
    );
}

#[test]
fn certificates_written_to_disk_load_back() {
    let dir = std::env::temp_dir().join(format!("tandem-certs-{}", std::process::id()));
    let nodes = vec![
        ("gateway".to_string(), "gateway", vec![LOCAL]),
        ("decode-0".to_string(), "decode", vec![LOCAL]),
    ];
    tls::write_cluster_certs(&dir, "test", &nodes).expect("write");
    let a = tls::load_identity(&dir, "gateway").expect("load");
    // Issuing more later reuses the CA on disk.
    tls::write_cluster_certs(
        &dir,
        "test",
        &[("prefill-0".to_string(), "prefill", vec![LOCAL])],
    )
    .expect("more");
    let b = tls::load_identity(&dir, "prefill-0").expect("load");
    assert_eq!(a.ca, b.ca, "one CA for the cluster");
    assert!(tls::load_identity(&dir, "nobody").is_err());
    std::fs::remove_dir_all(&dir).ok();
}

/// Behind a peer that reads nothing, a link's data queue fills and data is
/// refused, but a control message (here a cancel) is still taken, and
/// arrives after the data queued before it once the peer reads again.
#[tokio::test]
async fn control_messages_are_never_refused_and_keep_their_order() {
    use tandem_model::BlockId;
    use tandem_wire::link::Link;
    use tandem_wire::messages::{KvChunk, Lease, Message, RequestId};

    let ca = ClusterCa::generate("test").expect("ca");
    let (server_id, client_id) = pair(&ca);
    let server = quic::endpoint(any_port(), &server_id, Liveness::default()).expect("listen");
    let addr = server.local_addr().expect("bound");
    let me: Me = hello(
        "decode-0",
        Role::Decode {
            group: "decode-0".into(),
        },
    )
    .into();
    let accepted = tokio::spawn(async move {
        let incoming = server.accept().await.expect("incoming");
        let r = quic::accept_stream(incoming, &me).await.expect("handshake");
        (server, r)
    });
    let client = quic::client_endpoint(&client_id, Liveness::default()).expect("client");
    let (h, role, process) = quic::connect_stream(
        &client,
        addr,
        "decode-0",
        &hello("gateway", Role::Gateway).into(),
    )
    .await
    .expect("connect");
    let (_server, (mut theirs, _)) = accepted.await.expect("task");
    let (events, _ev) = std::sync::mpsc::channel();
    let link = Link::start(h, "decode-0".into(), role, process, events);
    let chunk = |i: u64| {
        Message::Kv(KvChunk {
            id: RequestId(i),
            lease: Lease(1),
            stage: 0,
            rank: 0,
            blocks: vec![(
                BlockId(0),
                serde_bytes::ByteBuf::from(vec![7u8; 256 * 1024]),
            )],
        })
    };
    // Fill the link: the stream's window, then the data queue.
    let mut sent = 0u64;
    loop {
        assert!(sent < 10_000, "the data queue never filled");
        if link.try_send(chunk(sent)).is_err() {
            break;
        }
        sent += 1;
        tokio::task::yield_now().await;
    }
    link.try_send(Message::Cancel { id: RequestId(42) })
        .expect("a control message is taken while data is refused");
    // The peer reads again: every chunk, in order, then the cancel.
    for i in 0..sent {
        let m: Message = read_frame(&mut theirs.recv, MAX_FRAME)
            .await
            .expect("read")
            .expect("a message");
        match m {
            Message::Kv(k) => assert_eq!(k.id, RequestId(i)),
            other => panic!("expected chunk {i}, got {other:?}"),
        }
    }
    let m: Message = read_frame(&mut theirs.recv, MAX_FRAME)
        .await
        .expect("read")
        .expect("the cancel");
    assert_eq!(m, Message::Cancel { id: RequestId(42) });
}
