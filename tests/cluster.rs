//! The whole cluster as a user runs it: `tandem serve` starts real
//! processes (gateway, prefill stages, decode group) on loopback, and
//! requests go over HTTP. Greedy answers must equal `tandem generate`'s.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

#[test]
fn every_layout_answers_exactly_like_generate() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let want: Vec<(&str, String)> = [SHORT, LONG]
        .into_iter()
        .map(|q| (q, generate(q, 40)))
        .collect();
    for (pp, tp) in [(1, 1), (2, 3), (3, 1), (5, 3)] {
        let c = Cluster::start(&["--pp", &pp.to_string(), "--tp", &tp.to_string()]);
        for (q, text) in &want {
            let (status, v) = c.chat(&greedy(q, 40));
            assert_eq!(status, 200, "{v}");
            assert_eq!(
                v["choices"][0]["message"]["content"].as_str(),
                Some(text.as_str()),
                "PP {pp}, TP {tp}, prompt {q:?}"
            );
            let t = &v["tandem"];
            assert!(t["kv_bytes"].as_u64().unwrap_or(0) > 0, "{t}");
            // The wait after the last stage's first token is part of the
            // round trip from decode's request to verified KV.
            let (wait, trip) = (t["kv_wait_us"].as_u64(), t["kv_transfer_us"].as_u64());
            assert!(
                matches!((wait, trip), (Some(w), Some(r)) if r > 0 && w <= r),
                "{t}"
            );
        }
    }
}

/// A streamed chat, parsed into its `data:` payloads.
fn stream(port: u16, body: &Value) -> (u16, Vec<String>) {
    let (status, text) = http(port, "POST", "/v1/chat/completions", Some(body));
    let events = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect();
    (status, events)
}

#[test]
fn concurrent_streams_disconnects_and_bad_requests() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let prompts = [
        SHORT,
        "Name three primary colors.",
        "Write a haiku about the sea.",
        "What is 12 times 12?",
    ];
    let want: Vec<String> = prompts.iter().map(|q| generate(q, 32)).collect();
    let c = Cluster::start(&["--pp", "2", "--tp", "3"]);

    // Eight concurrent streams, each must finish with its own text.
    let port = c.port;
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let q = prompts[i % prompts.len()];
            std::thread::spawn(move || {
                let mut body = greedy(q, 32);
                body["stream"] = json!(true);
                body["stream_options"] = json!({"include_usage": true});
                stream(port, &body)
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (status, events) = h.join().expect("stream thread");
        assert_eq!(status, 200);
        assert_eq!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "{events:?}"
        );
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).expect("chunk JSON"))
            .collect();
        let id = chunks[0]["id"].as_str().expect("id").to_string();
        let mut text = String::new();
        for (k, ch) in chunks.iter().enumerate() {
            // Every chunk: same id, the chunk object, a creation time, the model.
            assert_eq!(ch["id"], json!(id));
            assert_eq!(ch["object"], json!("chat.completion.chunk"));
            assert!(ch["created"].as_u64().is_some_and(|t| t > 1_600_000_000));
            assert_eq!(ch["model"], json!(MODEL));
            let last = k + 1 == chunks.len();
            if last {
                // The usage chunk: no choices, the counts.
                assert_eq!(ch["choices"], json!([]));
                let u = &ch["usage"];
                assert!(u["prompt_tokens"].as_u64().unwrap_or(0) > 5);
                assert!(u["completion_tokens"].as_u64().unwrap_or(0) >= 1);
                assert_eq!(
                    u["total_tokens"].as_u64(),
                    Some(
                        u["prompt_tokens"].as_u64().unwrap()
                            + u["completion_tokens"].as_u64().unwrap()
                    )
                );
                continue;
            }
            assert!(ch["usage"].is_null(), "usage is null until the last chunk");
            let choice = &ch["choices"][0];
            assert_eq!(choice["index"], json!(0));
            if k == 0 {
                assert_eq!(choice["delta"]["role"], json!("assistant"));
            }
            if k + 2 == chunks.len() {
                let f = choice["finish_reason"].as_str().expect("a finish reason");
                assert!(f == "stop" || f == "length", "{f}");
            } else {
                assert!(choice["finish_reason"].is_null());
            }
            if let Some(t) = choice["delta"]["content"].as_str() {
                text.push_str(t);
            }
        }
        assert_eq!(text, want[i % prompts.len()], "stream {i}");
    }

    // A client that leaves mid-stream: its blocks are freed on every node.
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut body = greedy(LONG, 400);
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    let raw = body.to_string();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{raw}",
        raw.len()
    )
    .expect("write");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut seen = 0;
    let mut line = String::new();
    while seen < 5 {
        line.clear();
        r.read_line(&mut line).expect("stream line");
        if line.starts_with("data: ") {
            seen += 1;
        }
    }
    assert!(
        c.metric("tandem_kv_blocks_used", "node=\"d0\"")
            .unwrap_or(0.0)
            > 0.0
    );
    drop(r);
    s.shutdown(std::net::Shutdown::Both).expect("hang up");
    drop(s);
    wait_until_no_blocks(&c, &["d0", "p0-s0", "p0-s1"], Duration::from_secs(20));
    assert!(
        c.metric("tandem_requests_cancelled_total", "")
            .unwrap_or(0.0)
            >= 1.0
    );

    // Malformed and invalid requests: 4xx with OpenAI's error body.
    let long_prompt = "word ".repeat(9000);
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{not json".to_vec(), 400, "invalid_request_error"),
        (json!({"model": MODEL}).to_string().into_bytes(), 400, "invalid_request_error"),
        (json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).to_string().into_bytes(), 404, "invalid_request_error"),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 7}).to_string().into_bytes(), 400, "invalid_request_error"),
        (json!({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}).to_string().into_bytes(), 400, "invalid_request_error"),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": long_prompt}]}).to_string().into_bytes(), 400, "invalid_request_error"),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).to_string().into_bytes(), 400, "invalid_request_error"),
    ];
    for (body, status, kind) in cases {
        let (got, text) = http_raw(port, "POST", "/v1/chat/completions", &body);
        assert_eq!(got, status, "{text}");
        let v: Value = serde_json::from_str(&text).expect("error JSON");
        assert_eq!(v["error"]["type"], json!(kind), "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let (got, _) = http(port, "GET", "/v1/nothing", None);
    assert_eq!(got, 404);

    // Still serving, and the other endpoints answer.
    let (status, v) = c.chat(&greedy(SHORT, 32));
    assert_eq!(status, 200);
    assert_eq!(
        v["choices"][0]["message"]["content"].as_str(),
        Some(want[0].as_str())
    );
    let (status, models) = http(port, "GET", "/v1/models", None);
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).expect("JSON");
    assert_eq!(models["data"][0]["id"], json!(MODEL));
    let (status, _) = http(port, "GET", "/health", None);
    assert_eq!(status, 200);
    let (status, v) = http(
        port,
        "POST",
        "/v1/completions",
        Some(
            &json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}),
        ),
    );
    assert_eq!(status, 200, "{v}");
    let v: Value = serde_json::from_str(&v).expect("JSON");
    assert_eq!(v["object"], json!("text_completion"));
    assert!(v["choices"][0]["text"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
}

#[test]
fn a_full_queue_gets_429_and_no_live_node_gets_503() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    {
        let c = Cluster::start(&["--max-batch", "1", "--max-queue", "1"]);
        let port = c.port;
        let handles: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut body = greedy(SHORT, 64);
                    body["ignore_eos"] = json!(true);
                    http(port, "POST", "/v1/chat/completions", Some(&body))
                })
            })
            .collect();
        let results: Vec<(u16, String)> = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        let ok = results.iter().filter(|(s, _)| *s == 200).count();
        let busy: Vec<&String> = results
            .iter()
            .filter(|(s, _)| *s == 429)
            .map(|(_, b)| b)
            .collect();
        assert!(ok >= 1, "{results:?}");
        assert!(!busy.is_empty(), "{results:?}");
        assert_eq!(ok + busy.len(), 4, "{results:?}");
        let v: Value = serde_json::from_str(busy[0]).expect("JSON");
        assert_eq!(v["error"]["type"], json!("rate_limit_error"));
        // And it serves again once the queue drains.
        let (status, _) = c.chat(&greedy(SHORT, 8));
        assert_eq!(status, 200);
    }
    // A gateway alone: not healthy, and requests get 503.
    let dir = std::env::temp_dir().join(format!("tandem-503-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let port = free_port();
    let quic = free_port();
    std::fs::write(
        dir.join("cluster.toml"),
        format!(
            "[cluster]\nname = \"t\"\ncerts = \"certs\"\n[gateway]\nhttp = \"127.0.0.1:{port}\"\nquic = \"127.0.0.1:{quic}\"\n[[prefill]]\nname = \"p\"\nstages = [{{ name = \"p-s0\", addr = \"127.0.0.1:1\" }}]\n[[decode]]\nname = \"d\"\naddr = \"127.0.0.1:2\"\n"
        ),
    )
    .expect("write");
    let cfg = dir.join("cluster.toml");
    let ok = Command::new(EXE)
        .args(["certs", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .status()
        .expect("certs");
    assert!(ok.success());
    let mut gw = Command::new(EXE)
        .args(["gateway", "--node", "gateway", "--config"])
        .arg(&cfg)
        .spawn()
        .expect("gateway");
    let deadline = Instant::now() + Duration::from_secs(60);
    let health = loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            drop(s.write_all(b""));
            break http(port, "GET", "/health", None);
        }
        assert!(Instant::now() < deadline, "the gateway never listened");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(health.0, 503, "{}", health.1);
    let (status, text) = http(
        port,
        "POST",
        "/v1/chat/completions",
        Some(&greedy(SHORT, 8)),
    );
    let _ = gw.kill();
    let _ = gw.wait();
    assert_eq!(status, 503, "{text}");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(v["error"]["code"], json!("no_live_node"));
}

/// The answer a full recompute in one process gives for a conversation.
fn recompute(messages: &[Value]) -> String {
    let json = Value::Array(messages.to_vec()).to_string();
    generate_with(&["--messages", &json], 24)
}

#[test]
fn a_conversation_stays_on_its_nodes_and_moves_only_new_blocks() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(&["--pp", "2"]);
    let questions = [
        "What is the capital of France?",
        "And what river runs through it?",
        "Name one famous museum there.",
        "What is it known for?",
        "Thank you! Summarize our chat in one sentence.",
    ];
    // KV bytes of one block on the single decode rank: 30 layers x K,V x 3 heads x 16 slots x 64 dims x f32.
    let block_bytes = 30 * 2 * 3 * 16 * 64 * 4;
    let mut messages: Vec<Value> = Vec::new();
    for (turn, q) in questions.iter().enumerate() {
        messages.push(json!({"role": "user", "content": q}));
        let body =
            json!({"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 24});
        let (status, h, v) = chat_with_headers(c.port, &body, "conversation-1");
        assert_eq!(status, 200, "{v}");
        let answer = v["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .to_string();
        assert_eq!(answer, recompute(&messages), "turn {}", turn + 1);
        let prompt = v["usage"]["prompt_tokens"].as_u64().expect("usage") as usize;
        let cached: usize = header(&h, "x-tandem-cached-tokens")
            .parse()
            .expect("number");
        let prefilled: usize = header(&h, "x-tandem-prefilled-tokens")
            .parse()
            .expect("number");
        let kv: usize = header(&h, "x-tandem-kv-bytes").parse().expect("number");
        assert_eq!(header(&h, "x-tandem-decode"), "d0");
        assert_eq!(header(&h, "x-tandem-pipeline"), "p0");
        eprintln!("turn {}: prompt {prompt}, decode had {cached}, pipeline computed {prefilled}, KV moved {kv} bytes", turn + 1);
        // Only the blocks decode lacked moved.
        assert_eq!(
            kv,
            (prompt.div_ceil(16) - cached / 16) * block_bytes,
            "turn {}",
            turn + 1
        );
        if turn == 0 {
            assert_eq!(header(&h, "x-tandem-sticky"), "false");
            assert_eq!((cached, prefilled), (0, prompt));
        } else {
            assert_eq!(header(&h, "x-tandem-sticky"), "true", "turn {}", turn + 1);
            // Decode holds the conversation so far (prompts and answers);
            // the pipeline reuses its own cache of earlier prompts and
            // computes the rest (the last answer and the new question).
            assert!(
                cached >= 16 && cached < prompt,
                "turn {}: {cached} cached of {prompt}",
                turn + 1
            );
            assert!(
                prefilled < prompt && prompt - prefilled >= 16,
                "turn {}: {prefilled} computed of {prompt}",
                turn + 1
            );
            assert!(prompt - prefilled <= cached, "turn {}", turn + 1);
        }
        messages.push(json!({"role": "assistant", "content": answer}));
    }
}

#[test]
fn new_sessions_go_to_their_cached_prefix_and_a_lost_decode_node_is_recomputed() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(&["--decode-groups", "2"]);
    let config = std::env::temp_dir()
        .join(format!("tandem-cluster-test-{}", c.port))
        .join("cluster.toml");
    let mut messages = vec![json!({"role": "user", "content": SHORT})];
    let body =
        |m: &Vec<Value>| json!({"model": MODEL, "messages": m, "temperature": 0, "max_tokens": 24});
    let (status, h, v) = chat_with_headers(c.port, &body(&messages), "doomed");
    assert_eq!(status, 200, "{v}");
    let pinned = header(&h, "x-tandem-decode").to_string();
    messages.push(json!({"role": "assistant", "content": v["choices"][0]["message"]["content"]}));
    messages.push(json!({"role": "user", "content": "And what river runs through it?"}));
    // A new session that shares the conversation so far goes where its
    // prefix is cached (the gateway indexes what decode groups store).
    std::thread::sleep(Duration::from_millis(500));
    let (status, h2, v2) = chat_with_headers(c.port, &body(&messages), "another-session");
    assert_eq!(status, 200, "{v2}");
    assert_eq!(header(&h2, "x-tandem-sticky"), "false");
    assert_eq!(header(&h2, "x-tandem-decode"), pinned, "KV-aware routing");
    assert!(
        header(&h2, "x-tandem-cached-tokens")
            .parse::<usize>()
            .expect("number")
            >= 32
    );
    // kill -9 the pinned decode process.
    let pattern = format!("decode --config {} --node {pinned}", config.display());
    let killed = Command::new("pkill")
        .args(["-9", "-f", &pattern])
        .status()
        .expect("pkill");
    assert!(killed.success(), "no process matched {pattern}");
    let t0 = Instant::now();
    let (status, h, v) = chat_with_headers(c.port, &body(&messages), "doomed");
    assert_eq!(status, 200, "{v}");
    let answer = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert_eq!(answer, recompute(&messages));
    // Its KV died with the node: recomputed, wherever it went.
    assert_eq!(header(&h, "x-tandem-cached-tokens"), "0", "{h:?}");
    eprintln!(
        "after kill -9 of {pinned}: answered by {} in {:?}",
        header(&h, "x-tandem-decode"),
        t0.elapsed()
    );
}

#[test]
fn a_short_uncached_suffix_is_prefilled_by_decode_itself() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(&["--local-prefill-max", "64"]);
    let body =
        |m: &Vec<Value>| json!({"model": MODEL, "messages": m, "temperature": 0, "max_tokens": 24});
    let mut messages = vec![json!({"role": "user", "content": LONG})];
    let (status, h, v) = chat_with_headers(c.port, &body(&messages), "local");
    assert_eq!(status, 200, "{v}");
    // LONG is ~80 tokens: over the threshold, so the pipeline prefilled it.
    assert_ne!(header(&h, "x-tandem-kv-bytes"), "0");
    messages.push(json!({"role": "assistant", "content": v["choices"][0]["message"]["content"]}));
    messages.push(json!({"role": "user", "content": "Shorter, please."}));
    // Turn 2: decode lacks only the last answer's tail and the new question.
    let (status, h, v) = chat_with_headers(c.port, &body(&messages), "local");
    assert_eq!(status, 200, "{v}");
    let prompt = v["usage"]["prompt_tokens"].as_u64().expect("usage");
    let cached: u64 = header(&h, "x-tandem-cached-tokens")
        .parse()
        .expect("number");
    let prefilled: u64 = header(&h, "x-tandem-prefilled-tokens")
        .parse()
        .expect("number");
    assert_eq!(header(&h, "x-tandem-kv-bytes"), "0", "nothing moved");
    assert_eq!(cached + prefilled, prompt);
    assert!(prefilled <= 64);
    // Quantized-weight prefill: within tolerance of the reference, which for
    // this greedy answer means the same text.
    let answer = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert_eq!(answer, recompute(&messages));
}

#[test]
fn a_colocated_group_prefills_in_chunks_between_decode_steps() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // No pipelines: the decode group prefills every prompt itself, 16 tokens
    // per decode step.
    let c = Cluster::start(&["--pipelines", "0", "--local-prefill-chunk", "16"]);
    assert_eq!(http(c.port, "GET", "/health", None).0, 200);
    let long = |max: usize| json!({"model": MODEL, "messages": [{"role": "user", "content": LONG}], "temperature": 0, "max_tokens": max});
    // Alone: a prompt of several chunks gives the reference's greedy text.
    let (status, v) = c.chat(&long(24));
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        json!(generate(LONG, 24))
    );
    assert_eq!(
        v["tandem"]["kv_bytes"],
        json!(0),
        "nothing moved between nodes"
    );
    // Beside a running stream: both finish whole, the stream with every
    // token it asked for while the prompt went through in chunks.
    let port = c.port;
    let streamer = std::thread::spawn(move || {
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Count to one hundred."}], "temperature": 0, "max_tokens": 60, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
        stream(port, &body)
    });
    std::thread::sleep(Duration::from_millis(300));
    let (status, v) = c.chat(&long(8));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], json!(8));
    let prompt = v["usage"]["prompt_tokens"].as_u64().expect("usage");
    assert!(
        prompt > 48,
        "the prompt spans several 16-token chunks ({prompt})"
    );
    let (status, events) = streamer.join().expect("streamer");
    assert_eq!(status, 200);
    let usage = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find_map(|v| v["usage"]["completion_tokens"].as_u64());
    assert_eq!(usage, Some(60));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
}

#[test]
fn api_keys_guard_the_api_but_not_the_probes() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let keys = std::env::temp_dir().join(format!("tandem-keys-{}", std::process::id()));
    std::fs::write(&keys, "# clients\nsk-alpha\nsk-beta  # the second one\n").expect("keys");
    let c = Cluster::start(&["--api-key-file", keys.to_str().expect("path")]);
    let body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    for extra in [
        "",
        "Authorization: Bearer sk-gamma\r\n",
        "Authorization: Basic sk-alpha\r\n",
    ] {
        let (status, h, v) = chat_with(c.port, &body, extra);
        assert_eq!(status, 401, "{extra:?}: {v}");
        assert_eq!(v["error"]["type"], "authentication_error");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert!(h
            .iter()
            .any(|(k, v)| k == "www-authenticate" && v == "Bearer"));
    }
    for key in ["sk-alpha", "sk-beta"] {
        let (status, _, v) = chat_with(c.port, &body, &format!("Authorization: Bearer {key}\r\n"));
        assert_eq!(status, 200, "{key}: {v}");
    }
    assert_eq!(http(c.port, "GET", "/v1/models", None).0, 401);
    assert_eq!(http(c.port, "GET", "/health", None).0, 200);
    assert_eq!(
        c.metric("tandem_request_errors_total", "status=\"401\""),
        Some(4.0)
    );
    // The OpenAPI document is served, and every path and method it names
    // is one the gateway routes (401 behind the key, never 404 or 405).
    let (status, doc) = http(c.port, "GET", "/openapi.json", None);
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&doc).expect("OpenAPI JSON");
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 7);
    for (path, ops) in paths {
        for method in ops.as_object().expect("operations").keys() {
            let status = http(c.port, &method.to_uppercase(), path, None).0;
            assert!(![404, 405].contains(&status), "{method} {path}: {status}");
        }
    }
    let _ = std::fs::remove_file(&keys);
}

/// The cluster on the GPU code path, run by the CUDA emulator: prefill
/// stages and decode ranks compute with the project's CUDA kernels, their
/// KV pools in (emulated) device memory, and greedy answers equal
/// `generate` on the same device for (PP, TP) ∈ {(1, 1), (2, 1), (2, 3)}.
#[test]
fn the_cluster_on_the_emulated_gpu_answers_exactly_like_generate() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dev = ["--device", "emu", "--gpu-dtype", "f32"];
    let mut args = vec!["--chat", SHORT];
    args.extend(dev);
    let want = generate_with(&args, 6);
    // The device computes activations in full precision: the CPU with f32
    // activations is its reference (8-bit ones part at this near-tie).
    assert_eq!(
        want,
        generate_env(
            &["--chat", SHORT],
            6,
            &[("TANDEM_DECODE_ACTIVATIONS", "f32")]
        ),
        "the emulated GPU writes what the CPU writes"
    );
    for (pp, tp) in [(1, 1), (2, 1), (2, 3)] {
        let (pp_s, tp_s) = (pp.to_string(), tp.to_string());
        let mut flags = vec![
            "--pp",
            pp_s.as_str(),
            "--tp",
            tp_s.as_str(),
            "--local-prefill-max",
            "0",
        ];
        flags.extend(dev);
        let c = Cluster::start(&flags);
        let (status, v) = c.chat(&greedy(SHORT, 6));
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["choices"][0]["message"]["content"].as_str(),
            Some(want.as_str()),
            "PP {pp}, TP {tp}"
        );
        assert!(
            v["tandem"]["kv_bytes"].as_u64().unwrap_or(0) > 0,
            "{}",
            v["tandem"]
        );
    }
}

/// A mixture-of-experts model (the tiny Qwen3-MoE file that
/// `bench/tiny_moe.py files` makes) through the cluster: prefill stages
/// holding all experts of their layers send KV to decode groups whose
/// ranks cut every expert (EP of one) or hold whole experts and exchange
/// tokens (EP = TP = 3); greedy answers equal `generate`'s.
#[test]
fn a_mixture_of_experts_model_answers_exactly_like_generate() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = std::env::var_os("TANDEM_HOME").map_or_else(
        || std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/tandem"),
        std::path::PathBuf::from,
    );
    let model = home.join("moe/tiny-qwen3moe.gguf");
    assert!(
        model.is_file(),
        "{} is missing: `bench/tiny_moe.py files` makes it (CI does)",
        model.display()
    );
    let model = model.to_str().expect("a UTF-8 path");
    for q in [SHORT, LONG] {
        let want = generate_with(&["--model", model, "--chat", q], 16);
        for (pp, tp, ep) in [(2, 3, 3), (1, 3, 1)] {
            let (pp_s, tp_s, ep_s) = (pp.to_string(), tp.to_string(), ep.to_string());
            let c = Cluster::start(&[
                "--model",
                model,
                "--pp",
                &pp_s,
                "--tp",
                &tp_s,
                "--ep",
                &ep_s,
                "--local-prefill-max",
                "0",
            ]);
            let (status, models) = http(c.port, "GET", "/v1/models", None);
            assert_eq!(status, 200, "{models}");
            let models: Value = serde_json::from_str(&models).expect("JSON");
            let name = models["data"][0]["id"].as_str().expect("a model id");
            let mut body = greedy(q, 16);
            body["model"] = name.into();
            let (status, v) = c.chat(&body);
            assert_eq!(status, 200, "{v}");
            assert_eq!(
                v["choices"][0]["message"]["content"].as_str(),
                Some(want.as_str()),
                "PP {pp}, TP {tp}, EP {ep}, prompt {q:?}"
            );
            assert!(
                v["tandem"]["kv_bytes"].as_u64().unwrap_or(0) > 0,
                "the prompt's KV came from the pipeline: {}",
                v["tandem"]
            );
        }
    }
}
