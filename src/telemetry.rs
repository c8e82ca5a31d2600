//! OpenTelemetry traces, off unless an OTLP endpoint is configured (`--otlp-endpoint` /
//! `VISIONSERVE_OTLP_ENDPOINT`, or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` /
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`). The `tracing` spans the server already has become
//! OpenTelemetry spans (`tracing-opentelemetry`), so there is one set of spans for logs and
//! traces.
//!
//! The standard variables are honoured: `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc` or
//! `http/protobuf`, the default), `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` (the service
//! is `visionserve` unless they name it), `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_BSP_*` (the batch processor). W3C `traceparent` /
//! `tracestate` come in through REST headers and gRPC metadata ([`parent_from`]).
//!
//! Exporting never blocks or fails a request: spans go to the SDK's batch processor (its own
//! thread, a bounded queue that drops when full), and a failed export is counted in
//! `visionserve_trace_export_errors_total`, nothing more.

use std::fmt;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::Context;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;

use crate::metrics as m;

/// The running trace pipeline; [`Telemetry::shutdown`] flushes what is queued.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

/// The tracer the `tracing` layer writes to.
pub type Tracer = opentelemetry_sdk::trace::Tracer;

/// Where and how spans go, from the flag and the standard variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportTarget {
    pub endpoint: String,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl ExportTarget {
    /// `None` when no endpoint is configured: tracing stays off. `flag` is `--otlp-endpoint`;
    /// `env` reads a variable (the process environment in the server, a map in tests).
    pub fn from_config(flag: Option<&str>, env: impl Fn(&str) -> Option<String>) -> Result<Option<ExportTarget>, String> {
        let endpoint = flag
            .map(str::to_string)
            .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty());
        let Some(endpoint) = endpoint else { return Ok(None) };
        let protocol = match env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL")).as_deref().map(str::trim) {
            None | Some("") | Some("http/protobuf") => Protocol::HttpProtobuf,
            Some("grpc") => Protocol::Grpc,
            Some(other) => return Err(format!("OTEL_EXPORTER_OTLP_PROTOCOL '{other}' is not supported: use grpc or http/protobuf")),
        };
        Ok(Some(ExportTarget { endpoint, protocol }))
    }

    /// The URL the exporter posts to: for HTTP the endpoint is a base URL, as the standard
    /// variable is, and `/v1/traces` is added unless already there.
    fn url(&self) -> String {
        match self.protocol {
            Protocol::Grpc => self.endpoint.clone(),
            Protocol::HttpProtobuf if self.endpoint.ends_with("/v1/traces") => self.endpoint.clone(),
            Protocol::HttpProtobuf => format!("{}/v1/traces", self.endpoint.trim_end_matches('/')),
        }
    }
}

/// Counts failed exports; everything else is the wrapped exporter's.
struct CountingExporter<E> {
    inner: E,
}

impl<E: fmt::Debug> fmt::Debug for CountingExporter<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        if result.is_err() {
            metrics::counter!(m::TRACE_EXPORT_ERRORS).increment(1);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl Telemetry {
    /// Starts the pipeline. Call inside the tokio runtime: the gRPC exporter's channel lives
    /// on it.
    pub fn start(target: &ExportTarget) -> Result<(Telemetry, Tracer), String> {
        let builder = opentelemetry_otlp::SpanExporter::builder();
        let exporter = match target.protocol {
            Protocol::Grpc => builder.with_tonic().with_endpoint(target.url()).build(),
            Protocol::HttpProtobuf => builder.with_http().with_endpoint(target.url()).build(),
        }
        .map_err(|e| format!("the OTLP exporter for {}: {e}", target.endpoint))?;
        let mut resource = Resource::builder();
        let named = std::env::var_os("OTEL_SERVICE_NAME").is_some()
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|a| a.contains("service.name="));
        if !named {
            resource = resource.with_service_name("visionserve");
        }
        let provider = SdkTracerProvider::builder()
            .with_resource(resource.build())
            .with_batch_exporter(CountingExporter { inner: exporter })
            .build();
        let tracer = provider.tracer("visionserve");
        Ok((Telemetry { provider }, tracer))
    }

    /// Sends what is queued, within the exporter's timeout.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "flushing the last traces failed");
        }
    }
}

/// Reads W3C trace context from HTTP headers (REST) or gRPC metadata (as headers).
struct HeaderExtractor<'a>(&'a axum::http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The remote parent a request names in `traceparent` / `tracestate`, if any.
pub fn parent_from(headers: &axum::http::HeaderMap) -> Option<Context> {
    headers.contains_key("traceparent").then(|| TraceContextPropagator::new().extract(&HeaderExtractor(headers)))
}

/// Makes `span` a child of the request's remote parent, and records the trace id on it, so
/// every log line of the request names its trace. Without tracing on, nothing happens.
pub fn adopt(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if let Some(parent) = parent_from(headers) {
        let _ = span.set_parent(parent);
    }
    let context = span.context();
    let trace_id = context.span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn target(flag: Option<&str>, vars: &[(&str, &str)]) -> Result<Option<ExportTarget>, String> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        ExportTarget::from_config(flag, |k| vars.get(k).cloned())
    }

    #[test]
    fn off_without_an_endpoint_and_the_standard_variables_are_read() {
        assert_eq!(target(None, &[]).unwrap(), None);
        let http = target(None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")]).unwrap().unwrap();
        assert_eq!((http.protocol, http.url()), (Protocol::HttpProtobuf, "http://collector:4318/v1/traces".to_string()));
        let grpc = target(Some("http://c:4317"), &[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap().unwrap();
        assert_eq!((grpc.protocol, grpc.url()), (Protocol::Grpc, "http://c:4317".to_string()));
        let traces = target(None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a"), ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b/v1/traces")]);
        assert_eq!(traces.unwrap().unwrap().url(), "http://b/v1/traces");
        assert!(target(Some("http://c"), &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).is_err());
    }

    #[test]
    fn a_traceparent_header_becomes_the_parent() {
        use opentelemetry::trace::TraceContextExt;
        let mut headers = axum::http::HeaderMap::new();
        assert!(parent_from(&headers).is_none());
        headers.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        let parent = parent_from(&headers).unwrap();
        assert_eq!(parent.span().span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }
}
