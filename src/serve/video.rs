//! A clip through the serving core, frame by frame: FFmpeg decodes (`crate::video`), each frame
//! is answered as one image request through the same admission, queue, batching and
//! `tasks::finish` as any photo (the shell's `answer_frame`), a few frames in flight at once so
//! the model batches them, and the answers leave in frame order as [`VideoEvent`]s, as each is
//! done. With tracking, ByteTrack runs over the ordered answers; with `detect_every = N` the
//! frames between are not sent to the model and the tracks coast on their velocity.
//!
//! The frames of a file are never dropped: a frame refused for overload waits and is tried
//! again within its own deadline (a file's client wants every frame; a live stream's policy
//! will be its own). Backpressure reaches FFmpeg: while `in_flight` frames are out, no frame is
//! read, so the decoder blocks on its pipe. A client that goes away stops the decode.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{FuturesOrdered, StreamExt};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::prepare::{ImageInput, PixelBatch};
use super::{Core, Deadline, RequestContext};
use crate::error::ApiError;
use crate::metrics as m;
use crate::tasks::detection::BoundingBox;
use crate::tasks::tracking::{ByteTrack, Observed, TrackerSettings};
use crate::tasks::ParamError;
use crate::video::ffmpeg::{Ended, Frame, FrameReader, VideoError, VideoInfo, VideoTools};
use crate::video::Sampling;

/// What a server allows of video requests.
#[derive(Debug, Clone)]
pub struct VideoSettings {
    pub tools: VideoTools,
    /// Largest upload, in bytes (spooled to a temporary file, not held in memory).
    pub max_bytes: usize,
    /// Most frames one request is answered.
    pub max_frames: usize,
    /// Frames of one clip in the model's queue at once.
    pub in_flight: usize,
}

impl Default for VideoSettings {
    fn default() -> Self {
        VideoSettings { tools: VideoTools::beside(PathBuf::from("ffmpeg")), max_bytes: 256 << 20, max_frames: 3600, in_flight: 4 }
    }
}

/// Tracking as a request asks for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tracking {
    pub settings: TrackerSettings,
    /// Run the model on one frame in this many (1: every frame); the tracks coast between.
    pub detect_every: usize,
}

/// The request parameters that shape tracking.
pub const TRACKING_KEYS: [&str; 5] = ["track", "track_threshold", "track_match_threshold", "track_lost_frames", "detect_every"];

impl Tracking {
    /// `track=bytetrack` (or `none`) and its companions, taken out of `raw`; a companion
    /// without `track` is refused, so a typo does not pass silently.
    pub fn take_from(raw: &mut HashMap<String, String>) -> Result<Option<Tracking>, ParamError> {
        let track = raw.remove("track");
        let companions: Vec<(String, String)> =
            TRACKING_KEYS[1..].iter().filter_map(|k| raw.remove(*k).map(|v| (k.to_string(), v))).collect();
        match track.as_deref() {
            None | Some("none") => {
                if let Some((key, _)) = companions.first() {
                    return Err(ParamError(format!("parameter '{key}' needs 'track=bytetrack'")));
                }
                return Ok(None);
            }
            Some("bytetrack") => {}
            Some(other) => return Err(ParamError(format!("parameter 'track' must be bytetrack or none, got '{other}'"))),
        }
        let mut tracking = Tracking { settings: TrackerSettings::default(), detect_every: 1 };
        for (key, text) in companions {
            let bad = || ParamError(format!("parameter '{key}' has an invalid value '{text}'"));
            match key.as_str() {
                "track_threshold" | "track_match_threshold" => {
                    let v = text.trim().parse::<f32>().ok().filter(|v| (0.0..=1.0).contains(v)).ok_or_else(bad)?;
                    if key == "track_threshold" {
                        tracking.settings.track_threshold = v;
                    } else {
                        tracking.settings.match_threshold = v;
                    }
                }
                "track_lost_frames" => tracking.settings.lost_frames = text.trim().parse::<u64>().ok().filter(|v| *v <= 10_000).ok_or_else(bad)?,
                _ => tracking.detect_every = text.trim().parse::<usize>().ok().filter(|v| (1..=100).contains(v)).ok_or_else(bad)?,
            }
        }
        Ok(Some(tracking))
    }
}

/// What a video answer is made of, in order: `Start`, a `Frame` per frame, `End`.
#[derive(Debug)]
pub enum VideoEvent {
    Start(VideoInfo),
    Frame(FrameAnswer),
    End(VideoSummary),
}

#[derive(Debug)]
pub struct FrameAnswer {
    pub index: usize,
    /// Seconds from the clip's start.
    pub timestamp: f64,
    /// When it came off the decoder.
    pub read_at: Instant,
    /// Whether the model ran on it (with `detect_every`, the frames between only coast).
    pub detected: bool,
    /// The shell's answer for the frame (with `track_id`s when tracking), or its failure.
    pub result: Result<Value, ApiError>,
}

#[derive(Debug, Serialize)]
pub struct VideoSummary {
    pub frames: usize,
    /// Frames the model ran on, and those it failed on.
    pub detected: usize,
    pub failed: usize,
    /// `complete`, `max_frames` (the clip had more), or `error` (the decode broke off).
    pub ended: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub seconds: f64,
}

impl From<VideoError> for ApiError {
    fn from(e: VideoError) -> Self {
        match e {
            VideoError::ToolMissing(_) => ApiError::NotImplemented(e.to_string()),
            VideoError::Unreadable(_) | VideoError::TooLarge { .. } | VideoError::Broken { .. } => ApiError::BadRequest(e.to_string()),
            VideoError::Io(detail) => ApiError::Internal(detail),
        }
    }
}

/// The uploaded clip, probed: a file FFmpeg cannot read is refused here, before the answer's
/// status goes out.
pub struct Clip {
    /// Removed when the job ends.
    pub file: tempfile::TempPath,
    pub info: VideoInfo,
}

impl Clip {
    pub async fn probe(core: &Core, file: tempfile::TempPath) -> Result<Clip, ApiError> {
        let info = crate::video::ffmpeg::probe(&core.video.tools, &file, core.limits.max_image_pixels).await?;
        Ok(Clip { file, info })
    }
}

/// One frame's answer, as a protocol shell makes it for a model or a pipeline.
pub type FrameFuture = std::pin::Pin<Box<dyn Future<Output = Result<Value, ApiError>> + Send>>;
pub type FrameAnswerer = Box<dyn Fn(ImageInput, RequestContext) -> FrameFuture + Send + Sync>;

/// A frame as a decoder gives it: a frame, the end, or a failure.
pub type Decoded = Result<Result<Frame, Ended>, VideoError>;

/// Where [`answer_in_order`] takes its frames from: a file's decoder, a stream's queue.
/// `next` must be cancel-safe (it is raced against answers coming back).
pub trait FrameSource: Send {
    fn next(&mut self) -> impl Future<Output = Option<Decoded>> + Send;
}

impl FrameSource for mpsc::Receiver<Decoded> {
    fn next(&mut self) -> impl Future<Output = Option<Decoded>> + Send {
        self.recv()
    }
}

/// Where [`answer_in_order`] puts each frame's answer, in frame order; `false`: no one is
/// listening any more, stop.
pub trait FrameSink: Send {
    fn deliver(&mut self, answer: FrameAnswer) -> impl Future<Output = bool> + Send;
}

/// What a refused frame does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patience {
    /// Waits and is tried again until its deadline: a file's client wants every frame.
    Retry,
    /// Is answered refused at once: a live stream drops it and counts it, rather than let the
    /// frames behind it age.
    GiveUp,
}

/// How frames go to the model: how many at once, on which frames, within what time.
#[derive(Debug, Clone, Copy)]
pub struct Flow {
    /// Frames at the model at once.
    pub in_flight: usize,
    /// Each frame's deadline, from when it is sent.
    pub frame_timeout_ms: u64,
    pub refusal_pause: Duration,
    pub patience: Patience,
}

/// What [`answer_in_order`] did, and why it stopped.
#[derive(Debug, Default)]
pub struct Answered {
    pub frames: usize,
    pub detected: usize,
    pub failed: usize,
    /// How the source ended (`None`: the sink stopped listening, or the source closed).
    pub ended: Option<Result<Ended, VideoError>>,
}

/// Answers the frames of `source` through `answer` (`flow.in_flight` at the model at once, so
/// it batches them), tracks them, and delivers the answers to `sink` in frame order as each is
/// done. While `in_flight` frames are out, no frame is taken from the source: backpressure.
pub async fn answer_in_order<S: FrameSource, K: FrameSink>(
    source: &mut S,
    sink: &mut K,
    flow: Flow,
    tracking: Option<Tracking>,
    answer: std::sync::Arc<FrameAnswerer>,
    request_id: &str,
) -> Answered {
    let mut tracker = tracking.map(|t| (ByteTrack::new(t.settings), HashMap::<u64, LastSeen>::new()));
    let mut in_flight = FuturesOrdered::new();
    // Frames at the model; the frames between (`detect_every`) wait only for their turn, so
    // they count apart, up to the frames they sit between.
    let (mut at_model, every) = (0usize, tracking.map_or(1, |t| t.detect_every));
    let mut done = Answered::default();
    let mut source_done = false;
    loop {
        tokio::select! {
            Some((index, timestamp, read_at, detected, result)) = in_flight.next(), if !in_flight.is_empty() => {
                at_model -= usize::from(detected);
                let mut result: Result<Value, ApiError> = result;
                if let Some((tracker, last_seen)) = tracker.as_mut() {
                    match (&mut result, detected) {
                        (Ok(value), true) => track(tracker, last_seen, value),
                        (Ok(value), false) => *value = coast(tracker, last_seen),
                        (Err(_), _) => { tracker.coast(); }
                    }
                }
                done.frames += 1;
                done.detected += usize::from(detected);
                done.failed += usize::from(result.is_err());
                if !sink.deliver(FrameAnswer { index, timestamp, read_at, detected, result }).await {
                    break; // the client went away: dropping the decoder kills FFmpeg
                }
            }
            next = source.next(), if !source_done && at_model < flow.in_flight && in_flight.len() < flow.in_flight * every => {
                match next {
                    Some(Ok(Ok(frame))) => {
                        let detected = frame.index % every == 0;
                        let context = RequestContext { deadline: Deadline::from_now(flow.frame_timeout_ms), request_id: format!("{request_id}/{}", frame.index) };
                        let answer = std::sync::Arc::clone(&answer);
                        let (index, timestamp, read_at) = (frame.index, frame.timestamp, frame.read_at);
                        at_model += usize::from(detected);
                        in_flight.push_back(async move {
                            if !detected {
                                return (index, timestamp, read_at, false, Ok(Value::Null));
                            }
                            (index, timestamp, read_at, true, answer_patiently(&*answer, frame, context, flow).await)
                        });
                    }
                    Some(ended) => {
                        done.ended = Some(ended.map(|e| e.err().expect("a frame is matched above")));
                        source_done = true;
                    }
                    None => source_done = true,
                }
            }
            else => break,
        }
    }
    done
}

/// The events of a file's answer, to the shell's channel; each frame counted.
struct FileSink {
    events: mpsc::Sender<VideoEvent>,
    model: String,
}

impl FrameSink for FileSink {
    async fn deliver(&mut self, answer: FrameAnswer) -> bool {
        let outcome = if answer.result.is_ok() { "answered" } else { "failed" };
        metrics::counter!(m::VIDEO_FRAMES, "model" => self.model.clone(), "outcome" => outcome).increment(1);
        self.events.send(VideoEvent::Frame(answer)).await.is_ok()
    }
}

/// Runs `clip` frame by frame; the events arrive on the returned channel, which the shell
/// writes out. `answer_frame(pixels, context)` answers one frame as the shell does a photo.
/// The first frame is decoded before this returns, so a clip that probes but does not decode
/// (a cut-off file, a broken stream) is refused with a 400 before the answer's status goes out.
pub async fn run(
    core: &Core,
    clip: Clip,
    sampling: Sampling,
    tracking: Option<Tracking>,
    context: &RequestContext,
    model: &str,
    answer_frame: FrameAnswerer,
) -> Result<mpsc::Receiver<VideoEvent>, ApiError> {
    let settings = core.video.clone();
    let (events, received) = mpsc::channel(settings.in_flight * 2);
    let flow = Flow {
        in_flight: settings.in_flight,
        frame_timeout_ms: core.limits.request_timeout_ms,
        refusal_pause: Duration::from_millis(core.limits.refusal_delay_ms.max(10)),
        patience: Patience::Retry,
    };
    let max_pixels = core.limits.max_image_pixels;
    let request_id = context.request_id.clone();
    let model = model.to_string();
    let span = tracing::Span::current();
    let started = Instant::now();
    let Clip { file, info } = clip;
    let mut reader = FrameReader::spawn(&settings.tools, &file, &sampling, max_pixels)?;
    let first = match reader.next().await {
        Err(e) => return Err(e.into()),
        first => first,
    };
    tokio::spawn(async move {
        if events.send(VideoEvent::Start(info)).await.is_err() {
            return;
        }
        // The decoder in a task of its own, so a frame half read is never abandoned.
        let (frames, mut decoded) = mpsc::channel::<Decoded>(settings.in_flight);
        let decoding = tokio::spawn(async move {
            let mut first = Some(first);
            loop {
                let next = match first.take() {
                    Some(first) => first,
                    None => reader.next().await,
                };
                let last = !matches!(next, Ok(Ok(_)));
                if frames.send(next).await.is_err() || last {
                    break;
                }
            }
        });
        let mut sink = FileSink { events, model };
        let done = answer_in_order(&mut decoded, &mut sink, flow, tracking, std::sync::Arc::new(answer_frame), &request_id).await;
        decoding.abort();
        drop(file);
        let (ended, error) = match done.ended {
            Some(Ok(Ended::AtMaxFrames)) => ("max_frames", None),
            Some(Err(e)) => ("error", Some(e.to_string())),
            _ => ("complete", None),
        };
        let summary = VideoSummary { frames: done.frames, detected: done.detected, failed: done.failed, ended, error, seconds: started.elapsed().as_secs_f64() };
        tracing::info!(parent: &span, frames = summary.frames, failed = summary.failed, ended = summary.ended, seconds = summary.seconds, "video answered");
        let _ = sink.events.send(VideoEvent::End(summary)).await;
    });
    Ok(received)
}

/// One frame through the shell's answer; with [`Patience::Retry`], a refusal for overload is
/// tried again until the frame's deadline.
async fn answer_patiently<F, Fut>(answer: &F, frame: Frame, context: RequestContext, flow: Flow) -> Result<Value, ApiError>
where
    F: Fn(ImageInput, RequestContext) -> Fut + ?Sized,
    Fut: Future<Output = Result<Value, ApiError>>,
{
    let pixels = Bytes::from(frame.pixels);
    loop {
        let input = ImageInput::Pixels(PixelBatch { data: pixels.clone(), count: 1, width: frame.width, height: frame.height });
        match answer(input, context.clone()).await {
            Err(ApiError::Overloaded(_)) if flow.patience == Patience::Retry && Instant::now() + flow.refusal_pause < context.deadline.at => {
                tokio::time::sleep(flow.refusal_pause).await
            }
            answered => return answered,
        }
    }
}

/// The detections of a frame's answer (`detections`, each with `box` and `score`), as the
/// tracker sees them; every task with boxes and every pipeline answers in this shape.
fn detections_of(value: &Value) -> Vec<Observed> {
    let Some(list) = value["detections"].as_array() else { return Vec::new() };
    list.iter()
        .map(|d| {
            let b = &d["box"];
            let f = |k: &str| b[k].as_f64().unwrap_or(0.0) as f32;
            Observed { bbox: BoundingBox { x1: f("x1"), y1: f("y1"), x2: f("x2"), y2: f("y2") }, score: d["score"].as_f64().unwrap_or(0.0) as f32 }
        })
        .collect()
}

/// What a coasted frame tells of a track: its last detection's label and score (not its mask
/// or keypoints, which were that frame's).
struct LastSeen {
    label: Value,
    score: Value,
}

/// A detected frame: each detection gains its `track_id` (`null` when no confirmed track
/// holds it); each track's label and score are kept for the frames it coasts through.
fn track(tracker: &mut ByteTrack, last_seen: &mut HashMap<u64, LastSeen>, value: &mut Value) {
    let ids = tracker.update(&detections_of(value));
    if let Some(list) = value["detections"].as_array_mut() {
        for (detection, id) in list.iter_mut().zip(ids) {
            detection["track_id"] = json!(id);
            if let Some(id) = id {
                last_seen.insert(id, LastSeen { label: detection["label"].clone(), score: detection["score"].clone() });
            }
        }
    }
    let alive: std::collections::HashSet<u64> = tracker.confirmed_ids().collect();
    last_seen.retain(|id, _| alive.contains(id));
}

/// A frame the model did not run on: the tracks where their motion puts them, each with its
/// last detection's label (and score), marked `coasted`.
fn coast(tracker: &mut ByteTrack, last_seen: &HashMap<u64, LastSeen>) -> Value {
    let detections: Vec<Value> = tracker
        .coast()
        .into_iter()
        .map(|t| {
            let last = last_seen.get(&t.id);
            let mut detection = json!({"label": last.map(|d| d.label.clone()), "score": last.map(|d| d.score.clone())});
            detection["box"] = json!({"x1": t.bbox.x1, "y1": t.bbox.y1, "x2": t.bbox.x2, "y2": t.bbox.y2});
            detection["track_id"] = json!(t.id);
            detection["coasted"] = json!(true);
            detection
        })
        .collect();
    json!({"detections": detections})
}
