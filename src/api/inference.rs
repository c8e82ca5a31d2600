//! The steps every protocol's inference handler shares, in one place: find the model version,
//! refuse early when its queue is full, prepare the images on the CPU pool, run them through
//! the model's queue within the deadline, record the per-stage timings, and finish each
//! image's result (`tasks::finish`) for the protocol to shape.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue};

use super::{millis, AppState};
use crate::engine::{Admission, EngineError, JobOptions, ModelRuntime, RawTensor};
use crate::cache::{CacheKey, Cached};
use crate::error::ApiError;
use crate::image::{Geometry, PreparedImage};
use crate::metrics as m;
use crate::model_config::{ModelConfig, Task};
use crate::repository::{LookupError, ModelEntry, ModelStatus};
use crate::tasks::{finish_all, Finished, ModelOutput, PredictParams};
use image::RgbImage;

impl From<LookupError> for ApiError {
    fn from(e: LookupError) -> Self {
        match e {
            LookupError::NoModel(name) => ApiError::ModelNotFound(name),
            other => ApiError::NotFound(other.to_string()),
        }
    }
}

/// One version of one model, serving, as a request sees it from start to end.
pub struct Target {
    pub entry: Arc<ModelEntry>,
    pub config: Arc<ModelConfig>,
    runtime: ModelRuntime,
    /// Counts this request in the model's expected wait from admission until it is queued.
    admission: Admission,
    /// How long this request waited for the model to load on demand (its cold start).
    pub load_time: Option<Duration>,
}

impl Target {
    /// The model (its default version unless one is named) if it serves and has room: a
    /// free slot in its queue, and an expected wait within the request's deadline and the
    /// model's `max_queue_ms`. A version waiting on demand is loaded first, within the
    /// request's deadline (the load goes on for the next request if the deadline passes);
    /// with no history yet, admission lets its first requests in.
    pub async fn resolve(state: &AppState, name: &str, version: Option<&str>, context: &RequestContext) -> Result<Target, ApiError> {
        Self::resolve_as(state, name, version, context, Arrival::New).await
    }

    /// As [`Target::resolve`], for a later step of work already admitted and partly done (a
    /// pipeline's second model): refused only for a full queue or a wait past its deadline, not
    /// for `max_queue_ms`, which would throw the first step's work away to shorten a queue.
    pub async fn resolve_continuing(state: &AppState, name: &str, version: Option<&str>, context: &RequestContext) -> Result<Target, ApiError> {
        Self::resolve_as(state, name, version, context, Arrival::Continuing).await
    }

    async fn resolve_as(state: &AppState, name: &str, version: Option<&str>, context: &RequestContext, arrival: Arrival) -> Result<Target, ApiError> {
        let entry = state.repository.get(name, version)?;
        entry.touch();
        tracing::Span::current().record("version", entry.version.as_str());
        // On demand, or being loaded on demand by a concurrent first request: wait for the one load.
        let load_time = if matches!(entry.status().status, ModelStatus::OnDemand | ModelStatus::Loading) && state.repository.on_demand().is_active() {
            let (repository, loading) = (Arc::clone(&state.repository), Arc::clone(&entry));
            let load = tokio::task::spawn_blocking(move || repository.ensure_loaded(&loading));
            match tokio::time::timeout_at(context.deadline.at.into(), load).await {
                Err(_) => return Err(ApiError::DeadlineExceeded(context.deadline.ms)),
                Ok(Err(e)) => return Err(ApiError::Internal(format!("loading on demand failed: {e}"))),
                Ok(Ok(Err(reason))) => return Err(ApiError::ModelNotReady { name: name.to_string(), reason }),
                Ok(Ok(Ok(took))) => took,
            }
        } else {
            None
        };
        let not_ready = |reason: String| ApiError::ModelNotReady { name: name.to_string(), reason };
        let config = entry.config.clone().ok_or_else(|| not_ready(entry.status().reason.unwrap_or_default()))?;
        let runtime = entry.runtime().map_err(not_ready)?;
        // Checked before decoding, so a request over capacity costs no preprocessing.
        if runtime.is_full() || !within_budget(&runtime, &config, context.deadline, arrival) {
            metrics::counter!(m::ADMISSION_REFUSED, "model" => name.to_string()).increment(1);
            if arrival == Arrival::New {
                hold_refusal(state.limits.refusal_delay_ms, context.deadline).await;
            }
            return Err(ApiError::Overloaded(name.to_string()));
        }
        let admission = runtime.admit();
        Ok(Target { entry, config, runtime, admission, load_time })
    }

    pub fn name(&self) -> &str {
        &self.entry.name
    }

    pub fn task(&self) -> Task {
        self.config.task
    }

    pub fn labels(&self) -> Arc<Vec<String>> {
        Arc::clone(&self.entry.labels)
    }
}

/// Whether a request reaches a model fresh, or as a later step of work already under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    New,
    Continuing,
}

/// Holds an overload refusal for `delay_ms` (never past the request's own deadline) before it is
/// answered. A client that retries at once, ignoring `Retry-After`, then sends a request per
/// `delay_ms` instead of one per round trip. By Little's law a storm of N such clients costs
/// N ÷ (delay + round trip) refusals a second, each a full HTTP exchange of server and client
/// CPU taken from the admitted requests; at 160 clients on 2 cores, answering at once gave the
/// admitted 0.47× the unloaded throughput, holding 50 ms 0.80× (BENCHMARKS.md). A timer, not
/// a thread: a held refusal costs no CPU while it waits.
async fn hold_refusal(delay_ms: u64, deadline: Deadline) {
    if delay_ms == 0 {
        return;
    }
    let until = (Instant::now() + Duration::from_millis(delay_ms)).min(deadline.at);
    tokio::time::sleep_until(until.into()).await;
}

/// Images a model's queue always admits, whatever `max_queue_ms` says: what 16 clients keep
/// waiting, and at least a full batch for each executor that may serve it, so a slow model is
/// not refused under ordinary load and its executors never run dry (a queue refused down to
/// nothing idles them while clients retry). No more than that: every image admitted beyond
/// what keeps the executors busy only lengthens every admitted request's wait.
const MIN_QUEUE_IMAGES: usize = 16;

/// Whether a request arriving now can be answered in time: its expected wait for a worker
/// must be within what is left of its deadline, and within the model's `max_queue_ms` or
/// the time the floor above takes, whichever is longer (`max_queue_ms = 0`: no such bound).
fn within_budget(runtime: &ModelRuntime, config: &ModelConfig, deadline: Deadline, arrival: Arrival) -> bool {
    let wait = runtime.expected_wait();
    if wait > deadline.at.saturating_duration_since(Instant::now()) {
        return false;
    }
    let max_queue = config.batching.max_queue_ms;
    if max_queue == 0 || arrival == Arrival::Continuing {
        return true;
    }
    let floor_images = MIN_QUEUE_IMAGES.max(runtime.parallelism() * runtime.batch_bound());
    let floor = runtime.time_for(floor_images);
    wait <= Duration::from_millis(max_queue).max(floor)
}

/// What came back, with the time each stage took.
pub struct Inference {
    pub outputs: Outputs,
    /// The model's own output tensors per image, when asked for.
    pub raw: Vec<Vec<RawTensor>>,
    /// The decoded first image, when the preparation kept it (to draw an overlay on).
    pub original: Option<RgbImage>,
    pub timings: StageTimings,
}

/// The worker's outputs for a request's images, with what finishing them needs.
pub struct Outputs {
    outputs: Vec<ModelOutput>,
    geometries: Vec<Geometry>,
    task: Task,
    labels: Arc<Vec<String>>,
    params: PredictParams,
}

impl Outputs {
    /// Every image's result in original pixels, in order: the one post-processing path
    /// (`tasks::finish`). CPU work: call it on the CPU pool.
    pub fn finish(self) -> Result<Vec<Finished>, ApiError> {
        Ok(finish_all(self.task, self.outputs, &self.geometries, &self.labels, &self.params)?)
    }
}

/// Already-decoded RGB images (V2 pixels, a pipeline's images and crops) through a model's
/// preprocessing; a failure there is the server's, not the client's.
pub fn preprocess_images(images: &[RgbImage], spec: &crate::model_config::InputSpec) -> Result<Vec<PreparedImage>, ApiError> {
    images
        .iter()
        .map(|image| crate::image::preprocess(image, spec).map_err(|e| ApiError::Internal(e.to_string())))
        .collect()
}

/// A request's images as the response cache tells them apart: per image, the bytes that decide
/// its result (the encoded file; or the pixels with their shape).
pub type ImageIdentities = Vec<Vec<Bytes>>;

/// What answered a request, when the response cache is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Miss,
}

impl CacheOutcome {
    /// The `x-cache` header.
    pub fn write(outcome: Option<CacheOutcome>, headers: &mut HeaderMap) {
        if let Some(outcome) = outcome {
            let value = if outcome == CacheOutcome::Hit { "hit" } else { "miss" };
            headers.insert(HeaderName::from_static("x-cache"), HeaderValue::from_static(value));
        }
    }
}

/// Every image's finished result, from the cache or from the model.
pub struct Answered {
    pub results: Vec<Finished>,
    /// The stages' times; `None` when the cache answered and no stage ran.
    pub timings: Option<StageTimings>,
    pub original: Option<RgbImage>,
    pub raw: Vec<Vec<RawTensor>>,
    pub labels: Arc<Vec<String>>,
    /// `None` when the cache is off or the request is not cached (raw outputs, an overlay).
    pub cache: Option<CacheOutcome>,
}

/// [`run`], then the one post-processing path, with the response cache in front: when every
/// image's result for this version and these parameters is cached, nothing runs; otherwise the
/// request runs whole and each image's result is stored. Requests for raw outputs or for the
/// decoded original (an overlay) bypass it. `identities` is `None` for inputs the cache does
/// not key (preprocessed tensors).
pub async fn answer<P>(
    state: &AppState,
    target: &Target,
    identities: Option<ImageIdentities>,
    prepare: P,
    params: PredictParams,
    want_raw: bool,
    context: &RequestContext,
) -> Result<Answered, ApiError>
where
    P: FnOnce(&ModelConfig) -> Result<(Vec<PreparedImage>, Option<RgbImage>), ApiError> + Send + 'static,
{
    let labels = target.labels();
    let cache = state.cache.clone().filter(|_| !want_raw);
    let keys: Option<Vec<CacheKey>> = cache.as_ref().zip(identities).map(|(_, images)| {
        images
            .iter()
            .map(|parts| {
                let parts: Vec<&[u8]> = parts.iter().map(|p| p.as_ref()).collect();
                CacheKey::new(target.name(), &target.entry.version, target.entry.generation, &parts, &params, false)
            })
            .collect()
    });
    if let (Some(cache), Some(keys)) = (&cache, &keys) {
        let found: Vec<Option<Finished>> = keys
            .iter()
            .map(|key| match cache.get(key) {
                Some(Cached::Result(result)) => Some(result),
                _ => None,
            })
            .collect();
        if found.iter().all(Option::is_some) {
            let results = found.into_iter().flatten().collect();
            return Ok(Answered { results, timings: None, original: None, raw: Vec::new(), labels, cache: Some(CacheOutcome::Hit) });
        }
    }
    let Inference { outputs, raw, original, timings } = run(state, target, prepare, params, want_raw, context).await?;
    let store = cache.zip(keys.clone());
    let results = state
        .run_cpu(move || {
            let _postprocess = tracing::info_span!("postprocess").entered();
            let results = outputs.finish()?;
            if let Some((cache, keys)) = store {
                for (key, result) in keys.into_iter().zip(&results) {
                    cache.put(key, Cached::Result(result.clone()));
                }
            }
            Ok::<_, ApiError>(results)
        })
        .await??;
    let cache = keys.map(|_| CacheOutcome::Miss);
    Ok(Answered { results, timings: Some(timings), original, raw, labels, cache })
}

#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimings {
    pub preprocess_time: Duration,
    pub queue_time: Duration,
    pub inference_time: Duration,
    /// Images in the forward pass the request ran in (its own and others').
    pub batch_size: usize,
    /// The wait for the model to load on demand, when this request found it unloaded.
    pub model_load_time: Option<Duration>,
}

/// Prepares the images with `prepare` on the CPU pool (which may hand back the decoded first
/// image) and runs them through the model with the request's parameters; `want_raw` also
/// returns the model's own output tensors.
pub async fn run<P>(
    state: &AppState,
    target: &Target,
    prepare: P,
    params: PredictParams,
    want_raw: bool,
    context: &RequestContext,
) -> Result<Inference, ApiError>
where
    P: FnOnce(&ModelConfig) -> Result<(Vec<PreparedImage>, Option<RgbImage>), ApiError> + Send + 'static,
{
    let started = Instant::now();
    let config = Arc::clone(&target.config);
    let (prepared, original) = state.run_cpu(move || prepare(&config)).await??;
    let preprocess_time = started.elapsed();
    let geometries = prepared.iter().map(|p| p.geometry).collect();
    let options = JobOptions { score_threshold: params.score_threshold, want_confidence: params.pixel_confidence, want_raw };
    let deadline = context.deadline;
    // From here on the job itself counts in the queue.
    target.admission.release();
    let output = match target.runtime.infer(prepared, options, deadline.at, &context.request_id).await {
        // Admitted, then beaten to the queue's last places while it decoded: a refusal like
        // admission's, held the same way.
        Err(EngineError::QueueFull) => {
            hold_refusal(state.limits.refusal_delay_ms, deadline).await;
            return Err(engine_error(target.name(), EngineError::QueueFull, deadline.ms));
        }
        output => output.map_err(|e| engine_error(target.name(), e, deadline.ms))?,
    };
    tracing::Span::current().record("batch_size", output.batch_size as i64);
    let name = target.name().to_string();
    for (metric, time) in [
        (m::PREPROCESS_SECONDS, preprocess_time),
        (m::QUEUE_SECONDS, output.queue_time),
        (m::INFERENCE_SECONDS, output.inference_time),
    ] {
        metrics::histogram!(metric, "model" => name.clone()).record(m::seconds(time));
    }
    Ok(Inference {
        outputs: Outputs { outputs: output.outputs, geometries, task: target.task(), labels: target.labels(), params },
        raw: output.raw,
        original,
        timings: StageTimings {
            preprocess_time,
            queue_time: output.queue_time,
            inference_time: output.inference_time,
            batch_size: output.batch_size,
            model_load_time: target.load_time,
        },
    })
}

impl StageTimings {
    /// Records the post-processing time and puts every stage's time on the response.
    pub fn finish(&self, model: &str, postprocess_time: Duration, headers: &mut HeaderMap) {
        metrics::histogram!(m::POSTPROCESS_SECONDS, "model" => model.to_string()).record(m::seconds(postprocess_time));
        if let Some(load) = self.model_load_time {
            headers.insert(HeaderName::from_static("x-model-load-time-ms"), HeaderValue::from_str(&millis(load)).expect("digits"));
        }
        for (header, value) in [
            ("x-preprocess-time-ms", millis(self.preprocess_time)),
            ("x-queue-time-ms", millis(self.queue_time)),
            ("x-inference-time-ms", millis(self.inference_time)),
            ("x-postprocess-time-ms", millis(postprocess_time)),
            ("x-batch-size", self.batch_size.to_string()),
        ] {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(HeaderName::from_static(header), v);
            }
        }
    }
}

/// What every protocol reads from a request's headers before anything else: its deadline and
/// its id (set by the request-id layer), which travels with the job into the worker's logs.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub deadline: Deadline,
    pub request_id: String,
}

impl RequestContext {
    pub fn from_headers(headers: &HeaderMap, default_timeout_ms: u64) -> Result<RequestContext, ApiError> {
        let deadline = Deadline::from_headers(headers, default_timeout_ms, Instant::now())?;
        let request_id = headers.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
        Ok(RequestContext { deadline, request_id })
    }
}

/// When a request must be answered by: the server default, or `x-request-timeout-ms`.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub at: Instant,
    pub ms: u64,
}

impl Deadline {
    pub fn from_headers(headers: &HeaderMap, default_ms: u64, started: Instant) -> Result<Deadline, ApiError> {
        let ms = match headers.get("x-request-timeout-ms") {
            None => default_ms,
            Some(value) => value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|ms| (1..=600_000).contains(ms))
                .ok_or_else(|| {
                    ApiError::InvalidParameter("header 'x-request-timeout-ms' must be an integer within 1..=600000".into())
                })?,
        };
        Ok(Deadline { at: started + Duration::from_millis(ms), ms })
    }
}

/// The one mapping of engine failures to HTTP errors, shared by every protocol's handler.
pub fn engine_error(model: &str, error: EngineError, timeout_ms: u64) -> ApiError {
    match error {
        EngineError::QueueFull => ApiError::Overloaded(model.to_string()),
        EngineError::DeadlineExceeded => ApiError::DeadlineExceeded(timeout_ms),
        EngineError::Stopped => ApiError::ModelNotReady { name: model.to_string(), reason: "its workers have stopped".into() },
        // The model itself failed on this input: a server-side fault, logged with detail.
        EngineError::Forward(detail) | EngineError::Output(detail) => {
            ApiError::ModelFailed { model: model.to_string(), detail }
        }
        EngineError::WorkerFailed => ApiError::ModelFailed { model: model.to_string(), detail: "the worker died".into() },
    }
}
