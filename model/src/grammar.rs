//! Structured outputs: a request's grammar (a JSON schema, a regular
//! expression or a Lark grammar) compiled by llguidance against the
//! model's vocabulary. A [`Constraint`] follows one sequence's answer and
//! gives, before each choice, the tokens the grammar allows next; the
//! sampler masks every other token out, greedy and sampled alike.

use std::sync::Arc;

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
            m,
            vocab: self.vocab,
            eos: self.eos,
        })
    }
}

/// One sequence's place in its grammar.
#[derive(Clone)]
pub struct Constraint {
    m: Matcher,
    vocab: usize,
    eos: u32,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.m.is_stopped())
            .finish()
    }
}

impl Constraint {
    /// A copy that starts where this one stands and moves on its own.
    pub fn fork(&self) -> Constraint {
        Constraint {
            m: self.m.deep_clone(),
            vocab: self.vocab,
            eos: self.eos,
        }
    }

    /// The answer's next token.
    pub fn consume(&mut self, token: u32) -> Result<()> {
        self.m
            .consume_token(token)
            .map_err(|e| ModelError::Invalid(format!("token {token} breaks the grammar: {e}")))
    }

    /// The tokens allowed next, as a bit set (bit `t % 32` of word `t / 32`);
    /// only end-of-sequence once the grammar is complete.
    pub fn allowed(&mut self) -> Result<Vec<u32>> {
        let v = self
            .m
            .compute_mask_or_eos()
            .map_err(|e| ModelError::Invalid(format!("the grammar failed: {e}")))?;
        let mut words = v.as_slice().to_vec();
        words.resize(self.vocab.div_ceil(32), 0);
        Ok(words)
    }

    /// Only end-of-sequence: what a sequence whose grammar failed may do.
    pub fn eos_only(&self) -> Vec<u32> {
        let mut words = vec![0u32; self.vocab.div_ceil(32)];
        let e = self.eos as usize;
        if let Some(w) = words.get_mut(e / 32) {
            *w |= 1 << (e % 32);
        }
        words
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_stopped(&self) -> bool {
        self.m.is_stopped()
    }
}

/// Whether bit `t` is set in an [`Constraint::allowed`] set.
pub fn is_allowed(words: &[u32], t: usize) -> bool {
    words.get(t / 32).is_some_and(|w| w & (1 << (t % 32)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Option<Tokenizer> {
        let path = crate::fetch::cached_default_model();
        path.exists()
            .then(|| crate::ModelFile::open(&path).ok().map(|f| f.tokenizer))
            .flatten()
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
        let Some(tok) = tokenizer() else {
            eprintln!("the default model is not fetched; skipping");
            return;
        };
        let env = GrammarEnv::new(&tok).expect("env");
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
}
