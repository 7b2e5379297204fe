//! Gateway: the OpenAI-compatible HTTP/SSE front end (axum), chat templating, tokenization and session-sticky routing. Filled by the disaggregated-serving issue.
