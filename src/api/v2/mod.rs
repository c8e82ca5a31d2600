pub mod tensors;

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::inference::{self, Answered, CacheOutcome, ImageIdentities, RequestContext, Target};
use super::pipeline::{self, PipelineInput, PIPELINE_VERSION};
use super::model_path::ModelPath;
use super::AppState;
use crate::engine::{RawData, RawTensor};
use crate::error::ApiError;
use crate::image::{DecodeLimits, Geometry, PreparedImage};
use crate::model_config::{ModelConfig, ModelFormat, ResizePolicy, Task};
use crate::repository::PipelineEntry;
use crate::tasks::{classification, Finished, PredictParams};
use tensors::{InferRequest, InputTensor, OutputData, OutputTensor};

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
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer))
}

/// The service's one error, rendered in the V2 shape, `{"error": "..."}`, with Triton's
/// mapping: not found 404, unavailable 503 (with `Retry-After`), internal 500, deadline 504,
/// everything else 400.
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
            | StatusCode::GATEWAY_TIMEOUT) => status,
            _ => StatusCode::BAD_REQUEST,
        };
        self.0.log();
        let mut response = (status, Json(json!({"error": self.0.to_string()}))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// The protocol extensions served, on REST and gRPC alike.
pub const EXTENSIONS: [&str; 3] = ["classification", "binary_tensor_data", "model_repository"];

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

/// A tensor a model takes or gives, as metadata describes it.
pub struct TensorSpec {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

fn tensor_spec(name: &str, datatype: &'static str, shape: &[i64]) -> TensorSpec {
    TensorSpec { name: name.to_string(), datatype, shape: shape.to_vec() }
}

impl TensorSpec {
    fn to_json(&self) -> Value {
        json!({"name": self.name, "datatype": self.datatype, "shape": self.shape})
    }
}

/// A model version's metadata, as REST V2 and gRPC both describe it.
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: &'static str,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// What only REST reports (gRPC's message has no such field): task, version, other inputs.
    pub parameters: Value,
}

pub fn model_metadata_of(state: &AppState, name: &str, version: Option<&str>) -> Result<ModelMetadata, ApiError> {
    if let Some(pipeline) = state.repository.pipeline(name) {
        pipeline::check_version(&pipeline, version)?;
        return Ok(ModelMetadata {
            name: pipeline.name.clone(),
            versions: vec![PIPELINE_VERSION.into()],
            platform: "visionserve_pipeline",
            inputs: vec![tensor_spec("image", "BYTES", &[-1])],
            outputs: pipeline::output_specs(),
            parameters: json!({
                "task": "detection",
                "steps": pipeline::summary(state, &pipeline)["steps"],
                "also_accepts": [{"datatype": "UINT8", "shape": [-1, -1, -1, 3], "meaning": "raw RGB pixels"}]
            }),
        });
    }
    let entry = state.repository.get(name, version)?;
    let config = entry.config.clone().ok_or_else(|| ApiError::ModelNotReady {
        name: name.to_string(),
        reason: entry.status().reason.unwrap_or_default(),
    })?;
    let classes = entry.labels.len().max(1) as i64;
    let mut outputs = match config.task {
        Task::Classification => vec![tensor_spec("scores", "FP32", &[-1, classes])],
        Task::Segmentation => vec![tensor_spec("mask", "UINT8", &[-1, -1, -1])],
        Task::Detection => vec![
            tensor_spec("boxes", "FP32", &[-1, -1, 4]),
            tensor_spec("scores", "FP32", &[-1, -1]),
            tensor_spec("classes", "INT64", &[-1, -1]),
            tensor_spec("num_detections", "INT32", &[-1]),
        ],
    };
    // The model's own outputs, as the warm-up saw them (stacked-batch models).
    if let Ok(runtime) = entry.runtime() {
        outputs.extend(runtime.raw_outputs().iter().map(|r| tensor_spec(&r.name, r.datatype, &r.shape)));
    }
    let versions = state.repository.family(name).map(|f| f.version_names()).unwrap_or_default();
    Ok(ModelMetadata {
        name: entry.name.clone(),
        versions,
        platform: match config.format {
            ModelFormat::Torchscript => "pytorch_torchscript",
            ModelFormat::Aoti => "pytorch_aoti",
        },
        inputs: vec![tensor_spec("image", "BYTES", &[-1])],
        outputs,
        parameters: json!({
            "task": config.task,
            "version": entry.version,
            "also_accepts": [
                {"datatype": "UINT8", "shape": [-1, -1, -1, 3], "meaning": "raw RGB pixels"},
                {"datatype": "FP32", "shape": [-1, 3, config.input.height, config.input.width], "meaning": "preprocessed input"}
            ]
        }),
    })
}

async fn model_metadata(State(state): State<AppState>, model: ModelPath) -> Result<Json<Value>, V2Error> {
    let metadata = model_metadata_of(&state, &model.name, model.version())?;
    Ok(Json(json!({
        "name": metadata.name,
        "versions": metadata.versions,
        "platform": metadata.platform,
        "inputs": metadata.inputs.iter().map(TensorSpec::to_json).collect::<Vec<_>>(),
        "outputs": metadata.outputs.iter().map(TensorSpec::to_json).collect::<Vec<_>>(),
        "parameters": metadata.parameters,
    })))
}

async fn model_ready(State(state): State<AppState>, model: ModelPath) -> Result<Response, V2Error> {
    check_exists(&state, &model.name, model.version())?;
    let is_ready = is_model_ready(&state, &model.name, model.version());
    let status = if is_ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    Ok((status, Json(json!({"name": model.name, "ready": is_ready}))).into_response())
}

/// A model version's readiness, or a pipeline's (its steps'); false for what does not exist.
pub fn is_model_ready(state: &AppState, name: &str, version: Option<&str>) -> bool {
    match state.repository.pipeline(name) {
        Some(pipeline) => pipeline::check_version(&pipeline, version).is_ok() && state.repository.pipeline_status(&pipeline).is_ready(),
        None => state.repository.get(name, version).is_ok_and(|e| e.status().is_ready()),
    }
}

fn bool_param(parameters: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match parameters.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::BadRequest(format!("parameter '{key}' must be true or false"))),
    }
}

/// Parse the body → the shared tensor path → JSON, or JSON and binary data.
async fn infer(State(state): State<AppState>, model: ModelPath, headers: HeaderMap, body: Bytes) -> Result<Response, V2Error> {
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
    check_exists(&state, &model.name, model.version())?;
    let request = tensors::parse_request(body, header_length).map_err(V2Error::bad)?;
    let answer = infer_tensors(&state, &model.name, model.version(), request, &context).await?;
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

/// Whether a model (or pipeline) and version exist, whatever their state: 404 otherwise.
pub fn check_exists(state: &AppState, name: &str, version: Option<&str>) -> Result<(), ApiError> {
    match state.repository.pipeline(name) {
        Some(pipeline) => pipeline::check_version(&pipeline, version),
        None => state.repository.get(name, version).map(|_| ()).map_err(ApiError::from),
    }
}

/// What the Open Inference Protocol answers, before a transport writes it: REST as JSON (and
/// binary data), gRPC as `ModelInferResponse`.
pub struct TensorAnswer {
    pub model_name: String,
    pub model_version: String,
    pub id: Option<String>,
    /// The outputs in the order the request named them, each with whether REST sends it as
    /// binary data (gRPC always does).
    pub outputs: Vec<(OutputTensor, bool)>,
    /// Every stage's time (REST's `x-*-time-ms` headers; gRPC's response metadata).
    pub timing_headers: HeaderMap,
}

/// The Open Inference Protocol's inference, shared by REST V2 and gRPC: check the request's
/// one input and parameters, run it through the shared inference path (admission, queue,
/// batching, deadline, `tasks::finish`) and shape the finished results as the tensors asked for.
pub async fn infer_tensors(
    state: &AppState,
    name: &str,
    version: Option<&str>,
    request: InferRequest,
    context: &RequestContext,
) -> Result<TensorAnswer, ApiError> {
    let bad = |message: String| ApiError::BadRequest(message);
    let [input] = request.inputs.as_slice() else {
        return Err(bad(format!("expected exactly one input, got {}", request.inputs.len())));
    };
    if let Some(pipeline) = state.repository.pipeline(name) {
        pipeline::check_version(&pipeline, version)?;
        return pipeline_tensors(state, &pipeline, request, context).await;
    }
    let params = PredictParams::from_v2(&request.parameters).map_err(|e| bad(e.0))?;
    let all_binary = bool_param(&request.parameters, "binary_data_output")?.unwrap_or(false);
    let batch = *input.shape.first().ok_or_else(|| bad("input shape is empty".into()))? as usize;
    if batch == 0 || batch > state.limits.max_images_per_request {
        return Err(bad(format!("batch of {batch} images; 1..={} are accepted", state.limits.max_images_per_request)));
    }
    let target = Target::resolve(state, name, version, context).await?;
    let limits = DecodeLimits { max_pixels: state.limits.max_image_pixels };
    let InferRequest { id, inputs, outputs: requested, .. } = request;
    let input = inputs.into_iter().next().expect("one input, checked above");
    let want_raw = requested.iter().flatten().any(|r| r.name.starts_with(RAW_PREFIX));
    let identities = if want_raw { None } else { image_identities(&input) };
    let prepare = move |config: &ModelConfig| prepare_input(&input, config, limits).map(|prepared| (prepared, None));
    let answered = inference::answer(state, &target, identities, prepare, params, want_raw, context).await?;

    let post_started = Instant::now();
    let Answered { results, timings, raw, labels, cache, .. } = answered;
    let tensors = state
        .run_cpu(move || {
            let _encode = tracing::info_span!("encode").entered();
            let mut tensors = task_tensors(results)?;
            if want_raw {
                tensors.extend(stack_raw(raw)?);
            }
            Ok::<_, ApiError>(tensors)
        })
        .await??;
    let outputs = choose_outputs(tensors, requested.as_deref(), all_binary, target.name(), &labels)?;
    let mut timing_headers = HeaderMap::new();
    if let Some(timings) = timings {
        timings.finish(target.name(), post_started.elapsed(), &mut timing_headers);
    }
    CacheOutcome::write(cache, &mut timing_headers);
    Ok(TensorAnswer { model_name: target.name().to_string(), model_version: target.entry.version.clone(), id, outputs, timing_headers })
}

/// What tells the input's images apart for the response cache: each BYTES element, or each
/// UINT8 image's pixels with its shape. Preprocessed FP32 tensors are not cached.
fn image_identities(input: &InputTensor) -> Option<ImageIdentities> {
    match input.datatype.as_str() {
        "BYTES" => input.bytes_elements(|text| super::input::decode_base64(text).map_err(|e| e.to_string())).ok().map(|elements| {
            elements.into_iter().map(|element| vec![element]).collect()
        }),
        "UINT8" => {
            let [n, h, w, 3] = *input.shape.as_slice() else { return None };
            let pixels = Bytes::from(input.u8_values().ok()?);
            let plane = (h * w * 3) as usize;
            let shape = Bytes::from([h.to_le_bytes(), w.to_le_bytes()].concat());
            (pixels.len() == plane * n as usize)
                .then(|| (0..n as usize).map(|i| vec![shape.clone(), pixels.slice(i * plane..(i + 1) * plane)]).collect())
        }
        _ => None,
    }
}

/// A pipeline's inference in V2's terms: BYTES images or UINT8 pixels in (a preprocessed FP32
/// tensor fits no two models), the pipeline's tensors out.
async fn pipeline_tensors(
    state: &AppState,
    pipeline: &PipelineEntry,
    request: InferRequest,
    context: &RequestContext,
) -> Result<TensorAnswer, ApiError> {
    if PredictParams::from_v2(&request.parameters).map_err(|e| ApiError::BadRequest(e.0))? != PredictParams::default() {
        return Err(ApiError::BadRequest(format!("pipeline '{}' takes no parameters: its steps are set in its pipeline.toml", pipeline.name)));
    }
    let all_binary = bool_param(&request.parameters, "binary_data_output")?.unwrap_or(false);
    let InferRequest { id, inputs, outputs: requested, .. } = request;
    let input = inputs.into_iter().next().expect("one input, checked by the caller");
    let batch = input.shape.first().copied().unwrap_or(0) as usize;
    if batch == 0 || batch > state.limits.max_images_per_request {
        return Err(ApiError::BadRequest(format!("batch of {batch} images; 1..={} are accepted", state.limits.max_images_per_request)));
    }
    let images = match input.datatype.as_str() {
        "BYTES" => PipelineInput::Encoded(
            input
                .bytes_elements(|text| super::input::decode_base64(text).map_err(|e| format!("BYTES element is not base64: {e}")))
                .map_err(ApiError::BadRequest)?,
        ),
        "UINT8" => PipelineInput::Pixels(pixel_images(&input, DecodeLimits { max_pixels: state.limits.max_image_pixels })?),
        other => return Err(ApiError::BadRequest(format!("a pipeline takes BYTES images or UINT8 pixels, not {other}"))),
    };
    let run = pipeline::run(state, pipeline, images, context, false).await?;
    let tensors = run.v2_tensors()?;
    let outputs = choose_outputs(tensors, requested.as_deref(), all_binary, &pipeline.name, &[])?;
    let mut timing_headers = HeaderMap::new();
    run.timing_headers(&mut timing_headers);
    Ok(TensorAnswer { model_name: pipeline.name.clone(), model_version: PIPELINE_VERSION.into(), id, outputs, timing_headers })
}

/// The outputs a request names, in its order and each binary or JSON as asked (Triton's
/// classification extension turns a score tensor into its top-k strings); all of them when it
/// names none.
fn choose_outputs(
    mut tensors: Vec<OutputTensor>,
    requested: Option<&[tensors::RequestedOutput]>,
    all_binary: bool,
    model: &str,
    labels: &[String],
) -> Result<Vec<(OutputTensor, bool)>, ApiError> {
    let Some(requested) = requested else {
        return Ok(tensors.drain(..).map(|t| (t, all_binary)).collect());
    };
    let mut chosen = Vec::new();
    for r in requested {
        let tensor = tensors
            .iter()
            .find(|o| o.name == r.name)
            .cloned()
            .ok_or_else(|| ApiError::BadRequest(format!("model '{model}' has no output '{}'", r.name)))?;
        let binary = bool_param(&r.parameters, "binary_data")?.unwrap_or(all_binary);
        match r.parameters.get("classification") {
            None => chosen.push((tensor, binary)),
            Some(k) => {
                let k = k
                    .as_u64()
                    .filter(|k| *k >= 1)
                    .ok_or_else(|| ApiError::BadRequest("'classification' must be a positive integer".into()))?;
                chosen.push((classification_strings(&tensor, k as usize, labels)?, binary));
            }
        }
    }
    Ok(chosen)
}

/// Turns the one input tensor into model-ready images.
fn prepare_input(input: &InputTensor, config: &ModelConfig, limits: DecodeLimits) -> Result<Vec<PreparedImage>, ApiError> {
    let shape = input.shape.as_slice();
    match input.datatype.as_str() {
        "BYTES" => {
            if shape.len() > 2 || shape.get(1).is_some_and(|&d| d != 1) {
                return Err(ApiError::BadRequest("BYTES input must have shape [N] or [N, 1]: one encoded image each".into()));
            }
            let images = input
                .bytes_elements(|text| super::input::decode_base64(text).map_err(|e| format!("BYTES element is not base64: {e}")))
                .map_err(ApiError::BadRequest)?;
            super::predict::prepare_all(&images, config, limits, false).map(|(p, _)| p)
        }
        "UINT8" => inference::preprocess_images(&pixel_images(input, limits)?, &config.input),
        "FP32" => {
            let [n, 3, h, w] = shape else {
                return Err(ApiError::BadRequest("FP32 input must have shape [N, 3, H, W] (preprocessed)".into()));
            };
            let (n, h, w) = (*n as usize, *h as u32, *w as u32);
            let fixed = !matches!(config.input.resize, ResizePolicy::Original | ResizePolicy::FitMultiple);
            if fixed && (w, h) != (config.input.width, config.input.height) {
                return Err(ApiError::BadRequest(format!("FP32 input must be {}×{} for this model, got {w}×{h}", config.input.width, config.input.height)));
            }
            if w == 0 || h == 0 || u64::from(w) * u64::from(h) > limits.max_pixels {
                return Err(ApiError::BadRequest(format!("{w}×{h} inputs are outside the accepted size")));
            }
            let floats = input.f32_values().map_err(ApiError::BadRequest)?;
            let plane = 3 * h as usize * w as usize;
            Ok((0..n)
                .map(|i| PreparedImage { data: floats[i * plane..(i + 1) * plane].to_vec(), geometry: Geometry::identity(w, h) })
                .collect())
        }
        other => Err(ApiError::BadRequest(format!("input datatype {other} is not accepted: use BYTES, UINT8 or FP32"))),
    }
}

/// A `UINT8 [N, H, W, 3]` input as N RGB images.
fn pixel_images(input: &InputTensor, limits: DecodeLimits) -> Result<Vec<image::RgbImage>, ApiError> {
    let [n, h, w, 3] = input.shape.as_slice() else {
        return Err(ApiError::BadRequest("UINT8 input must have shape [N, H, W, 3] (RGB pixels)".into()));
    };
    let (n, h, w) = (*n as usize, *h as usize, *w as usize);
    if h == 0 || w == 0 || (h as u64).saturating_mul(w as u64) > limits.max_pixels {
        return Err(ApiError::BadRequest(format!("{w}×{h} images are outside the accepted size")));
    }
    let bytes = input.u8_values().map_err(ApiError::BadRequest)?;
    let plane = h * w * 3;
    (0..n)
        .map(|i| {
            let pixels = bytes[i * plane..(i + 1) * plane].to_vec();
            image::RgbImage::from_raw(w as u32, h as u32, pixels).ok_or_else(|| ApiError::BadRequest("pixel count mismatch".into()))
        })
        .collect()
}

/// Names of the model's own outputs start with this (`raw_output`, `raw_output_0`,
/// `raw_<dict key>`); they are computed only when a request names one.
const RAW_PREFIX: &str = "raw_";

/// Per-image raw tensors stacked back into `[N, ...]` outputs.
fn stack_raw(per_image: Vec<Vec<RawTensor>>) -> Result<Vec<OutputTensor>, ApiError> {
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
                return Err(ApiError::BadRequest(format!("raw output '{}' differs in shape between images: send one per request", lead.name)));
            }
            match (&mut data, &tensor.data) {
                (OutputData::Fp32(all), RawData::Fp32(v)) => all.extend_from_slice(v),
                (OutputData::Int64(all), RawData::Int64(v)) => all.extend_from_slice(v),
                _ => return Err(ApiError::Internal("raw outputs differ in type between images".into())),
            }
        }
        let shape = std::iter::once(n).chain(lead.shape.iter().copied()).collect();
        stacked.push(OutputTensor { name: lead.name.clone(), shape, data });
    }
    Ok(stacked)
}

/// The task's outputs as `[N, ...]` tensors: `scores`; `mask`; or `boxes`, `scores`,
/// `classes` and `num_detections`, padded to the image with the most detections.
pub(crate) fn task_tensors(results: Vec<Finished>) -> Result<Vec<OutputTensor>, ApiError> {
    let n = results.len() as i64;
    let tensor = |name: &str, shape: Vec<i64>, data: OutputData| OutputTensor { name: name.into(), shape, data };
    let (mut scores, mut masks, mut detections) = (Vec::new(), Vec::new(), Vec::new());
    for result in results {
        match result {
            Finished::Classification { scores: s, .. } => scores.push(s),
            Finished::Segmentation { mask } => masks.push(mask),
            Finished::Detection { detections: d } => detections.push(d),
        }
    }
    // One task per model, so exactly one of the three is filled.
    if let Some(first) = scores.first() {
        let classes = first.len() as i64;
        return Ok(vec![tensor("scores", vec![n, classes], OutputData::Fp32(scores.concat()))]);
    }
    if let Some(first) = masks.first() {
        let size = (first.height, first.width);
        if masks.iter().any(|m| (m.height, m.width) != size) {
            return Err(ApiError::BadRequest("images of different sizes give masks of different shapes: send one per request".into()));
        }
        let data = masks.into_iter().flat_map(|m| m.labels).collect();
        return Ok(vec![tensor("mask", vec![n, size.0 as i64, size.1 as i64], OutputData::Uint8(data))]);
    }
    let k = detections.iter().map(Vec::len).max().unwrap_or(0);
    let (mut boxes, mut scores, mut classes, mut counts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for dets in &detections {
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

/// Triton's classification extension: the top `k` of a `[N, C]` score tensor as
/// `"score:index:label"` strings, `BYTES [N, k]`.
fn classification_strings(tensor: &OutputTensor, k: usize, labels: &[String]) -> Result<OutputTensor, ApiError> {
    let (&[n, c], OutputData::Fp32(data)) = (tensor.shape.as_slice(), &tensor.data) else {
        return Err(ApiError::BadRequest(format!("output '{}' is not a [N, C] score tensor", tensor.name)));
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
