//! The HTTP edge against hostile and broken clients, and a decode group
//! whose loop wedges, with real processes (`tandem serve`): slow and
//! silent clients are cut off while others are served, connections are
//! capped, oversized and slow bodies are refused, session keys cost a
//! bounded amount of memory however long, and a wedged decode loop is a
//! lost node whose streams continue elsewhere.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Reads until the server closes the connection (or `within` passes):
/// whatever it sent, and whether it closed.
fn until_closed(s: &mut TcpStream, within: Duration) -> (String, bool) {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), true),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), false)
}

/// Half a request head, a silent connection, and a body that stops
/// halfway: each is disconnected (the slow body with a 408), while a normal
/// client is answered in the meantime. With the connection cap reached by
/// silent clients, a new one waits and is served once they are cut off.
#[test]
fn slow_and_silent_clients_are_cut_off_while_others_are_served() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(&[
        "--header-timeout-ms",
        "1000",
        "--idle-timeout-ms",
        "2000",
        "--body-timeout-ms",
        "1000",
        "--max-connections",
        "12",
    ]);
    let connect = || TcpStream::connect(("127.0.0.1", c.port)).expect("connect");
    // Ten clients send half a head and stop.
    let mut slow: Vec<TcpStream> = (0..10)
        .map(|_| {
            let mut s = connect();
            s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
                .expect("write");
            s
        })
        .collect();
    // One says nothing at all.
    let mut silent = connect();
    // A normal client is served meanwhile (the 12th connection).
    let (status, v) = c.chat(&greedy(SHORT, 4));
    assert_eq!(status, 200, "{v}");
    for (i, s) in slow.iter_mut().enumerate() {
        let (_, closed) = until_closed(s, Duration::from_secs(30));
        assert!(closed, "slow client {i} still connected");
    }
    let (_, closed) = until_closed(&mut silent, Duration::from_secs(30));
    assert!(closed, "the silent client is still connected");
    assert!(c
        .metric("tandem_http_timeouts_total", "")
        .is_some_and(|n| n >= 11.0));

    // A body that stops halfway: 408 in OpenAI's shape.
    let mut s = connect();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
        .expect("write");
    let (resp, _) = until_closed(&mut s, Duration::from_secs(30));
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    let body: Value =
        serde_json::from_str(resp.split_once("\r\n\r\n").expect("head").1).expect("JSON");
    assert_eq!(body["error"]["code"], "request_timeout");

    // The cap: twelve silent connections hold every slot; a thirteenth is
    // accepted only as they time out, then answered.
    let held: Vec<TcpStream> = (0..12).map(|_| connect()).collect();
    std::thread::sleep(Duration::from_millis(300));
    assert!(c
        .metric("tandem_http_connections", "")
        .is_some_and(|n| n <= 12.0));
    let (status, _) = http(c.port, "GET", "/v1/models", None);
    assert_eq!(status, 200, "served once the idle ones were cut off");
    drop(held);
}

/// A body over the limit gets a 413 (declared or streamed), in OpenAI's
/// error shape, and the gateway goes on serving.
#[test]
fn an_oversized_body_gets_413() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(&["--max-body-bytes", "4096"]);
    let mut big = greedy(SHORT, 4);
    big["messages"][0]["content"] = json!("x".repeat(8192));
    let (status, text) = http(c.port, "POST", "/v1/chat/completions", Some(&big));
    assert_eq!(status, 413, "{text}");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(v["error"]["code"], "request_too_large");
    // Chunked, no length declared: refused once past the limit.
    let mut s = TcpStream::connect(("127.0.0.1", c.port)).expect("connect");
    let body = big.to_string();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    )
    .expect("write");
    let (resp, _) = until_closed(&mut s, Duration::from_secs(30));
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert_eq!(c.chat(&greedy(SHORT, 4)).0, 200);
}

/// One keep-alive connection, many requests: the status of each.
struct KeepAlive(TcpStream);

impl KeepAlive {
    fn post(&mut self, body: &str) -> u16 {
        // One write: a request in pieces waits on Nagle and delayed ACKs.
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.0.write_all(req.as_bytes()).expect("write");
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            self.0.read_exact(&mut b).expect("read head");
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("a length");
        let mut body = vec![0u8; len];
        self.0.read_exact(&mut body).expect("read body");
        head.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status")
    }
}

/// 10,000 requests, each with its own 20 KiB `user` (each pins a session),
/// leave the gateway's resident memory far below what keeping the keys
/// would take (200 MB): a session costs a fixed-size digest.
#[test]
fn ten_thousand_long_user_values_leave_the_gateway_memory_bounded() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A pool of 4 blocks (64 tokens): the prompt below is routed (and its
    // session pinned) and then refused by decode at once, so the loop
    // costs no model work.
    let c = Cluster::start(&["--kv-blocks", "4"]);
    let mut conn = KeepAlive(TcpStream::connect(("127.0.0.1", c.port)).expect("connect"));
    conn.0.set_nodelay(true).expect("nodelay");
    conn.0
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let prompt = "Tell me about the sea. ".repeat(20);
    let body = |i: usize| {
        let user = format!("{i:08}{}", "u".repeat(20 << 10));
        json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "user": user})
            .to_string()
    };
    for i in 0..200 {
        assert_eq!(conn.post(&body(i)), 400, "refused by decode for its length");
    }
    let rss = || {
        c.metric("process_resident_memory_bytes", "")
            .expect("the gateway's memory")
    };
    let before = rss();
    for i in 200..10_000 {
        assert_eq!(conn.post(&body(i)), 400);
    }
    let grew = rss() - before;
    assert!(
        grew < 64.0 * (1 << 20) as f64,
        "the gateway grew by {:.0} MiB for 9,800 sessions",
        grew / (1 << 20) as f64
    );
}

/// A decode group whose scheduling loop wedges (its process, links and
/// heartbeat task alive) stops heartbeating; the gateway drops it as lost,
/// and its streams continue on the other group: every stream ends with the
/// full greedy answer, none hangs.
#[test]
fn a_wedged_decode_loop_is_dropped_and_its_streams_continue_elsewhere() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let want = generate(SHORT, 24);
    let c = Cluster::start_env(
        &[
            "--decode-groups",
            "2",
            "--loop-stall-ms",
            "1500",
            "--routing",
            "round-robin",
        ],
        &[("TANDEM_FAULT_WEDGE", "d0:6")],
    );
    // Round-robin spreads the streams over both groups only once the gateway
    // has a load report from each with a pipeline up (before that it routes
    // to the other alone, and nothing would reach the wedging group).
    let deadline = Instant::now() + Duration::from_secs(60);
    let usable = |h: &Value, node: &str| {
        h["nodes"].as_array().is_some_and(|ns| {
            ns.iter()
                .any(|n| n["node"] == node && n["load"]["pipelines_up"].as_u64() > Some(0))
        })
    };
    loop {
        let (_, text) = http(c.port, "GET", "/health", None);
        let h: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if usable(&h, "d0") && usable(&h, "d1") {
            break;
        }
        assert!(Instant::now() < deadline, "both decode groups usable: {h}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let port = c.port;
    let streams: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut body = greedy(SHORT, 24);
                body["stream"] = json!(true);
                http(port, "POST", "/v1/chat/completions", Some(&body))
            })
        })
        .collect();
    for h in streams {
        let (status, text) = h.join().expect("thread");
        assert_eq!(status, 200, "{text}");
        let mut out = String::new();
        for e in text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
            if e == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(e).expect("JSON event");
            assert!(v.get("error").is_none(), "the stream failed: {v}");
            if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                out.push_str(t);
            }
        }
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        assert_eq!(out, want);
    }
    let resumed = c.metric("tandem_requests_resumed_total", "");
    let redispatched = c.metric("tandem_requests_redispatched_total", "");
    assert!(
        resumed.is_some_and(|n| n >= 1.0),
        "resumed {resumed:?}, redispatched {redispatched:?}"
    );
}
