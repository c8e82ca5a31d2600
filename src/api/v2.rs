//! Open Inference Protocol (KServe V2) over REST with JSON tensors: server and model metadata,
//! health, readiness and infer, so KServe, Triton clients and gateways can call visionserve.
//!
//! Inputs (exactly one per request): `BYTES [N]` of base64-encoded images, `UINT8 [N, H, W, 3]`
//! raw RGB pixels (both go through the model's preprocessing), or `FP32 [N, 3, H, W]` already
//! preprocessed (straight to the model). Outputs, by task: `scores FP32 [N, C]`;
//! `mask UINT8 [N, H, W]` (class per original pixel); `boxes FP32 [N, K, 4]`,
//! `scores FP32 [N, K]`, `classes INT64 [N, K]`, `num_detections INT32 [N]` after NMS, in
//! original pixels. Triton's classification extension (`"parameters": {"classification": k}`
//! on an output) answers `"score:index:label"` strings. Errors are `{"error": "..."}` with
//! Triton's status mapping. The binary tensor extension is not implemented yet.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::AppState;
use crate::engine::{JobOptions, ModelOutput};
use crate::error::ApiError;
use crate::image::{preprocess, DecodeLimits, Geometry, PreparedImage};
use crate::repository::config::{ModelConfig, ResizePolicy, Task};
use crate::repository::{ModelEntry, ModelStatus};
use crate::tasks::{classification, detection, segmentation};

/// The only version each model has until versioned repositories exist.
const VERSION: &str = "1";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(|| async { Json(json!({"live": true})) }))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata_versioned))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/versions/{version}/ready", get(model_ready_versioned))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_versioned))
}

/// An error in the V2 shape, `{"error": "..."}`, with Triton's mapping: not found 404,
/// unavailable 503, internal 500, deadline 504, everything else 400.
pub struct V2Error(StatusCode, String);

impl From<ApiError> for V2Error {
    fn from(e: ApiError) -> Self {
        let status = match e.status() {
            StatusCode::NOT_FOUND => StatusCode::NOT_FOUND,
            StatusCode::SERVICE_UNAVAILABLE => StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::INTERNAL_SERVER_ERROR => StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::GATEWAY_TIMEOUT => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_REQUEST,
        };
        if let ApiError::Internal(detail) = &e {
            tracing::error!(%detail, "internal error");
        }
        V2Error(status, e.to_string())
    }
}

fn bad(message: impl Into<String>) -> V2Error {
    V2Error(StatusCode::BAD_REQUEST, message.into())
}

impl IntoResponse for V2Error {
    fn into_response(self) -> Response {
        let mut response = (self.0, Json(json!({"error": self.1}))).into_response();
        if self.0 == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

async fn server_metadata() -> Json<Value> {
    Json(json!({"name": "visionserve", "version": env!("CARGO_PKG_VERSION"), "extensions": ["classification"]}))
}

async fn server_ready(State(state): State<AppState>) -> Response {
    let ready = state.repository.iter().next().is_some()
        && state.repository.iter().all(|m| m.status().0 == ModelStatus::Ready);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({"ready": ready}))).into_response()
}

fn model<'a>(state: &'a AppState, name: &str, version: Option<&str>) -> Result<&'a Arc<ModelEntry>, V2Error> {
    let entry = state.repository.get(name).ok_or_else(|| V2Error(StatusCode::NOT_FOUND, format!("model '{name}' is not in the repository")))?;
    if let Some(v) = version {
        if v != VERSION {
            return Err(V2Error(StatusCode::NOT_FOUND, format!("model '{name}' has no version '{v}' (only '{VERSION}')")));
        }
    }
    Ok(entry)
}

fn config_of(entry: &ModelEntry) -> Result<Arc<ModelConfig>, V2Error> {
    entry.config.clone().ok_or_else(|| {
        V2Error(StatusCode::SERVICE_UNAVAILABLE, format!("model '{}' is not ready: {}", entry.name, entry.status().1.unwrap_or_default()))
    })
}

fn tensor_spec(name: &str, datatype: &str, shape: &[i64]) -> Value {
    json!({"name": name, "datatype": datatype, "shape": shape})
}

async fn model_metadata(state: State<AppState>, Path(name): Path<String>) -> Result<Json<Value>, V2Error> {
    metadata(&state, &name, None)
}

async fn model_metadata_versioned(state: State<AppState>, Path((name, version)): Path<(String, String)>) -> Result<Json<Value>, V2Error> {
    metadata(&state, &name, Some(&version))
}

fn metadata(state: &AppState, name: &str, version: Option<&str>) -> Result<Json<Value>, V2Error> {
    let entry = model(state, name, version)?;
    let config = config_of(entry)?;
    let classes = entry.labels.len().max(1) as i64;
    let outputs = match config.task {
        Task::Classification => vec![tensor_spec("scores", "FP32", &[-1, classes])],
        Task::Segmentation => vec![tensor_spec("mask", "UINT8", &[-1, -1, -1])],
        Task::Detection => vec![
            tensor_spec("boxes", "FP32", &[-1, -1, 4]),
            tensor_spec("scores", "FP32", &[-1, -1]),
            tensor_spec("classes", "INT64", &[-1, -1]),
            tensor_spec("num_detections", "INT32", &[-1]),
        ],
    };
    Ok(Json(json!({
        "name": entry.name,
        "versions": [VERSION],
        "platform": "pytorch_torchscript",
        "inputs": [tensor_spec("image", "BYTES", &[-1])],
        "outputs": outputs,
        "parameters": {
            "task": config.task,
            "also_accepts": [
                {"datatype": "UINT8", "shape": [-1, -1, -1, 3], "meaning": "raw RGB pixels"},
                {"datatype": "FP32", "shape": [-1, 3, config.input.height, config.input.width], "meaning": "preprocessed input"}
            ]
        }
    })))
}

async fn model_ready(state: State<AppState>, Path(name): Path<String>) -> Result<Response, V2Error> {
    ready(&state, &name, None)
}

async fn model_ready_versioned(state: State<AppState>, Path((name, version)): Path<(String, String)>) -> Result<Response, V2Error> {
    ready(&state, &name, Some(&version))
}

fn ready(state: &AppState, name: &str, version: Option<&str>) -> Result<Response, V2Error> {
    let entry = model(state, name, version)?;
    let is_ready = entry.status().0 == ModelStatus::Ready;
    let status = if is_ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    Ok((status, Json(json!({"name": entry.name, "ready": is_ready}))).into_response())
}

#[derive(Deserialize)]
struct InferRequest {
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InferInput>,
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Deserialize)]
struct InferInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    data: Value,
}

#[derive(Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

async fn infer(state: State<AppState>, Path(name): Path<String>, body: Bytes) -> Result<Response, V2Error> {
    run_infer(state, name, None, body).await
}

async fn infer_versioned(state: State<AppState>, Path((name, version)): Path<(String, String)>, body: Bytes) -> Result<Response, V2Error> {
    run_infer(state, name, Some(version), body).await
}

fn flatten(value: &Value, out: &mut Vec<Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| flatten(v, out)),
        other => out.push(other.clone()),
    }
}

fn number_param(parameters: &Map<String, Value>, key: &str, default: f64, low: f64, high: f64) -> Result<f64, V2Error> {
    match parameters.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|x| (low..=high).contains(x))
            .ok_or_else(|| bad(format!("parameter '{key}' must be a number within {low}..={high}"))),
    }
}

async fn run_infer(State(state): State<AppState>, name: String, version: Option<String>, body: Bytes) -> Result<Response, V2Error> {
    let started = Instant::now();
    let entry = Arc::clone(model(&state, &name, version.as_deref())?);
    let config = config_of(&entry)?;
    let request: InferRequest = serde_json::from_slice(&body).map_err(|e| bad(format!("malformed inference request: {e}")))?;
    let [input] = request.inputs.as_slice() else {
        return Err(bad(format!("expected exactly one input, got {}", request.inputs.len())));
    };
    let runtime = entry.runtime().map_err(|reason| V2Error(StatusCode::SERVICE_UNAVAILABLE, format!("model '{name}' is not ready: {reason}")))?;
    if runtime.is_full() {
        return Err(ApiError::Overloaded(name).into());
    }
    let score_threshold = number_param(&request.parameters, "score_threshold", 0.5, 0.0, 1.0)? as f32;
    let iou_threshold = number_param(&request.parameters, "iou_threshold", 0.45, 0.0, 1.0)? as f32;
    let max_detections = number_param(&request.parameters, "max_detections", 100.0, 1.0, 10_000.0)? as usize;

    let mut values = Vec::new();
    flatten(&input.data, &mut values);
    let expected: i64 = input.shape.iter().product();
    if input.shape.iter().any(|&d| d < 0) || expected != values.len() as i64 {
        return Err(bad(format!("input '{}' has shape {:?} but {} values", input.name, input.shape, values.len())));
    }
    let batch = *input.shape.first().ok_or_else(|| bad("input shape is empty"))? as usize;
    if batch == 0 || batch > state.limits.max_images_per_request {
        return Err(bad(format!("batch of {batch} images; 1..={} are accepted", state.limits.max_images_per_request)));
    }
    let limits = DecodeLimits { max_pixels: state.limits.max_image_pixels };
    let prep_config = Arc::clone(&config);
    let datatype = input.datatype.clone();
    let shape = input.shape.clone();
    let prepared = state
        .run_cpu(move || prepare_input(&datatype, &shape, &values, &prep_config, limits))
        .await??;
    let geometries: Vec<Geometry> = prepared.iter().map(|p| p.geometry).collect();
    let deadline = started + Duration::from_millis(state.limits.request_timeout_ms);
    let output = runtime
        .infer(prepared, JobOptions { score_threshold, want_confidence: false }, deadline)
        .await
        .map_err(|e| V2Error::from(super::predict::engine_error(&name, e, state.limits.request_timeout_ms)))?;
    let labels = Arc::clone(&entry.labels);
    let task = config.task;
    let mut outputs = build_outputs(task, output.outputs, &geometries, &labels, iou_threshold, max_detections)?;
    if let Some(requested) = &request.outputs {
        let mut chosen = Vec::new();
        for r in requested {
            let tensor = outputs
                .iter()
                .find(|o| o["name"] == r.name.as_str())
                .cloned()
                .ok_or_else(|| bad(format!("model '{name}' has no output '{}'", r.name)))?;
            match r.parameters.get("classification") {
                None => chosen.push(tensor),
                Some(k) => {
                    let k = k.as_u64().filter(|k| *k >= 1).ok_or_else(|| bad("'classification' must be a positive integer"))?;
                    chosen.push(classification_strings(&tensor, k as usize, &labels)?);
                }
            }
        }
        outputs = chosen;
    }
    let mut answer = json!({"model_name": name, "model_version": VERSION, "outputs": outputs});
    if let Some(id) = request.id {
        answer["id"] = json!(id);
    }
    Ok(Json(answer).into_response())
}

/// Turns the one input tensor into model-ready images.
fn prepare_input(datatype: &str, shape: &[i64], values: &[Value], config: &ModelConfig, limits: DecodeLimits) -> Result<Vec<PreparedImage>, V2Error> {
    match datatype {
        "BYTES" => {
            if shape.len() > 2 || shape.get(1).is_some_and(|&d| d != 1) {
                return Err(bad("BYTES input must have shape [N] or [N, 1]: one encoded image each"));
            }
            let images = values
                .iter()
                .map(|v| {
                    let text = v.as_str().ok_or_else(|| bad("BYTES elements must be strings (base64 images)"))?;
                    super::input::decode_base64(text).map_err(|e| bad(format!("BYTES element is not base64: {e}")))
                })
                .collect::<Result<Vec<Bytes>, _>>()?;
            super::predict::prepare_all(&images, config, limits, false).map(|(p, _)| p).map_err(V2Error::from)
        }
        "UINT8" => {
            let [n, h, w, 3] = shape else {
                return Err(bad("UINT8 input must have shape [N, H, W, 3] (RGB pixels)"));
            };
            let (n, h, w) = (*n as usize, *h as usize, *w as usize);
            if (h * w) as u64 > limits.max_pixels || h == 0 || w == 0 {
                return Err(bad(format!("{w}×{h} images are outside the accepted size")));
            }
            let bytes = values
                .iter()
                .map(|v| v.as_u64().filter(|x| *x <= 255).map(|x| x as u8).ok_or_else(|| bad("UINT8 values must be integers within 0..=255")))
                .collect::<Result<Vec<u8>, _>>()?;
            (0..n)
                .map(|i| {
                    let pixels = bytes[i * h * w * 3..(i + 1) * h * w * 3].to_vec();
                    let image = image::RgbImage::from_raw(w as u32, h as u32, pixels).ok_or_else(|| bad("pixel count mismatch"))?;
                    preprocess(&image, &config.input).map_err(|e| V2Error::from(ApiError::Internal(e.to_string())))
                })
                .collect()
        }
        "FP32" => {
            let [n, 3, h, w] = shape else {
                return Err(bad("FP32 input must have shape [N, 3, H, W] (preprocessed)"));
            };
            let (n, h, w) = (*n as usize, *h as u32, *w as u32);
            let fixed = !matches!(config.input.resize, ResizePolicy::Original | ResizePolicy::FitMultiple);
            if fixed && (w, h) != (config.input.width, config.input.height) {
                return Err(bad(format!("FP32 input must be {}×{} for this model, got {w}×{h}", config.input.width, config.input.height)));
            }
            let floats = values
                .iter()
                .map(|v| v.as_f64().map(|x| x as f32).ok_or_else(|| bad("FP32 values must be numbers")))
                .collect::<Result<Vec<f32>, _>>()?;
            let plane = 3 * h as usize * w as usize;
            Ok((0..n)
                .map(|i| PreparedImage { data: floats[i * plane..(i + 1) * plane].to_vec(), geometry: Geometry::identity(w, h) })
                .collect())
        }
        other => Err(V2Error(StatusCode::BAD_REQUEST, format!("input datatype {other} is not accepted: use BYTES, UINT8 or FP32"))),
    }
}

fn build_outputs(
    task: Task,
    outputs: Vec<ModelOutput>,
    geometries: &[Geometry],
    labels: &[String],
    iou_threshold: f32,
    max_detections: usize,
) -> Result<Vec<Value>, V2Error> {
    let n = outputs.len() as i64;
    match task {
        Task::Classification => {
            let mut data = Vec::new();
            let mut classes = 0;
            for output in outputs {
                let ModelOutput::Probabilities(p) = output else { return Err(ApiError::Internal("output does not match the task".into()).into()) };
                classes = p.len();
                data.extend(p);
            }
            Ok(vec![json!({"name": "scores", "datatype": "FP32", "shape": [n, classes], "data": data})])
        }
        Task::Segmentation => {
            let mut data = Vec::new();
            let mut size = None;
            for (output, geometry) in outputs.into_iter().zip(geometries) {
                let ModelOutput::LabelMap(map) = output else { return Err(ApiError::Internal("output does not match the task".into()).into()) };
                let full = segmentation::resample_to_original(&map, geometry);
                if size.is_some_and(|s| s != (full.height, full.width)) {
                    return Err(bad("images of different sizes give masks of different shapes: send one per request"));
                }
                size = Some((full.height, full.width));
                data.extend(full.labels);
            }
            let (h, w) = size.unwrap_or((0, 0));
            Ok(vec![json!({"name": "mask", "datatype": "UINT8", "shape": [n, h, w], "data": data})])
        }
        Task::Detection => {
            let per_image: Vec<Vec<detection::Detection>> = outputs
                .into_iter()
                .zip(geometries)
                .map(|(output, geometry)| match output {
                    ModelOutput::Candidates(c) => Ok(detection::to_detections(&detection::non_max_suppression(c, iou_threshold, max_detections), geometry, labels)),
                    _ => Err(V2Error::from(ApiError::Internal("output does not match the task".into()))),
                })
                .collect::<Result<_, _>>()?;
            let k = per_image.iter().map(Vec::len).max().unwrap_or(0);
            let (mut boxes, mut scores, mut classes, mut counts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for dets in &per_image {
                counts.push(dets.len() as i32);
                for i in 0..k {
                    match dets.get(i) {
                        Some(d) => {
                            boxes.extend([d.bbox.x1, d.bbox.y1, d.bbox.x2, d.bbox.y2]);
                            scores.push(d.score);
                            classes.push(d.index as i64);
                        }
                        // Padding past an image's own detections: see num_detections.
                        None => {
                            boxes.extend([0.0; 4]);
                            scores.push(0.0);
                            classes.push(-1);
                        }
                    }
                }
            }
            Ok(vec![
                json!({"name": "boxes", "datatype": "FP32", "shape": [n, k, 4], "data": boxes}),
                json!({"name": "scores", "datatype": "FP32", "shape": [n, k], "data": scores}),
                json!({"name": "classes", "datatype": "INT64", "shape": [n, k], "data": classes}),
                json!({"name": "num_detections", "datatype": "INT32", "shape": [n], "data": counts}),
            ])
        }
    }
}

/// Triton's classification extension: the top `k` of a `[N, C]` score tensor as
/// `"score:index:label"` strings, `BYTES [N, k]`.
fn classification_strings(tensor: &Value, k: usize, labels: &[String]) -> Result<Value, V2Error> {
    let shape: Vec<i64> = serde_json::from_value(tensor["shape"].clone()).map_err(|_| bad("bad output shape"))?;
    let [n, c] = shape[..] else {
        return Err(bad(format!("output '{}' is not a [N, C] score tensor", tensor["name"])));
    };
    let data: Vec<f32> = serde_json::from_value(tensor["data"].clone()).map_err(|_| bad("classification needs a numeric output"))?;
    let k = k.min(c as usize);
    let mut strings = Vec::new();
    for row in data.chunks(c as usize) {
        for p in classification::top_k(row, k, labels) {
            strings.push(format!("{}:{}:{}", p.score, p.index, p.label));
        }
    }
    Ok(json!({"name": tensor["name"], "datatype": "BYTES", "shape": [n, k], "data": strings}))
}
