//! `GET /metrics`: Prometheus text. Gauges that describe the present (queue depth, readiness)
//! are read at scrape time, so they are never stale.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::AppState;
use crate::metrics as m;
use crate::repository::ModelStatus;

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(render))
}

async fn render(State(state): State<AppState>) -> impl IntoResponse {
    for model in state.repository.iter() {
        let name = model.name.clone();
        let (status, _) = model.status();
        metrics::gauge!(m::MODEL_READY, "model" => name.clone()).set(if status == ModelStatus::Ready { 1.0 } else { 0.0 });
        let depth = model.runtime().map(|r| r.queue_depth()).unwrap_or(0);
        metrics::gauge!(m::QUEUE_DEPTH, "model" => name).set(depth as f64);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}
