//! Turning a request's events into OpenAI responses: whole bodies,
//! server-sent event streams, and the accounting that rides along.

use super::*;

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
}

impl Shape {
    fn chunk(
        &self,
        gw: &Gateway,
        text: &str,
        token: Option<(u32, f32)>,
        finish: Option<FinishReason>,
    ) -> Value {
        let lp = token
            .filter(|_| self.logprobs)
            .map(|(t, lp)| (gw.token_text(t), lp));
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
                    delta,
                    finish,
                    lp,
                    self.include_usage,
                )
            }
            Kind::Completion => {
                let mut c =
                    api::completion_chunk(&self.id, self.created, &self.model, text, finish, lp);
                if self.include_usage {
                    c["usage"] = Value::Null;
                }
                c
            }
        }
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
        "kv_transport": a.kv_transport,
        "first_step_us": a.first_step_us,
    })
}

pub(super) async fn respond(
    gw: Arc<Gateway>,
    ticket: Ticket,
    shape: Shape,
    stream: bool,
) -> Response {
    let headers = ticket.headers.clone();
    let mut r = respond_body(gw, ticket, shape, stream).await;
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
        ("x-tandem-first-step-us", a.first_step_us.to_string()),
        ("x-tandem-kv-transport", a.kv_transport.clone()),
    ] {
        if let Ok(v) = header::HeaderValue::from_str(&v) {
            r.headers_mut().insert(k, v);
        }
    }
}

async fn respond_body(gw: Arc<Gateway>, ticket: Ticket, shape: Shape, stream: bool) -> Response {
    if stream {
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        tokio::spawn(stream_events(gw, ticket, shape, tx));
        let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
        }));
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(body)
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    let Ticket {
        permit: _permit,
        deadline,
        mut guard,
        mut rx,
        first,
        prompt_tokens,
        gateway_us,
        mut resume,
        ..
    } = ticket;
    let mut text = String::new();
    let mut completion = 0usize;
    let mut logprobs = Vec::new();
    let mut generated = Vec::new();
    let mut ev = Some(first);
    loop {
        let e = match ev.take() {
            None
            | Some(GenerateEvent::Failed {
                class: ErrorClass::NodeLost,
                ..
            }) => {
                match continue_elsewhere(&gw, &mut resume, &mut guard, &mut rx, &generated).await {
                    Ok(first) => {
                        ev = Some(first);
                        continue;
                    }
                    Err(e) => return error_response(&e),
                }
            }
            Some(e) => e,
        };
        match e {
            GenerateEvent::Token {
                index,
                token,
                logprob,
                text: t,
            } => {
                if (index as usize) < generated.len() {
                    ev = rx.recv().await;
                    continue;
                }
                generated.push(token);
                completion += 1;
                text.push_str(&t);
                if shape.logprobs {
                    logprobs.push((gw.token_text(token), logprob));
                }
                gw.metrics.tokens_out.inc();
            }
            GenerateEvent::Finished {
                reason,
                mut accounting,
            } => {
                guard.done = true;
                accounting.gateway_queue_us = gateway_us;
                let usage = Usage::new(prompt_tokens, completion);
                gw.metrics
                    .finish(prompt_tokens, guard.started.elapsed(), &accounting);
                let mut v = match shape.kind {
                    Kind::Chat => api::chat_completion(
                        &shape.id,
                        shape.created,
                        &shape.model,
                        &text,
                        reason,
                        usage,
                    ),
                    Kind::Completion => {
                        let mut c = api::completion_chunk(
                            &shape.id,
                            shape.created,
                            &shape.model,
                            &text,
                            Some(reason),
                            None,
                        );
                        c["usage"] = json!(usage);
                        c
                    }
                };
                if shape.logprobs {
                    let content: Vec<Value> = logprobs
                        .iter()
                        .map(|(t, lp)| json!({ "token": t, "logprob": lp, "bytes": t.as_bytes(), "top_logprobs": [] }))
                        .collect();
                    v["choices"][0]["logprobs"] = match shape.kind {
                        Kind::Chat => json!({ "content": content }),
                        Kind::Completion => json!({
                            "tokens": logprobs.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>(),
                            "token_logprobs": logprobs.iter().map(|(_, l)| *l).collect::<Vec<_>>(),
                            "top_logprobs": Value::Null,
                            "text_offset": Value::Null,
                        }),
                    };
                }
                v["tandem"] = timing(&accounting);
                let mut r = (StatusCode::OK, axum::Json(v)).into_response();
                accounting_headers(&mut r, &accounting);
                return r;
            }
            GenerateEvent::Failed { class, message } => {
                guard.done = true;
                return error_response(&api_error(class, message));
            }
        }
        ev = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(e) => e,
            // Dropping the guard cancels it on its decode group.
            Err(_) => return error_response(&past_deadline(&gw)),
        };
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

async fn stream_events(gw: Arc<Gateway>, ticket: Ticket, shape: Shape, tx: mpsc::Sender<Bytes>) {
    let Ticket {
        permit: _permit,
        deadline,
        mut guard,
        mut rx,
        first,
        prompt_tokens,
        gateway_us,
        mut resume,
        ..
    } = ticket;
    let send = |v: String| {
        let tx = tx.clone();
        async move { tx.send(Bytes::from(v)).await.is_ok() }
    };
    if shape.kind == Kind::Chat {
        let role = api::chat_chunk(
            &shape.id,
            shape.created,
            &shape.model,
            json!({ "role": "assistant", "content": "" }),
            None,
            None,
            shape.include_usage,
        );
        if !send(api::sse(&role)).await {
            return;
        }
    }
    let mut completion = 0usize;
    let mut generated = Vec::new();
    let mut ev = Some(first);
    let mut last_token = guard.started;
    loop {
        let e = match ev.take() {
            // The decode group was lost mid-answer: the stream goes on from
            // another one, or ends with an error event (never a `stop`).
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
                    Err(err) => {
                        let _ = send(api::sse(&err.body())).await;
                        return;
                    }
                }
            }
            Some(e) => e,
        };
        match e {
            GenerateEvent::Token {
                index,
                token,
                logprob,
                text,
            } => {
                if (index as usize) < generated.len() {
                    // Already streamed before the loss.
                    ev = tokio::select! {
                        e = rx.recv() => e,
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep_until(deadline) => {
                            let _ = send(api::sse(&past_deadline(&gw).body())).await;
                            return;
                        }
                    };
                    continue;
                }
                generated.push(token);
                completion += 1;
                gw.metrics.tokens_out.inc();
                if completion > 1 {
                    gw.metrics.itl.observe(last_token.elapsed().as_secs_f64());
                }
                last_token = Instant::now();
                if !text.is_empty() || shape.logprobs {
                    let c = shape.chunk(&gw, &text, Some((token, logprob)), None);
                    if !send(api::sse(&c)).await {
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
                gw.metrics
                    .finish(prompt_tokens, guard.started.elapsed(), &accounting);
                let mut c = shape.chunk(&gw, "", None, Some(reason));
                c["tandem"] = timing(&accounting);
                let _ = send(api::sse(&c)).await;
                if shape.include_usage {
                    let _ = send(api::sse(
                        &shape.usage(Usage::new(prompt_tokens, completion)),
                    ))
                    .await;
                }
                let _ = send(api::SSE_DONE.to_string()).await;
                return;
            }
            GenerateEvent::Failed { class, message } => {
                guard.done = true;
                let _ = send(api::sse(&api_error(class, message).body())).await;
                return;
            }
        }
        ev = tokio::select! {
            e = rx.recv() => e,
            _ = tx.closed() => return, // the client left: the guard cancels
            // Its decode group did not end it in time: the stream ends
            // with an error event, and the guard cancels it there.
            _ = tokio::time::sleep_until(deadline) => {
                let _ = send(api::sse(&past_deadline(&gw).body())).await;
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
