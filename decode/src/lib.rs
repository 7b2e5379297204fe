//! Decode group: tensor-parallel ranks as threads, each with its weight
//! shard and paged KV pool, continuous batching over every running sequence.
//!
//! - [`admission`]: the state machine that decides which requests hold KV
//!   blocks: a bounded admission queue, block allocation before a prefill is
//!   asked for, leases that fence off late writes from failed attempts,
//!   retries on a lost or corrupted transfer, deadlines, and freeing on
//!   finish or cancel.
//! - [`group`]: the process around it: rank threads, the batch loop, KV
//!   arriving from prefill stages, tokens streaming to the gateway.

pub mod admission;
pub mod group;
