//! A model exported as a Hugging Face directory (what the GPU check's
//! PyTorch reference loads) computes what the GGUF file does: Tandem reads
//! the export back, with Hugging Face's RoPE and unpermuted Q/K rows, and
//! its logits and greedy tokens match the original's within bf16 rounding.

mod common;

use tandem_model::{ChatMessage, Engine, EngineOptions, ModelFile, SamplingParams, Sequence};

#[test]
fn an_exported_model_reads_back_and_computes_the_same() {
    // The export's bf16 weights have no quantized form, so decode runs them
    // with f32 activations; the GGUF's quantized decode does too here, so
    // the two differ only by the weights' rounding. (Its own test binary:
    // the switch is process-wide.)
    tandem_model::qrows::set_int8_activations(false);
    let file = common::open();
    let dir = std::env::temp_dir().join(format!("tandem-export-{}", std::process::id()));
    tandem_model::export::write_hf(&file, &dir).expect("exports");
    let back = ModelFile::open(&dir).expect("the export opens as a Hugging Face directory");
    assert_eq!(back.config.n_layers, file.config.n_layers);
    assert!(back.config.rope_neox && !file.config.rope_neox);
    let t = file.chat_template.as_ref().expect("template");
    let text = t
        .render(
            &[ChatMessage::new("user", "What is the capital of France?")],
            true,
        )
        .expect("renders");
    let ids = file.tokenizer.encode_prompt(&text).expect("encodes");
    assert_eq!(back.tokenizer.encode_prompt(&text).expect("encodes"), ids);
    let opts = EngineOptions {
        kv_blocks: 32,
        ..Default::default()
    };
    let mut a = Engine::new(&file, &opts).expect("engine");
    let mut b = Engine::new(&back, &opts).expect("engine");
    let run = |e: &mut Engine| {
        let mut s = Sequence {
            tokens: ids.clone(),
            ..Default::default()
        };
        let l = e.prefill(&mut s, 512).expect("prefill");
        e.release(&mut s);
        l
    };
    let d = common::rel_diff(&run(&mut a), &run(&mut b));
    assert!(d < 5e-2, "logits differ by {d}");
    let params = SamplingParams::greedy(8);
    let ga =
        tandem_model::generate(&mut a, &file.tokenizer, &ids, &params, 512, |_| {}).expect("a");
    let gb =
        tandem_model::generate(&mut b, &back.tokenizer, &ids, &params, 512, |_| {}).expect("b");
    assert_eq!(
        ga.tokens[..4],
        gb.tokens[..4],
        "{:?} vs {:?}",
        ga.text,
        gb.text
    );
    let _ = std::fs::remove_dir_all(&dir);
}
