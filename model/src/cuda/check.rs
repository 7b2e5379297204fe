//! The GPU engine against the CPU engine, check by check: what `tandem
//! gpu-check` runs on a GPU and the emulator tests run on every machine.
//!
//! Each check prints one line (pass or fail, with its figures). The
//! tolerances are stated here: with f32 weights the device computes what
//! the CPU does up to summation order (relative difference of logits at
//! most 1e-3); with bf16 weights and GEMM inputs each layer rounds its
//! inputs to 8 significant bits, and the stated bound is 5e-2 of the
//! largest logit (greedy choices then part only at near-ties).

use std::sync::Arc;

use super::comm::{DeviceComm, SharedGpu};
use super::gpu::{Arg, Gpu};
use super::graph::GraphMode;
use super::slice::{CudaSlice, CudaWeights, GpuDtype};
use crate::attention::SeqSpan;
use crate::comm::{AllReduce, ThreadGroup};
use crate::device::Device;
use crate::engine::{generate, Engine, EngineOptions, Sequence};
use crate::error::Result;
use crate::file::ModelFile;
use crate::kv::{BlockId, KvDtype, KvLayout, KvPool};
use crate::linear::Formats;
use crate::ranks::{Input, RankGroup, RankGroupOptions, Span};
use crate::sampling::{argmax, select, Draw, SamplingParams};
use crate::slice::{Phase, SliceInput, SliceOutput, SliceSpec};

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            if self.pass { "PASS" } else { "FAIL" },
            self.name,
            self.detail
        )
    }
}

/// What to check, and how much of it.
#[derive(Debug, Clone)]
pub struct CheckPlan {
    pub device: Device,
    pub dtype: GpuDtype,
    /// Prompts (token ids) for the logits and greedy checks.
    pub prompts: Vec<Vec<u32>>,
    /// Tokens of each greedy continuation.
    pub greedy_tokens: usize,
    /// A longer prompt for the chunked-prefill check, and its chunk sizes.
    pub long_prompt: Vec<u32>,
    pub chunks: Vec<usize>,
    /// (PP, TP) layouts checked against the whole model on the device.
    pub layouts: Vec<(usize, usize)>,
    pub kv_dtype: KvDtype,
}

impl CheckPlan {
    /// The largest relative difference of logits allowed against the CPU.
    pub fn tolerance(&self) -> f32 {
        match self.dtype {
            GpuDtype::F32 => 1e-3,
            GpuDtype::Bf16 => 5e-2,
        }
    }

    /// A logit gap below which two tokens count as tied.
    fn near_tie(&self) -> f32 {
        match self.dtype {
            GpuDtype::F32 => 0.05,
            GpuDtype::Bf16 => 0.5,
        }
    }
}

/// max |a - b| / max |a|
pub fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn check(name: &str, r: Result<(bool, String)>) -> Check {
    match r {
        Ok((pass, detail)) => Check {
            name: name.into(),
            pass,
            detail,
        },
        Err(e) => Check {
            name: name.into(),
            pass: false,
            detail: format!("error: {e}"),
        },
    }
}

/// Runs every check of `plan`, calling `each` as each finishes.
pub fn run_all(file: &ModelFile, plan: &CheckPlan, mut each: impl FnMut(&Check)) -> Vec<Check> {
    let mut out = kernel_checks(&plan.device, &mut each);
    out.extend(model_checks(file, plan, each));
    out
}

/// The checks that need no model: sampling, attention and all-reduce
/// kernels against references.
pub fn kernel_checks(device: &Device, mut each: impl FnMut(&Check)) -> Vec<Check> {
    let mut out = Vec::new();
    let mut push = |c: Check| {
        each(&c);
        out.push(c);
    };
    push(check("sampling", sampling(device)));
    push(check("attention paged vs dense", attention(device)));
    push(check("all-reduce", all_reduce(device)));
    out
}

/// The checks on the model: the device's engine against the CPU's.
pub fn model_checks(
    file: &ModelFile,
    plan: &CheckPlan,
    mut each: impl FnMut(&Check),
) -> Vec<Check> {
    // The device computes activations in full precision, so the CPU
    // reference does too (by default its decode quantizes them to 8 bits for
    // K-quant and Q5 weights, which moves logits by a few percent).
    crate::qrows::set_int8_activations(false);
    let mut out = Vec::new();
    let mut push = |c: Check| {
        each(&c);
        out.push(c);
    };
    push(check(
        "hidden states and logits",
        hidden_and_logits(file, plan),
    ));
    push(check("greedy continuations", greedy(file, plan)));
    push(check("chunked prefill", chunked(file, plan)));
    push(check("layouts", layouts(file, plan)));
    push(check("graphs", graphs(file, plan)));
    out
}

fn engine(
    file: &ModelFile,
    plan: &CheckPlan,
    device: Device,
    pp: usize,
    tp: usize,
) -> Result<Engine> {
    Engine::new(
        file,
        &EngineOptions {
            pp,
            tp,
            kv_blocks: 96,
            kv_dtype: plan.kv_dtype,
            device,
            gpu_dtype: plan.dtype,
            ..Default::default()
        },
    )
}

/// Prefill logits (in chunks of `chunk`) and one decode step's after the
/// greedy token.
fn logits(e: &mut Engine, ids: &[u32], chunk: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let mut seq = Sequence {
        tokens: ids.to_vec(),
        ..Default::default()
    };
    let r = (|| {
        let pre = e.prefill(&mut seq, chunk)?;
        seq.tokens.push(argmax(&pre));
        let dec = e.decode(&mut [&mut seq])?;
        Ok((pre, dec))
    })();
    e.release(&mut seq);
    r
}

/// Hidden states after a few layer counts and the final logits, device vs CPU.
fn hidden_and_logits(file: &ModelFile, plan: &CheckPlan) -> Result<(bool, String)> {
    let n = file.config.n_layers;
    let ids = &plan.prompts[0];
    let mut ends: Vec<usize> = vec![1, n / 3, 2 * n / 3, n - 1];
    ends.dedup();
    let mut worst_hidden = 0f32;
    let mut lines = Vec::new();
    for end in ends.into_iter().filter(|e| *e >= 1 && *e < n) {
        let run = |device: Device| -> Result<Vec<f32>> {
            let g = RankGroup::new(
                file,
                &RankGroupOptions {
                    layers: 0..end,
                    kv_blocks: 16,
                    formats: Formats::PREFILL,
                    device,
                    gpu_dtype: plan.dtype,
                    kv_dtype: plan.kv_dtype,
                    ..Default::default()
                },
            )?;
            let span = Span {
                pos: 0,
                n: ids.len(),
                blocks: (0..ids.len().div_ceil(16) as u32).map(BlockId).collect(),
            };
            match g.forward(Input::Tokens(ids.clone()), vec![span], Phase::Prefill)? {
                SliceOutput::Hidden(h) => Ok(h),
                _ => Err(super::gpu::err(
                    "a slice without the last layer gave no hidden state",
                )),
            }
        };
        let d = rel_diff(&run(Device::Cpu)?, &run(plan.device.clone())?);
        worst_hidden = worst_hidden.max(d);
        lines.push(format!("{end} layers {d:.2e}"));
    }
    let mut cpu = engine(file, plan, Device::Cpu, 1, 1)?;
    let mut dev = engine(file, plan, plan.device.clone(), 1, 1)?;
    let mut worst = 0f32;
    for ids in &plan.prompts {
        let (cp, cd) = logits(&mut cpu, ids, 512)?;
        let (gp, gd) = logits(&mut dev, ids, 512)?;
        worst = worst.max(rel_diff(&cp, &gp)).max(rel_diff(&cd, &gd));
    }
    let tol = plan.tolerance();
    Ok((
        worst <= tol && worst_hidden <= tol,
        format!(
            "hidden states (relative to the largest) {}; logits {worst:.2e} over {} prompts (tolerance {tol:.0e}, {:?} weights)",
            lines.join(", "),
            plan.prompts.len(),
            plan.dtype
        ),
    ))
}

/// Greedy continuations equal the CPU's, or part only at a near-tie.
fn greedy(file: &ModelFile, plan: &CheckPlan) -> Result<(bool, String)> {
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(plan.greedy_tokens)
    };
    let mut cpu = engine(file, plan, Device::Cpu, 1, 1)?;
    let mut dev = engine(file, plan, plan.device.clone(), 1, 1)?;
    let mut pass = true;
    let mut notes = Vec::new();
    for ids in &plan.prompts {
        let want = generate(&mut cpu, &file.tokenizer, ids, &params, 512, |_| {})?.tokens;
        let got = generate(&mut dev, &file.tokenizer, ids, &params, 512, |_| {})?.tokens;
        let agree = want.iter().zip(&got).take_while(|(a, b)| a == b).count();
        if agree == want.len() {
            notes.push(format!("{agree}/{} equal", want.len()));
            continue;
        }
        // Where they part, the CPU's logits must hold the two choices close.
        let mut seq = Sequence {
            tokens: ids.iter().chain(&want[..agree]).copied().collect(),
            ..Default::default()
        };
        let l = cpu.prefill(&mut seq, 512)?;
        cpu.release(&mut seq);
        let gap = l[want[agree] as usize] - l[got[agree] as usize];
        let tie = gap < plan.near_tie();
        pass &= tie;
        notes.push(format!(
            "{agree}/{} equal, then {} vs {} at a logit gap of {gap:.3}{}",
            want.len(),
            got[agree],
            want[agree],
            if tie {
                " (a near-tie)"
            } else {
                " (NOT a near-tie)"
            }
        ));
    }
    Ok((pass, notes.join("; ")))
}

/// Prefill in chunks equals prefill in one pass, on the device.
fn chunked(file: &ModelFile, plan: &CheckPlan) -> Result<(bool, String)> {
    let mut dev = engine(file, plan, plan.device.clone(), 1, 1)?;
    let ids = &plan.long_prompt;
    let (whole, whole_dec) = logits(&mut dev, ids, ids.len())?;
    let tol = plan.tolerance();
    let mut pass = true;
    let mut notes = Vec::new();
    for c in &plan.chunks {
        let (p, d) = logits(&mut dev, ids, *c)?;
        let diff = rel_diff(&whole, &p).max(rel_diff(&whole_dec, &d));
        pass &= diff <= tol;
        notes.push(format!("chunk {c}: {diff:.2e}"));
    }
    Ok((
        pass,
        format!(
            "{} tokens, {} (tolerance {tol:.0e})",
            ids.len(),
            notes.join(", ")
        ),
    ))
}

/// PP and TP slices on the device equal the whole model on the device.
fn layouts(file: &ModelFile, plan: &CheckPlan) -> Result<(bool, String)> {
    let mut whole = engine(file, plan, plan.device.clone(), 1, 1)?;
    let ids = &plan.prompts[0];
    let (p0, d0) = logits(&mut whole, ids, 512)?;
    drop(whole);
    let tol = plan.tolerance();
    let mut pass = true;
    let mut notes = Vec::new();
    for (pp, tp) in &plan.layouts {
        let mut e = engine(file, plan, plan.device.clone(), *pp, *tp)?;
        let (p, d) = logits(&mut e, ids, 512)?;
        let diff = rel_diff(&p0, &p).max(rel_diff(&d0, &d));
        pass &= diff <= tol;
        notes.push(format!("PP {pp} TP {tp}: {diff:.2e}"));
    }
    Ok((pass, format!("{} (tolerance {tol:.0e})", notes.join(", "))))
}

/// Captured decode graphs equal their steps queued kernel by kernel, bit
/// for bit, and the general pass within tolerance.
fn graphs(file: &ModelFile, plan: &CheckPlan) -> Result<(bool, String)> {
    let gpu = Gpu::open(&plan.device, 0)?;
    let stream = Arc::new(gpu.stream()?);
    let spec = SliceSpec::full(&file.config);
    let weights = CudaWeights::read(file, &spec, plan.dtype)?;
    let layout = weights.kv_layout(KvLayout::DEFAULT_BLOCK_SIZE, plan.kv_dtype);
    let mut pool = KvPool::new_on_device(layout, 64, stream.clone())?;
    let mut slice = CudaSlice::upload(weights, stream, Box::new(super::comm::SoloDev))?;
    // Three sequences of different lengths, prefilled eagerly.
    let prompts: Vec<Vec<u32>> = (0..3)
        .map(|i| {
            plan.prompts[i % plan.prompts.len()]
                .iter()
                .skip(i)
                .copied()
                .collect()
        })
        .collect();
    let mut tables: Vec<Vec<BlockId>> = Vec::new();
    let mut next = 0u32;
    for p in &prompts {
        let nb = (p.len() + 8).div_ceil(16) as u32;
        tables.push((next..next + nb).map(BlockId).collect());
        next += nb;
    }
    let mut last = Vec::new();
    for (p, t) in prompts.iter().zip(&tables) {
        let span = [SeqSpan {
            pos: 0,
            n: p.len(),
            blocks: t,
        }];
        match slice.forward(SliceInput::Tokens(p), &span, &mut pool, None, None)? {
            SliceOutput::Logits(l) => last.push(argmax(&l)),
            _ => return Err(super::gpu::err("prefill gave no logits")),
        }
    }
    let mut equal_bits = true;
    let mut worst = 0f32;
    let mut same_tokens = true;
    for step in 0..3 {
        let spans: Vec<SeqSpan> = prompts
            .iter()
            .zip(&tables)
            .map(|(p, t)| SeqSpan {
                pos: p.len() + step,
                n: 1,
                blocks: t,
            })
            .collect();
        let mut run = |mode: GraphMode, sample: bool| -> Result<SliceOutput> {
            slice.set_graph_mode(mode);
            let draws = vec![Draw::GREEDY; spans.len()];
            slice.forward(
                SliceInput::Tokens(&last),
                &spans,
                &mut pool,
                None,
                sample.then_some(draws.as_slice()),
            )
        };
        let (SliceOutput::Logits(g), SliceOutput::Logits(p), SliceOutput::Logits(o)) = (
            run(GraphMode::On, false)?,
            run(GraphMode::Padded, false)?,
            run(GraphMode::Off, false)?,
        ) else {
            return Err(super::gpu::err("a decode step gave no logits"));
        };
        let (SliceOutput::Sampled(gs), SliceOutput::Sampled(ps)) =
            (run(GraphMode::On, true)?, run(GraphMode::Padded, true)?)
        else {
            return Err(super::gpu::err("a sampled decode step gave no tokens"));
        };
        equal_bits &= g.iter().zip(&p).all(|(a, b)| a.to_bits() == b.to_bits()) && gs == ps;
        worst = worst.max(rel_diff(&o, &g));
        let chosen: Vec<u32> = g.chunks(file.config.vocab_size).map(argmax).collect();
        same_tokens &= chosen == gs.iter().map(|s| s.token).collect::<Vec<_>>();
        last = chosen;
    }
    let tol = plan.tolerance();
    Ok((
        equal_bits && same_tokens && worst <= tol && slice.graphs_captured() >= 2,
        format!(
            "3 steps of 3 sequences: graph replay {} its padded step; greedy tokens from the graph's sampler {}; general pass within {worst:.2e} (tolerance {tol:.0e}); {} graphs captured",
            if equal_bits { "equals bit for bit" } else { "DIFFERS from" },
            if same_tokens { "equal the logits' argmax" } else { "DIFFER from the logits' argmax" },
            slice.graphs_captured()
        ),
    ))
}

/// Deterministic numbers in [-1, 1).
fn numbers(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// The device's sampling kernel chooses what the host's `select` does.
fn sampling(device: &Device) -> Result<(bool, String)> {
    let gpu = Gpu::open(device, 0)?;
    let st = gpu.stream()?;
    let vocab = 1000;
    let mut draws = Vec::new();
    let us = numbers(7, 64);
    let mut k = 0;
    for t in [0.0f32, 0.7, 1.3] {
        for top_k in [0usize, 1, 5, 50] {
            for top_p in [1.0f32, 0.9, 0.3] {
                draws.push(Draw {
                    temperature: t,
                    top_k,
                    top_p,
                    u: (us[k % us.len()] + 1.0) / 2.0,
                    shape: None,
                });
                k += 1;
            }
        }
    }
    let rows = draws.len();
    // Logits on a coarse grid, with deliberate ties, so sums of
    // probabilities compare the same way in any order.
    let mut logits = Vec::with_capacity(rows * vocab);
    for r in 0..rows {
        let v = numbers(100 + r as u64, vocab);
        logits.extend(v.iter().map(|x| (x * 48.0).round() / 8.0));
    }
    let lb = st.upload(&logits)?;
    let temp: Vec<f32> = draws.iter().map(|d| d.temperature).collect();
    let topk: Vec<i32> = draws.iter().map(|d| d.top_k as i32).collect();
    let topp: Vec<f32> = draws.iter().map(|d| d.top_p).collect();
    let u: Vec<f32> = draws.iter().map(|d| d.u).collect();
    let (tb, kb, pb, ub) = (
        st.upload(&temp)?,
        st.upload(&topk)?,
        st.upload(&topp)?,
        st.upload(&u)?,
    );
    let out = gpu.alloc(rows * 8)?;
    st.launch(
        "sample_rows",
        (rows as u32, 1, 1),
        (1024, 1, 1),
        0,
        &[
            out.arg(),
            Arg::Ptr(out.at(rows * 4)),
            lb.arg(),
            Arg::I32(vocab as i32),
            tb.arg(),
            kb.arg(),
            pb.arg(),
            ub.arg(),
        ],
    )?;
    let v = st.read::<u32>(out.ptr, 2 * rows)?;
    let mut wrong = Vec::new();
    let mut worst_lp = 0f32;
    for (r, d) in draws.iter().enumerate() {
        let want = select(&logits[r * vocab..(r + 1) * vocab], d);
        let (tok, lp) = (v[r], f32::from_bits(v[rows + r]));
        worst_lp = worst_lp.max((lp - want.logprob).abs());
        if tok != want.token {
            wrong.push(format!("{d:?}: {tok} vs {}", want.token));
        }
    }
    Ok((
        wrong.is_empty() && worst_lp < 1e-4,
        if wrong.is_empty() {
            format!("{rows} draws (greedy, temperature, top-k, top-p) choose the host's tokens; log-probabilities within {worst_lp:.1e}")
        } else {
            format!(
                "{} of {rows} draws differ: {}",
                wrong.len(),
                wrong.join("; ")
            )
        },
    ))
}

/// Plain softmax attention over contiguous keys and values.
fn dense(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], scale: f32) -> Vec<f32> {
    let s: Vec<f32> = k
        .iter()
        .map(|k| k.iter().zip(q).map(|(a, b)| a * b).sum::<f32>() * scale)
        .collect();
    let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
    let z: f32 = e.iter().sum();
    (0..q.len())
        .map(|d| e.iter().zip(v).map(|(w, v)| w * v[d]).sum::<f32>() / z)
        .collect()
}

/// Paged attention kernels (split-KV decode, flash-style prefill) against
/// dense attention over the same keys, from a pool of scattered blocks.
fn attention(device: &Device) -> Result<(bool, String)> {
    let gpu = Gpu::open(device, 0)?;
    let st = gpu.stream()?;
    let (n_kv, group, hd, bs) = (2usize, 3usize, 64usize, 16usize);
    let n_q = n_kv * group;
    let layout = KvLayout {
        layers: 2,
        kv_heads: n_kv,
        block_size: bs,
        head_dim: hd,
        dtype: KvDtype::F32,
    };
    // Two sequences: (cached, new) = (300, 1) decodes over two parts; (20, 45) prefills.
    let seqs = [(300usize, 1usize), (20, 45)];
    let n_blocks: usize = seqs
        .iter()
        .map(|(c, n)| layout.blocks_for(c + n))
        .sum::<usize>()
        + 2;
    let mut ids: Vec<u32> = (0..n_blocks as u32).rev().collect();
    ids.swap(1, n_blocks / 2);
    let mut pool = vec![0f32; layout.block_elems() * n_blocks];
    let layer = 1;
    let val = |s: usize, kv: usize, h: usize, p: usize| {
        numbers((s * 1000 + kv * 100 + h) as u64 * 7919 + p as u64, hd)
    };
    let mut tables = Vec::new();
    let mut next = 0;
    for (s, (c, n)) in seqs.iter().enumerate() {
        let nb = layout.blocks_for(c + n);
        let t: Vec<u32> = ids[next..next + nb].to_vec();
        next += nb;
        for h in 0..n_kv {
            for p in 0..c + n {
                for kv in 0..2 {
                    let off = t[p / bs] as usize * layout.block_elems()
                        + layout.offset(layer, kv, h, p % bs);
                    pool[off..off + hd].copy_from_slice(&val(s, kv, h, p));
                }
            }
        }
        tables.push(t);
    }
    let tokens: usize = seqs.iter().map(|(_, n)| n).sum();
    let q = numbers(99, tokens * n_q * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let flat: Vec<i32> = tables.iter().flatten().map(|b| *b as i32).collect();
    let pb = st.upload(&pool)?;
    let qb = st.upload(&q)?;
    let tb = st.upload(&flat)?;
    let out = gpu.alloc(tokens * n_q * hd * 4)?;
    st.zero(out.ptr, tokens * n_q * hd * 4)?;
    let i32s = |v: &[i32]| st.upload(v);
    // Sequence 0 decodes (its token is row 0); sequence 1 prefills rows 1..46.
    let dec_tok = i32s(&[0])?;
    let dec_ctx = i32s(&[(seqs[0].0 + 1) as i32])?;
    let dec_off = i32s(&[0])?;
    let parts = (seqs[0].0 + 1).div_ceil(super::slice::DECODE_PART);
    let part_acc = gpu.alloc(n_q * parts * hd * 4)?;
    let part_ml = gpu.alloc(n_q * parts * 2 * 4)?;
    let be = layout.block_elems() as i64;
    st.launch(
        "attn_decode_part",
        (parts as u32, n_kv as u32, 1),
        (128, 1, 1),
        0,
        &[
            part_acc.arg(),
            part_ml.arg(),
            qb.arg(),
            pb.arg(),
            Arg::I32(0),
            dec_tok.arg(),
            dec_ctx.arg(),
            tb.arg(),
            dec_off.arg(),
            Arg::I32(layer as i32),
            Arg::I32(n_q as i32),
            Arg::I32(n_kv as i32),
            Arg::I32(hd as i32),
            Arg::I32(bs as i32),
            Arg::I64(be),
            Arg::F32(scale),
            Arg::I32(parts as i32),
        ],
    )?;
    st.launch(
        "attn_decode_reduce",
        (n_q as u32, 1, 1),
        (64, 1, 1),
        0,
        &[
            out.arg(),
            Arg::I32(0),
            part_acc.arg(),
            part_ml.arg(),
            dec_tok.arg(),
            dec_ctx.arg(),
            Arg::I32(n_q as i32),
            Arg::I32(hd as i32),
            Arg::I32(parts as i32),
        ],
    )?;
    let pre_tok = i32s(&[1])?;
    let pre_pos = i32s(&[seqs[1].0 as i32])?;
    let pre_n = i32s(&[seqs[1].1 as i32])?;
    let pre_off = i32s(&[tables[0].len() as i32])?;
    st.launch(
        "attn_prefill_2",
        (seqs[1].1.div_ceil(64) as u32, n_q as u32, 1),
        (256, 1, 1),
        super::real::prefill_smem_bytes(hd) as u32,
        &[
            out.arg(),
            Arg::I32(0),
            qb.arg(),
            pb.arg(),
            Arg::I32(0),
            pre_tok.arg(),
            pre_pos.arg(),
            pre_n.arg(),
            tb.arg(),
            pre_off.arg(),
            Arg::I32(layer as i32),
            Arg::I32(n_q as i32),
            Arg::I32(n_kv as i32),
            Arg::I32(hd as i32),
            Arg::I32(bs as i32),
            Arg::I64(be),
            Arg::F32(scale),
        ],
    )?;
    let got = st.read::<f32>(out.ptr, tokens * n_q * hd)?;
    let mut worst = 0f32;
    let mut row = 0;
    for (s, (c, n)) in seqs.iter().enumerate() {
        for i in 0..*n {
            let p = c + i;
            for h in 0..n_q {
                let kvh = h / group;
                let k: Vec<Vec<f32>> = (0..=p).map(|pp| val(s, 0, kvh, pp)).collect();
                let v: Vec<Vec<f32>> = (0..=p).map(|pp| val(s, 1, kvh, pp)).collect();
                let o = (row * n_q + h) * hd;
                let want = dense(&q[o..o + hd], &k, &v, scale);
                for d in 0..hd {
                    worst = worst.max((got[o + d] - want[d]).abs());
                }
            }
            row += 1;
        }
    }
    Ok((
        worst < 1e-4,
        format!("one decode span over 301 keys (2 parts) and a 45-token chunk over a 20-token prefix, blocks scattered: largest difference {worst:.1e}"),
    ))
}

/// The GPU all-reduces against the CPU's `ThreadGroup`: three ranks sharing
/// the device, bit for bit; and a one-rank NCCL communicator (GPUs only).
fn all_reduce(device: &Device) -> Result<(bool, String)> {
    let world = 3;
    let n = 1000;
    let inputs: Vec<Vec<f32>> = (0..world).map(|r| numbers(500 + r as u64, n)).collect();
    let cpu: Vec<Vec<f32>> = {
        let handles: Vec<_> = ThreadGroup::new(world)
            .into_iter()
            .zip(inputs.clone())
            .map(|(g, mut buf)| std::thread::spawn(move || g.all_reduce_sum(&mut buf).map(|_| buf)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| super::gpu::err("a CPU rank panicked"))?
            })
            .collect::<Result<_>>()?
    };
    let gpu = Gpu::open(device, 0)?;
    let dev: Vec<Vec<f32>> = {
        let handles: Vec<_> = SharedGpu::new(world)
            .into_iter()
            .zip(inputs.clone())
            .map(|(g, buf)| {
                let gpu = gpu.clone();
                std::thread::spawn(move || -> Result<Vec<f32>> {
                    let st = gpu.stream()?;
                    let b = st.upload(&buf)?;
                    g.all_reduce(&st, b.ptr, n)?;
                    st.read::<f32>(b.ptr, n)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| super::gpu::err("a GPU rank panicked"))?
            })
            .collect::<Result<_>>()?
    };
    let shared_ok = dev.iter().all(|d| {
        d.iter()
            .zip(&cpu[0])
            .all(|(a, b)| a.to_bits() == b.to_bits())
    });
    let nccl = if gpu.is_emulated() {
        "NCCL not run (no GPU under the emulator)".to_string()
    } else {
        let st = gpu.stream()?;
        let b = st.upload(&inputs[0])?;
        let c = super::comm::NcclComm::single(&st)?;
        c.all_reduce(&st, b.ptr, n)?;
        let back = st.read::<f32>(b.ptr, n)?;
        if back != inputs[0] {
            return Ok((false, "a one-rank NCCL all-reduce changed its input".into()));
        }
        "NCCL with a one-rank communicator returns its input".to_string()
    };
    Ok((
        shared_ok,
        format!(
            "{world} ranks sharing the device {} the CPU's ThreadGroup bit for bit; {nccl}",
            if shared_ok { "equal" } else { "DIFFER from" }
        ),
    ))
}
