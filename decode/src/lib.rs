//! Decode group: tensor-parallel ranks as threads, each with its weight
//! shard and paged KV pool, continuous batching over every running sequence.
//!
//! Built so far: [`admission`], the state machine that decides which requests
//! hold KV blocks: a bounded admission queue, block allocation before a
//! prefill is asked for, leases that fence off late writes from failed
//! attempts, retries on a lost or corrupted transfer, deadlines, and freeing
//! on finish or cancel. The rank threads, the batch loop and the network side
//! come with the disaggregated-serving issue.

pub mod admission;
