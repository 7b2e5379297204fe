//! Turning sampled tokens into streamed text and deciding when to stop: stop
//! tokens, stop strings (text is held back while it could still become one),
//! and the token limit.

use serde::{Deserialize, Serialize};

use crate::sampling::SamplingParams;
use crate::tokenizer::{TextDecoder, Tokenizer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// Text that may be shown now.
    pub text: String,
    pub finished: Option<FinishReason>,
}

/// Per-request stop logic; feed it every sampled token in order.
#[derive(Debug, Clone)]
pub struct StopState {
    stop_ids: Vec<u32>,
    stop: Vec<String>,
    max_tokens: usize,
    generated: usize,
    decoder: TextDecoder,
    held: String,
    finished: Option<FinishReason>,
}

impl StopState {
    pub fn new(tok: &Tokenizer, params: &SamplingParams) -> StopState {
        let mut stop_ids = params.stop_token_ids.clone();
        // A grammar allows end-of-sequence only where the answer is
        // complete, and there it ends the answer even under `ignore_eos`.
        if !params.ignore_eos || params.grammar.is_some() {
            stop_ids.extend(&tok.stop_ids);
        }
        StopState {
            stop_ids,
            stop: params.stop.clone(),
            max_tokens: params.max_tokens,
            generated: 0,
            decoder: TextDecoder::default(),
            held: String::new(),
            finished: None,
        }
    }

    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    pub fn generated(&self) -> usize {
        self.generated
    }

    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> StepOutput {
        if self.finished.is_some() {
            return StepOutput {
                text: String::new(),
                finished: self.finished,
            };
        }
        self.generated += 1;
        if self.stop_ids.contains(&id) {
            return self.finish(FinishReason::Stop, true);
        }
        let piece = self.decoder.push(tok, id);
        self.held.push_str(&piece);
        if let Some(idx) = self
            .stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.held.truncate(idx);
            return self.finish(FinishReason::Stop, false);
        }
        if self.generated >= self.max_tokens {
            return self.finish(FinishReason::Length, true);
        }
        // Hold back the longest tail that could still grow into a stop string.
        let keep = self
            .stop
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .rev()
                    .filter(|k| s.is_char_boundary(*k))
                    .map(move |k| &s[..k])
            })
            .filter(|prefix| self.held.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let emit_to = self.held.len() - keep;
        let text: String = self.held.drain(..emit_to).collect();
        StepOutput {
            text,
            finished: None,
        }
    }

    /// Ends the request now (e.g. the context is full), releasing held text.
    pub fn finish(&mut self, reason: FinishReason, flush: bool) -> StepOutput {
        let mut text = std::mem::take(&mut self.held);
        if flush {
            text.push_str(&self.decoder.flush());
        }
        self.finished = Some(reason);
        StepOutput {
            text,
            finished: Some(reason),
        }
    }
}
