//! Running a pipeline (`pipeline.toml`: detect, then classify every kept detection) in one
//! request, through the same inference path as any model, and its answer in each protocol's
//! shape.
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

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use image::RgbImage;
use serde_json::{json, Map, Value};

use super::inference::{self, preprocess_images, Inference, RequestContext, StageTimings, Target};
use super::millis;
use super::v2::tensors::{OutputData, OutputTensor};
use super::v2::TensorSpec;
use super::AppState;
use crate::error::ApiError;
use crate::image::{decode_image, DecodeLimits};
use crate::model_config::ModelConfig;
use crate::pipeline::{crop_of, PipelineSpec};
use crate::repository::{PipelineEntry, StepError};
use crate::tasks::{Detection, Finished, PredictParams, Prediction};

/// A pipeline has one version.
pub const PIPELINE_VERSION: &str = "1";

/// What the request sends: encoded images, or RGB pixels already decoded (V2 UINT8).
pub enum PipelineInput {
    Encoded(Vec<Bytes>),
    Pixels(Vec<RgbImage>),
}

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

/// Checks a version asked of a pipeline: it has only version 1.
pub fn check_version(pipeline: &PipelineEntry, version: Option<&str>) -> Result<(), ApiError> {
    match version {
        None | Some(PIPELINE_VERSION) | Some("1.0") => Ok(()),
        Some(other) => Err(ApiError::NotFound(format!("pipeline '{}' has no version '{other}' (it has 1)", pipeline.name))),
    }
}

/// Runs both steps on the request's images.
pub async fn run(
    state: &AppState,
    pipeline: &PipelineEntry,
    input: PipelineInput,
    context: &RequestContext,
    keep_original: bool,
) -> Result<PipelineRun, ApiError> {
    let spec = spec_of(pipeline)?;
    let steps = state.repository.pipeline_steps(pipeline).map_err(|e| step_error(pipeline, e))?;
    // Step 1's admission before anything is decoded.
    let detector = Target::resolve(state, &steps.detect.name, Some(&steps.detect.version), context).await?;

    let decode_started = Instant::now();
    let limits = DecodeLimits { max_pixels: state.limits.max_image_pixels };
    let decoded: Arc<Vec<RgbImage>> = Arc::new(match input {
        PipelineInput::Pixels(images) => images,
        PipelineInput::Encoded(images) => {
            state
                .run_cpu(move || {
                    images
                        .iter()
                        .enumerate()
                        .map(|(i, bytes)| {
                            let which = if images.len() > 1 { format!("image {i}: ") } else { String::new() };
                            tracing::info_span!("decode", bytes = bytes.len())
                                .in_scope(|| decode_image(bytes, limits))
                                .map_err(|e| ApiError::InvalidImage(format!("{which}{e}")))
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .await??
        }
    });
    let decode_time = decode_started.elapsed();

    // Step 1: the detector, with the pipeline's score floor; the class filter and the crop
    // cap apply after its NMS, so a class left out never takes a kept one's place.
    let for_detector = Arc::clone(&decoded);
    let prepare = move |config: &ModelConfig| Ok((preprocess_images(&for_detector, &config.input)?, None));
    let detector_params = PredictParams { score_threshold: spec.detect.min_score, max_detections: usize::MAX, ..PredictParams::default() };
    let Inference { outputs, mut timings, .. } = inference::run(state, &detector, prepare, detector_params, false, context).await?;
    timings.preprocess_time += decode_time;
    let post_started = Instant::now();
    let keep_spec = Arc::clone(&spec);
    let detections: Vec<Vec<Detection>> = state
        .run_cpu(move || {
            outputs
                .finish()?
                .into_iter()
                .map(|finished| match finished {
                    Finished::Detection { detections } => Ok(detections
                        .into_iter()
                        .filter(|d| keep_spec.keeps(&d.label))
                        .take(keep_spec.detect.max_crops)
                        .collect()),
                    _ => Err(ApiError::Internal("the detect step answered another task".into())),
                })
                .collect::<Result<Vec<_>, ApiError>>()
        })
        .await??;
    let detect = StepRun {
        model: detector.name().to_string(),
        version: detector.entry.version.clone(),
        timings,
        postprocess_time: post_started.elapsed(),
    };
    drop(detector);

    // Step 2: every kept detection's crop, of every image, as one job for the classifier.
    let margin = spec.classify.margin;
    let crops_of = Arc::clone(&decoded);
    let cut = detections.clone();
    let (crops, owners): (Vec<RgbImage>, Vec<(usize, usize)>) = state
        .run_cpu(move || {
            let mut crops = Vec::new();
            let mut owners = Vec::new();
            for (i, (image, found)) in crops_of.iter().zip(&cut).enumerate() {
                for (j, detection) in found.iter().enumerate() {
                    if let Some(rect) = crop_of(detection, margin, image.width(), image.height()) {
                        crops.push(image::imageops::crop_imm(image, rect.x, rect.y, rect.width, rect.height).to_image());
                        owners.push((i, j));
                    }
                }
            }
            (crops, owners)
        })
        .await?;
    let original = if keep_original { Arc::try_unwrap(decoded).ok().and_then(|mut v| (!v.is_empty()).then(|| v.remove(0))) } else { None };
    let mut images: Vec<Vec<NestedDetection>> = detections
        .into_iter()
        .map(|found| found.into_iter().map(|detection| NestedDetection { detection, predictions: Vec::new() }).collect())
        .collect();
    if crops.is_empty() {
        return Ok(PipelineRun { name: pipeline.name.clone(), images, original, detect, classify: None, top_k: spec.classify.top_k });
    }
    let classifier = Target::resolve_continuing(state, &steps.classify.name, Some(&steps.classify.version), context).await?;
    let prepare = move |config: &ModelConfig| Ok((preprocess_images(&crops, &config.input)?, None));
    let classifier_params = PredictParams { top_k: spec.classify.top_k, ..PredictParams::default() };
    let Inference { outputs, timings, .. } = inference::run(state, &classifier, prepare, classifier_params, false, context).await?;
    let post_started = Instant::now();
    let tops: Vec<Vec<Prediction>> = state
        .run_cpu(move || {
            outputs
                .finish()?
                .into_iter()
                .map(|finished| match finished {
                    Finished::Classification { top, .. } => Ok(top),
                    _ => Err(ApiError::Internal("the classify step answered another task".into())),
                })
                .collect::<Result<Vec<_>, ApiError>>()
        })
        .await??;
    for ((i, j), top) in owners.into_iter().zip(tops) {
        images[i][j].predictions = top;
    }
    let classify = StepRun {
        model: classifier.name().to_string(),
        version: classifier.entry.version.clone(),
        timings,
        postprocess_time: post_started.elapsed(),
    };
    Ok(PipelineRun { name: pipeline.name.clone(), images, original, detect, classify: Some(classify), top_k: spec.classify.top_k })
}

impl PipelineRun {
    /// Every step's times as headers: `x-step1-*` for the detector, `x-step2-*` for the
    /// classifier, and the usual `x-*-time-ms` as their sums.
    pub fn timing_headers(&self, headers: &mut HeaderMap) {
        let steps: Vec<&StepRun> = std::iter::once(&self.detect).chain(self.classify.as_ref()).collect();
        let sum = |f: fn(&StepRun) -> Duration| steps.iter().map(|s| f(s)).sum::<Duration>();
        let mut values = vec![
            ("x-preprocess-time-ms".to_string(), millis(sum(|s| s.timings.preprocess_time))),
            ("x-queue-time-ms".to_string(), millis(sum(|s| s.timings.queue_time))),
            ("x-inference-time-ms".to_string(), millis(sum(|s| s.timings.inference_time))),
            ("x-postprocess-time-ms".to_string(), millis(sum(|s| s.postprocess_time))),
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
        for (name, value) in values {
            if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::from_str(&value)) {
                headers.insert(name, value);
            }
        }
    }

    fn steps_json(&self) -> Value {
        let step = |s: &StepRun| json!({"model": s.model, "version": s.version});
        json!({"detect": step(&self.detect), "classify": self.classify.as_ref().map(step)})
    }

    /// `/v1`: each image's detections, each with its classifier's answer nested.
    pub fn v1_json(&self) -> Value {
        let results: Vec<Value> = self
            .images
            .iter()
            .map(|found| {
                let detections: Vec<Value> = found
                    .iter()
                    .map(|n| {
                        let mut value = serde_json::to_value(&n.detection).expect("detections serialise");
                        value["classification"] = json!({"predictions": n.predictions});
                        value
                    })
                    .collect();
                json!({"detections": detections})
            })
            .collect();
        json!({"model": self.name, "version": PIPELINE_VERSION, "task": "detection", "steps": self.steps_json(), "results": results})
    }

    /// TorchServe's detector shape, `{"<label>": [x1, y1, x2, y2], "score": s}`, with the
    /// classifier's top-k in its classifier shape under `"classification"`.
    pub fn torchserve_json(&self) -> Vec<Value> {
        self.images
            .iter()
            .map(|found| {
                Value::Array(
                    found
                        .iter()
                        .map(|n| {
                            let d = &n.detection;
                            let mut object = Map::new();
                            object.insert(d.label.clone(), json!([d.bbox.x1, d.bbox.y1, d.bbox.x2, d.bbox.y2]));
                            object.insert("score".into(), json!(d.score));
                            let classes: Map<String, Value> = n.predictions.iter().map(|p| (p.label.clone(), json!(p.score))).collect();
                            object.insert("classification".into(), Value::Object(classes));
                            Value::Object(object)
                        })
                        .collect(),
                )
            })
            .collect()
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

    /// V2 and gRPC: the detector's tensors (`boxes`, `scores`, `classes`, `num_detections`)
    /// and, per detection, the classifier's top-k: `classification_scores FP32 [N, K, T]`,
    /// `classification_classes INT64 [N, K, T]` and `classification_labels BYTES [N, K, T]`,
    /// padded past each image's detections (and past a crop's k) with 0, -1 and "".
    pub fn v2_tensors(&self) -> Result<Vec<OutputTensor>, ApiError> {
        let finished: Vec<Finished> =
            self.images.iter().map(|found| Finished::Detection { detections: found.iter().map(|n| n.detection.clone()).collect() }).collect();
        let mut tensors = super::v2::task_tensors(finished)?;
        let (n, k, t) = (self.images.len(), self.images.iter().map(Vec::len).max().unwrap_or(0), self.top_k);
        let (mut scores, mut classes, mut labels) = (Vec::new(), Vec::new(), Vec::new());
        for found in &self.images {
            for i in 0..k {
                let predictions = found.get(i).map(|d| d.predictions.as_slice()).unwrap_or(&[]);
                for r in 0..t {
                    match predictions.get(r) {
                        Some(p) => {
                            scores.push(p.score);
                            classes.push(p.index as i64);
                            labels.push(p.label.clone());
                        }
                        None => {
                            scores.push(0.0);
                            classes.push(-1);
                            labels.push(String::new());
                        }
                    }
                }
            }
        }
        let shape = vec![n as i64, k as i64, t as i64];
        tensors.push(OutputTensor { name: "classification_scores".into(), shape: shape.clone(), data: OutputData::Fp32(scores) });
        tensors.push(OutputTensor { name: "classification_classes".into(), shape: shape.clone(), data: OutputData::Int64(classes) });
        tensors.push(OutputTensor { name: "classification_labels".into(), shape, data: OutputData::Bytes(labels) });
        Ok(tensors)
    }
}

/// The tensors a pipeline answers with, for its V2 metadata.
pub fn output_specs() -> Vec<TensorSpec> {
    let spec = |name: &str, datatype: &'static str, shape: &[i64]| TensorSpec { name: name.into(), datatype, shape: shape.to_vec() };
    vec![
        spec("boxes", "FP32", &[-1, -1, 4]),
        spec("scores", "FP32", &[-1, -1]),
        spec("classes", "INT64", &[-1, -1]),
        spec("num_detections", "INT32", &[-1]),
        spec("classification_scores", "FP32", &[-1, -1, -1]),
        spec("classification_classes", "INT64", &[-1, -1, -1]),
        spec("classification_labels", "BYTES", &[-1, -1, -1]),
    ]
}

/// A pipeline in `/v1/models`: its status (its steps'), and its steps as configured.
pub fn summary(state: &AppState, pipeline: &PipelineEntry) -> Value {
    let report = state.repository.pipeline_status(pipeline);
    let mut value = json!({
        "name": pipeline.name,
        "version": PIPELINE_VERSION,
        "status": report.status,
        "kind": "pipeline",
        "task": "detection",
        "versions": [PIPELINE_VERSION],
        "default_version": PIPELINE_VERSION,
    });
    if let Some(reason) = report.reason {
        value["reason"] = json!(reason);
    }
    if let Ok(spec) = &pipeline.spec {
        value["steps"] = json!({"detect": spec.detect, "classify": spec.classify});
        if let Some(description) = &spec.description {
            value["description"] = json!(description);
        }
    }
    value
}
