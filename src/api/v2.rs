//! The Open Inference Protocol over REST (KServe V2, Triton's HTTP API): health, metadata,
//! readiness and inference as JSON, with the binary tensor data extension. A shell over the
//! protocol's shared part (`serve::oip`), which gRPC uses too.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::input::body_bytes;
use super::model_path::ModelPath;
use super::AppState;
use crate::error::ApiError;
use crate::serve::oip::config::{model_configuration, ModelConfiguration};
use crate::repository::DurationTotal;
use crate::serve::oip::statistics::{statistics, VersionStatistics};
use crate::serve::oip::{self, tensors, TensorSpec, EXTENSIONS};
use crate::serve::{manage, RequestContext};

const HEADER_LENGTH: HeaderName = HeaderName::from_static("inference-header-content-length");

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(|| async { Json(json!({"live": true})) }))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/versions/{version}/ready", get(model_ready))
        .route("/v2/models/{name}/config", get(model_config))
        .route("/v2/models/{name}/versions/{version}/config", get(model_config))
        .route("/v2/models/stats", get(all_statistics))
        .route("/v2/models/{name}/stats", get(model_statistics))
        .route("/v2/models/{name}/versions/{version}/stats", get(model_statistics))
}

/// Triton's model repository extension, behind the admin token (`api::router`):
/// `POST /v2/repository/index`, `POST /v2/repository/models/{name}/load` (loads, or reloads a
/// loaded model), `POST /v2/repository/models/{name}/unload`.
pub fn management_routes() -> Router<AppState> {
    Router::new()
        .route("/v2/repository/index", post(index))
        .route("/v2/repository/models/{name}/load", post(triton_load))
        .route("/v2/repository/models/{name}/unload", post(triton_unload))
}

pub fn inference_routes() -> Router<AppState> {
    Router::new()
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer))
}

/// The service's one error, rendered in the V2 shape, `{"error": "..."}`, with Triton's
/// mapping: not found 404, unavailable 503 (with `Retry-After`), internal 500, deadline 504,
/// everything else 400 — except a body over the limit (413) and a wrong method (405), which
/// keep their own status so a client can tell them from a bad request.
pub struct V2Error(ApiError);

impl From<ApiError> for V2Error {
    fn from(e: ApiError) -> Self {
        V2Error(e)
    }
}

impl V2Error {
    /// A request the protocol refuses: 400.
    pub fn bad(message: impl Into<String>) -> V2Error {
        V2Error(ApiError::BadRequest(message.into()))
    }
}

impl IntoResponse for V2Error {
    fn into_response(self) -> Response {
        let status = match self.0.status() {
            status @ (StatusCode::NOT_FOUND
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::INTERNAL_SERVER_ERROR
            | StatusCode::GATEWAY_TIMEOUT
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::METHOD_NOT_ALLOWED) => status,
            _ => StatusCode::BAD_REQUEST,
        };
        self.0.log();
        let mut response = error_response(status, &self.0.to_string());
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// V2's error body, `{"error": "<message>"}`: what `tritonclient` and KServe's SDK read (a
/// nested object makes `tritonclient.http` fail formatting it). Also for the errors made
/// outside this module's handlers on `/v2` paths: credentials refused, unknown routes.
pub fn error_response(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

/// V2's paths (`/v2` and below), whose errors all take V2's shape.
pub fn is_v2_path(path: &str) -> bool {
    path == "/v2" || path.starts_with("/v2/")
}

/// A body the V2 handlers could not read: too large (413) or cut off (400), in V2's shape.
pub struct V2Body(pub Bytes);

impl axum::extract::FromRequest<AppState> for V2Body {
    type Rejection = V2Error;

    async fn from_request(request: axum::extract::Request, state: &AppState) -> Result<Self, Self::Rejection> {
        Ok(V2Body(body_bytes(request, state, state.limits.max_body_bytes).await?))
    }
}

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "visionserve",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": EXTENSIONS
    }))
}

/// The repository's one readiness rule, in V2's shape.
async fn server_ready(State(state): State<AppState>) -> Response {
    let ready = state.repository.readiness().is_ready();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({"ready": ready}))).into_response()
}

fn spec_json(spec: &TensorSpec) -> Value {
    json!({"name": spec.name, "datatype": spec.datatype, "shape": spec.shape})
}

async fn model_metadata(State(state): State<AppState>, model: ModelPath) -> Result<Json<Value>, V2Error> {
    let servable = state.repository.lookup(&model.name, model.version()).map_err(ApiError::from)?;
    let metadata = oip::model_metadata(&state, servable)?;
    Ok(Json(json!({
        "name": metadata.name,
        "versions": metadata.versions,
        "platform": metadata.platform,
        "inputs": metadata.inputs.iter().map(spec_json).collect::<Vec<_>>(),
        "outputs": metadata.outputs.iter().map(spec_json).collect::<Vec<_>>(),
        "parameters": metadata.parameters,
    })))
}

async fn model_ready(State(state): State<AppState>, model: ModelPath) -> Result<Response, V2Error> {
    let servable = state.repository.lookup(&model.name, model.version()).map_err(ApiError::from)?;
    let is_ready = state.repository.is_ready(&servable);
    let status = if is_ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    Ok((status, Json(json!({"name": model.name, "ready": is_ready}))).into_response())
}

/// Triton's model configuration, in the JSON shape Triton's HTTP endpoint gives it.
async fn model_config(State(state): State<AppState>, model: ModelPath) -> Result<Json<Value>, V2Error> {
    let servable = state.repository.lookup(&model.name, model.version()).map_err(ApiError::from)?;
    Ok(Json(config_json(&model_configuration(&state, servable)?)))
}

fn config_json(c: &ModelConfiguration) -> Value {
    let tensor = |t: &oip::config::ConfigTensor| {
        let mut object = json!({"name": t.name, "data_type": t.data_type, "dims": t.dims});
        if let Some(format) = t.format {
            object["format"] = json!(format);
        }
        if let Some(labels) = &t.label_filename {
            object["label_filename"] = json!(labels);
        }
        object
    };
    let mut config = json!({
        "name": c.name,
        "platform": c.platform,
        "backend": c.backend,
        "version_policy": {"all": {}},
        "max_batch_size": c.max_batch_size,
        "input": c.inputs.iter().map(tensor).collect::<Vec<_>>(),
        "output": c.outputs.iter().map(tensor).collect::<Vec<_>>(),
        "default_model_filename": c.default_model_filename,
        "parameters": c.parameters.iter().map(|(k, v)| (k.clone(), json!({"string_value": v}))).collect::<Map<_, _>>(),
    });
    if let Some(batching) = c.dynamic_batching {
        config["dynamic_batching"] = json!({
            "preferred_batch_size": [batching.preferred_batch_size],
            "max_queue_delay_microseconds": batching.max_queue_delay_microseconds,
        });
    }
    if let Some(group) = &c.instance_group {
        config["instance_group"] = json!([{"name": group.name, "kind": group.kind, "count": group.count, "gpus": group.gpus}]);
    }
    config
}

async fn all_statistics(State(state): State<AppState>) -> Result<Json<Value>, V2Error> {
    Ok(Json(statistics_json(statistics(&state, None, None)?)))
}

async fn model_statistics(State(state): State<AppState>, model: ModelPath) -> Result<Json<Value>, V2Error> {
    Ok(Json(statistics_json(statistics(&state, Some(&model.name), model.version())?)))
}

fn duration_json(total: DurationTotal) -> Value {
    json!({"count": total.count, "ns": total.ns})
}

fn statistics_json(rows: Vec<VersionStatistics>) -> Value {
    let rows: Vec<Value> = rows
        .into_iter()
        .map(|row| {
            let stats: Map<String, Value> = row.inference_stats.iter().map(|(name, total)| (name.to_string(), duration_json(*total))).collect();
            json!({
                "name": row.name,
                "version": row.version,
                "last_inference": row.last_inference,
                "inference_count": row.inference_count,
                "execution_count": row.execution_count,
                "inference_stats": stats,
                "batch_stats": row.batch_stats.iter().map(|b| json!({
                    "batch_size": b.batch_size,
                    "compute_input": duration_json(b.compute_input),
                    "compute_infer": duration_json(b.compute_infer),
                    "compute_output": duration_json(b.compute_output),
                })).collect::<Vec<_>>(),
                // Host memory (see `VersionStatistics::memory_bytes`), Triton's "CPU" kind.
                "memory_usage": row.memory_bytes.map(|bytes| json!({"type": "CPU", "id": 0, "byte_size": bytes})).into_iter().collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"model_stats": rows})
}

/// Parse the body → the shared tensor path → JSON, or JSON and binary data.
async fn infer(State(state): State<AppState>, model: ModelPath, headers: HeaderMap, V2Body(body): V2Body) -> Result<Response, V2Error> {
    let context = RequestContext::from_headers(&headers, state.limits.request_timeout_ms)?;
    let header_length = match headers.get(HEADER_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| V2Error::bad("Inference-Header-Content-Length must be a byte count"))?,
        ),
    };
    // Unknown model and version are 404 whatever the body holds.
    let servable = state.repository.lookup(&model.name, model.version()).map_err(ApiError::from)?;
    let request = tensors::parse_request(body, header_length).map_err(V2Error::bad)?;
    let answer = oip::infer(&state, servable, request, &context).await?;
    let mut head = Map::new();
    head.insert("model_name".into(), json!(answer.model_name));
    head.insert("model_version".into(), json!(answer.model_version));
    if let Some(id) = &answer.id {
        head.insert("id".into(), json!(id));
    }
    let (body, json_length) = tensors::encode_response(head, &answer.outputs);
    let response = match json_length {
        Some(length) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")), (HEADER_LENGTH, HeaderValue::from(length))],
            body,
        )
            .into_response(),
        None => ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response(),
    };
    Ok((answer.timing_headers, response).into_response())
}

async fn index(State(state): State<AppState>, V2Body(body): V2Body) -> Result<Json<Value>, V2Error> {
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
    let models = manage::repository_index(&state, ready_only)
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

async fn triton_load(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>, V2Error> {
    manage::load(&state, name).await.map(|_| Json(json!({}))).map_err(V2Error::bad)
}

async fn triton_unload(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>, V2Error> {
    manage::unload(&state, &name, None)
        .map(|()| Json(json!({})))
        .map_err(|e| V2Error::from(ApiError::from(e)))
}

