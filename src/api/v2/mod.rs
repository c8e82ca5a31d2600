//! Open Inference Protocol (KServe V2) over REST: server and model metadata, health, readiness
//! and infer, with JSON tensors or the binary tensor data extension, so KServe, Triton
//! clients and gateways can call visionserve.
//!
//! Inputs (exactly one per request): `BYTES [N]` of encoded images (base64 in JSON, raw in
//! binary), `UINT8 [N, H, W, 3]` raw RGB pixels (both go through the model's preprocessing),
//! or `FP32 [N, 3, H, W]` already preprocessed (straight to the model). Outputs, by task:
//! `scores FP32 [N, C]`; `mask UINT8 [N, H, W]` (class per original pixel); `boxes FP32
//! [N, K, 4]`, `scores FP32 [N, K]`, `classes INT64 [N, K]`, `num_detections INT32 [N]` after
//! NMS, in original pixels: the model's outputs after the task's post-processing (softmax,
//! NMS, resampling to the original size). The model's own outputs are there too, named
//! `raw_output`, `raw_output_<i>` (tuple items) or `raw_<key>` (dict entries), computed only
//! when a request names one (stacked-batch models; torchvision's list-of-dicts detectors have
//! none). Triton's classification extension
//! (`"parameters": {"classification": k}` on an output) answers `"score:index:label"` strings.
//! Errors are `{"error": "..."}` with Triton's status mapping.

pub mod tensors;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::inference::{self, Deadline, Inference, Target};
use super::AppState;
use crate::engine::{JobOptions, ModelOutput, RawData, RawTensor};
use crate::error::ApiError;
use crate::image::{preprocess, DecodeLimits, Geometry, PreparedImage};
use crate::repository::config::{ModelConfig, ModelFormat, ResizePolicy, Task};
use crate::repository::{ModelEntry, ModelStatus};
use crate::tasks::{classification, detection, segmentation};
use tensors::{InferRequest, InputTensor, OutputData, OutputTensor};

const HEADER_LENGTH: HeaderName = HeaderName::from_static("inference-header-content-length");

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
        if let ApiError::Internal(detail) | ApiError::ModelFailed { detail, .. } = &e {
            tracing::error!(%detail, "{e}");
        }
        V2Error(status, e.to_string())
    }
}

fn bad(message: impl Into<String>) -> V2Error {
    V2Error::bad(message)
}

impl V2Error {
    pub fn bad(message: impl Into<String>) -> V2Error {
        V2Error(StatusCode::BAD_REQUEST, message.into())
    }
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
    Json(json!({
        "name": "visionserve",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["classification", "binary_tensor_data", "model_repository"]
    }))
}

async fn server_ready(State(state): State<AppState>) -> Response {
    let serving = state.repository.serving_entries();
    let ready = !serving.is_empty() && serving.iter().all(|m| m.status().0 == ModelStatus::Ready);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({"ready": ready}))).into_response()
}

fn model(state: &AppState, name: &str, version: Option<&str>) -> Result<Arc<ModelEntry>, V2Error> {
    state.repository.get(name, version).map_err(|e| V2Error(StatusCode::NOT_FOUND, e.to_string()))
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
    let config = entry.config.clone().ok_or_else(|| {
        V2Error(StatusCode::SERVICE_UNAVAILABLE, format!("model '{name}' is not ready: {}", entry.status().1.unwrap_or_default()))
    })?;
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
    let mut outputs = outputs;
    // The model's own outputs, as the warm-up saw them (stacked-batch models).
    if let Ok(runtime) = entry.runtime() {
        outputs.extend(runtime.raw_outputs().iter().map(|r| tensor_spec(&r.name, r.datatype, &r.shape)));
    }
    let versions = state.repository.family(name).map(|f| f.version_names()).unwrap_or_default();
    Ok(Json(json!({
        "name": entry.name,
        "versions": versions,
        "platform": match config.format {
            ModelFormat::Torchscript => "pytorch_torchscript",
            ModelFormat::Aoti => "pytorch_aoti",
        },
        "inputs": [tensor_spec("image", "BYTES", &[-1])],
        "outputs": outputs,
        "parameters": {
            "task": config.task,
            "version": entry.version,
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

async fn infer(state: State<AppState>, Path(name): Path<String>, headers: HeaderMap, body: Bytes) -> Result<Response, V2Error> {
    run_infer(state, name, None, headers, body).await
}

async fn infer_versioned(
    state: State<AppState>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, V2Error> {
    run_infer(state, name, Some(version), headers, body).await
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

fn bool_param(parameters: &Map<String, Value>, key: &str) -> Result<Option<bool>, V2Error> {
    match parameters.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(bad(format!("parameter '{key}' must be true or false"))),
    }
}

async fn run_infer(
    State(state): State<AppState>,
    name: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, V2Error> {
    let deadline = Deadline::from_headers(&headers, state.limits.request_timeout_ms, Instant::now())?;
    let header_length = match headers.get(HEADER_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| bad("Inference-Header-Content-Length must be a byte count"))?,
        ),
    };
    // Unknown model and version are 404 whatever the body holds.
    model(&state, &name, version.as_deref())?;
    let request = tensors::parse_request(body, header_length).map_err(bad)?;
    let [input] = request.inputs.as_slice() else {
        return Err(bad(format!("expected exactly one input, got {}", request.inputs.len())));
    };
    let score_threshold = number_param(&request.parameters, "score_threshold", 0.5, 0.0, 1.0)? as f32;
    let iou_threshold = number_param(&request.parameters, "iou_threshold", 0.45, 0.0, 1.0)? as f32;
    let max_detections = number_param(&request.parameters, "max_detections", 100.0, 1.0, 10_000.0)? as usize;
    let all_binary = bool_param(&request.parameters, "binary_data_output")?.unwrap_or(false);
    let batch = *input.shape.first().ok_or_else(|| bad("input shape is empty"))? as usize;
    if batch == 0 || batch > state.limits.max_images_per_request {
        return Err(bad(format!("batch of {batch} images; 1..={} are accepted", state.limits.max_images_per_request)));
    }
    let target = Target::resolve(&state, &name, version.as_deref())?;
    let limits = DecodeLimits { max_pixels: state.limits.max_image_pixels };
    let InferRequest { id, inputs, outputs: requested, .. } = request;
    let input = inputs.into_iter().next().expect("one input, checked above");
    let prepare = move |config: &ModelConfig| {
        prepare_input(&input, config, limits).map(|prepared| (prepared, None)).map_err(|V2Error(status, message)| match status {
            StatusCode::INTERNAL_SERVER_ERROR => ApiError::Internal(message),
            _ => ApiError::BadRequest(message),
        })
    };
    let want_raw = requested.iter().flatten().any(|r| r.name.starts_with(RAW_PREFIX));
    let options = JobOptions { score_threshold, want_confidence: false, want_raw };
    let Inference { outputs, geometries, timings, raw, .. } = inference::run(&state, &target, prepare, options, deadline).await?;

    let post_started = Instant::now();
    let labels = Arc::clone(&target.entry.labels);
    let mut tensors = build_outputs(target.config.task, outputs, &geometries, &labels, iou_threshold, max_detections)?;
    if want_raw {
        tensors.extend(stack_raw(raw)?);
    }
    let mut chosen = Vec::new();
    match &requested {
        None => chosen.extend(tensors.drain(..).map(|t| (t, all_binary))),
        Some(requested) => {
            for r in requested {
                let tensor = tensors
                    .iter()
                    .find(|o| o.name == r.name)
                    .cloned()
                    .ok_or_else(|| bad(format!("model '{name}' has no output '{}'", r.name)))?;
                let binary = bool_param(&r.parameters, "binary_data")?.unwrap_or(all_binary);
                match r.parameters.get("classification") {
                    None => chosen.push((tensor, binary)),
                    Some(k) => {
                        let k = k.as_u64().filter(|k| *k >= 1).ok_or_else(|| bad("'classification' must be a positive integer"))?;
                        chosen.push((classification_strings(&tensor, k as usize, &labels)?, binary));
                    }
                }
            }
        }
    }
    let mut head = Map::new();
    head.insert("model_name".into(), json!(target.name()));
    head.insert("model_version".into(), json!(target.entry.version));
    if let Some(id) = id {
        head.insert("id".into(), json!(id));
    }
    let (body, json_length) = tensors::encode_response(head, &chosen);
    let mut response = match json_length {
        Some(length) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")), (HEADER_LENGTH, HeaderValue::from(length))],
            body,
        )
            .into_response(),
        None => ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response(),
    };
    timings.finish(target.name(), post_started.elapsed(), response.headers_mut());
    Ok(response)
}

/// Turns the one input tensor into model-ready images.
fn prepare_input(input: &InputTensor, config: &ModelConfig, limits: DecodeLimits) -> Result<Vec<PreparedImage>, V2Error> {
    let shape = input.shape.as_slice();
    match input.datatype.as_str() {
        "BYTES" => {
            if shape.len() > 2 || shape.get(1).is_some_and(|&d| d != 1) {
                return Err(bad("BYTES input must have shape [N] or [N, 1]: one encoded image each"));
            }
            let images = input
                .bytes_elements(|text| super::input::decode_base64(text).map_err(|e| format!("BYTES element is not base64: {e}")))
                .map_err(bad)?;
            super::predict::prepare_all(&images, config, limits, false).map(|(p, _)| p).map_err(V2Error::from)
        }
        "UINT8" => {
            let [n, h, w, 3] = shape else {
                return Err(bad("UINT8 input must have shape [N, H, W, 3] (RGB pixels)"));
            };
            let (n, h, w) = (*n as usize, *h as usize, *w as usize);
            if h == 0 || w == 0 || (h as u64).saturating_mul(w as u64) > limits.max_pixels {
                return Err(bad(format!("{w}×{h} images are outside the accepted size")));
            }
            let bytes = input.u8_values().map_err(bad)?;
            let plane = h * w * 3;
            (0..n)
                .map(|i| {
                    let pixels = bytes[i * plane..(i + 1) * plane].to_vec();
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
            if w == 0 || h == 0 || u64::from(w) * u64::from(h) > limits.max_pixels {
                return Err(bad(format!("{w}×{h} inputs are outside the accepted size")));
            }
            let floats = input.f32_values().map_err(bad)?;
            let plane = 3 * h as usize * w as usize;
            Ok((0..n)
                .map(|i| PreparedImage { data: floats[i * plane..(i + 1) * plane].to_vec(), geometry: Geometry::identity(w, h) })
                .collect())
        }
        other => Err(bad(format!("input datatype {other} is not accepted: use BYTES, UINT8 or FP32"))),
    }
}

/// Names of the model's own outputs start with this (`raw_output`, `raw_output_0`,
/// `raw_<dict key>`); they are computed only when a request names one.
const RAW_PREFIX: &str = "raw_";

/// Per-image raw tensors stacked back into `[N, ...]` outputs.
fn stack_raw(per_image: Vec<Vec<RawTensor>>) -> Result<Vec<OutputTensor>, V2Error> {
    let n = per_image.len() as i64;
    let Some(first) = per_image.first() else { return Ok(Vec::new()) };
    let mut stacked = Vec::new();
    for (index, lead) in first.iter().enumerate() {
        let mut data = match lead.data {
            RawData::Fp32(_) => OutputData::Fp32(Vec::new()),
            RawData::Int64(_) => OutputData::Int64(Vec::new()),
        };
        for image in &per_image {
            let tensor = &image[index];
            if tensor.shape != lead.shape {
                return Err(bad(format!("raw output '{}' differs in shape between images: send one per request", lead.name)));
            }
            match (&mut data, &tensor.data) {
                (OutputData::Fp32(all), RawData::Fp32(v)) => all.extend_from_slice(v),
                (OutputData::Int64(all), RawData::Int64(v)) => all.extend_from_slice(v),
                _ => return Err(mismatch()),
            }
        }
        let shape = std::iter::once(n).chain(lead.shape.iter().copied()).collect();
        stacked.push(OutputTensor { name: lead.name.clone(), shape, data });
    }
    Ok(stacked)
}

fn mismatch() -> V2Error {
    V2Error::from(ApiError::Internal("output does not match the task".into()))
}

fn build_outputs(
    task: Task,
    outputs: Vec<ModelOutput>,
    geometries: &[Geometry],
    labels: &[String],
    iou_threshold: f32,
    max_detections: usize,
) -> Result<Vec<OutputTensor>, V2Error> {
    let n = outputs.len() as i64;
    let tensor = |name: &str, shape: Vec<i64>, data: OutputData| OutputTensor { name: name.into(), shape, data };
    match task {
        Task::Classification => {
            let mut data = Vec::new();
            let mut classes = 0;
            for output in outputs {
                let ModelOutput::Probabilities(p) = output else { return Err(mismatch()) };
                classes = p.len() as i64;
                data.extend(p);
            }
            Ok(vec![tensor("scores", vec![n, classes], OutputData::Fp32(data))])
        }
        Task::Segmentation => {
            let mut data = Vec::new();
            let mut size = None;
            for (output, geometry) in outputs.into_iter().zip(geometries) {
                let ModelOutput::LabelMap(map) = output else { return Err(mismatch()) };
                let full = segmentation::resample_to_original(&map, geometry);
                if size.is_some_and(|s| s != (full.height, full.width)) {
                    return Err(bad("images of different sizes give masks of different shapes: send one per request"));
                }
                size = Some((full.height, full.width));
                data.extend(full.labels);
            }
            let (h, w) = size.unwrap_or((0, 0));
            Ok(vec![tensor("mask", vec![n, h as i64, w as i64], OutputData::Uint8(data))])
        }
        Task::Detection => {
            let per_image: Vec<Vec<detection::Detection>> = outputs
                .into_iter()
                .zip(geometries)
                .map(|(output, geometry)| match output {
                    ModelOutput::Candidates(c) => Ok(detection::to_detections(&detection::non_max_suppression(c, iou_threshold, max_detections), geometry, labels)),
                    _ => Err(mismatch()),
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
            let k = k as i64;
            Ok(vec![
                tensor("boxes", vec![n, k, 4], OutputData::Fp32(boxes)),
                tensor("scores", vec![n, k], OutputData::Fp32(scores)),
                tensor("classes", vec![n, k], OutputData::Int64(classes)),
                tensor("num_detections", vec![n], OutputData::Int32(counts)),
            ])
        }
    }
}

/// Triton's classification extension: the top `k` of a `[N, C]` score tensor as
/// `"score:index:label"` strings, `BYTES [N, k]`.
fn classification_strings(tensor: &OutputTensor, k: usize, labels: &[String]) -> Result<OutputTensor, V2Error> {
    let (&[n, c], OutputData::Fp32(data)) = (tensor.shape.as_slice(), &tensor.data) else {
        return Err(bad(format!("output '{}' is not a [N, C] score tensor", tensor.name)));
    };
    let k = k.min(c as usize);
    let mut strings = Vec::new();
    for row in data.chunks(c.max(1) as usize) {
        for p in classification::top_k(row, k, labels) {
            strings.push(format!("{}:{}:{}", p.score, p.index, p.label));
        }
    }
    Ok(OutputTensor { name: tensor.name.clone(), shape: vec![n, k as i64], data: OutputData::Bytes(strings) })
}
