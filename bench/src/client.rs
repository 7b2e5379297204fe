//! One OpenAI-compatible endpoint (chat or completions, streaming) and what
//! the harness records of each request sent to it.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::metrics::{RequestRecord, TandemPhases};
use crate::BenchError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    Chat,
    Completions,
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `host:port` as given, for the Host header.
    pub host: String,
    /// Path prefix before `/v1/...` (usually empty).
    pub base: String,
    pub api: Api,
    pub model: String,
    pub api_key: Option<String>,
    /// Extra body fields sent with every request (e.g. `ignore_eos`).
    pub extra: serde_json::Map<String, Value>,
    pub timeout: Duration,
}

impl Endpoint {
    /// Parses `http://host:port[/prefix]`; a trailing `/v1` is dropped.
    pub fn parse(url: &str) -> Result<(SocketAddr, String, String), BenchError> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            BenchError::Usage(format!(
                "{url:?}: only http:// URLs are supported (run the harness next to the server, or behind a TLS-terminating proxy)"
            ))
        })?;
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let path = format!("/{path}");
        let path = path.trim_end_matches('/');
        let base = path.strip_suffix("/v1").unwrap_or(path).to_string();
        let with_port = if host.contains(':') {
            host.to_string()
        } else {
            format!("{host}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| BenchError::Usage(format!("{url:?}: cannot resolve {host}: {e}")))?
            .next()
            .ok_or_else(|| BenchError::Usage(format!("{url:?}: {host} has no address")))?;
        Ok((addr, host.to_string(), base))
    }

    /// Request headers: `Authorization: Bearer` when there is a key, and
    /// the session id when there is one.
    fn headers(auth: &Option<String>, session: Option<&str>) -> Vec<(&'static str, String)> {
        let mut h = Vec::new();
        if let Some(k) = auth {
            h.push(("Authorization", format!("Bearer {k}")));
        }
        if let Some(s) = session {
            h.push(("X-Session-Id", s.to_string()));
        }
        h
    }

    /// The first model `GET /v1/models` lists.
    pub fn discover_model(
        addr: SocketAddr,
        host: &str,
        base: &str,
        api_key: Option<&str>,
    ) -> Result<String, BenchError> {
        let owned = Self::headers(&api_key.map(str::to_owned), None);
        let headers: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = crate::http::get(
            addr,
            host,
            &format!("{base}/v1/models"),
            &headers,
            Duration::from_secs(10),
        )
        .map_err(|e| BenchError::Usage(format!("GET {base}/v1/models on {host}: {e}")))?;
        let v: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
        v["data"][0]["id"].as_str().map(str::to_owned).ok_or_else(|| {
            BenchError::Usage(format!(
                "GET {base}/v1/models on {host} answered {} without a model id; pass --served-model",
                r.status
            ))
        })
    }

    /// The request body for a conversation (chat) or its last user text (completions).
    pub fn body(&self, messages: &[Value], max_tokens: usize) -> String {
        let mut b = json!({
            "model": self.model,
            "max_tokens": max_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        match self.api {
            Api::Chat => b["messages"] = Value::Array(messages.to_vec()),
            Api::Completions => {
                b["prompt"] = messages
                    .last()
                    .and_then(|m| m["content"].as_str())
                    .unwrap_or("")
                    .into()
            }
        }
        for (k, v) in &self.extra {
            b[k] = v.clone();
        }
        b.to_string()
    }

    /// Sends one streaming request; times are seconds since `run_start`.
    /// Returns the record and the answer's text. Never fails: a failure is
    /// the record's error class.
    pub fn send(
        &self,
        run_start: Instant,
        messages: &[Value],
        max_tokens: usize,
        input_tokens: usize,
        session: Option<&str>,
    ) -> (RequestRecord, String) {
        let body = self.body(messages, max_tokens);
        let path = match self.api {
            Api::Chat => format!("{}/v1/chat/completions", self.base),
            Api::Completions => format!("{}/v1/completions", self.base),
        };
        let owned = Self::headers(&self.api_key, session);
        let headers: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let sent = run_start.elapsed().as_secs_f64();
        let mut rec = RequestRecord {
            job: 0,
            turn: 0,
            sent,
            tokens: Vec::new(),
            done: sent,
            input_tokens,
            output_tokens: 0,
            error: None,
            tandem: None,
        };
        let resp = crate::http::request(
            self.addr,
            &self.host,
            "POST",
            &path,
            Some(&body),
            &headers,
            self.timeout,
        );
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                rec.done = run_start.elapsed().as_secs_f64();
                rec.error = Some(crate::http::kind(&e));
                return (rec, String::new());
            }
        };
        let base = resp.started.duration_since(run_start).as_secs_f64();
        rec.done = run_start.elapsed().as_secs_f64();
        if resp.status != 200 {
            rec.error = Some(format!("http_{}", resp.status));
            return (rec, String::new());
        }
        let text = parse_stream(&resp, base, self.api, &mut rec);
        (rec, text)
    }
}

/// Reads the events of a streamed completion into `rec`: a timestamp per
/// chunk that carries text, usage token counts, Tandem's accounting, and
/// the error class when the stream is malformed, carries an error, breaks
/// or ends without `[DONE]`.
pub fn parse_stream(
    resp: &crate::http::Response,
    base: f64,
    api: Api,
    rec: &mut RequestRecord,
) -> String {
    let mut text = String::new();
    let mut done = false;
    let mut usage_out = None;
    let mut chunks = 0usize;
    for (t, data) in &resp.events {
        let at = base + t.as_secs_f64();
        if data == "[DONE]" {
            done = true;
            rec.done = at;
            continue;
        }
        let v: Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(_) => {
                rec.error.get_or_insert_with(|| "malformed_stream".into());
                continue;
            }
        };
        if v.get("error").is_some_and(|e| !e.is_null()) {
            rec.error.get_or_insert_with(|| "stream_error".into());
            continue;
        }
        let piece = match api {
            Api::Chat => v["choices"][0]["delta"]["content"].as_str(),
            Api::Completions => v["choices"][0]["text"].as_str(),
        };
        if let Some(p) = piece.filter(|p| !p.is_empty()) {
            rec.tokens.push(at);
            chunks += 1;
            text.push_str(p);
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            if let Some(n) = u["completion_tokens"].as_u64() {
                usage_out = Some(n as usize);
            }
            if let Some(n) = u["prompt_tokens"].as_u64() {
                rec.input_tokens = n as usize;
            }
        }
        if let Some(a) = v.get("tandem").filter(|a| a.is_object()) {
            rec.tandem = serde_json::from_value::<TandemPhases>(a.clone()).ok();
        }
        rec.done = at;
    }
    rec.output_tokens = usage_out.unwrap_or(chunks);
    if rec.error.is_none() {
        if let Some(b) = &resp.broken {
            rec.error = Some(b.clone());
        } else if !done {
            rec.error = Some("incomplete_stream".into());
        } else if rec.tokens.is_empty() {
            rec.error = Some("no_tokens".into());
        }
    }
    text
}
