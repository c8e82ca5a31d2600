//! TorchServe's management API, as TorchServe documents it, so TorchServe's tooling manages
//! models here unchanged: `GET /models[?limit=N&next_page_token=T]`,
//! `GET /models/{name}[/{version}|/all]`, `POST /models?url=<folder>` (register = load),
//! `PUT /models/{name}[/{version}][?min_worker=N&max_worker=M&synchronous=true]` (scale; every
//! parameter optional, 202 unless synchronous), `PUT /models/{name}/{version}/set-default`,
//! `DELETE /models/{name}[/{version}]` (unregister = unload). Bad parameters are 400, as in
//! TorchServe. Behind the admin token (`api::router`).
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

/// TorchServe's default page size.
const DEFAULT_LIMIT: usize = 100;

/// The models in name order, a page at a time: `limit` (default 100) from `next_page_token`
/// (an offset, as TorchServe's token is); `nextPageToken` when more follow.
async fn list(State(state): State<AppState>, Query(query): Query<HashMap<String, String>>) -> Result<Json<Value>, ApiError> {
    let number = |key: &str, default: usize, least: usize| match query.get(key) {
        None => Ok(default),
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= least)
            .ok_or_else(|| ApiError::BadRequest(format!("'{key}' must be an integer of at least {least}, got '{raw}'"))),
    };
    let limit = number("limit", DEFAULT_LIMIT, 1)?;
    let start = number("next_page_token", 0, 0)?;
    let mut families = state.repository.families();
    families.sort_by(|a, b| a.name.cmp(&b.name));
    let page: Vec<Value> = families.iter().skip(start).take(limit).map(|f| json!({"modelName": f.name, "modelUrl": f.name})).collect();
    let mut answer = json!({"models": page});
    if start + limit < families.len() {
        answer["nextPageToken"] = json!((start + limit).to_string());
    }
    Ok(Json(answer))
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

/// One version, or every version (no version, or TorchServe's `all`).
async fn describe(State(state): State<AppState>, model: ModelPath) -> Result<Json<Value>, ApiError> {
    let version = model.version().filter(|v| *v != "all");
    version_description(&state, &model.name, version).map(|v| Json(json!(v)))
}

/// TorchServe's `synchronous`: `true` or `false` (the default).
fn synchronous(query: &HashMap<String, String>) -> Result<bool, ApiError> {
    match query.get("synchronous").map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ApiError::BadRequest(format!("'synchronous' must be true or false, got '{other}'"))),
    }
}

/// Loads the folder `url` names (the model's folder in the repository; a `.mar` suffix is
/// dropped). TorchServe's other parameters are accepted; `initial_workers` keeps that many
/// executors for it (as `min_worker`). The load is done before the answer, so it is 200 either
/// way.
async fn register(State(state): State<AppState>, Query(query): Query<HashMap<String, String>>) -> Result<Response, ApiError> {
    let name = query
        .get("url")
        .or_else(|| query.get("model_name"))
        .ok_or_else(|| ApiError::BadRequest("parameter 'url' (the model's folder in the repository) is required".into()))?
        .trim_end_matches(".mar")
        .to_string();
    synchronous(&query)?;
    let initial = query.get("initial_workers").map(|raw| worker_count("initial_workers", raw)).transpose()?;
    let versions = load(&state, name.clone()).await.map_err(ApiError::BadRequest)?;
    if let Some(reserved) = initial {
        state.repository.scale(&name, None, reserved, None).map_err(|e| scale_error(&name, e))?;
    }
    let message = format!("Model \"{name}\" Version: {} registered", versions.join(", "));
    Ok((StatusCode::OK, Json(json!({"status": message}))).into_response())
}

fn worker_count(key: &str, raw: &str) -> Result<usize, ApiError> {
    raw.parse::<usize>()
        .ok()
        .filter(|n| *n <= 64)
        .ok_or_else(|| ApiError::BadRequest(format!("'{key}' must be an integer within 0..=64, got '{raw}'")))
}

/// TorchServe's scale parameters in pool terms, every one optional as in TorchServe:
/// `min_worker` (default 1) executors kept for the model whenever it has work — 0 keeps none,
/// TorchServe's scale to zero: the version then runs on whatever the shared pool has free —
/// and `max_worker` the most it may use at once (unchanged when absent).
fn share_params(query: &HashMap<String, String>) -> Result<(usize, Option<usize>), ApiError> {
    let reserved = query.get("min_worker").map(|raw| worker_count("min_worker", raw)).transpose()?.unwrap_or(1);
    let cap = query.get("max_worker").map(|raw| worker_count("max_worker", raw)).transpose()?;
    if let Some(cap) = cap.filter(|&cap| cap < reserved) {
        return Err(ApiError::BadRequest(format!("'max_worker' ({cap}) must not be below 'min_worker' ({reserved})")));
    }
    if cap == Some(0) {
        return Err(ApiError::BadRequest("'max_worker' must be at least 1: a version that may use no executor cannot answer".into()));
    }
    if let Some(raw) = query.get("timeout") {
        raw.parse::<i64>().map_err(|_| ApiError::BadRequest(format!("'timeout' must be an integer, got '{raw}'")))?;
    }
    Ok((reserved, cap))
}

fn scale_error(name: &str, e: ScaleError) -> ApiError {
    match e {
        ScaleError::Lookup(e) => ApiError::from(e),
        ScaleError::NotReady(reason) => ApiError::Conflict(format!("model '{name}' cannot be scaled now: {reason}; load it first")),
    }
}

/// Takes effect for the next batch. TorchServe answers 202 ("Processing worker updates...")
/// unless the call is synchronous; the change here is made before either answer.
async fn scale(State(state): State<AppState>, model: ModelPath, Query(query): Query<HashMap<String, String>>) -> Result<Response, ApiError> {
    let (name, version) = (&model.name, model.version());
    let (reserved, cap) = share_params(&query)?;
    let wait = synchronous(&query)?;
    let cap = state.repository.scale(name, version, reserved, cap).map_err(|e| scale_error(name, e))?;
    if !wait {
        return Ok((StatusCode::ACCEPTED, Json(json!({"status": "Processing worker updates..."}))).into_response());
    }
    let message = format!("Workers scaled to {reserved} for model: {name} ({reserved} executors kept, at most {cap} at once)");
    Ok(Json(json!({"status": message})).into_response())
}

async fn set_default(State(state): State<AppState>, Path((name, version)): Path<(String, String)>) -> Result<Json<Value>, ApiError> {
    state.repository.set_default_version(&name, &version)?;
    Ok(Json(json!({"status": format!("Default version successfully updated for model \"{name}\" to \"{version}\"")})))
}

async fn unregister(State(state): State<AppState>, model: ModelPath) -> Result<Json<Value>, ApiError> {
    unload(&state, &model.name, model.version()).map_err(ApiError::from)?;
    Ok(Json(json!({"status": format!("Model \"{}\" unregistered", model.name)})))
}
