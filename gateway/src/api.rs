//! OpenAI's chat and completions API: request parsing and validation, error
//! bodies with their HTTP status (decided here, in one place), and the
//! response and streaming chunk shapes.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tandem_model::{ChatMessage, FinishReason, SamplingParams};

/// Every way a request can fail, with the status it gets.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
    },
    #[error("The model '{0}' does not exist")]
    ModelNotFound(String),
    #[error("The server is overloaded; retry after {retry_after_s} s")]
    Overloaded { retry_after_s: u64 },
    #[error("No node is available to serve the request: {0}")]
    Unavailable(String),
    #[error("Missing or invalid API key: send Authorization: Bearer KEY")]
    Unauthorized,
    #[error("The request body is too large: {0}")]
    TooLarge(String),
    #[error("The request ran out of time: {0}")]
    Timeout(String),
    #[error("The client was too slow: {0}")]
    RequestTimeout(String),
    #[error("Internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest { .. } => 400,
            ApiError::Unauthorized => 401,
            ApiError::ModelNotFound(_) => 404,
            ApiError::RequestTimeout(_) => 408,
            ApiError::TooLarge(_) => 413,
            ApiError::Overloaded { .. } => 429,
            ApiError::Internal(_) => 500,
            ApiError::Unavailable(_) => 503,
            ApiError::Timeout(_) => 504,
        }
    }

    /// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> Value {
        let (kind, code, param) = match self {
            ApiError::BadRequest { param, .. } => {
                ("invalid_request_error", Value::Null, param.clone())
            }
            ApiError::ModelNotFound(_) => (
                "invalid_request_error",
                json!("model_not_found"),
                Some("model".into()),
            ),
            ApiError::Overloaded { .. } => ("rate_limit_error", json!("overloaded"), None),
            ApiError::Unavailable(_) => ("service_unavailable_error", json!("no_live_node"), None),
            ApiError::Unauthorized => ("authentication_error", json!("invalid_api_key"), None),
            ApiError::TooLarge(_) => ("invalid_request_error", json!("request_too_large"), None),
            ApiError::Timeout(_) => ("server_error", json!("timeout"), None),
            ApiError::RequestTimeout(_) => ("invalid_request_error", json!("request_timeout"), None),
            ApiError::Internal(_) => ("server_error", Value::Null, None),
        };
        json!({ "error": { "message": self.to_string(), "type": kind, "param": param, "code": code } })
    }
}

/// `content` is a string or a list of parts of which only text is supported.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct InMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling and streaming fields chat and completion requests share.
/// Unknown fields are ignored, as OpenAI's own clients send some this server
/// has no use for.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Extension (vLLM, llama.cpp): keep only the k most likely tokens.
    pub top_k: Option<i64>,
    pub n: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub user: Option<String>,
    /// Extension: generate past the end-of-turn token.
    #[serde(default)]
    pub ignore_eos: bool,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<InMessage>,
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u64>,
    pub tools: Option<Value>,
    pub response_format: Option<Value>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// A validated chat request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatJob {
    pub messages: Vec<ChatMessage>,
    pub params: SamplingParams,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
    pub user: Option<String>,
}

/// Most stop strings a request may give (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// Longest stop string, in bytes.
pub const MAX_STOP_LEN: usize = 256;

/// Parses a request body; malformed JSON and wrong types are 400s naming the problem.
pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest {
        message: format!("Malformed request body: {e}"),
        param: None,
    })
}

/// Checks every field and turns the request into sampling parameters.
/// `served` is the model name this cluster answers to; `default_max_tokens`
/// applies when the request gives none.
pub fn validate_chat(
    req: ChatRequest,
    served: &str,
    default_max_tokens: usize,
) -> Result<ChatJob, ApiError> {
    if req.model != served {
        return Err(ApiError::ModelNotFound(req.model));
    }
    if req.messages.is_empty() {
        return Err(ApiError::bad(
            "messages",
            "'messages' must contain at least one message",
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer"
        ) {
            return Err(ApiError::bad(
                &format!("messages[{i}].role"),
                format!(
                    "role '{}' is not one of system, user, assistant, developer",
                    m.role
                ),
            ));
        }
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p["type"].as_str(), p["text"].as_str()) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::bad(
                                &format!("messages[{i}].content[{j}]"),
                                "only text content parts are supported",
                            ))
                        }
                    }
                }
                text
            }
        };
        let role = if m.role == "developer" {
            "system"
        } else {
            m.role.as_str()
        };
        messages.push(ChatMessage::new(role, &content));
    }
    if req.top_logprobs.is_some_and(|k| k > 0) {
        return Err(ApiError::bad(
            "top_logprobs",
            "top_logprobs is not supported; logprobs gives the chosen token's",
        ));
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_null()) {
        return Err(ApiError::bad("tools", "tool calling is not supported"));
    }
    if let Some(f) = &req.response_format {
        if f["type"].as_str().is_some_and(|t| t != "text") {
            return Err(ApiError::bad(
                "response_format",
                "only the text response format is supported",
            ));
        }
    }
    let s = validate_sampling(req.sampling, req.max_completion_tokens, default_max_tokens)?;
    Ok(ChatJob {
        messages,
        params: s.params,
        stream: s.stream,
        include_usage: s.include_usage,
        logprobs: req.logprobs,
        user: s.user,
    })
}

/// What [`validate_sampling`] makes of the shared fields.
pub struct SamplingJob {
    pub params: SamplingParams,
    pub stream: bool,
    pub include_usage: bool,
    pub user: Option<String>,
}

/// Checks the shared fields and turns them into sampling parameters;
/// `max_override` (chat's `max_completion_tokens`) wins over `max_tokens`.
pub fn validate_sampling(
    req: Sampling,
    max_override: Option<u64>,
    default_max_tokens: usize,
) -> Result<SamplingJob, ApiError> {
    let max_tokens = match max_override.or(req.max_tokens) {
        None => default_max_tokens,
        Some(0) => return Err(ApiError::bad("max_tokens", "max_tokens must be at least 1")),
        Some(n) => usize::try_from(n)
            .map_err(|_| ApiError::bad("max_tokens", "max_tokens is too large"))?,
    };
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(
            "temperature",
            format!("temperature must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match req.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::bad(
                "top_k",
                format!("top_k must be positive (or -1 for none), got {k}"),
            ))
        }
    };
    if req.n.unwrap_or(1) != 1 {
        return Err(ApiError::bad("n", "only n = 1 is supported"));
    }
    for (name, v) in [
        ("presence_penalty", req.presence_penalty),
        ("frequency_penalty", req.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::bad(
                name,
                format!("{name} is not supported; leave it out or set it to 0"),
            ));
        }
    }
    let stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::bad(
            "stop",
            format!("at most {MAX_STOP} stop sequences are allowed"),
        ));
    }
    if stop.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_LEN) {
        return Err(ApiError::bad(
            "stop",
            format!("stop sequences must be 1 to {MAX_STOP_LEN} bytes"),
        ));
    }
    let params = SamplingParams {
        temperature: temperature as f32,
        top_k,
        top_p: top_p as f32,
        seed: req.seed.map(|s| s as u64),
        max_tokens,
        stop_token_ids: Vec::new(),
        stop,
        ignore_eos: req.ignore_eos,
    };
    params.validate().map_err(|e| ApiError::BadRequest {
        message: e.to_string(),
        param: None,
    })?;
    if !req.stream && req.stream_options.is_some() {
        return Err(ApiError::bad(
            "stream_options",
            "stream_options is only allowed with stream: true",
        ));
    }
    Ok(SamplingJob {
        params,
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        user: req.user,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

pub fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// One `chat.completion.chunk` of a stream. The first carries the role, the
/// last the finish reason; with `include_usage`, every chunk has
/// `"usage": null` and a final chunk with no choices carries the usage.
pub fn chat_chunk(
    id: &str,
    created: u64,
    model: &str,
    delta: Value,
    finish: Option<FinishReason>,
    logprob: Option<(String, f32)>,
    with_usage_field: bool,
) -> Value {
    let mut choice = json!({ "index": 0, "delta": delta, "logprobs": Value::Null, "finish_reason": finish.map(finish_str) });
    if let Some((token, lp)) = logprob {
        choice["logprobs"] = json!({ "content": [{ "token": token, "logprob": lp, "bytes": token.as_bytes(), "top_logprobs": [] }] });
    }
    let mut c = json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": Value::Null, "choices": [choice] });
    if with_usage_field {
        c["usage"] = Value::Null;
    }
    c
}

/// The final usage-only chunk of a stream that asked for usage.
pub fn usage_chunk(id: &str, created: u64, model: &str, usage: Usage) -> Value {
    json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": Value::Null, "choices": [], "usage": usage })
}

/// A whole (non-streaming) `chat.completion`.
pub fn chat_completion(
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    finish: FinishReason,
    usage: Usage,
) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": Value::Null,
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": text }, "logprobs": Value::Null, "finish_reason": finish_str(finish) }],
        "usage": usage,
    })
}

/// `POST /v1/completions`: a raw prompt, no chat template.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    /// A string, a one-element list of strings, token ids, or a one-element list of those.
    pub prompt: Value,
    /// How many top tokens' logprobs; this server gives the chosen token's, so 0 or 1.
    pub logprobs: Option<u64>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// A completion's prompt: text to tokenize, or token ids as given.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

/// A validated completion request.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionJob {
    pub prompt: PromptInput,
    pub params: SamplingParams,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
    pub user: Option<String>,
}

pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest {
        message: format!("Malformed request body: {e}"),
        param: None,
    })
}

fn prompt_input(v: &Value) -> Result<PromptInput, ApiError> {
    let bad = || {
        ApiError::bad(
            "prompt",
            "prompt must be a string, a list of token ids, or a one-element list of either",
        )
    };
    match v {
        Value::String(s) => Ok(PromptInput::Text(s.clone())),
        Value::Array(items) if items.len() == 1 && !items[0].is_number() => prompt_input(&items[0]),
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|t| {
                t.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(bad)
            })
            .collect::<Result<Vec<u32>, _>>()
            .map(PromptInput::Tokens),
        Value::Array(_) => Err(ApiError::bad("prompt", "prompt must not be empty")),
        _ => Err(bad()),
    }
}

/// Checks a completion request; the sampling fields follow the chat rules.
pub fn validate_completion(
    req: CompletionRequest,
    served: &str,
    default_max_tokens: usize,
) -> Result<CompletionJob, ApiError> {
    if req.echo {
        return Err(ApiError::bad("echo", "echo is not supported"));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad("suffix", "suffix is not supported"));
    }
    if req.logprobs.is_some_and(|k| k > 1) {
        return Err(ApiError::bad(
            "logprobs",
            "logprobs above 1 is not supported; 1 gives the chosen token's",
        ));
    }
    if req.model != served {
        return Err(ApiError::ModelNotFound(req.model));
    }
    let prompt = prompt_input(&req.prompt)?;
    let s = validate_sampling(req.sampling, None, default_max_tokens)?;
    Ok(CompletionJob {
        prompt,
        params: s.params,
        stream: s.stream,
        include_usage: s.include_usage,
        logprobs: req.logprobs.unwrap_or(0) > 0,
        user: s.user,
    })
}

/// One `text_completion` chunk of a stream, or (with `usage`) the whole response.
pub fn completion_chunk(
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    finish: Option<FinishReason>,
    logprob: Option<(String, f32)>,
) -> Value {
    let logprobs = logprob.map(|(t, lp)| {
        json!({ "tokens": [t], "token_logprobs": [lp], "top_logprobs": Value::Null, "text_offset": Value::Null })
    });
    json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": Value::Null,
        "choices": [{ "index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish.map(finish_str) }],
    })
}

/// One server-sent event line pair.
pub fn sse(data: &Value) -> String {
    format!("data: {data}\n\n")
}

/// The stream's last event.
pub const SSE_DONE: &str = "data: [DONE]\n\n";

#[cfg(test)]
mod tests;
