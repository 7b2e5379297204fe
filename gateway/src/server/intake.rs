//! A request's way in: the body read under its limits, validated,
//! templated and tokenized off the runtime, sent to a decode group (every
//! choice), answered, and tagged with its request id.

use super::*;

pub(super) async fn chat(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    generate(gw, headers, body, Kind::Chat).await
}

pub(super) async fn completions(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    generate(gw, headers, body, Kind::Completion).await
}

/// The whole body, within the size limit and the body timeout: a
/// `Content-Length` over the limit is refused before any of it is read.
pub(super) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::TooLarge(format!("the limit is {limit} bytes"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let limited = http_body_util::Limited::new(body, limit);
    match tokio::time::timeout(timeout, http_body_util::BodyExt::collect(limited)).await {
        Err(_) => Err(ApiError::RequestTimeout(format!(
            "the request body did not arrive within {} s",
            timeout.as_secs_f64()
        ))),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::BadRequest {
            message: format!("cannot read the request body: {e}"),
            param: None,
        }),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// A request after validation and tokenization.
struct Prepared {
    prompt: Vec<u32>,
    /// The session key: `X-Session-Id`, else `user`, else (chat) the conversation's start.
    session: Option<String>,
    params: SamplingParams,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
    n: usize,
    /// The answer is parsed for tool calls.
    tools: bool,
    /// The field a grammar that cannot be compiled is blamed on.
    grammar_param: &'static str,
}

impl Gateway {
    fn tokenize_chat(
        &self,
        messages: &[tandem_model::ChatMessage],
        tools: Option<&crate::tools::ToolSpec>,
    ) -> Result<Vec<u32>, ApiError> {
        let text = self.render_chat(messages, tools, true)?;
        self.file
            .tokenizer
            .encode_prompt(&text)
            .map_err(|e| ApiError::bad("messages", e.to_string()))
    }

    /// The conversation through the chat template, with the request's
    /// tools (see [`crate::tools::prepare`]).
    pub(super) fn render_chat(
        &self,
        messages: &[tandem_model::ChatMessage],
        tools: Option<&crate::tools::ToolSpec>,
        add_generation_prompt: bool,
    ) -> Result<String, ApiError> {
        let t = self.file.chat_template.as_ref().ok_or_else(|| {
            ApiError::bad(
                "messages",
                "this model has no chat template; use /v1/completions",
            )
        })?;
        let (messages, declared) = crate::tools::prepare(messages, tools, t.takes_tools());
        t.render_with_tools(&messages, declared.as_ref(), add_generation_prompt)
            .map_err(|e| {
                ApiError::bad(
                    "messages",
                    format!("the chat template refused the conversation: {e}"),
                )
            })
    }

    fn tokenize_prompt(&self, p: &PromptInput) -> Result<Vec<u32>, ApiError> {
        match p {
            PromptInput::Text(t) => self
                .file
                .tokenizer
                .encode_prompt(t)
                .map_err(|e| ApiError::bad("prompt", e.to_string())),
            PromptInput::Tokens(ids) => {
                let v = self.file.tokenizer.vocab_size();
                if let Some(t) = ids.iter().find(|&&t| t as usize >= v) {
                    return Err(ApiError::bad(
                        "prompt",
                        format!("token id {t} is outside the vocabulary of {v}"),
                    ));
                }
                Ok(ids.clone())
            }
        }
    }

    fn limits(&self) -> api::Limits {
        api::Limits {
            context: self.context,
            vocab: self.file.tokenizer.vocab_size(),
        }
    }

    fn prepare(&self, body: &[u8], kind: Kind) -> Result<Prepared, ApiError> {
        let (mut p, explicit_max) = match kind {
            Kind::Chat => {
                let job = tracing::info_span!("parse").in_scope(|| {
                    api::validate_chat(
                        api::parse_chat(body)?,
                        &self.model,
                        &self.defaults,
                        self.limits(),
                    )
                })?;
                (
                    Prepared {
                        prompt: tracing::info_span!("template")
                            .in_scope(|| self.tokenize_chat(&job.messages, job.tools.as_ref()))?,
                        session: job.user.clone().or_else(|| conversation_key(&job.messages)),
                        params: job.params,
                        stream: job.stream,
                        include_usage: job.include_usage,
                        logprobs: job.logprobs,
                        n: job.n,
                        tools: job.tools.is_some(),
                        grammar_param: match &job.tools {
                            Some(t) if t.choice != crate::tools::Choice::Auto => "tool_choice",
                            _ => "response_format",
                        },
                    },
                    job.explicit_max,
                )
            }
            Kind::Completion => {
                let job = tracing::info_span!("parse").in_scope(|| {
                    api::validate_completion(
                        api::parse_completion(body)?,
                        &self.model,
                        &self.defaults,
                        self.limits(),
                    )
                })?;
                (
                    Prepared {
                        prompt: tracing::info_span!("template")
                            .in_scope(|| self.tokenize_prompt(&job.prompt))?,
                        session: job.user.clone(),
                        params: job.params,
                        stream: job.stream,
                        include_usage: job.include_usage,
                        logprobs: job.logprobs,
                        n: job.n,
                        tools: false,
                        grammar_param: "response_format",
                    },
                    job.explicit_max,
                )
            }
        };
        if let Some(g) = &p.params.grammar {
            let env = self.grammar.as_ref().ok_or_else(|| {
                ApiError::bad(
                    p.grammar_param,
                    "structured outputs are not available for this model",
                )
            })?;
            env.compile(g)
                .map_err(|e| ApiError::bad(p.grammar_param, e.to_string()))?;
        }
        // A completion that cannot fit is refused when the client asked
        // for it, and cut to the room left when it is the default.
        let room = self.context.saturating_sub(p.prompt.len());
        if p.params.max_tokens > room {
            if explicit_max && room > 0 {
                return Err(ApiError::bad(
                    "max_tokens",
                    format!(
                        "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the prompt, {} in the completion). Please reduce the length of the prompt or completion.",
                        self.context,
                        p.prompt.len() + p.params.max_tokens,
                        p.prompt.len(),
                        p.params.max_tokens
                    ),
                ));
            }
            p.params.max_tokens = room.max(1);
        }
        Ok(p)
    }
}

async fn generate(gw: Arc<Gateway>, headers: HeaderMap, body: Body, kind: Kind) -> Response {
    let (endpoint, prefix) = match kind {
        Kind::Chat => ("chat", "chatcmpl"),
        Kind::Completion => ("completions", "cmpl"),
    };
    gw.metrics.requests.with_label_values(&[endpoint]).inc();
    let request_id = request_id(&headers);
    let received = super::Received {
        at: Instant::now(),
        request_id: request_id.as_str().into(),
    };
    let span = tracing::info_span!("request", request_id = %request_id, endpoint);
    let r = async {
        // Admitted first: a flood gets its 429 before it costs any work.
        let permit = gw.admit()?;
        let body = read_body(&headers, body, gw.max_body, gw.body_timeout).await?;
        // Templates and tokenization are CPU work: off the runtime.
        let g = gw.clone();
        let span = tracing::Span::current();
        let p = tokio::task::spawn_blocking(move || span.in_scope(|| g.prepare(&body, kind)))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??;
        // Session keys are the client's text: kept as fixed-size digests.
        let session = session_header(&headers)
            .or(p.session)
            .map(|k| session_key(&k));
        let choice = |i: usize| {
            let mut params = p.params.clone();
            // Each choice its own seeded stream, reproducible as a whole.
            params.seed = params.seed.map(|s| s.wrapping_add(i as u64));
            params
        };
        // The first choice computes the prompt; the others go where it went
        // once its first token is in, and find the prompt's blocks cached.
        let first = gw
            .submit(
                p.prompt.clone(),
                choice(0),
                session.clone(),
                &received,
                None,
            )
            .await?;
        let follow = first.follow.clone();
        let rest = futures_util::future::join_all((1..p.n).map(|i| {
            gw.submit(
                p.prompt.clone(),
                choice(i),
                session.clone(),
                &received,
                Some(&follow),
            )
        }))
        .await;
        let mut tickets = vec![first];
        for t in rest {
            tickets.push(t?);
        }
        let shape = Shape {
            kind,
            id: format!("{prefix}-{:032x}", rand::random::<u128>()),
            created: now_s(),
            model: gw.model.clone(),
            include_usage: p.include_usage,
            logprobs: p.logprobs,
            n: p.n,
            tools: p.tools,
        };
        Ok::<_, ApiError>(respond(gw.clone(), tickets, permit, shape, p.stream).await)
    }
    .instrument(span)
    .await;
    let mut resp = r.unwrap_or_else(|e| {
        gw.metrics
            .errors
            .with_label_values(&[&e.status().to_string()])
            .inc();
        error_response(&e)
    });
    if let Ok(v) = header::HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// The request's id for logs and the response: the client's
/// `x-request-id` when it is 1 to 128 visible ASCII characters, else a
/// fresh random one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()))
}
