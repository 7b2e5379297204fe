//! OpenAI's chat and completions API: request parsing and validation, error
//! bodies with their HTTP status (decided here, in one place), and the
//! response and streaming chunk shapes.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tandem_model::{ChatMessage, FinishReason, GenerationDefaults, Grammar, SamplingParams};

mod fields;
pub use fields::field_names;

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

/// `structured_outputs`, as vLLM takes it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StructuredOutputs {
    pub json: Option<Value>,
    pub regex: Option<String>,
    pub choice: Option<Vec<String>>,
    pub grammar: Option<String>,
    pub json_object: Option<bool>,
}

/// A JSON schema given as an object or as JSON text.
fn schema_text(v: &Value, param: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => serde_json::from_str::<Value>(s)
            .map(|_| s.clone())
            .map_err(|e| ApiError::bad(param, format!("the schema is not JSON: {e}"))),
        Value::Object(_) | Value::Bool(_) => Ok(v.to_string()),
        _ => Err(ApiError::bad(param, "a JSON schema is an object")),
    }
}

/// The request's grammar, from OpenAI's `response_format` or vLLM's
/// extensions (at most one of them), and the field it came from.
pub fn grammar_of(
    s: &Sampling,
    response_format: Option<&Value>,
) -> Result<Option<(Grammar, &'static str)>, ApiError> {
    let mut found: Vec<(Grammar, &'static str)> = Vec::new();
    if let Some(f) = response_format.filter(|f| !f.is_null()) {
        let p = "response_format";
        match f["type"].as_str() {
            Some("text") => {}
            Some("json_object") => {
                found.push((Grammar::JsonSchema(r#"{"type":"object"}"#.into()), p))
            }
            Some("json_schema") => {
                let schema = &f["json_schema"]["schema"];
                if schema.is_null() {
                    return Err(ApiError::bad(
                        p,
                        "response_format json_schema needs json_schema.schema",
                    ));
                }
                found.push((Grammar::JsonSchema(schema_text(schema, p)?), p));
            }
            other => {
                return Err(ApiError::bad(
                    p,
                    format!(
                        "response_format type {} is not one of text, json_object, json_schema",
                        other.map_or("(missing)".to_string(), |t| format!("'{t}'"))
                    ),
                ))
            }
        }
    }
    let choice = |c: &[String], p: &'static str| -> Result<(Grammar, &'static str), ApiError> {
        if c.is_empty() || c.iter().any(String::is_empty) {
            return Err(ApiError::bad(
                p,
                "choices must be non-empty strings, at least one",
            ));
        }
        Ok((Grammar::choice(c), p))
    };
    if let Some(v) = &s.guided_json {
        found.push((
            Grammar::JsonSchema(schema_text(v, "guided_json")?),
            "guided_json",
        ));
    }
    if let Some(r) = &s.guided_regex {
        found.push((Grammar::Regex(r.clone()), "guided_regex"));
    }
    if let Some(c) = &s.guided_choice {
        found.push(choice(c, "guided_choice")?);
    }
    if let Some(g) = &s.guided_grammar {
        found.push((Grammar::Lark(g.clone()), "guided_grammar"));
    }
    if let Some(o) = &s.structured_outputs {
        let p = "structured_outputs";
        if let Some(v) = &o.json {
            found.push((Grammar::JsonSchema(schema_text(v, p)?), p));
        }
        if let Some(r) = &o.regex {
            found.push((Grammar::Regex(r.clone()), p));
        }
        if let Some(c) = &o.choice {
            found.push(choice(c, p)?);
        }
        if let Some(g) = &o.grammar {
            found.push((Grammar::Lark(g.clone()), p));
        }
        if o.json_object == Some(true) {
            found.push((Grammar::JsonSchema(r#"{"type":"object"}"#.into()), p));
        }
    }
    if found.len() > 1 {
        return Err(ApiError::bad(
            found[1].1,
            "give one structured-output constraint, not several",
        ));
    }
    Ok(found.pop())
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

/// What a request gets for each sampling field it leaves out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Defaults {
    pub temperature: f64,
    pub top_p: f64,
    /// 0: no cut.
    pub top_k: usize,
    pub min_p: f64,
    pub repetition_penalty: f64,
    pub max_tokens: usize,
    /// Most choices (`n`) a request may ask for.
    pub max_choices: usize,
    /// Where each value came from: `cluster` (the cluster file or `serve`
    /// flags), `model` (its GGUF metadata or `generation_config.json`) or
    /// `built-in` (llama.cpp's sampler chain).
    pub source: BTreeMap<&'static str, &'static str>,
}

/// llama.cpp's default sampler chain, for what neither the cluster nor
/// the model sets.
const BUILT_IN: (f32, f32, usize, f32, f32) = (0.8, 0.95, 40, 0.05, 1.0);
/// Tokens generated when nothing else says.
pub const DEFAULT_MAX_TOKENS: usize = 256;
/// Choices per request when nothing else says.
pub const DEFAULT_MAX_CHOICES: usize = 8;

impl Default for Defaults {
    fn default() -> Defaults {
        Defaults::resolve(
            &tandem_wire::config::SamplingSection::default(),
            &GenerationDefaults::default(),
        )
    }
}

impl Defaults {
    /// The cluster's settings first, then the model's, then built-in ones.
    pub fn resolve(
        cluster: &tandem_wire::config::SamplingSection,
        model: &GenerationDefaults,
    ) -> Defaults {
        let mut source = BTreeMap::new();
        // Kept as the decimal the setting was written as (no f32 tail).
        let mut pick = |name: &'static str, c: Option<f32>, m: Option<f32>, b: f32| -> f64 {
            let (v, from) = match (c, m) {
                (Some(v), _) => (v, "cluster"),
                (None, Some(v)) => (v, "model"),
                (None, None) => (b, "built-in"),
            };
            source.insert(name, from);
            (v as f64 * 1e6).round() / 1e6
        };
        let (bt, bp, bk, bm, br) = BUILT_IN;
        let temperature = pick("temperature", cluster.temperature, model.temperature, bt);
        let top_p = pick("top_p", cluster.top_p, model.top_p, bp);
        let top_k = pick(
            "top_k",
            cluster.top_k.map(|k| k as f32),
            model.top_k.map(|k| k as f32),
            bk as f32,
        ) as usize;
        let min_p = pick("min_p", cluster.min_p, model.min_p, bm);
        let repetition_penalty = pick(
            "repetition_penalty",
            cluster.repetition_penalty,
            model.repetition_penalty,
            br,
        );
        let max_tokens = pick(
            "max_tokens",
            cluster.max_tokens.map(|v| v as f32),
            None,
            DEFAULT_MAX_TOKENS as f32,
        ) as usize;
        let max_choices = pick(
            "max_choices",
            cluster.max_choices.map(|v| v as f32),
            None,
            DEFAULT_MAX_CHOICES as f32,
        ) as usize;
        Defaults {
            temperature,
            top_p,
            top_k,
            min_p,
            repetition_penalty,
            max_tokens,
            max_choices,
            source,
        }
    }
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

/// The model's limits a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Tokens of prompt and completion together.
    pub context: usize,
    pub vocab: usize,
}

/// What [`validate_sampling`] makes of the shared fields.
pub struct SamplingJob {
    pub params: SamplingParams,
    pub stream: bool,
    pub include_usage: bool,
    pub user: Option<String>,
    pub n: usize,
    pub explicit_max: bool,
}

/// Checks the shared fields and turns them into sampling parameters;
/// `max_override` (chat's `max_completion_tokens`) wins over `max_tokens`.
pub fn validate_sampling(
    req: Sampling,
    max_override: Option<u64>,
    defaults: &Defaults,
    limits: Limits,
) -> Result<SamplingJob, ApiError> {
    let explicit = max_override.or(req.max_tokens);
    let max_tokens = match explicit {
        None => defaults.max_tokens,
        Some(0) => return Err(ApiError::bad("max_tokens", "max_tokens must be at least 1")),
        Some(n) if n >= limits.context as u64 => {
            return Err(ApiError::bad(
                "max_tokens",
                format!(
                    "max_tokens is {n}, but this model's maximum context length is {} tokens (prompt and completion together)",
                    limits.context
                ),
            ))
        }
        Some(n) => n as usize,
    };
    let temperature = req.temperature.unwrap_or(defaults.temperature);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(
            "temperature",
            format!("temperature must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = req.top_p.unwrap_or(defaults.top_p);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match req.top_k {
        None => defaults.top_k,
        Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::bad(
                "top_k",
                format!("top_k must be positive (or -1 for none), got {k}"),
            ))
        }
    };
    let n = match req.n {
        None => 1,
        Some(n) if n >= 1 && n <= defaults.max_choices as u64 => n as usize,
        Some(n) => {
            return Err(ApiError::bad(
                "n",
                format!("n must be between 1 and {}, got {n}", defaults.max_choices),
            ))
        }
    };
    for (name, v) in [
        ("presence_penalty", req.presence_penalty),
        ("frequency_penalty", req.frequency_penalty),
    ] {
        if v.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
            return Err(ApiError::bad(
                name,
                format!("{name} must be between -2 and 2, got {}", v.unwrap_or(0.0)),
            ));
        }
    }
    let min_p = req.min_p.unwrap_or(defaults.min_p);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::bad(
            "min_p",
            format!("min_p must be between 0 and 1, got {min_p}"),
        ));
    }
    let repetition_penalty = req
        .repetition_penalty
        .unwrap_or(defaults.repetition_penalty);
    if !(repetition_penalty > 0.0 && repetition_penalty <= 10.0) {
        return Err(ApiError::bad(
            "repetition_penalty",
            format!("repetition_penalty must be in (0, 10], got {repetition_penalty}"),
        ));
    }
    let mut logit_bias = Vec::new();
    if let Some(b) = &req.logit_bias {
        if b.len() > MAX_LOGIT_BIAS {
            return Err(ApiError::bad(
                "logit_bias",
                format!("logit_bias may name at most {MAX_LOGIT_BIAS} tokens"),
            ));
        }
        for (k, v) in b {
            let t = k
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|t| (*t as usize) < limits.vocab)
                .ok_or_else(|| {
                    ApiError::bad(
                        "logit_bias",
                        format!(
                            "logit_bias key '{k}' is not a token id of this model (0 to {})",
                            limits.vocab.saturating_sub(1)
                        ),
                    )
                })?;
            if !(-100.0..=100.0).contains(v) {
                return Err(ApiError::bad(
                    "logit_bias",
                    format!("logit_bias for token {t} must be between -100 and 100, got {v}"),
                ));
            }
            logit_bias.push((t, *v as f32));
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
        min_p: min_p as f32,
        repetition_penalty: repetition_penalty as f32,
        presence_penalty: req.presence_penalty.unwrap_or(0.0) as f32,
        frequency_penalty: req.frequency_penalty.unwrap_or(0.0) as f32,
        logit_bias,
        top_logprobs: 0,
        grammar: None,
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
        n,
        explicit_max: explicit.is_some(),
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
