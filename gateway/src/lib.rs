//! Gateway: the OpenAI-compatible HTTP/SSE front end, chat templating,
//! tokenization and session-sticky routing.
//!
//! Built so far: [`api`], the OpenAI request and response shapes, request
//! validation into Tandem's sampling parameters, the error body and HTTP
//! status of every failure class, and the streaming chunk format. The HTTP
//! server (axum) and routing to decode groups come with the
//! disaggregated-serving issue.

pub mod api;
