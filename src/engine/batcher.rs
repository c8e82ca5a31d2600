//! The batcher: long-lived worker threads over one bounded queue per model version. Each takes
//! a job, gathers more up to the batch size (waiting at most `max_delay_ms`), skips jobs whose
//! client has gone or whose deadline passed, runs the forward pass through the backend, and
//! answers each job with its own outputs, in order. A forward's log lines carry the ids of
//! every request in its batch.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::backend::{run_images, LoadedModel};
use super::outputs::RawTensor;
use super::admission::QueuedImages;
use super::{EngineError, Job, JobOptions, JobOutput, ModelRuntime};
use crate::image::PreparedImage;
use crate::metrics as m;
use crate::model_config::ModelConfig;
use crate::tasks::ModelOutput;

/// Starts `workers` threads over one bounded queue and returns the handle to it.
pub fn spawn_workers(
    name: &str,
    model: Arc<LoadedModel>,
    config: Arc<ModelConfig>,
    workers: usize,
    intra_op_threads: usize,
) -> ModelRuntime {
    let (sender, receiver) = crossbeam_channel::bounded::<Job>(config.batching.queue_capacity);
    let queued = Arc::new(QueuedImages::default());
    for index in 0..workers.max(1) {
        let receiver = receiver.clone();
        let queued = Arc::clone(&queued);
        let model = Arc::clone(&model);
        let config = Arc::clone(&config);
        let span = tracing::info_span!("worker", model = %name, index);
        let model_name = name.to_string();
        std::thread::Builder::new()
            .name(format!("{name}-worker-{index}"))
            .spawn(move || {
                let _entered = span.enter();
                // Grad mode and the intra-op thread count are per thread: set both once, here.
                let _no_grad = tch::no_grad_guard();
                tch::set_num_threads(intra_op_threads.max(1) as i32);
                // A panic outside the guarded forward pass ends the loop; the jobs it held are
                // dropped (their callers answer 500) and the loop starts again on this thread.
                loop {
                    match catch_unwind(AssertUnwindSafe(|| worker_loop(&model_name, &model, &config, &receiver, &queued))) {
                        Ok(()) => break,
                        Err(_) => {
                            metrics::counter!(m::WORKER_RESTARTS, "model" => model_name.clone()).increment(1);
                            tracing::error!("worker panicked; restarting it");
                        }
                    }
                }
            })
            .expect("spawning a worker thread");
    }
    let service = Arc::clone(&model.service);
    let admitted = Arc::new(QueuedImages::default());
    ModelRuntime { queue: sender, config, model, workers: workers.max(1), intra_op_threads, service, queued, admitted }
}

fn worker_loop(name: &str, model: &LoadedModel, config: &ModelConfig, queue: &Receiver<Job>, queued: &QueuedImages) {
    let max_batch = config.batching.max_batch_size;
    let max_delay = Duration::from_millis(config.batching.max_delay_ms);
    while let Ok(first) = queue.recv() {
        queued.take(first.images.len());
        let mut jobs = vec![first];
        let mut images: usize = jobs[0].images.len();
        let deadline = Instant::now() + max_delay;
        while images < max_batch {
            let next = if max_delay.is_zero() {
                queue.try_recv().ok()
            } else {
                match queue.recv_deadline(deadline) {
                    Ok(job) => Some(job),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
                }
            };
            match next {
                Some(job) => {
                    queued.take(job.images.len());
                    images += job.images.len();
                    jobs.push(job);
                }
                None => break,
            }
        }
        // A client that has gone, or whose deadline passed, gets no computation.
        let now = Instant::now();
        jobs.retain(|job| {
            let reason = if job.reply.is_closed() {
                "disconnected"
            } else if job.deadline <= now {
                "deadline"
            } else {
                return true;
            };
            metrics::counter!(m::JOBS_SKIPPED, "model" => name.to_string(), "reason" => reason).increment(1);
            tracing::debug!(parent: &job.span, reason, "job skipped before its forward pass");
            false
        });
        if !jobs.is_empty() {
            run_jobs(name, model, config, jobs);
        }
    }
    tracing::debug!("queue closed; worker exits");
}

fn run_jobs(name: &str, model: &LoadedModel, config: &ModelConfig, jobs: Vec<Job>) {
    let started = Instant::now();
    let all: Vec<&PreparedImage> = jobs.iter().flat_map(|j| j.images.iter()).collect();
    let batch_size = all.len();
    // One span for the batched forward, naming every request it serves and linked to each
    // request's own span, so a slow forward in the log points at the requests that waited.
    let request_ids: Vec<&str> = jobs.iter().map(|j| j.request_id.as_str()).collect();
    let forward_span = tracing::info_span!("forward", batch_size, requests = %request_ids.join(","));
    for job in &jobs {
        forward_span.follows_from(&job.span);
    }
    let _entered = forward_span.enter();
    // One threshold for the batch: the lowest asked for; each job's own is applied after.
    let threshold = jobs.iter().map(|j| j.options.score_threshold).fold(f32::INFINITY, f32::min);
    let mut results: Vec<Result<(ModelOutput, Vec<RawTensor>), String>> = Vec::with_capacity(batch_size);
    let want_confidence = jobs.iter().any(|j| j.options.want_confidence);
    let want_raw = jobs.iter().any(|j| j.options.want_raw);
    let options = JobOptions { score_threshold: threshold, want_confidence, want_raw };
    for chunk in all.chunks(config.batching.max_batch_size.max(1)) {
        metrics::histogram!(m::BATCH_SIZE, "model" => name.to_string()).record(chunk.len() as f64);
        match run_images(model, config, chunk, options) {
            Ok(outputs) => results.extend(outputs.into_iter().map(Ok)),
            Err(e) if chunk.len() > 1 => {
                // Run the images one by one so that only the one the model fails on fails.
                tracing::warn!(error = %e, images = chunk.len(), "batched forward failed; retrying one by one");
                for image in chunk {
                    results.push(
                        run_images(model, config, &[image], options)
                            .map(|mut out| out.remove(0))
                            .map_err(|e| e.to_string()),
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "forward pass failed");
                results.push(Err(e.to_string()));
            }
        }
    }
    let inference_time = started.elapsed();
    model.service.record(inference_time, batch_size);
    let mut results = results.into_iter();
    for job in jobs {
        let mine: Vec<_> = results.by_ref().take(job.images.len()).collect();
        let outcome = mine
            .into_iter()
            .map(|r| {
                r.map(|(output, raw)| (keep_above(output, job.options.score_threshold), raw))
                    .map_err(EngineError::Forward)
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|pairs| {
                let (outputs, raw): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
                JobOutput {
                    outputs,
                    raw: if job.options.want_raw { raw } else { Vec::new() },
                    queue_time: started.saturating_duration_since(job.enqueued_at),
                    inference_time,
                    batch_size,
                }
            });
        let _ = job.reply.send(outcome);
    }
}

fn keep_above(output: ModelOutput, threshold: f32) -> ModelOutput {
    match output {
        ModelOutput::Candidates(list) => {
            ModelOutput::Candidates(list.into_iter().filter(|c| c.score >= threshold).collect())
        }
        other => other,
    }
}
