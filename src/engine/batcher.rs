//! The batch a pool executor took, run: the forward passes through the backend (in chunks of
//! the batch size, one by one when a batched forward fails), each job answered with its own
//! outputs, in order, and the forward time fed to admission's estimate. A forward's log lines
//! carry the ids of every request in its batch.

use std::time::Instant;

use super::backend::{run_images, LoadedModel};
use super::outputs::RawTensor;
use super::statistics::ForwardTimes;
use super::{EngineError, Job, JobOptions, JobOutput};
use crate::image::PreparedImage;
use crate::metrics as m;
use crate::model_config::ModelConfig;
use crate::tasks::ModelOutput;

/// One forward of `images`, counted under its batch size in the version's `batch_stats` when
/// it answers.
fn forward_counted(
    model: &LoadedModel,
    config: &ModelConfig,
    images: &[&PreparedImage],
    options: JobOptions,
) -> Result<Vec<(ModelOutput, Vec<RawTensor>)>, EngineError> {
    let mut times = ForwardTimes::default();
    let outputs = run_images(model, config, images, options, &mut times)?;
    model.batch_statistics.record(images.len(), times);
    Ok(outputs)
}

pub(super) fn run_jobs(name: &str, model: &LoadedModel, config: &ModelConfig, mut jobs: Vec<Job>) {
    let started = Instant::now();
    // The wait is over for every job of the batch.
    for job in &mut jobs {
        job.queue_span = tracing::Span::none();
    }
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
    // One threshold for the batch, the lowest asked for, so fewer candidates cross the queue;
    // each request's own is applied next to NMS (`tasks::finish`).
    let threshold = jobs.iter().map(|j| j.options.score_threshold).fold(f32::INFINITY, f32::min);
    let mut results: Vec<Result<(ModelOutput, Vec<RawTensor>), String>> = Vec::with_capacity(batch_size);
    let want_confidence = jobs.iter().any(|j| j.options.want_confidence);
    let want_raw = jobs.iter().any(|j| j.options.want_raw);
    let options = JobOptions { score_threshold: threshold, want_confidence, want_raw };
    for chunk in all.chunks(model.batch_bound.max(1)) {
        metrics::histogram!(m::BATCH_SIZE, "model" => name.to_string()).record(chunk.len() as f64);
        model.executions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match forward_counted(model, config, chunk, options) {
            Ok(outputs) => results.extend(outputs.into_iter().map(Ok)),
            Err(e) if chunk.len() > 1 => {
                // Run the images one by one so that only the one the model fails on fails.
                tracing::warn!(error = %e, images = chunk.len(), "batched forward failed; retrying one by one");
                for image in chunk {
                    results.push(
                        forward_counted(model, config, &[image], options)
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
                r.map_err(EngineError::Forward)
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
