//! Live streams on `/v1`: `POST /v1/streams` starts one (a source, a model or pipeline, its
//! parameters, and how frames are taken and dropped), `GET /v1/streams` and
//! `GET /v1/streams/{id}` tell how each is doing (frames read, processed, dropped, failed,
//! reconnects, latency), `DELETE /v1/streams/{id}` stops one, and
//! `GET /v1/streams/{id}/events` follows its answers as server-sent events (or
//! `GET /v1/streams/{id}/ws`, the same messages over a WebSocket): a `frame` event
//! per frame answered (the same line as a video file's, with `latency_ms`), `state` when its
//! source is lost (`reconnecting`) and read again (`running`), `end` when it is over. The
//! serving core runs them (`serve::streams`); this shell checks the request and writes JSON.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use super::video::{frame_json, frame_target, tracking_json, FrameTarget};
use super::AppState;
use crate::engine::Arrival;
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
        .route("/v1/streams/{id}/ws", get(websocket))
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
    // A stream that drops frames sheds them first as a queue grows; one that waits (`wait`:
    // every frame answered, the source slowed) is admitted as a photo is.
    let arrival = if policy == DropPolicy::Wait { Arrival::New } else { Arrival::Sheddable };
    let FrameTarget { name, version, answer, .. } = frame_target(&state, servable, &raw, tracking, &context, arrival).await?;
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

/// One message a subscriber is sent, whatever carries it (SSE, WebSocket, gRPC): its number
/// (none for `lagged` and for the `end` of a stream that was over before the subscriber came),
/// its kind and its JSON.
pub(crate) struct Outgoing {
    pub number: Option<u64>,
    pub kind: &'static str,
    pub body: Value,
}

/// The subscriber's messages: first the kept events after `after`, then each as it is
/// published, ending with the stream's `end`. A subscriber too slow for the stream misses
/// events (a `lagged` message says how many) rather than hold the stream back.
pub(crate) fn follow(stream: Arc<LiveStream>, after: Option<u64>) -> impl futures_util::Stream<Item = Outgoing> + Send {
    let (replay, receiver) = stream.subscribe(after);
    let over = stream.is_over() && replay.iter().all(|(_, e)| !matches!(**e, StreamEvent::End { .. }));
    let backlog: std::collections::VecDeque<Published> = replay.into();
    futures_util::stream::unfold((backlog, receiver, Some(stream), over), |(mut backlog, mut receiver, stream, over)| async move {
        let stream: Arc<LiveStream> = stream?;
        if over {
            let end = Outgoing { number: None, kind: "end", body: json!({"event": "end", "stream": stream.status()}) };
            return Some((end, (backlog, receiver, None, true)));
        }
        let (number, event) = match backlog.pop_front() {
            Some(published) => published,
            None => match receiver.recv().await {
                Ok(published) => published,
                Err(RecvError::Lagged(missed)) => {
                    let lagged = Outgoing { number: None, kind: "lagged", body: json!({"event": "lagged", "missed": missed}) };
                    return Some((lagged, (backlog, receiver, Some(stream), false)));
                }
                Err(RecvError::Closed) => return None,
            },
        };
        let (kind, body) = match &*event {
            StreamEvent::Frame { answer, latency_ms } => {
                let mut value = frame_json(answer);
                value["latency_ms"] = json!((latency_ms * 1000.0).round() / 1000.0);
                ("frame", value)
            }
            StreamEvent::State { state, reason } => ("state", json!({"event": "state", "state": state, "reason": reason})),
            StreamEvent::End { .. } => ("end", json!({"event": "end", "stream": stream.status()})),
        };
        let last = kind == "end";
        Some((Outgoing { number: Some(number), kind, body }, (backlog, receiver, (!last).then_some(stream), false)))
    })
}

/// The event number to replay after: `Last-Event-ID` (as a browser's EventSource sends when it
/// reconnects) or `?last_event_id=N`.
fn replay_after(headers: &HeaderMap, query: &HashMap<String, String>) -> Result<Option<u64>, ApiError> {
    match headers.get("last-event-id").and_then(|v| v.to_str().ok()).or(query.get("last_event_id").map(String::as_str)) {
        None => Ok(None),
        Some(text) => text
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| ApiError::InvalidParameter(format!("'Last-Event-ID' must be an event number, got '{text}'"))),
    }
}

/// The stream's answers as server-sent events, each numbered (its SSE `id`); a client that
/// sends `Last-Event-ID`, or asks `?last_event_id=N`, first gets the events after it that the
/// stream still keeps (the last 128).
async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let stream = state.streams.get(&id)?;
    let after = replay_after(&headers, &query)?;
    let events = follow(stream, after).filter_map(|out| async move {
        let event = Event::default().event(out.kind).json_data(out.body).ok()?;
        Some(Ok::<_, Infallible>(match out.number {
            Some(number) => event.id(number.to_string()),
            None => event,
        }))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
}

/// The same messages over a WebSocket, for clients that have one and not SSE: each a text
/// message holding the event's JSON with its number as `id`; `?last_event_id=N` replays as on
/// SSE. The server closes the socket (code 1000) after `end`; what the client sends is ignored
/// but a close, which ends the subscription (the stream goes on).
async fn websocket(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let stream = state.streams.get(&id)?;
    check_origin(&headers, &state.streams.settings.browser_origins)?;
    let after = replay_after(&headers, &query)?;
    let upgrade = upgrade.map_err(|rejection| ApiError::BadRequest(format!("not a WebSocket upgrade: {}", rejection.body_text())))?;
    Ok(upgrade.on_upgrade(move |socket| send_over_websocket(socket, follow(stream, after))))
}

/// A browser opens a WebSocket to any origin and lets the page read it, CORS or not, so a
/// page elsewhere could read a stream's answers through its visitor (cross-site WebSocket
/// hijacking). A request with an `Origin` must come from the server's own origin or one the
/// operator allows (`--cors-origins`, `*` for any); one without (not a browser) is let in.
fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let same_origin = url::Url::parse(origin).is_ok_and(|o| {
        let authority = match o.port() {
            Some(port) => format!("{}:{port}", o.host_str().unwrap_or_default()),
            None => o.host_str().unwrap_or_default().to_string(),
        };
        host.is_some_and(|h| h.eq_ignore_ascii_case(&authority))
    });
    // The allowed origins as the CORS layer matches them: `*`, or the header's exact value.
    if same_origin || allowed.iter().any(|a| a == "*" || a == origin) {
        return Ok(());
    }
    Err(ApiError::Forbidden(format!(
        "a page from {origin} may not follow streams over a WebSocket: the server allows its own origin and those of --cors-origins"
    )))
}

async fn send_over_websocket(mut socket: WebSocket, messages: impl futures_util::Stream<Item = Outgoing> + Send) {
    let mut messages = std::pin::pin!(messages);
    loop {
        tokio::select! {
            next = messages.next() => {
                let Some(out) = next else { break };
                let mut body = out.body;
                if let Some(number) = out.number {
                    body["id"] = json!(number);
                }
                if socket.send(Message::Text(body.to_string().into())).await.is_err() {
                    return;
                }
            }
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
        }
    }
    let close = CloseFrame { code: close_code::NORMAL, reason: "the stream is over".into() };
    if socket.send(Message::Close(Some(close))).await.is_err() {
        return;
    }
    // The closing handshake: the client's close answers ours (the socket ends after it); one
    // that never answers is let go after a few seconds.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = socket.recv().await {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, host.parse().unwrap());
        if let Some(origin) = origin {
            headers.insert(header::ORIGIN, origin.parse().unwrap());
        }
        headers
    }

    #[test]
    fn a_websocket_is_followed_from_the_servers_own_pages_and_the_allowed_origins_only() {
        let none: Vec<String> = Vec::new();
        assert!(check_origin(&headers(None, "127.0.0.1:8080"), &none).is_ok(), "not a browser");
        assert!(check_origin(&headers(Some("http://127.0.0.1:8080"), "127.0.0.1:8080"), &none).is_ok());
        assert!(check_origin(&headers(Some("https://cams.example"), "cams.example"), &none).is_ok());
        assert!(check_origin(&headers(Some("http://evil.example"), "127.0.0.1:8080"), &none).is_err());
        assert!(check_origin(&headers(Some("http://127.0.0.1:9999"), "127.0.0.1:8080"), &none).is_err(), "another port is another origin");
        assert!(check_origin(&headers(Some("null"), "127.0.0.1:8080"), &none).is_err());
        let allowed = vec!["https://dash.example".to_string()];
        assert!(check_origin(&headers(Some("https://dash.example"), "127.0.0.1:8080"), &allowed).is_ok());
        assert!(check_origin(&headers(Some("https://dash.example.evil"), "127.0.0.1:8080"), &allowed).is_err());
        assert!(check_origin(&headers(Some("http://evil.example"), "127.0.0.1:8080"), &["*".to_string()]).is_ok());
    }
}
