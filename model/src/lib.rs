//! Tandem's model engine: one Llama-family transformer that every role runs,
//! each on its own slice of it.
//!
//! Data flows like this: [`ModelFile::open`] reads a GGUF file or a Hugging
//! Face directory into a [`ModelConfig`], a [`Tokenizer`] and a
//! [`ChatTemplate`]. [`ModelSlice::load`] takes a [`SliceSpec`] (a layer range
//! times a KV-head shard) and loads just those weights, dense for prefill and
//! quantized for decode ([`Formats`]). [`ModelSlice::forward`] runs a batch of
//! sequences ([`SeqSpan`]: new tokens, their positions, their block table)
//! through the slice, writing K/V into a paged [`KvPool`] and combining
//! tensor-parallel partial sums through [`AllReduce`]. [`Engine`] composes
//! slices in one process (pipeline stages in sequence, ranks as threads) and
//! [`generate`] samples ([`Sampler`]) and streams text ([`StopState`]).

pub mod attention;
pub mod chat;
pub mod comm;
pub mod config;
pub mod cuda;
pub mod defaults;
pub mod device;
pub mod engine;
pub mod error;
pub mod export;
pub mod fetch;
pub mod file;
pub mod gemm;
pub mod grammar;
pub mod kv;
pub mod linear;
mod moe;
pub mod plan;
pub mod prefix;
pub mod qlanes;
pub mod qmatmul;
pub mod qrows;
pub mod quant;
pub mod ranks;
pub mod sampling;
pub mod slice;
mod source;
pub mod stream;
pub mod tokenizer;
mod vmath;
mod weights;

pub use attention::SeqSpan;
pub use chat::{ChatMessage, ChatTemplate};
pub use comm::{AllReduce, AllToAll, Collectives, Solo, ThreadGroup};
pub use config::{Arch, ModelConfig, MoeConfig};
pub use defaults::GenerationDefaults;
pub use device::{Device, Gpus};
pub use engine::{generate, Engine, EngineOptions, Generation, Sequence};
pub use error::{ModelError, Result};
pub use file::{ModelFile, TensorFormat};
pub use grammar::{Grammar, GrammarEnv};
pub use kv::{BlockAllocator, BlockId, KvDtype, KvLayout, KvPool};
pub use linear::{Format, Formats};
pub use prefix::{block_hashes, PrefixCache};
pub use ranks::{Input, RankGroup, RankGroupOptions, Span};
pub use sampling::{select, Draw, Sampled, Sampler, SamplingParams};
pub use slice::{ModelSlice, Phase, SliceInput, SliceOutput, SliceSpec};
pub use source::RawTensor;
pub use stream::{FinishReason, StepOutput, StopState};
pub use tokenizer::{TextDecoder, Tokenizer};
