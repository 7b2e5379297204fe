//! Gateway: the OpenAI-compatible HTTP/SSE front end, chat templating,
//! tokenization and routing to decode groups.
//!
//! - [`api`]: the OpenAI request and response shapes, request validation
//!   into Tandem's sampling parameters, the error body and HTTP status of
//!   every failure class, and the streaming chunk format.
//! - [`server`]: the axum server, the links to the cluster's nodes, routing
//!   to the least loaded decode group, cancellation when a client leaves.
//! - [`tools`]: tool declarations, the tool history written for the
//!   model, and the answer parsed back into `tool_calls`.
//! - [`metrics`]: what `/metrics` exposes.

pub mod api;
pub mod metrics;
pub mod server;
pub mod tools;
