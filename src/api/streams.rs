//! Live streams on `/v1`: `POST /v1/streams` starts one (a source, a model or pipeline, its
//! parameters, and how frames are taken and dropped), `GET /v1/streams` and
//! `GET /v1/streams/{id}` tell how each is doing (frames read, processed, dropped, failed,
//! reconnects, latency), `DELETE /v1/streams/{id}` stops one, and
//! `GET /v1/streams/{id}/events` follows its answers as server-sent events: a `frame` event
//! per frame answered (the same line as a video file's, with `latency_ms`), `state` when its
//! source is lost (`reconnecting`) and read again (`running`), `end` when it is over. The
//! serving core runs them (`serve::streams`); this shell checks the request and writes JSON.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use super::video::{frame_json, frame_target, tracking_json, FrameTarget};
use super::AppState;
use crate::error::ApiError;
use crate::serve::streams::{DropPolicy, LiveStream, Published, StreamEvent, StreamRequest};
use crate::serve::video::Tracking;
use crate::serve::RequestContext;
use crate::video::StreamSource;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/streams", get(list).post(start))
        .route("/v1/streams/{id}", get(show).delete(remove))
        .route("/v1/streams/{id}/events", get(events))
}

/// `POST /v1/streams`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    /// `rtsp://`, `rtsps://`, `http(s)://` (MJPEG or HLS), or `file:///`.
    source: String,
    /// A model or a pipeline.
    model: String,
    version: Option<String>,
    /// The model's parameters (as on `/v1/models/{name}/predict`) and the tracking ones
    /// (`track`, `detect_every`, ...).
    #[serde(default)]
    parameters: HashMap<String, Value>,
    /// Most frames a second answered (the source's others are skipped); unset, all.
    max_fps: Option<f64>,
    #[serde(default)]
    drop_policy: Option<String>,
    /// Frames that may wait for the model (1..=64).
    buffer: Option<usize>,
    /// Play a file source again from its start when it ends.
    #[serde(default, rename = "loop")]
    looped: bool,
    /// A frame the model cannot answer within this many milliseconds is dropped (50..=60000).
    frame_deadline_ms: Option<u64>,
}

const DEFAULT_BUFFER: usize = 2;
const DEFAULT_FRAME_DEADLINE_MS: u64 = 1000;

async fn start(State(state): State<AppState>, headers: HeaderMap, body: Result<Json<StartBody>, JsonRejection>) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::BadRequest(format!("a stream is started with a JSON body: {}", e.body_text())))?;
    let context = RequestContext::from_headers(&headers, state.limits.request_timeout_ms)?;
    state.streams.check_on()?;
    let mut source = StreamSource::parse(&body.source).map_err(ApiError::InvalidParameter)?;
    source.looped = body.looped;
    if body.looped && !source.is_file() {
        return Err(ApiError::InvalidParameter("'loop' is for file sources; a live source is reopened when it ends".into()));
    }
    // The allow-list first: a source not allowed is refused before anything else is said of it.
    state.streams.check_allowed(&source)?;
    let policy = match body.drop_policy.as_deref() {
        None => DropPolicy::DropOldest,
        Some(text) => DropPolicy::parse(text)
            .ok_or_else(|| ApiError::InvalidParameter(format!("'drop_policy' must be wait, drop_oldest or drop_newest, got '{text}'")))?,
    };
    let buffer = body.buffer.unwrap_or(DEFAULT_BUFFER);
    if !(1..=64).contains(&buffer) {
        return Err(ApiError::InvalidParameter(format!("'buffer' must be within 1..=64 frames, got {buffer}")));
    }
    if let Some(fps) = body.max_fps {
        if !(fps.is_finite() && (0.01..=240.0).contains(&fps)) {
            return Err(ApiError::InvalidParameter(format!("'max_fps' must be within 0.01..=240, got {fps}")));
        }
    }
    let frame_deadline_ms = body.frame_deadline_ms.unwrap_or(DEFAULT_FRAME_DEADLINE_MS);
    if !(50..=60_000).contains(&frame_deadline_ms) {
        return Err(ApiError::InvalidParameter(format!("'frame_deadline_ms' must be within 50..=60000, got {frame_deadline_ms}")));
    }
    let mut raw: HashMap<String, String> = body
        .parameters
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            (k, text)
        })
        .collect();
    let tracking = Tracking::take_from(&mut raw)?;
    let servable = state.repository.lookup(&body.model, body.version.as_deref())?;
    let FrameTarget { name, version, answer, .. } = frame_target(&state, servable, &raw, tracking, &context).await?;
    let described = json!({"parameters": raw, "tracking": tracking_json(tracking)});
    let request = StreamRequest { source, max_fps: body.max_fps, policy, buffer, tracking, frame_deadline_ms, model: name, version, described };
    let stream = state.streams.start(&state, request, answer).await?;
    let mut response = (StatusCode::CREATED, Json(stream.status())).into_response();
    if let Ok(location) = format!("/v1/streams/{}", stream.id).parse() {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

async fn list(State(state): State<AppState>) -> Json<Value> {
    let streams: Vec<_> = state.streams.list().iter().map(|s| s.status()).collect();
    Json(json!({"streams": streams}))
}

async fn show(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(state.streams.get(&id)?.status()).into_response())
}

async fn remove(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(state.streams.remove(&id)?).into_response())
}

/// The stream's answers as they come, each event numbered (its SSE `id`). A client that
/// sends `Last-Event-ID` (as a browser's EventSource does when it reconnects), or asks
/// `?last_event_id=N`, first gets the events after it that the stream still keeps (the last
/// 128). A subscriber too slow for the stream misses events (a `lagged` event says how many)
/// rather than hold the stream back.
async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let stream = state.streams.get(&id)?;
    let after = match headers.get("last-event-id").and_then(|v| v.to_str().ok()).or(query.get("last_event_id").map(String::as_str)) {
        None => None,
        Some(text) => Some(text.trim().parse::<u64>().map_err(|_| ApiError::InvalidParameter(format!("'Last-Event-ID' must be an event number, got '{text}'")))?),
    };
    let (replay, receiver) = stream.subscribe(after);
    let over = stream.is_over() && replay.iter().all(|(_, e)| !matches!(**e, StreamEvent::End { .. }));
    let backlog: std::collections::VecDeque<Published> = replay.into();
    let events = futures_util::stream::unfold((backlog, receiver, Some(stream), over), |(mut backlog, mut receiver, stream, over)| async move {
        let stream: Arc<LiveStream> = stream?;
        if over {
            let event = Event::default().event("end").json_data(json!({"event": "end", "stream": stream.status()})).ok()?;
            return Some((Ok::<_, Infallible>(event), (backlog, receiver, None, true)));
        }
        let (number, event) = match backlog.pop_front() {
            Some(published) => published,
            None => match receiver.recv().await {
                Ok(published) => published,
                Err(RecvError::Lagged(missed)) => {
                    let event = Event::default().event("lagged").json_data(json!({"event": "lagged", "missed": missed})).ok()?;
                    return Some((Ok(event), (backlog, receiver, Some(stream), false)));
                }
                Err(RecvError::Closed) => return None,
            },
        };
        let (event, last) = match &*event {
            StreamEvent::Frame { answer, latency_ms } => {
                let mut value = frame_json(answer);
                value["latency_ms"] = json!((latency_ms * 1000.0).round() / 1000.0);
                (Event::default().event("frame").json_data(value), false)
            }
            StreamEvent::State { state, reason } => (Event::default().event("state").json_data(json!({"event": "state", "state": state, "reason": reason})), false),
            StreamEvent::End { .. } => (Event::default().event("end").json_data(json!({"event": "end", "stream": stream.status()})), true),
        };
        let event = event.ok()?.id(number.to_string());
        Some((Ok(event), (backlog, receiver, (!last).then_some(stream), false)))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
}
