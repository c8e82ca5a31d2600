//! TorchServe's inference API, so a client written for TorchServe works unchanged:
//! `GET /ping` and `POST /predictions/{model}[/{version}]` with the raw image as the body
//! (`curl -T image.jpg`), a multipart field (`data` or `body`), or base64 text. Answers take
//! the shapes of TorchServe's default handlers:
//! - image_classifier: `{"<label>": probability, ...}`, the top 5, best first;
//! - object_detector: `[{"<label>": [x1, y1, x2, y2], "score": s}, ...]`, scores ≥ 0.5;
//! - image_segmenter: `[H][W][2]` of `[class_index, probability]` per pixel.
//!
//! One image gives its answer; several (multipart) give a list of answers, in order.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::inference::{self, Deadline, Inference, Target};
use super::input::{decode_base64, ImageUploads};
use super::AppState;
use crate::engine::{JobOptions, ModelOutput};
use crate::error::ApiError;
use crate::image::{DecodeLimits, Geometry};
use crate::repository::config::ModelConfig;
use crate::repository::config::Task;
use crate::repository::ModelStatus;
use crate::tasks::{classification, detection, segmentation};

const TOP_K: usize = 5;
const SCORE_THRESHOLD: f32 = 0.5;
const IOU_THRESHOLD: f32 = 0.45;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ping", get(ping))
        // `curl -T image.jpg`, as TorchServe's documentation shows it, sends a PUT.
        .route("/predictions/{model}", post(predict).put(predict))
        .route("/predictions/{model}/{version}", post(predict_versioned).put(predict_versioned))
}

async fn ping(State(state): State<AppState>) -> Response {
    let healthy = state.repository.serving_entries().iter().all(|m| m.status().0 == ModelStatus::Ready);
    if healthy {
        Json(json!({"status": "Healthy"})).into_response()
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"status": "Unhealthy"}))).into_response()
    }
}

async fn predict(state: State<AppState>, Path(model): Path<String>, request: Request) -> Result<Response, ApiError> {
    answer(state, model, None, request).await
}

async fn predict_versioned(state: State<AppState>, Path((model, version)): Path<(String, String)>, request: Request) -> Result<Response, ApiError> {
    answer(state, model, Some(version), request).await
}

/// Raw, multipart and JSON bodies as on /v1; `text/plain` bodies are base64 images, as
/// TorchServe's vision handler accepts them.
async fn images_of(request: Request, state: &AppState) -> Result<Vec<Bytes>, ApiError> {
    let is_text = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/plain"));
    if is_text {
        let body = Bytes::from_request(request, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(state.limits.max_body_bytes)
            } else {
                ApiError::BadRequest(r.body_text())
            }
        })?;
        let text = std::str::from_utf8(&body).map_err(|_| ApiError::BadRequest("a text/plain body must be base64 text".into()))?;
        let image = decode_base64(text.trim()).map_err(|e| ApiError::BadRequest(format!("the body is not valid base64: {e}")))?;
        return Ok(vec![image]);
    }
    Ok(ImageUploads::from_request(request, state).await?.images)
}

async fn answer(State(state): State<AppState>, name: String, version: Option<String>, request: Request) -> Result<Response, ApiError> {
    let deadline = Deadline::from_headers(request.headers(), state.limits.request_timeout_ms, Instant::now())?;
    // Resolved before the body is read: an unknown or full model costs no upload.
    let target = Target::resolve(&state, &name, version.as_deref())?;
    let images = images_of(request, &state).await?;
    let limits = DecodeLimits { max_pixels: state.limits.max_image_pixels };
    let prepare = move |config: &ModelConfig| super::predict::prepare_all(&images, config, limits, false);
    let options = JobOptions { score_threshold: SCORE_THRESHOLD, want_confidence: target.config.task == Task::Segmentation, want_raw: false };
    let Inference { outputs, geometries, timings, .. } = inference::run(&state, &target, prepare, options, deadline).await?;
    let post_started = Instant::now();
    let labels = Arc::clone(&target.entry.labels);
    let task = target.config.task;
    let mut answers = state.run_cpu(move || handler_answers(task, outputs, &geometries, &labels)).await??;
    let body = if answers.len() == 1 { answers.remove(0) } else { Value::Array(answers) };
    let mut response = Json(body).into_response();
    timings.finish(target.name(), post_started.elapsed(), response.headers_mut());
    Ok(response)
}

fn handler_answers(task: Task, outputs: Vec<ModelOutput>, geometries: &[Geometry], labels: &[String]) -> Result<Vec<Value>, ApiError> {
    outputs
        .into_iter()
        .zip(geometries)
        .map(|(output, geometry)| match (task, output) {
            (Task::Classification, ModelOutput::Probabilities(p)) => {
                let mut object = Map::new();
                for prediction in classification::top_k(&p, TOP_K, labels) {
                    object.insert(prediction.label, json!(prediction.score));
                }
                Ok(Value::Object(object))
            }
            (Task::Detection, ModelOutput::Candidates(c)) => {
                let kept = detection::non_max_suppression(c, IOU_THRESHOLD, usize::MAX);
                Ok(Value::Array(
                    detection::to_detections(&kept, geometry, labels)
                        .into_iter()
                        .map(|d| {
                            let mut object = Map::new();
                            object.insert(d.label, json!([d.bbox.x1, d.bbox.y1, d.bbox.x2, d.bbox.y2]));
                            object.insert("score".into(), json!(d.score));
                            Value::Object(object)
                        })
                        .collect(),
                ))
            }
            (Task::Segmentation, ModelOutput::LabelMap(map)) => {
                let full = segmentation::resample_to_original(&map, geometry);
                let width = full.width as usize;
                let rows: Vec<Value> = (0..full.height as usize)
                    .map(|y| {
                        Value::Array(
                            (y * width..(y + 1) * width)
                                .map(|i| json!([full.labels[i], full.confidence.get(i).copied().unwrap_or(1.0)]))
                                .collect(),
                        )
                    })
                    .collect();
                Ok(Value::Array(rows))
            }
            (task, _) => Err(ApiError::Internal(format!("worker output does not match task {task:?}"))),
        })
        .collect()
}
