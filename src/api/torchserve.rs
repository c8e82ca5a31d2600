//! TorchServe's inference API, so a client written for TorchServe works unchanged:
//! `GET /ping` and `POST /predictions/{model}[/{version}]` with the raw image as the body
//! (`curl -T image.jpg`), a multipart field (`data` or `body`), or base64 text. Answers take
//! the shapes of TorchServe's default handlers:
//! - image_classifier: `{"<label>": probability, ...}`, the top 5, best first;
//! - object_detector: `[{"<label>": [x1, y1, x2, y2], "score": s}, ...]`, scores ≥ 0.5;
//! - image_segmenter: `[H][W][2]` of `[class_index, probability]` per pixel.
//!
//! One image gives its answer; several (multipart) give a list of answers, in order.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::inference::{self, Answered, CacheOutcome, RequestContext, Target};
use super::input::{decode_base64, ImageUploads};
use super::model_path::ModelPath;
use super::pipeline::{self, PipelineInput};
use super::AppState;
use crate::error::ApiError;
use crate::image::DecodeLimits;
use crate::model_config::ModelConfig;
use crate::tasks::{Finished, PredictParams};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ping", get(ping))
        // `curl -T image.jpg`, as TorchServe's documentation shows it, sends a PUT.
        .route("/predictions/{name}", post(predict).put(predict))
        .route("/predictions/{name}/{version}", post(predict).put(predict))
}

/// The repository's one readiness rule, in TorchServe's words.
async fn ping(State(state): State<AppState>) -> Response {
    if state.repository.readiness().is_ready() {
        Json(json!({"status": "Healthy"})).into_response()
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"status": "Unhealthy"}))).into_response()
    }
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

async fn predict(State(state): State<AppState>, model: ModelPath, request: Request) -> Result<Response, ApiError> {
    let context = RequestContext::from_headers(request.headers(), state.limits.request_timeout_ms)?;
    if let Some(pipeline) = state.repository.pipeline(&model.name) {
        pipeline::check_version(&pipeline, model.version())?;
        let images = images_of(request, &state).await?;
        let run = pipeline::run(&state, &pipeline, PipelineInput::Encoded(images), &context, false).await?;
        let mut answers = run.torchserve_json();
        let body = if answers.len() == 1 { answers.remove(0) } else { Value::Array(answers) };
        let mut response = Json(body).into_response();
        run.timing_headers(response.headers_mut());
        return Ok(response);
    }
    // Resolved before the body is read: an unknown or full model costs no upload.
    let target = Target::resolve(&state, &model.name, model.version(), &context).await?;
    let images = images_of(request, &state).await?;
    let limits = DecodeLimits { max_pixels: state.limits.max_image_pixels };
    let identities = images.iter().map(|image| vec![image.clone()]).collect();
    let prepare = move |config: &ModelConfig| super::predict::prepare_all(&images, config, limits, false);
    let params = PredictParams::torchserve();
    let answered = inference::answer(&state, &target, Some(identities), prepare, params, false, &context).await?;
    let post_started = Instant::now();
    let Answered { results, timings, cache, .. } = answered;
    let mut answers = state
        .run_cpu(move || tracing::info_span!("encode").in_scope(|| results.into_iter().map(handler_answer).collect::<Vec<_>>()))
        .await?;
    let body = if answers.len() == 1 { answers.remove(0) } else { Value::Array(answers) };
    let mut response = Json(body).into_response();
    if let Some(timings) = timings {
        timings.finish(target.name(), post_started.elapsed(), response.headers_mut());
    }
    CacheOutcome::write(cache, response.headers_mut());
    Ok(response)
}

/// One image's result in the shape of TorchServe's default handler for its task.
fn handler_answer(result: Finished) -> Value {
    match result {
        Finished::Classification { top, .. } => {
            let mut object = Map::new();
            for prediction in top {
                object.insert(prediction.label, json!(prediction.score));
            }
            Value::Object(object)
        }
        Finished::Detection { detections } => Value::Array(
            detections
                .into_iter()
                .map(|d| {
                    let mut object = Map::new();
                    object.insert(d.label, json!([d.bbox.x1, d.bbox.y1, d.bbox.x2, d.bbox.y2]));
                    object.insert("score".into(), json!(d.score));
                    Value::Object(object)
                })
                .collect(),
        ),
        Finished::Segmentation { mask } => {
            let width = mask.width as usize;
            let rows = (0..mask.height as usize).map(|y| {
                Value::Array(
                    (y * width..(y + 1) * width)
                        .map(|i| json!([mask.labels[i], mask.confidence.get(i).copied().unwrap_or(1.0)]))
                        .collect(),
                )
            });
            Value::Array(rows.collect())
        }
    }
}
