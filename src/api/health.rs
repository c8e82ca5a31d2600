//! Liveness and readiness. Live means the process answers; ready means every model is loaded
//! and warm. A model that failed keeps readiness false and is named with its reason.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;
use crate::repository::{ModelStatus, FLAT_VERSION};

pub fn router() -> Router<AppState> {
    Router::new().route("/health/live", get(live)).route("/health/ready", get(ready))
}

async fn live() -> impl IntoResponse {
    Json(json!({"status": "live"}))
}

async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let mut ready = Vec::new();
    let mut not_ready = Vec::new();
    // Every version that should serve; models an admin unloaded (or --models left out) do not
    // hold readiness back.
    for model in state.repository.serving_entries() {
        let name = if model.version == FLAT_VERSION { model.name.clone() } else { format!("{}/{}", model.name, model.version) };
        match model.status() {
            (ModelStatus::Ready, _) => ready.push(name),
            (status, reason) => not_ready.push(json!({"name": name, "status": status, "reason": reason})),
        }
    }
    if not_ready.is_empty() && !ready.is_empty() {
        (StatusCode::OK, Json(json!({"status": "ready", "models": ready})))
    } else {
        let reason = if ready.is_empty() && not_ready.is_empty() { Some("the repository holds no model") } else { None };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "ready": ready, "not_ready": not_ready, "reason": reason})),
        )
    }
}
