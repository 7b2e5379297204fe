//! Trace context across nodes. A request's spans on each node join one
//! trace: the span that hands a request on writes its W3C `traceparent`
//! into the message (gateway → decode in `Generate`, decode → every prefill
//! stage in `PrefillRequest`), and the receiving node parents its own span
//! on it. Without an exporter the spans carry no context and the field
//! stays empty.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// `span`'s context as a `traceparent` value; empty when it is not traced.
pub fn traceparent(span: &tracing::Span) -> String {
    if span.is_disabled() {
        return String::new();
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent").unwrap_or_default()
}

fn extract(traceparent: &str) -> Option<opentelemetry::Context> {
    if traceparent.is_empty() {
        return None;
    }
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `span` a child of the span `traceparent` names (nothing when it
/// names none).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if span.is_disabled() {
        return;
    }
    if let Some(cx) = extract(traceparent) {
        let _ = span.set_parent(cx);
    }
}

/// Links `span` to the span `traceparent` names: work shared by several
/// requests (a decode step's batch) points at each of them.
pub fn link(span: &tracing::Span, traceparent: &str) {
    if span.is_disabled() {
        return;
    }
    if let Some(cx) = extract(traceparent) {
        span.add_link(cx.span().span_context().clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_untraced_span_has_no_context_and_bad_parents_are_ignored() {
        let span = tracing::info_span!("untraced");
        assert_eq!(traceparent(&span), "");
        assert!(extract("").is_none());
        assert!(extract("not a traceparent").is_none());
        assert!(extract("00-00000000000000000000000000000000-0000000000000000-01").is_none());
        let cx = extract("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("a valid traceparent");
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        set_parent(&span, "garbage");
        link(&span, "");
    }
}
