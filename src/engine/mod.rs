//! The engine: each model runs on long-lived worker threads that own its libtorch state and
//! take jobs from one bounded queue. Only plain Rust data crosses the queue; `Tensor` and
//! `IValue` never leave the worker thread.

mod admission;
pub mod aoti;
mod backend;
mod batcher;
mod outputs;
pub mod ops;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};
use tokio::sync::oneshot;

use crate::image::PreparedImage;
use crate::model_config::ModelConfig;
use crate::tasks::ModelOutput;
pub use admission::Admission;
use admission::{QueuedImages, ServiceTime};

pub use backend::{load_model, Backend, LoadedModel, RawOutputSpec};
pub use batcher::spawn_workers;
pub use outputs::{RawData, RawTensor};

#[derive(Debug, Clone, Copy)]
pub struct JobOptions {
    /// Detection candidates below this score are dropped on the worker.
    pub score_threshold: f32,
    /// Segmentation: also return each pixel's class probability.
    pub want_confidence: bool,
    /// Also return the model's own output tensors, per image (stacked-batch models only).
    pub want_raw: bool,
}

/// A request's images, on their way to a worker.
pub struct Job {
    pub images: Vec<PreparedImage>,
    pub options: JobOptions,
    pub enqueued_at: Instant,
    /// Past this the caller has answered 504 and the worker drops the job uncomputed.
    pub deadline: Instant,
    pub reply: oneshot::Sender<Result<JobOutput, EngineError>>,
    /// The request's id and span, so the worker's log lines about this job name it.
    pub request_id: String,
    pub span: tracing::Span,
}

#[derive(Debug)]
pub struct JobOutput {
    pub outputs: Vec<ModelOutput>,
    /// The model's own output tensors per image, when the job asked for them.
    pub raw: Vec<Vec<RawTensor>>,
    pub queue_time: Duration,
    pub inference_time: Duration,
    /// Images in the forward pass this job ran in (its own and others').
    pub batch_size: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the model's forward pass failed: {0}")]
    Forward(String),
    #[error("the model's output does not follow the configured convention: {0}")]
    Output(String),
    #[error("the queue is full")]
    QueueFull,
    #[error("the model's workers have stopped")]
    Stopped,
    #[error("the worker failed while running this request")]
    WorkerFailed,
    #[error("the request's deadline passed before it was answered")]
    DeadlineExceeded,
}

/// The handle the HTTP side holds: a sender into the model's bounded queue. The workers
/// behind it exit once every handle is dropped and the queue is drained.
#[derive(Clone)]
pub struct ModelRuntime {
    queue: Sender<Job>,
    pub config: Arc<ModelConfig>,
    model: Arc<LoadedModel>,
    workers: usize,
    intra_op_threads: usize,
    /// Shared by every pool over this loaded model, so a rescale keeps what was measured.
    service: Arc<ServiceTime>,
    queued: Arc<QueuedImages>,
    /// Requests admitted and still being decoded: they will queue in a moment.
    admitted: Arc<QueuedImages>,
}

/// The first line of a libtorch or shim message that says something (they start with a blank
/// line or a C++ frame more often than not), for logs and reasons.
pub(crate) fn first_line(message: &str) -> &str {
    message.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or(message)
}

impl ModelRuntime {
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The model's own outputs, as found at warm-up (empty when not available).
    pub fn raw_outputs(&self) -> &[RawOutputSpec] {
        &self.model.raw_outputs
    }

    /// A new pool of `workers` threads over the same loaded module, with its own queue.
    pub fn rescaled(&self, name: &str, workers: usize) -> ModelRuntime {
        spawn_workers(name, Arc::clone(&self.model), Arc::clone(&self.config), workers, self.intra_op_threads)
    }

    /// Enqueues at once or refuses at once: a full queue is an answer, not a wait. Waits for
    /// the answer until `deadline`; a caller that gives up (or whose client goes away) drops
    /// the reply channel, and the worker skips the job. The caller's span travels with the
    /// job.
    pub async fn infer(
        &self,
        images: Vec<PreparedImage>,
        options: JobOptions,
        deadline: Instant,
        request_id: &str,
    ) -> Result<JobOutput, EngineError> {
        let (reply, response) = oneshot::channel();
        let count = images.len();
        let job = Job {
            images,
            options,
            enqueued_at: Instant::now(),
            deadline,
            reply,
            request_id: request_id.to_string(),
            span: tracing::Span::current(),
        };
        match self.queue.try_send(job) {
            Ok(()) => self.queued.add(count),
            Err(TrySendError::Full(_)) => return Err(EngineError::QueueFull),
            Err(TrySendError::Disconnected(_)) => return Err(EngineError::Stopped),
        }
        match tokio::time::timeout_at(deadline.into(), response).await {
            Ok(Ok(answer)) => answer,
            // The sender was dropped unanswered: the worker died on this batch.
            Ok(Err(_)) => Err(EngineError::WorkerFailed),
            Err(_) => Err(EngineError::DeadlineExceeded),
        }
    }

    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    /// How long a request arriving now would wait for a worker: the images queued, times the
    /// recent forward time per image, over the workers. Admission and the
    /// `visionserve_expected_queue_wait_seconds` gauge both read this one estimate.
    pub fn expected_wait(&self) -> Duration {
        let waiting = self.queued.get() + self.admitted.get();
        admission::expected_wait(waiting, self.service.per_image(), self.workers)
    }

    /// How long `images` take to clear the queue at the recent pace.
    pub fn time_for(&self, images: usize) -> Duration {
        admission::expected_wait(images, self.service.per_image(), self.workers)
    }

    /// Counts a request that passed admission until its job is queued (`Admission::release`)
    /// or it ends, so that the expected wait sees it while it is decoded.
    pub fn admit(&self) -> Admission {
        Admission::new(Arc::clone(&self.admitted))
    }

    /// Whether a job would be refused now. Checked before decoding, so that a request over
    /// capacity is refused without paying for its preprocessing; `infer`'s `try_send` stays
    /// the authority.
    pub fn is_full(&self) -> bool {
        self.queue.is_full()
    }
}
