//! Node-to-node QUIC: mutual TLS against the cluster CA, the versioned
//! handshake, and noticing a peer that went silent.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tandem_wire::codec::{read_frame, write_frame, MAX_FRAME};
use tandem_wire::messages::{Hello, Role, PROTOCOL_VERSION};
use tandem_wire::quic::{self, Liveness};
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
fn serve_one(ep: quinn::Endpoint, me: Hello) -> tokio::task::JoinHandle<Result<Hello, WireError>> {
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
        ca.identity("decode-0", &[LOCAL]).expect("cert"),
        ca.identity("gateway", &[LOCAL]).expect("cert"),
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
    let (conn, role) = quic::connect(&client, addr, "decode-0", &hello("gateway", Role::Gateway))
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

#[tokio::test]
async fn a_node_without_a_cluster_certificate_is_refused() {
    let ca = ClusterCa::generate("test").expect("ca");
    let foreign = ClusterCa::generate("test").expect("another ca with the same name");
    let server_id = ca.identity("decode-0", &[LOCAL]).expect("cert");
    let intruder = foreign.identity("gateway", &[LOCAL]).expect("cert");
    let server = quic::endpoint(any_port(), &server_id, Liveness::default()).expect("listen");
    let addr = server.local_addr().expect("bound");
    let task = serve_one(
        server,
        hello("decode-0", Role::Decode { group: "d".into() }),
    );
    let client = quic::client_endpoint(&intruder, Liveness::default()).expect("client");
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        quic::connect(&client, addr, "decode-0", &hello("gateway", Role::Gateway)),
    )
    .await
    .expect("refusal, not a hang");
    assert!(r.is_err(), "a foreign certificate must not get a session");
    let server_side = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("server returns")
        .expect("task");
    assert!(server_side.is_err(), "the server refused the peer");
}

#[tokio::test]
async fn other_versions_and_clusters_are_refused_at_the_handshake() {
    let ca = ClusterCa::generate("test").expect("ca");
    for (mut h, want) in [
        (hello("gateway", Role::Gateway), "is not 2"),
        (
            Hello {
                cluster: "other".into(),
                ..hello("gateway", Role::Gateway)
            },
            "cluster 'other'",
        ),
    ] {
        if want == "is not 2" {
            h.protocol = PROTOCOL_VERSION + 1;
        }
        let (server_id, client_id) = pair(&ca);
        let server = quic::endpoint(any_port(), &server_id, Liveness::default()).expect("listen");
        let addr = server.local_addr().expect("bound");
        let task = serve_one(
            server,
            hello("decode-0", Role::Decode { group: "d".into() }),
        );
        let client = quic::client_endpoint(&client_id, Liveness::default()).expect("client");
        let err = quic::connect(&client, addr, "decode-0", &h)
            .await
            .err()
            .expect("refused");
        let msg = err.to_string();
        assert!(
            msg.contains(want) || matches!(err, WireError::Version { .. }),
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
                &hello("decode-0", Role::Decode { group: "d".into() }),
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
    let (conn, _) = quic::connect(&client, addr, "decode-0", &hello("gateway", Role::Gateway))
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
        ("gateway".to_string(), vec![LOCAL]),
        ("decode-0".to_string(), vec![LOCAL]),
    ];
    tls::write_cluster_certs(&dir, "test", &nodes).expect("write");
    let a = tls::load_identity(&dir, "gateway").expect("load");
    // Issuing more later reuses the CA on disk.
    tls::write_cluster_certs(&dir, "test", &[("prefill-0".to_string(), vec![LOCAL])])
        .expect("more");
    let b = tls::load_identity(&dir, "prefill-0").expect("load");
    assert_eq!(a.ca, b.ca, "one CA for the cluster");
    assert!(tls::load_identity(&dir, "nobody").is_err());
    std::fs::remove_dir_all(&dir).ok();
}
