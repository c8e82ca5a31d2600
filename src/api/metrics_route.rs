//! `GET /metrics`: Prometheus text. Gauges that describe the present (queue depth, readiness)
//! are read at scrape time, so they are never stale.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::{inference_model, AppState};
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

/// Counts every inference request (all three protocols) by model and status, extractor
/// rejections included, times it whole, and keeps the in-flight gauge honest even when the
/// client goes away mid-request. Other routes pass through untouched.
pub async fn track_inference(request: Request, next: Next) -> Response {
    let Some(model) = inference_model(request.uri().path()).map(str::to_string) else {
        return next.run(request).await;
    };
    let in_flight = metrics::gauge!(m::IN_FLIGHT, "model" => model.clone());
    in_flight.increment(1.0);
    struct Leave(metrics::Gauge);
    impl Drop for Leave {
        fn drop(&mut self) {
            self.0.decrement(1.0);
        }
    }
    let _leave = Leave(in_flight);
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(m::REQUESTS, "model" => model.clone(), "status" => status).increment(1);
    metrics::histogram!(m::REQUEST_SECONDS, "model" => model).record(m::seconds(started.elapsed()));
    response
}
