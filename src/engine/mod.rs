//! The engine: one pool of long-lived inference threads (`pool.rs`), shared by every loaded
//! model version, each version with its own bounded queue. Only plain Rust data crosses a
//! queue; `Tensor` and `IValue` never leave the executor thread that ran the forward.

mod admission;
pub mod aoti;
mod backend;
mod batcher;
mod outputs;
pub mod ops;
pub mod policy;
mod pool;
mod statistics;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::image::PreparedImage;
use crate::model_config::ModelConfig;
use crate::tasks::ModelOutput;
pub use admission::Admission;
pub use policy::Arrival;
use admission::QueuedImages;

pub use backend::{load_model, Backend, LoadedModel, RawOutputSpec};
pub use outputs::{RawData, RawTensor};
pub use pool::{inference_thread_count, set_inference_threads};
pub use statistics::{BatchRow, DurationCounter, DurationTotal};

use pool::{pool, ModelQueue, Registration};

#[derive(Debug, Clone, Copy)]
pub struct JobOptions {
    /// Detection candidates below this score are dropped on the executor.
    pub score_threshold: f32,
    /// Segmentation: also return each pixel's class probability.
    pub want_confidence: bool,
    /// Also return the model's own output tensors, per image (stacked-batch models only).
    pub want_raw: bool,
}

/// A request's images, on their way to an executor.
pub struct Job {
    pub images: Vec<PreparedImage>,
    pub options: JobOptions,
    pub enqueued_at: Instant,
    /// Past this the caller has answered 504 and the executor drops the job uncomputed.
    pub deadline: Instant,
    pub reply: oneshot::Sender<Result<JobOutput, EngineError>>,
    /// The request's id and span, so the executor's log lines about this job name it.
    pub request_id: String,
    pub span: tracing::Span,
    /// Open while the job waits in the queue; the batch that takes it closes it.
    pub queue_span: tracing::Span,
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
    #[error("the model's queue has closed")]
    Stopped,
    #[error("the inference executor failed while running this request")]
    ExecutorFailed,
    #[error("the request's deadline passed before it was answered")]
    DeadlineExceeded,
}

/// Admission's refusal: the request would wait past its budget, or the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

/// The handle the serving core holds: one model version's queue in the shared inference pool.
/// The queue leaves the pool once every handle is dropped and what it holds is answered.
#[derive(Clone)]
pub struct ModelRuntime {
    registration: Arc<Registration>,
    model: Arc<LoadedModel>,
    /// The version's `max_queue_ms`, admission's bound on a fresh request's wait.
    max_queue_ms: u64,
    /// Requests admitted and still being decoded: they will queue in a moment.
    admitted: Arc<QueuedImages>,
}

/// Registers a loaded model version with the inference pool; `cap` bounds the executors it
/// may use at once (`runtime.workers`; `None`: the whole pool).
pub fn serve(name: &str, model: Arc<LoadedModel>, config: Arc<ModelConfig>, cap: Option<usize>) -> ModelRuntime {
    let max_queue_ms = config.batching.max_queue_ms;
    let registration = pool().register(name, Arc::clone(&model), config, cap);
    ModelRuntime { registration, model, max_queue_ms, admitted: Arc::new(QueuedImages::default()) }
}

/// The first line of a libtorch or shim message that says something (they start with a blank
/// line or a C++ frame more often than not), for logs and reasons.
pub(crate) fn first_line(message: &str) -> &str {
    message.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or(message)
}

impl ModelRuntime {
    fn queue(&self) -> &ModelQueue {
        &self.registration.queue
    }

    /// Executors this version may use at once, as configured or scaled (it may exceed the
    /// pool's size, which then bounds it).
    pub fn workers(&self) -> usize {
        self.queue().cap()
    }

    /// Forwards this version can have running at once: its cap, bounded by the pool.
    pub fn parallelism(&self) -> usize {
        self.queue().cap().min(pool().executors()).max(1)
    }

    /// Executors of the shared pool serving this version at this moment.
    pub fn executors_now(&self) -> usize {
        self.queue().running()
    }


    /// The model's own outputs, as found at warm-up (empty when not available).
    pub fn raw_outputs(&self) -> &[RawOutputSpec] {
        &self.model.raw_outputs
    }

    /// The most images one forward takes (the config's bound, or less where the load-time
    /// measurement found larger batches no cheaper per image).
    pub fn batch_bound(&self) -> usize {
        self.model.batch_bound
    }

    /// Forward passes run for requests since this version loaded.
    pub fn executions(&self) -> u64 {
        self.model.executions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What the forwards that answered cost, per batch size that ran.
    pub fn batch_statistics(&self) -> Vec<BatchRow> {
        self.model.batch_statistics.rows()
    }

    /// Executors kept for this version whenever it has work (0 unless scaled).
    pub fn reserved(&self) -> usize {
        self.queue().reserved()
    }

    /// The management API's scale call: `reserved` executors kept for this version whenever it
    /// has work, and at most `cap` (unchanged when `None`, and never below `reserved`) at once.
    /// Returns the cap now in force.
    pub fn rescale(&self, reserved: usize, cap: Option<usize>) -> usize {
        self.queue().set_share(reserved, cap.unwrap_or_else(|| self.queue().cap()))
    }

    /// Enqueues at once or refuses at once: a full queue is an answer, not a wait. Waits for
    /// the answer until `deadline`; a caller that gives up (or whose client goes away) drops
    /// the reply channel, and the executor skips the job. The caller's span travels with the
    /// job.
    pub async fn infer(
        &self,
        images: Vec<PreparedImage>,
        options: JobOptions,
        deadline: Instant,
        request_id: &str,
    ) -> Result<JobOutput, EngineError> {
        let (reply, response) = oneshot::channel();
        let job = Job {
            images,
            options,
            enqueued_at: Instant::now(),
            deadline,
            reply,
            request_id: request_id.to_string(),
            span: tracing::Span::current(),
            queue_span: tracing::info_span!("queue_wait"),
        };
        if self.queue().push(job).is_err() {
            return Err(EngineError::QueueFull);
        }
        match tokio::time::timeout_at(deadline.into(), response).await {
            Ok(Ok(answer)) => answer,
            // The sender was dropped unanswered: the executor died on this batch.
            Ok(Err(_)) => Err(EngineError::ExecutorFailed),
            Err(_) => Err(EngineError::DeadlineExceeded),
        }
    }

    pub fn queue_depth(&self) -> usize {
        self.queue().queued_jobs()
    }

    /// How long a request arriving now would wait for a worker: the images queued, times the
    /// recent forward time per image, over the workers. Admission and the
    /// `visionserve_expected_queue_wait_seconds` gauge both read this one estimate.
    pub fn expected_wait(&self) -> Duration {
        let waiting = self.queue().queued_images() + self.admitted.get();
        admission::expected_wait(waiting, self.model.service.per_image(), self.parallelism())
    }

    /// How long `images` take to clear the queue at the recent pace.
    pub fn time_for(&self, images: usize) -> Duration {
        admission::expected_wait(images, self.model.service.per_image(), self.parallelism())
    }

    /// Admission: lets a request in if its queue has a free slot and the engine's rule
    /// (`policy::admits`) finds its expected wait within its deadline (and, arriving fresh,
    /// within `max_queue_ms` or the floor's time). Decided before decoding, so a request over
    /// capacity is refused without paying for its preprocessing; `infer`'s push stays the
    /// authority on the queue's bound. The returned [`Admission`] counts the request in the
    /// expected wait until its job is queued (`Admission::release`) or it ends.
    pub fn try_admit(&self, deadline: Instant, arrival: Arrival) -> Result<Admission, Refused> {
        if self.queue().is_full() {
            return Err(Refused);
        }
        let state = policy::QueueState {
            expected_wait: self.expected_wait(),
            time_left: deadline.saturating_duration_since(Instant::now()),
            max_queue_ms: self.max_queue_ms,
            floor: self.time_for(policy::floor_images(self.parallelism(), self.batch_bound())),
        };
        if !policy::admits(state, arrival) {
            return Err(Refused);
        }
        Ok(Admission::new(Arc::clone(&self.admitted)))
    }
}
