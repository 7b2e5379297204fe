//! The gateway's small endpoints: models, token ids, health, metrics, the
//! OpenAPI document and the unknown-route answer.

use super::*;

const OPENAPI: &str = include_str!("../openapi.json");

/// The HTTP API as an OpenAPI 3.1 document.
pub(super) async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

pub(super) async fn models(State(gw): State<Arc<Gateway>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": gw.model,
            "object": "model",
            "created": 0,
            "owned_by": "tandem",
            "root": gw.model,
            "parent": Value::Null,
            "max_model_len": gw.context,
            "sampling_defaults": gw.defaults,
        }],
    }))
    .into_response()
}

/// Reads a small JSON request (`/tokenize`, `/detokenize`): the body under
/// the size and time limits, malformed JSON a 400, another model a 404.
async fn read_request<T: serde::de::DeserializeOwned>(
    gw: &Gateway,
    headers: &HeaderMap,
    body: Body,
    model: impl Fn(&T) -> Option<&String>,
) -> Result<T, ApiError> {
    let body = read_body(headers, body, gw.max_body, gw.body_timeout).await?;
    let req: T = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest {
        message: format!("Malformed request body: {e}"),
        param: None,
    })?;
    match model(&req) {
        Some(m) if *m != gw.model => Err(ApiError::ModelNotFound(m.clone())),
        _ => Ok(req),
    }
}

fn json_or_error(r: Result<Value, ApiError>) -> Response {
    match r {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => error_response(&e),
    }
}

/// `POST /tokenize` (vLLM's shape): a prompt, or chat messages rendered
/// through the template as `/v1/chat/completions` would (with `tools` as
/// it would too).
pub(super) async fn tokenize(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let req: api::TokenizeRequest =
            read_request(&gw, &headers, body, |r: &api::TokenizeRequest| {
                r.model.as_ref()
            })
            .await?;
        let g = gw.clone();
        tokio::task::spawn_blocking(move || {
            let special = req.add_special_tokens.unwrap_or(true);
            let (text, param) = match (req.prompt, req.messages) {
                (Some(p), None) => (p, "prompt"),
                (None, Some(m)) => {
                    let messages = api::chat_messages(&m)?;
                    let tools = tools::parse(req.tools.as_ref(), None, None)?;
                    let add = req.add_generation_prompt.unwrap_or(true);
                    (g.render_chat(&messages, tools.as_ref(), add)?, "messages")
                }
                _ => {
                    return Err(ApiError::BadRequest {
                        message: "give either 'prompt' or 'messages'".into(),
                        param: None,
                    })
                }
            };
            // By default exactly what a completion's prompt is.
            let t = &g.file.tokenizer;
            let tokens = if special {
                t.encode_prompt(&text)
            } else {
                t.encode(&text)
            }
            .map_err(|e| ApiError::bad(param, e.to_string()))?;
            let strs = req.return_token_strs.unwrap_or(false).then(|| {
                tokens
                    .iter()
                    .map(|t| g.file.tokenizer.token_text(*t))
                    .collect::<Vec<_>>()
            });
            Ok(json!({
                "count": tokens.len(),
                "max_model_len": g.context,
                "tokens": tokens,
                "token_strs": strs,
            }))
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
    }
    .await;
    json_or_error(r)
}

/// `POST /detokenize` (vLLM's shape): token ids back to text.
pub(super) async fn detokenize(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let req: api::DetokenizeRequest =
            read_request(&gw, &headers, body, |r: &api::DetokenizeRequest| {
                r.model.as_ref()
            })
            .await?;
        let v = gw.file.tokenizer.vocab_size();
        if let Some(t) = req.tokens.iter().find(|&&t| t as usize >= v) {
            return Err(ApiError::bad(
                "tokens",
                format!("token id {t} is outside the vocabulary of {v}"),
            ));
        }
        Ok(json!({ "prompt": gw.file.tokenizer.decode(&req.tokens) }))
    }
    .await;
    json_or_error(r)
}

pub(super) async fn health(State(gw): State<Arc<Gateway>>) -> Response {
    let st = gw.state.lock().expect("gateway state");
    let nodes: Vec<Value> = st
        .nodes
        .iter()
        .map(|(name, n)| json!({ "node": name, "role": format!("{:?}", n.role), "load": n.load.map(|l| json!({"running": l.running, "queued": l.queued, "free_blocks": l.free_blocks, "total_blocks": l.total_blocks, "pipelines_up": l.pipelines_up})), "last_heartbeat_ms": n.seen.elapsed().as_millis() as u64 }))
        .collect();
    drop(st);
    let ready = gw.ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(json!({ "status": if ready { "ok" } else { "unavailable" }, "nodes": nodes, "max_model_len": gw.context, "sampling_defaults": gw.defaults })),
    )
        .into_response()
}

pub(super) async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    {
        let st = gw.state.lock().expect("gateway state");
        gw.metrics.set_nodes(
            st.nodes
                .iter()
                .map(|(name, n)| (name.as_str(), &n.role, n.load)),
        );
    }
    match gw.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => error_response(&ApiError::Internal(e)),
    }
}

/// Every node's metrics address in Prometheus' HTTP service-discovery
/// format (`http_sd_configs`): the gateway's API address, and each prefill
/// stage's and decode group's `health` address from the cluster file.
pub(super) async fn scrape_targets(State(gw): State<Arc<Gateway>>) -> Response {
    let groups: Vec<Value> = gw
        .scrape
        .iter()
        .map(|(node, role, addr)| {
            json!({ "targets": [addr], "labels": { "tandem_node": node, "tandem_role": role } })
        })
        .collect();
    axum::Json(groups).into_response()
}

pub(super) async fn not_found() -> Response {
    let mut r = error_response(&ApiError::BadRequest {
        message: "unknown route; this server answers /v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize, /health, /live, /metrics, /metrics/targets and /openapi.json".into(),
        param: None,
    });
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}
