//! What an operator sees of a running cluster: every node's `/metrics`
//! (found through the gateway's service-discovery list) carries vLLM's
//! families, and the shipped dashboard asks only for series that exist.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use serde_json::{json, Value};

/// The families every node exports, whatever its role.
const SERVING: &[&str] = &[
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:time_per_output_token_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:request_queue_time_seconds_bucket",
    "vllm:request_inference_time_seconds_bucket",
    "vllm:request_prefill_time_seconds_bucket",
    "vllm:request_decode_time_seconds_bucket",
    "vllm:request_prompt_tokens_bucket",
    "vllm:request_generation_tokens_bucket",
    "process_resident_memory_bytes",
];

/// One node's scrape: sample name (with its labels) → value, and the
/// declared type of each family.
struct Scrape {
    samples: Vec<(String, String, f64)>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').expect("TYPE name kind");
                types.insert(name.to_string(), ty.to_string());
                continue;
            }
            if l.starts_with('#') || l.is_empty() {
                continue;
            }
            let (series, value) = l.rsplit_once(' ').expect("sample value");
            let name = series.split('{').next().expect("name").to_string();
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad sample {l:?}"));
            samples.push((name, series.to_string(), value));
        }
        Scrape { samples, types }
    }

    fn names(&self) -> BTreeSet<&str> {
        self.samples.iter().map(|(n, _, _)| n.as_str()).collect()
    }

    /// The sum of a name's samples whose series contains `label`.
    fn value(&self, name: &str, label: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(n, s, _)| n == name && s.contains(label))
            .map(|(_, _, v)| v)
            .sum()
    }
}

/// Metric names a PromQL expression selects: each identifier right before
/// a `{` (every selector in the dashboard carries a label matcher).
fn selected(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    for (i, &c) in b.iter().enumerate() {
        if c != b'{' {
            continue;
        }
        let mut j = i;
        while j > 0 && (b[j - 1].is_ascii_alphanumeric() || b[j - 1] == b'_' || b[j - 1] == b':') {
            j -= 1;
        }
        if j < i {
            out.push(expr[j..i].to_string());
        }
    }
    out
}

#[test]
fn every_node_serves_vllm_metrics_and_the_dashboard_reads_only_existing_series() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(&["--pp", "2"]);
    // One streamed request through every node.
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Name three colours."}], "temperature": 0, "max_tokens": 12, "ignore_eos": true, "stream": true});
    let (status, text) = http(c.port, "POST", "/v1/chat/completions", Some(&body));
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("data: [DONE]"), "{text}");

    let (status, targets) = http(c.port, "GET", "/metrics/targets", None);
    assert_eq!(status, 200, "{targets}");
    let targets: Value = serde_json::from_str(&targets).expect("targets JSON");
    let mut scrapes: BTreeMap<String, (String, Scrape)> = BTreeMap::new();
    // A node's figures are published at its next tick: scrape until the
    // request shows everywhere (bounded).
    for _ in 0..50 {
        scrapes.clear();
        for t in targets.as_array().expect("target groups") {
            let addr = t["targets"][0].as_str().expect("address");
            let port: u16 = addr.rsplit(':').next().unwrap().parse().expect("port");
            let node = t["labels"]["tandem_node"]
                .as_str()
                .expect("node")
                .to_string();
            let role = t["labels"]["tandem_role"]
                .as_str()
                .expect("role")
                .to_string();
            let (status, text) = http(port, "GET", "/metrics", None);
            assert_eq!(status, 200, "{node} at {addr}: {text}");
            scrapes.insert(node, (role, Scrape::parse(&text)));
        }
        let settled = scrapes
            .values()
            .all(|(_, s)| s.value("vllm:num_requests_running", "") == 0.0);
        if settled {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let roles: Vec<&str> = scrapes.values().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        roles.iter().filter(|r| **r == "prefill").count(),
        2,
        "{roles:?}"
    );
    assert_eq!(roles.iter().filter(|r| **r == "decode").count(), 1);
    assert_eq!(roles.iter().filter(|r| **r == "gateway").count(), 1);

    for (node, (role, s)) in &scrapes {
        let names = s.names();
        for f in SERVING {
            assert!(names.contains(f), "{node} ({role}) lacks {f}");
        }
        for (name, ty) in &s.types {
            if name.ends_with("_total") {
                assert_eq!(ty, "counter", "{node}: {name} counts up but is a {ty}");
            }
        }
        assert!(
            s.samples
                .iter()
                .any(|(n, series, _)| n == "vllm:num_requests_running"
                    && series.contains(&format!("model_name=\"{MODEL}\""))),
            "{node}: series carry model_name"
        );
        match role.as_str() {
            "gateway" | "decode" => {
                assert_eq!(
                    s.value("vllm:request_success_total", "finished_reason=\"length\""),
                    1.0,
                    "{node}"
                );
                assert_eq!(s.value("vllm:generation_tokens_total", ""), 12.0, "{node}");
                assert_eq!(
                    s.value("vllm:time_to_first_token_seconds_count", ""),
                    1.0,
                    "{node}"
                );
                assert_eq!(
                    s.value("vllm:inter_token_latency_seconds_count", ""),
                    11.0,
                    "{node}"
                );
                assert_eq!(
                    s.value("vllm:request_decode_time_seconds_count", ""),
                    1.0,
                    "{node}"
                );
                assert!(s.value("vllm:prompt_tokens_total", "") > 0.0, "{node}");
            }
            "prefill" => {
                assert!(s.value("vllm:prompt_tokens_total", "") > 0.0, "{node}");
                assert_eq!(
                    s.value("vllm:request_prefill_time_seconds_count", ""),
                    1.0,
                    "{node}"
                );
                assert_eq!(s.value("vllm:generation_tokens_total", ""), 0.0);
            }
            other => panic!("unknown role {other}"),
        }
        if role == "decode" {
            for f in [
                "tandem_kv_checksum_failures_total",
                "tandem_kv_retries_total",
                "tandem_kv_blocks_landed_total",
            ] {
                assert_eq!(s.types.get(f).map(String::as_str), Some("counter"), "{f}");
            }
            assert!(
                s.value("tandem_kv_blocks_landed_total", "path=") > 0.0,
                "the prompt's KV came from the pipeline"
            );
        }
    }

    // The dashboard selects only series some node exports.
    let all: BTreeSet<&str> = scrapes.values().flat_map(|(_, s)| s.names()).collect();
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/tandem.json"
        ))
        .expect("the dashboard"),
    )
    .expect("dashboard JSON");
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    assert!(exprs.len() >= 10, "{} queries", exprs.len());
    for e in &exprs {
        let names = selected(e);
        assert!(!names.is_empty(), "no metric selected in {e}");
        for n in names {
            assert!(
                all.contains(n.as_str()),
                "the dashboard asks for {n}, which no node exports ({e})"
            );
        }
    }
}

#[test]
fn selectors_are_read_from_promql() {
    assert_eq!(
        selected("sum by (le) (rate(vllm:ttft_bucket{a=\"b\"}[1m])) / x_total{c=~\"d|e\"}"),
        vec!["vllm:ttft_bucket", "x_total"]
    );
    assert!(selected("up").is_empty());
}

/// An OTLP/HTTP collector on loopback: keeps the body of every POST.
fn collector() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let keep = keep.clone();
            std::thread::spawn(move || {
                let mut w = conn.try_clone().expect("clone");
                let mut r = BufReader::new(conn);
                // Requests on a kept-alive connection, one after another.
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = l.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                len = v.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    if let Ok(v) = serde_json::from_slice(&body) {
                        keep.lock().unwrap().push(v);
                    }
                    let _ = w.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
                    );
                }
            });
        }
    });
    (port, got)
}

/// A span as exported: the node (service.instance.id) it came from.
#[derive(Debug, Clone)]
struct Exported {
    node: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
    links: Vec<(String, String)>,
    /// String attributes.
    attrs: Vec<(String, String)>,
}

impl Exported {
    fn attr(&self, k: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

const REQUEST_ID: &str = "trace-test-7";

fn exported(docs: &[Value]) -> Vec<Exported> {
    let mut out = Vec::new();
    for d in docs {
        for rs in d["resourceSpans"].as_array().into_iter().flatten() {
            let node = rs["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.instance.id")
                .and_then(|a| a["value"]["stringValue"].as_str())
                .unwrap_or("")
                .to_string();
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for s in ss["spans"].as_array().into_iter().flatten() {
                    let str_of = |k: &str| s[k].as_str().unwrap_or("").to_string();
                    out.push(Exported {
                        node: node.clone(),
                        name: str_of("name"),
                        trace: str_of("traceId"),
                        id: str_of("spanId"),
                        parent: str_of("parentSpanId"),
                        links: s["links"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|l| {
                                (
                                    l["traceId"].as_str().unwrap_or("").to_string(),
                                    l["spanId"].as_str().unwrap_or("").to_string(),
                                )
                            })
                            .collect(),
                        attrs: s["attributes"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|a| {
                                Some((
                                    a["key"].as_str()?.to_string(),
                                    a["value"]["stringValue"].as_str()?.to_string(),
                                ))
                            })
                            .collect(),
                    });
                }
            }
        }
    }
    out
}

#[test]
fn one_streamed_request_is_one_trace_across_the_gateway_decode_and_every_stage() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (port, got) = collector();
    let endpoint = format!("http://127.0.0.1:{port}");
    let c = Cluster::start_env(
        &["--pp", "2"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0, "max_tokens": 4, "ignore_eos": true, "stream": true});
    let (status, _, text) = post_with(c.port, &body, &format!("X-Request-Id: {REQUEST_ID}\r\n"));
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("data: [DONE]"), "{text}");
    // Spans leave in batches: wait (bounded) for every node's.
    let want = ["gateway", "d0", "p0-s0", "p0-s1"];
    let mut spans = Vec::new();
    for _ in 0..100 {
        spans = exported(&got.lock().unwrap());
        let request = spans
            .iter()
            .find(|s| s.node == "gateway" && s.name == "request");
        let all_in = request.is_some_and(|r| {
            want.iter().all(|n| {
                spans
                    .iter()
                    .any(|s| &s.node == n && s.trace == r.trace && s.name != "queue")
            }) && spans
                .iter()
                .any(|s| s.name == "decode" && s.trace == r.trace)
                && spans
                    .iter()
                    .filter(|s| s.name == "prefill" && s.trace == r.trace)
                    .count()
                    == 2
                && spans
                    .iter()
                    .any(|s| s.name == "generate" && s.trace == r.trace)
        });
        if all_in {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let one = |node: &str, name: &str| -> Exported {
        let found: Vec<&Exported> = spans
            .iter()
            .filter(|s| s.node == node && s.name == name)
            .collect();
        assert_eq!(found.len(), 1, "{node} {name}: {spans:#?}");
        found[0].clone()
    };
    let request = one("gateway", "request");
    assert!(
        request.parent.is_empty(),
        "the gateway's request span is the root"
    );
    let t = request.trace.clone();
    for name in ["parse", "template", "route", "submit"] {
        let s = one("gateway", name);
        assert_eq!(
            (s.trace.as_str(), s.parent.as_str()),
            (t.as_str(), request.id.as_str()),
            "{name}"
        );
    }
    let submit = one("gateway", "submit");
    let decode = one("d0", "decode");
    assert_eq!(
        (decode.trace.as_str(), decode.parent.as_str()),
        (t.as_str(), submit.id.as_str())
    );
    for name in ["queue", "attempt", "generate"] {
        let s = one("d0", name);
        assert_eq!(
            (s.trace.as_str(), s.parent.as_str()),
            (t.as_str(), decode.id.as_str()),
            "{name}"
        );
    }
    // The client's request id is on the request's span on every node.
    assert_eq!(request.attr("request_id"), Some(REQUEST_ID));
    assert_eq!(decode.attr("request_id"), Some(REQUEST_ID));
    for stage in ["p0-s0", "p0-s1"] {
        assert_eq!(
            one(stage, "prefill").attr("request_id"),
            Some(REQUEST_ID),
            "{stage}"
        );
    }
    let attempt = one("d0", "attempt");
    let wait = one("d0", "kv_wait");
    assert_eq!(wait.parent, attempt.id, "KV wait is the attempt's");
    for stage in ["p0-s0", "p0-s1"] {
        let p = one(stage, "prefill");
        assert_eq!(
            (p.trace.as_str(), p.parent.as_str()),
            (t.as_str(), attempt.id.as_str()),
            "{stage}"
        );
        let chunks: Vec<&Exported> = spans
            .iter()
            .filter(|s| s.node == stage && s.name == "chunk" && s.trace == t)
            .collect();
        assert!(!chunks.is_empty(), "{stage} ran a chunk");
        for ch in &chunks {
            assert_eq!(ch.parent, p.id, "{stage}'s chunks are its request's");
        }
        assert!(
            spans.iter().any(|s| s.node == stage
                && s.name == "kv_send"
                && chunks.iter().any(|c| c.id == s.parent)),
            "{stage} sent KV inside a chunk"
        );
    }
    // Decode steps are shared by a batch: each links to its requests.
    let steps: Vec<&Exported> = spans
        .iter()
        .filter(|s| {
            s.node == "d0" && s.name == "step" && s.links.contains(&(t.clone(), decode.id.clone()))
        })
        .collect();
    assert!(!steps.is_empty(), "decode steps link to the request");
}
