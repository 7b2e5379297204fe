//! Messages every connection starts with. Later protocol messages (requests,
//! KV transfer notices, heartbeats) join this module as the roles that send
//! them are built; every one travels behind the same version check.

use serde::{Deserialize, Serialize};

/// Bumped whenever any message changes shape. Peers with different versions
/// refuse each other at the handshake instead of misreading frames.
pub const PROTOCOL_VERSION: u32 = 1;

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
}

/// The answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    Accepted {
        protocol: u32,
        node: String,
        role: Role,
    },
    Refused {
        protocol: u32,
        reason: String,
    },
}
