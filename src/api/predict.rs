//! `POST /v1/models/{name}/predict`: parse → decode and preprocess off the reactor → the
//! model's queue → task post-processing → JSON, with timing headers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;

use super::inference::{self, Deadline, Inference, Target};
use super::input::ImageUploads;
use super::params::PredictParams;
use super::AppState;
use crate::engine::{JobOptions, ModelOutput};
use crate::error::ApiError;
use crate::image::{decode_image, preprocess, DecodeLimits, Geometry, PreparedImage};
use crate::repository::config::{ModelConfig, Task};
use crate::render;
use crate::tasks::{classification, detection, segmentation, TaskResult};
use image::RgbImage;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/models/{name}/predict", post(predict))
        .route("/v1/models/{name}/versions/{version}/predict", post(predict_versioned))
}

async fn predict(
    state: State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    uploads: ImageUploads,
) -> Result<Response, ApiError> {
    answer(state, name, None, query, headers, uploads).await
}

async fn predict_versioned(
    state: State<AppState>,
    Path((name, version)): Path<(String, String)>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    uploads: ImageUploads,
) -> Result<Response, ApiError> {
    answer(state, name, Some(version), query, headers, uploads).await
}

async fn answer(
    State(state): State<AppState>,
    name: String,
    version: Option<String>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    uploads: ImageUploads,
) -> Result<Response, ApiError> {
    let deadline = Deadline::from_headers(&headers, state.limits.request_timeout_ms, Instant::now())?;
    let Query(mut raw) = query.map_err(|e| ApiError::InvalidParameter(format!("malformed query string: {}", e.body_text())))?;
    raw.extend(uploads.body_parameters);
    let render = wants_png(raw.remove("render").as_deref(), &headers)?;
    if render && uploads.images.len() != 1 {
        return Err(ApiError::InvalidParameter(format!(
            "a rendered overlay takes exactly one image, got {}",
            uploads.images.len()
        )));
    }
    let target = Target::resolve(&state, &name, version.as_deref())?;
    let params = PredictParams::from_raw(&raw, target.config.task)?;

    let limits = DecodeLimits { max_pixels: state.limits.max_image_pixels };
    let images = uploads.images;
    // With an overlay asked for, the decoded original comes back to be drawn on.
    let prepare = move |config: &ModelConfig| prepare_all(&images, config, limits, render);
    let options = JobOptions { score_threshold: params.score_threshold, want_confidence: false, want_raw: false };
    let inference = inference::run(&state, &target, prepare, options, deadline).await?;

    let post_started = Instant::now();
    let labels = Arc::clone(&target.entry.labels);
    let task = target.config.task;
    let Inference { outputs, geometries, timings, original, .. } = inference;
    let mut response = match original {
        Some(image) => {
            let png = state
                .run_cpu(move || render_overlay(task, outputs, &geometries, &labels, &params, image))
                .await??;
            ([(header::CONTENT_TYPE, "image/png")], png).into_response()
        }
        None => {
            let results = state.run_cpu(move || postprocess(task, outputs, &geometries, &labels, &params)).await??;
            Json(json!({"model": target.name(), "version": target.entry.version, "task": task, "results": results}))
                .into_response()
        }
    };
    timings.finish(target.name(), post_started.elapsed(), response.headers_mut());
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
