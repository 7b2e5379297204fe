//! A small, blocking HTTP/1.0 client for benchmarks: one connection per
//! request, the response read as it arrives, every server-sent event
//! timestamped on receipt. It does no parsing beyond the status line, the
//! content type and `data:` lines, so it costs the machine under test next
//! to nothing. A stream that breaks keeps what arrived before the break.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// One response: the status and either the SSE events with their arrival
/// times (since `started`) or the whole body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// When the request was written (after the connection was made).
    pub started: Instant,
    pub events: Vec<(Duration, String)>,
    pub body: String,
    /// Why reading stopped early (the stream broke or timed out), if it did.
    pub broken: Option<String>,
}

pub fn post(
    addr: SocketAddr,
    path: &str,
    body: &str,
    timeout: Duration,
) -> std::io::Result<Response> {
    post_with(addr, path, body, &[], timeout)
}

/// [`post`] with extra request headers.
pub fn post_with(
    addr: SocketAddr,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> std::io::Result<Response> {
    request(
        addr,
        &addr.to_string(),
        "POST",
        path,
        Some(body),
        headers,
        timeout,
    )
}

pub fn get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> std::io::Result<Response> {
    request(addr, host, "GET", path, None, headers, timeout)
}

/// Sends one request. Errors before the status line are returned as `Err`;
/// after it, a failed read ends the response with `broken` set.
pub fn request(
    addr: SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> std::io::Result<Response> {
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {host}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    head.push_str(body.unwrap_or(""));
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    let started = Instant::now();
    s.write_all(head.as_bytes())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut out = Response {
        status,
        started,
        events: Vec::new(),
        body: String::new(),
        broken: None,
    };
    let mut sse = false;
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return Ok(out),
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {
                if line
                    .to_ascii_lowercase()
                    .starts_with("content-type: text/event-stream")
                {
                    sse = true;
                }
            }
            Err(e) => {
                out.broken = Some(kind(&e));
                return Ok(out);
            }
        }
    }
    if !sse {
        if let Err(e) = r.read_to_string(&mut out.body) {
            out.broken = Some(kind(&e));
        }
        return Ok(out);
    }
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {
                if let Some(data) = line.strip_prefix("data:") {
                    out.events
                        .push((started.elapsed(), data.trim().to_string()));
                }
            }
            Err(e) => {
                out.broken = Some(kind(&e));
                break;
            }
        }
    }
    Ok(out)
}

/// A short name for an I/O failure, used as an error class.
pub fn kind(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        TimedOut | WouldBlock => "timeout".into(),
        ConnectionRefused => "connection_refused".into(),
        ConnectionReset | ConnectionAborted | BrokenPipe => "connection_reset".into(),
        InvalidData => "invalid_utf8".into(),
        _ => "io_error".into(),
    }
}
