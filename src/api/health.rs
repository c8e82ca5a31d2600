//! Liveness and readiness. Live means the process answers; ready is the repository's one
//! readiness rule (`ModelRepository::readiness`), which V2's and TorchServe's health routes
//! answer with too. A model that failed keeps readiness false and is named with its reason.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/health/live", get(live)).route("/health/ready", get(ready))
}

async fn live() -> impl IntoResponse {
    Json(json!({"status": "live"}))
}

async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let readiness = state.repository.readiness();
    if readiness.is_ready() {
        (StatusCode::OK, Json(json!({"status": "ready", "models": readiness.ready})))
    } else {
        let reason = readiness.reason();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "ready": readiness.ready, "not_ready": readiness.not_ready, "reason": reason})),
        )
    }
}
