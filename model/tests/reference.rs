//! The tokenizer, chat template and greedy output against llama.cpp's
//! outputs for the default model (`shared/reference/smollm2-llamacpp.json`).

mod common;

use tandem_model::ChatMessage;

#[test]
fn tokenizer_matches_llama_cpp() {
    let file = common::open();
    let r = common::reference();
    let cases = r["tokenize"].as_array().expect("tokenize cases");
    assert!(cases.len() >= 10);
    for c in cases {
        let text = c["text"].as_str().expect("text");
        let got = file.tokenizer.encode(text).expect("encodes");
        assert_eq!(got, common::ids(&c["ids"]), "token ids of {text:?}");
        // Decoding gives the text back (special tokens aside).
        if !text.contains("<|") {
            assert_eq!(file.tokenizer.decode(&got), text);
        }
    }
}

#[test]
fn chat_template_matches_llama_cpp() {
    let file = common::open();
    let r = common::reference();
    let t = file
        .chat_template
        .as_ref()
        .expect("the default model has a chat template");
    assert_eq!(t.source(), r["chat_template"].as_str().expect("template"));
    for c in r["chat_render"].as_array().expect("render cases") {
        let msgs: Vec<ChatMessage> =
            serde_json::from_value(c["messages"].clone()).expect("messages");
        assert_eq!(
            t.render(&msgs, true).expect("renders"),
            c["rendered"].as_str().expect("rendered")
        );
    }
}

#[test]
fn greedy_output_agrees_with_llama_cpp() {
    let file = common::open();
    let r = common::reference();
    let t = file.chat_template.as_ref().expect("chat template");
    let mut cases = Vec::new();
    for c in r["greedy"].as_array().expect("greedy cases") {
        let prompt = c["prompt"].as_str().expect("prompt");
        let text = t
            .render(&[ChatMessage::new("user", prompt)], true)
            .expect("renders");
        let prompt_ids = file.tokenizer.encode_prompt(&text).expect("encodes");
        assert_eq!(
            prompt_ids,
            common::ids(&c["prompt_ids"]),
            "prompt ids for {prompt:?}"
        );
        cases.push((prompt_ids, common::ids(&c["greedy_ids"])));
    }
    common::greedy_agrees(&file, &cases, "default model");
}
