//! Decode group: tensor-parallel ranks as threads, each with its weight shard and paged KV pool, continuous batching over every running sequence. Filled by the disaggregated-serving issue.
