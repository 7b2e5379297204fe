//! Where a request goes: session pins, the cached-prefix index weighed
//! against load, least-loaded and round-robin policies, session keys.

use super::*;

/// Where a session's KV lives.
#[derive(Debug, Clone)]
pub(super) struct Pin {
    pub(super) decode: String,
    pub(super) pipeline: Option<String>,
    pub(super) used: Instant,
}

/// Sessions idle this long lose their pin.
const SESSION_TTL: Duration = Duration::from_secs(30 * 60);
/// Most pins kept; the least recently used go first.
const MAX_SESSIONS: usize = 100_000;
/// A pinned decode group with this many requests waiting in its queue is
/// too busy: the session moves (its KV is recomputed elsewhere).
const REPIN_QUEUED: u32 = 8;

/// How many prompt tokens one request waiting or running on a decode group
/// is worth when weighing cached prefix against load: about what its
/// prefill would cost the group.
const LOAD_TOKENS: usize = 128;

/// Where a request goes.
pub(super) struct Route {
    pub(super) link: Link,
    pub(super) pipeline: Option<String>,
    /// The session's pin was kept (its KV should be where it goes).
    pub(super) sticky: bool,
}

impl Gateway {
    /// Picks a decode group and a prefill pipeline: the session's pins
    /// while their nodes are up and not overloaded, else the least loaded
    /// (and the session is pinned there).
    pub(super) fn route(&self, session: Option<&str>, prompt: &[u32]) -> Result<Route, ApiError> {
        let session = session.filter(|_| self.routing == Routing::Sessions);
        // Hashes of the prompt's reusable blocks, as decode keys them.
        let hashes = if self.routing == Routing::Sessions {
            let reusable = prompt.len().saturating_sub(1) / self.block_size * self.block_size;
            tandem_model::block_hashes(&prompt[..reusable], self.block_size)
        } else {
            Vec::new()
        };
        let mut st = self.state.lock().expect("gateway state");
        let mut local: HashMap<String, usize> = HashMap::new();
        for p in st.pending.values() {
            *local.entry(p.decode.clone()).or_default() += 1;
        }
        let usable = |n: &Node| {
            matches!(n.role, Role::Decode { .. })
                && n.load
                    .is_some_and(|l| l.pipelines_up > 0 || self.pipelines.is_empty())
        };
        let pipeline_up = |st: &Nodes, p: &str| {
            self.pipelines
                .iter()
                .find(|(name, _)| name == p)
                .is_some_and(|(_, stages)| stages.iter().all(|s| st.nodes.contains_key(s)))
        };
        if let Some(pin) = session.and_then(|k| st.sessions.get(k)).cloned() {
            let keep = pin.used.elapsed() < SESSION_TTL
                && st
                    .nodes
                    .get(&pin.decode)
                    .is_some_and(|n| usable(n) && n.load.is_some_and(|l| l.queued < REPIN_QUEUED))
                && pin.pipeline.as_deref().is_none_or(|p| pipeline_up(&st, p));
            if keep {
                let link = st.nodes[&pin.decode].link.clone();
                let key = session.expect("pinned sessions have keys");
                if let Some(p) = st.sessions.get_mut(key) {
                    p.used = Instant::now();
                }
                self.metrics.sticky.inc();
                return Ok(Route {
                    link,
                    pipeline: pin.pipeline,
                    sticky: true,
                });
            }
        }
        let mut usable_nodes: Vec<(&String, &Node)> =
            st.nodes.iter().filter(|(_, n)| usable(n)).collect();
        usable_nodes.sort_by(|a, b| a.0.cmp(b.0));
        let load = |name: &str, n: &Node| {
            let l = n.load.unwrap_or_default();
            let mine = local.get(name).copied().unwrap_or(0);
            mine.max((l.running + l.queued) as usize)
        };
        let best = match self.routing {
            Routing::RoundRobin => {
                let i = st.turn % usable_nodes.len().max(1);
                usable_nodes
                    .get(i)
                    .map(|(name, n)| ((*name).clone(), n.link.clone()))
            }
            Routing::LeastLoaded => usable_nodes
                .iter()
                .min_by_key(|(name, n)| {
                    (
                        load(name, n),
                        u32::MAX - n.load.unwrap_or_default().free_blocks,
                    )
                })
                .map(|(name, n)| ((*name).clone(), n.link.clone())),
            Routing::Sessions => usable_nodes
                .iter()
                .max_by_key(|(name, n)| {
                    // Cached prefix (tokens) against load, then free blocks.
                    let cached = st.blocks.get(name.as_str()).map_or(0, |set| {
                        hashes.iter().take_while(|h| set.contains(h)).count()
                    }) * self.block_size;
                    let score = cached as i64 - (load(name, n) * LOAD_TOKENS) as i64;
                    (score, n.load.unwrap_or_default().free_blocks)
                })
                .map(|(name, n)| ((*name).clone(), n.link.clone())),
        };
        let Some((decode, link)) = best else {
            return Err(ApiError::Unavailable(
                "no decode group with a live prefill pipeline is linked to the gateway".into(),
            ));
        };
        let up: Vec<&(String, Vec<String>)> = self
            .pipelines
            .iter()
            .filter(|(name, _)| pipeline_up(&st, name))
            .collect();
        let pipeline = match self.routing {
            Routing::RoundRobin => up.get(st.turn % up.len().max(1)).map(|(n, _)| n.clone()),
            _ => up
                .iter()
                .min_by_key(|(_, stages)| {
                    st.nodes
                        .get(&stages[0])
                        .and_then(|n| n.load)
                        .map_or(0, |l| l.running + l.queued)
                })
                .map(|(name, _)| name.clone()),
        };
        st.turn = st.turn.wrapping_add(1);
        if let Some(key) = session {
            if st.sessions.len() >= MAX_SESSIONS && !st.sessions.contains_key(key) {
                // Drop expired pins, then the least recently used.
                st.sessions.retain(|_, p| p.used.elapsed() < SESSION_TTL);
                if st.sessions.len() >= MAX_SESSIONS {
                    if let Some(oldest) = st
                        .sessions
                        .iter()
                        .min_by_key(|(_, p)| p.used)
                        .map(|(k, _)| k.clone())
                    {
                        st.sessions.remove(&oldest);
                    }
                }
            }
            st.sessions.insert(
                key.to_string(),
                Pin {
                    decode,
                    pipeline: pipeline.clone(),
                    used: Instant::now(),
                },
            );
            self.metrics.repinned.inc();
        }
        Ok(Route {
            link,
            pipeline,
            sticky: false,
        })
    }
}

impl Gateway {
    /// The decode group (and pipeline) an earlier choice of the same
    /// request went to, while it is up and not overloaded.
    pub(super) fn follow(&self, f: &Follow) -> Option<Route> {
        let st = self.state.lock().expect("gateway state");
        let n = st.nodes.get(&f.decode)?;
        let up = matches!(n.role, Role::Decode { .. })
            && n.load.is_some_and(|l| l.queued < REPIN_QUEUED);
        up.then(|| Route {
            link: n.link.clone(),
            pipeline: f.pipeline.clone(),
            sticky: true,
        })
    }
}

pub(super) fn session_header(h: &HeaderMap) -> Option<String> {
    h.get("x-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// What a session is kept under: a digest of the client's key (an
/// `X-Session-Id`, a `user`, or the conversation's start), so that however
/// long the keys clients send, each pin costs the same few bytes.
pub(super) fn session_key(raw: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(raw.as_bytes());
    let mut s = String::with_capacity(34);
    s.push_str("s-");
    for b in &d[..16] {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A conversation's key when the client names none: its system prompt and
/// first user message, which every later turn repeats.
pub(super) fn conversation_key(messages: &[tandem_model::ChatMessage]) -> Option<String> {
    use std::hash::{Hash, Hasher};
    let first_user = messages.iter().find(|m| m.role == "user")?;
    let mut h = std::hash::DefaultHasher::new();
    for m in messages.iter().filter(|m| m.role == "system").take(1) {
        m.content.hash(&mut h);
    }
    first_user.content.hash(&mut h);
    Some(format!("conv-{:016x}", h.finish()))
}
