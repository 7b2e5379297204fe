//! Failures with real processes: `kill -9` of the decode process mid-stream
//! and of a prefill stage mid-prefill, and a thousand clients hanging up
//! mid-stream. Each prints its figure (faults, requests lost, recovery).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn config_of(c: &Cluster) -> String {
    std::env::temp_dir()
        .join(format!("tandem-cluster-test-{}", c.port))
        .join("cluster.toml")
        .display()
        .to_string()
}

fn kill9(c: &Cluster, role: &str, node: &str) {
    let pattern = format!("{role} --config {} --node {node}", config_of(c));
    let ok = Command::new("pkill")
        .args(["-9", "-f", &pattern])
        .status()
        .expect("pkill");
    assert!(ok.success(), "no process matched {pattern}");
}

/// An SSE stream read as it arrives.
struct Sse {
    r: BufReader<TcpStream>,
    headers: Vec<(String, String)>,
}

impl Sse {
    fn open(port: u16, body: &Value, session: &str) -> Sse {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .expect("timeout");
        let raw = body.to_string();
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nX-Session-Id: {session}\r\nContent-Length: {}\r\n\r\n{raw}",
            raw.len()
        )
        .expect("write");
        let mut r = BufReader::new(s);
        let mut headers = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            r.read_line(&mut line).expect("header line");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        Sse { r, headers }
    }

    fn header(&self, k: &str) -> &str {
        self.headers
            .iter()
            .find(|(h, _)| h == k)
            .map_or("", |(_, v)| v.as_str())
    }

    /// The next event's JSON, or None at `[DONE]` or the end of the stream.
    fn next(&mut self) -> Option<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.r.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(d) = line.trim_end().strip_prefix("data: ") {
                if d == "[DONE]" {
                    return None;
                }
                return Some(serde_json::from_str(d).expect("event JSON"));
            }
        }
    }

    /// Reads the stream to its end, failing on an error event: the text and
    /// the finish reason. `on_token(n)` runs after the n-th content chunk.
    fn read_to_end(&mut self, mut on_token: impl FnMut(usize)) -> (String, Value) {
        let (mut text, mut finish, mut chunks) = (String::new(), Value::Null, 0);
        while let Some(ev) = self.next() {
            assert!(
                ev.get("error").is_none(),
                "the stream ended in an error: {ev}"
            );
            let choice = &ev["choices"][0];
            if let Some(t) = choice["delta"]["content"].as_str() {
                text.push_str(t);
                chunks += 1;
                on_token(chunks);
            }
            if !choice["finish_reason"].is_null() {
                finish = choice["finish_reason"].clone();
            }
        }
        (text, finish)
    }
}

const STORY: &str = "Tell me a long story about a lighthouse keeper and a storm.";

#[test]
fn kill_9_of_the_decode_process_mid_stream_and_the_stream_goes_on() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = 80;
    // With penalties, whose every choice reads the answer so far: the
    // group that takes over must count the tokens streamed before the
    // kill as answer, not prompt.
    let want = generate_with(
        &[
            "--chat",
            STORY,
            "--repetition-penalty",
            "1.2",
            "--frequency-penalty",
            "0.4",
        ],
        n,
    );
    let c = Cluster::start(&["--decode-groups", "2"]);
    let mut body = greedy(STORY, n);
    body["repetition_penalty"] = json!(1.2);
    body["frequency_penalty"] = json!(0.4);
    body["stream"] = json!(true);
    let mut s = Sse::open(c.port, &body, "story");
    let victim = s.header("x-tandem-decode").to_string();
    assert!(!victim.is_empty(), "{:?}", s.headers);
    let mut chunks = 0;
    let mut killed_at = None;
    let mut gap_after_kill = None;
    let (text, finish) = s.read_to_end(|n| {
        chunks = n;
        if let (Some(k), None) = (killed_at, gap_after_kill) {
            gap_after_kill = Some(Instant::elapsed(&k));
        }
        if n == 10 && killed_at.is_none() {
            kill9(&c, "decode", &victim);
            killed_at = Some(Instant::now());
        }
    });
    assert!(killed_at.is_some(), "the answer ended before the kill");
    assert_eq!(
        text, want,
        "the resumed stream's text equals an uninterrupted run's"
    );
    assert_eq!(finish, json!("length"), "a real end, not a truncation");
    let resumed = c.metric("tandem_requests_resumed_total", "").unwrap_or(0.0);
    assert!(resumed >= 1.0, "resumed {resumed}");
    eprintln!(
        "FIGURE decode kill -9 mid-stream: faults 1, requests lost 0, next token {:?} after the kill (detection + re-prefill of the prompt and the streamed answer), {chunks} chunks",
        gap_after_kill.unwrap_or_default()
    );
}

/// The decode group dies while a stage streams it the prompt's KV (over
/// UCX when the library is installed, whose endpoints have no peer-failure
/// handling: the stage must give up on the lost receiver, not wait on it),
/// and the request is answered in full by the other group.
#[test]
fn kill_9_of_the_decode_process_while_kv_streams_to_it_and_the_answer_completes() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let prompt = LONG.repeat(6);
    let n = 12;
    let want = generate(&prompt, n);
    let c = Cluster::start(&["--decode-groups", "2"]);
    let mut body = greedy(&prompt, n);
    body["stream"] = json!(true);
    let t0 = Instant::now();
    let mut s = Sse::open(c.port, &body, "kv-victim");
    let victim = s.header("x-tandem-decode").to_string();
    assert!(!victim.is_empty(), "{:?}", s.headers);
    // Prefill of this prompt takes a second or more; its KV streams to the
    // victim chunk by chunk meanwhile.
    std::thread::sleep(Duration::from_millis(300));
    kill9(&c, "decode", &victim);
    let (text, finish) = s.read_to_end(|_| {});
    assert_eq!(text, want, "the answer equals an uninterrupted run's");
    assert_eq!(finish, json!("length"));
    // The stages serve the next request as usual.
    let (status, v) = c.chat(&greedy(SHORT, 4));
    assert_eq!(status, 200, "{v}");
    eprintln!(
        "FIGURE decode kill -9 while KV streams to it: faults 1, requests lost 0, answered {:?} after the request was sent",
        t0.elapsed()
    );
}

#[test]
fn kill_9_of_a_prefill_stage_mid_prefill_and_the_request_completes() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let prompt = LONG.repeat(12);
    let want = generate(&prompt, 16);
    let c = Cluster::start(&["--pipelines", "2", "--local-prefill-max", "0"]);
    // Learn which pipeline the session is pinned to, then send the long
    // prompt on the same session and kill that pipeline's stage while it
    // reads it.
    let (status, h, v) = chat_with_headers(c.port, &greedy(SHORT, 4), "pinned");
    assert_eq!(status, 200, "{v}");
    let pipeline = header(&h, "x-tandem-pipeline").to_string();
    assert!(!pipeline.is_empty(), "{h:?}");
    let port = c.port;
    let t0 = Instant::now();
    let req = std::thread::spawn(move || chat_with_headers(port, &greedy(&prompt, 16), "pinned"));
    std::thread::sleep(Duration::from_millis(400));
    kill9(&c, "prefill", &format!("{pipeline}-s0"));
    let killed = t0.elapsed();
    let (status, h, v) = req.join().expect("request thread");
    let total = t0.elapsed();
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["choices"][0]["message"]["content"].as_str(),
        Some(want.as_str())
    );
    let _ = h;
    std::thread::sleep(Duration::from_millis(1500));
    let retries = c.metric("tandem_kv_retries", "").unwrap_or(0.0);
    assert!(retries >= 1.0, "{retries} retries");
    eprintln!(
        "FIGURE prefill kill -9 mid-prefill: faults 1, requests lost 0, killed at {killed:?}, answered at {total:?}"
    );
}

#[test]
fn a_thousand_clients_hanging_up_mid_stream_leave_no_block_allocated() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(&[]);
    let port = c.port;
    let total = 1000;
    let threads = 8;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut started = 0;
                for i in 0..total / threads {
                    // One prompt for all: after the first, its full blocks
                    // are cached, so each stream starts quickly.
                    let mut body = greedy("Count to ten, please.", 64);
                    body["stream"] = json!(true);
                    let mut s = Sse::open(port, &body, &format!("hang-{t}-{i}"));
                    // Leave after the first token (or whatever came back).
                    if s.next().is_some() && s.next().is_some() {
                        started += 1;
                    }
                    drop(s);
                }
                started
            })
        })
        .collect();
    let started: usize = handles.into_iter().map(|h| h.join().expect("client")).sum();
    assert!(
        started >= total * 9 / 10,
        "only {started} of {total} streams started"
    );
    wait_until_no_blocks(&c, &["d0", "p0-s0"], Duration::from_secs(60));
    let cancelled = c
        .metric("tandem_requests_cancelled_total", "")
        .unwrap_or(0.0);
    assert!(
        cancelled >= started as f64 * 0.9,
        "{cancelled} cancelled of {started}"
    );
    let (status, v) = c.chat(&greedy(SHORT, 8));
    assert_eq!(status, 200, "still serving: {v}");
    eprintln!(
        "FIGURE {total} mid-stream disconnects in {:?}: {cancelled} cancelled, 0 KV blocks left on decode and prefill",
        t0.elapsed()
    );
}

/// Resident memory of the cluster's processes (the `serve` parent and every
/// node started with its cluster file), in MiB.
fn cluster_rss_mib(c: &Cluster) -> f64 {
    let config = config_of(c);
    let mut kib = 0u64;
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if pid != c.child.id() && !cmd.contains(&config) {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        kib += status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    kib as f64 / 1024.0
}

#[test]
fn ten_times_the_capacity_gets_429s_every_accepted_request_completes_and_memory_stays_bounded() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Capacity: 4 running + 4 queued per group, and the gateway's matching limit.
    let c = Cluster::start(&["--max-batch", "4", "--max-queue", "4"]);
    let port = c.port;
    let (status, v) = c.chat(&greedy(SHORT, 8));
    assert_eq!(status, 200, "{v}");
    let before = cluster_rss_mib(&c);
    let burst = 80;
    let mut peak = before;
    let (mut ok, mut busy) = (0, 0);
    for round in 0..3 {
        let handles: Vec<_> = (0..burst)
            .map(|i| {
                std::thread::spawn(move || {
                    let body = greedy(&format!("Name a colour ({round}-{i})."), 16);
                    chat_with(port, &body, "")
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        peak = peak.max(cluster_rss_mib(&c));
        for h in handles {
            let (status, headers, v) = h.join().expect("client");
            match status {
                200 => {
                    ok += 1;
                    let reason = &v["choices"][0]["finish_reason"];
                    assert!(reason == "stop" || reason == "length", "{v}");
                }
                429 => {
                    busy += 1;
                    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
                    assert!(!header(&headers, "retry-after").is_empty());
                }
                other => panic!("status {other} under overload: {v}"),
            }
        }
        peak = peak.max(cluster_rss_mib(&c));
    }
    let after = cluster_rss_mib(&c);
    assert!(ok >= 8 && busy >= burst, "{ok} served, {busy} refused");
    assert!(
        peak < before + 512.0,
        "memory grew from {before:.0} to {peak:.0} MiB under the burst"
    );
    let (status, v) = c.chat(&greedy(SHORT, 8));
    assert_eq!(status, 200, "still serving: {v}");
    eprintln!(
        "FIGURE overload: 3 bursts of {burst} (10x the capacity of 8): {ok} served, {busy} got 429, 0 lost; RSS {before:.0} MiB before, {peak:.0} MiB peak, {after:.0} MiB after"
    );
}

#[test]
fn a_non_streaming_client_that_hangs_up_is_cancelled_everywhere() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(&[]);
    let mut body = greedy(LONG, 400);
    body["ignore_eos"] = json!(true);
    let raw = body.to_string();
    let mut s = TcpStream::connect(("127.0.0.1", c.port)).expect("connect");
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{raw}",
        raw.len()
    )
    .expect("write");
    // Wait until it is decoding, then leave without reading an answer.
    let deadline = Instant::now() + Duration::from_secs(60);
    while c
        .metric("tandem_kv_blocks_used", "node=\"d0\"")
        .unwrap_or(0.0)
        == 0.0
    {
        assert!(Instant::now() < deadline, "the request never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = Instant::now();
    s.shutdown(std::net::Shutdown::Both).expect("hang up");
    drop(s);
    wait_until_no_blocks(&c, &["d0"], Duration::from_secs(20));
    let cancelled = c
        .metric("tandem_requests_cancelled_total", "")
        .unwrap_or(0.0);
    assert!(cancelled >= 1.0, "{cancelled}");
    eprintln!(
        "FIGURE non-streaming hang-up: blocks freed {:?} after the client left",
        left.elapsed()
    );
}

/// A stage that lags its aborts — told to stop an attempt whose blocks it
/// writes straight into decode's pools (UCX shared memory), it goes on
/// writing garbage into them for 1.5 s before it says it stopped — cannot
/// change another request's answer: decode keeps those blocks from every
/// other request until the stage confirms. The other requests are short,
/// so decode prefills them itself, at once, into blocks from the same pool
/// (which hands out the most recently freed first): any early reuse of the
/// aborted attempt's blocks would be overwritten under them.
#[test]
fn a_stage_writing_on_after_an_abort_cannot_change_another_requests_answer() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let prompt = LONG.repeat(10);
    let others = [
        SHORT,
        "Name three primary colors.",
        "Write a haiku about the sea.",
        "What is 12 times 12?",
    ];
    let want: Vec<String> = others.iter().map(|q| generate(q, 16)).collect();
    std::env::set_var("TANDEM_FAULT_WRITE_AFTER_ABORT_MS", "1500");
    let c = Cluster::start(&[
        "--kv-transport",
        "ucx",
        "--kv-blocks",
        "64",
        "--local-prefill-max",
        "64",
    ]);
    std::env::remove_var("TANDEM_FAULT_WRITE_AFTER_ABORT_MS");
    for round in 0..2 {
        // A long prompt's KV streams into decode's pools; its client hangs
        // up mid-prefill, so decode aborts the attempt.
        let raw = greedy(&prompt, 4).to_string();
        let mut s = TcpStream::connect(("127.0.0.1", c.port)).expect("connect");
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Session-Id: victim-{round}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{raw}",
            raw.len()
        )
        .expect("write");
        std::thread::sleep(Duration::from_millis(400));
        s.shutdown(std::net::Shutdown::Both).expect("hang up");
        drop(s);
        std::thread::sleep(Duration::from_millis(150));
        // Right away, requests that need blocks, while the stage still writes.
        let port = c.port;
        let handles: Vec<_> = others
            .iter()
            .map(|q| {
                let body = greedy(q, 16);
                std::thread::spawn(move || chat_with_headers(port, &body, "other"))
            })
            .collect();
        for (h, want) in handles.into_iter().zip(&want) {
            let (status, _, v) = h.join().expect("request thread");
            assert_eq!(status, 200, "{v}");
            assert_eq!(
                v["choices"][0]["message"]["content"].as_str(),
                Some(want.as_str()),
                "round {round}: an answer changed while an aborted attempt's blocks were written"
            );
        }
    }
    let direct = c
        .metric("tandem_kv_blocks_landed", "node=\"d0\",path=\"ucx-direct\"")
        .unwrap_or(0.0);
    assert!(direct > 0.0, "the stages wrote decode's pools directly");
    // Once the stage confirmed, nothing stays quarantined.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let q = c
            .metric("tandem_kv_blocks_quarantined", "d0")
            .unwrap_or(-1.0);
        if q == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{q} blocks still quarantined");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A stage frozen (SIGSTOP) past its links' idle timeout while it prefills
/// under load: decode sees the link drop and retries the attempts on the
/// other pipeline, but a dropped link proves nothing about a process that
/// maps decode's pools — resumed, the stage finishes its chunk and writes.
/// Those blocks stay out of use until it links back and confirms, and
/// every answer stays exact.
#[test]
fn a_stage_paused_past_its_link_timeout_under_load_leaves_every_answer_exact() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let prompts: Vec<String> = (0..4)
        .map(|i| format!("Question {i}. {}", LONG.repeat(3)))
        .collect();
    let want: Vec<String> = prompts.iter().map(|p| generate(p, 12)).collect();
    let c = Cluster::start(&[
        "--pipelines",
        "2",
        "--kv-transport",
        "ucx",
        "--local-prefill-max",
        "0",
        "--kv-blocks",
        "128",
    ]);
    let port = c.port;
    let send = |i: usize, p: &String| {
        let body = greedy(p, 12);
        let session = format!("load-{i}");
        std::thread::spawn(move || chat_with_headers(port, &body, &session))
    };
    let handles: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| send(i, p))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let pattern = format!("prefill --config {} --node p0-s0", config_of(&c));
    let out = Command::new("pgrep")
        .args(["-f", &pattern])
        .output()
        .expect("pgrep");
    let pid = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("the stage's process")
        .to_string();
    let signal = |s: &str| {
        assert!(Command::new("kill")
            .args([s, &pid])
            .status()
            .expect("kill")
            .success());
    };
    signal("-STOP");
    std::thread::sleep(Duration::from_millis(2500));
    signal("-CONT");
    for (i, (h, want)) in handles.into_iter().zip(&want).enumerate() {
        let (status, _, v) = h.join().expect("request thread");
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["choices"][0]["message"]["content"].as_str(),
            Some(want.as_str()),
            "request {i} under the pause"
        );
    }
    // And after: the stage is back and serves.
    let handles: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| send(i + 10, p))
        .collect();
    for (h, want) in handles.into_iter().zip(&want) {
        let (status, _, v) = h.join().expect("request thread");
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["choices"][0]["message"]["content"].as_str(),
            Some(want.as_str())
        );
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let q = c
            .metric("tandem_kv_blocks_quarantined", "d0")
            .unwrap_or(-1.0);
        if q == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{q} blocks still quarantined");
        std::thread::sleep(Duration::from_millis(100));
    }
}
