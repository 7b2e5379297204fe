//! What every node process starts from: the validated cluster, its own name
//! and certificate, and the liveness settings the cluster file asks for.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Cluster;
use crate::error::{Result, WireError};
use crate::link::Link;
use crate::messages::{Hello, Load, Message, Role, PROTOCOL_VERSION};
use crate::metrics::NodeMetrics;
use crate::quic::Liveness;
use crate::tls::{load_identity, NodeIdentity};

/// Why a node process could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Model(#[from] tandem_model::ModelError),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// The small tokio runtime a node's links run on (compute has its own threads).
pub fn io_runtime(node: &str) -> std::result::Result<tokio::runtime::Runtime, NodeError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name(format!("{node}-io"))
        .build()
        .map_err(|e| NodeError::Setup(format!("cannot start the I/O runtime: {e}")))
}

pub struct NodeSetup {
    pub cluster: Cluster,
    pub name: String,
    pub identity: NodeIdentity,
}

impl NodeSetup {
    /// Loads `name`'s certificate from the directory `[cluster] certs` names.
    pub fn new(cluster: Cluster, name: &str) -> Result<NodeSetup> {
        let Some(dir) = cluster.file.cluster.certs.clone() else {
            return Err(WireError::Cert(
                "[cluster] certs is not set; create certificates with `tandem certs --config FILE` and name their directory there".into(),
            ));
        };
        let identity = load_identity(&dir, name)?;
        Ok(NodeSetup {
            cluster,
            name: name.to_string(),
            identity,
        })
    }

    /// This node's side of handshakes: its hello, admitting only the
    /// cluster file's nodes in their roles.
    pub fn me(&self, role: Role) -> crate::quic::Me {
        crate::quic::Me {
            hello: self.hello(role),
            roster: Some(std::sync::Arc::new(self.roster())),
        }
    }

    /// Every node of the cluster file, with its role.
    pub fn roster(&self) -> crate::quic::Roster {
        let f = &self.cluster.file;
        let mut r = crate::quic::Roster::new();
        r.insert(f.gateway.name.clone(), Role::Gateway);
        for d in &f.decode {
            r.insert(
                d.name.clone(),
                Role::Decode {
                    group: d.name.clone(),
                },
            );
        }
        for p in &f.prefill {
            for (i, s) in p.stages.iter().enumerate() {
                r.insert(
                    s.name.clone(),
                    Role::Prefill {
                        pipeline: p.name.clone(),
                        stage: i as u32,
                    },
                );
            }
        }
        r
    }

    pub fn hello(&self, role: Role) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            cluster: self.cluster.file.cluster.name.clone(),
            node: self.name.clone(),
            role,
            process: this_process(),
        }
    }

    /// Keep-alives at the heartbeat period; a peer silent for `down_after_ms` is gone.
    pub fn liveness(&self) -> Liveness {
        let l = &self.cluster.file.limits;
        Liveness {
            keep_alive: Duration::from_millis(l.heartbeat_ms.max(10)),
            idle_timeout: Duration::from_millis(l.down_after_ms.max(100)),
        }
    }

    pub fn heartbeat_period(&self) -> Duration {
        Duration::from_millis(self.cluster.file.limits.heartbeat_ms.max(10))
    }
}

/// Where a node's load and its link to the gateway meet the heartbeat task.
#[derive(Default)]
pub struct Beat {
    pub load: Load,
    pub gateway: Option<Link>,
    /// For a node whose work runs in one loop: when the loop last turned,
    /// and how long it may go without turning. A heartbeat then proves the
    /// loop is alive, not only this task: while the loop is stuck, none go
    /// out, and the gateway drops the node as lost.
    pub turned: Option<Instant>,
    pub stall: Option<Duration>,
}

impl Beat {
    /// The loop is stuck past its allowance: how long since it turned.
    pub fn stalled(&self) -> Option<Duration> {
        let (t, limit) = (self.turned?, self.stall?);
        let since = t.elapsed();
        (since > limit).then_some(since)
    }
}

/// Sends `Heartbeat { load }` to the gateway every `period` while linked
/// (and while the node's loop turns, for a node that says it has one).
pub fn spawn_heartbeat(node: String, period: Duration, beat: Arc<Mutex<Beat>>) {
    tokio::spawn(async move {
        let mut seq = 0u64;
        let mut tick = tokio::time::interval(period);
        let mut warned = false;
        loop {
            tick.tick().await;
            let (load, link, stalled) = {
                let b = beat.lock().expect("heartbeat state");
                (b.load, b.gateway.clone(), b.stalled())
            };
            if let Some(since) = stalled {
                if !warned {
                    tracing::error!(
                        "{node}: the scheduling loop has not turned for {} ms: no more heartbeats until it does",
                        since.as_millis()
                    );
                    warned = true;
                }
                continue;
            }
            if warned {
                tracing::warn!("{node}: the scheduling loop turns again");
                warned = false;
            }
            if let Some(link) = link {
                seq += 1;
                let _ = link.try_send(Message::Heartbeat {
                    node: node.clone(),
                    seq,
                    load,
                });
            }
        }
    });
}

/// Answers probes on `addr` (Kubernetes, load balancers): `GET /health` is
/// 200 while the node is linked to the gateway and 503 before (readiness);
/// `GET /live` is 200 while the process serves (liveness). Both are 503
/// while the node's scheduling loop is stuck ([`Beat::stalled`]). The body
/// names the node and its load. `GET /metrics` is the node's own metrics
/// in Prometheus' text format. A node has no other HTTP surface.
pub fn spawn_health(
    addr: std::net::SocketAddr,
    node: String,
    beat: Arc<Mutex<Beat>>,
    metrics: Arc<NodeMetrics>,
) {
    tokio::spawn(async move {
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("{node}: cannot serve health checks on {addr}: {e}");
                return;
            }
        };
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let (load, linked, stalled) = {
                let b = beat.lock().expect("heartbeat state");
                (
                    b.load,
                    b.gateway.as_ref().is_some_and(|l| !l.is_closed()),
                    b.stalled(),
                )
            };
            let node = node.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                // The whole head (a client may write it in pieces): closing
                // with part of it unread would reset the connection.
                let mut buf = [0u8; 4096];
                let mut n = 0;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match tokio::time::timeout_at(deadline, s.read(&mut buf[n..])).await {
                        Ok(Ok(k)) if k > 0 => n += k,
                        _ => break,
                    }
                }
                if buf[..n].starts_with(b"GET /metrics") {
                    let body = metrics.encode();
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                    return;
                }
                let live = buf[..n].starts_with(b"GET /live");
                let body = serde_json::json!({
                    "node": node,
                    "linked_to_gateway": linked,
                    "running": load.running,
                    "queued": load.queued,
                    "free_blocks": load.free_blocks,
                    "total_blocks": load.total_blocks,
                    "loop_stalled_ms": stalled.map(|d| d.as_millis() as u64),
                })
                .to_string();
                // A stuck loop fails both probes: the orchestrator restarts it.
                let status = if stalled.is_none() && (linked || live) {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.0 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
}

/// Milliseconds since the Unix epoch (request deadlines are in these).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl NodeSetup {
    /// What every prefill and decode node runs beside its links: heartbeats
    /// to the gateway, and probes and `/metrics` on its health address
    /// (`TANDEM_HEALTH_ADDR`, else the cluster file's `health`) when it has
    /// one. Must be called inside the node's runtime.
    pub fn spawn_services(&self, beat: &Arc<Mutex<Beat>>, metrics: Arc<NodeMetrics>) -> Result<()> {
        spawn_heartbeat(self.name.clone(), self.heartbeat_period(), beat.clone());
        if let Some(h) = self.health_addr()? {
            spawn_health(h, self.name.clone(), beat.clone(), metrics);
        }
        Ok(())
    }

    /// This node's health address: `TANDEM_HEALTH_ADDR` if set, else its
    /// `health` in the cluster file.
    pub fn health_addr(&self) -> Result<Option<std::net::SocketAddr>> {
        if let Some(a) = health_env()? {
            return Ok(Some(a));
        }
        match self.cluster.file.health_of(&self.name) {
            Some(a) => a.resolve().map(Some).map_err(|e| {
                WireError::Connection(format!("{}: health address {a}: {e}", self.name))
            }),
            None => Ok(None),
        }
    }

    /// The name clients use for the model: the cluster file's
    /// `served_model_name`, else [`served_name`].
    pub fn model_name(&self, model: &tandem_model::ModelFile) -> String {
        self.cluster
            .file
            .cluster
            .served_model_name
            .clone()
            .unwrap_or_else(|| served_name(model))
    }

    /// The registry this node's `/metrics` serves, for `model`.
    pub fn metrics(&self, role: &str, model: &str) -> Result<Arc<NodeMetrics>> {
        NodeMetrics::new(model, role, &self.name)
            .map(Arc::new)
            .map_err(|e| WireError::Connection(format!("{}: metrics: {e}", self.name)))
    }
}

/// The name a model file is served as: its stem without a quantization tag.
pub fn served_name(model: &tandem_model::ModelFile) -> String {
    let stem = model
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    match stem.rsplit_once('.') {
        Some((base, tag))
            if tag.starts_with('Q') || tag.starts_with('F') || tag.starts_with("BF") =>
        {
            base.to_string()
        }
        _ => stem,
    }
}

/// The health-check address from `TANDEM_HEALTH_ADDR`, if set.
pub fn health_env() -> Result<Option<std::net::SocketAddr>> {
    match std::env::var("TANDEM_HEALTH_ADDR") {
        Ok(v) if !v.is_empty() => v.parse().map(Some).map_err(|_| {
            WireError::Connection(format!(
                "TANDEM_HEALTH_ADDR '{v}' is not an address like 0.0.0.0:9100"
            ))
        }),
        _ => Ok(None),
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A process's start time (clock ticks after boot), from `/proc/PID/stat`.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// This process, as its [`crate::messages::Hello`] names it.
pub fn this_process() -> crate::messages::ProcessId {
    static ME: std::sync::OnceLock<crate::messages::ProcessId> = std::sync::OnceLock::new();
    ME.get_or_init(|| {
        let pid = std::process::id();
        crate::messages::ProcessId {
            boot: boot_id(),
            pid,
            start: start_time(pid).unwrap_or(0),
        }
    })
    .clone()
}

/// Whether `p` is known to be gone: a process of this host's current boot
/// whose pid no longer runs, or runs a process started at another time.
/// `false` when that cannot be known (another host, no `/proc`).
pub fn process_gone(p: &crate::messages::ProcessId) -> bool {
    let me = this_process();
    if p.boot.is_empty() || p.boot != me.boot || p.start == 0 {
        return false;
    }
    start_time(p.pid) != Some(p.start)
}

#[cfg(test)]
mod process_tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_finished_child_is_gone() {
        let me = this_process();
        assert!(me.pid > 0 && me.start > 0 && !me.boot.is_empty());
        assert!(!process_gone(&me));
        let mut child = std::process::Command::new("true").spawn().expect("spawns");
        let pid = child.id();
        let start = start_time(pid);
        child.wait().expect("waits");
        if let Some(start) = start {
            let p = crate::messages::ProcessId {
                boot: me.boot.clone(),
                pid,
                start,
            };
            assert!(process_gone(&p), "a reaped child is gone");
        }
        let elsewhere = crate::messages::ProcessId {
            boot: "another host".into(),
            ..me
        };
        assert!(
            !process_gone(&elsewhere),
            "a process elsewhere is never known gone"
        );
    }
}
