//! Decode group: tensor-parallel ranks as threads, each with its weight
//! shard and paged KV pool, continuous batching over every running sequence.
//!
//! - [`admission`]: the state machine that decides which requests hold KV
//!   blocks: a bounded admission queue, block allocation before a prefill is
//!   asked for, leases that fence off late writes from failed attempts,
//!   retries on a lost or corrupted transfer, deadlines, and freeing on
//!   finish or cancel.
//! - [`core`]: the request logic around admission, as a state machine
//!   driven by events with the time passed in: attempts at a request's KV
//!   from a pipeline or prefilled here, the checks on what arrives, fences
//!   that keep abandoned attempts' blocks out of use while anything may
//!   write them, and the composition of each decode step.
//! - [`group`]: the process around it: links, rank threads, UCX, the
//!   loop that feeds the core and carries out its actions, the text of
//!   each stream.

pub mod admission;
pub mod core;
pub mod group;
