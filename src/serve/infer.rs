//! One model's inference, as every protocol runs it: the version found and admitted
//! ([`Target::resolve`]), its images prepared on the CPU pool, run through the model's queue
//! within the deadline, every stage timed, and each image's result finished by the one
//! post-processing path (`tasks::finish`), with the response cache in front ([`answer`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use image::RgbImage;

use super::prepare::{prepare, prepare_sliced, ImageInput};
use super::{millis, Core, Deadline, RequestContext};
use crate::cache::{CacheKey, Cached};
use crate::engine::{Admission, Arrival, EngineError, JobOptions, ModelRuntime, RawTensor};
use crate::error::ApiError;
use crate::image::{Geometry, PreparedImage};
use crate::metrics as m;
use crate::model_config::{ModelConfig, Task};
use crate::repository::{LookupError, ModelEntry, ModelStatus, ServedRequest};
use crate::tasks::slicing::Tile;
use crate::tasks::{finish_all, finish_sliced, Finished, ModelOutput, PredictParams};

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
    /// The version the request's lookup found, if it serves and admits the request (the
    /// engine's rule: a free slot in its queue, and an expected wait within the deadline and
    /// the model's `max_queue_ms`). A version waiting on demand is loaded first, within the
    /// request's deadline (the load goes on for the next request if the deadline passes).
    pub async fn resolve(core: &Core, entry: Arc<ModelEntry>, context: &RequestContext) -> Result<Target, ApiError> {
        Self::resolve_as(core, entry, context, Arrival::New).await
    }

    /// As [`Target::resolve`], for a later step of work already admitted and partly done (a
    /// pipeline's second model).
    pub async fn resolve_continuing(core: &Core, entry: Arc<ModelEntry>, context: &RequestContext) -> Result<Target, ApiError> {
        Self::resolve_as(core, entry, context, Arrival::Continuing).await
    }

    /// As [`Target::resolve`], arriving as `arrival` says (a live stream's frame is
    /// [`Arrival::Sheddable`]). A request refused here (not ready, a failed load on demand, over
    /// capacity) is one of the version's failures, as one that fails later is.
    pub async fn resolve_as(core: &Core, entry: Arc<ModelEntry>, context: &RequestContext, arrival: Arrival) -> Result<Target, ApiError> {
        let started = Instant::now();
        let resolved = Self::admit(core, Arc::clone(&entry), context, arrival).await;
        if resolved.is_err() {
            entry.statistics.failed(started.elapsed());
        }
        resolved
    }

    async fn admit(core: &Core, entry: Arc<ModelEntry>, context: &RequestContext, arrival: Arrival) -> Result<Target, ApiError> {
        entry.touch();
        tracing::Span::current().record("version", entry.version.as_str());
        let name = entry.name.clone();
        // On demand, or being loaded on demand by a concurrent first request: wait for the one load.
        let load_time = if matches!(entry.status().status, ModelStatus::OnDemand | ModelStatus::Loading) && core.repository.on_demand().is_active() {
            let (repository, loading) = (Arc::clone(&core.repository), Arc::clone(&entry));
            let load = tokio::task::spawn_blocking(move || repository.ensure_loaded(&loading));
            match tokio::time::timeout_at(context.deadline.at.into(), load).await {
                Err(_) => return Err(ApiError::DeadlineExceeded(context.deadline.ms)),
                Ok(Err(e)) => return Err(ApiError::Internal(format!("loading on demand failed: {e}"))),
                Ok(Ok(Err(reason))) => return Err(ApiError::ModelNotReady { name, reason }),
                Ok(Ok(Ok(took))) => took,
            }
        } else {
            None
        };
        let report = entry.status();
        if report.status == ModelStatus::NotInstalled {
            // Not a wait-and-retry: this machine will not serve it until `make models` installs it.
            return Err(ApiError::NotFound(format!(
                "model '{name}' version {} is {}",
                entry.version,
                report.reason.unwrap_or_default()
            )));
        }
        let not_ready = |reason: String| ApiError::ModelNotReady { name: name.clone(), reason };
        let config = entry.config.clone().ok_or_else(|| not_ready(entry.status().reason.unwrap_or_default()))?;
        let runtime = entry.runtime().map_err(not_ready)?;
        // Decided before decoding, so a request over capacity costs no preprocessing.
        let Ok(admission) = runtime.try_admit(context.deadline.at, arrival) else {
            metrics::counter!(m::ADMISSION_REFUSED, "model" => name.clone()).increment(1);
            // Only a fresh request's refusal is held: a continuing step has done work already,
            // and a dropped stream frame must not hold up the frames behind it.
            if arrival == Arrival::New {
                hold_refusal(core.limits.refusal_delay_ms, context.deadline).await;
            }
            return Err(ApiError::Overloaded(name));
        };
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

/// Holds an overload refusal for `delay_ms` (never past the request's own deadline) before it is
/// answered. A client that retries at once, ignoring `Retry-After`, then sends a request per
/// `delay_ms` instead of one per round trip, so a retry storm costs fewer refusals, each a full
/// exchange of CPU taken from the admitted requests (BENCHMARKS.md, "refusals held"). A timer,
/// not a thread: a held refusal costs no CPU while it waits.
async fn hold_refusal(delay_ms: u64, deadline: Deadline) {
    if delay_ms == 0 {
        return;
    }
    let until = (Instant::now() + Duration::from_millis(delay_ms)).min(deadline.at);
    tokio::time::sleep_until(until.into()).await;
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

impl Inference {
    /// The outputs of a sliced request's tiles, to be merged per image (`tiles`, in order).
    pub fn tiled(mut self, tiles: Vec<Vec<Tile>>) -> Self {
        self.outputs.tiles = Some(tiles);
        self
    }
}

/// The executor's outputs for a request's images, with what finishing them needs.
pub struct Outputs {
    outputs: Vec<ModelOutput>,
    geometries: Vec<Geometry>,
    task: Task,
    labels: Arc<Vec<String>>,
    params: PredictParams,
    /// A sliced request's tiles, per image: its outputs are one per tile, merged per image.
    tiles: Option<Vec<Vec<Tile>>>,
}

impl Outputs {
    /// Every image's result in original pixels, in order: the one post-processing path
    /// (`tasks::finish`), then a sliced image's tiles merged. CPU work: call it on the CPU pool.
    pub fn finish(self) -> Result<Vec<Finished>, ApiError> {
        Ok(match &self.tiles {
            Some(tiles) => finish_sliced(self.task, self.outputs, &self.geometries, &self.labels, &self.params, tiles)?,
            None => finish_all(self.task, self.outputs, &self.geometries, &self.labels, &self.params)?,
        })
    }
}

/// What answered a request, when the response cache is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Miss,
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

/// How a request wants its answer beyond the finished results.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wants {
    /// The model's own output tensors too (V2 `raw_*` outputs).
    pub raw: bool,
    /// The decoded first image too (to draw an overlay on).
    pub original: bool,
    /// Not through the response cache (video frames: never seen twice, they would only
    /// evict photos' results).
    pub uncached: bool,
}

/// One request for one model, as every protocol hands it to the core: its images (encoded,
/// pixels or preprocessed tensors), the task's parameters and what it wants back beyond the
/// finished results. Its deadline and id travel beside it in the [`RequestContext`].
pub struct ImageRequest {
    pub input: ImageInput,
    pub params: PredictParams,
    pub wants: Wants,
}

impl ImageRequest {
    /// Images with the task's parameters, and nothing wanted beyond the finished results.
    pub fn new(input: ImageInput, params: PredictParams) -> ImageRequest {
        ImageRequest { input, params, wants: Wants::default() }
    }
}

/// [`run`], then the one post-processing path, with the response cache in front: when every
/// image's result for this version and these parameters is cached, nothing runs; otherwise the
/// request runs whole and each image's result is stored. Requests for raw outputs or for the
/// decoded original (an overlay) bypass it, and so do preprocessed tensors; the images'
/// identities are computed only when the cache is on. Each request is counted in the
/// version's statistics, answered or failed.
pub async fn answer(core: &Core, target: &Target, request: ImageRequest, context: &RequestContext) -> Result<Answered, ApiError> {
    let started = Instant::now();
    let answered = answer_counted(core, target, request, context, started).await;
    if answered.is_err() {
        target.entry.statistics.failed(started.elapsed());
    }
    answered
}

async fn answer_counted(
    core: &Core,
    target: &Target,
    request: ImageRequest,
    context: &RequestContext,
    started: Instant,
) -> Result<Answered, ApiError> {
    let statistics = &target.entry.statistics;
    let labels = target.labels();
    let ImageRequest { input, params, wants } = &request;
    let cache = core.cache.clone().filter(|_| !wants.raw && !wants.original && !wants.uncached);
    let keys: Option<Vec<CacheKey>> = cache.as_ref().and_then(|_| input.identities()).map(|images| {
        images
            .iter()
            .map(|parts| {
                let parts: Vec<&[u8]> = parts.iter().map(|p| p.as_ref()).collect();
                CacheKey::new(target.name(), &target.entry.version, target.entry.generation, &parts, params, false)
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
            statistics.cache_hit(started.elapsed());
            return Ok(Answered { results, timings: None, original: None, raw: Vec::new(), labels, cache: Some(CacheOutcome::Hit) });
        }
        statistics.cache_miss.record(started.elapsed());
    }
    let Inference { outputs, raw, original, mut timings } = run(core, target, request, context).await?;
    let post_started = Instant::now();
    let store = cache.zip(keys.clone());
    let results = core
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
    statistics.served(ServedRequest {
        images: results.len(),
        total: started.elapsed(),
        queue: timings.queue_time,
        compute_input: timings.preprocess_time,
        compute_infer: timings.inference_time,
        compute_output: post_started.elapsed(),
    });
    timings.finish_time = post_started.elapsed();
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
    /// The task's post-processing (`tasks::finish`: thresholds, NMS, masks, a sliced image's
    /// merge), when [`answer`] ran it; the protocol's shaping of the answer comes on top.
    pub finish_time: Duration,
}

/// Prepares the images on the CPU pool and runs them through the model with the request's
/// parameters.
pub async fn run(core: &Core, target: &Target, request: ImageRequest, context: &RequestContext) -> Result<Inference, ApiError> {
    let started = Instant::now();
    let config = Arc::clone(&target.config);
    let limits = core.decode_limits();
    let ImageRequest { input, params, wants } = request;
    if let Some(slicing) = params.slicing {
        if !matches!(target.task(), Task::Detection | Task::InstanceSegmentation) {
            return Err(ApiError::BadRequest(format!("'slice' applies to detection and instance segmentation models; '{}' is a {:?} model", target.name(), target.task())));
        }
        if wants.raw {
            return Err(ApiError::BadRequest("raw outputs are one per model input and a sliced image has one per tile: ask for raw outputs or for 'slice', not both".into()));
        }
        let (prepared, tiles, original) = core.run_cpu(move || prepare_sliced(input, &config, limits, wants.original, &slicing)).await??;
        tracing::Span::current().record("tiles", prepared.len() as i64);
        return Ok(run_prepared(core, target, prepared, original, started, params, false, context).await?.tiled(tiles));
    }
    let (prepared, original) = core.run_cpu(move || prepare(input, &config, limits, wants.original)).await??;
    run_prepared(core, target, prepared, original, started, params, wants.raw, context).await
}

/// Images already prepared for this model (a pipeline's, cut from its decoded images) through
/// its queue; `started` is when their preparation began.
#[allow(clippy::too_many_arguments)]
pub async fn run_prepared(
    core: &Core,
    target: &Target,
    prepared: Vec<PreparedImage>,
    original: Option<RgbImage>,
    started: Instant,
    params: PredictParams,
    want_raw: bool,
    context: &RequestContext,
) -> Result<Inference, ApiError> {
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
            hold_refusal(core.limits.refusal_delay_ms, deadline).await;
            return Err(engine_error(target.name(), EngineError::QueueFull, deadline.ms));
        }
        output => output.map_err(|e| engine_error(target.name(), e, deadline.ms))?,
    };
    tracing::Span::current().record("batch_size", output.batch_size as i64);
    let name = target.name().to_string();
    for (metric, time) in [(m::PREPROCESS_SECONDS, preprocess_time), (m::QUEUE_SECONDS, output.queue_time)] {
        metrics::histogram!(metric, "model" => name.clone()).record(m::seconds(time));
    }
    // The forward by precision too: an INT8 version beside its FP32 twin is the comparison.
    metrics::histogram!(m::INFERENCE_SECONDS, "model" => name.clone(), "precision" => target.config.compile.precision.name())
        .record(m::seconds(output.inference_time));
    Ok(Inference {
        outputs: Outputs { outputs: output.outputs, geometries, task: target.task(), labels: target.labels(), params, tiles: None },
        raw: output.raw,
        original,
        timings: StageTimings {
            preprocess_time,
            queue_time: output.queue_time,
            inference_time: output.inference_time,
            batch_size: output.batch_size,
            model_load_time: target.load_time,
            finish_time: Duration::ZERO,
        },
    })
}

impl StageTimings {
    /// Records the post-processing time (the task's, then the protocol's shaping of the answer,
    /// `shaping_time`); the stages' times as `x-*` pairs.
    pub fn finish(&self, model: &str, shaping_time: Duration) -> Vec<(String, String)> {
        let postprocess_time = self.finish_time + shaping_time;
        metrics::histogram!(m::POSTPROCESS_SECONDS, "model" => model.to_string()).record(m::seconds(postprocess_time));
        let mut pairs = Vec::with_capacity(6);
        if let Some(load) = self.model_load_time {
            pairs.push(("x-model-load-time-ms".to_string(), millis(load)));
        }
        for (header, value) in [
            ("x-preprocess-time-ms", millis(self.preprocess_time)),
            ("x-queue-time-ms", millis(self.queue_time)),
            ("x-inference-time-ms", millis(self.inference_time)),
            ("x-postprocess-time-ms", millis(postprocess_time)),
            ("x-batch-size", self.batch_size.to_string()),
        ] {
            pairs.push((header.to_string(), value));
        }
        pairs
    }
}

/// An answer's `x-*` timing pairs and `x-cache`, for REST headers and gRPC metadata alike:
/// the one place they are written. `post_started` is when the protocol began shaping the
/// answer (the post-processing time runs from there).
pub fn answer_headers(timings: Option<StageTimings>, cache: Option<CacheOutcome>, model: &str, post_started: Instant) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(timings) = timings {
        write_pairs(timings.finish(model, post_started.elapsed()), &mut headers);
    }
    write_cache(cache, &mut headers);
    headers
}

/// `x-cache: hit|miss`, when the cache is on and the request is one it keeps.
pub fn write_cache(outcome: Option<CacheOutcome>, headers: &mut HeaderMap) {
    if let Some(outcome) = outcome {
        let value = if outcome == CacheOutcome::Hit { "hit" } else { "miss" };
        headers.insert(HeaderName::from_static("x-cache"), HeaderValue::from_static(value));
    }
}

/// `x-*` pairs into a header map (a pair that is not a valid header is left out).
pub fn write_pairs(pairs: Vec<(String, String)>, headers: &mut HeaderMap) {
    for (name, value) in pairs {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::from_str(&value)) {
            headers.insert(name, value);
        }
    }
}

/// The one mapping of engine failures to the service's errors, for every protocol.
pub fn engine_error(model: &str, error: EngineError, timeout_ms: u64) -> ApiError {
    match error {
        EngineError::QueueFull => ApiError::Overloaded(model.to_string()),
        EngineError::DeadlineExceeded => ApiError::DeadlineExceeded(timeout_ms),
        EngineError::Stopped => ApiError::ModelNotReady { name: model.to_string(), reason: "its queue has closed".into() },
        // The model itself failed on this input: a server-side fault, logged with detail.
        EngineError::Forward(detail) | EngineError::Output(detail) => {
            ApiError::ModelFailed { model: model.to_string(), detail }
        }
        EngineError::ExecutorFailed => ApiError::ModelFailed { model: model.to_string(), detail: "its inference executor died running it".into() },
    }
}
