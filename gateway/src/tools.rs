//! Tool calls: the request's `tools` and `tool_choice`, the conversation's
//! tool history rendered for the model, and the model's answer parsed back
//! into OpenAI `tool_calls`.
//!
//! The call format is Hermes/Qwen's: each call is a JSON object
//! `{"name": …, "arguments": {…}}` between `<tool_call>` and `</tool_call>`
//! lines, results come back between `<tool_response>` tags. A chat template
//! that takes `tools` (the Hugging Face convention) renders them itself;
//! for one that does not, the tools are described in the system message
//! and the tool history is written in that format. `tool_choice:
//! "required"` and a named function are enforced with a grammar over the
//! same format; `auto` lets the model choose and parses what it wrote.

use serde_json::{json, Value};
use tandem_model::{ChatMessage, Grammar};

use crate::api::ApiError;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// One declared function.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    /// JSON schema of its arguments (an object schema).
    pub parameters: Value,
    /// The tool as the client declared it (for templates that take tools).
    pub declared: Value,
}

/// Which calls the answer may or must make.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// The model decides: text, calls or both.
    Auto,
    /// At least one call of a declared tool, and nothing else.
    Required,
    /// Calls of this tool only.
    Named(String),
}

/// A request's tools, when it has some and `tool_choice` is not `none`.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub tools: Vec<Tool>,
    pub choice: Choice,
    /// Several calls in one answer (`parallel_tool_calls`, default true).
    pub parallel: bool,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Reads `tools`, `tool_choice` and `parallel_tool_calls`. `None` when the
/// request has no tools or `tool_choice` is `none` (the tools are then
/// neither shown to the model nor parsed for).
pub fn parse(
    tools: Option<&Value>,
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<ToolSpec>, ApiError> {
    let choice = choice.filter(|c| !c.is_null());
    let tools = match tools.filter(|t| !t.is_null()) {
        None => {
            return match choice {
                None => Ok(None),
                Some(c) if c == "none" || c == "auto" => Ok(None),
                Some(_) => Err(ApiError::bad(
                    "tool_choice",
                    "tool_choice needs tools to choose from",
                )),
            }
        }
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::bad(
                "tools",
                "tools must hold at least one tool (leave it out for none)",
            ))
        }
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::bad("tools", "tools must be an array of tools")),
    };
    let mut out: Vec<Tool> = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let p = format!("tools[{i}]");
        if t["type"] != "function" {
            return Err(ApiError::bad(&p, "a tool's type must be \"function\""));
        }
        let f = &t["function"];
        let Some(name) = f["name"].as_str() else {
            return Err(ApiError::bad(
                &format!("{p}.function.name"),
                "a function needs a name",
            ));
        };
        if !valid_name(name) {
            return Err(ApiError::bad(
                &format!("{p}.function.name"),
                format!("function name '{name}' must be 1 to 64 letters, digits, '_', '-' or '.'"),
            ));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(ApiError::bad(
                &format!("{p}.function.name"),
                format!("function '{name}' is declared twice"),
            ));
        }
        let parameters = match &f["parameters"] {
            Value::Null => json!({ "type": "object", "properties": {} }),
            v @ Value::Object(_) => v.clone(),
            _ => {
                return Err(ApiError::bad(
                    &format!("{p}.function.parameters"),
                    "parameters must be a JSON schema object",
                ))
            }
        };
        if !f["description"].is_null() && !f["description"].is_string() {
            return Err(ApiError::bad(
                &format!("{p}.function.description"),
                "a description is a string",
            ));
        }
        out.push(Tool {
            name: name.to_string(),
            parameters,
            declared: t.clone(),
        });
    }
    let choice = match choice {
        None => Choice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok(None),
            "auto" => Choice::Auto,
            "required" => Choice::Required,
            other => {
                return Err(ApiError::bad(
                    "tool_choice",
                    format!(
                        "tool_choice '{other}' is not none, auto, required or a named function"
                    ),
                ))
            }
        },
        Some(c @ Value::Object(_)) => {
            let Some(name) = c["function"]["name"]
                .as_str()
                .filter(|_| c["type"] == "function")
            else {
                return Err(ApiError::bad(
                    "tool_choice",
                    "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": …}}",
                ));
            };
            if !out.iter().any(|t| t.name == name) {
                return Err(ApiError::bad(
                    "tool_choice",
                    format!("tool_choice names '{name}', which is not among the tools"),
                ));
            }
            Choice::Named(name.to_string())
        }
        Some(_) => {
            return Err(ApiError::bad(
                "tool_choice",
                "tool_choice is a string or a named function",
            ))
        }
    };
    Ok(Some(ToolSpec {
        tools: out,
        choice,
        parallel: parallel.unwrap_or(true),
    }))
}

impl ToolSpec {
    /// The grammar that enforces `required` or a named function: one call
    /// (more with `parallel`) of the allowed tools, arguments matching
    /// their schema, and nothing else. `auto` has none.
    pub fn grammar(&self) -> Option<Grammar> {
        let allowed: Vec<&Tool> = match &self.choice {
            Choice::Auto => return None,
            Choice::Required => self.tools.iter().collect(),
            Choice::Named(n) => self.tools.iter().filter(|t| &t.name == n).collect(),
        };
        let calls: Vec<Value> = allowed
            .iter()
            .map(|t| {
                json!({
                    "type": "object",
                    "properties": { "name": { "const": t.name }, "arguments": t.parameters },
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let mut schema = match <[Value; 1]>::try_from(calls) {
            Ok([one]) => one,
            Err(calls) => json!({ "anyOf": calls }),
        };
        // Written the way the format shows it to the model, and lenient
        // about schema keywords the grammar cannot enforce.
        schema["x-guidance"] = json!({
            "item_separator": ", ",
            "key_separator": ": ",
            "whitespace_flexible": false,
            "lenient": true,
        });
        let more = if self.parallel {
            " (\"\\n\" call)*"
        } else {
            ""
        };
        Some(Grammar::Lark(format!(
            "start: call{more}\ncall: \"{OPEN}\\n\" body \"\\n{CLOSE}\"\nbody: %json {schema}\n"
        )))
    }

    /// The declared tools, as templates that take `tools` want them.
    pub fn declared(&self) -> Value {
        Value::Array(self.tools.iter().map(|t| t.declared.clone()).collect())
    }

    /// What a template without tool support gets in its system message.
    fn system_text(&self) -> String {
        let mut s = String::from(
            "# Tools\n\nYou can call functions to help with the user's request. \
             Their signatures are inside <tools></tools>:\n<tools>",
        );
        for t in &self.tools {
            s.push('\n');
            s.push_str(&t.declared.to_string());
        }
        s.push_str(
            "\n</tools>\n\nTo call a function, write a JSON object with its name and arguments \
             inside <tool_call></tool_call>, one call per block:\n<tool_call>\n\
             {\"name\": <function-name>, \"arguments\": <arguments-object>}\n</tool_call>",
        );
        s
    }
}

/// A call's arguments as an object (a template renders them itself), from
/// the JSON text OpenAI's `arguments` holds.
fn arguments_value(a: &Value) -> Value {
    match a {
        Value::String(s) => serde_json::from_str(s).unwrap_or_else(|_| a.clone()),
        other => other.clone(),
    }
}

/// The conversation and tools as the template renders them. A template
/// that takes `tools` gets them, and the history in the Hugging Face shape
/// (calls' arguments as objects); for one that does not, the tools go into
/// the system message and the history is written in the call format.
pub fn prepare(
    messages: &[ChatMessage],
    spec: Option<&ToolSpec>,
    template_takes_tools: bool,
) -> (Vec<ChatMessage>, Option<Value>) {
    if template_takes_tools {
        let msgs = messages
            .iter()
            .map(|m| {
                let mut m = m.clone();
                if let Some(Value::Array(calls)) = &mut m.tool_calls {
                    for c in calls {
                        let args = arguments_value(&c["function"]["arguments"]);
                        c["function"]["arguments"] = args;
                    }
                }
                m
            })
            .collect();
        return (msgs, spec.map(ToolSpec::declared));
    }
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    for m in messages {
        match m.role.as_str() {
            "tool" => {
                let block = format!("<tool_response>\n{}\n</tool_response>", m.content);
                // Results of one turn's calls go back in one user message.
                match out.last_mut() {
                    Some(last)
                        if last.role == "user" && last.content.ends_with("</tool_response>") =>
                    {
                        last.content.push('\n');
                        last.content.push_str(&block);
                    }
                    _ => out.push(ChatMessage::new("user", &block)),
                }
            }
            "assistant" if m.tool_calls.is_some() => {
                let mut text = m.content.clone();
                if let Some(Value::Array(calls)) = &m.tool_calls {
                    for c in calls {
                        // Name first, as the format shows it.
                        let call = format!(
                            "{{\"name\": {}, \"arguments\": {}}}",
                            c["function"]["name"],
                            arguments_value(&c["function"]["arguments"])
                        );
                        if !text.is_empty() {
                            text.push('\n');
                        }
                        text.push_str(&format!("{OPEN}\n{call}\n{CLOSE}"));
                    }
                }
                out.push(ChatMessage::new("assistant", &text));
            }
            _ => out.push(ChatMessage::new(&m.role, &m.content)),
        }
    }
    if let Some(spec) = spec {
        let tools = spec.system_text();
        match out.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{tools}", first.content);
            }
            _ => out.insert(0, ChatMessage::new("system", &tools)),
        }
    }
    (out, None)
}

/// What the parser makes of the answer's text.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    /// Plain content.
    Text(String),
    /// A call begins: its position among the answer's calls, id and name.
    Call {
        index: usize,
        id: String,
        name: String,
    },
    /// More of call `index`'s arguments (JSON text; the pieces concatenate).
    Args { index: usize, text: String },
}

/// One finished call.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Text,
    /// Inside `<tool_call>`: the call's JSON so far is in `buf`.
    Call,
}

/// Splits an answer streamed piece by piece into content and calls. Text
/// that could still become `<tool_call>` is held back; a call's name is
/// given as soon as it is complete and its arguments as they come.
/// Whitespace between calls is not content. Sans-IO: feed it the answer's
/// text in order, then [`ToolParser::finish`].
#[derive(Debug)]
pub struct ToolParser {
    mode: Mode,
    /// Text not yet given out (text mode), or the call's JSON (call mode).
    buf: String,
    /// Whitespace held until something else follows it.
    space: String,
    /// This call's header is out; this much of its arguments' text is out.
    header: bool,
    args_out: usize,
    calls: Vec<Call>,
    /// Makes call ids; tests give a fixed one.
    ids: fn(usize) -> String,
}

fn random_id(_: usize) -> String {
    format!("call_{:024x}", rand::random::<u128>() >> 32)
}

impl Default for ToolParser {
    fn default() -> ToolParser {
        ToolParser::with_ids(random_id)
    }
}

impl ToolParser {
    pub fn with_ids(ids: fn(usize) -> String) -> ToolParser {
        ToolParser {
            mode: Mode::Text,
            buf: String::new(),
            space: String::new(),
            header: false,
            args_out: 0,
            calls: Vec::new(),
            ids,
        }
    }

    /// The calls made so far (complete ones, and the one under way).
    pub fn calls(&self) -> &[Call] {
        &self.calls
    }

    pub fn push(&mut self, text: &str) -> Vec<Out> {
        let mut out = Vec::new();
        self.buf.push_str(text);
        self.run(&mut out, false);
        out
    }

    /// The answer ended: what was held back.
    pub fn finish(&mut self) -> Vec<Out> {
        let mut out = Vec::new();
        self.run(&mut out, true);
        if self.mode == Mode::Call {
            let scan = scan(&self.buf);
            if self.header {
                // Cut short (length): the call stays as far as it got.
                self.emit_args(&scan, &mut out);
            } else {
                let t = format!("{OPEN}{}", self.buf);
                self.text(&t, &mut out);
            }
            self.buf.clear();
            self.mode = Mode::Text;
        }
        let t = std::mem::take(&mut self.buf);
        self.text(&t, &mut out);
        if self.calls.is_empty() && !self.space.is_empty() {
            out.push(Out::Text(std::mem::take(&mut self.space)));
        }
        out
    }

    fn text(&mut self, t: &str, out: &mut Vec<Out>) {
        if t.is_empty() {
            return;
        }
        // Trailing whitespace waits: it is content only if more follows.
        let body = t.trim_end();
        if body.is_empty() {
            self.space.push_str(t);
            return;
        }
        let mut s = std::mem::take(&mut self.space);
        s.push_str(body);
        self.space.push_str(&t[body.len()..]);
        match out.last_mut() {
            Some(Out::Text(prev)) => prev.push_str(&s),
            _ => out.push(Out::Text(s)),
        }
    }

    fn run(&mut self, out: &mut Vec<Out>, end: bool) {
        loop {
            match self.mode {
                Mode::Text => {
                    if let Some(k) = self.buf.find(OPEN) {
                        let before = self.buf[..k].to_string();
                        self.text(&before, out);
                        self.buf.drain(..k + OPEN.len());
                        self.mode = Mode::Call;
                        self.header = false;
                        self.args_out = 0;
                        continue;
                    }
                    // Hold back a tail that could still become the tag.
                    let keep = if end {
                        0
                    } else {
                        (1..OPEN.len())
                            .rev()
                            .find(|n| self.buf.ends_with(&OPEN[..*n]))
                            .unwrap_or(0)
                    };
                    let cut = self.buf.len() - keep;
                    let now: String = self.buf.drain(..cut).collect();
                    self.text(&now, out);
                    return;
                }
                Mode::Call => {
                    if !self.step_call(out, end) {
                        return;
                    }
                }
            }
        }
    }

    /// Moves a call on; true when it ended and text mode resumes.
    fn step_call(&mut self, out: &mut Vec<Out>, end: bool) -> bool {
        let scan = scan(&self.buf);
        if scan.bad && !self.header {
            // Not a call after all: the text is content.
            let t = format!("{OPEN}{}", std::mem::take(&mut self.buf));
            self.text(&t, out);
            self.mode = Mode::Text;
            // Its text has been given out; nothing in it is looked at again.
            return false;
        }
        if !self.header {
            if let Some((a, b)) = scan.name {
                let name: String = serde_json::from_str(&self.buf[a..b]).unwrap_or_default();
                let index = self.calls.len();
                let id = (self.ids)(index);
                out.push(Out::Call {
                    index,
                    id: id.clone(),
                    name: name.clone(),
                });
                self.calls.push(Call {
                    id,
                    name,
                    arguments: String::new(),
                });
                self.header = true;
            }
        }
        if self.header {
            self.emit_args(&scan, out);
        }
        let Some(done) = scan.done else {
            return false;
        };
        let rest = self.buf[done..].trim_start().to_string();
        if rest.starts_with(CLOSE) || !CLOSE.starts_with(rest.as_str()) || end {
            if !self.header {
                // A complete object without a name is not a call.
                let t = format!("{OPEN}{}", &self.buf[..done]);
                self.text(&t, out);
            } else if scan.args.is_none() {
                self.push_args("{}", out);
            }
            let rest = rest.strip_prefix(CLOSE).unwrap_or(&rest).to_string();
            self.buf = rest;
            self.mode = Mode::Text;
            self.header = false;
            return true;
        }
        false
    }

    fn emit_args(&mut self, scan: &Scan, out: &mut Vec<Out>) {
        let Some((a, end)) = scan.args else {
            return;
        };
        let raw = &self.buf[a..end.unwrap_or(self.buf.len())];
        if raw.starts_with('"') {
            // Arguments written as a JSON string: given whole once complete.
            if end.is_some() && self.args_out == 0 {
                let s: String = serde_json::from_str(raw).unwrap_or_default();
                self.args_out = raw.len();
                self.push_args(&s, out);
            }
            return;
        }
        let raw = if end.is_some() { raw } else { raw.trim_end() };
        if raw.len() > self.args_out {
            let piece = raw[self.args_out..].to_string();
            self.args_out = raw.len();
            self.push_args(&piece, out);
        }
    }

    fn push_args(&mut self, piece: &str, out: &mut Vec<Out>) {
        let index = self.calls.len() - 1;
        self.calls[index].arguments.push_str(piece);
        match out.last_mut() {
            Some(Out::Args { index: i, text }) if *i == index => text.push_str(piece),
            _ => out.push(Out::Args {
                index,
                text: piece.to_string(),
            }),
        }
    }
}

/// What a scan of a call's JSON text found so far (byte positions).
#[derive(Debug, Default)]
struct Scan {
    /// Just past the object's closing brace.
    done: Option<usize>,
    /// The `name` value (a complete string, quotes included).
    name: Option<(usize, usize)>,
    /// Where the `arguments` (or `parameters`) value starts, and its end
    /// once complete.
    args: Option<(usize, Option<usize>)>,
    /// Not a JSON object.
    bad: bool,
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// Just past the string starting at `i` (a quote), once it is complete.
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// Just past the value starting at `i`, once it is complete.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match b[i] {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            // A number or literal ends at a delimiter (not at the end of
            // what has come so far: it may go on).
            let j = (i..b.len())
                .find(|&j| matches!(b[j], b',' | b'}' | b']') || b[j].is_ascii_whitespace())?;
            Some(j)
        }
    }
}

fn scan(s: &str) -> Scan {
    let b = s.as_bytes();
    let mut r = Scan::default();
    let mut i = skip_ws(b, 0);
    if i >= b.len() {
        return r;
    }
    if b[i] != b'{' {
        r.bad = true;
        return r;
    }
    i += 1;
    loop {
        i = skip_ws(b, i);
        if i >= b.len() {
            return r;
        }
        match b[i] {
            b'}' => {
                r.done = Some(i + 1);
                return r;
            }
            b',' => {
                i += 1;
                continue;
            }
            b'"' => {}
            _ => {
                r.bad = true;
                return r;
            }
        }
        let Some(kend) = string_end(b, i) else {
            return r;
        };
        let key: String = serde_json::from_str(&s[i..kend]).unwrap_or_default();
        i = skip_ws(b, kend);
        if i >= b.len() {
            return r;
        }
        if b[i] != b':' {
            r.bad = true;
            return r;
        }
        i = skip_ws(b, i + 1);
        let is_args = key == "arguments" || key == "parameters";
        if i >= b.len() {
            if is_args {
                r.args = Some((i, None));
            }
            return r;
        }
        let end = value_end(b, i);
        if key == "name" {
            match end {
                Some(e) if b[i] == b'"' => r.name = Some((i, e)),
                Some(_) => {
                    r.bad = true;
                    return r;
                }
                None => {}
            }
        } else if is_args {
            r.args = Some((i, end));
        }
        match end {
            Some(e) => i = e,
            None => return r,
        }
    }
}

#[cfg(test)]
mod tests;
