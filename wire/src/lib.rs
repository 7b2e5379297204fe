//! Wire: what Tandem nodes say to each other and how.
//!
//! - [`tls`]: the cluster certificate authority and per-node certificates
//!   (rcgen); every QUIC connection between nodes is mutual TLS, and a peer
//!   whose certificate the cluster CA did not sign is refused.
//! - [`quic`]: quinn endpoints built from those certificates, and the
//!   versioned handshake every connection opens with.
//! - [`codec`]: length-prefixed postcard frames on QUIC streams, size-limited.
//! - [`link`]: a handshaken connection carrying messages in order, dialers
//!   that reconnect, one event channel per node.
//! - [`messages`]: the protocol version and the handshake messages.
//! - [`node`]: what every node process starts from, and its heartbeat.
//! - [`metrics`]: the serving metrics each node exports, in vLLM's names.
//! - [`trace`]: trace context carried from node to node.
//! - [`addr`]: node addresses (IP or DNS name, resolved when dialing).
//! - [`config`]: the cluster file (TOML), validated once at start.

pub mod addr;
pub mod codec;
pub mod config;
pub mod error;
pub mod link;
pub mod messages;
pub mod metrics;
pub mod node;
pub mod quic;
pub mod tls;
pub mod trace;

pub use error::{Result, WireError};
