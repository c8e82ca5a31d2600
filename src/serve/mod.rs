//! The serving core: everything a request goes through between a protocol's parser and its
//! writer, the same for every protocol. A protocol shell (`api::*`) looks the name up once
//! ([`crate::repository::ModelRepository::lookup`]: a model or a pipeline), parses its wire
//! format into the core's request (an [`ImageInput`], parameters, a [`RequestContext`]),
//! and shapes the core's answer ([`Answered`], [`PipelineRun`], or the Open Inference
//! Protocol's tensors in [`oip`]).
//!
//! Here: admission ([`Target::resolve`], whose rules are the engine's), decoding and
//! preprocessing on the CPU pool ([`prepare`]), the model's queue and its deadline, the one
//! post-processing path (`tasks::finish`), the response cache, and pipelines. Nothing here knows
//! HTTP routes, JSON bodies or gRPC messages; timings leave as `x-*` header pairs, which REST
//! writes as headers and gRPC as metadata.

pub mod infer;
pub mod manage;
pub mod oip;
pub mod pipeline;
pub mod prepare;
pub mod request;
pub mod streams;
pub mod video;

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::cache::ResponseCache;
use crate::error::ApiError;
use crate::repository::ModelRepository;

pub use infer::{answer, run, Answered, CacheOutcome, Inference, StageTimings, Target};
pub use pipeline::PipelineRun;
pub use prepare::ImageInput;
pub use request::{Deadline, RequestContext};

/// The limits every protocol's requests are held to.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_body_bytes: usize,
    pub max_image_pixels: u64,
    pub max_images_per_request: usize,
    /// Default deadline of an inference request, in milliseconds (REST and gRPC alike).
    pub request_timeout_ms: u64,
    /// How long an overload refusal (503, gRPC UNAVAILABLE) is held before it is answered.
    pub refusal_delay_ms: u64,
}

/// What the core needs to answer a request, whatever the protocol; cheap to clone.
#[derive(Clone)]
pub struct Core {
    pub repository: Arc<ModelRepository>,
    pub limits: RequestLimits,
    /// Bounds the decode/preprocess work running at once on tokio's blocking pool.
    pub cpu_permits: Arc<Semaphore>,
    /// The response cache; `None` when off.
    pub cache: Option<Arc<ResponseCache>>,
    /// What video requests may be, and where FFmpeg is.
    pub video: Arc<video::VideoSettings>,
    /// The live streams running, and what the operator allows of them.
    pub streams: Arc<streams::Streams>,
}

impl Core {
    pub fn new(repository: Arc<ModelRepository>, limits: RequestLimits, cpu_threads: usize, cache_bytes: usize) -> Core {
        Core {
            repository,
            limits,
            cpu_permits: Arc::new(Semaphore::new(cpu_threads.max(1))),
            cache: ResponseCache::new(cache_bytes).map(Arc::new),
            video: Arc::new(video::VideoSettings::default()),
            streams: Arc::new(streams::Streams::new(streams::StreamSettings::default())),
        }
    }

    /// Runs CPU-heavy, non-libtorch work (decoding, resizing, mask encoding) off the reactor,
    /// at most `cpu_permits` at a time.
    pub async fn run_cpu<T, F>(&self, work: F) -> Result<T, ApiError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let _permit = self
            .cpu_permits
            .acquire()
            .await
            .map_err(|_| ApiError::Internal("CPU pool closed".into()))?;
        // The work's spans and log lines stay the request's.
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(work))
            .await
            .map_err(|e| ApiError::Internal(format!("CPU task failed: {e}")))
    }

    pub fn decode_limits(&self) -> crate::image::DecodeLimits {
        crate::image::DecodeLimits { max_pixels: self.limits.max_image_pixels }
    }
}

/// Milliseconds with microsecond resolution, for timing headers and metadata.
pub fn millis(d: std::time::Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}
