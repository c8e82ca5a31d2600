//! Live streams: a source (RTSP, HTTP MJPEG or HLS, a file played at its own rate) read by
//! FFmpeg for as long as the stream lives, its frames answered through the same admission,
//! queues, batching and `tasks::finish` as photos and uploaded videos (the loop of
//! [`super::video::answer_in_order`]), the answers published to whoever subscribes.
//!
//! What differs from a file is the clock: a camera does not wait for the model. Frames read
//! from the source go into a small queue whose policy says what happens when it is full —
//! `wait` (the decoder blocks; nothing is dropped here), `drop_oldest` (the freshest frames
//! are answered) or `drop_newest` — and a frame the model's admission refuses is dropped and
//! counted rather than retried. Frames are admitted as `Arrival::Sheddable` (within half the
//! wait a photo is admitted to, and within the frame's own short deadline), so a busy server
//! sheds stream frames before it refuses a photo; a `wait` stream's frames, which are all to
//! be answered, are admitted as photos are and retried.
//! A source that ends, fails or stalls is reopened with back-off, and the outage is counted.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{broadcast, Notify};
use tokio::task::JoinHandle;

use super::video::{answer_in_order, Decoded, Flow, FrameAnswer, FrameAnswerer, FrameSink, FrameSource, Patience, Tracking};
use super::Core;
use crate::error::ApiError;
use crate::metrics as m;
use crate::video::ffmpeg::{Ended, Frame, FrameReader, VideoError};
use crate::video::{AllowList, StreamSource};

/// What the operator allows of streams.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Sources that may be opened; empty: streams are off.
    pub allow: AllowList,
    /// Streams running at once.
    pub max_streams: usize,
    /// How long a new stream's source has to give its first frame.
    pub open_timeout: Duration,
    /// A source that gives no frame for this long is reopened.
    pub stall_timeout: Duration,
    /// The longest wait between two tries at reopening a source.
    pub reconnect_max: Duration,
    /// Origins (besides the server's own) whose web pages may follow a stream over a
    /// WebSocket, which browsers open across origins without asking CORS: `--cors-origins`.
    pub browser_origins: Vec<String>,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            allow: AllowList::default(),
            max_streams: 16,
            open_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(5),
            reconnect_max: Duration::from_secs(1),
            browser_origins: Vec::new(),
        }
    }
}

/// What a full frame queue does with the next frame from the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropPolicy {
    /// The reader waits for room: no frame is dropped here (the source's own buffers fill).
    Wait,
    /// The oldest waiting frame makes room: answers stay as fresh as the model allows.
    DropOldest,
    /// The new frame is dropped: the frames already waiting keep their turn.
    DropNewest,
}

impl DropPolicy {
    pub fn parse(text: &str) -> Option<DropPolicy> {
        match text {
            "wait" => Some(DropPolicy::Wait),
            "drop_oldest" => Some(DropPolicy::DropOldest),
            "drop_newest" => Some(DropPolicy::DropNewest),
            _ => None,
        }
    }
}

/// A stream as a client asks for it (the shell has checked the model and its parameters).
pub struct StreamRequest {
    pub source: StreamSource,
    pub max_fps: Option<f64>,
    pub policy: DropPolicy,
    /// Frames that may wait for the model.
    pub buffer: usize,
    pub tracking: Option<Tracking>,
    /// Each frame's deadline at the model: a frame the admission cannot answer within it is
    /// dropped.
    pub frame_deadline_ms: u64,
    pub model: String,
    pub version: String,
    /// The request as the shell restates it in the stream's status (its model parameters,
    /// its tracking).
    pub described: Value,
}

/// What is published to a stream's subscribers.
#[derive(Debug)]
pub enum StreamEvent {
    Frame { answer: FrameAnswer, latency_ms: f64 },
    /// The stream's state changed (`reconnecting`, `running`), with why.
    State { state: Phase, reason: Option<String> },
    /// The stream is over: its source ended (a file not looped) or it was stopped.
    End { state: Phase },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Running,
    Reconnecting,
    /// Its source ended (a file not looped).
    Ended,
    /// Deleted, or the server is shutting down.
    Stopped,
}

#[derive(Debug, Default)]
struct Counters {
    read: AtomicU64,
    /// Read, but over `max_fps`.
    skipped: AtomicU64,
    processed: AtomicU64,
    /// Dropped by the queue's policy, and refused by the model's admission.
    dropped_queue: AtomicU64,
    dropped_overload: AtomicU64,
    failed: AtomicU64,
    reconnects: AtomicU64,
}

/// Frame-to-result latencies kept for the status's percentiles.
const LATENCY_WINDOW: usize = 256;

struct Health {
    phase: Phase,
    last_error: Option<String>,
    /// How long the last outage lasted, from the source's loss to its next frame.
    last_outage: Option<Duration>,
    latencies_ms: VecDeque<f64>,
}

/// One running stream.
pub struct LiveStream {
    pub id: String,
    source: String,
    model: String,
    version: String,
    policy: DropPolicy,
    buffer: usize,
    max_fps: Option<f64>,
    frame_deadline_ms: u64,
    described: Value,
    started: SystemTime,
    counters: Counters,
    health: Mutex<Health>,
    events: broadcast::Sender<Published>,
    /// The last events published, numbered, for a subscriber that comes late or comes back
    /// (SSE's `Last-Event-ID`); the next number beside them.
    recent: Mutex<(u64, VecDeque<Published>)>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// An event and its number in the stream (from 1).
pub type Published = (u64, Arc<StreamEvent>);

/// Events kept for late and returning subscribers.
const RECENT_EVENTS: usize = 128;

/// A stream's status, as `GET /v1/streams/{id}` shows it.
#[derive(Debug, Serialize)]
pub struct StreamStatus {
    pub id: String,
    pub source: String,
    pub model: String,
    pub version: String,
    pub state: Phase,
    pub drop_policy: DropPolicy,
    pub buffer: usize,
    pub max_fps: Option<f64>,
    pub frame_deadline_ms: u64,
    pub request: Value,
    pub frames: FrameCounts,
    pub reconnects: u64,
    pub last_outage_ms: Option<f64>,
    pub last_error: Option<String>,
    /// Over the last frames answered: from the frame read off the decoder to its answer published.
    pub latency_ms: Option<Latency>,
    pub subscribers: usize,
    /// Seconds since the Unix epoch.
    pub started: f64,
}

#[derive(Debug, Serialize)]
pub struct FrameCounts {
    pub read: u64,
    pub skipped: u64,
    pub processed: u64,
    pub dropped: u64,
    pub dropped_by_queue: u64,
    pub dropped_by_overload: u64,
    pub failed: u64,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub max: f64,
    pub frames: usize,
}

impl LiveStream {
    /// Its events from now on, and those kept that came after number `after` (none without).
    /// Taken under the lock events are published under, so nothing is missed or seen twice.
    pub fn subscribe(&self, after: Option<u64>) -> (Vec<Published>, broadcast::Receiver<Published>) {
        let recent = self.recent.lock().expect("stream events");
        let receiver = self.events.subscribe();
        let replay = after.map_or_else(Vec::new, |after| recent.1.iter().filter(|(n, _)| *n > after).cloned().collect());
        (replay, receiver)
    }

    fn publish(&self, event: StreamEvent) {
        let mut recent = self.recent.lock().expect("stream events");
        let published = (recent.0, Arc::new(event));
        recent.0 += 1;
        if recent.1.len() == RECENT_EVENTS {
            recent.1.pop_front();
        }
        recent.1.push_back(published.clone());
        // No subscriber is no error: the stream runs on, its status counts.
        let _ = self.events.send(published);
    }

    pub fn is_over(&self) -> bool {
        matches!(self.health.lock().expect("stream health").phase, Phase::Ended | Phase::Stopped)
    }

    pub fn status(&self) -> StreamStatus {
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let health = self.health.lock().expect("stream health");
        let latency_ms = (!health.latencies_ms.is_empty()).then(|| {
            let mut sorted: Vec<f64> = health.latencies_ms.iter().copied().collect();
            sorted.sort_by(f64::total_cmp);
            let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
            Latency { p50: at(0.5), p95: at(0.95), max: at(1.0), frames: sorted.len() }
        });
        StreamStatus {
            id: self.id.clone(),
            source: self.source.clone(),
            model: self.model.clone(),
            version: self.version.clone(),
            state: health.phase,
            drop_policy: self.policy,
            buffer: self.buffer,
            max_fps: self.max_fps,
            frame_deadline_ms: self.frame_deadline_ms,
            request: self.described.clone(),
            frames: FrameCounts {
                read: n(&c.read),
                skipped: n(&c.skipped),
                processed: n(&c.processed),
                dropped: n(&c.dropped_queue) + n(&c.dropped_overload),
                dropped_by_queue: n(&c.dropped_queue),
                dropped_by_overload: n(&c.dropped_overload),
                failed: n(&c.failed),
            },
            reconnects: n(&c.reconnects),
            last_outage_ms: health.last_outage.map(|d| d.as_secs_f64() * 1000.0),
            last_error: health.last_error.clone(),
            latency_ms,
            subscribers: self.events.receiver_count(),
            started: self.started.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
        }
    }

    /// The stream's new state, published; a stream that is over stays over (a stream stopped
    /// as its source ends is over once, and counted off the gauge once).
    fn set_phase(&self, phase: Phase, reason: Option<String>) {
        let over = |p: Phase| matches!(p, Phase::Ended | Phase::Stopped);
        {
            let mut health = self.health.lock().expect("stream health");
            if health.phase == phase || over(health.phase) {
                return;
            }
            if over(phase) {
                metrics::gauge!(m::STREAMS).decrement(1.0);
            }
            health.phase = phase;
            if reason.is_some() {
                health.last_error = reason.clone();
            }
        }
        self.publish(match phase {
            Phase::Ended | Phase::Stopped => StreamEvent::End { state: phase },
            _ => StreamEvent::State { state: phase, reason },
        });
    }

    /// Stops its reading and answering (FFmpeg is killed with its reader); subscribers get
    /// the `end` event.
    fn stop(&self) {
        if let Some(task) = self.task.lock().expect("stream task").take() {
            task.abort();
        }
        self.set_phase(Phase::Stopped, None);
    }
}

/// The streams of a server.
pub struct Streams {
    pub settings: StreamSettings,
    next_id: AtomicU64,
    live: Mutex<BTreeMap<u64, Arc<LiveStream>>>,
}

impl Streams {
    pub fn new(settings: StreamSettings) -> Streams {
        Streams { settings, next_id: AtomicU64::new(1), live: Mutex::new(BTreeMap::new()) }
    }

    /// Whether streams are on here at all.
    pub fn check_on(&self) -> Result<(), ApiError> {
        if self.settings.allow.is_empty() {
            return Err(ApiError::Forbidden(
                "live streams are off on this server: the operator turns them on by naming the sources allowed (--streams-allow)".into(),
            ));
        }
        Ok(())
    }

    /// Whether `source` may be opened here; the refusal says why (streams off, or not this source).
    pub fn check_allowed(&self, source: &StreamSource) -> Result<(), ApiError> {
        self.check_on()?;
        if !self.settings.allow.allows(source) {
            return Err(ApiError::Forbidden(format!("source '{}' is not among those this server allows (--streams-allow)", source.shown())));
        }
        Ok(())
    }

    pub fn list(&self) -> Vec<Arc<LiveStream>> {
        self.live.lock().expect("streams").values().cloned().collect()
    }

    pub fn get(&self, id: &str) -> Result<Arc<LiveStream>, ApiError> {
        let key = parse_id(id).ok_or_else(|| no_such_stream(id))?;
        self.live.lock().expect("streams").get(&key).cloned().ok_or_else(|| no_such_stream(id))
    }

    /// Stops the stream and forgets it; its last status is returned.
    pub fn remove(&self, id: &str) -> Result<StreamStatus, ApiError> {
        let key = parse_id(id).ok_or_else(|| no_such_stream(id))?;
        let stream = self.live.lock().expect("streams").remove(&key).ok_or_else(|| no_such_stream(id))?;
        if !stream.is_over() {
            stream.stop();
        }
        tracing::info!(stream = %stream.id, "stream removed");
        Ok(stream.status())
    }

    /// Stops every stream (the server is shutting down), so their subscribers' answers end.
    pub fn stop_all(&self) {
        for stream in self.list() {
            if !stream.is_over() {
                stream.stop();
            }
        }
    }

    /// Opens the source (its first frame within `open_timeout`, or a 400 saying why) and
    /// starts answering its frames with `answer`.
    pub async fn start(self: &Arc<Self>, core: &Core, request: StreamRequest, answer: FrameAnswerer) -> Result<Arc<LiveStream>, ApiError> {
        self.check_allowed(&request.source)?;
        let running = self.list().iter().filter(|s| !s.is_over()).count();
        if running >= self.settings.max_streams {
            return Err(ApiError::Conflict(format!(
                "this server runs at most {} streams (--max-streams); delete one first",
                self.settings.max_streams
            )));
        }
        let tools = core.video.tools.clone();
        let max_pixels = core.limits.max_image_pixels;
        let stall_micros = self.settings.stall_timeout.as_micros() as u64;
        let mut reader = FrameReader::spawn_live(&tools, &request.source, stall_micros, max_pixels)?;
        let first = match tokio::time::timeout(self.settings.open_timeout, reader.next()).await {
            Err(_) => {
                return Err(ApiError::BadRequest(format!(
                    "source '{}' gave no frame within {} s",
                    request.source.shown(),
                    self.settings.open_timeout.as_secs()
                )))
            }
            Ok(Ok(Ok(frame))) => frame,
            Ok(Ok(Err(_))) => return Err(ApiError::BadRequest(format!("source '{}' ended before its first frame", request.source.shown()))),
            Ok(Err(VideoError::ToolMissing(tool))) => return Err(VideoError::ToolMissing(tool).into()),
            Ok(Err(e)) => return Err(ApiError::BadRequest(format!("could not open source '{}': {e}", request.source.shown()))),
        };
        let key = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, _) = broadcast::channel(64);
        let stream = Arc::new(LiveStream {
            id: format!("s{key}"),
            source: request.source.shown(),
            model: request.model.clone(),
            version: request.version.clone(),
            policy: request.policy,
            buffer: request.buffer,
            max_fps: request.max_fps,
            frame_deadline_ms: request.frame_deadline_ms,
            described: request.described.clone(),
            started: SystemTime::now(),
            counters: Counters::default(),
            health: Mutex::new(Health { phase: Phase::Running, last_error: None, last_outage: None, latencies_ms: VecDeque::with_capacity(LATENCY_WINDOW) }),
            events,
            recent: Mutex::new((1, VecDeque::with_capacity(RECENT_EVENTS))),
            task: Mutex::new(None),
        });
        let flow = Flow {
            in_flight: core.video.in_flight,
            frame_timeout_ms: request.frame_deadline_ms,
            refusal_pause: Duration::from_millis(core.limits.refusal_delay_ms.max(10)),
            patience: if request.policy == DropPolicy::Wait { Patience::Retry } else { Patience::GiveUp },
        };
        let reading = Reading { tools, stall_micros, max_pixels, reconnect_max: self.settings.reconnect_max, stall: self.settings.stall_timeout };
        let task = tokio::spawn(run(Arc::clone(&stream), request, reading, reader, first, flow, answer));
        *stream.task.lock().expect("stream task") = Some(task);
        self.live.lock().expect("streams").insert(key, Arc::clone(&stream));
        metrics::gauge!(m::STREAMS).increment(1.0);
        tracing::info!(stream = %stream.id, source = %stream.source, model = %stream.model, "stream started");
        Ok(stream)
    }
}

fn parse_id(id: &str) -> Option<u64> {
    id.strip_prefix('s')?.parse().ok()
}

fn no_such_stream(id: &str) -> ApiError {
    ApiError::NotFound(format!("no stream '{id}'"))
}

/// How a stream's source is (re)opened.
struct Reading {
    tools: crate::video::VideoTools,
    stall_micros: u64,
    max_pixels: u64,
    reconnect_max: Duration,
    stall: Duration,
}

/// A stream's life: the source read into the queue by a task of its own, the queue answered
/// in order; it ends when a file source ends, or when it is stopped (this task aborted, which
/// aborts the reader with it).
async fn run(stream: Arc<LiveStream>, request: StreamRequest, reading: Reading, reader: FrameReader, first: Frame, flow: Flow, answer: FrameAnswerer) {
    let queue = Arc::new(FrameQueue::new(request.policy, request.buffer));
    let reader_task = AbortOnDrop(tokio::spawn(read_source(Arc::clone(&stream), request.source, request.max_fps, reading, reader, first, Arc::clone(&queue))));
    let mut source = Arc::clone(&queue);
    let mut sink = StreamSink { stream: Arc::clone(&stream) };
    answer_in_order(&mut source, &mut sink, flow, request.tracking, Arc::new(answer), &stream.id).await;
    drop(reader_task);
    stream.set_phase(Phase::Ended, None);
    tracing::info!(stream = %stream.id, "stream ended: its source ended");
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads the source into `queue` for as long as the stream lives, reopening it with back-off
/// when it ends (a live source), fails or stalls; a file source not looped closes the queue
/// at its end.
async fn read_source(
    stream: Arc<LiveStream>,
    source: StreamSource,
    max_fps: Option<f64>,
    reading: Reading,
    reader: FrameReader,
    first: Frame,
    queue: Arc<FrameQueue>,
) {
    let started = Instant::now();
    let mut cap = max_fps.map(RateCap::new);
    let mut backoff = Backoff::new(Duration::from_millis(100), reading.reconnect_max);
    let (mut reader, mut first) = (Some(reader), Some(first));
    let mut index = 0usize;
    let mut lost_at: Option<Instant> = None;
    loop {
        let mut current = match reader.take() {
            Some(reader) => reader,
            None => match FrameReader::spawn_live(&reading.tools, &source, reading.stall_micros, reading.max_pixels) {
                Ok(reader) => reader,
                Err(e) => {
                    stream.health.lock().expect("stream health").last_error = Some(e.to_string());
                    tokio::time::sleep(backoff.next()).await;
                    continue;
                }
            },
        };
        let why = loop {
            let next: Decoded = match first.take() {
                Some(frame) => Ok(Ok(frame)),
                None => match tokio::time::timeout(reading.stall, current.next()).await {
                    Ok(next) => next,
                    Err(_) => break format!("no frame for {} s", reading.stall.as_secs()),
                },
            };
            match next {
                Ok(Ok(mut frame)) => {
                    stream.counters.read.fetch_add(1, Ordering::Relaxed);
                    if let Some(at) = lost_at.take() {
                        let outage = at.elapsed();
                        stream.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!(m::STREAM_RECONNECTS, "stream" => stream.id.clone()).increment(1);
                        stream.health.lock().expect("stream health").last_outage = Some(outage);
                        tracing::info!(stream = %stream.id, outage_ms = outage.as_millis() as u64, "stream source reconnected");
                        stream.set_phase(Phase::Running, None);
                    }
                    backoff.reset();
                    if cap.as_mut().is_some_and(|cap| !cap.take(frame.read_at)) {
                        stream.counters.skipped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    frame.index = index;
                    frame.timestamp = started.elapsed().as_secs_f64();
                    index += 1;
                    if queue.push(frame).await == Pushed::Dropped {
                        stream.counters.dropped_queue.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!(m::STREAM_FRAMES, "stream" => stream.id.clone(), "outcome" => "dropped").increment(1);
                    }
                }
                Ok(Err(Ended::Complete | Ended::AtMaxFrames)) if source.is_file() && !source.looped => {
                    queue.close();
                    return;
                }
                Ok(Err(_)) => break "the source ended".to_string(),
                Err(e) => break e.to_string(),
            }
        };
        drop(current);
        lost_at.get_or_insert_with(Instant::now);
        tracing::warn!(stream = %stream.id, reason = %why, "stream source lost; reopening");
        stream.set_phase(Phase::Reconnecting, Some(why));
        tokio::time::sleep(backoff.next()).await;
    }
}

/// Each frame's answer: counted (processed, dropped when its admission refused it, failed),
/// its latency kept, and published.
struct StreamSink {
    stream: Arc<LiveStream>,
}

impl FrameSink for StreamSink {
    async fn deliver(&mut self, answer: FrameAnswer) -> bool {
        let latency_ms = answer.read_at.elapsed().as_secs_f64() * 1000.0;
        let c = &self.stream.counters;
        let outcome = match &answer.result {
            Ok(_) => {
                c.processed.fetch_add(1, Ordering::Relaxed);
                let mut health = self.stream.health.lock().expect("stream health");
                if health.latencies_ms.len() == LATENCY_WINDOW {
                    health.latencies_ms.pop_front();
                }
                health.latencies_ms.push_back(latency_ms);
                "processed"
            }
            Err(ApiError::Overloaded(_) | ApiError::DeadlineExceeded(_)) => {
                c.dropped_overload.fetch_add(1, Ordering::Relaxed);
                "dropped"
            }
            Err(_) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                "failed"
            }
        };
        metrics::counter!(m::STREAM_FRAMES, "stream" => self.stream.id.clone(), "outcome" => outcome).increment(1);
        // A dropped frame is not sent: its subscribers see the gap in frame numbers.
        if outcome != "dropped" {
            self.stream.publish(StreamEvent::Frame { answer, latency_ms });
        }
        true
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Pushed {
    Queued,
    Dropped,
}

/// The frames read and not yet sent to the model; one reader pushes, one loop takes.
struct FrameQueue {
    policy: DropPolicy,
    capacity: usize,
    inner: Mutex<(VecDeque<Frame>, bool)>,
    arrived: Notify,
    freed: Notify,
}

impl FrameQueue {
    fn new(policy: DropPolicy, capacity: usize) -> FrameQueue {
        FrameQueue { policy, capacity: capacity.max(1), inner: Mutex::new((VecDeque::new(), false)), arrived: Notify::new(), freed: Notify::new() }
    }

    async fn push(&self, frame: Frame) -> Pushed {
        let mut frame = Some(frame);
        loop {
            let freed = self.freed.notified();
            {
                let mut inner = self.inner.lock().expect("frame queue");
                let outcome = if inner.0.len() < self.capacity {
                    Some(Pushed::Queued)
                } else {
                    match self.policy {
                        DropPolicy::Wait => None,
                        DropPolicy::DropNewest => return Pushed::Dropped,
                        DropPolicy::DropOldest => {
                            inner.0.pop_front();
                            Some(Pushed::Dropped)
                        }
                    }
                };
                if let Some(outcome) = outcome {
                    inner.0.push_back(frame.take().expect("pushed once"));
                    drop(inner);
                    self.arrived.notify_one();
                    return outcome;
                }
            }
            freed.await;
        }
    }

    /// No more frames: `next` gives those waiting, then `None`.
    fn close(&self) {
        self.inner.lock().expect("frame queue").1 = true;
        self.arrived.notify_one();
    }
}

impl FrameSource for Arc<FrameQueue> {
    /// Cancel-safe: a frame leaves the queue only when this returns it.
    async fn next(&mut self) -> Option<Decoded> {
        loop {
            let arrived = self.arrived.notified();
            {
                let mut inner = self.inner.lock().expect("frame queue");
                if let Some(frame) = inner.0.pop_front() {
                    drop(inner);
                    self.freed.notify_one();
                    return Some(Ok(Ok(frame)));
                }
                if inner.1 {
                    return Some(Ok(Err(Ended::Complete)));
                }
            }
            arrived.await;
        }
    }
}

/// At most `fps` frames a second: a frame is taken when it is due, and each taken frame
/// makes the next due one interval later, with at most one interval of catch-up (so a
/// source's jitter does not lower the rate, and a burst after a stall is thinned, not passed).
struct RateCap {
    interval: Duration,
    due: Option<Instant>,
}

impl RateCap {
    fn new(fps: f64) -> RateCap {
        RateCap { interval: Duration::from_secs_f64(1.0 / fps), due: None }
    }

    fn take(&mut self, at: Instant) -> bool {
        let base = match self.due {
            Some(due) if at < due => return false,
            Some(due) => due.max(at.checked_sub(self.interval).unwrap_or(at)),
            None => at,
        };
        self.due = Some(base + self.interval);
        true
    }
}

/// Waits between tries at reopening a source: from `first`, doubling, at most `max`.
struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Backoff {
        let first = first.min(max);
        Backoff { first, max, next: first }
    }

    fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(index: usize) -> Frame {
        Frame { index, timestamp: 0.0, width: 1, height: 1, pixels: vec![0; 3], read_at: Instant::now() }
    }

    async fn drain(queue: &Arc<FrameQueue>) -> Vec<usize> {
        queue.close();
        let mut source = Arc::clone(queue);
        let mut indexes = Vec::new();
        while let Some(Ok(Ok(frame))) = source.next().await {
            indexes.push(frame.index);
        }
        indexes
    }

    #[tokio::test]
    async fn a_full_queue_drops_as_its_policy_says() {
        for (policy, kept) in [(DropPolicy::DropOldest, vec![3, 4]), (DropPolicy::DropNewest, vec![0, 1])] {
            let queue = Arc::new(FrameQueue::new(policy, 2));
            let mut dropped = 0;
            for i in 0..5 {
                dropped += usize::from(queue.push(frame(i)).await == Pushed::Dropped);
            }
            assert_eq!(dropped, 3, "{policy:?}");
            assert_eq!(drain(&queue).await, kept, "{policy:?}");
        }
    }

    #[tokio::test]
    async fn a_waiting_queue_holds_the_reader_until_a_frame_is_taken() {
        let queue = Arc::new(FrameQueue::new(DropPolicy::Wait, 1));
        assert_eq!(queue.push(frame(0)).await, Pushed::Queued);
        let pusher = tokio::spawn({
            let queue = Arc::clone(&queue);
            async move { queue.push(frame(1)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!pusher.is_finished(), "the second frame waits for room");
        let mut source = Arc::clone(&queue);
        assert!(matches!(source.next().await, Some(Ok(Ok(f))) if f.index == 0));
        assert_eq!(pusher.await.unwrap(), Pushed::Queued);
        assert_eq!(drain(&queue).await, vec![1]);
    }

    #[test]
    fn the_rate_cap_takes_frames_at_its_rate() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // A 10 fps source under a 5 fps cap: every other frame.
        let mut cap = RateCap::new(5.0);
        let taken: Vec<u64> = (0..10).map(|i| i * 100).filter(|&ms| cap.take(at(ms))).collect();
        assert_eq!(taken, vec![0, 200, 400, 600, 800]);
        // Under an 8 fps cap, 8 frames of 10 in a second, not 5.
        let mut cap = RateCap::new(8.0);
        assert_eq!((0..10).filter(|i| cap.take(at(1000 + i * 100))).count(), 8);
        // A burst after a stall: no more than one frame of catch-up.
        let mut cap = RateCap::new(5.0);
        assert!(cap.take(at(0)));
        let burst: Vec<bool> = [3000, 3001, 3002, 3003, 3004].iter().map(|&ms| cap.take(at(ms))).collect();
        assert_eq!(burst, vec![true, true, false, false, false]);
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let waits: Vec<u128> = (0..5).map(|_| backoff.next().as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 500, 500]);
        backoff.reset();
        assert_eq!(backoff.next(), Duration::from_millis(100));
    }
}
