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

/// The event pump: link reports into gateway state, request events to their streams.
pub(super) fn pump(gw: Arc<Gateway>, rx: std_mpsc::Receiver<NetEvent>) {
    while let Ok(ev) = rx.recv() {
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
                _ if !st.nodes.get(&peer).is_some_and(|n| n.link.id == link) => {
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
