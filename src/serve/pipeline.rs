//! Running a pipeline (`pipeline.toml`: detect, then classify every kept detection) in one
//! request, through the same inference path as any model. Each protocol shapes the
//! [`PipelineRun`] itself (`/v1` and TorchServe JSON, the Open Inference Protocol's tensors).
//!
//! Each image is decoded once, at full resolution: the crops are cut from the decoded image,
//! and how small a scale would still give the classifier crops as large as its resize step
//! needs is only known once the detector has answered — so pipelines never take the scaled
//! JPEG decode. The detector runs on the request's images like any detector request (its own
//! preprocessing, queue, batching and admission); every kept detection of every image of the
//! request becomes a crop, and all the crops go to the classifier as one job, which its
//! batcher runs in forwards of up to its `max_batch_size`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;

use super::infer::{self, Inference, Outputs};
use super::prepare::{decode_whole, preprocess_images, slice_decoded, ImageInput};
use super::{millis, Core, RequestContext, StageTimings, Target};
use crate::engine::Arrival;
use crate::error::ApiError;
use crate::pipeline::{crop_of, PipelineSpec};
use crate::repository::{PipelineEntry, ServedRequest, StepError};
use crate::tasks::{Detection, Finished, PredictParams, Prediction};

/// A detection with the classifier's answer on its crop.
#[derive(Debug, Clone)]
pub struct NestedDetection {
    pub detection: Detection,
    /// The classifier's top-k on the crop, best first.
    pub predictions: Vec<Prediction>,
}

/// One step as it ran: the model version and its stage times.
pub struct StepRun {
    pub model: String,
    pub version: String,
    pub timings: StageTimings,
    pub postprocess_time: Duration,
}

impl StepRun {
    /// The step as one request of its model, in that model's statistics (`started` is when
    /// the step's preparation began).
    fn count_in(&self, target: &Target, images: usize, started: Instant) {
        target.entry.statistics.served(ServedRequest {
            images,
            total: started.elapsed(),
            queue: self.timings.queue_time,
            compute_input: self.timings.preprocess_time,
            compute_infer: self.timings.inference_time,
            compute_output: self.postprocess_time,
        });
    }
}

pub struct PipelineRun {
    pub name: String,
    /// Per image of the request, in order.
    pub images: Vec<Vec<NestedDetection>>,
    /// The first decoded image, when asked for (to draw on).
    pub original: Option<RgbImage>,
    pub detect: StepRun,
    /// `None` when no image had a detection to classify.
    pub classify: Option<StepRun>,
    pub top_k: usize,
}

fn spec_of(pipeline: &PipelineEntry) -> Result<Arc<PipelineSpec>, ApiError> {
    pipeline
        .spec
        .clone()
        .map_err(|reason| ApiError::ModelNotReady { name: pipeline.name.clone(), reason })
}

/// A step that cannot run is the pipeline's 503, naming the step.
fn step_error(pipeline: &PipelineEntry, error: StepError) -> ApiError {
    ApiError::ModelNotReady { name: pipeline.name.clone(), reason: error.to_string() }
}

/// Runs both steps on the request's images, counted in the pipeline's statistics as one
/// request (its stage times the sums of its steps'). `arrival` is how the first step is
/// admitted ([`Arrival::Sheddable`] for a live stream's frame); the second always continues.
pub async fn run(
    core: &Core,
    pipeline: &PipelineEntry,
    input: ImageInput,
    context: &RequestContext,
    keep_original: bool,
    arrival: Arrival,
) -> Result<PipelineRun, ApiError> {
    let started = Instant::now();
    let run = run_steps(core, pipeline, input, context, keep_original, arrival).await;
    match &run {
        Ok(done) => pipeline.statistics.served(ServedRequest {
            images: done.images.len(),
            total: started.elapsed(),
            queue: done.summed(|s| s.timings.queue_time),
            compute_input: done.summed(|s| s.timings.preprocess_time),
            compute_infer: done.summed(|s| s.timings.inference_time),
            compute_output: done.summed(|s| s.postprocess_time),
        }),
        Err(_) => pipeline.statistics.failed(started.elapsed()),
    }
    run
}

async fn run_steps(
    core: &Core,
    pipeline: &PipelineEntry,
    input: ImageInput,
    context: &RequestContext,
    keep_original: bool,
    arrival: Arrival,
) -> Result<PipelineRun, ApiError> {
    let spec = spec_of(pipeline)?;
    let steps = core.repository.pipeline_steps(pipeline).map_err(|e| step_error(pipeline, e))?;
    // Step 1's admission before anything is decoded.
    let detector = Target::resolve_as(core, Arc::clone(&steps.detect), context, arrival).await?;

    let decode_started = Instant::now();
    let limits = core.decode_limits();
    let decoded: Arc<Vec<RgbImage>> = Arc::new(core.run_cpu(move || decode_whole(input, limits)).await??);
    let decode_time = decode_started.elapsed();

    // Step 1: the detector, with the pipeline's score floor.
    // Sliced (`[detect] slice = ...`): the tiles of every image as the detector's one job.
    let detector_params = PredictParams {
        score_threshold: spec.detect.min_score,
        max_detections: usize::MAX,
        slicing: spec.detect.slicing,
        ..PredictParams::default()
    };
    let Inference { outputs, mut timings, .. } = run_step(core, &detector, Arc::clone(&decoded), detector_params, context).await?;
    timings.preprocess_time += decode_time;
    let post_started = Instant::now();
    let keep_spec = Arc::clone(&spec);
    let detections = core.run_cpu(move || kept_detections(outputs, &keep_spec)).await??;
    let detect = StepRun {
        model: detector.name().to_string(),
        version: detector.entry.version.clone(),
        timings,
        postprocess_time: post_started.elapsed(),
    };
    detect.count_in(&detector, decoded.len(), decode_started);
    drop(detector);

    // Step 2: every kept detection's crop, of every image, as one job for the classifier.
    let margin = spec.classify.margin;
    let crops_of = Arc::clone(&decoded);
    let cut = detections.clone();
    let (crops, owners) = core.run_cpu(move || cut_crops(&crops_of, &cut, margin)).await?;
    let original = if keep_original { Arc::try_unwrap(decoded).ok().and_then(|mut v| (!v.is_empty()).then(|| v.remove(0))) } else { None };
    let mut images: Vec<Vec<NestedDetection>> = detections
        .into_iter()
        .map(|found| found.into_iter().map(|detection| NestedDetection { detection, predictions: Vec::new() }).collect())
        .collect();
    if crops.is_empty() {
        return Ok(PipelineRun { name: pipeline.name.clone(), images, original, detect, classify: None, top_k: spec.classify.top_k });
    }
    let classifier = Target::resolve_continuing(core, Arc::clone(&steps.classify), context).await?;
    let classifier_params = PredictParams { top_k: spec.classify.top_k, ..PredictParams::default() };
    let (crop_count, classify_started) = (crops.len(), Instant::now());
    let Inference { outputs, timings, .. } = run_step(core, &classifier, Arc::new(crops), classifier_params, context).await?;
    let post_started = Instant::now();
    let tops = core.run_cpu(move || top_predictions(outputs)).await??;
    for ((i, j), top) in owners.into_iter().zip(tops) {
        images[i][j].predictions = top;
    }
    let classify = StepRun {
        model: classifier.name().to_string(),
        version: classifier.entry.version.clone(),
        timings,
        postprocess_time: post_started.elapsed(),
    };
    classify.count_in(&classifier, crop_count, classify_started);
    Ok(PipelineRun { name: pipeline.name.clone(), images, original, detect, classify: Some(classify), top_k: spec.classify.top_k })
}

/// The detector's results per image, filtered to the pipeline's classes and capped at its crop
/// count, best first (after its NMS, so a class left out never takes a kept one's place).
fn kept_detections(outputs: Outputs, spec: &PipelineSpec) -> Result<Vec<Vec<Detection>>, ApiError> {
    outputs
        .finish()?
        .into_iter()
        .map(|finished| match finished {
            Finished::Detection { detections } => {
                Ok(detections.into_iter().filter(|d| spec.keeps(&d.label)).take(spec.detect.max_crops).collect())
            }
            _ => Err(ApiError::Internal("the detect step answered another task".into())),
        })
        .collect()
}

/// Every detection's crop of its image, with whose it is (image, detection); a detection with
/// nothing of it in the image has none.
fn cut_crops(images: &[RgbImage], detections: &[Vec<Detection>], margin: f32) -> (Vec<RgbImage>, Vec<(usize, usize)>) {
    let mut crops = Vec::new();
    let mut owners = Vec::new();
    for (i, (image, found)) in images.iter().zip(detections).enumerate() {
        for (j, detection) in found.iter().enumerate() {
            if let Some(rect) = crop_of(detection, margin, image.width(), image.height()) {
                crops.push(image::imageops::crop_imm(image, rect.x, rect.y, rect.width, rect.height).to_image());
                owners.push((i, j));
            }
        }
    }
    (crops, owners)
}

/// The classifier's top-k per crop.
fn top_predictions(outputs: Outputs) -> Result<Vec<Vec<Prediction>>, ApiError> {
    outputs
        .finish()?
        .into_iter()
        .map(|finished| match finished {
            Finished::Classification { top, .. } => Ok(top),
            _ => Err(ApiError::Internal("the classify step answered another task".into())),
        })
        .collect()
}

/// One step on decoded images (the request's, or the crops): preprocessed for its model on the
/// CPU pool, then through its queue like any request.
async fn run_step(
    core: &Core,
    target: &Target,
    images: Arc<Vec<RgbImage>>,
    params: PredictParams,
    context: &RequestContext,
) -> Result<Inference, ApiError> {
    let started = Instant::now();
    let config = Arc::clone(&target.config);
    let step = async {
        match params.slicing {
            Some(slicing) => {
                let (prepared, tiles) = core.run_cpu(move || slice_decoded(&images, &config, &slicing)).await??;
                Ok(infer::run_prepared(core, target, prepared, None, started, params, false, context).await?.tiled(tiles))
            }
            None => {
                let prepared = core.run_cpu(move || preprocess_images(&images, &config.input)).await??;
                infer::run_prepared(core, target, prepared, None, started, params, false, context).await
            }
        }
    };
    // A step that fails is one of its model's failures (one that answers is counted by the
    // caller, once its post-processing is done).
    let ran = step.await;
    if ran.is_err() {
        target.entry.statistics.failed(started.elapsed());
    }
    ran
}

impl PipelineRun {
    /// The steps that ran, in order.
    fn steps(&self) -> Vec<&StepRun> {
        std::iter::once(&self.detect).chain(self.classify.as_ref()).collect()
    }

    /// One stage's time over the steps that ran.
    fn summed(&self, stage: fn(&StepRun) -> Duration) -> Duration {
        self.steps().into_iter().map(stage).sum()
    }

    /// Every step's times as `x-*` pairs: `x-step1-*` for the detector, `x-step2-*` for the
    /// classifier, and the usual `x-*-time-ms` as their sums.
    pub fn timing_pairs(&self) -> Vec<(String, String)> {
        let steps = self.steps();
        let mut values = vec![
            ("x-preprocess-time-ms".to_string(), millis(self.summed(|s| s.timings.preprocess_time))),
            ("x-queue-time-ms".to_string(), millis(self.summed(|s| s.timings.queue_time))),
            ("x-inference-time-ms".to_string(), millis(self.summed(|s| s.timings.inference_time))),
            ("x-postprocess-time-ms".to_string(), millis(self.summed(|s| s.postprocess_time))),
        ];
        for (n, step) in steps.iter().enumerate() {
            let prefix = format!("x-step{}", n + 1);
            values.push((format!("{prefix}-model"), format!("{}/{}", step.model, step.version)));
            values.push((format!("{prefix}-preprocess-time-ms"), millis(step.timings.preprocess_time)));
            values.push((format!("{prefix}-queue-time-ms"), millis(step.timings.queue_time)));
            values.push((format!("{prefix}-inference-time-ms"), millis(step.timings.inference_time)));
            values.push((format!("{prefix}-batch-size"), step.timings.batch_size.to_string()));
            if let Some(load) = step.timings.model_load_time {
                values.push((format!("{prefix}-model-load-time-ms"), millis(load)));
            }
        }
        values
    }

    /// The detections to draw: each labelled with the classifier's best class and the
    /// detector's class, `"golden retriever (dog)"`.
    pub fn overlay(&self) -> Finished {
        let detections = self
            .images
            .first()
            .into_iter()
            .flatten()
            .map(|n| {
                let mut d = n.detection.clone();
                if let Some(best) = n.predictions.first() {
                    d.label = format!("{} ({})", best.label, d.label);
                }
                d
            })
            .collect();
        Finished::Detection { detections }
    }
}
