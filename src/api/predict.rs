//! `POST /v1/models/{name}/predict`: parse → decode and preprocess off the reactor → the
//! model's queue → task post-processing → JSON, with timing headers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;

use super::input::ImageUploads;
use super::params::PredictParams;
use super::{millis, AppState};
use crate::engine::{EngineError, JobOptions, ModelOutput};
use crate::error::ApiError;
use crate::image::{decode_image, preprocess, DecodeLimits, Geometry, PreparedImage};
use crate::repository::config::{ModelConfig, Task};
use crate::metrics as m;
use crate::render;
use crate::tasks::{classification, detection, segmentation, TaskResult};
use image::RgbImage;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/models/{name}/predict", post(predict))
}

/// The request's deadline: the server default, or `x-request-timeout-ms` when given.
fn deadline(headers: &HeaderMap, default_ms: u64, started: Instant) -> Result<(Instant, u64), ApiError> {
    let ms = match headers.get("x-request-timeout-ms") {
        None => default_ms,
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|ms| (1..=600_000).contains(ms))
            .ok_or_else(|| {
                ApiError::InvalidParameter("header 'x-request-timeout-ms' must be an integer within 1..=600000".into())
            })?,
    };
    Ok((started + Duration::from_millis(ms), ms))
}

async fn predict(
    State(state): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    uploads: ImageUploads,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let (deadline, timeout_ms) = deadline(&headers, state.limits.request_timeout_ms, started)?;
    let model = state.repository.get(&name).ok_or_else(|| ApiError::ModelNotFound(name.clone()))?;
    let config = model
        .config
        .clone()
        .ok_or_else(|| ApiError::ModelNotReady { name: name.clone(), reason: model.status().1.unwrap_or_default() })?;
    let Query(mut raw) = query.map_err(|e| ApiError::InvalidParameter(format!("malformed query string: {}", e.body_text())))?;
    raw.extend(uploads.body_parameters);
    let render = wants_png(raw.remove("render").as_deref(), &headers)?;
    if render && uploads.images.len() != 1 {
        return Err(ApiError::InvalidParameter(format!(
            "a rendered overlay takes exactly one image, got {}",
            uploads.images.len()
        )));
    }
    let params = PredictParams::from_raw(&raw, config.task)?;
    let runtime = model
        .runtime()
        .map_err(|reason| ApiError::ModelNotReady { name: name.clone(), reason })?;
    if runtime.is_full() {
        return Err(ApiError::Overloaded(name));
    }

    let limits = DecodeLimits { max_pixels: state.limits.max_image_pixels };
    let prep_config = Arc::clone(&config);
    let (prepared, original) =
        state.run_cpu(move || prepare_all(&uploads.images, &prep_config, limits, render)).await??;
    let preprocess_time = started.elapsed();

    let geometries: Vec<Geometry> = prepared.iter().map(|p| p.geometry).collect();
    let output = runtime
        .infer(prepared, JobOptions { score_threshold: params.score_threshold, want_confidence: false }, deadline)
        .await
        .map_err(|e| engine_error(&name, e, timeout_ms))?;

    let post_started = Instant::now();
    let labels = Arc::clone(&model.labels);
    let task = config.task;
    let mut response = match original {
        Some(image) => {
            let png = state
                .run_cpu(move || render_overlay(task, output.outputs, &geometries, &labels, &params, image))
                .await??;
            ([(header::CONTENT_TYPE, "image/png")], png).into_response()
        }
        None => {
            let results = state
                .run_cpu(move || postprocess(task, output.outputs, &geometries, &labels, &params))
                .await??;
            Json(json!({"model": name, "task": task, "results": results})).into_response()
        }
    };
    let postprocess_time = post_started.elapsed();
    for (metric, time) in [
        (m::PREPROCESS_SECONDS, preprocess_time),
        (m::QUEUE_SECONDS, output.queue_time),
        (m::INFERENCE_SECONDS, output.inference_time),
        (m::POSTPROCESS_SECONDS, postprocess_time),
    ] {
        metrics::histogram!(metric, "model" => name.clone()).record(m::seconds(time));
    }
    let headers = response.headers_mut();
    for (header, value) in [
        ("x-preprocess-time-ms", millis(preprocess_time)),
        ("x-queue-time-ms", millis(output.queue_time)),
        ("x-inference-time-ms", millis(output.inference_time)),
        ("x-postprocess-time-ms", millis(postprocess_time)),
        ("x-batch-size", output.batch_size.to_string()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(header), v);
        }
    }
    Ok(response)
}

/// `?render=png` or an `Accept` that names `image/png` (and not JSON first) asks for the
/// overlay instead of JSON.
fn wants_png(render: Option<&str>, headers: &HeaderMap) -> Result<bool, ApiError> {
    match render {
        Some("png") => return Ok(true),
        Some("json") => return Ok(false),
        Some(other) => {
            return Err(ApiError::InvalidParameter(format!("parameter 'render' must be png or json, got '{other}'")))
        }
        None => {}
    }
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    let first = accept.split(',').map(|t| t.split(';').next().unwrap_or("").trim()).find(|t| !t.is_empty());
    Ok(first == Some("image/png"))
}

/// Decodes and preprocesses every image; keeps the first decoded image when an overlay will
/// be drawn on it.
pub(super) fn prepare_all(
    images: &[axum::body::Bytes],
    config: &ModelConfig,
    limits: DecodeLimits,
    keep_original: bool,
) -> Result<(Vec<PreparedImage>, Option<RgbImage>), ApiError> {
    let mut prepared = Vec::with_capacity(images.len());
    let mut original = None;
    for (i, bytes) in images.iter().enumerate() {
        let which = if images.len() > 1 { format!("image {i}: ") } else { String::new() };
        let rgb = decode_image(bytes, limits).map_err(|e| ApiError::InvalidImage(format!("{which}{e}")))?;
        prepared.push(preprocess(&rgb, &config.input).map_err(|e| ApiError::Internal(format!("{which}{e}")))?);
        if keep_original && original.is_none() {
            original = Some(rgb);
        }
    }
    Ok((prepared, original))
}

/// The first image with its result drawn on it, as PNG bytes.
fn render_overlay(
    task: Task,
    outputs: Vec<ModelOutput>,
    geometries: &[Geometry],
    labels: &[String],
    params: &PredictParams,
    mut image: RgbImage,
) -> Result<Vec<u8>, ApiError> {
    let (Some(output), Some(geometry)) = (outputs.into_iter().next(), geometries.first()) else {
        return Err(ApiError::Internal("no output to render".into()));
    };
    match (task, output) {
        (Task::Classification, ModelOutput::Probabilities(p)) => {
            render::draw_classification(&mut image, &classification::top_k(&p, params.top_k, labels));
        }
        (Task::Detection, ModelOutput::Candidates(c)) => {
            let kept = detection::non_max_suppression(c, params.iou_threshold, params.max_detections);
            render::draw_detections(&mut image, &detection::to_detections(&kept, geometry, labels));
        }
        (Task::Segmentation, ModelOutput::LabelMap(map)) => {
            let full = render::full_resolution_labels(&map, geometry);
            let classes = segmentation::summarise(&full, labels);
            let result = segmentation::SegmentationResult { width: full.width, height: full.height, classes, mask: None };
            render::draw_segmentation(&mut image, &full, &result);
        }
        (task, _) => return Err(ApiError::Internal(format!("worker output does not match task {task:?}"))),
    }
    render::encode_png(&image).map_err(|e| ApiError::Internal(format!("PNG encoding failed: {e}")))
}

/// The one mapping of engine failures to HTTP errors, shared by every protocol's handler.
pub(super) fn engine_error(model: &str, error: EngineError, timeout_ms: u64) -> ApiError {
    match error {
        EngineError::QueueFull => ApiError::Overloaded(model.to_string()),
        EngineError::DeadlineExceeded => ApiError::DeadlineExceeded(timeout_ms),
        EngineError::Stopped => ApiError::ModelNotReady { name: model.to_string(), reason: "its workers have stopped".into() },
        // The model itself failed on this input: a server-side fault, logged with detail.
        other => ApiError::Internal(format!("model '{model}': {other}")),
    }
}

fn postprocess(
    task: Task,
    outputs: Vec<ModelOutput>,
    geometries: &[Geometry],
    labels: &[String],
    params: &PredictParams,
) -> Result<Vec<TaskResult>, ApiError> {
    outputs
        .into_iter()
        .zip(geometries)
        .map(|(output, geometry)| match (task, output) {
            (Task::Classification, ModelOutput::Probabilities(p)) => Ok(TaskResult::Classification {
                predictions: classification::top_k(&p, params.top_k, labels),
            }),
            (Task::Detection, ModelOutput::Candidates(c)) => {
                let kept = detection::non_max_suppression(c, params.iou_threshold, params.max_detections);
                Ok(TaskResult::Detection { detections: detection::to_detections(&kept, geometry, labels) })
            }
            (Task::Segmentation, ModelOutput::LabelMap(map)) => {
                segmentation::build_result(&map, geometry, labels, params.mask_format)
                    .map(TaskResult::Segmentation)
                    .map_err(|e| ApiError::Internal(format!("mask encoding failed: {e}")))
            }
            (task, _) => Err(ApiError::Internal(format!("worker output does not match task {task:?}"))),
        })
        .collect()
}
