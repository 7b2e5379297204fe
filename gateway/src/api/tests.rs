use serde_json::json;

use super::*;

const MODEL: &str = "SmolLM2-135M-Instruct";

const LIMITS: Limits = Limits {
    context: 8192,
    vocab: 49152,
};

fn job(v: Value) -> Result<ChatJob, ApiError> {
    validate_chat(
        parse_chat(v.to_string().as_bytes())?,
        MODEL,
        &Defaults::default(),
        LIMITS,
    )
}

fn ok_req() -> Value {
    json!({ "model": MODEL, "messages": [{ "role": "user", "content": "hi" }] })
}

fn with(field: &str, v: Value) -> Value {
    let mut r = ok_req();
    r[field] = v;
    r
}

#[test]
fn a_plain_request_gets_the_server_defaults() {
    let j = job(ok_req()).expect("valid");
    assert_eq!(j.messages, vec![ChatMessage::new("user", "hi")]);
    // Nothing from the cluster or the model: llama.cpp's sampler chain.
    let p = &j.params;
    assert_eq!(
        (
            p.temperature,
            p.top_p,
            p.top_k,
            p.min_p,
            p.repetition_penalty,
            p.max_tokens
        ),
        (0.8, 0.95, 40, 0.05, 1.0, 256)
    );
    assert!(!j.stream && !j.include_usage && !j.explicit_max);
    assert_eq!(j.n, 1);
    // The cluster's settings win over the model's, the model's over the built-in ones.
    let cluster = tandem_wire::config::SamplingSection {
        temperature: Some(0.3),
        max_tokens: Some(64),
        ..Default::default()
    };
    let model = GenerationDefaults {
        temperature: Some(0.6),
        top_p: Some(0.9),
        ..Default::default()
    };
    let d = Defaults::resolve(&cluster, &model);
    assert_eq!(
        (d.temperature, d.top_p, d.top_k, d.max_tokens),
        (0.3, 0.9, 40, 64)
    );
    assert_eq!(
        (
            d.source["temperature"],
            d.source["top_p"],
            d.source["top_k"]
        ),
        ("cluster", "model", "built-in")
    );
    let j = validate_chat(
        parse_chat(ok_req().to_string().as_bytes()).expect("parsed"),
        MODEL,
        &d,
        LIMITS,
    )
    .expect("valid");
    assert_eq!(
        (j.params.temperature, j.params.top_p, j.params.max_tokens),
        (0.3, 0.9, 64)
    );
    // A request's own values win over every default.
    let mut r = ok_req();
    r["temperature"] = json!(1.0);
    r["top_k"] = json!(0);
    r["min_p"] = json!(0);
    let j = job(r).expect("valid");
    assert_eq!(
        (j.params.temperature, j.params.top_k, j.params.min_p),
        (1.0, 0, 0.0)
    );
}

#[test]
fn the_sampling_extensions_reach_the_parameters() {
    let mut r = ok_req();
    r["logit_bias"] = json!({ "42": -100, " 7": 5.5 });
    r["presence_penalty"] = json!(0.5);
    r["frequency_penalty"] = json!(-0.25);
    r["repetition_penalty"] = json!(1.2);
    r["min_p"] = json!(0.1);
    r["logprobs"] = json!(true);
    r["top_logprobs"] = json!(5);
    r["n"] = json!(3);
    r["max_tokens"] = json!(10);
    let j = job(r).expect("valid");
    let p = &j.params;
    let mut bias = p.logit_bias.clone();
    bias.sort_by_key(|b| b.0);
    assert_eq!(bias, vec![(7, 5.5), (42, -100.0)]);
    assert_eq!(
        (
            p.presence_penalty,
            p.frequency_penalty,
            p.repetition_penalty,
            p.min_p,
            p.top_logprobs
        ),
        (0.5, -0.25, 1.2, 0.1, 5)
    );
    assert!(j.explicit_max && j.logprobs);
    assert_eq!(j.n, 3);
    let c = validate_completion(
        parse_completion(
            json!({ "model": MODEL, "prompt": "x", "logprobs": 3 })
                .to_string()
                .as_bytes(),
        )
        .expect("parsed"),
        MODEL,
        &Defaults::default(),
        LIMITS,
    )
    .expect("valid");
    assert!(c.logprobs);
    assert_eq!(c.params.top_logprobs, 3);
}

#[test]
fn unknown_fields_are_accepted() {
    let mut r = ok_req();
    r["metadata"] = json!({ "a": 1 });
    r["store"] = json!(false);
    r["tool_choice"] = json!("none");
    r["parallel_tool_calls"] = json!(true);
    assert!(job(r).is_ok());
}

#[test]
fn field_lists_come_from_the_types() {
    let chat = field_names::<ChatRequest>();
    assert!(chat.contains(&"messages") && chat.contains(&"top_logprobs"));
    assert!(
        !chat.contains(&"sampling"),
        "skipped fields are not request fields"
    );
    assert!(field_names::<Sampling>().contains(&"logit_bias"));
    assert!(field_names::<CompletionRequest>().contains(&"prompt"));
}

/// The OpenAPI document lists exactly the fields the request types read.
#[test]
fn the_openapi_document_matches_the_request_types() {
    let doc: Value = serde_json::from_str(include_str!("../openapi.json")).expect("valid JSON");
    let schemas = &doc["components"]["schemas"];
    let props = |v: &Value| -> Vec<String> {
        let mut out = Vec::new();
        if let Some(p) = v["properties"].as_object() {
            out.extend(p.keys().cloned());
        }
        for part in v["allOf"].as_array().into_iter().flatten() {
            if let Some(p) = part["properties"].as_object() {
                out.extend(p.keys().cloned());
            }
        }
        out.sort();
        out
    };
    let names = |f: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = f.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(
        props(&schemas["Sampling"]),
        names(field_names::<Sampling>()),
        "Sampling"
    );
    assert_eq!(
        props(&schemas["ChatRequest"]),
        names(field_names::<ChatRequest>()),
        "ChatRequest"
    );
    assert_eq!(
        props(&schemas["CompletionRequest"]),
        names(field_names::<CompletionRequest>()),
        "CompletionRequest"
    );
    assert_eq!(
        props(&schemas["TokenizeRequest"]),
        names(field_names::<TokenizeRequest>()),
        "TokenizeRequest"
    );
    assert_eq!(
        props(&schemas["DetokenizeRequest"]),
        names(field_names::<DetokenizeRequest>()),
        "DetokenizeRequest"
    );
    for path in ["/tokenize", "/detokenize", "/v1/models"] {
        assert!(doc["paths"][path].is_object(), "{path} is documented");
    }
}

#[test]
fn fields_map_onto_sampling_parameters() {
    let mut r = ok_req();
    r["messages"] = json!([{ "role": "developer", "content": [{ "type": "text", "text": "be " }, { "type": "text", "text": "brief" }] }, { "role": "user", "content": "hi" }]);
    r["temperature"] = json!(0);
    r["max_completion_tokens"] = json!(7);
    r["stop"] = json!("\n");
    r["seed"] = json!(3);
    r["stream"] = json!(true);
    r["stream_options"] = json!({ "include_usage": true });
    r["top_k"] = json!(-1);
    let j = job(r).expect("valid");
    assert_eq!(j.messages[0], ChatMessage::new("system", "be brief"));
    assert_eq!(
        (
            j.params.temperature,
            j.params.max_tokens,
            j.params.seed,
            j.params.top_k
        ),
        (0.0, 7, Some(3), 0)
    );
    assert_eq!(j.params.stop, vec!["\n".to_string()]);
    assert!(j.stream && j.include_usage);
}

#[test]
fn bad_requests_are_400s_that_name_the_field() {
    let cases = [
        (with("temperature", json!(2.5)), "temperature"),
        (with("temperature", json!("hot")), ""),
        (with("top_p", json!(0)), "top_p"),
        (with("max_tokens", json!(0)), "max_tokens"),
        (with("n", json!(9)), "n"),
        (with("n", json!(0)), "n"),
        (with("max_tokens", json!(1_000_000_000u64)), "max_tokens"),
        (with("logit_bias", json!({ "abc": 1 })), "logit_bias"),
        (with("logit_bias", json!({ "49152": 1 })), "logit_bias"),
        (with("logit_bias", json!({ "5": 101 })), "logit_bias"),
        (with("min_p", json!(1.5)), "min_p"),
        (with("repetition_penalty", json!(0)), "repetition_penalty"),
        (with("top_logprobs", json!(3)), "top_logprobs"),
        (with("tool_choice", json!("required")), "tool_choice"),
        (with("stop", json!(["a", "b", "c", "d", "e"])), "stop"),
        (with("stop", json!([""])), "stop"),
        (with("messages", json!([])), "messages"),
        (
            with("messages", json!([{ "role": "wizard", "content": "x" }])),
            "messages[0].role",
        ),
        (
            with(
                "messages",
                json!([{ "role": "user", "content": [{ "type": "image_url", "image_url": {} }] }]),
            ),
            "messages[0].content[0]",
        ),
        (with("presence_penalty", json!(2.5)), "presence_penalty"),
        (
            with("tools", json!([{ "type": "function" }])),
            "tools[0].function.name",
        ),
        (
            with("response_format", json!({ "type": "xml" })),
            "response_format",
        ),
        (
            with("stream_options", json!({ "include_usage": true })),
            "stream_options",
        ),
        (json!({ "messages": [] }), ""),
    ];
    for (req, param) in cases {
        let e = job(req.clone())
            .err()
            .unwrap_or_else(|| panic!("{req} must be refused"));
        assert_eq!(e.status(), 400, "{req}: {e}");
        let body = e.body();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        if !param.is_empty() {
            assert_eq!(body["error"]["param"], param, "{req}");
        }
    }
    let e = parse_chat(b"{not json").expect_err("malformed JSON");
    assert_eq!(e.status(), 400);
    assert!(e.to_string().starts_with("Malformed request body"), "{e}");
}

#[test]
fn statuses_follow_the_failure_class() {
    let e = job(with("model", json!("gpt-5"))).expect_err("unknown model");
    assert_eq!(
        (e.status(), e.body()["error"]["code"].clone()),
        (404, json!("model_not_found"))
    );
    assert_eq!(ApiError::Overloaded { retry_after_s: 1 }.status(), 429);
    assert_eq!(ApiError::Unavailable("none".into()).status(), 503);
    assert_eq!(ApiError::Unauthorized.status(), 401);
}

#[test]
fn stream_chunks_have_openai_fields() {
    let c = chat_chunk(
        "chatcmpl-1",
        7,
        MODEL,
        0,
        json!({ "role": "assistant", "content": "" }),
        None,
        None,
        true,
    );
    assert_eq!(c["object"], "chat.completion.chunk");
    assert_eq!(c["choices"][0]["delta"]["role"], "assistant");
    assert!(c["choices"][0]["finish_reason"].is_null());
    assert!(c.as_object().expect("object").contains_key("usage") && c["usage"].is_null());
    let last = chat_chunk(
        "chatcmpl-1",
        7,
        MODEL,
        2,
        json!({}),
        Some(FinishReason::Length),
        Some(chat_logprob(
            "Hi",
            -0.5,
            &[("Hi".into(), -0.5), ("Ho".into(), -1.5)],
        )),
        false,
    );
    assert_eq!(last["choices"][0]["index"], 2);
    assert_eq!(
        last["choices"][0]["logprobs"]["content"][0]["top_logprobs"][1]["token"],
        "Ho"
    );
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(
        last["choices"][0]["logprobs"]["content"][0]["logprob"],
        -0.5
    );
    assert!(!last.as_object().expect("object").contains_key("usage"));
    let u = usage_chunk("chatcmpl-1", 7, MODEL, Usage::new(10, 3));
    assert_eq!(u["choices"], json!([]));
    assert_eq!(u["usage"]["total_tokens"], 13);
    assert_eq!(sse(&json!({ "a": 1 })), "data: {\"a\":1}\n\n");
    let full = chat_completion(
        "chatcmpl-2",
        8,
        MODEL,
        vec![chat_choice(0, "Paris.", FinishReason::Stop)],
        Usage::new(5, 2),
    );
    assert_eq!(full["choices"][0]["message"]["content"], "Paris.");
    assert_eq!(full["choices"][0]["finish_reason"], "stop");
}

#[test]
fn structured_output_fields_become_one_grammar() {
    let g = |r: Value| job(r).map(|j| j.params.grammar);
    assert_eq!(g(ok_req()).expect("valid"), None);
    assert_eq!(
        g(with("response_format", json!({ "type": "text" }))).expect("valid"),
        None
    );
    assert_eq!(
        g(with("response_format", json!({ "type": "json_object" }))).expect("valid"),
        Some(Grammar::JsonSchema(r#"{"type":"object"}"#.into()))
    );
    let schema = json!({ "type": "object", "properties": { "a": { "type": "integer" } } });
    let got = g(with(
        "response_format",
        json!({ "type": "json_schema", "json_schema": { "name": "x", "schema": schema, "strict": true } }),
    ))
    .expect("valid");
    let Some(Grammar::JsonSchema(text)) = got else {
        panic!("{got:?}")
    };
    assert_eq!(serde_json::from_str::<Value>(&text).expect("JSON"), schema);
    assert_eq!(
        g(with("guided_regex", json!("[0-9]+"))).expect("valid"),
        Some(Grammar::Regex("[0-9]+".into()))
    );
    assert_eq!(
        g(with("guided_choice", json!(["yes", "no"]))).expect("valid"),
        Some(Grammar::choice(&["yes".into(), "no".into()]))
    );
    assert_eq!(
        g(with(
            "structured_outputs",
            json!({ "json": "{\"type\":\"array\"}" })
        ))
        .expect("valid"),
        Some(Grammar::JsonSchema(r#"{"type":"array"}"#.into()))
    );
    let mut two = with("guided_regex", json!("a"));
    two["response_format"] = json!({ "type": "json_object" });
    for (bad, param) in [
        (two, "guided_regex"),
        (
            with(
                "response_format",
                json!({ "type": "json_schema", "json_schema": {} }),
            ),
            "response_format",
        ),
        (
            with("response_format", json!({ "type": "yaml" })),
            "response_format",
        ),
        (with("guided_choice", json!([])), "guided_choice"),
        (with("guided_json", json!("{oops")), "guided_json"),
    ] {
        let e = job(bad.clone())
            .err()
            .unwrap_or_else(|| panic!("{bad} must be refused"));
        assert_eq!(
            (e.status(), e.body()["error"]["param"].as_str()),
            (400, Some(param)),
            "{bad}: {e}"
        );
    }
}
