//! The network surface. REST: each module exposes a `router()`, merged here under one state
//! and one stack of layers (request id, tracing, body limit) with a JSON fallback for unknown
//! routes. gRPC (`grpc`) is its own router on its own listener, over the same state and the
//! same inference path.

pub(crate) mod admin;
pub(crate) mod auth;
mod docs;
pub mod grpc;
pub(crate) mod inference;
mod health;
pub(crate) mod metrics_route;
pub(crate) mod model_path;
pub mod input;
mod models;
pub(crate) mod pipeline;
mod predict;
mod torchserve;
pub mod v2;
mod web;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use metrics_exporter_prometheus::PrometheusHandle;
use axum::http::{HeaderName, Request};
use axum::Router;
use tokio::sync::Semaphore;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::error::ApiError;
use crate::repository::ModelRepository;

#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_body_bytes: usize,
    pub max_image_pixels: u64,
    pub max_images_per_request: usize,
    /// Default deadline of a predict request, in milliseconds.
    pub request_timeout_ms: u64,
    /// How long an overload refusal (503, gRPC UNAVAILABLE) is held before it is answered.
    pub refusal_delay_ms: u64,
}

/// Everything a handler needs, cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub repository: Arc<ModelRepository>,
    pub limits: RequestLimits,
    /// Bounds the decode/preprocess work running at once on tokio's blocking pool.
    pub cpu_permits: Arc<Semaphore>,
    pub metrics: PrometheusHandle,
    /// Keys inference routes require; empty means open.
    pub api_keys: Arc<Vec<String>>,
    /// Token management routes require; `None` turns them off.
    pub admin_token: Option<Arc<String>>,
    /// The response cache; `None` when off.
    pub cache: Option<Arc<crate::cache::ResponseCache>>,
}

/// Builds an [`AppState`]: the server from its flags, tests and fuzz checks from their own
/// limits. Unset, the CPU pool has one thread, inference is open and management is off.
pub struct AppStateBuilder {
    repository: Arc<ModelRepository>,
    limits: RequestLimits,
    cpu_threads: usize,
    api_keys: Vec<String>,
    admin_token: Option<String>,
    response_cache_bytes: usize,
}

impl AppStateBuilder {
    /// The response cache's byte budget; 0 (the default) leaves it off.
    pub fn response_cache_bytes(mut self, bytes: usize) -> Self {
        self.response_cache_bytes = bytes;
        self
    }

    /// Threads that decode and preprocess at once.
    pub fn cpu_threads(mut self, threads: usize) -> Self {
        self.cpu_threads = threads.max(1);
        self
    }

    pub fn api_keys(mut self, keys: Vec<String>) -> Self {
        self.api_keys = keys;
        self
    }

    pub fn admin_token(mut self, token: Option<String>) -> Self {
        self.admin_token = token;
        self
    }

    pub fn build(self) -> AppState {
        AppState {
            repository: self.repository,
            limits: self.limits,
            cpu_permits: Arc::new(Semaphore::new(self.cpu_threads)),
            metrics: crate::metrics::handle(),
            api_keys: Arc::new(self.api_keys),
            admin_token: self.admin_token.map(Arc::new),
            cache: crate::cache::ResponseCache::new(self.response_cache_bytes).map(Arc::new),
        }
    }
}

impl AppState {
    pub fn builder(repository: Arc<ModelRepository>, limits: RequestLimits) -> AppStateBuilder {
        AppStateBuilder { repository, limits, cpu_threads: 1, api_keys: Vec::new(), admin_token: None, response_cache_bytes: 0 }
    }

    /// Runs CPU-heavy, non-libtorch work (decoding, resizing, mask encoding) off the reactor,
    /// at most `cpu_permits` at a time.
    pub async fn run_cpu<T, F>(&self, work: F) -> Result<T, ApiError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let _permit = self
            .cpu_permits
            .acquire()
            .await
            .map_err(|_| ApiError::Internal("CPU pool closed".into()))?;
        // The work's spans and log lines stay the request's.
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(work))
            .await
            .map_err(|e| ApiError::Internal(format!("CPU task failed: {e}")))
    }
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn router(state: AppState) -> Router {
    let body_limit = state.limits.max_body_bytes;
    Router::new()
        .merge(health::router())
        .merge(metrics_route::router())
        .merge(models::router())
        .merge(predict::router())
        .merge(web::router())
        .merge(v2::router())
        .merge(torchserve::router())
        .merge(admin::router())
        .merge(docs::router())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed("method not allowed on this route".into())
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_api_key))
        .layer(axum::middleware::from_fn_with_state(state.clone(), admin::require_admin_token))
        .layer(axum::middleware::from_fn(metrics_route::track_inference))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(|request: &Request<_>| {
                            let id = request.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
                            let (protocol, model) = inference_route(request.uri().path()).unwrap_or(("", ""));
                            let span = request_span(id, request.method().as_str(), &request.uri().to_string(), protocol, model);
                            crate::telemetry::adopt(&span, request.headers());
                            span
                        })
                        .on_response(|response: &axum::http::Response<_>, _latency: Duration, span: &tracing::Span| {
                            span.record("status", i64::from(response.status().as_u16()));
                        })
                        // Faults are logged once, with their detail, by `ApiError::log`; the
                        // layer's own line for every 5xx would also log each overload refusal
                        // at ERROR — tens of thousands of lines a second in a retry storm.
                        .on_failure(()),
                )
                .layer(PropagateRequestIdLayer::new(REQUEST_ID)),
        )
        .with_state(state)
}

/// A request's span, the same for REST and gRPC: its id, method and route, and — filled in as
/// the request goes — the model, version, protocol, batch size and status, and the trace id
/// when traces are exported. Stage spans (`receive_body`, `decode`, `preprocess`, `queue_wait`,
/// `postprocess`, `encode`) are its children; the batched `forward` links to it.
pub fn request_span(id: &str, method: &str, uri: &str, protocol: &str, model: &str) -> tracing::Span {
    use tracing::field::Empty;
    let protocol = (!protocol.is_empty()).then_some(protocol);
    let model = (!model.is_empty()).then_some(model);
    tracing::info_span!(
        "request",
        id,
        method,
        uri,
        protocol,
        model,
        version = Empty,
        batch_size = Empty,
        status = Empty,
        trace_id = Empty
    )
}

/// The model an inference route addresses — `/v1/models/{m}/predict`,
/// `/v2/models/{m}[/versions/{v}]/infer`, `/predictions/{m}[/{v}]` — and `None` for every other
/// route. The one place that knows which routes run models: API keys and request metrics
/// both ask it.
pub fn inference_model(path: &str) -> Option<&str> {
    inference_route(path).map(|(_, model)| model)
}

/// An inference route's protocol (the `protocol` label of the request metrics: `v1`, `v2`,
/// `torchserve`; gRPC calls are `grpc`) and model.
pub fn inference_route(path: &str) -> Option<(&'static str, &str)> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["v1", "models", model, "predict"] => Some(("v1", model)),
        ["v2", "models", model, "infer"] | ["v2", "models", model, "versions", _, "infer"] => Some(("v2", model)),
        ["predictions", model] | ["predictions", model, _] => Some(("torchserve", model)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{inference_model, inference_route};

    #[test]
    fn inference_routes_name_their_model_and_others_none() {
        assert_eq!(inference_model("/v1/models/resnet18/predict"), Some("resnet18"));
        assert_eq!(inference_model("/v2/models/resnet18/infer"), Some("resnet18"));
        assert_eq!(inference_model("/v2/models/resnet18/versions/1/infer"), Some("resnet18"));
        assert_eq!(inference_model("/predictions/resnet18"), Some("resnet18"));
        assert_eq!(inference_model("/predictions/resnet18/1.0"), Some("resnet18"));
        assert_eq!(inference_route("/v1/models/resnet18/predict"), Some(("v1", "resnet18")));
        assert_eq!(inference_route("/v2/models/resnet18/versions/1/infer"), Some(("v2", "resnet18")));
        assert_eq!(inference_route("/predictions/resnet18"), Some(("torchserve", "resnet18")));
        for other in ["/v1/models/resnet18", "/v2/models/resnet18/ready", "/health/ready", "/metrics", "/", "/predictions"] {
            assert_eq!(inference_model(other), None, "{other}");
        }
    }
}

/// Milliseconds with microsecond resolution, for timing headers.
pub fn millis(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}
