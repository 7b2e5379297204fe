//! Choosing the next token from logits: greedy, temperature, top-k, top-p,
//! with a seed for repeatability, and the chosen token's log-probability.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

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
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> SamplingParams {
        SamplingParams {
            max_tokens,
            ..Default::default()
        }
    }

    /// Rejects values no sampler can honour.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(ModelError::Invalid(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return Err(ModelError::Invalid(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.max_tokens == 0 {
            return Err(ModelError::Invalid("max_tokens must be at least 1".into()));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(ModelError::Invalid("stop strings must not be empty".into()));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Log-probability of the token under the model's (untempered) distribution.
    pub logprob: f32,
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Sampler {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Sampler {
            params: params.clone(),
            rng,
        }
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
    pub fn draw(&mut self) -> Draw {
        let u = if self.params.temperature == 0.0 {
            0.0
        } else {
            self.rng.random::<f32>()
        };
        Draw {
            temperature: self.params.temperature,
            top_k: self.params.top_k,
            top_p: self.params.top_p,
            u,
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        let d = self.draw();
        select(logits, &d)
    }
}

/// One token's choice: the request's sampling parameters and the uniform
/// number in `[0, 1)` its seeded stream gave for this token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Draw {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub u: f32,
}

impl Draw {
    pub const GREEDY: Draw = Draw {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        u: 0.0,
    };
}

/// Chooses a token from `logits` as `d` says: the largest logit at
/// temperature 0, else the candidates in descending order of
/// `logit / temperature` (ties by index), cut to the top k and then to the
/// shortest prefix whose probability reaches top_p, and the token where
/// their cumulative probability passes `u` times their total. The GPU's
/// sampling kernel computes the same choice.
pub fn select(logits: &[f32], d: &Draw) -> Sampled {
    let token = if d.temperature == 0.0 {
        argmax(logits)
    } else {
        select_random(logits, d)
    };
    Sampled {
        token,
        logprob: logprob(logits, token as usize),
    }
}

fn select_random(logits: &[f32], d: &Draw) -> u32 {
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
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    logits[i] - lse
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
        let s = Sampler::new(&SamplingParams::greedy(1)).sample(&l);
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
            (0..50).map(|_| s.sample(&l).token).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(&p);
            (0..50).map(|_| s.sample(&l).token).collect()
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
            assert_eq!(s.sample(&l).token, argmax(&l));
        }
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
    }
}
