//! `POST /v1/models/{name}/predict`: parse → decode and preprocess off the reactor → the
//! model's queue → task post-processing → JSON, with timing headers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderName, HeaderValue};
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
use crate::tasks::{classification, detection, segmentation, TaskResult};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/models/{name}/predict", post(predict))
}

async fn predict(
    State(state): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    uploads: ImageUploads,
) -> Result<Response, ApiError> {
    let model = state.repository.get(&name).ok_or_else(|| ApiError::ModelNotFound(name.clone()))?;
    let config = model
        .config
        .clone()
        .ok_or_else(|| ApiError::ModelNotReady { name: name.clone(), reason: model.status().1.unwrap_or_default() })?;
    let Query(mut raw) = query.map_err(|e| ApiError::InvalidParameter(format!("malformed query string: {}", e.body_text())))?;
    raw.extend(uploads.body_parameters);
    let params = PredictParams::from_raw(&raw, config.task)?;
    let runtime = model
        .runtime()
        .map_err(|reason| ApiError::ModelNotReady { name: name.clone(), reason })?;

    let started = Instant::now();
    let limits = DecodeLimits { max_pixels: state.limits.max_image_pixels };
    let prep_config = Arc::clone(&config);
    let prepared = state.run_cpu(move || prepare_all(&uploads.images, &prep_config, limits)).await??;
    let preprocess_time = started.elapsed();

    let geometries: Vec<Geometry> = prepared.iter().map(|p| p.geometry).collect();
    let output = runtime
        .infer(prepared, JobOptions { score_threshold: params.score_threshold })
        .await
        .map_err(|e| engine_error(&name, e))?;

    let post_started = Instant::now();
    let labels = Arc::clone(&model.labels);
    let task = config.task;
    let results = state
        .run_cpu(move || postprocess(task, output.outputs, &geometries, &labels, &params))
        .await??;
    let postprocess_time = post_started.elapsed();

    let mut response = Json(json!({"model": name, "task": task, "results": results})).into_response();
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

fn prepare_all(images: &[axum::body::Bytes], config: &ModelConfig, limits: DecodeLimits) -> Result<Vec<PreparedImage>, ApiError> {
    images
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            let which = if images.len() > 1 { format!("image {i}: ") } else { String::new() };
            let rgb = decode_image(bytes, limits).map_err(|e| ApiError::InvalidImage(format!("{which}{e}")))?;
            preprocess(&rgb, &config.input).map_err(|e| ApiError::Internal(format!("{which}{e}")))
        })
        .collect()
}

fn engine_error(model: &str, error: EngineError) -> ApiError {
    match error {
        EngineError::QueueFull => ApiError::Overloaded(model.to_string()),
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
