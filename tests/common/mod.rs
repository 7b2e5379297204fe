//! What the cluster tests share: `tandem serve` as a child process on
//! loopback, HTTP helpers, and `tandem generate` as the reference.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const EXE: &str = env!("CARGO_BIN_EXE_tandem");
pub const MODEL: &str = "SmolLM2-135M-Instruct";
pub const CHUNK: &str = "16";

/// One cluster at a time: they share two cores.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

pub struct Cluster {
    pub child: Child,
    pub port: u16,
}

impl Cluster {
    pub fn start(extra: &[&str]) -> Cluster {
        Cluster::start_env(extra, &[])
    }

    /// [`Cluster::start`] with environment variables for every node.
    pub fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Cluster {
        let port = free_port();
        let mut child = Command::new(EXE)
            .envs(env.iter().copied())
            .args(["serve", "--port", &port.to_string(), "--chunk", CHUNK])
            .arg("--dir")
            .arg(std::env::temp_dir().join(format!("tandem-cluster-test-{port}")))
            .args(extra)
            // The pipeline path unless a test asks for local prefill.
            .args(
                if extra.contains(&"--local-prefill-max") || extra.contains(&"--pipelines") {
                    &[][..]
                } else {
                    &["--local-prefill-max", "0"][..]
                },
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("tandem serve starts");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("serve prints");
        assert!(
            line.contains("Tandem is serving"),
            "serve {extra:?} did not come up: {line:?}"
        );
        // Keep draining stdout so the child never blocks on it.
        std::thread::spawn(move || {
            let mut sink = String::new();
            let _ = out.read_to_string(&mut sink);
        });
        Cluster { child, port }
    }

    pub fn chat(&self, body: &Value) -> (u16, Value) {
        let (status, text) = http(self.port, "POST", "/v1/chat/completions", Some(body));
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
        (status, v)
    }

    pub fn metric(&self, name: &str, label: &str) -> Option<f64> {
        let (_, text) = http(self.port, "GET", "/metrics", None);
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(label))
            .find_map(|l| l.rsplit(' ').next()?.parse().ok())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("tandem serve did not stop within 15 s of SIGTERM");
    }
}

/// One HTTP/1.0 exchange (the body ends when the server closes).
pub fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let raw = body.map(|b| b.to_string()).unwrap_or_default();
    http_raw(port, method, path, raw.as_bytes())
}

pub fn http_raw(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .expect("write");
    s.write_all(body).expect("write body");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let (head, body) = resp.split_once("\r\n\r\n").expect("a header");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, body.to_string())
}

pub fn generate(chat: &str, max_tokens: usize) -> String {
    generate_with(&["--chat", chat], max_tokens)
}

/// `tandem generate`'s greedy text for these arguments (`--chat TEXT` or
/// `--messages JSON`), in one process: the reference the cluster must equal.
pub fn generate_with(args: &[&str], max_tokens: usize) -> String {
    generate_env(args, max_tokens, &[])
}

/// [`generate_with`] with environment variables set.
pub fn generate_env(args: &[&str], max_tokens: usize, env: &[(&str, &str)]) -> String {
    let out = Command::new(EXE)
        .envs(env.iter().copied())
        .args(["generate", "--chunk", CHUNK])
        .args(["--max-tokens", &max_tokens.to_string()])
        .args(args)
        .output()
        .expect("generate runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut t = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(t.pop(), Some('\n'), "generate ends its text with a newline");
    t
}

pub fn greedy(chat: &str, max_tokens: usize) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": chat}],
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

pub const SHORT: &str = "What is the capital of France?";
/// Long enough for several chunks and blocks.
pub const LONG: &str = "Summarize in two sentences: The city council met on Tuesday to discuss the new park. Residents asked for more trees, a playground, benches along the river, and a small library kiosk. The council agreed to fund the trees and benches this year and to revisit the playground next spring after a survey of families.";

/// A non-streaming chat with its response headers.
pub fn chat_with_headers(
    port: u16,
    body: &Value,
    session: &str,
) -> (u16, Vec<(String, String)>, Value) {
    chat_with(port, body, &format!("X-Session-Id: {session}\r\n"))
}

/// A non-streaming chat with extra request header lines (each ending in CRLF).
pub fn chat_with(port: u16, body: &Value, extra: &str) -> (u16, Vec<(String, String)>, Value) {
    let (status, headers, body) = post_with(port, body, extra);
    (status, headers, serde_json::from_str(&body).expect("JSON"))
}

/// A chat (streamed or not) with extra request header lines (each ending
/// in CRLF): the status, the headers (lower-cased names) and the body.
pub fn post_with(port: u16, body: &Value, extra: &str) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let b = body.to_string();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{b}",
        b.len()
    )
    .expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let (head, body) = resp.split_once("\r\n\r\n").expect("a header");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status");
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    (status, headers, body.to_string())
}

pub fn header<'a>(h: &'a [(String, String)], k: &str) -> &'a str {
    h.iter()
        .find(|(n, _)| n == k)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {k} in {h:?}"))
}

/// Waits until none of `nodes` holds a KV block (read from `/metrics`);
/// fails the test after `within`.
pub fn wait_until_no_blocks(c: &Cluster, nodes: &[&str], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let held: Vec<(&str, Option<f64>)> = nodes
            .iter()
            .map(|n| {
                (
                    *n,
                    c.metric("tandem_kv_blocks_used", &format!("node=\"{n}\"")),
                )
            })
            .collect();
        if held.iter().all(|(_, v)| *v == Some(0.0)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "blocks still held {within:?} after the clients left: {held:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
