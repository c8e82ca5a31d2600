//! Triton's model configuration extension (`GET /v2/models/{m}/config`, gRPC `ModelConfig`):
//! a version's `config.toml` and what loading it measured, described in Triton's terms so
//! that Triton's own clients (`image_client.py`, `perf_analyzer`, `get_model_config`) can plan
//! their requests. REST writes it as Triton's JSON, gRPC as `inference.ModelConfig`.
//!
//! The mapping: the input is the metadata's (RGB pixels, `FORMAT_NHWC`; a pipeline's encoded
//! images, `FORMAT_NONE`); the outputs are the task's, as in the metadata;
//! `max_batch_size` is the most images one request may carry
//! (`--max-images-per-request`), so each tensor's `dims` are its metadata shape without the
//! first (batch) dimension; dynamic batching is always on, its preferred size the batch bound
//! loading chose and its delay `batching.max_delay_ms`; one instance group of the executors
//! the version may use at once, on its device; every version is served (`all`).

use super::{model_metadata, ModelMetadata, TensorSpec};
use crate::error::ApiError;
use crate::model_config::{ModelFormat, ResizePolicy};
use crate::repository::Servable;
use crate::serve::Core;

/// A model's configuration in Triton's terms.
#[derive(Debug, Clone)]
pub struct ModelConfiguration {
    pub name: String,
    pub platform: &'static str,
    pub backend: &'static str,
    pub max_batch_size: i32,
    pub inputs: Vec<ConfigTensor>,
    pub outputs: Vec<ConfigTensor>,
    /// `None` for a pipeline: its steps batch in their own models.
    pub dynamic_batching: Option<DynamicBatching>,
    pub instance_group: Option<InstanceGroup>,
    pub default_model_filename: String,
    /// Triton's `parameters` (string values): how the input is prepared and read.
    pub parameters: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct ConfigTensor {
    pub name: String,
    /// Triton's `TYPE_*` name (`TYPE_STRING` for `BYTES`).
    pub data_type: &'static str,
    pub dims: Vec<i64>,
    /// Triton's `FORMAT_*`, inputs only.
    pub format: Option<&'static str>,
    /// The labels file, for the score output of a classifier.
    pub label_filename: Option<String>,
}

#[derive(Debug, Clone, Copy)]
pub struct DynamicBatching {
    pub preferred_batch_size: i32,
    pub max_queue_delay_microseconds: u64,
}

#[derive(Debug, Clone)]
pub struct InstanceGroup {
    pub name: String,
    /// `KIND_CPU` or `KIND_GPU`.
    pub kind: &'static str,
    pub count: i32,
    pub gpus: Vec<i32>,
}

/// Triton's datatype name for a protocol datatype.
pub fn triton_type(datatype: &str) -> &'static str {
    match datatype {
        "BOOL" => "TYPE_BOOL",
        "UINT8" => "TYPE_UINT8",
        "UINT16" => "TYPE_UINT16",
        "UINT32" => "TYPE_UINT32",
        "UINT64" => "TYPE_UINT64",
        "INT8" => "TYPE_INT8",
        "INT16" => "TYPE_INT16",
        "INT32" => "TYPE_INT32",
        "INT64" => "TYPE_INT64",
        "FP16" => "TYPE_FP16",
        "FP32" => "TYPE_FP32",
        "FP64" => "TYPE_FP64",
        "BYTES" => "TYPE_STRING",
        "BF16" => "TYPE_BF16",
        _ => "TYPE_INVALID",
    }
}

/// The tensors of metadata, their batch dimension dropped; inputs with their format (NHWC for
/// pixels, none for encoded images).
fn config_tensors(specs: &[TensorSpec], is_input: bool) -> Vec<ConfigTensor> {
    specs
        .iter()
        .map(|spec| ConfigTensor {
            name: spec.name.clone(),
            data_type: triton_type(spec.datatype),
            dims: spec.shape.iter().skip(1).copied().collect(),
            format: is_input.then_some(if matches!(spec.shape.as_slice(), [_, _, _, 3]) { "FORMAT_NHWC" } else { "FORMAT_NONE" }),
            label_filename: None,
        })
        .collect()
}

/// The configuration of what a lookup found.
pub fn model_configuration(core: &Core, servable: Servable) -> Result<ModelConfiguration, ApiError> {
    let max_batch_size = core.limits.max_images_per_request.min(i32::MAX as usize) as i32;
    let metadata: ModelMetadata = model_metadata(core, servable.clone())?;
    let mut configuration = ModelConfiguration {
        name: metadata.name.clone(),
        platform: metadata.platform,
        backend: "",
        max_batch_size,
        inputs: config_tensors(&metadata.inputs, true),
        // The metadata's outputs exactly (perf_analyzer checks each against it): the model's
        // own `raw_*` outputs are listed in REST's metadata parameters only.
        outputs: config_tensors(&metadata.outputs, false),
        dynamic_batching: None,
        instance_group: None,
        default_model_filename: String::new(),
        parameters: Vec::new(),
    };
    let entry = match servable {
        Servable::Pipeline(_) => return Ok(configuration),
        Servable::Model(entry) => entry,
    };
    // `model_metadata` answered, so the config was read.
    let Some(config) = entry.config.clone() else { return Ok(configuration) };
    configuration.backend = match config.format {
        ModelFormat::Torchscript => "pytorch",
        ModelFormat::Aoti => "pytorch_aoti",
    };
    configuration.default_model_filename = config.model_file().display().to_string();
    if let Some(labels) = &config.labels {
        if let Some(scores) = configuration.outputs.iter_mut().find(|o| o.name == "scores") {
            scores.label_filename = Some(labels.display().to_string());
        }
    }
    let runtime = entry.runtime().ok();
    let batch_bound = runtime.as_ref().map_or(config.batching.max_batch_size, |r| r.batch_bound()).max(1);
    configuration.dynamic_batching = Some(DynamicBatching {
        preferred_batch_size: batch_bound.min(i32::MAX as usize) as i32,
        max_queue_delay_microseconds: config.batching.max_delay_ms.saturating_mul(1000),
    });
    let on_gpu = config.runtime.device.starts_with("cuda");
    let gpus = config.runtime.device.strip_prefix("cuda:").and_then(|n| n.parse().ok()).into_iter().collect();
    let count = runtime.as_ref().map_or(config.runtime.workers.unwrap_or(1), |r| r.parallelism());
    configuration.instance_group = Some(InstanceGroup {
        name: entry.name.clone(),
        kind: if on_gpu { "KIND_GPU" } else { "KIND_CPU" },
        count: count.min(i32::MAX as usize) as i32,
        gpus,
    });
    let input = &config.input;
    let resize = match input.resize {
        ResizePolicy::ShorterSideCenterCrop => "shorter_side_center_crop",
        ResizePolicy::Stretch => "stretch",
        ResizePolicy::Letterbox => "letterbox",
        ResizePolicy::FitMultiple => "fit_multiple",
        ResizePolicy::Original => "original",
    };
    configuration.parameters = vec![
        ("task".into(), serde_json::to_value(config.task).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()),
        ("version".into(), entry.version.clone()),
        ("precision".into(), config.compile.precision.name().into()),
        ("input_width".into(), input.width.to_string()),
        ("input_height".into(), input.height.to_string()),
        ("resize".into(), resize.into()),
        ("mean".into(), format!("{:?}", input.mean)),
        ("std".into(), format!("{:?}", input.std)),
    ];
    Ok(configuration)
}
