//! Model metadata: the list, and one model in detail.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::AppState;
use crate::error::ApiError;
use crate::repository::ModelEntry;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/models", get(list)).route("/v1/models/{name}", get(detail))
}

fn summary(model: &ModelEntry) -> Value {
    let (status, reason) = model.status();
    let mut value = json!({"name": model.name, "status": status});
    if let Some(reason) = reason {
        value["reason"] = json!(reason);
    }
    if let Some(config) = &model.config {
        value["task"] = json!(config.task);
        value["format"] = json!(config.format);
        value["input"] = json!(config.input);
        value["provenance"] = json!(config.provenance);
    }
    value
}

async fn list(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"models": state.repository.iter().map(|m| summary(m)).collect::<Vec<_>>()}))
}

async fn detail(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let model = state.repository.get(&name).ok_or_else(|| ApiError::ModelNotFound(name.clone()))?;
    let mut value = summary(model);
    if let Some(config) = &model.config {
        value["labels_count"] = json!(model.labels.len());
        value["output"] = json!(config.output);
        value["runtime"] = json!(config.runtime);
        value["batching"] = json!(config.batching);
        value["parameter_count"] = json!(model.parameter_count());
        value["file_size_bytes"] = json!(model.file_size);
    }
    Ok(Json(value))
}
