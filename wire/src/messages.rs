//! Every message between Tandem nodes, behind one protocol version.
//!
//! The shapes follow the request flow in ARCHITECTURE.md and what the
//! failure, session and accounting issues need from the wire:
//! - a request carries its deadline and the tokens already streamed, so
//!   another decode group can continue it after a failure;
//! - every prefill attempt carries the decode-assigned [`Lease`]; decode
//!   accepts KV and completions only for the current lease;
//! - every KV transfer ends with a [`KvDone`] whose checksum covers what was
//!   sent, so corruption or loss is caught before decoding;
//! - heartbeats carry load; cache events let the gateway index prefixes;
//! - errors crossing the wire keep their class ([`ErrorClass`]).

use serde::{Deserialize, Serialize};
/// Byte strings that go on the wire as one run (not element by element).
pub use serde_bytes::ByteBuf;
use tandem_model::{BlockId, FinishReason, SamplingParams};

/// Bumped whenever any message changes shape. Peers with different versions
/// refuse each other at the handshake instead of misreading frames.
pub const PROTOCOL_VERSION: u32 = 7;

/// ALPN identifier of Tandem's node-to-node protocol.
pub const ALPN: &[u8] = b"tandem";

/// What a node is in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Gateway,
    Prefill {
        pipeline: String,
        stage: u32,
    },
    Decode {
        group: String,
    },
    /// Tools (benchmarks, admin commands).
    Client,
}

/// First frame on a new connection, from the side that opened it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    /// Cluster name from the cluster file: nodes of different clusters refuse each other.
    pub cluster: String,
    pub node: String,
    pub role: Role,
    pub process: ProcessId,
}

/// Which process a node is: its host's boot, its pid and the pid's start
/// time, so a peer on the same host can tell whether that very process is
/// still alive (a restarted node is a new process, and a reused pid has
/// another start time).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct ProcessId {
    /// The host's boot id (`/proc/sys/kernel/random/boot_id`).
    pub boot: String,
    pub pid: u32,
    /// Start time of the process in clock ticks after boot.
    pub start: u64,
}

/// The answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    Accepted {
        protocol: u32,
        node: String,
        role: Role,
        process: ProcessId,
    },
    Refused {
        protocol: u32,
        reason: String,
    },
}

/// A request's id, unique within its gateway's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId(pub u64);

/// One attempt at filling a request's KV, assigned by decode: a random
/// 128-bit key (from a generator seeded by the operating system), so it
/// also authenticates what names it. A peer that was not given it cannot
/// guess it; every KV write and notice is checked against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lease(pub u128);

/// How a failure is classed where it is reported; the gateway maps classes to HTTP statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorClass {
    BadRequest,
    Overloaded,
    NodeLost,
    DeadlineExceeded,
    Cancelled,
    Internal,
}

/// Gateway → decode: generate for this prompt (continuing after `generated`, if any).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generate {
    pub id: RequestId,
    pub prompt: Vec<u32>,
    /// Tokens already streamed to the client by an earlier, failed attempt.
    pub generated: Vec<u32>,
    pub params: SamplingParams,
    /// Milliseconds since the Unix epoch after which the request is abandoned.
    pub deadline_ms: u64,
    pub session: Option<String>,
    /// The prefill pipeline the session is pinned to, if any.
    pub pipeline: Option<String>,
    /// The gateway span that sent it (decode's spans for the request are
    /// its children) and the client's request id.
    pub trace: TraceContext,
}

/// What ties a request's work on every node to one trace and one id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// The W3C `traceparent` of the span that handed the request on; empty
    /// when it is not traced.
    pub traceparent: String,
    /// The request's `x-request-id` (the client's, else the gateway's).
    pub request_id: String,
}

/// Per-request accounting returned with the last event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accounting {
    pub nodes: Vec<String>,
    pub cached_tokens: u32,
    pub prefilled_tokens: u32,
    pub kv_bytes: u64,
    pub gateway_queue_us: u64,
    pub prefill_queue_us: u64,
    pub prefill_compute_us: u64,
    pub kv_transfer_us: u64,
    /// From the last stage's first token (sent after its last chunk's
    /// compute) to verified KV: the KV still in flight then.
    pub kv_wait_us: u64,
    pub decode_queue_us: u64,
    pub first_step_us: u64,
    /// How the prompt's KV reached decode: "ucx", "quic", or "local"
    /// (prefilled by the decode group itself); empty when all of it was cached.
    pub kv_transport: String,
}

/// Decode → gateway, on the request's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GenerateEvent {
    Token {
        index: u32,
        token: u32,
        logprob: f32,
        /// The most likely tokens' log-probabilities, when asked for.
        top: Vec<(u32, f32)>,
        /// The text this token completes (empty while a character or a
        /// possible stop string is still open).
        text: String,
    },
    Finished {
        reason: FinishReason,
        accounting: Accounting,
    },
    Failed {
        class: ErrorClass,
        message: String,
    },
}

/// Which blocks of one decode rank a prefill fills, and which heads that rank holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankTarget {
    pub rank: u32,
    pub heads: (u32, u32),
    pub blocks: Vec<BlockId>,
}

/// Decode → prefill stage 0: compute the KV of `tokens[cached..]` into the targets' blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillRequest {
    pub id: RequestId,
    pub lease: Lease,
    /// The decode group (node name) whose ranks receive the KV.
    pub decode: String,
    pub tokens: Vec<u32>,
    /// Leading tokens decode already holds (whole blocks): their KV is not sent.
    pub cached: u32,
    /// Leading tokens the pipeline reuses from its own prefix caches (whole
    /// blocks), set by stage 0 for the stages after it; 0 from decode.
    pub reuse_from: u32,
    /// Whether stages may reuse their prefix caches (decode turns it off
    /// when retrying after a stage's cache lost the prefix).
    pub reuse: bool,
    pub targets: Vec<RankTarget>,
    /// How the last stage samples the first token.
    pub params: SamplingParams,
    /// Where the answer starts in `tokens` (after the prompt; earlier than
    /// the end when an earlier attempt streamed some): the penalties count
    /// what follows as output.
    pub output_from: u32,
    pub deadline_ms: u64,
    /// Cache warming: after a turn ends, decode asks the pipeline to
    /// compute and cache the prompt and answer (no targets), so the
    /// conversation's next turn computes only what is new. Nothing comes
    /// back for it, and a pipeline runs any other work first, stopping a
    /// warming pass between layers when such work arrives.
    pub warm: bool,
    /// Decode's span for this attempt (every stage's spans for it are its
    /// children) and the client's request id.
    pub trace: TraceContext,
}

/// Stage → next stage: one chunk's hidden states.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Activations {
    pub id: RequestId,
    pub lease: Lease,
    pub pos: u32,
    pub n: u32,
    pub hidden: Vec<f32>,
    /// Of a cache-warming pass (see [`PrefillRequest::warm`]).
    pub warm: bool,
}

/// Stage → decode rank: KV runs for some of the rank's blocks (QUIC transport).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvChunk {
    pub id: RequestId,
    pub lease: Lease,
    pub stage: u32,
    pub rank: u32,
    pub blocks: Vec<(BlockId, ByteBuf)>,
}

/// A decode rank's KV pool as registered with UCX: where it is in the
/// rank's address space and the packed remote key that reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UcxPool {
    pub base: u64,
    pub bytes: u64,
    pub block_bytes: u64,
    pub rkey: ByteBuf,
}

/// Stage → decode rank: everything of this stage for this rank was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvDone {
    pub id: RequestId,
    pub lease: Lease,
    pub stage: u32,
    pub rank: u32,
    pub blocks: u32,
    pub checksum: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    pub running: u32,
    pub queued: u32,
    pub free_blocks: u32,
    pub total_blocks: u32,
    /// Decode: prefill pipelines whose every stage is linked to it.
    pub pipelines_up: u32,
    /// Decode, since start: KV transfers that failed their checksum, and
    /// prefill attempts retried (for any reason).
    pub kv_checksum_failures: u64,
    pub kv_retries: u64,
    /// Decode: blocks held back from abandoned attempts, and the attempts,
    /// until nothing may write them: every stage that may write them
    /// directly confirmed it stopped or is known dead, and every receive
    /// into them completed.
    pub kv_quarantined_blocks: u32,
    pub kv_quarantined_attempts: u32,
    /// Decode, since start: KV blocks that arrived over the QUIC link,
    /// written directly into its pools by stages on its host (UCX), and as
    /// UCX active messages.
    pub kv_blocks_quic: u64,
    pub kv_blocks_ucx_direct: u64,
    pub kv_blocks_ucx_messages: u64,
}

/// Every message after the handshake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    Generate(Generate),
    Event {
        id: RequestId,
        event: GenerateEvent,
    },
    Cancel {
        id: RequestId,
    },
    Prefill(PrefillRequest),
    /// Stop work under this lease (cancelled, or decode gave up on the
    /// attempt). Every stage answers `decode` with [`Message::KvStopped`].
    PrefillAbort {
        id: RequestId,
        lease: Lease,
        decode: String,
    },
    /// Stage → decode: nothing of this stage writes the attempt's blocks any
    /// more (its puts, if any, completed or were cancelled), so decode may
    /// hand them to another request.
    KvStopped {
        id: RequestId,
        lease: Lease,
        stage: u32,
    },
    Activations(Activations),
    Kv(KvChunk),
    KvDone(KvDone),
    /// Decode → stage: its UCX worker's address; KV may come over UCX.
    /// `pools` (per rank, possibly empty) are the ranks' KV pools, which a
    /// stage that can map them (shared memory) writes with one-sided puts.
    UcxHello {
        address: ByteBuf,
        pools: Vec<UcxPool>,
    },
    /// Stage → decode: these blocks were written over UCX (every byte is
    /// in the rank's pool); decode checksums them from there.
    KvLanded {
        id: RequestId,
        lease: Lease,
        stage: u32,
        rank: u32,
        blocks: Vec<BlockId>,
        /// Written by one-sided puts (else by active messages, which the
        /// decode side's handler saw land).
        put: bool,
    },
    FirstToken {
        id: RequestId,
        lease: Lease,
        token: u32,
        logprob: f32,
        top: Vec<(u32, f32)>,
        /// Time the pipeline spent on the request, queueing and computing.
        queue_us: u64,
        compute_us: u64,
        /// Prompt tokens the pipeline computed (the rest it reused).
        prefilled: u32,
    },
    PrefillFailed {
        id: RequestId,
        lease: Lease,
        class: ErrorClass,
        message: String,
    },
    Heartbeat {
        node: String,
        seq: u64,
        load: Load,
    },
    /// Prefix-cache blocks a node stored or evicted, by chained hash.
    CacheStored {
        node: String,
        hashes: Vec<u64>,
    },
    CacheEvicted {
        node: String,
        hashes: Vec<u64>,
    },
}

impl Message {
    /// Whether losing or delaying this message would lose a request's
    /// state or a block's fate: cancels, aborts, stops, landings, a
    /// pipeline's answer, cache changes. Links never refuse these for a
    /// full queue (they are small, and bounded by the requests in flight);
    /// data (requests, KV, activations, token events, heartbeats) waits
    /// behind a slow peer instead.
    pub fn is_control(&self) -> bool {
        matches!(
            self,
            Message::Cancel { .. }
                | Message::PrefillAbort { .. }
                | Message::KvStopped { .. }
                | Message::KvLanded { .. }
                | Message::UcxHello { .. }
                | Message::FirstToken { .. }
                | Message::PrefillFailed { .. }
                | Message::CacheStored { .. }
                | Message::CacheEvicted { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        let id = RequestId(7);
        let lease = Lease(3);
        vec![
            Message::Generate(Generate {
                id,
                prompt: vec![1, 2, 3],
                generated: vec![4],
                params: SamplingParams {
                    stop: vec!["\n".into()],
                    seed: Some(9),
                    ..SamplingParams::greedy(16)
                },
                deadline_ms: 1_700_000_000_000,
                session: Some("s".into()),
                pipeline: None,
                trace: Default::default(),
            }),
            Message::Event {
                id,
                event: GenerateEvent::Token {
                    index: 0,
                    token: 42,
                    logprob: -0.25,
                    top: vec![(42, -0.25), (7, -2.0)],
                    text: "Paris".into(),
                },
            },
            Message::Event {
                id,
                event: GenerateEvent::Finished {
                    reason: FinishReason::Length,
                    accounting: Accounting {
                        nodes: vec!["d0".into()],
                        kv_bytes: 10,
                        ..Default::default()
                    },
                },
            },
            Message::Event {
                id,
                event: GenerateEvent::Failed {
                    class: ErrorClass::NodeLost,
                    message: "gone".into(),
                },
            },
            Message::Cancel { id },
            Message::Prefill(PrefillRequest {
                id,
                lease,
                decode: "d0".into(),
                tokens: vec![5; 40],
                cached: 16,
                reuse_from: 32,
                reuse: true,
                warm: false,
                trace: Default::default(),
                targets: vec![RankTarget {
                    rank: 0,
                    heads: (0, 1),
                    blocks: vec![BlockId(4), BlockId(9)],
                }],
                params: SamplingParams {
                    logit_bias: vec![(3, -100.0)],
                    repetition_penalty: 1.1,
                    ..SamplingParams::greedy(1)
                },
                output_from: 38,
                deadline_ms: 5,
            }),
            Message::PrefillAbort {
                id,
                lease,
                decode: "d0".into(),
            },
            Message::KvStopped {
                id,
                lease,
                stage: 1,
            },
            Message::Activations(Activations {
                id,
                lease,
                pos: 16,
                n: 2,
                hidden: vec![0.5, -1.0, 2.0, 3.5],
                warm: false,
            }),
            Message::Kv(KvChunk {
                id,
                lease,
                stage: 1,
                rank: 2,
                blocks: vec![(BlockId(4), ByteBuf::from(vec![1, 2, 3, 4]))],
            }),
            Message::KvDone(KvDone {
                id,
                lease,
                stage: 1,
                rank: 2,
                blocks: 2,
                checksum: 0xDEAD_BEEF,
            }),
            Message::FirstToken {
                id,
                lease,
                token: 11,
                logprob: -1.5,
                top: Vec::new(),
                queue_us: 3,
                compute_us: 40,
                prefilled: 24,
            },
            Message::PrefillFailed {
                id,
                lease,
                class: ErrorClass::DeadlineExceeded,
                message: "late".into(),
            },
            Message::Heartbeat {
                node: "p0-s0".into(),
                seq: 99,
                load: Load {
                    running: 1,
                    queued: 2,
                    free_blocks: 3,
                    total_blocks: 4,
                    pipelines_up: 1,
                    kv_checksum_failures: 5,
                    kv_retries: 6,
                    kv_quarantined_blocks: 7,
                    kv_quarantined_attempts: 8,
                    kv_blocks_quic: 9,
                    kv_blocks_ucx_direct: 10,
                    kv_blocks_ucx_messages: 11,
                },
            },
            Message::UcxHello {
                address: ByteBuf::from(vec![1, 2, 3]),
                pools: vec![UcxPool {
                    base: 1 << 40,
                    bytes: 1 << 20,
                    block_bytes: 4096,
                    rkey: ByteBuf::from(vec![4, 5]),
                }],
            },
            Message::KvLanded {
                id,
                lease: Lease(3),
                stage: 1,
                rank: 2,
                blocks: vec![BlockId(7), BlockId(9)],
                put: true,
            },
            Message::CacheStored {
                node: "d0".into(),
                hashes: vec![1, 2],
            },
            Message::CacheEvicted {
                node: "d0".into(),
                hashes: vec![3],
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let bytes = encode(&m).expect("encodes");
            assert_eq!(decode::<Message>(&bytes).expect("decodes"), m);
            // A truncated frame is an error, never a panic or a wrong message.
            if bytes.len() > 1 {
                assert!(decode::<Message>(&bytes[..bytes.len() - 1]).is_err());
            }
        }
    }

    proptest! {
        /// The wire decoder never panics on arbitrary bytes, and anything it
        /// accepts encodes back to the same bytes.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(m) = decode::<Message>(&bytes) {
                let again = encode(&m).expect("re-encodes");
                prop_assert_eq!(decode::<Message>(&again).expect("decodes"), m);
            }
        }

        #[test]
        fn mutated_messages_never_panic(i in 0usize..15, pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let m = &samples()[i];
            let mut bytes = encode(m).expect("encodes");
            let p = pos.index(bytes.len());
            bytes[p] = byte;
            let _ = decode::<Message>(&bytes);
        }
    }
}
