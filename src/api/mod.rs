//! The network surface: protocol shells over the serving core (`crate::serve`). Each shell
//! parses its wire format into the core's request and shapes the core's answer; no shell
//! imports another. REST: each module exposes its routes, merged here under one state and one
//! stack of layers (request id, tracing, body limit) with a JSON fallback for unknown routes;
//! inference routes and management routes are sub-routers, each behind its own credential
//! layer. gRPC (`grpc`) is its own router on its own listener, over the same core.

pub(crate) mod auth;
mod docs;
pub mod grpc;
mod health;
pub(crate) mod metrics_route;
pub(crate) mod model_path;
pub mod input;
mod models;
mod pipeline_v1;
mod predict;
pub(crate) mod streams;
mod torchserve;
mod unread_body;
mod video;
pub mod v2;
mod web;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use metrics_exporter_prometheus::PrometheusHandle;
use axum::http::{HeaderName, Request, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower::{Layer, ServiceBuilder};
use tower_http::compression::predicate::{DefaultPredicate, NotForContentType, Predicate};
use tower_http::compression::CompressionLayer;
use tower_http::decompression::RequestDecompressionLayer;
use tower_http::normalize_path::NormalizePathLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::error::ApiError;
use crate::repository::ModelRepository;
use crate::serve::Core;

pub use crate::serve::RequestLimits;
pub(crate) use docs::OPENAPI_JSON;

/// Everything a handler needs, cheap to clone: the serving core (which it derefs to) and what
/// only the network surface uses.
#[derive(Clone)]
pub struct AppState {
    pub core: Core,
    pub metrics: PrometheusHandle,
    /// Keys inference routes require; empty means open.
    pub api_keys: Arc<Vec<String>>,
    /// Token management routes require; `None` turns them off.
    pub admin_token: Option<Arc<String>>,
}

impl std::ops::Deref for AppState {
    type Target = Core;

    fn deref(&self) -> &Core {
        &self.core
    }
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
    video: crate::serve::video::VideoSettings,
    streams: crate::serve::streams::StreamSettings,
}

impl AppStateBuilder {
    /// What live streams may open; unset, streams are off.
    pub fn streams(mut self, settings: crate::serve::streams::StreamSettings) -> Self {
        self.streams = settings;
        self
    }

    /// FFmpeg's place and the video limits; unset, `ffmpeg` on `PATH` and the defaults.
    pub fn video(mut self, settings: crate::serve::video::VideoSettings) -> Self {
        self.video = settings;
        self
    }

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
        let mut core = Core::new(self.repository, self.limits, self.cpu_threads, self.response_cache_bytes);
        core.video = Arc::new(self.video);
        core.streams = Arc::new(crate::serve::streams::Streams::new(self.streams));
        AppState {
            core,
            metrics: crate::metrics::handle(),
            api_keys: Arc::new(self.api_keys),
            admin_token: self.admin_token.map(Arc::new),
        }
    }
}

impl AppState {
    pub fn builder(repository: Arc<ModelRepository>, limits: RequestLimits) -> AppStateBuilder {
        AppStateBuilder { repository, limits, cpu_threads: 1, api_keys: Vec::new(), admin_token: None, response_cache_bytes: 0, video: Default::default(), streams: Default::default() }
    }
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn router(state: AppState) -> Router {
    let body_limit = state.limits.max_body_bytes;
    // Each credential guards its own sub-router, so a route is guarded by being put there,
    // not by matching a list of paths; each protocol's inference routes are counted in the
    // request metrics under its name, refusals of the key included.
    let inference_of = |routes: Router<AppState>, protocol: &'static str| {
        routes
            .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_api_key))
            .route_layer(axum::middleware::from_fn_with_state(protocol, metrics_route::track_inference))
    };
    let inference = Router::new()
        .merge(inference_of(predict::inference_routes(), "v1"))
        .merge(inference_of(streams::routes(), "v1"))
        .merge(inference_of(v2::inference_routes(), "v2"))
        .merge(inference_of(torchserve::inference_routes(), "torchserve"))
        .merge(inference_of(torchserve::kserve_routes(), "kserve_v1"));
    let management = Router::new()
        .merge(v2::management_routes())
        .merge(torchserve::management_routes())
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_admin_token));
    let app = Router::new()
        .merge(health::router())
        .merge(metrics_route::router())
        .merge(models::router())
        .merge(web::router())
        .merge(v2::router())
        .merge(torchserve::router())
        .merge(docs::router())
        .merge(inference)
        .merge(management)
        .fallback(|uri: Uri| async move { in_route_shape(&uri, ApiError::NotFound("no such route".into())) })
        .method_not_allowed_fallback(|uri: Uri| async move {
            in_route_shape(&uri, ApiError::MethodNotAllowed("method not allowed on this route".into()))
        })
        // `Content-Encoding: gzip` or `deflate` bodies are read decompressed, and the body
        // limit counts decompressed bytes, so a small bomb is a 413, never memory; answers are
        // compressed when the client's `Accept-Encoding` asks (tritonclient, browsers).
        .layer(RequestDecompressionLayer::new())
        // Not a video's NDJSON lines: a compressor holds them back until its buffer fills,
        // and a frame's answer must leave when it is done (SSE is left alone by default).
        .layer(CompressionLayer::new().compress_when(DefaultPredicate::new().and(NotForContentType::const_new(video::NDJSON))))
        .layer(axum::middleware::from_fn_with_state(body_limit, unread_body::read_before_answering))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(|request: &Request<_>| {
                            let id = request.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
                            // Protocol and model are recorded once routing has found them
                            // (`metrics_route::track_inference`).
                            let span = request_span(id, request.method().as_str(), &request.uri().to_string(), "", "");
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
        .with_state(state);
    // `/models/` is `/models`, as TorchServe (and most servers) take it: the trailing slash is
    // trimmed before routing, on every route.
    Router::new().fallback_service(NormalizePathLayer::trim_trailing_slash().layer(app))
}

/// An error made outside any handler (an unknown route, a wrong method) in the shape of the
/// protocol the path belongs to.
fn in_route_shape(uri: &Uri, error: ApiError) -> Response {
    if v2::is_v2_path(uri.path()) { v2::V2Error::from(error).into_response() } else { error.into_response() }
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
        tiles = Empty,
        status = Empty,
        trace_id = Empty
    )
}
