//! The one place logging (and tracing) is set up: an `RUST_LOG`-style filter (default `info`),
//! human-readable or JSON lines, always on stderr so stdout stays free for tools; and, when an
//! OTLP endpoint is configured, the same spans exported as OpenTelemetry traces
//! (`crate::telemetry`).

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub fn init_logging(json: bool, tracer: Option<crate::telemetry::Tracer>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    let fmt = if json { fmt.json().with_current_span(true).boxed() } else { fmt.boxed() };
    // Traces take every span the filter lets through, as the log does.
    let traces = tracer.map(|tracer| tracing_opentelemetry::layer().with_tracer(tracer));
    tracing_subscriber::registry().with(filter).with(fmt).with(traces).init();
}
