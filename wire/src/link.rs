//! A link: one connection to one peer after the handshake, carrying
//! [`Message`]s in order on the handshake's stream in both directions.
//!
//! Every node funnels what all its links receive into one channel of
//! [`NetEvent`]s (a link coming up, a message, a link going down), so a
//! node's logic is one loop over one channel. Dialers reconnect with backoff
//! for as long as the node runs; a link that goes down reports why, with its
//! id, so a late report about an old link cannot take down its replacement.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::addr::NodeAddr;
use crate::codec::{read_frame, write_frame, MAX_FRAME};
use crate::error::{Result, WireError};
use crate::messages::{Message, ProcessId, Role};
use crate::quic::{accept_stream, connect_stream, Handshaken, Me};

/// What a node's links report.
#[derive(Debug)]
pub enum NetEvent {
    Up {
        link: Link,
        role: Role,
        /// The peer's process, from its handshake.
        process: ProcessId,
    },
    Message {
        peer: String,
        link: u64,
        msg: Message,
    },
    Down {
        peer: String,
        link: u64,
        reason: String,
    },
}

pub type Events = std_mpsc::Sender<NetEvent>;

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

/// The sending side of a link; cheap to clone.
#[derive(Debug, Clone)]
pub struct Link {
    pub id: u64,
    pub peer: String,
    /// One FIFO for everything, so no message overtakes another.
    tx: mpsc::UnboundedSender<Queued>,
    /// Data messages take a credit before they queue and the writer
    /// returns it once written: at most [`QUEUE`] wait, and senders of
    /// data wait (or fail with `try_send`) behind a slow peer. Control
    /// messages take none, so they are never refused for a full queue.
    credits: mpsc::Sender<()>,
    conn: quinn::Connection,
}

enum Queued {
    Data(Message),
    Control(Message),
}

/// Data messages queued per link before senders wait: enough to keep a
/// transfer streaming, few enough that a slow peer pushes back on its
/// senders.
const QUEUE: usize = 64;

impl Link {
    /// Starts the writer and reader tasks of a handshaken connection and
    /// reports it [`NetEvent::Up`]. Must be called inside a tokio runtime.
    pub fn start(
        h: Handshaken,
        peer: String,
        role: Role,
        process: ProcessId,
        events: Events,
    ) -> Link {
        let id = NEXT_LINK.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel::<Queued>();
        let (credits, mut spent) = mpsc::channel::<()>(QUEUE);
        let Handshaken {
            conn,
            mut send,
            mut recv,
        } = h;
        let link = Link {
            id,
            peer: peer.clone(),
            tx,
            credits,
            conn: conn.clone(),
        };
        let _ = events.send(NetEvent::Up {
            link: link.clone(),
            role,
            process,
        });
        let wconn = conn.clone();
        tokio::spawn(async move {
            while let Some(q) = rx.recv().await {
                let (m, data) = match q {
                    Queued::Data(m) => (m, true),
                    Queued::Control(m) => (m, false),
                };
                if let Err(e) = write_frame(&mut send, &m).await {
                    tracing::debug!("link {id}: write failed: {e}");
                    wconn.close(2u32.into(), b"write failed");
                    return;
                }
                if data {
                    // Its credit was queued before it was: give it back.
                    let _ = spent.try_recv();
                }
            }
            let _ = send.finish();
        });
        tokio::spawn(async move {
            let reason = loop {
                match read_frame::<_, Message>(&mut recv, MAX_FRAME).await {
                    Ok(Some(msg)) => {
                        let ev = NetEvent::Message {
                            peer: peer.clone(),
                            link: id,
                            msg,
                        };
                        if events.send(ev).is_err() {
                            break "the node is stopping".to_string();
                        }
                    }
                    Ok(None) => break "the peer closed the link".to_string(),
                    Err(e) => {
                        // Say why the connection failed when it did (timeout, reset).
                        break match conn.close_reason() {
                            Some(r) => r.to_string(),
                            None => e.to_string(),
                        };
                    }
                }
            };
            conn.close(0u32.into(), b"link closed");
            let _ = events.send(NetEvent::Down {
                peer,
                link: id,
                reason,
            });
        });
        link
    }

    fn closed_err(&self) -> WireError {
        WireError::Connection(format!("link to {} is closed", self.peer))
    }

    fn queue(&self, q: Queued) -> Result<()> {
        self.tx.send(q).map_err(|_| self.closed_err())
    }

    /// Queues a message. Data waits while the link's data queue is full;
    /// a control message ([`Message::is_control`]) never waits.
    pub async fn send(&self, m: Message) -> Result<()> {
        if m.is_control() {
            return self.queue(Queued::Control(m));
        }
        self.credits.send(()).await.map_err(|_| self.closed_err())?;
        self.queue(Queued::Data(m))
    }

    /// [`Link::send`] from a thread outside the runtime (compute threads).
    pub fn blocking_send(&self, m: Message) -> Result<()> {
        if m.is_control() {
            return self.queue(Queued::Control(m));
        }
        self.credits
            .blocking_send(())
            .map_err(|_| self.closed_err())?;
        self.queue(Queued::Data(m))
    }

    /// Queues a message without waiting; data fails when the queue is
    /// full. A control message is never refused while the link is up.
    pub fn try_send(&self, m: Message) -> Result<()> {
        self.try_send_back(m)
            .map_err(|_| WireError::Connection(format!("link to {}: queue full", self.peer)))?;
        if self.tx.is_closed() {
            return Err(self.closed_err());
        }
        Ok(())
    }

    /// Queues a message without waiting; gives data back when the queue
    /// is full (control is always queued). A closed link drops it (its
    /// loss is reported as the link going down).
    pub fn try_send_back(&self, m: Message) -> std::result::Result<(), Message> {
        if m.is_control() {
            let _ = self.queue(Queued::Control(m));
            return Ok(());
        }
        match self.credits.try_send(()) {
            Ok(()) => {
                let _ = self.queue(Queued::Data(m));
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(())) => Err(m),
            Err(mpsc::error::TrySendError::Closed(())) => Ok(()),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    pub fn close(&self, why: &str) {
        self.conn.close(0u32.into(), why.as_bytes());
    }

    /// Completes when the connection is gone.
    pub async fn closed(&self) {
        self.conn.closed().await;
    }
}

/// Accepts peers on `ep` for as long as it is open; each handshaken peer
/// becomes a link reported on `events`.
pub fn spawn_acceptor(ep: quinn::Endpoint, me: Me, events: Events) {
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let me = me.clone();
            let events = events.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), accept_stream(incoming, &me))
                    .await
                {
                    Ok(Ok((h, hello))) => {
                        Link::start(h, hello.node, hello.role, hello.process, events);
                    }
                    Ok(Err(e)) => tracing::warn!("refused a connection: {e}"),
                    Err(_) => tracing::warn!("a peer did not finish its handshake in 10 s"),
                }
            });
        }
    });
}

/// Keeps a link to `peer` at `addr` up: connects, and after every loss
/// connects again, backing off from 50 ms to 1 s while it cannot.
pub fn spawn_dialer(ep: quinn::Endpoint, addr: NodeAddr, peer: String, me: Me, events: Events) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(50);
        let mut warned = false;
        loop {
            let found = match addr.lookup().await {
                Ok(a) => connect_stream(&ep, a, &peer, &me).await,
                Err(e) => Err(crate::WireError::Connection(format!(
                    "cannot resolve {addr}: {e}"
                ))),
            };
            match found {
                Ok((h, role, process)) => {
                    backoff = Duration::from_millis(50);
                    warned = false;
                    let link = Link::start(h, peer.clone(), role, process, events.clone());
                    link.closed().await;
                    tracing::info!("link to {peer} at {addr} lost; reconnecting");
                }
                Err(e) => {
                    if !warned {
                        tracing::info!("cannot reach {peer} at {addr} yet: {e}");
                        warned = true;
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    });
}

/// What a [`NetEvent`] changed in a node's [`Links`].
pub enum Change {
    /// A link to this peer is up. `replaced`: it replaces a link that had not
    /// gone down yet (the peer restarted and dialed again before its old
    /// connection timed out): whatever was in flight on the old one is lost.
    Up {
        peer: String,
        replaced: bool,
        process: ProcessId,
    },
    /// The current link to this peer went down (a stale link's report is
    /// [`Change::Nothing`]).
    Down(String),
    Message {
        peer: String,
        msg: Message,
    },
    Nothing,
}

/// A node's links by peer name: the newest link per peer.
#[derive(Default)]
pub struct Links(std::collections::HashMap<String, Link>);

impl Links {
    /// Applies an event from the node's channel; `node` names this node in logs.
    pub fn apply(&mut self, node: &str, ev: NetEvent) -> Change {
        match ev {
            NetEvent::Up { link, process, .. } => {
                tracing::info!("{node}: linked to {}", link.peer);
                let peer = link.peer.clone();
                let old = self.0.insert(peer.clone(), link);
                if let Some(old) = &old {
                    tracing::warn!("{node}: {peer} linked again; dropping its old link");
                    old.close("replaced by a new link");
                }
                Change::Up {
                    peer,
                    replaced: old.is_some(),
                    process,
                }
            }
            NetEvent::Down { peer, link, reason } => {
                if self.0.get(&peer).is_some_and(|l| l.id == link) {
                    tracing::warn!("{node}: lost {peer}: {reason}");
                    self.0.remove(&peer);
                    Change::Down(peer)
                } else {
                    Change::Nothing
                }
            }
            NetEvent::Message { peer, msg, .. } => Change::Message { peer, msg },
        }
    }

    pub fn get(&self, peer: &str) -> Option<&Link> {
        self.0.get(peer)
    }

    pub fn contains(&self, peer: &str) -> bool {
        self.0.contains_key(peer)
    }
}
