//! TorchServe's management API, so TorchServe's tooling manages models here unchanged:
//! `GET /models`, `GET /models/{name}[/{version}]`, `POST /models?url=<folder>` (register =
//! load), `PUT /models/{name}[/{version}]?min_worker=N` (scale),
//! `PUT /models/{name}/{version}/set-default`, `DELETE /models/{name}[/{version}]`
//! (unregister = unload). Behind the admin token (`api::router`).
//!
//! A load reads the model's folder again, loads and warms every version on a blocking thread,
//! then swaps the model in at once: requests in flight finish on the old version. A failed
//! load swaps nothing.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::api::model_path::ModelPath;
use crate::api::AppState;
use crate::error::ApiError;
use crate::repository::{ScaleError, StatusReport};
use crate::serve::manage::{load, unload};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/models", get(list).post(register))
        .route("/models/{name}", get(describe).put(scale).delete(unregister))
        .route("/models/{name}/{version}", get(describe).put(scale).delete(unregister))
        .route("/models/{name}/{version}/set-default", put(set_default))
}

async fn list(State(state): State<AppState>) -> Json<Value> {
    let models: Vec<Value> = state
        .repository
        .families()
        .iter()
        .map(|f| json!({"modelName": f.name, "modelUrl": f.name}))
        .collect();
    Json(json!({"models": models}))
}

fn version_description(state: &AppState, name: &str, version: Option<&str>) -> Result<Vec<Value>, ApiError> {
    let family = state.repository.family(name).ok_or_else(|| ApiError::ModelNotFound(name.to_string()))?;
    let entries = match version {
        Some(v) => vec![state.repository.get(name, Some(v))?],
        None => family.versions.values().cloned().collect(),
    };
    Ok(entries
        .iter()
        .map(|entry| {
            let StatusReport { status, reason } = entry.status();
            let batching = entry.config.as_ref().map(|c| c.batching.clone());
            json!({
                "modelName": entry.name,
                "modelVersion": entry.version,
                "modelUrl": entry.dir.file_name().map(|n| n.to_string_lossy().into_owned()),
                "isDefault": entry.version == family.default_version,
                "status": status,
                "reason": reason,
                "minWorkers": entry.reserved_executors(),
                "maxWorkers": entry.workers(),
                "batchSize": batching.as_ref().map(|b| b.max_batch_size),
                "maxBatchDelay": batching.as_ref().map(|b| b.max_delay_ms),
                "workers": (0..entry.workers()).map(|i| json!({"id": i, "status": "READY"})).collect::<Vec<_>>(),
            })
        })
        .collect())
}

async fn describe(State(state): State<AppState>, model: ModelPath) -> Result<Json<Value>, ApiError> {
    version_description(&state, &model.name, model.version()).map(|v| Json(json!(v)))
}

async fn register(State(state): State<AppState>, Query(query): Query<HashMap<String, String>>) -> Result<Response, ApiError> {
    let name = query
        .get("url")
        .or_else(|| query.get("model_name"))
        .ok_or_else(|| ApiError::InvalidParameter("parameter 'url' (the model's folder in the repository) is required".into()))?
        .trim_end_matches(".mar")
        .to_string();
    let versions = load(&state, name.clone()).await.map_err(ApiError::BadRequest)?;
    let message = format!("Model \"{name}\" Version: {} registered", versions.join(", "));
    Ok((StatusCode::OK, Json(json!({"status": message}))).into_response())
}

/// TorchServe's scale parameters in pool terms: `min_worker` executors kept for the model
/// whenever it has work (required), `max_worker` the most it may use at once (optional).
fn share_params(query: &HashMap<String, String>) -> Result<(usize, Option<usize>), ApiError> {
    let count = |key: &str, raw: &String| {
        raw.parse::<usize>()
            .ok()
            .filter(|n| (1..=64).contains(n))
            .ok_or_else(|| ApiError::InvalidParameter(format!("'{key}' must be an integer within 1..=64, got '{raw}'")))
    };
    let raw = query
        .get("min_worker")
        .ok_or_else(|| ApiError::InvalidParameter("parameter 'min_worker' (executors kept for the model, 1..=64) is required".into()))?;
    let reserved = count("min_worker", raw)?;
    let cap = query.get("max_worker").map(|raw| count("max_worker", raw)).transpose()?;
    if let Some(cap) = cap.filter(|&cap| cap < reserved) {
        return Err(ApiError::InvalidParameter(format!("'max_worker' ({cap}) must not be below 'min_worker' ({reserved})")));
    }
    Ok((reserved, cap))
}

async fn scale(State(state): State<AppState>, model: ModelPath, Query(query): Query<HashMap<String, String>>) -> Result<Json<Value>, ApiError> {
    let (name, version) = (&model.name, model.version());
    let (reserved, cap) = share_params(&query)?;
    let cap = state.repository.scale(name, version, reserved, cap).map_err(|e| match e {
        ScaleError::Lookup(e) => ApiError::from(e),
        ScaleError::NotReady(reason) => ApiError::Conflict(format!("model '{name}' cannot be scaled now: {reason}; load it first")),
    })?;
    Ok(Json(json!({"status": format!("Model \"{name}\" now has {reserved} executors kept and at most {cap} at once")})))
}

async fn set_default(State(state): State<AppState>, Path((name, version)): Path<(String, String)>) -> Result<Json<Value>, ApiError> {
    state.repository.set_default_version(&name, &version)?;
    Ok(Json(json!({"status": format!("Default version successfully updated for model \"{name}\" to \"{version}\"")})))
}

async fn unregister(State(state): State<AppState>, model: ModelPath) -> Result<Json<Value>, ApiError> {
    unload(&state, &model.name, model.version()).map_err(ApiError::from)?;
    Ok(Json(json!({"status": format!("Model \"{}\" unregistered", model.name)})))
}
