//! The OpenAI API's sampling parameters, choices and token endpoints with
//! real processes: penalties equal `tandem generate`'s in every layout,
//! `logit_bias` bans a token, `top_logprobs` lists the most likely tokens,
//! `n` choices share one prefill and are reproducible with a seed,
//! `/tokenize` gives the tokenizer reference's ids, structured outputs
//! hold, and tool calls are enforced, parsed, streamed and fed back.

mod common;

use common::*;
use serde_json::{json, Value};

const PENALTIES: [&str; 6] = [
    "--repetition-penalty",
    "1.3",
    "--frequency-penalty",
    "0.5",
    "--presence-penalty",
    "0.3",
];

fn with_penalties(q: &str, n: usize) -> Value {
    let mut b = greedy(q, n);
    b["repetition_penalty"] = json!(1.3);
    b["frequency_penalty"] = json!(0.5);
    b["presence_penalty"] = json!(0.3);
    b
}

fn text(v: &Value, i: usize) -> String {
    v["choices"][i]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no text in {v}"))
        .to_string()
}

fn post(c: &Cluster, path: &str, body: &Value) -> (u16, Value) {
    let (status, t) = http(c.port, "POST", path, Some(body));
    (
        status,
        serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}")),
    )
}

/// A 400 whose error names `param` (when given) and says `says`.
fn refused((status, e): (u16, Value), param: Option<&str>, says: &str) {
    assert_eq!(status, 400, "{e}");
    if let Some(p) = param {
        assert_eq!(e["error"]["param"], p, "{e}");
    }
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(says)),
        "{e}"
    );
}

const Q: &str = "Write a long story about a dragon who loves tea.";

#[test]
fn penalties_are_the_same_in_every_layout_and_change_the_answer() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let plain = generate(Q, 48);
    let mut args = vec!["--chat", Q];
    args.extend(PENALTIES);
    let want = generate_with(&args, 48);
    assert_ne!(want, plain, "the penalties change a greedy answer");
    for (pp, tp) in [(1, 1), (2, 3)] {
        let c = Cluster::start(&["--pp", &pp.to_string(), "--tp", &tp.to_string()]);
        let (status, v) = c.chat(&with_penalties(Q, 48));
        assert_eq!(status, 200, "{v}");
        assert_eq!(text(&v, 0), want, "PP {pp}, TP {tp}");
        // The same cluster without them answers like plain greedy.
        let (_, v) = c.chat(&greedy(Q, 48));
        assert_eq!(text(&v, 0), plain, "PP {pp}, TP {tp}");
    }
}

#[test]
fn logit_bias_top_logprobs_choices_and_token_endpoints() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(&[]);

    // The greedy answer's first token, with its most likely rivals.
    let mut b = greedy(SHORT, 4);
    b["logprobs"] = json!(true);
    b["top_logprobs"] = json!(5);
    let (status, v) = c.chat(&b);
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("content")
        .clone();
    assert_eq!(content.len(), 4);
    for e in &content {
        let top = e["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(top.len(), 5, "{e}");
        assert_eq!(
            top[0]["token"], e["token"],
            "greedy picks the most likely: {e}"
        );
        let lps: Vec<f64> = top
            .iter()
            .map(|t| t["logprob"].as_f64().expect("lp"))
            .collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]), "{lps:?}");
    }
    let first = content[0]["token"].as_str().expect("token").to_string();
    let (_, ids) = post(
        &c,
        "/tokenize",
        &json!({ "prompt": first, "add_special_tokens": false }),
    );
    let ids = ids["tokens"].as_array().expect("tokens").clone();
    assert_eq!(ids.len(), 1, "{first:?} is one token");
    let banned = ids[0].as_u64().expect("id");

    // Banned, greedy picks another; the model's own log-probabilities
    // still rank the banned token first.
    b["logit_bias"] = json!({ banned.to_string(): -100 });
    let (status, v) = c.chat(&b);
    assert_eq!(status, 200, "{v}");
    let e = &v["choices"][0]["logprobs"]["content"][0];
    assert_ne!(e["token"].as_str(), Some(first.as_str()), "{e}");
    assert_eq!(
        e["top_logprobs"][0]["token"].as_str(),
        Some(first.as_str()),
        "{e}"
    );

    // n choices: one prefill of the prompt, reproducible with a seed.
    let mut b = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": LONG}],
        "n": 3, "seed": 11, "temperature": 1.0, "max_tokens": 16,
    });
    let (status, v) = c.chat(&b);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(3), "{v}");
    let texts: Vec<String> = (0..3).map(|i| text(&v, i)).collect();
    for i in 0..3 {
        assert_eq!(v["choices"][i]["index"], i);
    }
    let prompt = v["usage"]["prompt_tokens"].as_u64().expect("prompt tokens");
    assert_eq!(v["usage"]["completion_tokens"].as_u64(), Some(48), "{v}");
    let per = v["tandem"]["choices"]
        .as_array()
        .expect("per-choice accounting")
        .clone();
    let reusable = (prompt - 1) / 16 * 16;
    let computed: u64 = per
        .iter()
        .map(|a| a["prefilled_tokens"].as_u64().expect("n"))
        .sum();
    for a in &per[1..] {
        assert!(
            a["cached_tokens"].as_u64() >= Some(reusable),
            "later choices reuse the prompt: {a}"
        );
    }
    assert!(
        computed < prompt + 2 * 16,
        "the prompt ({prompt} tokens) is prefilled once, not 3 times: {computed} tokens computed"
    );
    let (_, again) = c.chat(&b);
    let again: Vec<String> = (0..3).map(|i| text(&again, i)).collect();
    assert_eq!(again, texts, "the same seed gives the same choices");
    assert!(
        texts[0] != texts[1] || texts[1] != texts[2],
        "choices differ: {texts:?}"
    );

    // Streamed choices: each index opens, ends once, then one [DONE].
    b["n"] = json!(2);
    b["stream"] = json!(true);
    let (status, body) = http(c.port, "POST", "/v1/chat/completions", Some(&b));
    assert_eq!(status, 200);
    let events: Vec<&str> = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let mut finished = [0, 0];
    let mut streamed = [String::new(), String::new()];
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).expect("event JSON");
        let ch = &v["choices"][0];
        let i = ch["index"].as_u64().expect("index") as usize;
        streamed[i].push_str(ch["delta"]["content"].as_str().unwrap_or(""));
        if !ch["finish_reason"].is_null() {
            finished[i] += 1;
        }
    }
    assert_eq!(finished, [1, 1]);
    assert_eq!(
        streamed[..],
        texts[..2],
        "a stream's choices equal the whole response's"
    );

    // Ids are random, never a counter.
    let (_, a) = c.chat(&greedy(SHORT, 1));
    let (_, b2) = c.chat(&greedy(SHORT, 1));
    let (ia, ib) = (
        a["id"].as_str().expect("id"),
        b2["id"].as_str().expect("id"),
    );
    assert!(
        ia.starts_with("chatcmpl-") && ia.len() > 30 && ia != ib,
        "{ia} {ib}"
    );

    // /tokenize: the tokenizer reference's ids; a chat's prompt as a
    // completion counts it; /detokenize goes back.
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/reference/smollm2-llamacpp.json"
        ))
        .expect("reference file"),
    )
    .expect("reference JSON");
    for case in r["tokenize"].as_array().expect("cases") {
        let (status, v) = post(
            &c,
            "/tokenize",
            &json!({ "prompt": case["text"], "add_special_tokens": false }),
        );
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["tokens"], case["ids"], "{}", case["text"]);
        assert_eq!(
            v["count"],
            case["ids"].as_array().map(Vec::len).unwrap_or(0)
        );
        assert_eq!(v["max_model_len"], 8192);
    }
    let g = &r["greedy"][0];
    let messages = json!([{ "role": "user", "content": g["prompt"] }]);
    let (_, v) = post(
        &c,
        "/tokenize",
        &json!({ "model": MODEL, "messages": messages }),
    );
    assert_eq!(v["tokens"], g["prompt_ids"]);
    let (_, done) = c.chat(&json!({ "model": MODEL, "messages": messages, "max_tokens": 1 }));
    assert_eq!(done["usage"]["prompt_tokens"], v["count"]);
    let (_, d) = post(
        &c,
        "/detokenize",
        &json!({ "tokens": r["tokenize"][1]["ids"] }),
    );
    assert_eq!(d["prompt"], r["tokenize"][1]["text"]);
    let (status, e) = post(&c, "/detokenize", &json!({ "tokens": [99999999] }));
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("tokens")),
        "{e}"
    );

    // /v1/models: the context and the defaults; max_tokens past it is a 400.
    let (_, m) = http(c.port, "GET", "/v1/models", None);
    let m: Value = serde_json::from_str(&m).expect("JSON");
    assert_eq!(m["data"][0]["max_model_len"], 8192);
    assert_eq!(m["data"][0]["sampling_defaults"]["top_k"], 40);
    refused(c.chat(&greedy(SHORT, 1_000_000_000)), None, "8192");
    refused(c.chat(&greedy(SHORT, 8180)), None, "in the prompt");
}

/// A person: what the structured-output tests ask for.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": { "type": "string", "maxLength": 20 },
            "age": { "type": "integer", "minimum": 0, "maximum": 150 },
            "colors": { "type": "array", "items": { "type": "string", "maxLength": 12 }, "maxItems": 3 }
        },
        "required": ["name", "age", "colors"],
        "additionalProperties": false
    })
}

/// Checks `text` against [`person_schema`] by hand.
fn is_person(text: &str) -> Result<(), String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e}): {text:?}"))?;
    let o = v.as_object().ok_or(format!("not an object: {text}"))?;
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort();
    if keys != ["age", "colors", "name"] {
        return Err(format!("keys {keys:?}: {text}"));
    }
    let name = o["name"].as_str().ok_or(format!("name: {text}"))?;
    let age = o["age"].as_u64().ok_or(format!("age: {text}"))?;
    let colors = o["colors"].as_array().ok_or(format!("colors: {text}"))?;
    if name.chars().count() > 20 || age > 150 || colors.len() > 3 {
        return Err(format!("out of bounds: {text}"));
    }
    if colors
        .iter()
        .any(|c| c.as_str().is_none_or(|c| c.chars().count() > 12))
    {
        return Err(format!("a color: {text}"));
    }
    Ok(())
}

#[test]
fn structured_outputs_hold_greedy_and_sampled_streamed_and_whole() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(&["--pp", "2", "--tp", "3"]);
    let ask = "Invent a person. Reply with their name, age and favourite colors.";
    let format = json!({ "type": "json_schema", "json_schema": { "name": "person", "schema": person_schema(), "strict": true } });
    for (temperature, stream) in [(0.0, false), (0.0, true), (1.0, false), (1.0, true)] {
        for seed in 0..2 {
            let b = json!({
                "model": MODEL,
                "messages": [{ "role": "user", "content": ask }],
                "response_format": format,
                "temperature": temperature,
                "seed": seed,
                "max_tokens": 120,
                "stream": stream,
            });
            let (status, body) = http(c.port, "POST", "/v1/chat/completions", Some(&b));
            assert_eq!(status, 200, "{body}");
            let (text, finish) = if stream {
                let (text, _, finish) = assemble_stream(&body);
                (text, finish)
            } else {
                let v: Value = serde_json::from_str(&body).expect("JSON");
                (text(&v, 0), v["choices"][0]["finish_reason"].clone())
            };
            assert_eq!(finish, json!("stop"), "the grammar completes: {text:?}");
            is_person(&text)
                .unwrap_or_else(|e| panic!("temperature {temperature}, stream {stream}: {e}"));
        }
    }
    // Any JSON object; one of several strings; a regular expression.
    let b = json!({ "model": MODEL, "messages": [{ "role": "user", "content": "Describe Paris." }],
                    "response_format": { "type": "json_object" }, "max_tokens": 200, "temperature": 0 });
    let (status, v) = c.chat(&b);
    assert_eq!(status, 200, "{v}");
    let t = text(&v, 0);
    if v["choices"][0]["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(&t).is_ok_and(|o| o.is_object()),
            "{t:?}"
        );
    } else {
        assert!(t.trim_start().starts_with('{'), "{t:?}");
    }
    let b = json!({ "model": MODEL, "messages": [{ "role": "user", "content": "Is the sky green?" }],
                    "guided_choice": ["yes", "no", "maybe"], "temperature": 1.0, "seed": 3,
                    "ignore_eos": true, "max_tokens": 40 });
    let (_, v) = c.chat(&b);
    assert!(
        ["yes", "no", "maybe"].contains(&text(&v, 0).as_str()),
        "{v}"
    );
    // The grammar's end ends the answer, `ignore_eos` or not.
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let b = json!({ "model": MODEL, "prompt": "The year the Eiffel Tower was finished:",
                    "guided_regex": "[12][0-9]{3}", "temperature": 0, "max_tokens": 10 });
    let (status, v) = post(&c, "/v1/completions", &b);
    assert_eq!(status, 200, "{v}");
    let year = v["choices"][0]["text"].as_str().expect("text");
    assert!(
        year.len() == 4 && year.bytes().all(|b| b.is_ascii_digit()),
        "{year:?}"
    );
    // A schema that cannot be compiled is a 400 that says why.
    let b = json!({ "model": MODEL, "messages": [{ "role": "user", "content": "hi" }],
                    "response_format": { "type": "json_schema", "json_schema": { "name": "x", "schema": { "type": "no-such-type" } } } });
    refused(c.chat(&b), Some("response_format"), "grammar");
}

fn weather_tools() -> Value {
    json!([
        { "type": "function", "function": { "name": "get_weather", "description": "Current weather in a city",
          "parameters": { "type": "object", "properties": {
              "city": { "type": "string" }, "unit": { "type": "string", "enum": ["c", "f"] } },
            "required": ["city"] } } },
        { "type": "function", "function": { "name": "add", "description": "Adds two integers",
          "parameters": { "type": "object", "properties": {
              "a": { "type": "integer" }, "b": { "type": "integer" } }, "required": ["a", "b"] } } }
    ])
}

/// A call as a client sees it: the declared tool it names and its
/// arguments, which must be a JSON object with the tool's required fields.
fn check_call(call: &Value) -> (String, Value) {
    assert_eq!(call["type"], "function", "{call}");
    assert!(
        call["id"].as_str().is_some_and(|i| i.starts_with("call_")),
        "{call}"
    );
    let name = call["function"]["name"].as_str().expect("name").to_string();
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().expect("string"))
        .unwrap_or_else(|e| panic!("arguments are not JSON ({e}): {call}"));
    let required: &[&str] = match name.as_str() {
        "get_weather" => &["city"],
        "add" => &["a", "b"],
        other => panic!("{other} is not a declared tool"),
    };
    for r in required {
        assert!(args.get(r).is_some(), "{name} lacks {r}: {args}");
    }
    (name, args)
}

/// A stream's content, tool calls and finish reason, put together the
/// way OpenAI clients do: the first delta of a call has its id and name,
/// the rest append to its arguments.
fn assemble_stream(body: &str) -> (String, Vec<Value>, Value) {
    let mut content = String::new();
    let mut calls: Vec<Value> = Vec::new();
    let mut finish = Value::Null;
    for e in body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
        if e == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(e).expect("event JSON");
        assert!(v.get("error").is_none(), "{v}");
        let d = &v["choices"][0]["delta"];
        content.push_str(d["content"].as_str().unwrap_or(""));
        for t in d["tool_calls"].as_array().into_iter().flatten() {
            let i = t["index"].as_u64().expect("index") as usize;
            if i == calls.len() {
                assert!(
                    t["id"].is_string() && t["function"]["name"].is_string(),
                    "{t}"
                );
                calls.push(json!({ "id": t["id"], "type": "function",
                    "function": { "name": t["function"]["name"], "arguments": "" } }));
            }
            let a = t["function"]["arguments"].as_str().unwrap_or("");
            let prev = calls[i]["function"]["arguments"]
                .as_str()
                .unwrap_or("")
                .to_string();
            calls[i]["function"]["arguments"] = json!(prev + a);
        }
        if !v["choices"][0]["finish_reason"].is_null() {
            finish = v["choices"][0]["finish_reason"].clone();
        }
    }
    (content, calls, finish)
}

#[test]
fn tool_calls_are_enforced_parsed_streamed_and_fed_back() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(&["--pp", "2", "--tp", "3"]);
    let ask = json!([{ "role": "user", "content": "What is the weather in Paris?" }]);
    // `required`: well-formed calls of declared tools, and nothing else.
    for (temperature, stream) in [(0.0, false), (0.0, true), (1.0, false), (1.0, true)] {
        let b = json!({ "model": MODEL, "messages": ask, "tools": weather_tools(),
                        "tool_choice": "required", "temperature": temperature, "seed": 5,
                        "max_tokens": 120, "stream": stream });
        let (status, body) = http(c.port, "POST", "/v1/chat/completions", Some(&b));
        assert_eq!(status, 200, "{body}");
        let (content, calls, finish) = if stream {
            assemble_stream(&body)
        } else {
            let v: Value = serde_json::from_str(&body).expect("JSON");
            let m = &v["choices"][0]["message"];
            assert!(m["content"].is_null(), "{v}");
            (
                String::new(),
                m["tool_calls"].as_array().cloned().unwrap_or_default(),
                v["choices"][0]["finish_reason"].clone(),
            )
        };
        assert_eq!(content, "", "temperature {temperature}, stream {stream}");
        assert!(
            !calls.is_empty(),
            "temperature {temperature}, stream {stream}"
        );
        assert_eq!(finish, json!("tool_calls"), "{calls:?}");
        for call in &calls {
            check_call(call);
        }
    }
    // A named function without parallel calls: exactly one call of it.
    let b = json!({ "model": MODEL, "messages": [{ "role": "user", "content": "What is 2 plus 3?" }],
                    "tools": weather_tools(), "parallel_tool_calls": false, "temperature": 0,
                    "tool_choice": { "type": "function", "function": { "name": "add" } } });
    let (status, v) = c.chat(&b);
    assert_eq!(status, 200, "{v}");
    let calls = v["choices"][0]["message"]["tool_calls"]
        .as_array()
        .expect("calls");
    assert_eq!(calls.len(), 1, "{v}");
    let (name, args) = check_call(&calls[0]);
    assert_eq!(name, "add");
    assert!(args["a"].is_i64() && args["b"].is_i64(), "{args}");
    // `none`: plain text, no calls.
    let b = json!({ "model": MODEL, "messages": ask, "tools": weather_tools(),
                    "tool_choice": "none", "temperature": 0, "max_tokens": 16 });
    let (status, v) = c.chat(&b);
    assert_eq!(status, 200, "{v}");
    assert!(v["choices"][0]["message"]["tool_calls"].is_null(), "{v}");
    // The call and its result go back through the template: the result's
    // text is in the prompt the model reads, and the answer is accepted.
    let history = json!([
        { "role": "user", "content": "What is the weather in Paris?" },
        { "role": "assistant", "content": null, "tool_calls": [{ "id": "call_1", "type": "function",
          "function": { "name": "get_weather", "arguments": "{\"city\": \"Paris\"}" } }] },
        { "role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21, \"sky\": \"sunny\"}" }
    ]);
    let (status, t) = post(
        &c,
        "/tokenize",
        &json!({ "model": MODEL, "messages": history }),
    );
    assert_eq!(status, 200, "{t}");
    let (_, d) = post(
        &c,
        "/detokenize",
        &json!({ "model": MODEL, "tokens": t["tokens"] }),
    );
    let prompt = d["prompt"].as_str().expect("prompt");
    assert!(
        prompt.contains("{\"temperature\": 21, \"sky\": \"sunny\"}")
            && prompt.contains("\"name\": \"get_weather\""),
        "{prompt}"
    );
    let b = json!({ "model": MODEL, "messages": history, "tools": weather_tools(),
                    "temperature": 0, "max_tokens": 24 });
    let (status, v) = c.chat(&b);
    assert_eq!(status, 200, "{v}");
    // With the tools declared, the prompt also describes them.
    assert!(
        v["usage"]["prompt_tokens"].as_u64() > t["count"].as_u64(),
        "{v} {t}"
    );
    // Bad declarations and choices are 400s naming the field.
    for (b, param) in [
        (
            json!({ "model": MODEL, "messages": ask, "tool_choice": "required" }),
            "tool_choice",
        ),
        (
            json!({ "model": MODEL, "messages": ask, "tools": [{ "type": "function", "function": { "name": "a b" } }] }),
            "tools[0].function.name",
        ),
        (
            json!({ "model": MODEL, "messages": ask, "tools": weather_tools(),
                 "tool_choice": { "type": "function", "function": { "name": "nope" } } }),
            "tool_choice",
        ),
        (
            json!({ "model": MODEL, "messages": ask, "tools": weather_tools(), "tool_choice": "required",
                 "response_format": { "type": "json_object" } }),
            "response_format",
        ),
        (
            json!({ "model": MODEL, "messages": [{ "role": "user", "content": "hi", "tool_calls": [] }] }),
            "messages[0].tool_calls",
        ),
    ] {
        let (status, e) = c.chat(&b);
        assert_eq!(status, 400, "{b}: {e}");
        assert_eq!(e["error"]["param"], param, "{e}");
    }
}

#[test]
fn request_ids_are_echoed_or_made() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(&[]);
    let b = greedy(SHORT, 2);
    // The client's id comes back (and names the request in the logs).
    let (status, h, _) = chat_with(c.port, &b, "X-Request-Id: trace-me-42\r\n");
    assert_eq!(status, 200);
    assert_eq!(header(&h, "x-request-id"), "trace-me-42");
    // Without one, or with one that is not a plain token, a fresh random id,
    // on errors too.
    for extra in ["", "X-Request-Id: has spaces\r\n"] {
        let (_, h, _) = chat_with(c.port, &b, extra);
        let a = header(&h, "x-request-id").to_string();
        let (_, h, _) = chat_with(c.port, &b, extra);
        let b2 = header(&h, "x-request-id").to_string();
        assert!(
            a.len() == 32 && a.bytes().all(|c| c.is_ascii_hexdigit()),
            "{a}"
        );
        assert_ne!(a, b2);
    }
    let mut bad = b.clone();
    bad["model"] = json!("no-such-model");
    let (status, h, _) = chat_with(c.port, &bad, "X-Request-Id: failed-1\r\n");
    assert_eq!(status, 404);
    assert_eq!(header(&h, "x-request-id"), "failed-1");
}
