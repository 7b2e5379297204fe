//! Turning a request's events into OpenAI responses: whole bodies,
//! server-sent event streams, and the accounting that rides along.
//!
//! Each choice of a request is driven by its own task ([`drive`]): it reads
//! its decode group's events, continues on another group when that one is
//! lost, ends at the deadline, and reports [`Item`]s in order. The response
//! merges the choices' items: as they come (a stream) or all at once.

use super::*;
use tracing::Instrument;

/// What kind of response a request wants.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Kind {
    Chat,
    Completion,
}

pub(super) struct Shape {
    pub(super) kind: Kind,
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    pub(super) include_usage: bool,
    pub(super) logprobs: bool,
    /// Choices.
    pub(super) n: usize,
    /// Answers are parsed for tool calls (chat with tools).
    pub(super) tools: bool,
}

/// One chosen token as the client sees it.
struct Token {
    text: String,
    token: u32,
    logprob: f32,
    top: Vec<(u32, f32)>,
}

/// What a choice's driver reports.
enum Item {
    Token {
        index: usize,
        token: Token,
    },
    Done {
        index: usize,
        reason: FinishReason,
        accounting: Accounting,
        completion: usize,
    },
    Failed {
        error: ApiError,
    },
}

impl Shape {
    /// The token's log-probabilities as the response kind writes them.
    fn chat_logprob(&self, gw: &Gateway, t: &Token) -> Value {
        let top: Vec<(String, f32)> = t
            .top
            .iter()
            .map(|(id, lp)| (gw.token_text(*id), *lp))
            .collect();
        api::chat_logprob(&gw.token_text(t.token), t.logprob, &top)
    }

    fn completion_logprob(gw: &Gateway, t: &Token) -> (String, f32, Vec<(String, f32)>) {
        (
            gw.token_text(t.token),
            t.logprob,
            t.top
                .iter()
                .map(|(id, lp)| (gw.token_text(*id), *lp))
                .collect(),
        )
    }

    fn chunk(
        &self,
        gw: &Gateway,
        index: usize,
        text: &str,
        token: Option<&Token>,
        finish: Option<FinishReason>,
    ) -> Value {
        let token = token.filter(|_| self.logprobs);
        match self.kind {
            Kind::Chat => {
                let delta = if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({ "content": text })
                };
                api::chat_chunk(
                    &self.id,
                    self.created,
                    &self.model,
                    index,
                    delta,
                    finish,
                    token.map(|t| self.chat_logprob(gw, t)),
                    self.include_usage,
                )
            }
            Kind::Completion => {
                let lp =
                    token.map(|t| api::completion_logprobs(&[Self::completion_logprob(gw, t)]));
                let mut c = api::completion(
                    &self.id,
                    self.created,
                    &self.model,
                    vec![api::completion_choice(index, text, finish, lp)],
                );
                if self.include_usage {
                    c["usage"] = Value::Null;
                }
                c
            }
        }
    }

    /// A chat stream's chunks for what the tool-call parser gave out for
    /// one token: content, a call's start (id, name) and its arguments as
    /// they come, as OpenAI streams them. The token's log-probability
    /// rides on the first (on an empty content chunk when nothing is out).
    fn tool_chunks(
        &self,
        gw: &Gateway,
        index: usize,
        outs: Vec<tools::Out>,
        token: Option<&Token>,
    ) -> Vec<Value> {
        let mut lp = token
            .filter(|_| self.logprobs)
            .map(|t| self.chat_logprob(gw, t));
        let mut deltas: Vec<Value> = outs
            .into_iter()
            .map(|o| match o {
                tools::Out::Text(t) => json!({ "content": t }),
                tools::Out::Call { index, id, name } => json!({ "tool_calls": [{
                    "index": index, "id": id, "type": "function",
                    "function": { "name": name, "arguments": "" } }] }),
                tools::Out::Args { index, text } => {
                    json!({ "tool_calls": [{ "index": index, "function": { "arguments": text } }] })
                }
            })
            .collect();
        if deltas.is_empty() && lp.is_some() {
            deltas.push(json!({ "content": "" }));
        }
        deltas
            .into_iter()
            .map(|d| {
                api::chat_chunk(
                    &self.id,
                    self.created,
                    &self.model,
                    index,
                    d,
                    None,
                    lp.take(),
                    self.include_usage,
                )
            })
            .collect()
    }

    fn usage(&self, usage: Usage) -> Value {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        json!({ "id": self.id, "object": object, "created": self.created, "model": self.model, "system_fingerprint": Value::Null, "choices": [], "usage": usage })
    }
}

fn timing(a: &Accounting) -> Value {
    json!({
        "nodes": a.nodes,
        "prefilled_tokens": a.prefilled_tokens,
        "cached_tokens": a.cached_tokens,
        "kv_bytes": a.kv_bytes,
        "gateway_us": a.gateway_queue_us,
        "decode_queue_us": a.decode_queue_us,
        "prefill_queue_us": a.prefill_queue_us,
        "prefill_compute_us": a.prefill_compute_us,
        "kv_transfer_us": a.kv_transfer_us,
        "kv_wait_us": a.kv_wait_us,
        "kv_transport": a.kv_transport,
        "first_step_us": a.first_step_us,
    })
}

/// The response to a request whose choices' first tokens are in. `permit`
/// (its place under `max_queue`) is held until the response ends.
pub(super) async fn respond(
    gw: Arc<Gateway>,
    tickets: Vec<Ticket>,
    permit: Permit,
    shape: Shape,
    stream: bool,
) -> Response {
    let headers = tickets[0].headers.clone();
    let prompt_tokens = tickets[0].prompt_tokens;
    // Each driver sends at most one item ahead of the reader per choice
    // and a few more: a slow client holds back its decode groups' events
    // in their unbounded queues, not here.
    let (tx, rx) = mpsc::channel::<Item>(4 * tickets.len());
    for (index, t) in tickets.into_iter().enumerate() {
        tokio::spawn(drive(gw.clone(), t, index, tx.clone()).in_current_span());
    }
    drop(tx);
    let mut r = if stream {
        let (out, body_rx) = mpsc::channel::<Bytes>(64);
        tokio::spawn(stream_items(gw, shape, prompt_tokens, rx, out, permit).in_current_span());
        let body = Body::from_stream(futures_util::stream::unfold(body_rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
        }));
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(body)
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    } else {
        let r = whole(&gw, &shape, prompt_tokens, rx).await;
        drop(permit);
        r
    };
    for (k, v) in headers {
        if let Ok(v) = header::HeaderValue::from_str(&v) {
            r.headers_mut().insert(k, v);
        }
    }
    r
}

/// Per-request accounting as response headers (non-streaming responses;
/// a stream carries it in its last chunk).
fn accounting_headers(r: &mut Response, a: &Accounting) {
    for (k, v) in [
        ("x-tandem-cached-tokens", a.cached_tokens.to_string()),
        ("x-tandem-prefilled-tokens", a.prefilled_tokens.to_string()),
        ("x-tandem-kv-bytes", a.kv_bytes.to_string()),
        ("x-tandem-gateway-us", a.gateway_queue_us.to_string()),
        ("x-tandem-decode-queue-us", a.decode_queue_us.to_string()),
        ("x-tandem-prefill-queue-us", a.prefill_queue_us.to_string()),
        (
            "x-tandem-prefill-compute-us",
            a.prefill_compute_us.to_string(),
        ),
        ("x-tandem-kv-transfer-us", a.kv_transfer_us.to_string()),
        ("x-tandem-kv-wait-us", a.kv_wait_us.to_string()),
        ("x-tandem-first-step-us", a.first_step_us.to_string()),
        ("x-tandem-kv-transport", a.kv_transport.clone()),
    ] {
        if let Ok(v) = header::HeaderValue::from_str(&v) {
            r.headers_mut().insert(k, v);
        }
    }
}

/// The request's accounting object: the first choice's, with every
/// choice's beside it when there are several.
fn accounting_object(per_choice: &[Option<Accounting>]) -> Value {
    let mut v = per_choice
        .first()
        .and_then(|a| a.as_ref())
        .map(timing)
        .unwrap_or(Value::Null);
    if per_choice.len() > 1 {
        v["choices"] = per_choice
            .iter()
            .map(|a| a.as_ref().map(timing).unwrap_or(Value::Null))
            .collect();
    }
    v
}

/// A whole (non-streaming) response once every choice has ended; the first
/// failure is the response instead (the other choices are cancelled).
async fn whole(
    gw: &Gateway,
    shape: &Shape,
    prompt_tokens: usize,
    mut rx: mpsc::Receiver<Item>,
) -> Response {
    let n = shape.n;
    let mut text = vec![String::new(); n];
    let mut tokens: Vec<Vec<Token>> = (0..n).map(|_| Vec::new()).collect();
    let mut ends: Vec<Option<(FinishReason, usize)>> = vec![None; n];
    let mut accounting: Vec<Option<Accounting>> = vec![None; n];
    while ends.iter().any(Option::is_none) {
        match rx.recv().await {
            Some(Item::Token { index, token }) => {
                text[index].push_str(&token.text);
                if shape.logprobs {
                    tokens[index].push(token);
                }
            }
            Some(Item::Done {
                index,
                reason,
                accounting: a,
                completion,
            }) => {
                ends[index] = Some((reason, completion));
                accounting[index] = Some(a);
            }
            Some(Item::Failed { error }) => return error_response(&error),
            None => {
                return error_response(&ApiError::Internal(
                    "a choice ended without a result".into(),
                ))
            }
        }
    }
    let completion: usize = ends.iter().flatten().map(|(_, c)| c).sum();
    let usage = Usage::new(prompt_tokens, completion);
    let mut choices = Vec::with_capacity(n);
    for i in 0..n {
        let (reason, _) = ends[i].expect("every choice ended");
        let mut c = match shape.kind {
            Kind::Chat if shape.tools => choice_with_calls(i, &text[i], reason),
            Kind::Chat => api::chat_choice(i, &text[i], reason),
            Kind::Completion => api::completion_choice(i, &text[i], Some(reason), None),
        };
        if shape.logprobs {
            c["logprobs"] = match shape.kind {
                Kind::Chat => {
                    json!({ "content": tokens[i].iter().map(|t| shape.chat_logprob(gw, t)).collect::<Vec<_>>() })
                }
                Kind::Completion => api::completion_logprobs(
                    &tokens[i]
                        .iter()
                        .map(|t| Shape::completion_logprob(gw, t))
                        .collect::<Vec<_>>(),
                ),
            };
        }
        choices.push(c);
    }
    let mut v = match shape.kind {
        Kind::Chat => api::chat_completion(&shape.id, shape.created, &shape.model, choices, usage),
        Kind::Completion => {
            let mut c = api::completion(&shape.id, shape.created, &shape.model, choices);
            c["usage"] = json!(usage);
            c
        }
    };
    v["tandem"] = accounting_object(&accounting);
    let mut r = (StatusCode::OK, axum::Json(v)).into_response();
    if let Some(a) = &accounting[0] {
        accounting_headers(&mut r, a);
    }
    r
}

/// A whole chat choice whose answer is parsed for tool calls: the content
/// (null when the answer is only calls), the calls, and `tool_calls` as
/// the finish reason when it ended on its own after making some.
fn choice_with_calls(index: usize, text: &str, reason: FinishReason) -> Value {
    let mut p = tools::ToolParser::default();
    let mut content = String::new();
    for o in p.push(text).into_iter().chain(p.finish()) {
        if let tools::Out::Text(t) = o {
            content.push_str(&t);
        }
    }
    let mut c = api::chat_choice(index, &content, reason);
    if !p.calls().is_empty() {
        c["message"]["tool_calls"] = p
            .calls()
            .iter()
            .map(|call| {
                json!({ "id": call.id, "type": "function",
                        "function": { "name": call.name, "arguments": call.arguments } })
            })
            .collect();
        if content.is_empty() {
            c["message"]["content"] = Value::Null;
        }
        if reason == FinishReason::Stop {
            c["finish_reason"] = json!("tool_calls");
        }
    }
    c
}

/// A stream of the choices' chunks as they come; after the last choice
/// ends, the usage (if asked) and `[DONE]`. A failed choice ends the
/// stream with an error event.
async fn stream_items(
    gw: Arc<Gateway>,
    shape: Shape,
    prompt_tokens: usize,
    mut rx: mpsc::Receiver<Item>,
    out: mpsc::Sender<Bytes>,
    _permit: Permit,
) {
    let send = |v: String| {
        let out = out.clone();
        async move { out.send(Bytes::from(v)).await.is_ok() }
    };
    if shape.kind == Kind::Chat {
        for index in 0..shape.n {
            let role = api::chat_chunk(
                &shape.id,
                shape.created,
                &shape.model,
                index,
                json!({ "role": "assistant", "content": "" }),
                None,
                None,
                shape.include_usage,
            );
            if !send(api::sse(&role)).await {
                return;
            }
        }
    }
    let mut left = shape.n;
    let mut completion = 0usize;
    let mut parsers: Vec<Option<tools::ToolParser>> = (0..shape.n)
        .map(|_| (shape.kind == Kind::Chat && shape.tools).then(tools::ToolParser::default))
        .collect();
    loop {
        let item = tokio::select! {
            i = rx.recv() => i,
            // The client left: dropping the receiver stops every driver,
            // whose guards cancel their requests.
            _ = out.closed() => return,
        };
        match item {
            Some(Item::Token { index, token }) => {
                let chunks = match parsers[index].as_mut() {
                    Some(p) => {
                        let outs = p.push(&token.text);
                        shape.tool_chunks(&gw, index, outs, Some(&token))
                    }
                    None if !token.text.is_empty() || shape.logprobs => {
                        vec![shape.chunk(&gw, index, &token.text, Some(&token), None)]
                    }
                    None => Vec::new(),
                };
                for c in chunks {
                    if !send(api::sse(&c)).await {
                        return;
                    }
                }
            }
            Some(Item::Done {
                index,
                reason,
                accounting,
                completion: c,
            }) => {
                completion += c;
                let mut chunk = shape.chunk(&gw, index, "", None, Some(reason));
                if let Some(p) = parsers[index].as_mut() {
                    let outs = p.finish();
                    for c in shape.tool_chunks(&gw, index, outs, None) {
                        if !send(api::sse(&c)).await {
                            return;
                        }
                    }
                    if !p.calls().is_empty() && reason == FinishReason::Stop {
                        chunk["choices"][0]["finish_reason"] = json!("tool_calls");
                    }
                }
                chunk["tandem"] = timing(&accounting);
                if !send(api::sse(&chunk)).await {
                    return;
                }
                left -= 1;
                if left == 0 {
                    if shape.include_usage {
                        let _ = send(api::sse(
                            &shape.usage(Usage::new(prompt_tokens, completion)),
                        ))
                        .await;
                    }
                    let _ = send(api::SSE_DONE.to_string()).await;
                    return;
                }
            }
            Some(Item::Failed { error }) => {
                let _ = send(api::sse(&error.body())).await;
                return;
            }
            None => {
                let e = ApiError::Internal("a choice ended without a result".into());
                let _ = send(api::sse(&e.body())).await;
                return;
            }
        }
    }
}

/// A request its decode group did not end by its deadline.
fn past_deadline(gw: &Gateway) -> ApiError {
    gw.metrics.errors.with_label_values(&["504"]).inc();
    ApiError::Timeout(format!(
        "the request was still running {} s after it arrived",
        (gw.request_timeout + DEADLINE_GRACE).as_secs()
    ))
}

/// Follows one choice to its end: its tokens (each once, across a move to
/// another decode group), then `Done` or `Failed`. Returns early when the
/// response is gone; dropping its guard then cancels the request.
async fn drive(gw: Arc<Gateway>, ticket: Ticket, index: usize, tx: mpsc::Sender<Item>) {
    let Ticket {
        deadline,
        mut guard,
        mut rx,
        first,
        prompt_tokens,
        gateway_us,
        mut resume,
        ..
    } = ticket;
    let mut generated = Vec::new();
    let mut ev = Some(first);
    let mut last_token = guard.started;
    loop {
        let e = match ev.take() {
            // The decode group was lost mid-answer: the choice goes on from
            // another one, or ends with an error (never a `stop`).
            None
            | Some(GenerateEvent::Failed {
                class: ErrorClass::NodeLost,
                ..
            }) => {
                let next = tokio::select! {
                    r = continue_elsewhere(&gw, &mut resume, &mut guard, &mut rx, &generated) => r,
                    _ = tx.closed() => return,
                };
                match next {
                    Ok(first) => {
                        ev = Some(first);
                        continue;
                    }
                    Err(error) => {
                        let _ = tx.send(Item::Failed { error }).await;
                        return;
                    }
                }
            }
            Some(e) => e,
        };
        match e {
            GenerateEvent::Token {
                index: at,
                token,
                logprob,
                top,
                text,
            } => {
                // Tokens at or past what was streamed before a loss are new.
                if (at as usize) >= generated.len() {
                    generated.push(token);
                    gw.metrics
                        .token((generated.len() > 1).then(|| last_token.elapsed()));
                    last_token = Instant::now();
                    let t = Token {
                        text,
                        token,
                        logprob,
                        top,
                    };
                    if tx.send(Item::Token { index, token: t }).await.is_err() {
                        return;
                    }
                }
            }
            GenerateEvent::Finished {
                reason,
                mut accounting,
            } => {
                guard.done = true;
                accounting.gateway_queue_us = gateway_us;
                let e2e = guard.started.elapsed();
                let ttft = guard.first.map_or(e2e, |f| f - guard.started);
                gw.metrics.finish(
                    prompt_tokens,
                    generated.len(),
                    (ttft, e2e),
                    reason,
                    &accounting,
                );
                let _ = tx
                    .send(Item::Done {
                        index,
                        reason,
                        accounting,
                        completion: generated.len(),
                    })
                    .await;
                return;
            }
            GenerateEvent::Failed { class, message } => {
                guard.done = true;
                gw.metrics.serving.ended("error");
                let _ = tx
                    .send(Item::Failed {
                        error: api_error(class, message),
                    })
                    .await;
                return;
            }
        }
        ev = tokio::select! {
            e = rx.recv() => e,
            _ = tx.closed() => return, // the response is gone: the guard cancels
            // Its decode group did not end it in time: the choice ends with
            // an error, and the guard cancels it there.
            _ = tokio::time::sleep_until(deadline) => {
                let _ = tx.send(Item::Failed { error: past_deadline(&gw) }).await;
                return;
            }
        };
    }
}

/// After the decode group was lost mid-answer: the request continues on
/// another group from the tokens already sent, and the next event comes
/// from there; or the error that ends it.
async fn continue_elsewhere(
    gw: &Arc<Gateway>,
    resume: &mut Resume,
    guard: &mut Guard,
    rx: &mut mpsc::UnboundedReceiver<GenerateEvent>,
    generated: &[u32],
) -> Result<GenerateEvent, ApiError> {
    // The lost group has nothing left to cancel.
    guard.done = true;
    tracing::warn!(
        "request {} lost its decode group after {} tokens; continuing elsewhere",
        guard.id.0,
        generated.len()
    );
    let t = gw.resume(resume, generated).await?;
    *guard = t.guard;
    *rx = t.rx;
    *resume = t.resume;
    Ok(t.first)
}
