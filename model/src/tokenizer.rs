//! The tokenizer, built from the model file's own vocabulary: GGUF's
//! `tokenizer.ggml.*` (byte-level BPE with its merges and special tokens) or
//! a Hugging Face `tokenizer.json`. Encoding uses the `tokenizers` crate;
//! decoding maps each token back to its bytes, so text can be streamed one
//! token at a time without splitting a UTF-8 character.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{ModelError, Result};
use crate::file::{metadata_ints, metadata_strings, metadata_u32};

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Names that end a turn in common chat formats; when present as special
/// tokens they stop generation along with the model's EOS.
const END_OF_TURN_NAMES: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
];

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    token_bytes: Vec<Vec<u8>>,
    special: Vec<bool>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Tokens that end generation by default (EOS and end-of-turn markers).
    pub stop_ids: Vec<u32>,
    pub add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.token_bytes.len())
            .field("eos", &self.eos)
            .finish()
    }
}

impl Tokenizer {
    pub(crate) fn from_gguf(path: &Path, md: &HashMap<String, Value>) -> Result<Tokenizer> {
        let bad = |r: &str| ModelError::malformed(path, format!("tokenizer: {r}"));
        let model = md
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if model != "gpt2" {
            return Err(ModelError::Unsupported(format!(
                "tokenizer model '{model}' in {} (Tandem reads byte-level BPE 'gpt2' tokenizers from GGUF; \
                 for other tokenizers use the Hugging Face layout with tokenizer.json)",
                path.display()
            )));
        }
        let tokens = metadata_strings(md, "tokenizer.ggml.tokens")
            .ok_or_else(|| bad("tokenizer.ggml.tokens is missing"))?;
        let merges = metadata_strings(md, "tokenizer.ggml.merges")
            .ok_or_else(|| bad("tokenizer.ggml.merges is missing"))?;
        let types =
            metadata_ints(md, "tokenizer.ggml.token_type").unwrap_or_else(|| vec![1; tokens.len()]);
        if types.len() != tokens.len() {
            return Err(bad("token_type and tokens differ in length"));
        }
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "default".into());

        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad("a merge has no space"))
            })
            .collect::<Result<_>>()?;
        let llama3 = matches!(pre.as_str(), "llama-bpe" | "llama3" | "smaug-bpe" | "dbrx");
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(llama3)
            .build()
            .map_err(|e| bad(&format!("cannot build BPE ({e})")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let byte_level = || PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false));
        let split = |re: &str| -> Result<PreTokenizerWrapper> {
            Ok(PreTokenizerWrapper::Split(
                Split::new(
                    SplitPattern::Regex(re.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| bad(&format!("pre-tokenizer regex ({e})")))?,
            ))
        };
        let pre_tok = match pre.as_str() {
            "smollm" | "starcoder" | "refact" => Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            ]),
            _ if llama3 => Sequence::new(vec![split(LLAMA3_REGEX)?, byte_level()]),
            "qwen2" => Sequence::new(vec![split(QWEN2_REGEX)?, byte_level()]),
            other => {
                tracing::warn!(pre = other, "unknown GGUF pre-tokenizer; using GPT-2's");
                Sequence::new(vec![PreTokenizerWrapper::ByteLevel(ByteLevel::new(
                    false, true, true,
                ))])
            }
        };
        inner.with_pre_tokenizer(Some(pre_tok));
        inner.with_decoder(Some(tokenizers::DecoderWrapper::ByteLevel(
            ByteLevel::default(),
        )));
        let special: Vec<bool> = types
            .iter()
            .map(|t| *t == TOKEN_TYPE_CONTROL || *t == TOKEN_TYPE_USER_DEFINED)
            .collect();
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&special)
            .filter(|(_, s)| **s)
            .map(|(t, _)| AddedToken::from(t.clone(), true))
            .collect();
        inner
            .add_special_tokens(added)
            .map_err(|e| ModelError::Tokenizer(format!("cannot add the special tokens: {e}")))?;

        let byte_of = unicode_to_byte();
        let token_bytes: Vec<Vec<u8>> = tokens
            .iter()
            .zip(&special)
            .map(|(t, s)| {
                if *s {
                    t.as_bytes().to_vec()
                } else {
                    t.chars()
                        .map(|c| byte_of.get(&c).copied().unwrap_or(b'?'))
                        .collect()
                }
            })
            .collect();
        let bos = metadata_u32(md, "tokenizer.ggml.bos_token_id");
        let eos = metadata_u32(md, "tokenizer.ggml.eos_token_id");
        let eot = metadata_u32(md, "tokenizer.ggml.eot_token_id");
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        Ok(Tokenizer::assemble(
            inner,
            token_bytes,
            special,
            bos,
            eos,
            eot,
            add_bos,
        ))
    }

    /// A tokenizer alone: a Hugging Face `tokenizer.json` (or a directory
    /// holding one, with its `tokenizer_config.json`), or any model file
    /// [`crate::ModelFile::open`] reads.
    pub fn load(path: &Path) -> Result<Tokenizer> {
        if path.is_dir() && path.join("tokenizer.json").is_file() {
            return Self::from_hf_file(&path.join("tokenizer.json"), path);
        }
        if path.extension().is_some_and(|e| e == "json") {
            let dir = path.parent().unwrap_or(Path::new("."));
            return Self::from_hf_file(path, dir);
        }
        Ok(crate::ModelFile::open(path)?.tokenizer)
    }

    pub(crate) fn from_hf_file(path: &Path, dir: &Path) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| {
            ModelError::malformed(path, format!("cannot load tokenizer.json ({e})"))
        })?;
        let json: serde_json::Value = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let byte_level = json["decoder"].to_string().contains("ByteLevel");
        let n = inner.get_vocab_size(true);
        let added = inner.get_added_tokens_decoder();
        let byte_of = unicode_to_byte();
        let mut token_bytes = Vec::with_capacity(n);
        let mut special = Vec::with_capacity(n);
        for id in 0..n as u32 {
            let s = inner.id_to_token(id).unwrap_or_default();
            let is_special = added.get(&id).is_some_and(|a| a.special);
            special.push(is_special);
            token_bytes.push(if is_special || added.contains_key(&id) {
                s.into_bytes()
            } else if byte_level {
                s.chars()
                    .map(|c| byte_of.get(&c).copied().unwrap_or(b'?'))
                    .collect()
            } else if let Some(b) = s
                .strip_prefix("<0x")
                .and_then(|h| h.strip_suffix('>'))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                vec![b]
            } else {
                s.replace('\u{2581}', " ").into_bytes()
            });
        }
        let cfg: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let tok_name = |k: &str| -> Option<u32> {
            let v = &cfg[k];
            let name = v.as_str().or_else(|| v["content"].as_str())?;
            inner.token_to_id(name)
        };
        let bos = tok_name("bos_token");
        let eos = tok_name("eos_token");
        let add_bos = cfg["add_bos_token"].as_bool().unwrap_or(false);
        Ok(Tokenizer::assemble(
            inner,
            token_bytes,
            special,
            bos,
            eos,
            None,
            add_bos,
        ))
    }

    /// Builds the tokenizer; generation stops by default at EOS, the
    /// end-of-turn token and any special end-of-turn marker the vocabulary has.
    fn assemble(
        inner: tokenizers::Tokenizer,
        token_bytes: Vec<Vec<u8>>,
        special: Vec<bool>,
        bos: Option<u32>,
        eos: Option<u32>,
        eot: Option<u32>,
        add_bos: bool,
    ) -> Tokenizer {
        let mut t = Tokenizer {
            inner,
            token_bytes,
            special,
            bos,
            eos,
            stop_ids: Vec::new(),
            add_bos,
        };
        t.stop_ids = t.default_stops(&[eos, eot]);
        t
    }

    fn default_stops(&self, ids: &[Option<u32>]) -> Vec<u32> {
        let mut out: Vec<u32> = ids.iter().flatten().copied().collect();
        for name in END_OF_TURN_NAMES {
            if let Some(id) = self.inner.token_to_id(name) {
                if self.is_special(id) && !out.contains(&id) {
                    out.push(id);
                }
            }
        }
        out
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Token ids of `text`; special-token markup in it is parsed. No BOS is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Like [`Tokenizer::encode`], with BOS first when the model asks for it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if let (true, Some(b)) = (self.add_bos, self.bos) {
            ids.push(b);
        }
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The bytes a token stands for (special tokens: their markup).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn token_text(&self, id: u32) -> String {
        String::from_utf8_lossy(self.token_bytes(id)).into_owned()
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .filter(|id| !self.is_special(**id))
            .flat_map(|id| self.token_bytes(*id).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The tokenizer as a Hugging Face `tokenizer.json` document.
    pub fn to_hf_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }
}

/// GPT-2's byte-to-unicode table, inverted: the character a byte-level BPE
/// vocabulary uses for each byte.
fn unicode_to_byte() -> HashMap<char, u8> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .filter_map(|(b, c)| char::from_u32(c).map(|c| (c, b as u8)))
        .collect()
}

/// Turns a stream of token ids into text pieces, holding back bytes until
/// they form whole UTF-8 characters.
#[derive(Debug, Default, Clone)]
pub struct TextDecoder {
    pending: Vec<u8>,
}

impl TextDecoder {
    /// The text completed by `id` (possibly empty). Special tokens add nothing.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        if tok.is_special(id) {
            return String::new();
        }
        self.pending.extend_from_slice(tok.token_bytes(id));
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let out = s.to_string();
                self.pending.clear();
                out
            }
            Err(e) => {
                let valid = e.valid_up_to();
                // An invalid sequence (not merely an incomplete one) is flushed lossily.
                if e.error_len().is_some() {
                    let out = String::from_utf8_lossy(&self.pending).into_owned();
                    self.pending.clear();
                    return out;
                }
                let out = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
                self.pending.drain(..valid);
                out
            }
        }
    }

    /// Whatever is still held back, lossily.
    pub fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}
