//! Logs and traces for a `tandem` process. Logs go to stderr, filtered by
//! `RUST_LOG` (or its alias `TANDEM_LOG`; `warn` when neither is set), as
//! text or one JSON object per line. Traces go to an OTLP/HTTP collector
//! when one is named (`--otlp-endpoint`, or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`):
//! every span of Tandem's crates at INFO, whatever the log filter, as
//! OTLP/JSON. With no collector there is no tracing layer at all, and
//! spans the log filter does not want cost a disabled callsite check.

use anyhow::{Context, Result};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::LogFormat;

/// Flushes the spans still buffered when dropped (at the process's end).
pub struct Telemetry(Option<SdkTracerProvider>);

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("warning: traces not all exported: {e}");
            }
        }
    }
}

/// The process is `role` node `node` (its `service.name` is
/// `tandem-ROLE` unless `OTEL_SERVICE_NAME` says otherwise, its
/// `service.instance.id` the node's name). `otlp` is the collector's base
/// URL, `/v1/traces` is added.
pub fn init(format: LogFormat, otlp: Option<&str>, role: &str, node: &str) -> Result<Telemetry> {
    let filter = ["RUST_LOG", "TANDEM_LOG"]
        .iter()
        .find_map(|v| tracing_subscriber::EnvFilter::try_from_env(v).ok())
        .unwrap_or_else(|| "warn".into());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_filter(filter)
            .boxed(),
    };
    let traces_env = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .ok()
        .filter(|v| !v.is_empty());
    // Only nodes and `generate` export (`node` is empty for other commands).
    let provider = match (otlp.filter(|e| !e.is_empty()), traces_env) {
        _ if node.is_empty() => None,
        (None, None) => None,
        (base, signal) => Some(provider(base, signal.is_some(), role, node)?),
    };
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("tandem"))
            .with_filter(Targets::new().with_target("tandem", tracing::Level::INFO))
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .init();
    Ok(Telemetry(provider))
}

fn provider(
    base: Option<&str>,
    signal_env: bool,
    role: &str,
    node: &str,
) -> Result<SdkTracerProvider> {
    let mut b = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson);
    // The traces endpoint, when given, is used as it is.
    if let (Some(base), false) = (base, signal_env) {
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            anyhow::bail!("the OTLP endpoint '{base}' is not an http:// URL");
        }
        b = b.with_endpoint(format!("{}/v1/traces", base.trim_end_matches('/')));
    }
    let exporter = b.build().with_context(|| {
        format!(
            "cannot export traces to {}",
            base.unwrap_or("the OTLP endpoint")
        )
    })?;
    let mut resource = Resource::builder().with_attributes([
        KeyValue::new("service.instance.id", node.to_string()),
        KeyValue::new("tandem.role", role.to_string()),
    ]);
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |v| v.is_empty()) {
        resource = resource.with_service_name(format!("tandem-{role}"));
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}
