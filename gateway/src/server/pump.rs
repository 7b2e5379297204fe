//! The event pump: what the links report goes into the gateway's state
//! (nodes, loads, cached blocks), and each request's events to its stream.

use super::*;

/// Fails every request that went out on link `link` to `peer`.
pub(super) fn fail_pending(st: &mut Nodes, link: u64, peer: &str, reason: &str) {
    let lost: Vec<RequestId> = st
        .pending
        .iter()
        .filter(|(_, p)| p.link == link)
        .map(|(id, _)| *id)
        .collect();
    for id in lost {
        if let Some(p) = st.pending.remove(&id) {
            let _ = p.tx.send(GenerateEvent::Failed {
                class: ErrorClass::NodeLost,
                message: format!("decode group {peer} was lost: {reason}"),
            });
        }
    }
}

/// A node that heartbeated and then stopped (its decode loop is wedged, or
/// its process is stuck while its connection lives) is lost: its link is
/// closed, which fails or moves its requests like any other loss.
fn drop_silent(gw: &Gateway) {
    let st = gw.state.lock().expect("gateway state");
    for (name, n) in &st.nodes {
        if n.load.is_some() && n.seen.elapsed() > gw.stale_after {
            tracing::warn!(
                "gateway: no heartbeat from {name} for {} ms; dropping it as lost",
                n.seen.elapsed().as_millis()
            );
            n.link.close("no heartbeat");
        }
    }
}

/// The event pump: link reports into gateway state, request events to their streams.
pub(super) fn pump(gw: Arc<Gateway>, rx: std_mpsc::Receiver<NetEvent>) {
    let check_every = (gw.stale_after / 4).max(Duration::from_millis(50));
    let mut checked = Instant::now();
    loop {
        let ev = match rx.recv_timeout(check_every) {
            Ok(ev) => Some(ev),
            Err(std_mpsc::RecvTimeoutError::Timeout) => None,
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if checked.elapsed() >= check_every {
            checked = Instant::now();
            drop_silent(&gw);
        }
        let Some(ev) = ev else { continue };
        let mut st = gw.state.lock().expect("gateway state");
        match ev {
            NetEvent::Up { link, role, .. } => {
                tracing::info!("gateway: {} ({role:?}) linked", link.peer);
                if let Some(old) = st.nodes.get(&link.peer) {
                    // The node restarted and dialed again before its old
                    // connection timed out: what it had in flight is lost.
                    old.link.close("replaced by a new link");
                    let (peer, old_id) = (link.peer.clone(), old.link.id);
                    st.blocks.remove(&peer);
                    fail_pending(&mut st, old_id, &peer, "restarted");
                }
                st.nodes.insert(
                    link.peer.clone(),
                    Node {
                        link,
                        role,
                        load: None,
                        seen: Instant::now(),
                    },
                );
            }
            NetEvent::Down { peer, link, reason } => {
                if st.nodes.get(&peer).is_some_and(|n| n.link.id == link) {
                    tracing::warn!("gateway: lost {peer}: {reason}");
                    st.nodes.remove(&peer);
                    // Its cache is gone with it (a restarted node starts empty).
                    st.blocks.remove(&peer);
                }
                // Requests sent on that link end with a clear error (or go
                // elsewhere if nothing was streamed yet).
                fail_pending(&mut st, link, &peer, &reason);
            }
            NetEvent::Message { peer, msg, link } => match msg {
                // Only the decode group a request went to, on the link it
                // went out on, speaks for it: another node naming its id
                // (ids are sequential) is ignored.
                Message::Event { id, event } => {
                    let end = matches!(
                        event,
                        GenerateEvent::Finished { .. } | GenerateEvent::Failed { .. }
                    );
                    match st.pending.get(&id) {
                        Some(p) if p.link == link => {
                            let _ = p.tx.send(event);
                            if end {
                                st.pending.remove(&id);
                            }
                        }
                        Some(_) => {
                            tracing::warn!(
                                "gateway: {peer} sent an event for request {} it does not serve",
                                id.0
                            );
                        }
                        None => {}
                    }
                }
                _ if st.nodes.get(&peer).is_none_or(|n| n.link.id != link) => {
                    tracing::debug!("gateway: a message from {peer}'s replaced link ignored");
                }
                Message::CacheStored { hashes, .. } => {
                    st.blocks.entry(peer.clone()).or_default().extend(hashes);
                }
                Message::CacheEvicted { hashes, .. } => {
                    if let Some(set) = st.blocks.get_mut(&peer) {
                        for h in hashes {
                            set.remove(&h);
                        }
                    }
                }
                Message::Heartbeat { load, .. } => {
                    if let Some(n) = st.nodes.get_mut(&peer) {
                        n.load = Some(load);
                        n.seen = Instant::now();
                    }
                }
                _ => tracing::debug!("gateway: unexpected message from {peer}"),
            },
        }
    }
}
