//! The serving harness against a scripted OpenAI-compatible server in this
//! process: the server writes each token at scripted times and notes when it
//! wrote it; the harness's TTFT, TPOT, ITL, percentiles and goodput must
//! match those notes, failures must be counted by kind, and open-loop runs
//! must send on the requested arrival process.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_bench::arrivals::Arrivals;
use tandem_bench::client::{Api, Endpoint};
use tandem_bench::metrics::{summarize, Slo};
use tandem_bench::run::{run, Load, RunOptions};
use tandem_bench::workload::{PromptSource, Shape, ShareGptEntry, Workload};

fn model_path() -> PathBuf {
    std::env::var_os("TANDEM_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(tandem_model::fetch::cached_default_model)
}

/// What the server did for one request (keyed by its prompt).
#[derive(Debug, Clone)]
struct Truth {
    received: Instant,
    tokens: Vec<Instant>,
}

type Log = Arc<Mutex<HashMap<String, Truth>>>;

fn read_request(s: &mut TcpStream) -> serde_json::Value {
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut len = 0;
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).expect("header");
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().expect("length");
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).expect("body");
    serde_json::from_slice(&body).expect("json body")
}

fn chunk(content: &str) -> String {
    let v = serde_json::json!({"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]});
    format!("data: {v}\n\n")
}

/// Prompts name the script: `ok TTFT_MS GAP_MS…`, `status CODE`,
/// `malformed`, `error-event`, `cut`, `fast`.
fn serve(mut s: TcpStream, log: Log) {
    let req = read_request(&mut s);
    let received = Instant::now();
    let prompt = req["messages"][0]["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let words: Vec<&str> = prompt.split_whitespace().collect();
    let sse_head =
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
    match words.first().copied() {
        Some("ok") => {
            let ms: Vec<u64> = words[1..].iter().map(|w| w.parse().expect("ms")).collect();
            s.write_all(sse_head.as_bytes()).expect("head");
            // The role chunk carries no text and must not count as the first token.
            let role = serde_json::json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]});
            s.write_all(format!("data: {role}\n\n").as_bytes())
                .expect("role");
            let mut tokens = Vec::new();
            for (i, d) in ms.iter().enumerate() {
                std::thread::sleep(Duration::from_millis(*d));
                s.write_all(chunk(&format!("t{i} ")).as_bytes())
                    .expect("token");
                tokens.push(Instant::now());
            }
            let usage = serde_json::json!({"choices": [], "usage": {"prompt_tokens": 42, "completion_tokens": ms.len(), "total_tokens": 42 + ms.len()}});
            s.write_all(format!("data: {usage}\n\ndata: [DONE]\n\n").as_bytes())
                .expect("done");
            log.lock()
                .expect("log")
                .insert(prompt, Truth { received, tokens });
        }
        Some("fast") => {
            s.write_all(sse_head.as_bytes()).expect("head");
            s.write_all(format!("{}{}data: [DONE]\n\n", chunk("a"), chunk("b")).as_bytes())
                .expect("body");
        }
        Some("status") => {
            let body = r#"{"error":{"message":"scripted","type":"server_error","param":null,"code":null}}"#;
            let _ = write!(s, "HTTP/1.1 {} Scripted\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", words[1], body.len());
        }
        Some("malformed") => {
            s.write_all(sse_head.as_bytes()).expect("head");
            s.write_all(format!("{}data: {{not json\n\ndata: [DONE]\n\n", chunk("a")).as_bytes())
                .expect("body");
        }
        Some("error-event") => {
            s.write_all(sse_head.as_bytes()).expect("head");
            s.write_all(format!("{}data: {{\"error\":{{\"message\":\"lost\",\"type\":\"server_error\"}}}}\n\ndata: [DONE]\n\n", chunk("a")).as_bytes()).expect("body");
        }
        Some("cut") => {
            s.write_all(sse_head.as_bytes()).expect("head");
            s.write_all(chunk("a").as_bytes()).expect("body");
            // Connection closes without [DONE].
        }
        _ => {}
    }
}

fn start_server() -> (std::net::SocketAddr, Log) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let log: Log = Arc::default();
    let log2 = log.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let log = log2.clone();
            std::thread::spawn(move || serve(s, log));
        }
    });
    (addr, log)
}

fn endpoint(addr: std::net::SocketAddr) -> Endpoint {
    Endpoint {
        addr,
        host: addr.to_string(),
        base: String::new(),
        api: Api::Chat,
        model: "fake".into(),
        api_key: None,
        extra: Default::default(),
        timeout: Duration::from_secs(20),
    }
}

fn workload(prompts: &[String]) -> Workload {
    Workload {
        shape: Shape::ShareGpt {
            entries: prompts
                .iter()
                .map(|p| ShareGptEntry {
                    prompt: p.clone(),
                    prompt_tokens: 10,
                    completion_tokens: 8,
                })
                .collect(),
            output: None,
        },
        prompts: PromptSource::new(
            tandem_model::Tokenizer::load(&model_path()).expect("tokenizer"),
        )
        .expect("prompts"),
        seed: 1,
        run_tag: "test".into(),
    }
}

#[test]
fn metrics_match_the_scripted_truth_and_failures_are_counted() {
    let (addr, log) = start_server();
    // Distinct TTFTs (100/200/300 ms) and distinct gaps, so an off-by-one
    // (the role chunk as first token, a gap skipped) shows.
    let mut prompts: Vec<String> = (0..6)
        .map(|k| {
            format!(
                "ok {} {} {} {} {}",
                100 + 100 * (k % 3),
                40 + k * 10,
                70,
                30,
                90 + k * 5
            )
        })
        .collect();
    for bad in [
        "status 500",
        "status 429",
        "malformed",
        "error-event",
        "cut",
    ] {
        prompts.push(bad.to_string());
    }
    let n = prompts.len();
    let w = workload(&prompts);
    let start = Instant::now();
    let result = run(
        &endpoint(addr),
        &w,
        &RunOptions {
            load: Load::Concurrency(4),
            jobs: Some(n),
            duration: None,
            warmup: 0,
            seed: 1,
            progress: false,
            first_job: 0,
        },
    );
    assert_eq!(result.records.len(), n, "every request is recorded");
    let slo = Slo {
        ttft: 0.25,
        tpot: 1.0,
    };
    let s = summarize(&result.records, result.duration_s, Some(slo));
    assert_eq!(s.completed, 6);
    let errors: Vec<(&str, usize)> = s.errors.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(
        errors,
        vec![
            ("http_429", 1),
            ("http_500", 1),
            ("incomplete_stream", 1),
            ("malformed_stream", 1),
            ("stream_error", 1)
        ]
    );

    // Each successful request against what the server did. The harness's
    // clock starts when it connects and stops when it reads, so it may only
    // be later than the truth, and by far less than the smallest gap (30 ms).
    let truth = log.lock().expect("log").clone();
    let tol = 0.015;
    let mut truth_ttft = Vec::new();
    for r in result.records.iter().filter(|r| r.ok()) {
        let prompt = &prompts[r.job % n];
        let t = &truth[prompt];
        let at = |i: Instant| i.duration_since(start).as_secs_f64();
        let ttft = at(t.tokens[0]) - at(t.received);
        let gaps: Vec<f64> = t.tokens.windows(2).map(|w| at(w[1]) - at(w[0])).collect();
        let tpot = (at(t.tokens[4]) - at(t.tokens[0])) / 4.0;
        truth_ttft.push(ttft);
        let got = r.ttft().expect("ttft");
        assert!(
            got >= ttft - 1e-4 && got - ttft < tol,
            "{prompt}: TTFT {got} vs {ttft}"
        );
        let got_tpot = r.tpot().expect("tpot");
        assert!(
            (got_tpot - tpot).abs() < tol,
            "{prompt}: TPOT {got_tpot} vs {tpot}"
        );
        let itl: Vec<f64> = r.itls().collect();
        assert_eq!(
            itl.len(),
            4,
            "{prompt}: one gap between each pair of the 5 tokens"
        );
        for (g, t) in itl.iter().zip(&gaps) {
            assert!((g - t).abs() < tol, "{prompt}: ITL {g} vs {t}");
        }
        assert_eq!(
            (r.output_tokens, r.input_tokens),
            (5, 42),
            "counts come from usage"
        );
    }
    truth_ttft.sort_by(f64::total_cmp);
    let median = s.ttft.expect("ttft").median;
    let want = (truth_ttft[2] + truth_ttft[3]) / 2.0;
    assert!(
        (median - want).abs() < tol,
        "median TTFT {median} vs {want}"
    );
    assert!((s.ttft.expect("ttft").max - truth_ttft[5]).abs() < tol);
    assert_eq!(s.itl.expect("itl").count, 24);
    // TTFTs of 100 and 200 ms meet 250 ms; 300 ms ones do not: 4 good of 11.
    assert_eq!(s.slo_attainment, Some(4.0 / 11.0));
    let goodput = s.goodput.expect("goodput");
    assert!((goodput - 4.0 / result.duration_s).abs() < 1e-9);
}

#[test]
fn open_loop_runs_send_on_the_requested_arrival_process() {
    let (addr, _) = start_server();
    let n = 300;
    let prompts: Vec<String> = (0..n).map(|_| "fast".to_string()).collect();
    let w = workload(&prompts);
    let rate = 60.0;
    let arrivals = Arrivals::Poisson { rate };
    let result = run(
        &endpoint(addr),
        &w,
        &RunOptions {
            load: Load::Rate {
                arrivals,
                max_concurrency: 64,
            },
            jobs: Some(n),
            duration: None,
            warmup: 0,
            seed: 11,
            progress: false,
            first_job: 0,
        },
    );
    assert_eq!(result.records.iter().filter(|r| r.ok()).count(), n);
    let mut sent: Vec<f64> = result.records.iter().map(|r| r.sent).collect();
    sent.sort_by(f64::total_cmp);
    let gaps: Vec<f64> = sent.windows(2).map(|w| w[1] - w[0]).collect();
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    let sd =
        (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / (gaps.len() - 1) as f64).sqrt();
    // Exponential gaps: mean 1/rate, coefficient of variation 1 (n = 300
    // gives a standard error of about 6% on each).
    assert!((mean * rate - 1.0).abs() < 0.2, "mean gap {mean}");
    assert!((sd / mean - 1.0).abs() < 0.2, "cv {}", sd / mean);
    // Kolmogorov-Smirnov against Exp(rate) at the 1% level.
    let mut g = gaps.clone();
    g.sort_by(f64::total_cmp);
    let d = g
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let f = 1.0 - (-rate * x).exp();
            (f - i as f64 / g.len() as f64)
                .abs()
                .max(((i + 1) as f64 / g.len() as f64 - f).abs())
        })
        .fold(0.0, f64::max);
    assert!(d < 1.63 / (g.len() as f64).sqrt(), "KS distance {d}");
    // And the sends follow the seeded schedule itself.
    let schedule = arrivals.schedule(n, 11);
    let lag: Vec<f64> = sent.iter().zip(&schedule).map(|(s, t)| s - t).collect();
    assert!(lag.iter().all(|l| *l >= -1e-3), "no request goes out early");
}

#[test]
fn workloads_are_repeatable_and_cut_to_length() {
    let prompts =
        PromptSource::new(tandem_model::Tokenizer::load(&model_path()).expect("tokenizer"))
            .expect("prompts");
    let w = Workload {
        shape: Shape::Sessions {
            turns: 3,
            input: tandem_bench::workload::LenDist::Fixed(120),
            output: tandem_bench::workload::LenDist::Uniform { lo: 10, hi: 20 },
            think: Duration::from_millis(5),
        },
        prompts,
        seed: 9,
        run_tag: "t".into(),
    };
    let a = w.job(3);
    assert_eq!(a, w.job(3), "same seed and index, same job");
    assert_ne!(a.turns[0].content, w.job(4).turns[0].content);
    assert_eq!(a.turns.len(), 3);
    assert_eq!(a.session.as_deref(), Some("bench-t-3"));
    for t in &a.turns {
        // Decoding a window and encoding it again may merge tokens at the edges.
        assert!(
            (115..=121).contains(&t.input_tokens),
            "{} tokens",
            t.input_tokens
        );
        assert!((10..=20).contains(&t.max_tokens));
    }
    let shared = Workload {
        shape: Shape::SharedPrefix {
            groups: 2,
            prefix: 64,
            input: tandem_bench::workload::LenDist::Fixed(16),
            output: tandem_bench::workload::LenDist::Fixed(8),
        },
        prompts: w.prompts,
        seed: 9,
        run_tag: "t".into(),
    };
    let prefixes: std::collections::HashSet<String> = (0..20)
        .map(|i| {
            shared.job(i).turns[0]
                .content
                .split("\n\n")
                .next()
                .expect("prefix")
                .to_string()
        })
        .collect();
    assert_eq!(
        prefixes.len(),
        2,
        "every request starts with one of the two group prefixes"
    );
}

#[test]
fn sharegpt_files_keep_only_usable_conversations() {
    let prompts =
        PromptSource::new(tandem_model::Tokenizer::load(&model_path()).expect("tokenizer"))
            .expect("prompts");
    let dir = std::env::temp_dir().join(format!("tandem-sharegpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("sharegpt.json");
    let long_reply = "The river carried silt down to the delta every spring. ".repeat(3);
    let doc = serde_json::json!([
        {"id": "ok", "conversations": [
            {"from": "human", "value": "Tell me how rivers build deltas over many years."},
            {"from": "gpt", "value": long_reply}]},
        {"id": "short", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there, how can I help you today?"}]},
        {"id": "no-reply", "conversations": [{"from": "human", "value": "Is anyone there to answer this question?"}]},
        {"id": "not-a-conversation"}
    ]);
    std::fs::write(&path, doc.to_string()).expect("write");
    let entries =
        tandem_bench::workload::load_sharegpt(&path, &prompts, 1024, 2048, 0).expect("loads");
    assert_eq!(entries.len(), 1);
    assert!(entries[0].prompt.starts_with("Tell me how rivers"));
    assert_eq!(entries[0].completion_tokens, prompts.count(&long_reply));
    // A file with nothing usable, or not JSON, is a clear error.
    std::fs::write(&path, "[]").expect("write");
    assert!(tandem_bench::workload::load_sharegpt(&path, &prompts, 1024, 2048, 0).is_err());
    std::fs::write(&path, "{not json").expect("write");
    let e = tandem_bench::workload::load_sharegpt(&path, &prompts, 1024, 2048, 0)
        .expect_err("not JSON");
    assert!(e.to_string().contains("not JSON"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
