use proptest::prelude::*;
use serde_json::json;

use super::*;

fn fixed(i: usize) -> String {
    format!("call_{i}")
}

/// Content and calls as a client assembles them from the pieces.
fn assemble(outs: &[Out]) -> (String, Vec<(String, String, String)>) {
    let mut text = String::new();
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for o in outs {
        match o {
            Out::Text(t) => text.push_str(t),
            Out::Call { index, id, name } => {
                assert_eq!(*index, calls.len(), "calls come in order");
                calls.push((id.clone(), name.clone(), String::new()));
            }
            Out::Args { index, text } => calls[*index].2.push_str(text),
        }
    }
    (text, calls)
}

fn parse_in_pieces(answer: &str, cuts: &[usize]) -> (String, Vec<(String, String, String)>) {
    let mut p = ToolParser::with_ids(fixed);
    let mut outs = Vec::new();
    let mut at = 0;
    for &c in cuts {
        let c = c.min(answer.len()).max(at);
        if !answer.is_char_boundary(c) {
            continue;
        }
        outs.extend(p.push(&answer[at..c]));
        at = c;
    }
    outs.extend(p.push(&answer[at..]));
    outs.extend(p.finish());
    let (text, calls) = assemble(&outs);
    let recorded: Vec<(String, String, String)> = p
        .calls()
        .iter()
        .map(|c| (c.id.clone(), c.name.clone(), c.arguments.clone()))
        .collect();
    assert_eq!(
        recorded, calls,
        "the parser's record equals what it gave out"
    );
    (text, calls)
}

const ANSWERS: &[&str] = &[
    "The weather is fine.",
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": [1, 2]}}\n</tool_call>",
    "Let me check.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {\"s\": \"}{\\\"<tool_call>\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>\n",
    "<tool_call>{\"arguments\": {\"x\": 1}, \"name\": \"late\"}</tool_call>",
    "<tool_call>\n{\"name\": \"s\", \"arguments\": \"{\\\"q\\\": 2}\"}\n</tool_call>",
    "<tool_call>\n{\"name\": \"noargs\"}\n</tool_call>",
    "a < b and <tool_ca are not calls",
    "<tool_call>not json</tool_call> after",
    "<tool_call>\n{\"name\": \"cut\", \"arguments\": {\"city\": \"Par",
    "<tool_call>\n{\"name\": \"open\", \"arguments\": {\"k\": true}}\n",
];

#[test]
fn answers_parse_into_content_and_calls() {
    let (t, c) = parse_in_pieces(ANSWERS[0], &[]);
    assert_eq!(t, "The weather is fine.");
    assert!(c.is_empty());
    let (t, c) = parse_in_pieces(ANSWERS[1], &[]);
    assert_eq!(t, "");
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].1, "get_weather");
    let args: Value = serde_json::from_str(&c[0].2).expect("arguments are JSON");
    assert_eq!(args, json!({"city": "Paris", "days": [1, 2]}));
    // Content before calls stays; braces and tags inside strings do not
    // confuse the call's end; whitespace between calls is not content.
    let (t, c) = parse_in_pieces(ANSWERS[2], &[]);
    assert_eq!(t, "Let me check.");
    assert_eq!(
        c.iter().map(|c| c.1.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(c[0].2, r#"{"s": "}{\"<tool_call>"}"#);
    assert_eq!(c[1].2, "{}");
    assert_eq!((c[0].0.as_str(), c[1].0.as_str()), ("call_0", "call_1"));
    // Arguments before the name, arguments as a string, no arguments.
    let (_, c) = parse_in_pieces(ANSWERS[3], &[]);
    assert_eq!((c[0].1.as_str(), c[0].2.as_str()), ("late", r#"{"x": 1}"#));
    let (_, c) = parse_in_pieces(ANSWERS[4], &[]);
    assert_eq!(c[0].2, r#"{"q": 2}"#);
    let (_, c) = parse_in_pieces(ANSWERS[5], &[]);
    assert_eq!(c[0].2, "{}");
    // Text that only looks like a tag, and a tag around something that
    // is not a call, are content.
    let (t, c) = parse_in_pieces(ANSWERS[6], &[]);
    assert_eq!(t, ANSWERS[6]);
    assert!(c.is_empty());
    let (t, c) = parse_in_pieces(ANSWERS[7], &[]);
    assert_eq!(t, ANSWERS[7]);
    assert!(c.is_empty());
    // An answer cut short keeps the call as far as it got; a missing
    // closing tag still ends the call.
    let (_, c) = parse_in_pieces(ANSWERS[8], &[]);
    assert_eq!(
        (c[0].1.as_str(), c[0].2.as_str()),
        ("cut", r#"{"city": "Par"#)
    );
    let (t, c) = parse_in_pieces(ANSWERS[9], &[]);
    assert_eq!((t.as_str(), c[0].2.as_str()), ("", r#"{"k": true}"#));
}

#[test]
fn arguments_stream_as_they_come() {
    let mut p = ToolParser::with_ids(fixed);
    assert!(p.push("<tool_call>\n{\"name\": \"f\", ").len() == 1);
    let o = p.push("\"arguments\": {\"city\": \"Pa");
    assert_eq!(
        o,
        [Out::Args {
            index: 0,
            text: "{\"city\": \"Pa".into()
        }]
    );
    let o = p.push("ris\"}}\n</tool_call>");
    assert_eq!(
        o,
        [Out::Args {
            index: 0,
            text: "ris\"}".into()
        }]
    );
    assert!(p.finish().is_empty());
}

proptest! {
    /// However the answer is cut into pieces, the client assembles the
    /// same content and calls.
    #[test]
    fn pieces_do_not_change_the_result(
        which in 0..ANSWERS.len(),
        mut cuts in proptest::collection::vec(0usize..200, 0..12),
    ) {
        cuts.sort_unstable();
        let answer = ANSWERS[which];
        prop_assert_eq!(parse_in_pieces(answer, &cuts), parse_in_pieces(answer, &[]));
    }

    /// Any text without the opening tag is content, unchanged.
    #[test]
    fn plain_text_is_content(s in "[a-z <>/_{}\"\\n]{0,60}", cuts in proptest::collection::vec(0usize..60, 0..6)) {
        prop_assume!(!s.contains(OPEN));
        let mut cuts = cuts;
        cuts.sort_unstable();
        let (t, c) = parse_in_pieces(&s, &cuts);
        prop_assert!(c.is_empty());
        prop_assert_eq!(t, s);
    }
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "add", "parameters": {"type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
    ])
}

#[test]
fn requests_are_checked() {
    let t = tools();
    let s = parse(Some(&t), None, None).expect("ok").expect("tools");
    assert_eq!(s.choice, Choice::Auto);
    assert!(s.parallel);
    assert!(parse(Some(&t), Some(&json!("none")), None)
        .expect("ok")
        .is_none());
    let s = parse(
        Some(&t),
        Some(&json!({"type": "function", "function": {"name": "add"}})),
        Some(false),
    )
    .expect("ok")
    .expect("tools");
    assert_eq!(s.choice, Choice::Named("add".into()));
    assert!(!s.parallel);
    for (tools, choice, param) in [
        (None, Some(json!("required")), "tool_choice"),
        (Some(json!([])), None, "tools"),
        (Some(json!({"a": 1})), None, "tools"),
        (Some(json!([{"type": "code"}])), None, "tools[0]"),
        (
            Some(json!([{"type": "function", "function": {}}])),
            None,
            "tools[0].function.name",
        ),
        (
            Some(json!([{"type": "function", "function": {"name": "a b"}}])),
            None,
            "tools[0].function.name",
        ),
        (
            Some(json!([{"type": "function", "function": {"name": "a", "parameters": 3}}])),
            None,
            "tools[0].function.parameters",
        ),
        (Some(tools()), Some(json!("sometimes")), "tool_choice"),
        (
            Some(tools()),
            Some(json!({"type": "function", "function": {"name": "nope"}})),
            "tool_choice",
        ),
    ] {
        let e = parse(tools.as_ref(), choice.as_ref(), None).expect_err(param);
        assert_eq!(e.body()["error"]["param"], param, "{e:?}");
    }
    let mut dup = tools();
    dup[1]["function"]["name"] = json!("get_weather");
    assert!(parse(Some(&dup), None, None).is_err());
}

#[test]
fn history_is_written_for_templates_with_and_without_tools() {
    let spec = parse(Some(&tools()), None, None).expect("ok");
    let mut call = ChatMessage::new("assistant", "");
    call.tool_calls = Some(json!([{"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]));
    let mut result = ChatMessage::new("tool", "{\"temp\": 21}");
    result.tool_call_id = Some("call_1".into());
    let msgs = vec![ChatMessage::new("user", "Weather in Paris?"), call, result];
    // Without tool support: tools in a system message, calls and results
    // in the call format.
    let (m, t) = prepare(&msgs, spec.as_ref(), false);
    assert!(t.is_none());
    assert_eq!(m[0].role, "system");
    assert!(m[0].content.contains("\"get_weather\"") && m[0].content.contains("<tool_call>"));
    assert_eq!(m[2].role, "assistant");
    assert_eq!(
        m[2].content,
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Paris\"}}\n</tool_call>"
    );
    assert_eq!(
        (m[3].role.as_str(), m[3].content.as_str()),
        ("user", "<tool_response>\n{\"temp\": 21}\n</tool_response>")
    );
    // With: the template gets the tools, and arguments as objects.
    let (m, t) = prepare(&msgs, spec.as_ref(), true);
    assert_eq!(t, Some(tools()));
    assert_eq!(m.len(), 3);
    assert_eq!(
        m[1].tool_calls.as_ref().expect("calls")[0]["function"]["arguments"],
        json!({"city": "Paris"})
    );
}
