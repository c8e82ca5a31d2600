//! `GET /metrics`: Prometheus text. Gauges that describe the present (queue depth, readiness)
//! are read at scrape time, so they are never stale.

use std::time::Instant;

use axum::extract::{RawPathParams, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::AppState;
use crate::metrics as m;

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(render))
}

async fn render(State(state): State<AppState>) -> impl IntoResponse {
    for model in state.repository.iter().iter() {
        let name = model.name.clone();
        let ready = model.status().is_ready();
        metrics::gauge!(m::MODEL_READY, "model" => name.clone()).set(if ready { 1.0 } else { 0.0 });
        let runtime = model.runtime().ok();
        let depth = runtime.as_ref().map_or(0, |r| r.queue_depth());
        let wait = runtime.as_ref().map_or(0.0, |r| m::seconds(r.expected_wait()));
        metrics::gauge!(m::QUEUE_DEPTH, "model" => name.clone()).set(depth as f64);
        metrics::gauge!(m::EXPECTED_QUEUE_WAIT, "model" => name).set(wait);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

/// The layer of each protocol's inference routes (`api::router`; `protocol` is its name, the
/// metrics' `protocol` label): counts every request by model, protocol and status, refused
/// keys and extractor rejections included, times it whole, keeps the in-flight gauge honest
/// even when the client goes away mid-request, and records protocol and model on the
/// request's span. The model is the route's `{name}` (KServe V1's `{name}:predict` without
/// its verb).
pub async fn track_inference(State(protocol): State<&'static str>, params: RawPathParams, request: Request, next: Next) -> Response {
    let name = params.iter().find(|(key, _)| *key == "name").map(|(_, value)| value).unwrap_or_default();
    let model = name.rsplit_once(':').map_or(name, |(model, _)| model).to_string();
    let span = tracing::Span::current();
    span.record("protocol", protocol);
    span.record("model", model.as_str());
    let tracker = InferenceTracker::start(&model, protocol);
    // The upload, as a span that ends when the handler has read the whole body.
    let request = request.map(|body| axum::body::Body::new(TimedBody { inner: body, span: Some(tracing::info_span!("receive_body")) }));
    let response = next.run(request).await;
    tracker.finish(response.status().as_u16());
    response
}

/// One inference request in the request metrics, from its start to its answer: in the
/// in-flight gauge while it runs (left on drop, so a vanished client does not stay counted),
/// then counted by status (HTTP's, or for gRPC the HTTP status of the same error) and timed.
pub struct InferenceTracker {
    model: String,
    protocol: &'static str,
    started: Instant,
    in_flight: metrics::Gauge,
}

impl InferenceTracker {
    pub fn start(model: &str, protocol: &'static str) -> InferenceTracker {
        let in_flight = metrics::gauge!(m::IN_FLIGHT, "model" => model.to_string());
        in_flight.increment(1.0);
        InferenceTracker { model: model.to_string(), protocol, started: Instant::now(), in_flight }
    }

    pub fn finish(self, status: u16) {
        let (model, protocol) = (self.model.clone(), self.protocol);
        metrics::counter!(m::REQUESTS, "model" => model.clone(), "protocol" => protocol, "status" => status.to_string()).increment(1);
        metrics::histogram!(m::REQUEST_SECONDS, "model" => model, "protocol" => protocol).record(m::seconds(self.started.elapsed()));
    }
}

impl Drop for InferenceTracker {
    fn drop(&mut self) {
        self.in_flight.decrement(1.0);
    }
}

/// A request body that closes its span when its last frame (or an error) has been read.
struct TimedBody {
    inner: axum::body::Body,
    span: Option<tracing::Span>,
}

impl http_body::Body for TimedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None | Some(Err(_)))) {
            self.span.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
