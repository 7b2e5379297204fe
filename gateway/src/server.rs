//! The gateway process: the OpenAI HTTP API in front (axum), QUIC links to
//! every node behind.
//!
//! Nodes dial the gateway (its `quic` address) and send heartbeats with
//! their load; the gateway knows who is up from its links. A request is
//! validated, templated and tokenized here, then sent to the least loaded
//! decode group that has a prefill pipeline; its events come back on the
//! same link and are streamed as server-sent events in OpenAI's format. The
//! response status waits for the first event, so a request the decode group
//! refuses (queue full, prompt too long) gets its 4xx instead of a 200 with
//! an error inside. A client that goes away cancels its request on every
//! node: dropping the response drops a guard that sends `Cancel`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tandem_model::{FinishReason, ModelFile, SamplingParams};
use tandem_wire::config::Routing;
use tandem_wire::link::{spawn_acceptor, Link, NetEvent};
use tandem_wire::messages::{
    Accounting, ErrorClass, Generate, GenerateEvent, Load, Message, RequestId, Role,
};
use tandem_wire::node::{now_ms, NodeSetup};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::api::{self, ApiError, PromptInput, Usage};
use crate::metrics::Metrics;
use crate::tools;

mod edge;
mod endpoints;
mod intake;
mod pump;
mod respond;
mod routing;

pub use edge::EdgeLimits;

use endpoints::{
    detokenize, health, metrics, models, not_found, openapi, scrape_targets, tokenize,
};
use intake::{chat, completions, read_body};
use pump::pump;

use respond::{respond, Kind, Shape};
use routing::{conversation_key, session_header, session_key, Pin};

struct Node {
    link: Link,
    role: Role,
    load: Option<Load>,
    seen: Instant,
}

struct Pending {
    tx: mpsc::UnboundedSender<GenerateEvent>,
    decode: String,
    /// The link it went out on.
    link: u64,
}

#[derive(Default)]
struct Nodes {
    nodes: HashMap<String, Node>,
    pending: HashMap<RequestId, Pending>,
    sessions: HashMap<String, Pin>,
    /// Which decode groups hold which cached blocks (by chained hash).
    blocks: HashMap<String, std::collections::HashSet<u64>>,
    /// Round-robin position.
    turn: usize,
}

pub struct Gateway {
    /// SHA-256 digests of the accepted `Authorization: Bearer` keys;
    /// empty means no check.
    api_keys: Vec<[u8; 32]>,
    pub model: String,
    file: Arc<ModelFile>,
    context: usize,
    max_queue: usize,
    /// Requests admitted (from before their prompt is templated and
    /// tokenized until their response ends): at `max_queue`, 429.
    admitted: Arc<std::sync::atomic::AtomicUsize>,
    request_timeout: Duration,
    max_body: usize,
    body_timeout: Duration,
    /// A node with no heartbeat for this long is dropped as lost.
    stale_after: Duration,
    state: Mutex<Nodes>,
    next_id: AtomicU64,
    pub metrics: Metrics,
    /// Pipeline name → its stages' node names.
    pipelines: Vec<(String, Vec<String>)>,
    routing: Routing,
    block_size: usize,
    /// What requests get for the sampling fields they leave out.
    defaults: api::Defaults,
    /// Grammars are compiled here first: one that cannot be is a 400.
    grammar: Option<tandem_model::GrammarEnv>,
    /// Where Prometheus finds every node's `/metrics` (`GET /metrics/targets`):
    /// name, role, address.
    scrape: Vec<(String, &'static str, String)>,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, axum::Json(e.body())).into_response();
    if let ApiError::Overloaded { retry_after_s } = e {
        if let Ok(v) = retry_after_s.to_string().parse() {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    r
}

/// With API keys configured, `/v1/*` needs `Authorization: Bearer KEY`
/// (probes and metrics stay open for the orchestrator).
async fn authorize(
    State(gw): State<Arc<Gateway>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    let guarded = path.starts_with("/v1/") || path == "/tokenize" || path == "/detokenize";
    if gw.api_keys.is_empty() || !guarded {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // Keys are compared as digests (every one the same length, whatever
    // the key's), each in full and in constant time, so timing reveals
    // neither a key's length nor how much of it matched.
    let ok = given.is_some_and(|k| {
        let d = digest(k);
        gw.api_keys
            .iter()
            .fold(subtle::Choice::from(0), |hit, key| {
                hit | subtle::ConstantTimeEq::ct_eq(&key[..], &d[..])
            })
            .into()
    });
    if ok {
        return next.run(req).await;
    }
    gw.metrics.errors.with_label_values(&["401"]).inc();
    let mut r = error_response(&ApiError::Unauthorized);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

fn digest(s: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes()).into()
}

/// An admitted request's place under `max_queue`, given back when its
/// response ends.
struct Permit(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gateway {
    /// A place for one more request, or 429: taken before any work.
    fn admit(&self) -> Result<Permit, ApiError> {
        let n = &self.admitted;
        n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (v < self.max_queue).then_some(v + 1)
        })
        .map(|_| Permit(n.clone()))
        .map_err(|_| {
            self.metrics.rejected.inc();
            ApiError::Overloaded { retry_after_s: 1 }
        })
    }
}

/// API keys from `[gateway] api_keys_file` and `TANDEM_API_KEYS`.
fn load_api_keys(file: Option<&std::path::Path>) -> Result<Vec<[u8; 32]>, String> {
    let mut keys = Vec::new();
    if let Some(p) = file {
        let text = std::fs::read_to_string(p)
            .map_err(|e| format!("reading the API key file {}: {e}", p.display()))?;
        keys.extend(
            text.lines()
                .map(|l| l.split('#').next().unwrap_or("").trim())
                .filter(|l| !l.is_empty())
                .map(str::to_owned),
        );
        if keys.is_empty() {
            return Err(format!("the API key file {} holds no key", p.display()));
        }
    }
    if let Ok(env) = std::env::var("TANDEM_API_KEYS") {
        keys.extend(
            env.split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_owned),
        );
    }
    Ok(keys.iter().map(|k| digest(k)).collect())
}

fn api_error(class: ErrorClass, message: String) -> ApiError {
    match class {
        ErrorClass::BadRequest => ApiError::BadRequest {
            message,
            param: None,
        },
        ErrorClass::Overloaded => ApiError::Overloaded { retry_after_s: 1 },
        ErrorClass::NodeLost => ApiError::Unavailable(message),
        ErrorClass::DeadlineExceeded => ApiError::Timeout(message),
        ErrorClass::Cancelled | ErrorClass::Internal => ApiError::Internal(message),
    }
}

/// Sends `Cancel` for a request unless it ended; frees its pending slot.
struct Guard {
    gw: Arc<Gateway>,
    id: RequestId,
    link: Link,
    done: bool,
    started: Instant,
    /// When its first token came.
    first: Option<Instant>,
    /// Its `submit` span, closed with it.
    _span: tracing::Span,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.gw
            .state
            .lock()
            .expect("gateway state")
            .pending
            .remove(&self.id);
        self.gw.metrics.in_flight.dec();
        if !self.done {
            self.gw.metrics.cancelled.inc();
            self.gw.metrics.serving.ended("abort");
            let _ = self.link.try_send(Message::Cancel { id: self.id });
        }
    }
}

/// A request the decode group accepted: its first token is in.
struct Ticket {
    /// When the gateway ends it whatever its decode group says.
    deadline: tokio::time::Instant,
    guard: Guard,
    rx: mpsc::UnboundedReceiver<GenerateEvent>,
    first: GenerateEvent,
    prompt_tokens: usize,
    /// From the HTTP request's arrival to its dispatch to decode (parsing,
    /// template, tokenization, routing, admission at the gateway).
    gateway_us: u64,
    /// Response headers naming where it went.
    headers: Vec<(&'static str, String)>,
    /// What it takes to continue the request elsewhere.
    resume: Resume,
    /// Where it went, for the request's other choices.
    follow: Follow,
}

/// The decode group and pipeline an earlier choice of a request went to.
#[derive(Debug, Clone)]
struct Follow {
    decode: String,
    pipeline: Option<String>,
}

/// How long past the request timeout the gateway waits for a decode
/// group to end a request before ending it itself.
const DEADLINE_GRACE: Duration = Duration::from_secs(5);

/// Losses of a decode group mid-answer a request survives.
const MAX_RESUMES: u32 = 2;

/// A request as it was asked, to continue it on another decode group with
/// the tokens already streamed.
#[derive(Clone)]
struct Resume {
    prompt: Vec<u32>,
    params: SamplingParams,
    session: Option<String>,
    request_id: Arc<str>,
    left: u32,
}

/// When a request came in, and its `x-request-id`.
#[derive(Clone)]
pub(crate) struct Received {
    pub at: Instant,
    pub request_id: Arc<str>,
}

impl Gateway {
    /// Ready when some decode group is linked and has a pipeline (or the
    /// cluster has no pipelines: decode groups then prefill themselves).
    pub fn ready(&self) -> bool {
        self.state
            .lock()
            .expect("gateway state")
            .nodes
            .values()
            .any(|n| {
                matches!(n.role, Role::Decode { .. })
                    && n.load
                        .is_some_and(|l| l.pipelines_up > 0 || self.pipelines.is_empty())
            })
    }

    /// Sends a request to a decode group, or (`follow`) to the one that
    /// took an earlier choice of the same request, whose prefix cache then
    /// holds the prompt; waits for its first event.
    async fn submit(
        self: &Arc<Self>,
        prompt: Vec<u32>,
        params: SamplingParams,
        session: Option<String>,
        received: &Received,
        follow: Option<&Follow>,
    ) -> Result<Ticket, ApiError> {
        self.dispatch(prompt, Vec::new(), params, session, received, follow)
            .await
    }

    /// Continues a request whose decode group was lost after it streamed
    /// `generated`: another group prefills prompt + generated and goes on
    /// from the next token.
    async fn resume(self: &Arc<Self>, r: &Resume, generated: &[u32]) -> Result<Ticket, ApiError> {
        if r.left == 0 {
            return Err(ApiError::Unavailable(format!(
                "the decode group was lost {} times during this answer",
                MAX_RESUMES + 1
            )));
        }
        self.metrics.resumed.inc();
        let mut t = self
            .dispatch(
                r.prompt.clone(),
                generated.to_vec(),
                r.params.clone(),
                r.session.clone(),
                &Received {
                    at: Instant::now(),
                    request_id: r.request_id.clone(),
                },
                None,
            )
            .await?;
        t.resume.left = r.left - 1;
        Ok(t)
    }

    async fn dispatch(
        self: &Arc<Self>,
        prompt: Vec<u32>,
        generated: Vec<u32>,
        params: SamplingParams,
        session: Option<String>,
        received: &Received,
        follow: Option<&Follow>,
    ) -> Result<Ticket, ApiError> {
        if prompt.is_empty() {
            return Err(ApiError::bad("prompt", "the prompt is empty"));
        }
        if prompt.len() >= self.context {
            return Err(ApiError::bad(
                "messages",
                format!(
                    "the prompt has {} tokens; this model's context holds {} (prompt and completion together)",
                    prompt.len(),
                    self.context
                ),
            ));
        }
        let prompt_tokens = prompt.len();
        let gen_session = session.clone();
        let resume = Resume {
            prompt: prompt.clone(),
            params: params.clone(),
            session: session.clone(),
            request_id: received.request_id.clone(),
            left: MAX_RESUMES,
        };
        let mut routed = prompt.clone();
        routed.extend(&generated);
        let started = Instant::now();
        // A decode group lost before it streamed anything is no loss to the
        // client: the request goes to another (the lost one is out of the
        // routing table by the time its failure arrives).
        let mut attempt = 0;
        let mut gateway_us;
        let (route, link, mut guard, rx, first) = loop {
            attempt += 1;
            let route = tracing::info_span!("route", attempt).in_scope(|| {
                match follow.filter(|_| attempt == 1).and_then(|f| self.follow(f)) {
                    Some(r) => Ok(r),
                    None => self.route(session.as_deref(), &routed),
                }
            })?;
            let link = route.link.clone();
            let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
            let (tx, mut rx) = mpsc::unbounded_channel();
            self.state.lock().expect("gateway state").pending.insert(
                id,
                Pending {
                    tx,
                    decode: link.peer.clone(),
                    link: link.id,
                },
            );
            self.metrics.in_flight.inc();
            // Open while the request is on this decode group: the parent
            // of its spans there.
            let submit =
                tracing::info_span!("submit", request = id.0, decode = %link.peer, attempt);
            let mut guard = Guard {
                gw: self.clone(),
                id,
                link: link.clone(),
                done: false,
                started,
                first: None,
                _span: submit.clone(),
            };
            let gen = Generate {
                id,
                prompt: prompt.clone(),
                generated: generated.clone(),
                params: params.clone(),
                deadline_ms: now_ms() + self.request_timeout.as_millis() as u64,
                session: session.clone(),
                pipeline: route.pipeline.clone(),
                trace: tandem_wire::messages::TraceContext {
                    traceparent: tandem_wire::trace::traceparent(&submit),
                    request_id: received.request_id.to_string(),
                },
            };
            gateway_us = received.at.elapsed().as_micros() as u64;
            let first = if link.send(Message::Generate(gen)).await.is_err() {
                None
            } else {
                match tokio::time::timeout(self.request_timeout, rx.recv()).await {
                    Ok(ev) => ev,
                    Err(_) => {
                        return Err(ApiError::Timeout(
                            "no first token before the request timeout".into(),
                        ))
                    }
                }
            };
            match first {
                Some(GenerateEvent::Failed {
                    class: ErrorClass::NodeLost,
                    message,
                }) if attempt < 3 => {
                    guard.done = true;
                    tracing::warn!(
                        "request went to {} which failed ({message}); routing it again",
                        link.peer
                    );
                    self.metrics.redispatched.inc();
                }
                None if attempt < 3 => {
                    guard.done = true;
                    self.metrics.redispatched.inc();
                    // Its link is closing; let the loss reach the routing table.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None => {
                    guard.done = true;
                    return Err(ApiError::Unavailable(format!("{} went away", link.peer)));
                }
                Some(first) => break (route, link, guard, rx, first),
            }
        };
        if let GenerateEvent::Failed { class, message } = first {
            guard.done = true;
            if class == ErrorClass::Overloaded {
                self.metrics.rejected.inc();
            }
            return Err(api_error(class, message));
        }
        if generated.is_empty() {
            guard.first = Some(Instant::now());
            self.metrics.first_token(guard.started.elapsed());
        }
        let mut headers = vec![
            ("x-tandem-decode", link.peer.clone()),
            ("x-tandem-sticky", route.sticky.to_string()),
        ];
        if let Some(p) = &route.pipeline {
            headers.push(("x-tandem-pipeline", p.clone()));
        }
        if let Some(s) = &gen_session {
            headers.push(("x-tandem-session", s.clone()));
        }
        let follow = Follow {
            decode: link.peer.clone(),
            pipeline: route.pipeline.clone(),
        };
        Ok(Ticket {
            follow,
            // The decode group ends it at the request timeout; a group that
            // cannot (wedged, partitioned but linked) is not waited for
            // much longer.
            deadline: tokio::time::Instant::from_std(received.at)
                + self.request_timeout
                + DEADLINE_GRACE,
            guard,
            rx,
            first,
            prompt_tokens,
            gateway_us,
            headers,
            resume,
        })
    }

    fn token_text(&self, id: u32) -> String {
        self.file.tokenizer.decode(&[id])
    }
}

/// Runs the gateway until `shutdown` completes.
pub async fn run(
    file: Arc<ModelFile>,
    setup: NodeSetup,
    model_name: String,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let g = &setup.cluster.file.gateway;
    let limits = &setup.cluster.file.limits;
    let api_keys = load_api_keys(g.api_keys_file.as_deref())?;
    if !api_keys.is_empty() {
        tracing::info!(
            "gateway: {} API key(s); /v1 requests need one",
            api_keys.len()
        );
    }
    let defaults = api::Defaults::resolve(&setup.cluster.file.sampling, &file.generation);
    tracing::info!(
        "gateway: sampling defaults temperature {} top_p {} top_k {} min_p {} repetition_penalty {} max_tokens {} ({:?})",
        defaults.temperature,
        defaults.top_p,
        defaults.top_k,
        defaults.min_p,
        defaults.repetition_penalty,
        defaults.max_tokens,
        defaults.source
    );
    // The vocabulary's grammar index takes a while to build: off the runtime.
    let f = file.clone();
    let grammar = tokio::task::spawn_blocking(move || tandem_model::GrammarEnv::new(&f.tokenizer))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|e| tracing::warn!("gateway: no structured outputs: {e}"))
        .ok();
    let registry = Metrics::new(&model_name).map_err(|e| format!("metrics: {e}"))?;
    let gw = Arc::new(Gateway {
        api_keys,
        model: model_name,
        context: file.config.context_length,
        file,
        max_queue: g.max_queue,
        admitted: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        request_timeout: Duration::from_millis(limits.request_timeout_ms),
        max_body: limits.max_body_bytes,
        body_timeout: Duration::from_millis(g.body_timeout_ms.max(1)),
        stale_after: Duration::from_millis(2 * limits.down_after_ms.max(100)),
        state: Mutex::new(Nodes::default()),
        next_id: AtomicU64::new(1),
        metrics: registry,
        routing: g.routing,
        block_size: setup.cluster.file.cluster.block_size,
        defaults,
        grammar,
        scrape: std::iter::once((g.name.clone(), "gateway", g.http.to_string()))
            .chain(
                setup
                    .cluster
                    .file
                    .health_targets()
                    .into_iter()
                    .map(|(n, r, a)| (n, r, a.to_string())),
            )
            .collect(),
        pipelines: setup
            .cluster
            .pipelines
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    p.stages.iter().map(|s| s.0.clone()).collect(),
                )
            })
            .collect(),
    });
    let (tx, rx) = std_mpsc::channel();
    let ep = tandem_wire::quic::endpoint(g.quic.bind(), &setup.identity, setup.liveness())
        .map_err(|e| e.to_string())?;
    spawn_acceptor(ep.clone(), setup.me(Role::Gateway), tx);
    let pg = gw.clone();
    std::thread::Builder::new()
        .name("gateway-events".into())
        .spawn(move || pump(pg, rx))
        .map_err(|e| e.to_string())?;
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/health", get(health))
        .route("/live", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/metrics/targets", get(scrape_targets))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(gw.clone(), authorize))
        .with_state(gw.clone());
    let listener = tokio::net::TcpListener::bind(g.http.bind())
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", g.http))?;
    tracing::info!("gateway: OpenAI API on http://{}", g.http);
    let edge = EdgeLimits {
        header_timeout: Duration::from_millis(g.header_timeout_ms.max(1)),
        idle_timeout: Duration::from_millis(g.idle_timeout_ms.max(1)),
        max_connections: g.max_connections,
    };
    edge::serve(
        listener,
        app,
        edge,
        gw.metrics.connections.clone(),
        gw.metrics.http_timeouts.clone(),
        shutdown,
        gw.request_timeout + DEADLINE_GRACE,
    )
    .await;
    ep.close(0u32.into(), b"gateway stopping");
    Ok(())
}
