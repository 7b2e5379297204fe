//! Composed slices in one process: `pp` pipeline stages run in sequence, each
//! with `tp` ranks as threads that own their weight shard and KV pool. With
//! `pp = tp = 1` this is the single-process reference path (`tandem
//! generate`); with more, it proves the slices compose to the same model.

use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::kv::{BlockAllocator, BlockId, KvDtype, KvLayout};
use crate::linear::Formats;
use crate::ranks::{Input, RankGroup, RankGroupOptions, Span};
use crate::sampling::{Draw, Sampled, Sampler, SamplingParams};
use crate::slice::{Phase, SliceOutput, SliceSpec};
use crate::stream::{FinishReason, StopState};
use crate::ModelConfig;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub pp: usize,
    pub tp: usize,
    /// Expert parallelism (mixture-of-experts models): 1, or `tp`.
    pub ep: usize,
    /// Explicit layer ranges per stage; `None` splits evenly.
    pub layer_split: Option<Vec<std::ops::Range<usize>>>,
    pub block_size: usize,
    pub kv_dtype: KvDtype,
    /// Blocks in each rank's pool.
    pub kv_blocks: usize,
    pub formats: Formats,
    /// Compute threads for the whole engine, shared out among the ranks of a
    /// stage; 0 means rayon's global thread count.
    pub threads: usize,
    /// Where every stage's ranks compute.
    pub device: crate::Device,
    /// Weight precision on a GPU.
    pub gpu_dtype: crate::cuda::GpuDtype,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            pp: 1,
            tp: 1,
            ep: 1,
            layer_split: None,
            block_size: KvLayout::DEFAULT_BLOCK_SIZE,
            kv_dtype: KvDtype::F32,
            kv_blocks: 1024,
            formats: Formats::BOTH,
            threads: 0,
            device: crate::Device::Cpu,
            gpu_dtype: crate::cuda::GpuDtype::Bf16,
        }
    }
}

/// A sequence's state in the engine: its tokens and the blocks holding their KV.
#[derive(Debug, Default, Clone)]
pub struct Sequence {
    pub tokens: Vec<u32>,
    pub blocks: Vec<BlockId>,
    /// Tokens whose KV is in the cache.
    pub computed: usize,
}

pub struct Engine {
    pub config: ModelConfig,
    stages: Vec<RankGroup>,
    alloc: BlockAllocator,
    block_size: usize,
}

impl Engine {
    pub fn new(file: &ModelFile, opts: &EngineOptions) -> Result<Engine> {
        let cfg = &file.config;
        let split = match &opts.layer_split {
            Some(s) => {
                check_split(s, cfg.n_layers)?;
                s.clone()
            }
            None => SliceSpec::even_split(cfg.n_layers, opts.pp)?,
        };
        let threads = if opts.threads == 0 {
            rayon::current_num_threads()
        } else {
            opts.threads
        };
        let mut stages = Vec::new();
        for layers in split {
            stages.push(RankGroup::new(
                file,
                &RankGroupOptions {
                    layers,
                    tp: opts.tp,
                    ep: opts.ep,
                    block_size: opts.block_size,
                    kv_dtype: opts.kv_dtype,
                    kv_blocks: opts.kv_blocks,
                    formats: opts.formats,
                    threads,
                    device: opts.device.clone(),
                    gpu_dtype: opts.gpu_dtype,
                },
            )?);
        }
        Ok(Engine {
            config: cfg.clone(),
            stages,
            alloc: BlockAllocator::new(opts.kv_blocks),
            block_size: opts.block_size,
        })
    }

    pub fn free_blocks(&self) -> usize {
        self.alloc.free_count()
    }

    /// Runs new tokens of several sequences through every stage; returns the
    /// logits of each sequence's last new token.
    fn run(&mut self, seqs: &[(&Sequence, usize)], phase: Phase) -> Result<Vec<f32>> {
        match self.pass(seqs, phase, None)? {
            SliceOutput::Logits(l) => Ok(l),
            _ => Err(ModelError::Worker(
                "the last stage returned no logits".into(),
            )),
        }
    }

    /// As [`run`](Self::run), choosing each sequence's next token on the
    /// last stage's device.
    fn run_sampled(
        &mut self,
        seqs: &[(&Sequence, usize)],
        phase: Phase,
        draws: Vec<Draw>,
    ) -> Result<Vec<Sampled>> {
        match self.pass(seqs, phase, Some(draws))? {
            SliceOutput::Sampled(s) => Ok(s),
            _ => Err(ModelError::Worker(
                "the last stage returned no tokens".into(),
            )),
        }
    }

    fn pass(
        &mut self,
        seqs: &[(&Sequence, usize)],
        phase: Phase,
        draws: Option<Vec<Draw>>,
    ) -> Result<SliceOutput> {
        let tokens: Vec<u32> = seqs
            .iter()
            .flat_map(|(s, n)| s.tokens[s.computed..s.computed + n].iter().copied())
            .collect();
        let spans: Vec<Span> = seqs
            .iter()
            .map(|(s, n)| Span {
                pos: s.computed,
                n: *n,
                blocks: s.blocks.clone(),
            })
            .collect();
        let mut input = Input::Tokens(tokens);
        let n_stages = self.stages.len();
        for (si, group) in self.stages.iter().enumerate() {
            let last = si + 1 == n_stages;
            let out = match (&draws, last) {
                (Some(d), true) => group
                    .forward_sampled(input, spans.clone(), phase, d.clone(), None)
                    .map(SliceOutput::Sampled)?,
                _ => group.forward(input, spans.clone(), phase)?,
            };
            match out {
                SliceOutput::Hidden(h) if !last => input = Input::Hidden(h),
                o @ (SliceOutput::Logits(_) | SliceOutput::Sampled(_)) if last => return Ok(o),
                _ => {
                    return Err(ModelError::Worker(
                        "a stage returned the wrong kind of output".into(),
                    ))
                }
            }
        }
        Err(ModelError::Worker("no stages".into()))
    }

    fn ensure_blocks(&mut self, seq: &mut Sequence, positions: usize) -> Result<()> {
        let need = positions.div_ceil(self.block_size);
        if need > seq.blocks.len() {
            let more = self.alloc.alloc(need - seq.blocks.len()).ok_or_else(|| {
                ModelError::Kv(format!(
                    "out of KV blocks: {} needed, {} free",
                    need - seq.blocks.len(),
                    self.alloc.free_count()
                ))
            })?;
            seq.blocks.extend(more);
        }
        Ok(())
    }

    /// Prefills every not-yet-computed token of `seq` in chunks of at most
    /// `chunk` tokens; returns the last token's logits.
    pub fn prefill(&mut self, seq: &mut Sequence, chunk: usize) -> Result<Vec<f32>> {
        let total = seq.tokens.len();
        if seq.computed >= total {
            return Err(ModelError::Invalid("nothing to prefill".into()));
        }
        self.ensure_blocks(seq, total)?;
        let mut logits = Vec::new();
        while seq.computed < total {
            let n = chunk.max(1).min(total - seq.computed);
            logits = self.run(&[(seq, n)], Phase::Prefill)?;
            seq.computed += n;
        }
        Ok(logits)
    }

    /// [`prefill`](Self::prefill), choosing the next token with `draw` on
    /// the device (only the token comes back).
    pub fn prefill_sampled(
        &mut self,
        seq: &mut Sequence,
        chunk: usize,
        draw: Draw,
    ) -> Result<Sampled> {
        let total = seq.tokens.len();
        if seq.computed >= total {
            return Err(ModelError::Invalid("nothing to prefill".into()));
        }
        self.ensure_blocks(seq, total)?;
        loop {
            let n = chunk.max(1).min(total - seq.computed);
            if seq.computed + n == total {
                let s = self.run_sampled(&[(seq, n)], Phase::Prefill, vec![draw])?;
                seq.computed += n;
                return s
                    .into_iter()
                    .next()
                    .ok_or_else(|| ModelError::Worker("no token".into()));
            }
            self.run(&[(seq, n)], Phase::Prefill)?;
            seq.computed += n;
        }
    }

    /// [`decode`](Self::decode), choosing each sequence's next token with
    /// its draw on the device.
    pub fn decode_sampled(
        &mut self,
        seqs: &mut [&mut Sequence],
        draws: Vec<Draw>,
    ) -> Result<Vec<Sampled>> {
        self.prepare_decode(seqs)?;
        let refs: Vec<(&Sequence, usize)> = seqs.iter().map(|s| (&**s, 1)).collect();
        let out = self.run_sampled(&refs, Phase::Decode, draws)?;
        for s in seqs.iter_mut() {
            s.computed += 1;
        }
        Ok(out)
    }

    fn prepare_decode(&mut self, seqs: &mut [&mut Sequence]) -> Result<()> {
        for s in seqs.iter_mut() {
            if s.tokens.len() != s.computed + 1 {
                return Err(ModelError::Invalid(
                    "a decode step takes exactly one new token per sequence".into(),
                ));
            }
            let len = s.tokens.len();
            self.ensure_blocks(s, len)?;
        }
        Ok(())
    }

    /// One decode step for every sequence: each must have exactly one token
    /// not yet computed. Returns `[seqs, vocab]` logits.
    pub fn decode(&mut self, seqs: &mut [&mut Sequence]) -> Result<Vec<f32>> {
        self.prepare_decode(seqs)?;
        let refs: Vec<(&Sequence, usize)> = seqs.iter().map(|s| (&**s, 1)).collect();
        let logits = self.run(&refs, Phase::Decode)?;
        for s in seqs.iter_mut() {
            s.computed += 1;
        }
        Ok(logits)
    }

    pub fn release(&mut self, seq: &mut Sequence) {
        self.alloc.release_all(&seq.blocks);
        seq.blocks.clear();
        seq.computed = 0;
    }
}

pub(crate) fn check_split(split: &[std::ops::Range<usize>], n_layers: usize) -> Result<()> {
    let mut next = 0;
    for r in split {
        if r.start != next || r.end <= r.start {
            return Err(ModelError::InvalidSlice(format!(
                "layer split {split:?} must cover 0..{n_layers} with contiguous, non-empty ranges (stage starting at {} should start at {next})",
                r.start
            )));
        }
        next = r.end;
    }
    if next != n_layers {
        return Err(ModelError::InvalidSlice(format!(
            "layer split {split:?} ends at {next}, the model has {n_layers} layers"
        )));
    }
    Ok(())
}

/// What a finished generation produced.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

/// Generates a continuation of `prompt`, calling `on_text` with each piece of
/// text as soon as it is final.
pub fn generate(
    engine: &mut Engine,
    tok: &crate::Tokenizer,
    prompt: &[u32],
    params: &SamplingParams,
    chunk: usize,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    params.validate()?;
    if prompt.is_empty() {
        return Err(ModelError::Invalid("the prompt is empty".into()));
    }
    let ctx = engine.config.context_length;
    if prompt.len() >= ctx {
        return Err(ModelError::Invalid(format!(
            "the prompt has {} tokens; the context holds {ctx}",
            prompt.len()
        )));
    }
    let mut seq = Sequence {
        tokens: prompt.to_vec(),
        ..Default::default()
    };
    let env = match params.grammar {
        Some(_) => Some(crate::grammar::GrammarEnv::new(tok)?),
        None => None,
    };
    let mut sampler = Sampler::constrained(params, env.as_ref())?;
    let mut stop = StopState::new(tok, params);
    let mut out = Generation {
        tokens: Vec::new(),
        logprobs: Vec::new(),
        text: String::new(),
        finish: FinishReason::Length,
        prompt_tokens: prompt.len(),
        prefill_secs: 0.0,
        decode_secs: 0.0,
    };
    let t0 = std::time::Instant::now();
    let result = (|| -> Result<()> {
        let mut next: Sampled =
            engine.prefill_sampled(&mut seq, chunk, sampler.draw(prompt, &[]))?;
        out.prefill_secs = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        loop {
            out.tokens.push(next.token);
            out.logprobs.push(next.logprob);
            let mut step = stop.push(tok, next.token);
            if step.finished.is_none() && seq.tokens.len() + 1 >= ctx {
                step = stop.finish(FinishReason::Length, true);
            }
            on_text(&step.text);
            out.text.push_str(&step.text);
            if let Some(f) = step.finished {
                out.finish = f;
                break;
            }
            seq.tokens.push(next.token);
            next = engine
                .decode_sampled(&mut [&mut seq], vec![sampler.draw(prompt, &out.tokens)])?
                .into_iter()
                .next()
                .ok_or_else(|| ModelError::Worker("no token".into()))?;
        }
        out.decode_secs = t1.elapsed().as_secs_f64();
        Ok(())
    })();
    engine.release(&mut seq);
    result.map(|_| out)
}
