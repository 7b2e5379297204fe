//! What the harness sends: prompts of real text cut to a token length with
//! the model's tokenizer, in four shapes — synthetic length distributions, a
//! ShareGPT-format file, multi-turn sessions and shared-prefix groups. Every
//! job is a pure function of the seed and its index, so a run repeats.

use std::path::Path;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_model::Tokenizer;

use crate::BenchError;

/// Real text the prompts are cut from.
pub const CORPUS: &str = include_str!("corpus.txt");

/// A length distribution, in tokens; samples are at least 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LenDist {
    Fixed(usize),
    /// Uniform over `[lo, hi]`.
    Uniform {
        lo: usize,
        hi: usize,
    },
    /// Normal, rounded and clamped to at least 1.
    Normal {
        mean: f64,
        std: f64,
    },
}

impl LenDist {
    /// `kind` is `fixed`, `uniform` or `normal`; `len` is the mean and
    /// `spread` the half-width (uniform) or standard deviation (normal).
    pub fn parse(kind: &str, len: usize, spread: f64) -> Result<LenDist, BenchError> {
        if len == 0 {
            return Err(BenchError::Usage(
                "a length must be at least 1 token".into(),
            ));
        }
        if !(spread.is_finite() && spread >= 0.0) {
            return Err(BenchError::Usage(format!(
                "spread {spread} must be a non-negative number"
            )));
        }
        match kind {
            "fixed" => Ok(LenDist::Fixed(len)),
            "uniform" => {
                let half = spread.round() as usize;
                Ok(LenDist::Uniform {
                    lo: len.saturating_sub(half).max(1),
                    hi: len + half,
                })
            }
            "normal" => Ok(LenDist::Normal {
                mean: len as f64,
                std: spread,
            }),
            other => Err(BenchError::Usage(format!(
                "unknown length distribution {other:?} (fixed, uniform or normal)"
            ))),
        }
    }

    pub fn sample(&self, rng: &mut StdRng) -> usize {
        match *self {
            LenDist::Fixed(n) => n.max(1),
            LenDist::Uniform { lo, hi } => rng.random_range(lo..=hi).max(1),
            LenDist::Normal { mean, std } => {
                let z: f64 = rng.sample(rand_distr::StandardNormal);
                (mean + std * z).round().max(1.0) as usize
            }
        }
    }
}

/// Cuts windows of an exact token count out of the corpus.
pub struct PromptSource {
    tokenizer: Tokenizer,
    tokens: Vec<u32>,
}

impl PromptSource {
    pub fn new(tokenizer: Tokenizer) -> Result<PromptSource, BenchError> {
        let tokens = tokenizer
            .encode(CORPUS)
            .map_err(|e| BenchError::Usage(format!("tokenizing the corpus: {e}")))?;
        Ok(PromptSource { tokenizer, tokens })
    }

    /// `len` tokens of text starting at a random place (wrapping around).
    pub fn cut(&self, len: usize, rng: &mut StdRng) -> String {
        let start = rng.random_range(0..self.tokens.len());
        let ids: Vec<u32> = (0..len)
            .map(|i| self.tokens[(start + i) % self.tokens.len()])
            .collect();
        self.tokenizer.decode(&ids)
    }

    pub fn count(&self, text: &str) -> usize {
        self.tokenizer.encode(text).map(|t| t.len()).unwrap_or(0)
    }
}

/// One request of a job: the new user text and its answer budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub content: String,
    /// Tokens of `content` by the harness's tokenizer.
    pub input_tokens: usize,
    pub max_tokens: usize,
}

/// A unit of work: one request, or a session's turns sent in order (each
/// turn carries the whole conversation so far, answers included).
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub index: usize,
    /// Sent as `X-Session-Id` when set.
    pub session: Option<String>,
    pub turns: Vec<Turn>,
    /// Pause between receiving an answer and sending the next turn.
    pub think: Duration,
}

/// ShareGPT-format conversation: `{"conversations": [{"from": "human", "value": …}, …]}`.
#[derive(Debug, Clone)]
pub struct ShareGptEntry {
    pub prompt: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Debug, Clone)]
pub enum Shape {
    Synthetic {
        input: LenDist,
        output: LenDist,
    },
    /// First human message as the prompt, the first reply's length as the
    /// answer budget (unless `output` overrides it).
    ShareGpt {
        entries: Vec<ShareGptEntry>,
        output: Option<LenDist>,
    },
    Sessions {
        turns: usize,
        input: LenDist,
        output: LenDist,
        think: Duration,
    },
    /// `groups` prefixes of `prefix` tokens; each request is one group's
    /// prefix followed by its own text.
    SharedPrefix {
        groups: usize,
        prefix: usize,
        input: LenDist,
        output: LenDist,
    },
}

pub struct Workload {
    pub shape: Shape,
    pub prompts: PromptSource,
    pub seed: u64,
    /// Distinguishes session ids between runs against the same server.
    pub run_tag: String,
}

impl Workload {
    fn rng(&self, salt: u64, index: usize) -> StdRng {
        StdRng::seed_from_u64(
            self.seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(salt.wrapping_mul(0xD1B5_4A32_D192_ED03))
                .wrapping_add(index as u64),
        )
    }

    /// Requests per job (turns per session, else 1).
    pub fn turns_per_job(&self) -> usize {
        match &self.shape {
            Shape::Sessions { turns, .. } => *turns,
            _ => 1,
        }
    }

    /// The `index`-th job: the same for the same seed.
    pub fn job(&self, index: usize) -> Job {
        let mut rng = self.rng(1, index);
        let single = |content: String, max_tokens: usize| Job {
            index,
            session: None,
            turns: vec![Turn {
                input_tokens: self.prompts.count(&content),
                content,
                max_tokens,
            }],
            think: Duration::ZERO,
        };
        match &self.shape {
            Shape::Synthetic { input, output } => {
                let n = input.sample(&mut rng);
                let content = self.prompts.cut(n, &mut rng);
                single(content, output.sample(&mut rng))
            }
            Shape::ShareGpt { entries, output } => {
                let e = &entries[index % entries.len()];
                let max = output.map_or(e.completion_tokens, |o| o.sample(&mut rng));
                Job {
                    index,
                    session: None,
                    turns: vec![Turn {
                        content: e.prompt.clone(),
                        input_tokens: e.prompt_tokens,
                        max_tokens: max.max(1),
                    }],
                    think: Duration::ZERO,
                }
            }
            Shape::Sessions {
                turns,
                input,
                output,
                think,
            } => Job {
                index,
                session: Some(format!("bench-{}-{index}", self.run_tag)),
                turns: (0..*turns)
                    .map(|_| {
                        let content = self.prompts.cut(input.sample(&mut rng), &mut rng);
                        Turn {
                            input_tokens: self.prompts.count(&content),
                            content,
                            max_tokens: output.sample(&mut rng),
                        }
                    })
                    .collect(),
                think: *think,
            },
            Shape::SharedPrefix {
                groups,
                prefix,
                input,
                output,
            } => {
                let group = rng.random_range(0..(*groups).max(1));
                let shared = self.prompts.cut(*prefix, &mut self.rng(2, group));
                let own = self.prompts.cut(input.sample(&mut rng), &mut rng);
                single(format!("{shared}\n\n{own}"), output.sample(&mut rng))
            }
        }
    }
}

/// Reads a ShareGPT-format JSON file, keeping conversations whose first
/// human message and first reply fit the limits (as vLLM's benchmark does:
/// both at least 4 tokens, the prompt at most `max_prompt`, both together at
/// most `max_total`), shuffled by `seed`.
pub fn load_sharegpt(
    path: &Path,
    prompts: &PromptSource,
    max_prompt: usize,
    max_total: usize,
    seed: u64,
) -> Result<Vec<ShareGptEntry>, BenchError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BenchError::Usage(format!("reading {}: {e}", path.display())))?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| BenchError::Usage(format!("{} is not JSON: {e}", path.display())))?;
    let list = doc.as_array().ok_or_else(|| {
        BenchError::Usage(format!(
            "{}: expected a JSON array of conversations",
            path.display()
        ))
    })?;
    let mut out = Vec::new();
    for conv in list {
        let Some(turns) = conv["conversations"].as_array() else {
            continue;
        };
        let text_of = |who: &[&str]| {
            turns
                .iter()
                .find(|t| t["from"].as_str().is_some_and(|f| who.contains(&f)))
                .and_then(|t| t["value"].as_str())
        };
        let (Some(prompt), Some(reply)) =
            (text_of(&["human", "user"]), text_of(&["gpt", "assistant"]))
        else {
            continue;
        };
        let (p, c) = (prompts.count(prompt), prompts.count(reply));
        if p < 4 || c < 4 || p > max_prompt || p + c > max_total {
            continue;
        }
        out.push(ShareGptEntry {
            prompt: prompt.to_string(),
            prompt_tokens: p,
            completion_tokens: c,
        });
    }
    if out.is_empty() {
        return Err(BenchError::Usage(format!(
            "{}: no conversation with a human message and a reply within the length limits",
            path.display()
        )));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    for i in (1..out.len()).rev() {
        out.swap(i, rng.random_range(0..=i));
    }
    Ok(out)
}
