//! Loading: malformed and unsupported files give clear errors; the Hugging
//! Face layout (config.json + safetensors + tokenizer.json) loads and
//! computes what the GGUF computes.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use tandem_model::{Engine, EngineOptions, ModelFile, Sequence};

fn err_of(path: &Path) -> String {
    ModelFile::open(path)
        .err()
        .map(|e| e.to_string())
        .expect("the file must be refused")
}

#[test]
fn malformed_files_are_refused_with_a_reason() {
    let dir = std::env::temp_dir().join(format!("tandem-malformed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let model = std::fs::read(common::model_path()).expect("model bytes");

    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &model[..model.len() / 2]).expect("write");
    let file = ModelFile::open(&truncated).expect("the header is intact");
    let e = Engine::new(&file, &EngineOptions::default())
        .err()
        .expect("tensors past the end")
        .to_string();
    assert!(e.contains("needs") && e.contains("bytes"), "{e}");

    let not_gguf = dir.join("notes.txt");
    std::fs::write(&not_gguf, b"hello, not a model").expect("write");
    assert!(err_of(&not_gguf).contains("not a GGUF file"));

    let header_only = dir.join("header.gguf");
    std::fs::write(&header_only, &model[..64]).expect("write");
    assert!(err_of(&header_only).contains("malformed model file"));

    let empty_dir = dir.join("empty");
    std::fs::create_dir_all(&empty_dir).expect("dir");
    assert!(err_of(&empty_dir).contains("config.json"));

    // A well-formed GGUF of an architecture Tandem does not run.
    let falcon = dir.join("falcon.gguf");
    let mut f = std::fs::File::create(&falcon).expect("create");
    let md = [(
        "general.architecture",
        gguf_file::Value::String("falcon".into()),
    )];
    let md: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut f, &md, &[]).expect("write gguf");
    let e = err_of(&falcon);
    assert!(
        e.contains("falcon") && e.contains("supported: llama"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Writes the default model in the Hugging Face layout: f32 safetensors with
/// Q/K rows back in Hugging Face's order (GGUF interleaves RoPE pairs).
fn write_hf(file: &ModelFile, dir: &Path) {
    let cfg = &file.config;
    let mut reader = std::fs::File::open(&file.path).expect("open gguf");
    let content = gguf_file::Content::read(&mut reader).expect("read gguf");
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for name in content.tensor_infos.keys() {
        let t = content
            .tensor(&mut reader, name, &Device::Cpu)
            .expect("tensor")
            .dequantize(&Device::Cpu)
            .expect("dequantize");
        let hf = if name == "token_embd.weight" {
            "model.embed_tokens.weight".to_string()
        } else if name == "output_norm.weight" {
            "model.norm.weight".to_string()
        } else {
            let rest = name.strip_prefix("blk.").expect("layer tensor");
            let (layer, what) = rest.split_once('.').expect("blk.N.name");
            let hf_what = match what {
                "attn_norm.weight" => "input_layernorm.weight",
                "attn_q.weight" => "self_attn.q_proj.weight",
                "attn_k.weight" => "self_attn.k_proj.weight",
                "attn_v.weight" => "self_attn.v_proj.weight",
                "attn_output.weight" => "self_attn.o_proj.weight",
                "ffn_norm.weight" => "post_attention_layernorm.weight",
                "ffn_gate.weight" => "mlp.gate_proj.weight",
                "ffn_up.weight" => "mlp.up_proj.weight",
                "ffn_down.weight" => "mlp.down_proj.weight",
                other => panic!("unexpected tensor {other}"),
            };
            format!("model.layers.{layer}.{hf_what}")
        };
        let t = if name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight") {
            let heads = if name.ends_with("attn_q.weight") {
                cfg.n_heads
            } else {
                cfg.n_kv_heads
            };
            let (hd, half) = (cfg.head_dim, cfg.head_dim / 2);
            let rows = t.to_vec2::<f32>().expect("2-D");
            let mut out = rows.clone();
            for h in 0..heads {
                for i in 0..half {
                    for j in 0..2 {
                        out[h * hd + j * half + i] = rows[h * hd + 2 * i + j].clone();
                    }
                }
            }
            Tensor::new(out, &Device::Cpu).expect("tensor")
        } else {
            t
        };
        tensors.insert(hf, t);
    }
    std::fs::create_dir_all(dir).expect("dir");
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))
        .expect("save safetensors");
    let config = serde_json::json!({
        "model_type": "llama",
        "num_hidden_layers": cfg.n_layers,
        "hidden_size": cfg.hidden,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "intermediate_size": cfg.intermediate,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_eps,
        "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
    std::fs::write(
        dir.join("tokenizer.json"),
        file.tokenizer.to_hf_json().expect("tokenizer json"),
    )
    .expect("tokenizer");
    let tc = serde_json::json!({
        "chat_template": file.chat_template.as_ref().expect("template").source(),
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
    });
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).expect("tokenizer config");
}

#[test]
fn hugging_face_layout_computes_what_the_gguf_computes() {
    // The HF copy holds the GGUF's weights dequantized, which decode (and the
    // LM head) runs with f32 activations; the GGUF's quantized LM head then
    // must too, so the two differ by rounding only. (The switch is
    // process-wide; the other test here computes nothing.)
    tandem_model::qrows::set_int8_activations(false);
    let gguf = common::open();
    let dir = std::env::temp_dir().join(format!("tandem-hf-{}", std::process::id()));
    write_hf(&gguf, &dir);
    let hf = ModelFile::open(&dir).expect("the HF layout opens");
    let (a, b) = (&gguf.config, &hf.config);
    assert_eq!(
        (
            a.n_layers,
            a.hidden,
            a.n_heads,
            a.n_kv_heads,
            a.head_dim,
            a.intermediate
        ),
        (
            b.n_layers,
            b.hidden,
            b.n_heads,
            b.n_kv_heads,
            b.head_dim,
            b.intermediate
        )
    );
    assert!(
        b.rope_neox && !a.rope_neox,
        "HF checkpoints rotate halves, GGUF llama pairs"
    );
    let text = "The quick brown fox jumps over the lazy dog. 1234 — “quotes”";
    let ids = gguf.tokenizer.encode(text).expect("encode");
    assert_eq!(hf.tokenizer.encode(text).expect("encode"), ids);
    assert_eq!(hf.tokenizer.decode(&ids), text);
    assert_eq!(hf.tokenizer.stop_ids, gguf.tokenizer.stop_ids);
    let opts = EngineOptions {
        kv_blocks: 8,
        ..Default::default()
    };
    let prefill = |f: &ModelFile| {
        let mut e = Engine::new(f, &opts).expect("engine");
        let mut s = Sequence {
            tokens: ids.clone(),
            ..Default::default()
        };
        e.prefill(&mut s, 64).expect("prefill")
    };
    let d = common::rel_diff(&prefill(&gguf), &prefill(&hf));
    assert!(d <= 1e-3, "HF and GGUF prefill logits differ by {d}");
    std::fs::remove_dir_all(&dir).ok();
}
