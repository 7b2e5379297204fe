use serde_json::json;

use super::*;

const MODEL: &str = "SmolLM2-135M-Instruct";

fn job(v: Value) -> Result<ChatJob, ApiError> {
    validate_chat(parse_chat(v.to_string().as_bytes())?, MODEL, 256)
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
fn a_plain_request_gets_openai_defaults() {
    let j = job(ok_req()).expect("valid");
    assert_eq!(j.messages, vec![ChatMessage::new("user", "hi")]);
    assert_eq!(
        (j.params.temperature, j.params.top_p, j.params.max_tokens),
        (1.0, 1.0, 256)
    );
    assert!(!j.stream && !j.include_usage);
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
        (with("n", json!(2)), "n"),
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
        (with("presence_penalty", json!(0.5)), "presence_penalty"),
        (with("tools", json!([{ "type": "function" }])), "tools"),
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
    let e = parse_chat(b"{not json").err().expect("malformed JSON");
    assert_eq!(e.status(), 400);
    assert!(e.to_string().starts_with("Malformed request body"), "{e}");
}

#[test]
fn statuses_follow_the_failure_class() {
    let e = job(with("model", json!("gpt-5")))
        .err()
        .expect("unknown model");
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
        json!({}),
        Some(FinishReason::Length),
        Some(("Hi".into(), -0.5)),
        false,
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
        "Paris.",
        FinishReason::Stop,
        Usage::new(5, 2),
    );
    assert_eq!(full["choices"][0]["message"]["content"], "Paris.");
    assert_eq!(full["choices"][0]["finish_reason"], "stop");
}
