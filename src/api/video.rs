//! Video on `/v1`: `POST /v1/models/{name}/predict` (a model or a pipeline) with a `video/*`
//! body answers each sampled frame as it is done, one JSON object a line (`application/x-ndjson`),
//! or as server-sent events when the client accepts `text/event-stream`. Every line has an
//! `event`: `start` (the clip as FFmpeg read it, the sampling, the tracking), then a `frame`
//! per frame (`frame`, `timestamp` in seconds, `detected`, and the frame's answer in the
//! photo's `/v1` shape, each detection with its `track_id` when tracking; or its `error`),
//! then `end` (counts, and how the clip ended). The serving core does the work
//! (`serve::video`); this shell reads the upload into a temporary file, checks the parameters
//! and the clip before the status goes out, and writes the lines.

use std::collections::HashMap;
use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use super::AppState;
use crate::engine::Arrival;
use crate::error::ApiError;
use crate::model_config::Task;
use crate::pipeline::PIPELINE_VERSION;
use crate::repository::Servable;
use crate::serve::infer::{self, ImageRequest, Wants};
use crate::serve::video::{self, Clip, FrameAnswer, FrameAnswerer, FrameFuture, Tracking, VideoEvent};
use crate::serve::{pipeline, RequestContext, Target};
use crate::tasks::{PredictParams, TaskResult};
use crate::video::Sampling;

pub const NDJSON: &str = "application/x-ndjson";
const EVENT_STREAM: &str = "text/event-stream";

/// Whether a request's body is a video (`Content-Type: video/*`).
pub fn is_video(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.trim().to_ascii_lowercase().starts_with("video/"))
}

/// Tasks whose answers are boxes, which a tracker can follow.
fn has_boxes(task: Task) -> bool {
    matches!(task, Task::Detection | Task::InstanceSegmentation | Task::Keypoints)
}

pub async fn predict_video(
    state: &AppState,
    servable: Servable,
    mut raw: HashMap<String, String>,
    headers: &HeaderMap,
    body: Body,
    context: &RequestContext,
) -> Result<Response, ApiError> {
    let sampling = Sampling::take_from(&mut raw, state.video.max_frames)?;
    let tracking = Tracking::take_from(&mut raw)?;
    let events_wanted = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.split(',').any(|t| t.split(';').next().unwrap_or("").trim() == EVENT_STREAM));
    // Refused before the upload is read: an unknown or unready model, bad parameters.
    let FrameTarget { name, version, task, answer: answer_frame } = frame_target(state, servable, &raw, tracking, context, Arrival::New).await?;
    let file = spool(body, state.video.max_bytes).await?;
    let clip = Clip::probe(state, file).await?;
    let start = json!({
        "model": name, "version": version, "task": task,
        "sampling": {"fps": sampling.fps, "max_frames": sampling.max_frames, "start": sampling.start, "end": sampling.end},
        "tracking": tracking_json(tracking),
    });
    let events = video::run(state, clip, sampling, tracking, context, &name, answer_frame).await?;
    let lines = futures_util::stream::unfold((events, start), move |(mut events, start)| async move {
        let event = events.recv().await?;
        let (kind, value) = event_json(event, &start);
        let text = if events_wanted { format!("event: {kind}\ndata: {value}\n\n") } else { format!("{value}\n") };
        Some((Ok::<_, Infallible>(Bytes::from(text)), (events, start)))
    });
    let mut response = Body::from_stream(lines).into_response();
    let content_type = if events_wanted { EVENT_STREAM } else { NDJSON };
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}


/// What a video's or a stream's frames are answered by: a model (with the request's
/// parameters) or a pipeline, each frame answered as the photo's `/v1` result.
pub(super) struct FrameTarget {
    pub name: String,
    pub version: String,
    pub task: Task,
    pub answer: FrameAnswerer,
}

/// Checks the model (known, ready, a task with boxes when tracking) or pipeline and the
/// parameters, and makes its frame answerer; each frame is admitted as `arrival` (an uploaded
/// video's as a photo, a live stream's as [`Arrival::Sheddable`]).
pub(super) async fn frame_target(
    state: &AppState,
    servable: Servable,
    raw: &HashMap<String, String>,
    tracking: Option<Tracking>,
    context: &RequestContext,
    arrival: Arrival,
) -> Result<FrameTarget, ApiError> {
    let (name, version, task, answer) = match servable {
        Servable::Model(entry) => {
            let target = Target::resolve(state, entry.clone(), context).await?;
            let task = target.task();
            let params = PredictParams::from_raw(raw, task)?;
            if tracking.is_some() && !has_boxes(task) {
                return Err(ApiError::InvalidParameter(format!("'track' follows boxes; '{}' is a {task:?} model", target.name())));
            }
            let (name, version) = (target.name().to_string(), target.entry.version.clone());
            drop(target);
            let state = state.clone();
            let answer = move |input, context: RequestContext| {
                let (state, entry, params) = (state.clone(), entry.clone(), params.clone());
                Box::pin(async move {
                    let target = Target::resolve_as(&state, entry, &context, arrival).await?;
                    // Frames are not seen twice: cached, they would only evict photos' results.
                    let request = ImageRequest { input, params: params.clone(), wants: Wants { uncached: true, ..Wants::default() } };
                    let answered = infer::answer(&state, &target, request, &context).await?;
                    let labels = answered.labels;
                    let results = state
                        .run_cpu(move || TaskResult::from_request(answered.results, &labels, &params))
                        .await?
                        .map_err(|e| ApiError::Internal(format!("mask encoding failed: {e}")))?;
                    let first = results.into_iter().next().ok_or_else(|| ApiError::Internal("no result for the frame".into()))?;
                    serde_json::to_value(first).map_err(|e| ApiError::Internal(e.to_string()))
                }) as FrameFuture
            };
            (name, version, task, Box::new(answer) as FrameAnswerer)
        }
        Servable::Pipeline(entry) => {
            if let Some(key) = raw.keys().next() {
                return Err(ApiError::InvalidParameter(format!(
                    "pipeline '{}' takes no parameters (got '{key}'): its steps are set in its pipeline.toml",
                    entry.name
                )));
            }
            let name = entry.name.clone();
            let state = state.clone();
            let answer = move |input, context: RequestContext| {
                let (state, entry) = (state.clone(), entry.clone());
                Box::pin(async move {
                    let run = pipeline::run(&state, &entry, input, &context, false, arrival).await?;
                    let mut answer = super::pipeline_v1::answer(&run);
                    Ok(answer["results"][0].take())
                }) as FrameFuture
            };
            (name, PIPELINE_VERSION.to_string(), Task::Detection, Box::new(answer) as FrameAnswerer)
        }
    };
    Ok(FrameTarget { name, version, task, answer })
}

/// The upload, written to a temporary file as it arrives (FFmpeg seeks in it: an MP4's index
/// may be at its end), at most `limit` bytes.
async fn spool(body: Body, limit: usize) -> Result<tempfile::TempPath, ApiError> {
    let internal = |e: std::io::Error| ApiError::Internal(format!("could not spool the video: {e}"));
    let (file, path) = tempfile::Builder::new().prefix("visionserve-video-").tempfile().map_err(internal)?.into_parts();
    let mut file = tokio::fs::File::from_std(file);
    let mut chunks = body.into_data_stream();
    let mut written = 0usize;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("could not read the request body: {e}")))?;
        written += chunk.len();
        if written > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        file.write_all(&chunk).await.map_err(internal)?;
    }
    if written == 0 {
        return Err(ApiError::BadRequest("the request holds no video".into()));
    }
    file.flush().await.map_err(internal)?;
    Ok(path)
}

/// A request's tracking as its answer restates it.
pub(super) fn tracking_json(tracking: Option<Tracking>) -> Value {
    // Thresholds as they were written, not as f32 reads back (0.8, not 0.800000011920929).
    let written = |v: f32| (f64::from(v) * 1e6).round() / 1e6;
    tracking.map_or(Value::Null, |t| {
        json!({
            "tracker": "bytetrack", "track_threshold": written(t.settings.track_threshold), "track_match_threshold": written(t.settings.match_threshold),
            "track_lost_frames": t.settings.lost_frames, "detect_every": t.detect_every,
        })
    })
}

/// A frame's line: its index, timestamp and whether the model ran, then its answer's fields
/// (or its `error`).
pub(super) fn frame_json(frame: &FrameAnswer) -> Value {
    let mut value = json!({"event": "frame", "frame": frame.index, "timestamp": frame.timestamp, "detected": frame.detected});
    match &frame.result {
        Ok(Value::Object(fields)) => {
            for (k, v) in fields {
                value[k] = v.clone();
            }
        }
        Ok(other) => value["result"] = other.clone(),
        Err(e) => {
            e.log();
            value["error"] = json!({"code": e.code(), "message": e.to_string()});
        }
    }
    value
}

fn event_json(event: VideoEvent, start: &Value) -> (&'static str, Value) {
    match event {
        VideoEvent::Start(info) => {
            let mut value = json!({"event": "start"});
            for (k, v) in start.as_object().expect("an object") {
                value[k] = v.clone();
            }
            value["video"] = json!(info);
            ("start", value)
        }
        VideoEvent::Frame(frame) => ("frame", frame_json(&frame)),
        VideoEvent::End(summary) => {
            let mut value = json!({"event": "end"});
            if let Value::Object(fields) = json!(summary) {
                for (k, v) in fields {
                    value[k] = v;
                }
            }
            ("end", value)
        }
    }
}
