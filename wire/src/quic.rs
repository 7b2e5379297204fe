//! QUIC endpoints between cluster nodes: mutual TLS 1.3 against the cluster
//! CA, keep-alives so a silent peer is noticed, and the versioned handshake
//! ([`Hello`] → [`HelloReply`]) on the first stream of every connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;

use std::collections::HashMap;

use crate::codec::{read_frame, write_frame};
use crate::error::{Result, WireError};
use crate::messages::{Hello, HelloReply, ProcessId, Role, ALPN, PROTOCOL_VERSION};
use crate::tls::{claim_of, role_kind, NodeIdentity};

/// Who may link: every node of the cluster file, with its role.
pub type Roster = HashMap<String, Role>;

/// A node's side of handshakes: what it says, and whom it admits. Every
/// peer must present a certificate naming the node and role its hello
/// claims; with a roster, that node must also be in the cluster file in
/// exactly that role.
#[derive(Debug, Clone)]
pub struct Me {
    pub hello: Hello,
    pub roster: Option<Arc<Roster>>,
}

impl From<Hello> for Me {
    fn from(hello: Hello) -> Me {
        Me::anyone(hello)
    }
}

impl Me {
    /// Admits any node whose certificate matches its hello (tools, tests).
    pub fn anyone(hello: Hello) -> Me {
        Me {
            hello,
            roster: None,
        }
    }
}

/// Whether the peer on `conn` is who it claims: its certificate names
/// `node` in `role`, and the roster (if any) has it so.
fn check_peer(
    conn: &quinn::Connection,
    node: &str,
    role: &Role,
    roster: Option<&Roster>,
) -> std::result::Result<(), String> {
    let certs = conn
        .peer_identity()
        .and_then(|i| {
            i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .ok_or("the peer presented no certificate")?;
    let cert = certs.first().ok_or("the peer presented no certificate")?;
    admit(cert, node, role, roster)
}

/// Whether a peer whose (CA-verified) certificate is `cert` may be `node`
/// in `role`: the certificate must name exactly that node and role, and
/// the cluster file (`roster`, where known) must list it so.
pub fn admit(
    cert: &[u8],
    node: &str,
    role: &Role,
    roster: Option<&Roster>,
) -> std::result::Result<(), String> {
    let (cert_role, cert_node) = claim_of(cert).map_err(|e| e.to_string())?;
    if cert_node != node || cert_role != role_kind(role) {
        return Err(format!(
            "its certificate is for {cert_role} {cert_node:?}, but it claims to be {} {node:?}",
            role_kind(role)
        ));
    }
    if let Some(r) = roster {
        match r.get(node) {
            Some(want) if want == role => {}
            Some(want) => {
                return Err(format!(
                    "{node:?} is {want:?} in the cluster file, not {role:?}"
                ));
            }
            None => return Err(format!("{node:?} is not a node of the cluster file")),
        }
    }
    Ok(())
}

/// Liveness settings of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    pub keep_alive: Duration,
    /// A peer silent this long is gone: its connection closes with a timeout.
    pub idle_timeout: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            keep_alive: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(1000),
        }
    }
}

fn tls_err(e: impl std::fmt::Display) -> WireError {
    WireError::Tls(e.to_string())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(id: &NodeIdentity) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    roots.add(id.ca.clone()).map_err(tls_err)?;
    Ok(Arc::new(roots))
}

fn transport(l: Liveness) -> Result<Arc<quinn::TransportConfig>> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(l.keep_alive));
    t.max_idle_timeout(Some(
        l.idle_timeout
            .try_into()
            .map_err(|e| WireError::Tls(format!("idle timeout: {e}")))?,
    ));
    // Windows sized for KV transfers on fast links: a 16 MiB stream window
    // keeps a few chunks in flight instead of stalling every 1.25 MB.
    t.stream_receive_window((16u32 << 20).into());
    t.receive_window((64u32 << 20).into());
    t.send_window(64 << 20);
    // Probe for large datagrams: on loopback and jumbo-frame links a path
    // MTU far above 1500 cuts the packets (and syscalls) per KV block.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(65_000);
    t.mtu_discovery_config(Some(mtu));
    Ok(Arc::new(t))
}

/// Server side: presents the node's certificate and requires the peer's,
/// signed by the cluster CA.
pub fn server_config(id: &NodeIdentity, l: Liveness) -> Result<quinn::ServerConfig> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(id)?, provider())
            .build()
            .map_err(tls_err)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(tls_err)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(l)?);
    Ok(cfg)
}

/// Client side: trusts only the cluster CA and presents the node's certificate.
pub fn client_config(id: &NodeIdentity, l: Liveness) -> Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(roots(id)?)
        .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(tls_err)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport(l)?);
    Ok(cfg)
}

/// An endpoint that accepts cluster peers on `addr` and connects to others.
/// Must be called inside a tokio runtime.
pub fn endpoint(addr: SocketAddr, id: &NodeIdentity, l: Liveness) -> Result<quinn::Endpoint> {
    let mut ep = quinn::Endpoint::server(server_config(id, l)?, addr)
        .map_err(|e| WireError::Connection(format!("cannot listen on {addr}: {e}")))?;
    ep.set_default_client_config(client_config(id, l)?);
    Ok(ep)
}

/// An endpoint that only connects (tools, the gateway's outbound side).
pub fn client_endpoint(id: &NodeIdentity, l: Liveness) -> Result<quinn::Endpoint> {
    let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
    let mut ep = quinn::Endpoint::client(bind)
        .map_err(|e| WireError::Connection(format!("cannot open a client endpoint: {e}")))?;
    ep.set_default_client_config(client_config(id, l)?);
    Ok(ep)
}

/// A connection after the handshake, with the stream it ran on, which stays
/// open for the messages that follow (see [`crate::link`]).
pub struct Handshaken {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

/// Connects to `peer` (whose certificate must name `peer_name`) and runs the
/// handshake; returns the connection and the peer's role.
pub async fn connect(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    peer_name: &str,
    me: &Me,
) -> Result<(quinn::Connection, Role)> {
    let (mut h, role, _) = connect_stream(ep, addr, peer_name, me).await?;
    let _ = h.send.finish();
    Ok((h.conn, role))
}

/// [`connect`], keeping the handshake stream open.
pub async fn connect_stream(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    peer_name: &str,
    me: &Me,
) -> Result<(Handshaken, Role, ProcessId)> {
    let hello = &me.hello;
    let conn = ep
        .connect(addr, peer_name)
        .map_err(|e| {
            WireError::Connection(format!("cannot connect to {peer_name} at {addr}: {e}"))
        })?
        .await
        .map_err(|e| WireError::Connection(format!("{peer_name} at {addr}: {e}")))?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| WireError::Connection(e.to_string()))?;
    write_frame(&mut send, hello).await?;
    let reply: HelloReply = read_frame(&mut recv, 1 << 16)
        .await?
        .ok_or_else(|| WireError::Refused("the peer closed the handshake stream".into()))?;
    match reply {
        HelloReply::Accepted {
            protocol,
            role,
            process,
            node,
        } if protocol == PROTOCOL_VERSION => {
            let who = if node == peer_name {
                check_peer(&conn, &node, &role, me.roster.as_deref())
            } else {
                Err(format!("it answers as {node:?}"))
            };
            if let Err(why) = who {
                conn.close(1u32.into(), b"not who it claims");
                return Err(WireError::Refused(format!("{peer_name} at {addr}: {why}")));
            }
            Ok((Handshaken { conn, send, recv }, role, process))
        }
        HelloReply::Accepted { protocol, .. } => Err(WireError::Version {
            ours: PROTOCOL_VERSION,
            theirs: protocol,
        }),
        HelloReply::Refused { reason, .. } => Err(WireError::Refused(reason)),
    }
}

/// Accepts the handshake on a new incoming connection: checks protocol
/// version and cluster name, answers, and returns the peer's [`Hello`].
pub async fn accept(incoming: quinn::Incoming, me: &Me) -> Result<(quinn::Connection, Hello)> {
    let (mut h, hello) = accept_stream(incoming, me).await?;
    let _ = h.send.finish();
    Ok((h.conn, hello))
}

/// [`accept`], keeping the handshake stream open.
pub async fn accept_stream(incoming: quinn::Incoming, me_: &Me) -> Result<(Handshaken, Hello)> {
    let me = &me_.hello;
    let conn = incoming
        .await
        .map_err(|e| WireError::Connection(format!("incoming connection failed: {e}")))?;
    let (mut send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|e| WireError::Connection(e.to_string()))?;
    let hello: Hello = read_frame(&mut recv, 1 << 16)
        .await?
        .ok_or_else(|| WireError::Refused("the peer sent no hello".into()))?;
    let refuse = if hello.protocol != PROTOCOL_VERSION {
        Some(format!(
            "protocol {} is not {PROTOCOL_VERSION}",
            hello.protocol
        ))
    } else if hello.cluster != me.cluster {
        Some(format!(
            "cluster '{}' is not '{}'",
            hello.cluster, me.cluster
        ))
    } else {
        check_peer(&conn, &hello.node, &hello.role, me_.roster.as_deref()).err()
    };
    match refuse {
        Some(reason) => {
            write_frame(
                &mut send,
                &HelloReply::Refused {
                    protocol: PROTOCOL_VERSION,
                    reason: reason.clone(),
                },
            )
            .await?;
            let _ = send.finish();
            // Give the reply a moment to leave before the connection closes.
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(200), send.stopped()).await;
            conn.close(1u32.into(), b"refused");
            if hello.protocol != PROTOCOL_VERSION {
                return Err(WireError::Version {
                    ours: PROTOCOL_VERSION,
                    theirs: hello.protocol,
                });
            }
            Err(WireError::Refused(reason))
        }
        None => {
            write_frame(
                &mut send,
                &HelloReply::Accepted {
                    protocol: PROTOCOL_VERSION,
                    node: me.node.clone(),
                    role: me.role.clone(),
                    process: me.process.clone(),
                },
            )
            .await?;
            Ok((Handshaken { conn, send, recv }, hello))
        }
    }
}
