//! The GPU engine's code path, run by the CUDA emulator on the CPU,
//! against the CPU engine on the default model: the same slices, pool
//! layout and sampling, computed by the project's CUDA kernels.

mod common;

use tandem_model::cuda::GpuDtype;
use tandem_model::{ChatMessage, Device, Engine, EngineOptions, ModelFile, Sequence};

fn prompt_ids(file: &ModelFile, p: &str) -> Vec<u32> {
    let t = file.chat_template.as_ref().expect("chat template");
    file.tokenizer
        .encode_prompt(&t.render(&[ChatMessage::new("user", p)], true).expect("renders"))
        .expect("encodes")
}

fn opts(device: Device, pp: usize, tp: usize, gpu_dtype: GpuDtype) -> EngineOptions {
    EngineOptions {
        pp,
        tp,
        kv_blocks: 32,
        device,
        gpu_dtype,
        ..Default::default()
    }
}

/// Prefill logits (in chunks of `chunk`), then one decode step's.
fn logits(engine: &mut Engine, ids: &[u32], chunk: usize) -> (Vec<f32>, Vec<f32>) {
    let mut seq = Sequence {
        tokens: ids.to_vec(),
        ..Default::default()
    };
    let pre = engine.prefill(&mut seq, chunk).expect("prefill");
    seq.tokens.push(tandem_model::sampling::argmax(&pre));
    let dec = engine.decode(&mut [&mut seq]).expect("decode");
    engine.release(&mut seq);
    (pre, dec)
}

#[test]
fn emulated_gpu_logits_equal_the_cpu() {
    let file = common::open();
    let ids = prompt_ids(&file, "What is the capital of France?");
    let t0 = std::time::Instant::now();
    let mut cpu = Engine::new(&file, &opts(Device::Cpu, 1, 1, GpuDtype::F32)).expect("cpu");
    let (pre, dec) = logits(&mut cpu, &ids, 512);
    drop(cpu);
    let mut gpu = Engine::new(&file, &opts(Device::Emu, 1, 1, GpuDtype::F32)).expect("emu");
    eprintln!("cpu + load {:?}", t0.elapsed());
    let t1 = std::time::Instant::now();
    let (gpre, gdec) = logits(&mut gpu, &ids, 512);
    eprintln!("emu pass {:?}", t1.elapsed());
    let (dp, dd) = (common::rel_diff(&pre, &gpre), common::rel_diff(&dec, &gdec));
    eprintln!("prefill {dp} decode {dd}");
    assert!(dp <= 1e-3, "prefill logits differ by {dp}");
    assert!(dd <= 1e-3, "decode logits differ by {dd}");
}
