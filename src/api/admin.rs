//! Model management, off unless an admin token is configured and always behind it, in the two
//! shapes existing tooling speaks:
//! - Triton's model repository extension: `POST /v2/repository/index`,
//!   `POST /v2/repository/models/{name}/load` (loads, or reloads a loaded model),
//!   `POST /v2/repository/models/{name}/unload`;
//! - TorchServe's management API: `GET /models`, `GET /models/{name}[/{version}]`,
//!   `POST /models?url=<folder>` (register = load), `PUT /models/{name}[/{version}]?min_worker=N`
//!   (scale), `PUT /models/{name}/{version}/set-default`, `DELETE /models/{name}[/{version}]`
//!   (unregister = unload).
//!
//! A load reads the model's folder again, loads and warms every version on a blocking thread,
//! then swaps the model in at once: requests in flight finish on the old version. A failed
//! load swaps nothing.

use std::collections::HashMap;

use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth::{bearer_token, check_admin_token, refuse, Refusal};
use super::model_path::ModelPath;
use super::v2::V2Error;
use super::AppState;
use crate::error::ApiError;
use crate::repository::{LookupError, ModelStatus, ScaleError, StatusReport};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/repository/index", post(index))
        .route("/v2/repository/models/{name}/load", post(triton_load))
        .route("/v2/repository/models/{name}/unload", post(triton_unload))
        .route("/models", get(list).post(register))
        .route("/models/{name}", get(describe).put(scale).delete(unregister))
        .route("/models/{name}/{version}", get(describe).put(scale).delete(unregister))
        .route("/models/{name}/{version}/set-default", put(set_default))
}

/// Whether a path belongs to the management API.
pub fn is_management(path: &str) -> bool {
    path.starts_with("/v2/repository/") || path == "/v2/repository" || path == "/models" || path.starts_with("/models/")
}

/// Management routes need the admin token; with none configured they are off.
pub async fn require_admin_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !is_management(request.uri().path()) {
        return next.run(request).await;
    }
    match check_admin_token(&state, bearer_token(request.headers())) {
        Ok(()) => next.run(request).await,
        Err(Refusal::ManagementOff) => refuse(StatusCode::FORBIDDEN, "management_disabled", MANAGEMENT_OFF),
        Err(Refusal::Missing) => {
            refuse(StatusCode::UNAUTHORIZED, "unauthorized", "management routes need the admin token: Authorization: Bearer <token>")
        }
        Err(Refusal::Invalid) => refuse(StatusCode::FORBIDDEN, "forbidden", "the admin token is not valid"),
    }
}

pub const MANAGEMENT_OFF: &str = "the management API is off: start the server with --admin-token or --admin-token-file";

fn state_name(status: ModelStatus) -> &'static str {
    match status {
        ModelStatus::Ready => "READY",
        ModelStatus::Loading => "LOADING",
        ModelStatus::Failed | ModelStatus::Unloaded | ModelStatus::OnDemand => "UNAVAILABLE",
    }
}

/// One row of Triton's repository index.
pub struct IndexRow {
    pub name: String,
    pub version: Option<String>,
    pub state: &'static str,
    pub reason: Option<String>,
}

/// Every version of every model in the repository map, then (unless only ready ones are
/// asked for) folders on disk not yet in it: the index both REST and gRPC answer.
pub async fn repository_index(state: &AppState, ready_only: bool) -> Vec<IndexRow> {
    let mut rows = Vec::new();
    for entry in state.repository.entries() {
        let report = entry.status();
        if ready_only && !report.is_ready() {
            continue;
        }
        rows.push(IndexRow {
            name: entry.name.clone(),
            version: Some(entry.version.clone()),
            state: state_name(report.status),
            reason: report.reason,
        });
    }
    if !ready_only {
        let repository = state.repository.clone();
        let unlisted = tokio::task::spawn_blocking(move || repository.unlisted_on_disk()).await.unwrap_or_default();
        for name in unlisted {
            rows.push(IndexRow { name, version: None, state: "UNAVAILABLE", reason: Some("not loaded".into()) });
        }
    }
    rows
}

async fn index(State(state): State<AppState>, body: axum::body::Bytes) -> Result<Json<Value>, V2Error> {
    let ready_only = if body.is_empty() {
        false
    } else {
        let request: Value = serde_json::from_slice(&body).map_err(|e| V2Error::bad(format!("malformed index request: {e}")))?;
        match request.get("ready") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(V2Error::bad("'ready' must be true or false")),
        }
    };
    let models = repository_index(&state, ready_only)
        .await
        .into_iter()
        .map(|row| {
            let mut model = json!({"name": row.name});
            if let Some(version) = row.version {
                model["version"] = json!(version);
            }
            model["state"] = json!(row.state);
            if let Some(reason) = row.reason {
                model["reason"] = json!(reason);
            }
            model
        })
        .collect();
    Ok(Json(Value::Array(models)))
}

/// Loads (or reloads) on a blocking thread; the admin lock serialises loads. The model's
/// cached answers go (they are of the versions it replaces).
pub async fn load(state: &AppState, name: String) -> Result<Vec<String>, String> {
    let repository = state.repository.clone();
    let model = name.clone();
    let loaded = tokio::task::spawn_blocking(move || repository.load(&name))
        .await
        .unwrap_or_else(|e| Err(format!("the load failed: {e}")));
    if let (Ok(_), Some(cache)) = (&loaded, &state.cache) {
        cache.invalidate(&model);
    }
    loaded
}

/// Stops serving one version of a model, or all, and drops its cached answers.
pub fn unload(state: &AppState, name: &str, version: Option<&str>) -> Result<(), LookupError> {
    state.repository.unload(name, version)?;
    if let Some(cache) = &state.cache {
        cache.invalidate(name);
    }
    Ok(())
}

async fn triton_load(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>, V2Error> {
    load(&state, name).await.map(|_| Json(json!({}))).map_err(V2Error::bad)
}

async fn triton_unload(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>, V2Error> {
    unload(&state, &name, None)
        .map(|()| Json(json!({})))
        .map_err(|e| V2Error::from(ApiError::from(e)))
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

#[cfg(test)]
mod tests {
    use super::is_management;

    #[test]
    fn management_paths_are_recognised() {
        for path in ["/models", "/models/resnet18", "/models/resnet18/2/set-default", "/v2/repository/index", "/v2/repository/models/x/load"] {
            assert!(is_management(path), "{path}");
        }
        for path in ["/v1/models", "/v2/models/x", "/modelsx", "/predictions/x"] {
            assert!(!is_management(path), "{path}");
        }
    }
}
