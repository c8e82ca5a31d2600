//! `POST /v1/models/{name}[/versions/{version}]/predict`, the /v1 shell: the request's images
//! and parameters → the serving core → the finished results as `/v1` JSON, or drawn on the
//! image as a PNG, with timing headers. A pipeline's `/v1` shape lives here too.

use std::collections::HashMap;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Query, Request, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;

use super::input::ImageUploads;
use super::model_path::ModelPath;
use super::{pipeline_v1, video};
use super::AppState;
use crate::cache::{CacheKey, Cached};
use crate::engine::Arrival;
use crate::error::ApiError;
use crate::render;
use crate::repository::{PipelineEntry, Servable};
use crate::serve::infer::{self, answer_headers, write_cache, write_pairs, Answered, CacheOutcome, ImageRequest, Wants};
use crate::serve::pipeline;
use crate::serve::{ImageInput, RequestContext, Target};
use crate::model_config::Task;
use crate::tasks::{PredictParams, TaskResult};

pub fn inference_routes() -> Router<AppState> {
    Router::new()
        .route("/v1/models/{name}/predict", post(predict))
        .route("/v1/models/{name}/versions/{version}/predict", post(predict))
}

async fn predict(
    State(state): State<AppState>,
    model: ModelPath,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let context = RequestContext::from_headers(&headers, state.limits.request_timeout_ms)?;
    let Query(mut raw) = query.map_err(|e| ApiError::InvalidParameter(format!("malformed query string: {}", e.body_text())))?;
    if video::is_video(&headers) {
        let servable = state.repository.lookup(&model.name, model.version())?;
        return video::predict_video(&state, servable, raw, &headers, request.into_body(), &context).await;
    }
    let uploads = ImageUploads::from_request(request, &state).await?;
    raw.extend(uploads.body_parameters);
    let render = wants_png(raw.remove("render").as_deref(), &headers)?;
    if render && uploads.images.len() != 1 {
        return Err(ApiError::InvalidParameter(format!(
            "a rendered overlay takes exactly one image, got {}",
            uploads.images.len()
        )));
    }
    let entry = match state.repository.lookup(&model.name, model.version())? {
        Servable::Pipeline(pipeline) => return predict_pipeline(&state, &pipeline, raw, uploads.images, render, &context).await,
        Servable::Model(entry) => entry,
    };
    let target = Target::resolve(&state, entry, &context).await?;
    let params = PredictParams::from_raw(&raw, target.task())?;
    let images = uploads.images;
    if render && target.task() == Task::Embedding {
        return Err(ApiError::InvalidParameter("an embedding has nothing to draw on the image: ask for JSON (render=json)".into()));
    }
    if render {
        return predict_overlay(&state, &target, images, params, &context).await;
    }
    let answered = infer::answer(&state, &target, ImageRequest::new(ImageInput::Encoded(images), params), &context).await?;

    let post_started = Instant::now();
    let Answered { results, timings, labels, cache, .. } = answered;
    let results = state
        .run_cpu(move || {
            let _encode = tracing::info_span!("encode").entered();
            TaskResult::from_request(results, &labels, &params).map_err(|e| ApiError::Internal(format!("mask encoding failed: {e}")))
        })
        .await??;
    let task = target.task();
    let body = json!({"model": target.name(), "version": target.entry.version, "task": task, "results": results});
    let headers = answer_headers(timings, cache, target.name(), post_started);
    Ok((headers, Json(body)).into_response())
}

fn png_response(png: Bytes) -> Response {
    ([(header::CONTENT_TYPE, "image/png")], png).into_response()
}

/// The result drawn on the image, as a PNG; the response cache keeps overlays apart from JSON.
async fn predict_overlay(
    state: &AppState,
    target: &Target,
    mut images: Vec<Bytes>,
    params: PredictParams,
    context: &RequestContext,
) -> Result<Response, ApiError> {
    let image = images.pop().ok_or_else(|| ApiError::BadRequest("no image".into()))?;
    let key = CacheKey::new(target.name(), &target.entry.version, target.entry.generation, &[&image], &params, true);
    if let Some(cache) = &state.cache {
        if let Some(Cached::Overlay(png)) = cache.get(&key) {
            let mut response = png_response(png);
            write_cache(Some(CacheOutcome::Hit), response.headers_mut());
            return Ok(response);
        }
    }
    // The decoded original comes back to be drawn on.
    let wants = Wants { original: true, ..Wants::default() };
    let answered = infer::answer(state, target, ImageRequest { input: ImageInput::Encoded(vec![image]), params, wants }, context).await?;
    let post_started = Instant::now();
    let Answered { results, timings, labels, original, .. } = answered;
    let mut image = original.ok_or_else(|| ApiError::Internal("no decoded image to draw on".into()))?;
    let png = state
        .run_cpu(move || {
            let _encode = tracing::info_span!("encode").entered();
            let first = results.first().ok_or_else(|| ApiError::Internal("no output to render".into()))?;
            render::draw_result(&mut image, first, &labels);
            render::encode_png(&image).map_err(|e| ApiError::Internal(format!("PNG encoding failed: {e}")))
        })
        .await??;
    let png = Bytes::from(png);
    let outcome = state.cache.as_ref().map(|cache| {
        cache.put(key, Cached::Overlay(png.clone()));
        CacheOutcome::Miss
    });
    let headers = answer_headers(timings, outcome, target.name(), post_started);
    Ok((headers, png_response(png)).into_response())
}

/// A pipeline on /v1: nested JSON, or its detections drawn with the classifier's labels.
async fn predict_pipeline(
    state: &AppState,
    pipeline: &PipelineEntry,
    raw: HashMap<String, String>,
    images: Vec<Bytes>,
    render: bool,
    context: &RequestContext,
) -> Result<Response, ApiError> {
    if let Some(name) = raw.keys().next() {
        return Err(ApiError::InvalidParameter(format!(
            "pipeline '{}' takes no parameters (got '{name}'): its steps are set in its pipeline.toml",
            pipeline.name
        )));
    }
    let run = pipeline::run(state, pipeline, ImageInput::Encoded(images), context, render, Arrival::New).await?;
    let mut response = match run.original.clone() {
        Some(mut image) => {
            let drawn = run.overlay();
            let png = state
                .run_cpu(move || {
                    render::draw_result(&mut image, &drawn, &[]);
                    render::encode_png(&image).map_err(|e| ApiError::Internal(format!("PNG encoding failed: {e}")))
                })
                .await??;
            png_response(Bytes::from(png))
        }
        None => Json(pipeline_v1::answer(&run)).into_response(),
    };
    write_pairs(run.timing_pairs(), response.headers_mut());
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
