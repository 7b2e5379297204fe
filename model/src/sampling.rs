//! Choosing the next token from logits: greedy, temperature, top-k, top-p,
//! min-p, with a seed for repeatability, the chosen token's log-probability
//! and (when asked) the most likely alternatives' — after the logit
//! processors a request may ask for: `logit_bias`, and repetition,
//! presence and frequency penalties over the sequence's history.

use std::collections::HashMap;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::grammar::{is_allowed, Constraint, Grammar, GrammarEnv, Mask};

/// How to pick tokens and when to stop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    pub seed: Option<u64>,
    pub max_tokens: usize,
    /// Extra token ids that end generation (besides the model's own stop tokens).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation; the text stops before them.
    pub stop: Vec<String>,
    /// Keep going past the model's EOS / end-of-turn tokens.
    pub ignore_eos: bool,
    /// 0 means no cut; else tokens below `min_p` times the most likely
    /// token's probability (after temperature) are dropped.
    pub min_p: f32,
    /// 1 means none; else logits of tokens in the prompt or the output are
    /// divided (positive) or multiplied (negative) by it.
    pub repetition_penalty: f32,
    /// Subtracted from the logit of every token the output already holds.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time the output holds it.
    pub frequency_penalty: f32,
    /// Added to the named tokens' logits (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    /// How many of the most likely tokens' log-probabilities come back with
    /// each chosen token (0: none).
    pub top_logprobs: u32,
    /// What the answer must match (structured outputs).
    pub grammar: Option<Grammar>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            max_tokens: 256,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            ignore_eos: false,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            top_logprobs: 0,
            grammar: None,
        }
    }
}

/// Most alternatives a token's `top_logprobs` may list.
/// The largest repetition penalty a request may ask for.
pub const MAX_REPETITION_PENALTY: f32 = 10.0;

pub const MAX_TOP_LOGPROBS: u32 = 20;

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> SamplingParams {
        SamplingParams {
            max_tokens,
            ..Default::default()
        }
    }

    /// Rejects values no sampler can honour.
    pub fn validate(&self) -> Result<()> {
        self.check()
            .map_err(|(_, message)| ModelError::Invalid(message))
    }

    /// [`SamplingParams::validate`], naming the field at fault (the HTTP
    /// edge reports it as the error's `param`).
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        let fail = |field: &'static str, message: String| Err((field, message));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return fail(
                "temperature",
                format!("temperature must be >= 0, got {}", self.temperature),
            );
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return fail(
                "top_p",
                format!("top_p must be in (0, 1], got {}", self.top_p),
            );
        }
        if self.max_tokens == 0 {
            return fail("max_tokens", "max_tokens must be at least 1".into());
        }
        if self.stop.iter().any(String::is_empty) {
            return fail("stop", "stop strings must not be empty".into());
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return fail(
                "min_p",
                format!("min_p must be in [0, 1], got {}", self.min_p),
            );
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= MAX_REPETITION_PENALTY) {
            return fail(
                "repetition_penalty",
                format!(
                    "repetition_penalty must be in (0, {MAX_REPETITION_PENALTY}], got {}",
                    self.repetition_penalty
                ),
            );
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return fail(name, format!("{name} must be between -2 and 2, got {v}"));
            }
        }
        if let Some((t, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return fail(
                "logit_bias",
                format!("logit_bias for token {t} must be between -100 and 100, got {b}"),
            );
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return fail(
                "top_logprobs",
                format!(
                    "top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {}",
                    self.top_logprobs
                ),
            );
        }
        Ok(())
    }

    /// Whether choosing a token needs more than temperature, top-k, top-p
    /// and the uniform draw (what a GPU's sampling kernel computes).
    pub fn shaped(&self) -> bool {
        self.min_p > 0.0
            || self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || !self.logit_bias.is_empty()
            || self.top_logprobs > 0
            || self.grammar.is_some()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Log-probability of the token under the model's (untempered) distribution.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities (same
    /// distribution), most likely first, when the request asked for them.
    pub top: Vec<(u32, f32)>,
}

impl Sampled {
    pub fn new(token: u32, logprob: f32) -> Sampled {
        Sampled {
            token,
            logprob,
            top: Vec::new(),
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// The answer's grammar, and how many answer tokens it has consumed.
    constraint: Option<(Constraint, usize)>,
}

impl Sampler {
    /// A sampler without a grammar (a request's grammar needs
    /// [`Sampler::constrained`]).
    pub fn new(params: &SamplingParams) -> Sampler {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Sampler {
            params: params.clone(),
            rng,
            constraint: None,
        }
    }

    /// A sampler that keeps the answer inside the request's grammar, if
    /// it has one; `env` is the process's vocabulary for grammars.
    pub fn constrained(params: &SamplingParams, env: Option<&GrammarEnv>) -> Result<Sampler> {
        let c = match &params.grammar {
            Some(g) => Some(
                env.ok_or_else(|| ModelError::Invalid("this node has no grammar support".into()))?
                    .compile(g)?,
            ),
            None => None,
        };
        Ok(Sampler::with_constraint(params, c))
    }

    /// A sampler whose answer starts `c` (compiled from the request's
    /// grammar, nothing consumed yet).
    pub fn with_constraint(params: &SamplingParams, c: Option<Constraint>) -> Sampler {
        let mut s = Sampler::new(params);
        s.constraint = c.map(|c| (c, 0));
        s
    }

    /// Moves the random stream past `n` samples taken elsewhere (the first
    /// token is sampled by the prefill pipeline's last stage, the rest by
    /// decode), so a seeded request draws the same numbers as in one process.
    pub fn skip(&mut self, n: usize) {
        if self.params.temperature != 0.0 {
            for _ in 0..n {
                let _ = self.rng.random::<f32>();
            }
        }
    }

    /// The parameters and the uniform number for one choice: consumes one
    /// number of the seeded stream when sampling (none when greedy), so a
    /// choice made on a GPU from this draw follows the same stream.
    /// `prompt` and `output` are the sequence so far (the penalties read
    /// them; a request without penalties ignores them).
    pub fn draw(&mut self, prompt: &[u32], output: &[u32]) -> Draw {
        let u = if self.params.temperature == 0.0 {
            0.0
        } else {
            self.rng.random::<f32>()
        };
        // The grammar follows the answer, however it was produced (here,
        // on a pipeline, or by an earlier attempt); its mask is computed
        // while the step runs and waited for when its logits are chosen from.
        let allowed = self.constraint.as_mut().map(|(c, consumed)| {
            let fresh = output.get(*consumed..).unwrap_or(&[]).to_vec();
            *consumed = output.len();
            c.advance(fresh)
        });
        Draw {
            temperature: self.params.temperature,
            top_k: self.params.top_k,
            top_p: self.params.top_p,
            u,
            shape: self.params.shaped().then(|| {
                let mut s = Shaping::new(&self.params, prompt, output);
                s.allowed = allowed;
                Arc::new(s)
            }),
        }
    }

    pub fn sample(&mut self, logits: &[f32], prompt: &[u32], output: &[u32]) -> Sampled {
        let d = self.draw(prompt, output);
        select(logits, &d)
    }
}

/// What a choice needs beyond temperature, top-k and top-p: the logit
/// processors over one sequence's history, min-p and how many alternatives
/// to report. Built per step from the sequence as it stands, so it follows
/// the request wherever it runs (another decode group included).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Shaping {
    /// Added to logits, summed over `logit_bias` and the presence and
    /// frequency penalties (one entry per token).
    pub add: Vec<(u32, f32)>,
    /// Tokens in the prompt or the output (sorted, distinct), for the
    /// repetition penalty.
    pub seen: Vec<u32>,
    pub repetition: f32,
    pub min_p: f32,
    pub top_logprobs: u32,
    /// The tokens a grammar allows (bit set), when the request has one.
    pub allowed: Option<Mask>,
}

impl Shaping {
    pub fn new(p: &SamplingParams, prompt: &[u32], output: &[u32]) -> Shaping {
        let mut add: HashMap<u32, f32> = HashMap::new();
        for (t, b) in &p.logit_bias {
            *add.entry(*t).or_default() += b;
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts: HashMap<u32, u32> = HashMap::new();
            for t in output {
                *counts.entry(*t).or_default() += 1;
            }
            for (t, n) in counts {
                *add.entry(t).or_default() -= p.presence_penalty + p.frequency_penalty * n as f32;
            }
        }
        let mut add: Vec<(u32, f32)> = add.into_iter().collect();
        add.sort_unstable_by_key(|(t, _)| *t);
        let seen = if p.repetition_penalty != 1.0 {
            let mut s: Vec<u32> = prompt.iter().chain(output).copied().collect();
            s.sort_unstable();
            s.dedup();
            s
        } else {
            Vec::new()
        };
        Shaping {
            add,
            seen,
            repetition: p.repetition_penalty,
            min_p: p.min_p,
            top_logprobs: p.top_logprobs,
            allowed: None,
        }
    }

    /// The logits the choice is made from.
    fn apply(&self, logits: &mut [f32]) {
        if self.repetition != 1.0 {
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / self.repetition
                    } else {
                        *l * self.repetition
                    };
                }
            }
        }
        for &(t, a) in &self.add {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += a;
            }
        }
        if let Some(mask) = &self.allowed {
            let words = mask.wait();
            for (t, l) in logits.iter_mut().enumerate() {
                if !is_allowed(words, t) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// One token's choice: the request's sampling parameters and the uniform
/// number in `[0, 1)` its seeded stream gave for this token, and what the
/// choice needs beyond them (a GPU then chooses on the host from the
/// logits, as the CPU does).
#[derive(Debug, Clone, PartialEq)]
pub struct Draw {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub u: f32,
    pub shape: Option<Arc<Shaping>>,
}

impl Draw {
    pub const GREEDY: Draw = Draw {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        u: 0.0,
        shape: None,
    };
}

/// Chooses a token from `logits` as `d` says: the largest logit at
/// temperature 0, else the candidates in descending order of
/// `logit / temperature` (ties by index), cut to the top k and then to the
/// shortest prefix whose probability reaches top_p, and the token where
/// their cumulative probability passes `u` times their total. The GPU's
/// sampling kernel computes the same choice. With a [`Shaping`], its logit
/// processors run first and min-p cuts after top-k; log-probabilities
/// stay those of the model's own distribution.
pub fn select(logits: &[f32], d: &Draw) -> Sampled {
    let Some(shape) = &d.shape else {
        let token = if d.temperature == 0.0 {
            argmax(logits)
        } else {
            select_random(logits, d, 0.0)
        };
        return Sampled::new(token, logprob(logits, token as usize));
    };
    let mut shaped = logits.to_vec();
    shape.apply(&mut shaped);
    let token = if d.temperature == 0.0 {
        argmax(&shaped)
    } else {
        select_random(&shaped, d, shape.min_p)
    };
    let lse = log_sum_exp(logits);
    Sampled {
        token,
        logprob: logits[token as usize] - lse,
        top: top_n(logits, shape.top_logprobs as usize)
            .into_iter()
            .map(|t| (t, logits[t as usize] - lse))
            .collect(),
    }
}

/// The `n` largest logits' indices, largest first (ties by index).
fn top_n(logits: &[f32], n: usize) -> Vec<u32> {
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, by);
        idx.truncate(n);
    }
    idx.sort_unstable_by(by);
    idx
}

fn select_random(logits: &[f32], d: &Draw, min_p: f32) -> u32 {
    let t = d.temperature;
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, l / t))
        .collect();
    let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if d.top_k > 0 && d.top_k < cand.len() {
        cand.select_nth_unstable_by(d.top_k - 1, by_logit);
        cand.truncate(d.top_k);
    }
    cand.sort_unstable_by(by_logit);
    let max = cand[0].1;
    let mut probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
    if min_p > 0.0 {
        // probs[0] is the largest (exp(0) = 1).
        let keep = probs.iter().take_while(|p| **p >= min_p).count().max(1);
        probs.truncate(keep);
    }
    let total: f32 = probs.iter().sum();
    if d.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p / total;
            if acc >= d.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
    }
    let total: f32 = probs.iter().sum();
    let mut r = d.u * total;
    for (i, p) in probs.iter().enumerate() {
        if r < *p {
            return cand[i].0;
        }
        r -= p;
    }
    cand[probs.len() - 1].0
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

pub fn logprob(logits: &[f32], i: usize) -> f32 {
    logits[i] - log_sum_exp(logits)
}

fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..100).map(|i| ((i * 37) % 100) as f32 * 0.05).collect()
    }

    #[test]
    fn greedy_takes_the_maximum() {
        let l = logits();
        let s = Sampler::new(&SamplingParams::greedy(1)).sample(&l, &[], &[]);
        assert_eq!(
            s.token as usize,
            (0..100).max_by_key(|i| (i * 37) % 100).expect("non-empty")
        );
        assert!(s.logprob < 0.0);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_limits_choices() {
        let l = logits();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            seed: Some(7),
            ..Default::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(&p);
            (0..50).map(|_| s.sample(&l, &[], &[]).token).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(&p);
            (0..50).map(|_| s.sample(&l, &[], &[]).token).collect()
        };
        assert_eq!(a, b);
        let mut top: Vec<u32> = (0..100u32).collect();
        top.sort_by(|x, y| l[*y as usize].total_cmp(&l[*x as usize]));
        assert!(a.iter().all(|t| top[..3].contains(t)));
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(
            distinct.len() > 1,
            "temperature 1 over 3 candidates should vary"
        );
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let l = logits();
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 1e-6,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(&p);
        for _ in 0..20 {
            assert_eq!(s.sample(&l, &[], &[]).token, argmax(&l));
        }
    }

    fn draw_for(p: &SamplingParams, prompt: &[u32], output: &[u32]) -> Sampled {
        let l = logits();
        Sampler::new(p).sample(&l, prompt, output)
    }

    #[test]
    fn a_bias_of_minus_100_bans_the_greedy_choice_and_plus_100_forces_one() {
        let l = logits();
        let best = argmax(&l);
        let banned = SamplingParams {
            logit_bias: vec![(best, -100.0)],
            ..SamplingParams::greedy(1)
        };
        let s = draw_for(&banned, &[], &[]);
        assert_ne!(s.token, best);
        // The reported log-probability is the model's, not the biased one.
        assert!((s.logprob - logprob(&l, s.token as usize)).abs() < 1e-6);
        let forced = SamplingParams {
            temperature: 1.5,
            seed: Some(3),
            logit_bias: vec![(5, 100.0)],
            ..Default::default()
        };
        let mut sm = Sampler::new(&forced);
        assert!((0..20).all(|_| sm.sample(&l, &[], &[]).token == 5));
    }

    #[test]
    fn penalties_follow_their_definitions() {
        let l = logits();
        let best = argmax(&l);
        let p = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            repetition_penalty: 2.0,
            ..SamplingParams::greedy(1)
        };
        let shape = Shaping::new(&p, &[7, 7], &[best, best, 9]);
        let mut got = l.clone();
        shape.apply(&mut got);
        for (t, want) in got.iter().enumerate() {
            let t = t as u32;
            let mut e = l[t as usize];
            if [7, best, 9].contains(&t) {
                e = if e > 0.0 { e / 2.0 } else { e * 2.0 };
            }
            if t == best {
                e -= 0.5 + 0.25 * 2.0;
            }
            if t == 9 {
                e -= 0.5 + 0.25;
            }
            assert!((e - want).abs() < 1e-6, "token {t}: {e} vs {want}");
        }
        // The prompt counts for the repetition penalty only.
        let only_prompt = Shaping::new(&p, &[best], &[]);
        assert!(only_prompt.add.is_empty());
        assert_eq!(only_prompt.seen, vec![best]);
        // Enough penalty moves greedy off its favourite.
        let strong = SamplingParams {
            frequency_penalty: 2.0,
            ..SamplingParams::greedy(1)
        };
        assert_ne!(draw_for(&strong, &[], &[best, best, best]).token, best);
    }

    #[test]
    fn min_p_keeps_only_tokens_near_the_top() {
        let l = logits();
        let p = SamplingParams {
            temperature: 1.0,
            min_p: 0.9,
            seed: Some(11),
            ..Default::default()
        };
        let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut s = Sampler::new(&p);
        for _ in 0..50 {
            let t = s.sample(&l, &[], &[]).token as usize;
            assert!((l[t] - max).exp() >= 0.9 - 1e-6, "token {t} is below min_p");
        }
    }

    #[test]
    fn top_logprobs_are_the_most_likely_tokens_in_order() {
        let l = logits();
        let p = SamplingParams {
            top_logprobs: 5,
            ..SamplingParams::greedy(1)
        };
        let s = draw_for(&p, &[], &[]);
        assert_eq!(s.top.len(), 5);
        assert_eq!(s.top[0].0, s.token);
        assert!(s.top.windows(2).all(|w| w[0].1 >= w[1].1));
        for (t, lp) in &s.top {
            assert!((lp - logprob(&l, *t as usize)).abs() < 1e-6);
        }
        let mut sorted = l.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        assert!(l[s.top[4].0 as usize] >= sorted[4]);
    }

    #[test]
    fn invalid_params_are_rejected() {
        assert!(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            max_tokens: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
        for bad in [
            SamplingParams {
                min_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            SamplingParams {
                presence_penalty: 3.0,
                ..Default::default()
            },
            SamplingParams {
                logit_bias: vec![(1, 101.0)],
                ..Default::default()
            },
            SamplingParams {
                top_logprobs: 21,
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
