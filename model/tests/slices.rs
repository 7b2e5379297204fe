//! Composed slices (pipeline stages × tensor-parallel ranks) compute the same
//! model as the whole: equal logits and identical greedy continuations.

mod common;

use common::{logits_after, prompt_ids, PROMPTS};
use tandem_model::{Engine, EngineOptions, Sequence};

#[test]
fn composed_slices_equal_the_full_model() {
    common::composed_equal_full(&common::open(), &[(2, 1), (3, 1), (5, 1), (1, 3), (2, 3)]);
}

/// Tensor-parallel ranks sum their column pieces in the whole model's order,
/// so every layout computes the same bits (as pipeline layouts always did).
#[test]
fn every_layout_gives_the_whole_models_bits() {
    common::layouts_bit_identical(&common::open(), &[(1, 3), (2, 3), (3, 1)]);
}

#[test]
fn invalid_tp_is_refused_with_the_valid_values() {
    let file = common::open();
    let err = Engine::new(
        &file,
        &EngineOptions {
            tp: 2,
            ..Default::default()
        },
    )
    .err()
    .expect("tp 2 does not divide 3 KV heads");
    let msg = err.to_string();
    assert!(msg.contains("[1, 3]") && msg.contains("KV heads"), "{msg}");
    let err = Engine::new(
        &file,
        &EngineOptions {
            pp: 31,
            ..Default::default()
        },
    )
    .err()
    .expect("31 stages for 30 layers");
    assert!(err.to_string().contains("30 layers"), "{err}");
    let bad = EngineOptions {
        layer_split: Some(vec![0..10, 12..30]),
        ..Default::default()
    };
    let err = Engine::new(&file, &bad)
        .err()
        .expect("a split that misses layers");
    assert!(err.to_string().contains("should start at 10"), "{err}");
}

#[test]
fn chunked_prefill_equals_one_pass() {
    let file = common::open();
    let mut e = Engine::new(
        &file,
        &EngineOptions {
            kv_blocks: 64,
            ..Default::default()
        },
    )
    .expect("engine");
    let text = "Paged attention keeps the cache in fixed-size blocks. ".repeat(12);
    let ids = file.tokenizer.encode(&text).expect("encodes");
    assert!(ids.len() > 100, "prompt of {} tokens", ids.len());
    let one_pass = {
        let mut s = Sequence {
            tokens: ids.clone(),
            ..Default::default()
        };
        let l = e.prefill(&mut s, ids.len()).expect("prefill");
        e.release(&mut s);
        l
    };
    for chunk in [1, 7, 16, 100] {
        let mut s = Sequence {
            tokens: ids.clone(),
            ..Default::default()
        };
        let l = e.prefill(&mut s, chunk).expect("chunked prefill");
        e.release(&mut s);
        let d = common::rel_diff(&one_pass, &l);
        assert!(d <= 1e-4, "chunks of {chunk}: logits differ by {d}");
    }
}

/// `b`'s best token is `a`'s, or within `gap` logits of it in `a` (a near-tie).
fn same_best(a: &[f32], b: &[f32], gap: f32) -> bool {
    let (ba, bb) = (
        tandem_model::sampling::argmax(a) as usize,
        tandem_model::sampling::argmax(b) as usize,
    );
    ba == bb || a[ba] - a[bb] < gap
}

#[test]
fn half_precision_kv_stays_close() {
    let file = common::open();
    let ids = prompt_ids(&file, PROMPTS[0]);
    let mut base = Engine::new(
        &file,
        &EngineOptions {
            kv_blocks: 16,
            ..Default::default()
        },
    )
    .expect("engine");
    let (pre, dec) = logits_after(&mut base, &ids, None);
    let next = tandem_model::sampling::argmax(&pre);
    for dtype in [tandem_model::KvDtype::F16, tandem_model::KvDtype::Bf16] {
        let mut e = Engine::new(
            &file,
            &EngineOptions {
                kv_blocks: 16,
                kv_dtype: dtype,
                ..Default::default()
            },
        )
        .expect("engine");
        let (p2, d2) = logits_after(&mut e, &ids, Some(next));
        // The first token's top two are 0.05 logits apart: bf16's rounding
        // may swap them.
        assert!(same_best(&pre, &p2, 0.1), "{dtype:?}: another best token");
        let d = common::rel_diff(&dec, &d2);
        assert!(d < 0.05, "{dtype:?} KV moves decode logits by {d}");
    }
}

/// A decode group prefilling a short suffix itself runs the prompt through
/// the quantized weights instead of the dense ones: the same weights (dense
/// ones are the dequantized blocks), with decode's activations. With f32
/// activations (the default model's default) that is the same numbers
/// summed in another order; with 8-bit ones (`TANDEM_DECODE_ACTIVATIONS=int8`,
/// as llama.cpp's) each block of 32 activations is rounded to 255 levels,
/// which moves logits by a few percent of the largest.
#[test]
fn prefill_on_quantized_weights_stays_within_tolerance() {
    // Largest difference allowed, relative to the largest logit (measured:
    // under 2e-4 with f32 activations, 0.03-0.04 with 8-bit ones).
    let int8 = tandem_model::qrows::activations() == tandem_model::qrows::Activations::Int8;
    let tolerance: f32 = if int8 { 0.08 } else { 1e-3 };
    let file = common::open();
    let opts = |formats| EngineOptions {
        kv_blocks: 32,
        formats,
        ..Default::default()
    };
    let mut dense = Engine::new(&file, &opts(tandem_model::Formats::BOTH)).expect("engine");
    let mut quant = Engine::new(&file, &opts(tandem_model::Formats::DECODE)).expect("engine");
    for p in PROMPTS {
        let ids = prompt_ids(&file, p);
        let (pre, dec) = logits_after(&mut dense, &ids, None);
        let next = tandem_model::sampling::argmax(&pre);
        let (p2, d2) = logits_after(&mut quant, &ids, Some(next));
        let (dp, dd) = (common::rel_diff(&pre, &p2), common::rel_diff(&dec, &d2));
        eprintln!("{p:?}: prefill logits differ by {dp:.2e}, the next step's by {dd:.2e}");
        assert!(dp < tolerance, "{p:?}: prefill logits differ by {dp}");
        assert!(dd < tolerance, "{p:?}: the next step's differ by {dd}");
        assert!(same_best(&pre, &p2, 0.5), "{p:?}: another best token");
    }
}

/// A prefill stage stops a cache-warming pass between layers when real work
/// arrives: the stopped pass reports `Preempted`, and running the same pass
/// again gives the logits of one that was never stopped. A group of several
/// ranks ignores the flag (ranks stopping at different layers would leave the
/// others waiting in an all-reduce).
#[test]
fn a_preempted_pass_stops_and_runs_again_to_the_same_logits() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use tandem_model::{
        Formats, Input, KvDtype, ModelError, Phase, RankGroup, RankGroupOptions, SliceOutput, Span,
    };
    let file = common::open();
    let ids = prompt_ids(&file, PROMPTS[1]);
    let group = |tp| {
        RankGroup::new(
            &file,
            &RankGroupOptions {
                layers: 0..file.config.n_layers,
                tp,
                ep: 1,
                block_size: 16,
                kv_dtype: KvDtype::F32,
                kv_blocks: 16,
                formats: Formats::PREFILL,
                threads: 2,
                ..Default::default()
            },
        )
        .expect("rank group")
    };
    let span = || {
        vec![Span {
            pos: 0,
            n: ids.len(),
            blocks: (0..ids.len().div_ceil(16) as u32)
                .map(tandem_model::BlockId)
                .collect(),
        }]
    };
    let logits = |o: SliceOutput| match o {
        SliceOutput::Logits(l) => l,
        _ => panic!("a whole-model pass gives logits"),
    };
    let one = group(1);
    let straight = logits(
        one.forward(Input::Tokens(ids.clone()), span(), Phase::Prefill)
            .expect("pass"),
    );
    let stop = Arc::new(AtomicBool::new(true));
    let stopped = one.forward_until(
        Input::Tokens(ids.clone()),
        span(),
        Phase::Prefill,
        Some(stop.clone()),
    );
    assert!(
        matches!(stopped, Err(ModelError::Preempted)),
        "a set flag stops the pass"
    );
    stop.store(false, std::sync::atomic::Ordering::Release);
    let again = logits(
        one.forward_until(
            Input::Tokens(ids.clone()),
            span(),
            Phase::Prefill,
            Some(stop),
        )
        .expect("an unset flag lets the pass finish"),
    );
    assert_eq!(straight, again);
    let three = group(3);
    let through = three
        .forward_until(
            Input::Tokens(ids.clone()),
            span(),
            Phase::Prefill,
            Some(Arc::new(AtomicBool::new(true))),
        )
        .expect("several ranks ignore the flag");
    let through = logits(through);
    assert_eq!(through.len(), straight.len());
}
