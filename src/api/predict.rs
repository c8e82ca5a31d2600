//! `POST /v1/models/{name}[/versions/{version}]/predict`: parse → the shared inference path →
//! the finished results as `/v1` JSON or drawn on the image as a PNG, with timing headers.

use std::collections::HashMap;
use std::time::Instant;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;

use super::inference::{self, Answered, CacheOutcome, RequestContext, Target};
use super::input::ImageUploads;
use super::model_path::ModelPath;
use super::pipeline::{self, PipelineInput};
use super::AppState;
use crate::cache::{CacheKey, Cached};
use crate::error::ApiError;
use crate::metrics as m;
use crate::image::{decode_scaled, decode_size_needed, preprocess_decoded, DecodeLimits, PreparedImage};
use crate::model_config::ModelConfig;
use crate::render;
use crate::repository::PipelineEntry;
use crate::tasks::{PredictParams, TaskResult};
use image::RgbImage;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/models/{name}/predict", post(predict))
        .route("/v1/models/{name}/versions/{version}/predict", post(predict))
}

async fn predict(
    State(state): State<AppState>,
    model: ModelPath,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    uploads: ImageUploads,
) -> Result<Response, ApiError> {
    let context = RequestContext::from_headers(&headers, state.limits.request_timeout_ms)?;
    let Query(mut raw) = query.map_err(|e| ApiError::InvalidParameter(format!("malformed query string: {}", e.body_text())))?;
    raw.extend(uploads.body_parameters);
    let render = wants_png(raw.remove("render").as_deref(), &headers)?;
    if render && uploads.images.len() != 1 {
        return Err(ApiError::InvalidParameter(format!(
            "a rendered overlay takes exactly one image, got {}",
            uploads.images.len()
        )));
    }
    if let Some(pipeline) = state.repository.pipeline(&model.name) {
        return predict_pipeline(&state, &pipeline, model.version(), raw, uploads.images, render, &context).await;
    }
    let target = Target::resolve(&state, &model.name, model.version(), &context).await?;
    let params = PredictParams::from_raw(&raw, target.task())?;

    let limits = DecodeLimits { max_pixels: state.limits.max_image_pixels };
    let images = uploads.images;
    if render {
        return predict_overlay(&state, &target, images, params, &context).await;
    }
    let identities = images.iter().map(|image| vec![image.clone()]).collect();
    let prepare = move |config: &ModelConfig| prepare_all(&images, config, limits, false);
    let answered = inference::answer(&state, &target, Some(identities), prepare, params, false, &context).await?;

    let post_started = Instant::now();
    let Answered { results, timings, labels, cache, .. } = answered;
    let results = state
        .run_cpu(move || {
            let _encode = tracing::info_span!("encode").entered();
            results
                .into_iter()
                .map(|finished| {
                    TaskResult::from_finished(finished, &labels, params.mask_format)
                        .map_err(|e| ApiError::Internal(format!("mask encoding failed: {e}")))
                })
                .collect::<Result<Vec<_>, ApiError>>()
        })
        .await??;
    let task = target.task();
    let mut response =
        Json(json!({"model": target.name(), "version": target.entry.version, "task": task, "results": results})).into_response();
    if let Some(timings) = timings {
        timings.finish(target.name(), post_started.elapsed(), response.headers_mut());
    }
    CacheOutcome::write(cache, response.headers_mut());
    Ok(response)
}

/// The result drawn on the image, as a PNG; the response cache keeps overlays apart from JSON.
async fn predict_overlay(
    state: &AppState,
    target: &Target,
    mut images: Vec<axum::body::Bytes>,
    params: PredictParams,
    context: &RequestContext,
) -> Result<Response, ApiError> {
    let image = images.pop().ok_or_else(|| ApiError::BadRequest("no image".into()))?;
    let key = CacheKey::new(target.name(), &target.entry.version, target.entry.generation, &[&image], &params, true);
    let png_response = |png: axum::body::Bytes| ([(header::CONTENT_TYPE, "image/png")], png).into_response();
    if let Some(cache) = &state.cache {
        if let Some(Cached::Overlay(png)) = cache.get(&key) {
            let mut response = png_response(png);
            CacheOutcome::write(Some(CacheOutcome::Hit), response.headers_mut());
            return Ok(response);
        }
    }
    let limits = DecodeLimits { max_pixels: state.limits.max_image_pixels };
    // The decoded original comes back to be drawn on.
    let prepare = move |config: &ModelConfig| prepare_all(&[image], config, limits, true);
    let answered = inference::answer(state, target, None, prepare, params, false, context).await?;
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
    let png = axum::body::Bytes::from(png);
    let outcome = state.cache.as_ref().map(|cache| {
        cache.put(key, Cached::Overlay(png.clone()));
        CacheOutcome::Miss
    });
    let mut response = png_response(png);
    if let Some(timings) = timings {
        timings.finish(target.name(), post_started.elapsed(), response.headers_mut());
    }
    CacheOutcome::write(outcome, response.headers_mut());
    Ok(response)
}

/// A pipeline on /v1: nested JSON, or its detections drawn with the classifier's labels.
async fn predict_pipeline(
    state: &AppState,
    pipeline: &PipelineEntry,
    version: Option<&str>,
    raw: HashMap<String, String>,
    images: Vec<axum::body::Bytes>,
    render: bool,
    context: &RequestContext,
) -> Result<Response, ApiError> {
    pipeline::check_version(pipeline, version)?;
    if let Some(name) = raw.keys().next() {
        return Err(ApiError::InvalidParameter(format!(
            "pipeline '{}' takes no parameters (got '{name}'): its steps are set in its pipeline.toml",
            pipeline.name
        )));
    }
    let run = pipeline::run(state, pipeline, PipelineInput::Encoded(images), context, render).await?;
    let mut response = match run.original.clone() {
        Some(mut image) => {
            let drawn = run.overlay();
            let png = state
                .run_cpu(move || {
                    render::draw_result(&mut image, &drawn, &[]);
                    render::encode_png(&image).map_err(|e| ApiError::Internal(format!("PNG encoding failed: {e}")))
                })
                .await??;
            ([(header::CONTENT_TYPE, "image/png")], png).into_response()
        }
        None => Json(run.v1_json()).into_response(),
    };
    run.timing_headers(response.headers_mut());
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
/// be drawn on it. A JPEG larger than the model needs is decoded at a reduced scale, except
/// when an overlay is drawn (it is drawn on the full image).
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
        let needed = |w, h| if keep_original { None } else { decode_size_needed(&config.input, w, h) };
        let span = tracing::info_span!("decode", bytes = bytes.len(), width = tracing::field::Empty, height = tracing::field::Empty);
        let decoded = span
            .in_scope(|| decode_scaled(bytes, limits, needed))
            .map_err(|e| ApiError::InvalidImage(format!("{which}{e}")))?;
        span.record("width", i64::from(decoded.original.0)).record("height", i64::from(decoded.original.1));
        drop(span);
        if decoded.is_scaled() {
            metrics::counter!(m::SCALED_DECODES, "scale" => decoded.scale_name()).increment(1);
        }
        let preprocessed = tracing::info_span!("preprocess").in_scope(|| preprocess_decoded(&decoded, &config.input));
        prepared.push(preprocessed.map_err(|e| ApiError::Internal(format!("{which}{e}")))?);
        if keep_original && original.is_none() {
            original = Some(decoded.image);
        }
    }
    Ok((prepared, original))
}
