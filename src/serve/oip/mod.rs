//! The Open Inference Protocol's shared part, the same for REST V2 and gRPC: the tensors on
//! the wire ([`tensors`]), a version's metadata, the one input turned into the core's
//! [`ImageInput`], the finished results as the tensors asked for (Triton's classification
//! extension included), and an inference from request to [`TensorAnswer`]. REST writes the
//! answer as JSON (and binary data), gRPC as `ModelInferResponse`; neither imports the other.

pub mod config;
pub mod statistics;
pub mod tensors;

use std::time::Instant;

use axum::http::HeaderMap;
use serde_json::{json, Map, Value};

use super::infer::{self, answer_headers, write_pairs, Answered, ImageRequest, Wants};
use super::pipeline::{self, PipelineRun};
use super::prepare::{ImageInput, PixelBatch, TensorBatch};
use super::{Core, RequestContext, Target};
use crate::engine::{Arrival, RawData, RawTensor};
use crate::error::ApiError;
use crate::model_config::{ModelFormat, PixelDatatype, Task};
use crate::pipeline::PIPELINE_VERSION;
use crate::repository::{PipelineEntry, Servable};
use crate::tasks::instances::{self, Instance};
use crate::tasks::keypoints;
use crate::tasks::{classification, Finished, PredictParams};
use tensors::{InferRequest, InputTensor, OutputData, OutputTensor, RequestedOutput};

/// The protocol extensions served, on REST and gRPC alike.
pub const EXTENSIONS: [&str; 5] = ["classification", "binary_tensor_data", "model_repository", "model_configuration", "statistics"];

/// A tensor a model takes or gives, as metadata describes it.
pub struct TensorSpec {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

fn tensor_spec(name: &str, datatype: &'static str, shape: &[i64]) -> TensorSpec {
    TensorSpec { name: name.to_string(), datatype, shape: shape.to_vec() }
}

/// A model version's metadata, as REST V2 and gRPC both describe it.
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: &'static str,
    pub inputs: Vec<TensorSpec>,
    /// The task's outputs. The model's own (`raw_*`), computed when a request names one, are
    /// listed apart, under `parameters.raw_outputs`, so that a classifier's metadata has the
    /// one output Triton's image clients expect (and the model configuration, which must match
    /// it for perf_analyzer, lists the same).
    pub outputs: Vec<TensorSpec>,
    /// What only REST reports (gRPC's message has no such field): task, version, the model's
    /// own outputs, other inputs.
    pub parameters: Value,
}

/// The metadata of what a lookup found.
pub fn model_metadata(core: &Core, servable: Servable) -> Result<ModelMetadata, ApiError> {
    let entry = match servable {
        Servable::Pipeline(pipeline) => return Ok(pipeline_metadata(&pipeline)),
        Servable::Model(entry) => entry,
    };
    let config = entry.config.clone().ok_or_else(|| ApiError::ModelNotReady {
        name: entry.name.clone(),
        reason: entry.status().reason.unwrap_or_default(),
    })?;
    let classes = entry.labels.len().max(1) as i64;
    // The model's own outputs, as the warm-up saw them (stacked-batch models).
    let raw_specs = entry.runtime().map(|runtime| runtime.raw_outputs().to_vec()).unwrap_or_default();
    let outputs = match config.task {
        Task::Classification => vec![tensor_spec("scores", "FP32", &[-1, classes])],
        Task::Segmentation => vec![tensor_spec("mask", "UINT8", &[-1, -1, -1])],
        Task::Detection => detection_specs(),
        Task::InstanceSegmentation => {
            let mut specs = detection_specs();
            specs.push(tensor_spec(MASKS, "BYTES", &[-1, -1]));
            specs.push(tensor_spec(MASK_PIXELS, "UINT8", &[-1, -1, -1, -1]));
            specs
        }
        Task::Keypoints => {
            let mut specs = detection_specs();
            specs.push(tensor_spec(KEYPOINTS, "FP32", &[-1, -1, config.output.keypoint_names().len() as i64, 3]));
            specs
        }
        Task::OrientedDetection => {
            let mut specs = detection_specs();
            specs.push(tensor_spec(ROTATED_BOXES, "FP32", &[-1, -1, 5]));
            specs.push(tensor_spec(CORNERS, "FP32", &[-1, -1, 4, 2]));
            specs
        }
        Task::Embedding => {
            // [N, D] or a feature map [N, D, H, W]: D is the embedding's length either way.
            let dimension = raw_specs.first().and_then(|r| r.shape.get(1).copied()).unwrap_or(-1);
            vec![tensor_spec("embedding", "FP32", &[-1, dimension])]
        }
    };
    let raw_outputs: Vec<Value> = raw_specs.iter().map(|r| json!({"name": r.name, "datatype": r.datatype, "shape": r.shape})).collect();
    let versions = core.repository.family(&entry.name).map(|f| f.version_names()).unwrap_or_default();
    let (height, width) = (i64::from(config.input.height), i64::from(config.input.width));
    let pixels = config.input.pixel_datatype;
    Ok(ModelMetadata {
        name: entry.name.clone(),
        versions,
        platform: match config.format {
            ModelFormat::Torchscript => "pytorch_torchscript",
            ModelFormat::Aoti => "pytorch_aoti",
        },
        // Listed as RGB pixels at the model's input size, NHWC: what Triton's image clients
        // (`image_client.py`, `perf_analyzer`) can make and send unmodified — the server still
        // applies the model's own resize and normalization, and takes pixels of any size. UINT8
        // unless the config says FP32 (`[input] pixel_datatype`). Encoded images (BYTES) are
        // the recommended input: smaller on the wire, and decoded (scaled, for big JPEGs) on
        // the server.
        inputs: vec![tensor_spec("image", pixels.name(), &[-1, height, width, 3])],
        outputs,
        parameters: json!({
            "task": config.task,
            "version": entry.version,
            "precision": config.compile.precision,
            "raw_outputs": raw_outputs,
            "also_accepts": [
                {"datatype": "BYTES", "shape": [-1], "meaning": "encoded images (JPEG, PNG, WebP, …): the recommended input"},
                {"datatype": pixels.name(), "shape": [-1, -1, -1, 3], "meaning": "RGB pixels of any size"},
                {"datatype": "FP32", "shape": [-1, 3, height, width], "meaning": "preprocessed input"}
            ]
        }),
    })
}

fn detection_specs() -> Vec<TensorSpec> {
    vec![
        tensor_spec("boxes", "FP32", &[-1, -1, 4]),
        tensor_spec("scores", "FP32", &[-1, -1]),
        tensor_spec("classes", "INT64", &[-1, -1]),
        tensor_spec("num_detections", "INT32", &[-1]),
    ]
}

/// A pipeline's metadata: the detector's tensors and, per detection, the classifier's top-k.
fn pipeline_metadata(pipeline: &PipelineEntry) -> ModelMetadata {
    let mut outputs = detection_specs();
    outputs.extend([
        tensor_spec("classification_scores", "FP32", &[-1, -1, -1]),
        tensor_spec("classification_classes", "INT64", &[-1, -1, -1]),
        tensor_spec("classification_labels", "BYTES", &[-1, -1, -1]),
    ]);
    let steps = match &pipeline.spec {
        Ok(spec) => json!({"detect": spec.detect, "classify": spec.classify}),
        Err(_) => Value::Null,
    };
    ModelMetadata {
        name: pipeline.name.clone(),
        versions: vec![PIPELINE_VERSION.into()],
        platform: "visionserve_pipeline",
        inputs: vec![tensor_spec("image", "BYTES", &[-1])],
        outputs,
        parameters: json!({
            "task": "detection",
            "steps": steps,
            "also_accepts": [{"datatype": "UINT8", "shape": [-1, -1, -1, 3], "meaning": "raw RGB pixels"}]
        }),
    }
}

fn bool_param(parameters: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match parameters.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::BadRequest(format!("parameter '{key}' must be true or false"))),
    }
}

/// What the Open Inference Protocol answers, before a transport writes it: REST as JSON (and
/// binary data), gRPC as `ModelInferResponse`.
pub struct TensorAnswer {
    pub model_name: String,
    pub model_version: String,
    pub id: Option<String>,
    /// The outputs in the order the request named them, each with whether REST sends it as
    /// binary data (gRPC always does).
    pub outputs: Vec<(OutputTensor, bool)>,
    /// Every stage's time (REST's `x-*-time-ms` headers; gRPC's response metadata).
    pub timing_headers: HeaderMap,
}

/// The Open Inference Protocol's inference, for REST V2 and gRPC: check the request's one input
/// and parameters, run it through the core (admission, queue, batching, deadline,
/// `tasks::finish`) and shape the finished results as the tensors asked for.
pub async fn infer(core: &Core, servable: Servable, request: InferRequest, context: &RequestContext) -> Result<TensorAnswer, ApiError> {
    let bad = |message: String| ApiError::BadRequest(message);
    let [input] = request.inputs.as_slice() else {
        return Err(bad(format!("expected exactly one input, got {}", request.inputs.len())));
    };
    let entry = match servable {
        Servable::Pipeline(pipeline) => return pipeline_infer(core, &pipeline, request, context).await,
        Servable::Model(entry) => entry,
    };
    let params = PredictParams::from_v2(&request.parameters).map_err(|e| bad(e.0))?;
    let all_binary = bool_param(&request.parameters, "binary_data_output")?.unwrap_or(false);
    check_batch(core, input)?;
    let target = Target::resolve(core, entry, context).await?;
    let InferRequest { id, inputs, outputs: requested, .. } = request;
    let input = inputs.into_iter().next().expect("one input, checked above");
    let want_raw = requested.iter().flatten().any(|r| r.name.starts_with(RAW_PREFIX));
    let want_mask_pixels = requested.iter().flatten().any(|r| r.name == MASK_PIXELS);
    let accepts = Accepts::Model { max_pixels: core.limits.max_image_pixels, pixels: target.config.input.pixel_datatype };
    let parse_started = Instant::now();
    let images = match core.run_cpu(move || image_input(&input, accepts)).await? {
        Ok(images) => images,
        Err(refused) => {
            // Admitted, then refused: one of the version's failures.
            target.entry.statistics.failed(parse_started.elapsed());
            return Err(refused);
        }
    };
    let answered = infer::answer(core, &target, ImageRequest { input: images, params, wants: Wants { raw: want_raw, ..Wants::default() } }, context).await?;

    let post_started = Instant::now();
    let Answered { results, timings, raw, labels, cache, .. } = answered;
    let tensors = core
        .run_cpu(move || {
            let _encode = tracing::info_span!("encode").entered();
            let mut tensors = task_tensors(results, want_mask_pixels)?;
            if want_raw {
                tensors.extend(stack_raw(raw)?);
            }
            Ok::<_, ApiError>(tensors)
        })
        .await??;
    let outputs = choose_outputs(tensors, requested.as_deref(), all_binary, target.name(), &labels)?;
    let timing_headers = answer_headers(timings, cache, target.name(), post_started);
    Ok(TensorAnswer { model_name: target.name().to_string(), model_version: target.entry.version.clone(), id, outputs, timing_headers })
}

/// One to `max_images_per_request` images in the input's first dimension.
fn check_batch(core: &Core, input: &InputTensor) -> Result<(), ApiError> {
    let batch = *input.shape.first().ok_or_else(|| ApiError::BadRequest("input shape is empty".into()))? as usize;
    if batch == 0 || batch > core.limits.max_images_per_request {
        return Err(ApiError::BadRequest(format!("batch of {batch} images; 1..={} are accepted", core.limits.max_images_per_request)));
    }
    Ok(())
}

/// A pipeline's inference in the protocol's terms: BYTES images or UINT8 pixels in (a
/// preprocessed FP32 tensor fits no two models), the pipeline's tensors out.
async fn pipeline_infer(core: &Core, pipeline: &PipelineEntry, request: InferRequest, context: &RequestContext) -> Result<TensorAnswer, ApiError> {
    if PredictParams::from_v2(&request.parameters).map_err(|e| ApiError::BadRequest(e.0))? != PredictParams::default() {
        return Err(ApiError::BadRequest(format!("pipeline '{}' takes no parameters: its steps are set in its pipeline.toml", pipeline.name)));
    }
    let all_binary = bool_param(&request.parameters, "binary_data_output")?.unwrap_or(false);
    let InferRequest { id, inputs, outputs: requested, .. } = request;
    let input = inputs.into_iter().next().expect("one input, checked by the caller");
    check_batch(core, &input)?;
    if !matches!(input.datatype.as_str(), "BYTES" | "UINT8") {
        return Err(ApiError::BadRequest(format!("a pipeline takes BYTES images or UINT8 pixels, not {}", input.datatype)));
    }
    let images = image_input(&input, Accepts::Pipeline { max_pixels: core.limits.max_image_pixels })?;
    let run = pipeline::run(core, pipeline, images, context, false, Arrival::New).await?;
    let tensors = pipeline_tensors(&run)?;
    let outputs = choose_outputs(tensors, requested.as_deref(), all_binary, &pipeline.name, &[])?;
    let mut timing_headers = HeaderMap::new();
    write_pairs(run.timing_pairs(), &mut timing_headers);
    Ok(TensorAnswer { model_name: pipeline.name.clone(), model_version: PIPELINE_VERSION.into(), id, outputs, timing_headers })
}

/// The detector's tensors (`boxes`, `scores`, `classes`, `num_detections`) and, per detection,
/// the classifier's top-k: `classification_scores FP32 [N, K, T]`, `classification_classes
/// INT64 [N, K, T]` and `classification_labels BYTES [N, K, T]`, padded past each image's
/// detections (and past a crop's k) with 0, -1 and "".
fn pipeline_tensors(run: &PipelineRun) -> Result<Vec<OutputTensor>, ApiError> {
    let finished: Vec<Finished> =
        run.images.iter().map(|found| Finished::Detection { detections: found.iter().map(|n| n.detection.clone()).collect() }).collect();
    let mut tensors = task_tensors(finished, false)?;
    let (n, k, t) = (run.images.len(), run.images.iter().map(Vec::len).max().unwrap_or(0), run.top_k);
    let (mut scores, mut classes, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for found in &run.images {
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

/// The outputs a request names, in its order and each binary or JSON as asked (Triton's
/// classification extension turns a score tensor into its top-k strings); all of them when it
/// names none.
fn choose_outputs(
    mut tensors: Vec<OutputTensor>,
    requested: Option<&[RequestedOutput]>,
    all_binary: bool,
    model: &str,
    labels: &[String],
) -> Result<Vec<(OutputTensor, bool)>, ApiError> {
    let Some(requested) = requested else {
        return Ok(tensors.drain(..).map(|t| (t, all_binary)).collect());
    };
    let mut chosen = Vec::new();
    for r in requested {
        let tensor = tensors
            .iter()
            .find(|o| o.name == r.name)
            .cloned()
            .ok_or_else(|| ApiError::BadRequest(format!("model '{model}' has no output '{}'", r.name)))?;
        let binary = bool_param(&r.parameters, "binary_data")?.unwrap_or(all_binary);
        match r.parameters.get("classification") {
            None => chosen.push((tensor, binary)),
            Some(k) => {
                let k = k
                    .as_u64()
                    .filter(|k| *k >= 1)
                    .ok_or_else(|| ApiError::BadRequest("'classification' must be a positive integer".into()))?;
                chosen.push((classification_strings(&tensor, k as usize, labels)?, binary));
            }
        }
    }
    Ok(chosen)
}

/// What [`image_input`] takes: a pipeline's encoded images or pixels (its two models take no
/// one tensor), or a model's, with its preprocessed `FP32 [N, 3, H, W]` tensors and the pixel
/// datatype its metadata lists.
#[derive(Debug, Clone, Copy)]
enum Accepts {
    Pipeline { max_pixels: u64 },
    Model { max_pixels: u64, pixels: PixelDatatype },
}

/// The one input tensor as the core's images: `BYTES` encoded files (held to `[N]` or
/// `[N, 1]` for a model), `UINT8 [N, H, W, 3]` pixels, and for a model `FP32 [N, 3, H, W]`
/// inputs already preprocessed — or, where its metadata lists FP32 pixels, `FP32 [N, H, W, 3]`
/// pixel values within 0..=255.
fn image_input(input: &InputTensor, accepts: Accepts) -> Result<ImageInput, ApiError> {
    let bad = |message: String| ApiError::BadRequest(message);
    let (max_pixels, for_model, fp32_pixels) = match accepts {
        Accepts::Pipeline { max_pixels } => (max_pixels, false, false),
        Accepts::Model { max_pixels, pixels } => (max_pixels, true, pixels == PixelDatatype::Fp32),
    };
    let shape = input.shape.as_slice();
    let pixel_size = |what: &str| -> Result<(usize, u32, u32), ApiError> {
        let [n, h, w, 3] = shape else {
            return Err(bad(format!("{what} input must have shape [N, H, W, 3] (RGB pixels)")));
        };
        let (n, h, w) = (*n as usize, *h as usize, *w as usize);
        if h == 0 || w == 0 || (h as u64).saturating_mul(w as u64) > max_pixels {
            return Err(bad(format!("{w}×{h} images are outside the accepted size")));
        }
        Ok((n, w as u32, h as u32))
    };
    match input.datatype.as_str() {
        "BYTES" => {
            if for_model && (shape.len() > 2 || shape.get(1).is_some_and(|&d| d != 1)) {
                return Err(bad("BYTES input must have shape [N] or [N, 1]: one encoded image each".into()));
            }
            let images = input
                .bytes_elements(|text| super::prepare::decode_base64(text).map_err(|e| format!("BYTES element is not base64: {e}")))
                .map_err(bad)?;
            Ok(ImageInput::Encoded(images))
        }
        "UINT8" => {
            let (count, width, height) = pixel_size("UINT8")?;
            let data = input.u8_values().map_err(bad)?.into();
            Ok(ImageInput::Pixels(PixelBatch { data, count, width, height }))
        }
        "FP32" if fp32_pixels && matches!(shape, [_, _, _, 3]) => {
            let (count, width, height) = pixel_size("FP32")?;
            let data = pixel_values(&input.f32_values().map_err(bad)?).map_err(bad)?.into();
            Ok(ImageInput::Pixels(PixelBatch { data, count, width, height }))
        }
        "FP32" if for_model => {
            let [n, 3, h, w] = shape else {
                return Err(bad("FP32 input must have shape [N, 3, H, W] (preprocessed)".into()));
            };
            let (n, h, w) = (*n as usize, *h as u32, *w as u32);
            if w == 0 || h == 0 || u64::from(w) * u64::from(h) > max_pixels {
                return Err(bad(format!("{w}×{h} inputs are outside the accepted size")));
            }
            let data = input.f32_values().map_err(bad)?;
            Ok(ImageInput::Preprocessed(TensorBatch { data, count: n, width: w, height: h }))
        }
        other => Err(bad(format!("input datatype {other} is not accepted: use BYTES, UINT8 or FP32"))),
    }
}

/// FP32 pixel values as bytes, rounded; a value outside 0..=255 means the client scaled the
/// pixels itself (Triton's image_client.py `-s INCEPTION` gives -1..1, `-s VGG` subtracts the
/// ImageNet mean), which this model must not get: it normalizes them as its config says.
fn pixel_values(values: &[f32]) -> Result<Vec<u8>, String> {
    let finite = values.iter().all(|v| v.is_finite());
    let (low, high) = values.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    if !finite || low < 0.0 || high > 255.0 {
        let range = if finite { format!("values from {low} to {high}") } else { "values that are not finite".to_string() };
        return Err(format!(
            "FP32 pixel input holds {range}: this model takes RGB pixel values within 0..255, unscaled, and applies its own \
             normalization; send the pixels as they are (Triton's image_client.py: -s NONE, its default)"
        ));
    }
    Ok(values.iter().map(|&v| v.round() as u8).collect())
}

/// Names of the model's own outputs start with this (`raw_output`, `raw_output_0`,
/// `raw_<dict key>`); they are computed only when a request names one.
const RAW_PREFIX: &str = "raw_";

/// Per-image raw tensors stacked back into `[N, ...]` outputs.
fn stack_raw(per_image: Vec<Vec<RawTensor>>) -> Result<Vec<OutputTensor>, ApiError> {
    let n = per_image.len() as i64;
    let Some(first) = per_image.first() else { return Ok(Vec::new()) };
    let mut stacked = Vec::new();
    for (index, lead) in first.iter().enumerate() {
        let mut data = match lead.data {
            RawData::Fp32(_) => OutputData::Fp32(Vec::new()),
            RawData::Int64(_) => OutputData::Int64(Vec::new()),
        };
        for image in &per_image {
            let tensor = &image[index];
            if tensor.shape != lead.shape {
                return Err(ApiError::BadRequest(format!("raw output '{}' differs in shape between images: send one per request", lead.name)));
            }
            match (&mut data, &tensor.data) {
                (OutputData::Fp32(all), RawData::Fp32(v)) => all.extend_from_slice(v),
                (OutputData::Int64(all), RawData::Int64(v)) => all.extend_from_slice(v),
                _ => return Err(ApiError::Internal("raw outputs differ in type between images".into())),
            }
        }
        let shape = std::iter::once(n).chain(lead.shape.iter().copied()).collect();
        stacked.push(OutputTensor { name: lead.name.clone(), shape, data });
    }
    Ok(stacked)
}
/// Instance segmentation's masks: one COCO compressed RLE string (pycocotools' `counts`, of
/// an `[H, W]` mask the size of the image) per detection, `BYTES [N, K]`, padded with "".
const MASKS: &str = "masks";
/// The same masks as pixels, `UINT8 [N, K, H, W]` (1 inside), computed only when named.
const MASK_PIXELS: &str = "mask_pixels";
/// Keypoints' points, `FP32 [N, K, J, 3]`: (x, y, score) in original pixels, zeros past an
/// image's own detections.
const KEYPOINTS: &str = "keypoints";
/// Rotated boxes, `FP32 [N, K, 5]`: (cx, cy, w, h, angle in radians) in original pixels; their
/// axis-aligned bounds are `boxes`.
const ROTATED_BOXES: &str = "rotated_boxes";
/// The rotated boxes' corners, `FP32 [N, K, 4, 2]`.
const CORNERS: &str = "corners";

/// The task's outputs as `[N, ...]` tensors: `scores`; `mask`; `embedding`; or `boxes`,
/// `scores`, `classes` and `num_detections`, padded to the image with the most detections
/// (and instance segmentation's `masks`, and with `mask_pixels` its dense masks).
pub(crate) fn task_tensors(results: Vec<Finished>, mask_pixels: bool) -> Result<Vec<OutputTensor>, ApiError> {
    let n = results.len() as i64;
    let tensor = |name: &str, shape: Vec<i64>, data: OutputData| OutputTensor { name: name.into(), shape, data };
    let (mut scores, mut masks, mut detections, mut embeddings) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut instances = Vec::new();
    let mut poses = Vec::new();
    let mut rotated = Vec::new();
    for result in results {
        match result {
            Finished::Classification { scores: s, .. } => scores.push(s),
            Finished::Segmentation { mask } => masks.push(mask),
            Finished::Detection { detections: d } => detections.push(d),
            Finished::Embedding { vector } => embeddings.push(vector),
            Finished::InstanceSegmentation { instances: found } => {
                detections.push(found.iter().map(|i| i.detection.clone()).collect());
                instances.push(found);
            }
            Finished::Keypoints { poses: found, schema } => {
                detections.push(found.iter().map(|p| p.detection.clone()).collect());
                poses.push((found, schema.names.len()));
            }
            Finished::OrientedDetection { detections: found } => {
                detections.push(found.iter().map(|o| o.detection.clone()).collect());
                rotated.push(found.into_iter().map(|o| o.rotated).collect::<Vec<_>>());
            }
        }
    }
    // One task per model, so exactly one of the four is filled.
    if let Some(first) = scores.first() {
        let classes = first.len() as i64;
        return Ok(vec![tensor("scores", vec![n, classes], OutputData::Fp32(scores.concat()))]);
    }
    if let Some(first) = embeddings.first() {
        let dimension = first.len() as i64;
        return Ok(vec![tensor("embedding", vec![n, dimension], OutputData::Fp32(embeddings.concat()))]);
    }
    if let Some(first) = masks.first() {
        let size = (first.height, first.width);
        if masks.iter().any(|m| (m.height, m.width) != size) {
            return Err(ApiError::BadRequest("images of different sizes give masks of different shapes: send one per request".into()));
        }
        let data = masks.into_iter().flat_map(|m| m.labels).collect();
        return Ok(vec![tensor("mask", vec![n, size.0 as i64, size.1 as i64], OutputData::Uint8(data))]);
    }
    let k = detections.iter().map(Vec::len).max().unwrap_or(0);
    let (mut boxes, mut scores, mut classes, mut counts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for dets in &detections {
        counts.push(dets.len() as i32);
        for i in 0..k {
            match dets.get(i) {
                Some(d) => {
                    boxes.extend([d.bbox.x1, d.bbox.y1, d.bbox.x2, d.bbox.y2]);
                    scores.push(d.score);
                    classes.push(d.index as i64);
                }
                // Padding past an image's own detections: see num_detections.
                None => {
                    boxes.extend([0.0; 4]);
                    scores.push(0.0);
                    classes.push(-1);
                }
            }
        }
    }
    let k = k as i64;
    let mut tensors = vec![
        tensor("boxes", vec![n, k, 4], OutputData::Fp32(boxes)),
        tensor("scores", vec![n, k], OutputData::Fp32(scores)),
        tensor("classes", vec![n, k], OutputData::Int64(classes)),
        tensor("num_detections", vec![n], OutputData::Int32(counts)),
    ];
    if !instances.is_empty() {
        tensors.extend(instance_mask_tensors(&instances, k as usize, mask_pixels)?);
    }
    if let Some(&(_, j)) = poses.first() {
        let mut data = Vec::with_capacity(poses.len() * k as usize * j * 3);
        for (found, _) in &poses {
            for i in 0..k as usize {
                match found.get(i) {
                    Some(pose) => data.extend(keypoints::flat_points(&pose.points)),
                    None => data.extend(std::iter::repeat(0.0).take(j * 3)),
                }
            }
        }
        tensors.push(tensor(KEYPOINTS, vec![n, k, j as i64, 3], OutputData::Fp32(data)));
    }
    if !rotated.is_empty() {
        let (mut boxes, mut corners) = (Vec::new(), Vec::new());
        for found in &rotated {
            for i in 0..k as usize {
                match found.get(i) {
                    Some(r) => {
                        boxes.extend([r.cx, r.cy, r.w, r.h, r.angle]);
                        corners.extend(r.corners().into_iter().flatten());
                    }
                    None => {
                        boxes.extend([0.0; 5]);
                        corners.extend([0.0; 8]);
                    }
                }
            }
        }
        tensors.push(tensor(ROTATED_BOXES, vec![n, k, 5], OutputData::Fp32(boxes)));
        tensors.push(tensor(CORNERS, vec![n, k, 4, 2], OutputData::Fp32(corners)));
    }
    Ok(tensors)
}

/// `masks` (RLE strings) and, when asked, `mask_pixels`, both padded to `k` detections.
fn instance_mask_tensors(per_image: &[Vec<Instance>], k: usize, mask_pixels: bool) -> Result<Vec<OutputTensor>, ApiError> {
    let n = per_image.len() as i64;
    let rle: Vec<String> = per_image
        .iter()
        .flat_map(|found| (0..k).map(move |i| found.get(i).map(|inst| instances::rle_counts(&inst.mask)).unwrap_or_default()))
        .collect();
    let mut tensors = vec![OutputTensor { name: MASKS.into(), shape: vec![n, k as i64], data: OutputData::Bytes(rle) }];
    if mask_pixels {
        let size = per_image.iter().flatten().map(|i| (i.mask.canvas_width, i.mask.canvas_height)).next().unwrap_or((0, 0));
        if per_image.iter().flatten().any(|i| (i.mask.canvas_width, i.mask.canvas_height) != size) {
            return Err(ApiError::BadRequest("images of different sizes give masks of different shapes: send one per request".into()));
        }
        let (w, h) = size;
        let plane = (w * h) as usize;
        let mut data = vec![0u8; per_image.len() * k * plane];
        for (image, found) in per_image.iter().enumerate() {
            for (i, instance) in found.iter().enumerate() {
                let start = (image * k + i) * plane;
                let mask = &instance.mask;
                for y in mask.top..mask.top + mask.height {
                    let row = &mask.bits[((y - mask.top) * mask.width) as usize..((y - mask.top + 1) * mask.width) as usize];
                    let at = start + (y * w + mask.left) as usize;
                    data[at..at + row.len()].copy_from_slice(row);
                }
            }
        }
        tensors.push(OutputTensor { name: MASK_PIXELS.into(), shape: vec![n, k as i64, h as i64, w as i64], data: OutputData::Uint8(data) });
    }
    Ok(tensors)
}

/// Triton's classification extension: the top `k` of a `[N, C]` score tensor as
/// `"score:index:label"` strings, `BYTES [N, k]`.
fn classification_strings(tensor: &OutputTensor, k: usize, labels: &[String]) -> Result<OutputTensor, ApiError> {
    let (&[n, c], OutputData::Fp32(data)) = (tensor.shape.as_slice(), &tensor.data) else {
        return Err(ApiError::BadRequest(format!("output '{}' is not a [N, C] score tensor", tensor.name)));
    };
    let k = k.min(c as usize);
    let mut strings = Vec::new();
    for row in data.chunks(c.max(1) as usize) {
        for p in classification::top_k(row, k, labels) {
            strings.push(format!("{}:{}:{}", p.score, p.index, p.label));
        }
    }
    Ok(OutputTensor { name: tensor.name.clone(), shape: vec![n, k as i64], data: OutputData::Bytes(strings) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp32_pixels_are_taken_within_0_to_255_and_a_clients_scaling_is_refused_naming_none() {
        assert_eq!(pixel_values(&[0.0, 254.6, 255.0, 17.2]).unwrap(), vec![0, 255, 255, 17]);
        let inception = pixel_values(&[-1.0, 0.5, 1.0]).unwrap_err();
        assert!(inception.contains("values from -1 to 1") && inception.contains("-s NONE"), "{inception}");
        let vgg = pixel_values(&[-123.0, 40.0, 151.0]).unwrap_err();
        assert!(vgg.contains("within 0..255"), "{vgg}");
        assert!(pixel_values(&[f32::NAN, 3.0]).unwrap_err().contains("not finite"));
        assert!(pixel_values(&[256.5]).is_err());
    }
}
