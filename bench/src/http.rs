//! A small, blocking HTTP/1.0 client for benchmarks: one connection per
//! request, the response read as it arrives, every server-sent event
//! timestamped on receipt. It does no parsing beyond the status line and
//! `data:` lines, so it costs the machine under test next to nothing.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// One response: status, headers skipped, and either the SSE events with
/// their arrival times (since the request was sent) or the whole body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub events: Vec<(Duration, String)>,
    pub body: String,
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
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    let t0 = Instant::now();
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut sse = false;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if line
            .to_ascii_lowercase()
            .starts_with("content-type: text/event-stream")
        {
            sse = true;
        }
    }
    let mut out = Response {
        status,
        events: Vec::new(),
        body: String::new(),
    };
    if !sse {
        r.read_to_string(&mut out.body)?;
        return Ok(out);
    }
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        if let Some(data) = line.strip_prefix("data: ") {
            out.events.push((t0.elapsed(), data.trim_end().to_string()));
        }
    }
    Ok(out)
}
