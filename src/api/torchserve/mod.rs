//! TorchServe's inference API, so a client written for TorchServe works unchanged:
//! `GET /ping` and `POST /predictions/{model}[/{version}]` with the raw image as the body
//! (`curl -T image.jpg`), a multipart field (`data` or `body`), or base64 text. Answers take
//! the shapes of TorchServe's default handlers:
//! - image_classifier: `{"<label>": probability, ...}`, the top 5, best first;
//! - object_detector: `[{"<label>": [x1, y1, x2, y2], "score": s}, ...]`, scores ≥ 0.5;
//! - image_segmenter: `[H][W][2]` of `[class_index, probability]` per pixel.
//!
//! One image gives its answer; several (multipart) give a list of answers, in order.

mod kserve;
mod management;

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, options, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use crate::api::input::{body_bytes, decode_base64, ImageUploads};
use crate::api::model_path::ModelPath;
use crate::api::AppState;
use crate::engine::Arrival;
use crate::error::ApiError;
use crate::repository::{PipelineEntry, Servable};
use crate::serve::infer::{self, answer_headers, write_pairs, Answered, ImageRequest};
use crate::serve::pipeline::{self, PipelineRun};
use crate::serve::{ImageInput, RequestContext, Target};
use crate::tasks::{keypoints, Finished, PredictParams};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ping", get(ping))
        // TorchServe's API description (`curl -X OPTIONS http://host:8080`): here the service's
        // own OpenAPI document, `/openapi.yaml` as JSON, the form TorchServe answers in.
        .route("/", options(api_description))
        .route("/api-description", get(api_description).options(api_description))
}

async fn api_description() -> Response {
    ([(CONTENT_TYPE, "application/json")], crate::api::OPENAPI_JSON).into_response()
}

pub fn management_routes() -> Router<AppState> {
    management::routes()
}

pub fn inference_routes() -> Router<AppState> {
    Router::new()
        // `curl -T image.jpg`, as TorchServe's documentation shows it, sends a PUT.
        .route("/predictions/{name}", post(predict).put(predict))
        .route("/predictions/{name}/{version}", post(predict).put(predict))
}

/// KServe V1's inference (`kserve`), counted apart in the request metrics.
pub fn kserve_routes() -> Router<AppState> {
    kserve::inference_routes()
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
        let body = body_bytes(request, state, state.limits.max_body_bytes).await?;
        let text = std::str::from_utf8(&body).map_err(|_| ApiError::BadRequest("a text/plain body must be base64 text".into()))?;
        let image = decode_base64(text.trim()).map_err(|e| ApiError::BadRequest(format!("the body is not valid base64: {e}")))?;
        return Ok(vec![image]);
    }
    Ok(ImageUploads::from_request(request, state).await?.images)
}

async fn predict(State(state): State<AppState>, model: ModelPath, request: Request) -> Result<Response, ApiError> {
    let context = RequestContext::from_headers(request.headers(), state.limits.request_timeout_ms)?;
    let (answers, headers) = match state.repository.lookup(&model.name, model.version())? {
        Servable::Pipeline(pipeline) => {
            let images = images_of(request, &state).await?;
            pipeline_answers_for(&state, &pipeline, images, &context).await?
        }
        Servable::Model(entry) => {
            // Resolved before the body is read: an unknown or full model costs no decoding (the
            // unread upload is still read before the answer goes back: `api::unread_body`).
            let target = Target::resolve(&state, entry, &context).await?;
            let images = images_of(request, &state).await?;
            model_answers(&state, &target, images, &context).await?
        }
    };
    Ok((headers, Json(one_or_list(answers))).into_response())
}

/// A model's answer for each image, in the shape of TorchServe's default handler for its task,
/// with the timing and cache headers.
async fn model_answers(state: &AppState, target: &Target, images: Vec<Bytes>, context: &RequestContext) -> Result<(Vec<Value>, HeaderMap), ApiError> {
    let params = PredictParams::torchserve();
    let answered = infer::answer(state, target, ImageRequest::new(ImageInput::Encoded(images), params), context).await?;
    let post_started = Instant::now();
    let Answered { results, timings, cache, .. } = answered;
    let answers = state
        .run_cpu(move || tracing::info_span!("encode").in_scope(|| results.into_iter().map(handler_answer).collect::<Vec<_>>()))
        .await?;
    Ok((answers, answer_headers(timings, cache, target.name(), post_started)))
}

/// A pipeline's answer for each image (TorchServe's detector shape, each detection with its
/// classifier's top-k), with the steps' timing headers.
async fn pipeline_answers_for(
    state: &AppState,
    pipeline: &PipelineEntry,
    images: Vec<Bytes>,
    context: &RequestContext,
) -> Result<(Vec<Value>, HeaderMap), ApiError> {
    let run = pipeline::run(state, pipeline, ImageInput::Encoded(images), context, false, Arrival::New).await?;
    let mut headers = HeaderMap::new();
    write_pairs(run.timing_pairs(), &mut headers);
    Ok((pipeline_answers(&run), headers))
}

/// One image gives its answer; several give a list of answers, in order.
fn one_or_list(mut answers: Vec<Value>) -> Value {
    if answers.len() == 1 { answers.remove(0) } else { Value::Array(answers) }
}

/// A pipeline per image in TorchServe's detector shape, `{"<label>": [x1, y1, x2, y2],
/// "score": s}`, with the classifier's top-k in its classifier shape under `"classification"`.
fn pipeline_answers(run: &PipelineRun) -> Vec<Value> {
    run.images
        .iter()
        .map(|found| {
            Value::Array(
                found
                    .iter()
                    .map(|n| {
                        let d = &n.detection;
                        let mut object = Map::new();
                        object.insert(d.label.clone(), json!([d.bbox.x1, d.bbox.y1, d.bbox.x2, d.bbox.y2]));
                        object.insert("score".into(), json!(d.score));
                        let classes: Map<String, Value> = n.predictions.iter().map(|p| (p.label.clone(), json!(p.score))).collect();
                        object.insert("classification".into(), Value::Object(classes));
                        Value::Object(object)
                    })
                    .collect(),
            )
        })
        .collect()
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
        // TorchServe's Mask R-CNN example runs its object_detector handler: boxes and scores,
        // the masks left out (the /v1 and V2 answers carry them).
        Finished::InstanceSegmentation { instances } => {
            handler_answer(Finished::Detection { detections: instances.into_iter().map(|i| i.detection).collect() })
        }
        // The object_detector shape, each object with its points as COCO lays them out.
        Finished::Keypoints { poses, .. } => Value::Array(
            poses
                .into_iter()
                .map(|p| {
                    let d = p.detection;
                    let mut object = Map::new();
                    object.insert(d.label, json!([d.bbox.x1, d.bbox.y1, d.bbox.x2, d.bbox.y2]));
                    object.insert("score".into(), json!(d.score));
                    object.insert("keypoints".into(), json!(keypoints::flat_points(&p.points)));
                    Value::Object(object)
                })
                .collect(),
        ),
        // The object_detector shape, each object also with its rotated box's four corners.
        Finished::OrientedDetection { detections } => Value::Array(
            detections
                .into_iter()
                .map(|o| {
                    let d = &o.detection;
                    let mut object = Map::new();
                    object.insert(d.label.clone(), json!([d.bbox.x1, d.bbox.y1, d.bbox.x2, d.bbox.y2]));
                    object.insert("score".into(), json!(d.score));
                    object.insert("corners".into(), json!(o.rotated.corners()));
                    Value::Object(object)
                })
                .collect(),
        ),
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
        // What an embedding handler of TorchServe's returns: the vector as a list.
        Finished::Embedding { vector } => json!(vector),
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
