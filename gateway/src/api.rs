//! OpenAI's chat and completions API: request parsing and validation, error
//! bodies with their HTTP status (decided here, in one place), and the
//! response and streaming chunk shapes.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tandem_model::{ChatMessage, FinishReason, GenerationDefaults, Grammar, SamplingParams};

mod fields;
mod sampling;
mod structured;
pub use fields::field_names;
pub use sampling::{
    validate_sampling, Defaults, Limits, SamplingJob, DEFAULT_MAX_CHOICES, DEFAULT_MAX_TOKENS,
};
pub use structured::{grammar_of, StructuredOutputs};

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
            ApiError::RequestTimeout(_) => {
                ("invalid_request_error", json!("request_timeout"), None)
            }
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
    /// An assistant's calls, in OpenAI's shape.
    pub tool_calls: Option<Value>,
    /// A `tool` message's call.
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
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
/// Unknown fields are accepted (OpenAI's own clients send some this server
/// has no use for) and logged once each at debug.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Extension (vLLM, llama.cpp): keep only the k most likely tokens.
    pub top_k: Option<i64>,
    /// Extension (vLLM, llama.cpp): drop tokens less likely than `min_p`
    /// times the most likely one.
    pub min_p: Option<f64>,
    /// Extension (vLLM, Hugging Face): divide (or multiply, when negative)
    /// the logits of tokens already in the prompt or the answer.
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string) → bias added to its logit, -100 to 100.
    pub logit_bias: Option<BTreeMap<String, f64>>,
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
    /// vLLM's structured-output extensions: JSON matching a schema (object
    /// or JSON text), text matching a regex, one of some strings, text of a
    /// Lark grammar.
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
    /// vLLM's newer form of the same: `{json | regex | choice | grammar | json_object}`.
    pub structured_outputs: Option<StructuredOutputs>,
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
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<Value>,
    /// The shared fields, read from the same object.
    #[serde(skip)]
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
    /// Choices to generate.
    pub n: usize,
    /// Whether the client named `max_tokens` (else the default, cut to
    /// the room the context has left).
    pub explicit_max: bool,
    /// The declared tools, unless there are none or `tool_choice` is `none`.
    pub tools: Option<crate::tools::ToolSpec>,
}

/// Most entries a `logit_bias` may have.
pub const MAX_LOGIT_BIAS: usize = 1024;

/// Request fields this server does not know, each logged once (the first
/// 256 distinct names).
fn note_unknown(endpoint: &str, obj: &serde_json::Map<String, Value>, known: &[&[&str]]) {
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    for k in obj.keys() {
        if known.iter().any(|f| f.contains(&k.as_str())) {
            continue;
        }
        let Ok(mut seen) = SEEN.lock() else { return };
        let seen = seen.get_or_insert_with(HashSet::new);
        if seen.len() < 256 && seen.insert(k.clone()) {
            tracing::debug!("{endpoint}: ignoring the unknown request field '{k}'");
        }
    }
}

/// Parses a body into a request type `T` and the shared [`Sampling`]
/// fields from the same object; any other field is accepted and noted.
fn parse_with_sampling<T: serde::de::DeserializeOwned>(
    body: &[u8],
    endpoint: &str,
) -> Result<(T, Sampling), ApiError> {
    let malformed = |e: serde_json::Error| ApiError::BadRequest {
        message: format!("Malformed request body: {e}"),
        param: None,
    };
    let v: Value = serde_json::from_slice(body).map_err(malformed)?;
    let Value::Object(obj) = &v else {
        return Err(ApiError::BadRequest {
            message: "Malformed request body: expected a JSON object".into(),
            param: None,
        });
    };
    note_unknown(
        endpoint,
        obj,
        &[field_names::<T>(), field_names::<Sampling>()],
    );
    let t = T::deserialize(&v).map_err(malformed)?;
    let s = Sampling::deserialize(&v).map_err(malformed)?;
    Ok((t, s))
}

/// Most stop strings a request may give (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// Longest stop string, in bytes.
pub const MAX_STOP_LEN: usize = 256;

/// Parses a request body; malformed JSON and wrong types are 400s naming the problem.
pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let (mut r, s) = parse_with_sampling::<ChatRequest>(body, "chat")?;
    r.sampling = s;
    Ok(r)
}

/// Checks every field and turns the request into sampling parameters.
/// `served` is the model name this cluster answers to; `defaults` apply to
/// the fields the request leaves out; `limits` are the model's context
/// and vocabulary.
pub fn validate_chat(
    req: ChatRequest,
    served: &str,
    defaults: &Defaults,
    limits: Limits,
) -> Result<ChatJob, ApiError> {
    if req.model != served {
        return Err(ApiError::ModelNotFound(req.model));
    }
    let messages = chat_messages(&req.messages)?;
    let top_logprobs = req.top_logprobs.unwrap_or(0);
    if top_logprobs > 0 && !req.logprobs {
        return Err(ApiError::bad(
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        ));
    }
    if top_logprobs > u64::from(tandem_model::sampling::MAX_TOP_LOGPROBS) {
        return Err(ApiError::bad(
            "top_logprobs",
            format!(
                "top_logprobs must be at most {}, got {top_logprobs}",
                tandem_model::sampling::MAX_TOP_LOGPROBS
            ),
        ));
    }
    let tools = crate::tools::parse(
        req.tools.as_ref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )?;
    let mut grammar = grammar_of(&req.sampling, req.response_format.as_ref())?;
    if let Some(g) = tools.as_ref().and_then(|t| t.grammar()) {
        if let Some((_, p)) = grammar {
            return Err(ApiError::bad(
                p,
                "a required or named tool_choice cannot be combined with a structured-output format",
            ));
        }
        grammar = Some((g, "tool_choice"));
    }
    let mut s = validate_sampling(req.sampling, req.max_completion_tokens, defaults, limits)?;
    s.params.top_logprobs = top_logprobs as u32;
    s.params.grammar = grammar.map(|g| g.0);
    Ok(ChatJob {
        messages,
        params: s.params,
        stream: s.stream,
        include_usage: s.include_usage,
        logprobs: req.logprobs,
        user: s.user,
        n: s.n,
        explicit_max: s.explicit_max,
        tools,
    })
}

/// `POST /tokenize`: a prompt or chat messages (vLLM's request shape).
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<InMessage>>,
    /// Add BOS where the model wants it (default true: for messages, the
    /// ids a chat completion's prompt has).
    pub add_special_tokens: Option<bool>,
    /// Messages: end with the assistant's turn opening (default true).
    pub add_generation_prompt: Option<bool>,
    pub return_token_strs: Option<bool>,
    /// Messages: the tools a chat request would declare.
    pub tools: Option<Value>,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

/// Chat messages as the template takes them; roles and content parts checked.
pub fn chat_messages(input: &[InMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    if input.is_empty() {
        return Err(ApiError::bad(
            "messages",
            "'messages' must contain at least one message",
        ));
    }
    let mut messages = Vec::with_capacity(input.len());
    for (i, m) in input.iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer" | "tool"
        ) {
            return Err(ApiError::bad(
                &format!("messages[{i}].role"),
                format!(
                    "role '{}' is not one of system, user, assistant, developer, tool",
                    m.role
                ),
            ));
        }
        let tool_calls = match &m.tool_calls {
            None | Some(Value::Null) => None,
            Some(_) if m.role != "assistant" => {
                return Err(ApiError::bad(
                    &format!("messages[{i}].tool_calls"),
                    "only assistant messages carry tool_calls",
                ))
            }
            Some(Value::Array(calls)) => {
                for (j, c) in calls.iter().enumerate() {
                    let f = &c["function"];
                    if !f["name"].is_string()
                        || !(f["arguments"].is_string() || f["arguments"].is_object())
                    {
                        return Err(ApiError::bad(
                            &format!("messages[{i}].tool_calls[{j}]"),
                            "a tool call is {\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\"}}",
                        ));
                    }
                }
                Some(Value::Array(calls.clone()))
            }
            Some(_) => {
                return Err(ApiError::bad(
                    &format!("messages[{i}].tool_calls"),
                    "tool_calls must be an array",
                ))
            }
        };
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
        let mut msg = ChatMessage::new(role, &content);
        msg.tool_calls = tool_calls;
        msg.tool_call_id = m.tool_call_id.clone();
        msg.name = m.name.clone();
        messages.push(msg);
    }
    Ok(messages)
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

/// One token's entry in a chat response's `logprobs.content`: its text,
/// log-probability and bytes, and the most likely alternatives'.
pub fn chat_logprob(token: &str, logprob: f32, top: &[(String, f32)]) -> Value {
    json!({
        "token": token,
        "logprob": logprob,
        "bytes": token.as_bytes(),
        "top_logprobs": top
            .iter()
            .map(|(t, lp)| json!({ "token": t, "logprob": lp, "bytes": t.as_bytes() }))
            .collect::<Vec<_>>(),
    })
}

/// One `chat.completion.chunk` of a stream, for choice `index`. The first
/// carries the role, the last the finish reason; with `include_usage`,
/// every chunk has `"usage": null` and a final chunk with no choices
/// carries the usage. `logprob` is a [`chat_logprob`] entry.
#[allow(clippy::too_many_arguments)]
pub fn chat_chunk(
    id: &str,
    created: u64,
    model: &str,
    index: usize,
    delta: Value,
    finish: Option<FinishReason>,
    logprob: Option<Value>,
    with_usage_field: bool,
) -> Value {
    let mut choice = json!({ "index": index, "delta": delta, "logprobs": Value::Null, "finish_reason": finish.map(finish_str) });
    if let Some(entry) = logprob {
        choice["logprobs"] = json!({ "content": [entry] });
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

/// One choice of a whole (non-streaming) `chat.completion`.
pub fn chat_choice(index: usize, text: &str, finish: FinishReason) -> Value {
    json!({ "index": index, "message": { "role": "assistant", "content": text }, "logprobs": Value::Null, "finish_reason": finish_str(finish) })
}

/// A whole (non-streaming) `chat.completion` of [`chat_choice`]s.
pub fn chat_completion(
    id: &str,
    created: u64,
    model: &str,
    choices: Vec<Value>,
    usage: Usage,
) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": Value::Null,
        "choices": choices,
        "usage": usage,
    })
}

/// `POST /v1/completions`: a raw prompt, no chat template.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    /// A string, a one-element list of strings, token ids, or a one-element list of those.
    pub prompt: Value,
    /// The chosen token's log-probability and this many alternatives'.
    pub logprobs: Option<u64>,
    /// `json_object` or `json_schema` (as chat's) constrain the text.
    pub response_format: Option<Value>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    /// The shared fields, read from the same object.
    #[serde(skip)]
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
    pub n: usize,
    pub explicit_max: bool,
}

pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let (mut r, s) = parse_with_sampling::<CompletionRequest>(body, "completions")?;
    r.sampling = s;
    Ok(r)
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
    defaults: &Defaults,
    limits: Limits,
) -> Result<CompletionJob, ApiError> {
    if req.echo {
        return Err(ApiError::bad("echo", "echo is not supported"));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad("suffix", "suffix is not supported"));
    }
    let max = u64::from(tandem_model::sampling::MAX_TOP_LOGPROBS);
    if let Some(k) = req.logprobs.filter(|k| *k > max) {
        return Err(ApiError::bad(
            "logprobs",
            format!("logprobs must be at most {max}, got {k}"),
        ));
    }
    if req.model != served {
        return Err(ApiError::ModelNotFound(req.model));
    }
    let prompt = prompt_input(&req.prompt)?;
    let grammar = grammar_of(&req.sampling, req.response_format.as_ref())?;
    let mut s = validate_sampling(req.sampling, None, defaults, limits)?;
    s.params.top_logprobs = req.logprobs.unwrap_or(0) as u32;
    s.params.grammar = grammar.map(|g| g.0);
    Ok(CompletionJob {
        prompt,
        params: s.params,
        stream: s.stream,
        include_usage: s.include_usage,
        logprobs: req.logprobs.is_some(),
        user: s.user,
        n: s.n,
        explicit_max: s.explicit_max,
    })
}

/// A completion choice's `logprobs` over its tokens: (text,
/// log-probability, alternatives) each.
pub fn completion_logprobs(tokens: &[(String, f32, Vec<(String, f32)>)]) -> Value {
    json!({
        "tokens": tokens.iter().map(|(t, _, _)| t.clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|(_, lp, _)| *lp).collect::<Vec<_>>(),
        "top_logprobs": tokens
            .iter()
            .map(|(_, _, top)| {
                top.iter()
                    .map(|(t, lp)| (t.clone(), json!(lp)))
                    .collect::<serde_json::Map<String, Value>>()
            })
            .collect::<Vec<_>>(),
        "text_offset": Value::Null,
    })
}

/// One `text_completion` choice.
pub fn completion_choice(
    index: usize,
    text: &str,
    finish: Option<FinishReason>,
    logprobs: Option<Value>,
) -> Value {
    json!({ "index": index, "text": text, "logprobs": logprobs, "finish_reason": finish.map(finish_str) })
}

/// A `text_completion` object: one chunk of a stream, or (with a `usage`
/// added) the whole response.
pub fn completion(id: &str, created: u64, model: &str, choices: Vec<Value>) -> Value {
    json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": Value::Null,
        "choices": choices,
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
