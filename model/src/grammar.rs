//! Structured outputs: a request's grammar (a JSON schema, a regular
//! expression or a Lark grammar) compiled by llguidance against the
//! model's vocabulary. A [`Constraint`] follows one sequence's answer and
//! gives, before each choice, the tokens the grammar allows next; the
//! sampler masks every other token out, greedy and sampled alike.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

/// What an answer must match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Grammar {
    /// JSON matching this schema (JSON text; `{"type": "object"}` for any object).
    JsonSchema(String),
    /// Text matching this regular expression (Rust `regex` syntax).
    Regex(String),
    /// Text of this Lark grammar (llguidance's dialect).
    Lark(String),
}

impl Grammar {
    /// Exactly one of `choices`.
    pub fn choice(choices: &[String]) -> Grammar {
        let alts: Vec<String> = choices
            .iter()
            .map(|c| serde_json::to_string(c).unwrap_or_default())
            .collect();
        Grammar::Lark(format!("start: {}", alts.join(" | ")))
    }

    fn top_level(&self) -> Result<TopLevelGrammar> {
        Ok(match self {
            Grammar::JsonSchema(s) => {
                TopLevelGrammar::from_json_schema(serde_json::from_str(s).map_err(|e| {
                    ModelError::Invalid(format!("the JSON schema is not JSON: {e}"))
                })?)
            }
            Grammar::Regex(r) => TopLevelGrammar::from_regex(r),
            Grammar::Lark(l) => TopLevelGrammar::from_lark(l.clone()),
        })
    }
}

/// The vocabulary as llguidance sees it, and its parser factory: built
/// once per process, shared by every request's [`Constraint`].
#[derive(Clone)]
pub struct GrammarEnv {
    factory: Arc<ParserFactory>,
    vocab: usize,
    eos: u32,
}

impl std::fmt::Debug for GrammarEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarEnv")
            .field("vocab", &self.vocab)
            .finish()
    }
}

impl GrammarEnv {
    pub fn new(tok: &Tokenizer) -> Result<GrammarEnv> {
        let vocab = tok.vocab_size();
        // Special tokens carry llguidance's marker byte, so no text matches them.
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|t| {
                let b = tok.token_bytes(t);
                if tok.is_special(t) {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(b);
                    w
                } else {
                    b.to_vec()
                }
            })
            .collect();
        let eos = tok.stop_ids.first().copied().or(tok.eos).ok_or_else(|| {
            ModelError::Invalid("structured outputs need an end-of-sequence token".into())
        })?;
        let info = TokRxInfo {
            vocab_size: vocab as u32,
            tok_eos: eos,
            tok_bos: tok.bos,
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: None,
        };
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| ModelError::Invalid(format!("grammar support: {e}")))?;
        factory.quiet();
        Ok(GrammarEnv {
            factory: Arc::new(factory),
            vocab,
            eos,
        })
    }

    /// A fresh matcher for `g`, or why `g` cannot be compiled.
    pub fn compile(&self, g: &Grammar) -> Result<Constraint> {
        let parser = self
            .factory
            .create_parser(g.top_level()?)
            .map_err(|e| ModelError::Invalid(format!("the grammar cannot be compiled: {e}")))?;
        let m = Matcher::new(Ok(parser));
        if let Some(e) = m.get_error() {
            return Err(ModelError::Invalid(format!(
                "the grammar cannot be compiled: {e}"
            )));
        }
        Ok(Constraint {
            m: Arc::new(Mutex::new(m)),
            last: None,
            vocab: self.vocab,
            eos: self.eos,
        })
    }
}

/// One sequence's place in its grammar. Its masks are computed on a
/// small pool of their own, started when a step is planned and waited
/// for only when that step's logits are chosen from, so a batch's
/// sequences compute theirs side by side and beside the model's forward
/// pass instead of one after another before it.
pub struct Constraint {
    m: Arc<Mutex<Matcher>>,
    /// The last mask asked for: the next one starts after it.
    last: Option<Mask>,
    vocab: usize,
    eos: u32,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

/// Where grammar masks are computed: never a thread that waits for one.
fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("grammar-{i}"))
            .build()
            .expect("the grammar thread pool starts")
    })
}

/// A token mask (see [`Constraint::allowed`]), ready or being computed.
#[derive(Clone)]
pub struct Mask(Arc<OnceLock<Vec<u32>>>);

impl Mask {
    pub fn ready(words: Vec<u32>) -> Mask {
        Mask(Arc::new(OnceLock::from(words)))
    }

    /// The mask, once computed.
    pub fn wait(&self) -> &[u32] {
        self.0.wait()
    }
}

impl PartialEq for Mask {
    fn eq(&self, o: &Mask) -> bool {
        Arc::ptr_eq(&self.0, &o.0) || self.wait() == o.wait()
    }
}

impl std::fmt::Debug for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.get() {
            Some(w) => write!(
                f,
                "Mask({} allowed)",
                w.iter().map(|w| w.count_ones()).sum::<u32>()
            ),
            None => write!(f, "Mask(pending)"),
        }
    }
}

impl Constraint {
    fn matcher(&self) -> MutexGuard<'_, Matcher> {
        self.m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy that starts where this one stands and moves on its own.
    pub fn fork(&self) -> Constraint {
        if let Some(m) = &self.last {
            m.wait();
        }
        Constraint {
            m: Arc::new(Mutex::new(self.matcher().deep_clone())),
            last: None,
            vocab: self.vocab,
            eos: self.eos,
        }
    }

    /// The answer's next token.
    pub fn consume(&mut self, token: u32) -> Result<()> {
        if let Some(m) = &self.last {
            m.wait();
        }
        consume(&mut self.matcher(), token)
    }

    /// The tokens allowed next, as a bit set (bit `t % 32` of word `t / 32`);
    /// only end-of-sequence once the grammar is complete.
    pub fn allowed(&mut self) -> Result<Vec<u32>> {
        if let Some(m) = &self.last {
            m.wait();
        }
        allowed(&mut self.matcher(), self.vocab)
    }

    /// Consumes the answer's `fresh` tokens and computes the mask after
    /// them, on the grammar pool; the mask says only end-of-sequence when
    /// the grammar fails (a token it refuses, an internal error).
    pub fn advance(&mut self, fresh: Vec<u32>) -> Mask {
        // Masks follow one another: the previous one is normally long done
        // (its step chose the tokens now consumed).
        if let Some(m) = &self.last {
            m.wait();
        }
        let cell = Arc::new(OnceLock::new());
        let (m, out, vocab, eos) = (self.m.clone(), cell.clone(), self.vocab, self.eos);
        pool().spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
                fresh
                    .iter()
                    .try_for_each(|t| consume(&mut m, *t))
                    .and_then(|_| allowed(&mut m, vocab))
            }));
            let words = match r {
                Ok(Ok(w)) => w,
                Ok(Err(e)) => {
                    tracing::warn!("{e}; ending the answer");
                    eos_only(vocab, eos)
                }
                Err(_) => {
                    tracing::error!("the grammar panicked; ending the answer");
                    eos_only(vocab, eos)
                }
            };
            let _ = out.set(words);
        });
        let mask = Mask(cell);
        self.last = Some(mask.clone());
        mask
    }

    /// Only end-of-sequence: what a sequence whose grammar failed may do.
    pub fn eos_only(&self) -> Vec<u32> {
        eos_only(self.vocab, self.eos)
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_stopped(&self) -> bool {
        if let Some(m) = &self.last {
            m.wait();
        }
        self.matcher().is_stopped()
    }
}

fn consume(m: &mut Matcher, token: u32) -> Result<()> {
    m.consume_token(token)
        .map_err(|e| ModelError::Invalid(format!("token {token} breaks the grammar: {e}")))
}

fn allowed(m: &mut Matcher, vocab: usize) -> Result<Vec<u32>> {
    let v = m
        .compute_mask_or_eos()
        .map_err(|e| ModelError::Invalid(format!("the grammar failed: {e}")))?;
    let mut words = v.as_slice().to_vec();
    words.resize(vocab.div_ceil(32), 0);
    Ok(words)
}

fn eos_only(vocab: usize, eos: u32) -> Vec<u32> {
    let mut words = vec![0u32; vocab.div_ceil(32)];
    let e = eos as usize;
    if let Some(w) = words.get_mut(e / 32) {
        *w |= 1 << (e % 32);
    }
    words
}

/// Whether bit `t` is set in an [`Constraint::allowed`] set.
pub fn is_allowed(words: &[u32], t: usize) -> bool {
    words.get(t / 32).is_some_and(|w| w & (1 << (t % 32)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default model's tokenizer and grammar vocabulary, or `None`
    /// (with a note) when the model is not fetched.
    fn vocabulary() -> Option<(Tokenizer, GrammarEnv)> {
        let path = crate::fetch::cached_default_model();
        let tok = path
            .exists()
            .then(|| crate::ModelFile::open(&path).ok().map(|f| f.tokenizer))
            .flatten();
        if tok.is_none() {
            eprintln!("the default model is not fetched; skipping");
        }
        tok.map(|t| {
            let env = GrammarEnv::new(&t).expect("env");
            (t, env)
        })
    }

    /// Greedy decoding over a scripted preference: the constraint alone
    /// decides which text comes out, and it matches the grammar.
    fn walk(env: &GrammarEnv, tok: &Tokenizer, g: &Grammar, prefer: &[u8]) -> String {
        let mut c = env.compile(g).expect("compiles");
        let mut out = Vec::new();
        for _ in 0..200 {
            let allowed = c.allowed().expect("mask");
            // The allowed token whose bytes best continue `prefer`, else the first allowed.
            let eos = tok.stop_ids[0] as usize;
            let pick = (0..tok.vocab_size())
                .filter(|t| is_allowed(&allowed, *t))
                .max_by_key(|t| {
                    let b = tok.token_bytes(*t as u32);
                    let rest = prefer.get(out.len()..).unwrap_or(&[]);
                    let score = if !b.is_empty() && rest.starts_with(b) {
                        b.len()
                    } else {
                        0
                    };
                    (score, usize::from(*t == eos))
                })
                .expect("something is allowed");
            if pick == eos {
                break;
            }
            out.extend_from_slice(tok.token_bytes(pick as u32));
            c.consume(pick as u32).expect("allowed tokens are accepted");
        }
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn masks_keep_answers_inside_their_grammar() {
        let Some((tok, env)) = vocabulary() else {
            return;
        };
        let schema = r#"{"type":"object","properties":{"city":{"type":"string"},"n":{"type":"integer"}},"required":["city","n"],"additionalProperties":false}"#;
        let s = walk(
            &env,
            &tok,
            &Grammar::JsonSchema(schema.into()),
            br#"{"city": "Paris", "n": 12}"#,
        );
        let v: serde_json::Value =
            serde_json::from_str(&s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        assert_eq!(v["city"], "Paris");
        assert_eq!(v["n"], 12);
        // A preference outside the grammar cannot get out of it.
        let s = walk(&env, &tok, &Grammar::Regex("[0-9]{3}".into()), b"hello");
        assert!(
            s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit()),
            "{s:?}"
        );
        let s = walk(
            &env,
            &tok,
            &Grammar::choice(&["yes".into(), "no".into()]),
            b"no way",
        );
        assert_eq!(s, "no");
        // Bad grammars are errors that say why.
        for bad in [
            Grammar::JsonSchema("{not json".into()),
            Grammar::JsonSchema(r#"{"type": "no-such-type"}"#.into()),
            Grammar::Regex("(".into()),
        ] {
            assert!(env.compile(&bad).is_err(), "{bad:?}");
        }
    }

    /// Masks computed on the pool, many sequences at once, equal the ones
    /// computed in line, token by token.
    #[test]
    fn masks_computed_side_by_side_equal_masks_computed_in_line() {
        let Some((tok, env)) = vocabulary() else {
            return;
        };
        let g = Grammar::JsonSchema(r#"{"type":"array","items":{"type":"integer"}}"#.into());
        let text = tok.encode("[1, 22, 333]").expect("encode");
        let base = env.compile(&g).expect("compiles");
        let mut inline = base.fork();
        let mut want = vec![inline.allowed().expect("mask")];
        for t in &text {
            inline.consume(*t).expect("in the grammar");
            want.push(inline.allowed().expect("mask"));
        }
        let mut seqs: Vec<Constraint> = (0..8).map(|_| base.fork()).collect();
        for step in 0..=text.len() {
            let fresh = if step == 0 {
                vec![]
            } else {
                vec![text[step - 1]]
            };
            let masks: Vec<Mask> = seqs.iter_mut().map(|c| c.advance(fresh.clone())).collect();
            for m in &masks {
                assert_eq!(m.wait(), &want[step][..], "step {step}");
            }
        }
        // A token the grammar refuses leaves only end-of-sequence.
        let mut c = base.fork();
        let bad = tok.encode("x").expect("encode");
        assert_eq!(c.advance(bad).wait(), &c.eos_only()[..]);
    }
}
