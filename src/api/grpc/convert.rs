//! gRPC's messages to and from the Open Inference Protocol's tensors (`serve::oip::tensors`),
//! which REST V2 reads too: after this, a gRPC call is the same request as a REST one.
//!
//! Inputs come the way `tritonclient.grpc` sends them — one `raw_input_contents` entry per
//! input, in input order, in Triton's binary layout — or in typed `contents` (`bytes_contents`
//! for BYTES, `uint_contents` for UINT8, `fp32_contents` for FP32). Outputs go back in
//! `raw_output_contents`, one entry per output in `outputs`' order, which is where
//! `tritonclient` reads them (`InferResult.as_numpy`).

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::{Map, Value};

use super::proto::infer_parameter::ParameterChoice;
use super::proto::model_infer_request::InferInputTensor;
use super::proto::model_infer_response::InferOutputTensor;
use super::proto::{
    model_input, model_instance_group, DataType, InferBatchStatistics, InferParameter, InferStatistics, InferTensorContents,
    MemoryUsage, ModelConfig, ModelDynamicBatching, ModelInferRequest, ModelInferResponse, ModelInput, ModelInstanceGroup,
    ModelOutput, ModelParameter, ModelStatistics, ModelStatisticsResponse, ModelVersionPolicy, StatisticDuration,
};
use crate::repository::DurationTotal;
use crate::serve::oip::config::ModelConfiguration;
use crate::serve::oip::statistics::VersionStatistics;
use crate::serve::oip::tensors::{InferRequest, InputTensor, RequestedOutput};
use crate::serve::oip::TensorAnswer;

/// A `ModelInferRequest` as REST V2's parsed request. The error says what is wrong with it.
pub fn infer_request(request: ModelInferRequest) -> Result<InferRequest, String> {
    let ModelInferRequest { id, parameters, inputs, outputs, raw_input_contents, .. } = request;
    if !raw_input_contents.is_empty() && raw_input_contents.len() != inputs.len() {
        return Err(format!(
            "raw_input_contents has {} entries for {} inputs: send one per input, in input order",
            raw_input_contents.len(),
            inputs.len()
        ));
    }
    let mut raw = raw_input_contents.into_iter();
    let inputs = inputs
        .into_iter()
        .map(|input| input_tensor(input, raw.next()))
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = outputs
        .into_iter()
        .map(|o| RequestedOutput { name: o.name, parameters: parameters_json(o.parameters) })
        .collect::<Vec<_>>();
    Ok(InferRequest {
        id: Some(id).filter(|id| !id.is_empty()),
        parameters: parameters_json(parameters),
        inputs,
        // gRPC has no "all outputs" marker beyond naming none, as REST.
        outputs: Some(outputs).filter(|o| !o.is_empty()),
    })
}

fn input_tensor(input: InferInputTensor, raw: Option<Bytes>) -> Result<InputTensor, String> {
    let InferInputTensor { name, datatype, shape, contents, .. } = input;
    let contents = contents.filter(|c| !is_empty(c));
    match (raw, contents) {
        (Some(_), Some(_)) => Err(format!("input '{name}' has both contents and raw_input_contents")),
        (Some(raw), None) => InputTensor::binary(name, shape, datatype, raw),
        (None, None) => Err(format!("input '{name}' has no data: fill raw_input_contents or contents")),
        (None, Some(contents)) => match datatype.as_str() {
            "BYTES" => InputTensor::elements(name, shape, datatype, contents.bytes_contents),
            "UINT8" => {
                let bytes = contents
                    .uint_contents
                    .iter()
                    .map(|&v| u8::try_from(v).map_err(|_| format!("input '{name}': UINT8 values must be within 0..=255, got {v}")))
                    .collect::<Result<Vec<u8>, _>>()?;
                InputTensor::binary(name, shape, datatype, Bytes::from(bytes))
            }
            "FP32" => {
                let bytes: Vec<u8> = contents.fp32_contents.iter().flat_map(|v| v.to_le_bytes()).collect();
                InputTensor::binary(name, shape, datatype, Bytes::from(bytes))
            }
            other => Err(format!("input datatype {other} is not accepted: use BYTES, UINT8 or FP32")),
        },
    }
}

fn is_empty(c: &InferTensorContents) -> bool {
    c.bool_contents.is_empty()
        && c.int_contents.is_empty()
        && c.int64_contents.is_empty()
        && c.uint_contents.is_empty()
        && c.uint64_contents.is_empty()
        && c.fp32_contents.is_empty()
        && c.fp64_contents.is_empty()
        && c.bytes_contents.is_empty()
}

/// gRPC's typed parameters as the JSON values REST's parameters hold, so one parser
/// (`PredictParams::from_v2`, the classification extension) reads both.
fn parameters_json(parameters: HashMap<String, InferParameter>) -> Map<String, Value> {
    parameters
        .into_iter()
        .filter_map(|(key, p)| {
            let value = match p.parameter_choice? {
                ParameterChoice::BoolParam(b) => Value::Bool(b),
                ParameterChoice::Int64Param(i) => Value::from(i),
                ParameterChoice::StringParam(s) => Value::String(s),
                ParameterChoice::DoubleParam(d) => serde_json::Number::from_f64(d).map_or(Value::Null, Value::Number),
                ParameterChoice::Uint64Param(u) => Value::from(u),
            };
            Some((key, value))
        })
        .collect()
}

/// The answer as `ModelInferResponse`: each output described in `outputs`, its data in the
/// matching `raw_output_contents` entry.
pub fn infer_response(answer: TensorAnswer) -> ModelInferResponse {
    let mut outputs = Vec::with_capacity(answer.outputs.len());
    let mut raw = Vec::with_capacity(answer.outputs.len());
    for (tensor, _) in answer.outputs {
        raw.push(Bytes::from(tensor.data.to_binary()));
        outputs.push(InferOutputTensor {
            name: tensor.name,
            datatype: tensor.data.datatype().to_string(),
            shape: tensor.shape,
            parameters: HashMap::new(),
            contents: None,
        });
    }
    ModelInferResponse {
        model_name: answer.model_name,
        model_version: answer.model_version,
        id: answer.id.unwrap_or_default(),
        parameters: HashMap::new(),
        outputs,
        raw_output_contents: raw,
    }
}

/// The model configuration as Triton's `inference.ModelConfig`.
pub fn model_config(c: &ModelConfiguration) -> ModelConfig {
    use super::proto::model_version_policy::{All, PolicyChoice};
    let data_type = |name: &str| DataType::from_str_name(name).unwrap_or(DataType::TypeInvalid) as i32;
    ModelConfig {
        name: c.name.clone(),
        platform: c.platform.to_string(),
        backend: c.backend.to_string(),
        version_policy: Some(ModelVersionPolicy { policy_choice: Some(PolicyChoice::All(All {})) }),
        max_batch_size: c.max_batch_size,
        input: c
            .inputs
            .iter()
            .map(|t| ModelInput {
                name: t.name.clone(),
                data_type: data_type(t.data_type),
                format: t.format.and_then(model_input::Format::from_str_name).unwrap_or(model_input::Format::None) as i32,
                dims: t.dims.clone(),
            })
            .collect(),
        output: c
            .outputs
            .iter()
            .map(|t| ModelOutput {
                name: t.name.clone(),
                data_type: data_type(t.data_type),
                dims: t.dims.clone(),
                label_filename: t.label_filename.clone().unwrap_or_default(),
            })
            .collect(),
        dynamic_batching: c.dynamic_batching.map(|b| ModelDynamicBatching {
            preferred_batch_size: vec![b.preferred_batch_size],
            max_queue_delay_microseconds: b.max_queue_delay_microseconds,
        }),
        instance_group: c
            .instance_group
            .iter()
            .map(|g| ModelInstanceGroup {
                name: g.name.clone(),
                kind: model_instance_group::Kind::from_str_name(g.kind).unwrap_or(model_instance_group::Kind::Auto) as i32,
                count: g.count,
                gpus: g.gpus.clone(),
            })
            .collect(),
        default_model_filename: c.default_model_filename.clone(),
        parameters: c.parameters.iter().map(|(k, v)| (k.clone(), ModelParameter { string_value: v.clone() })).collect(),
    }
}

fn duration(total: DurationTotal) -> StatisticDuration {
    StatisticDuration { count: total.count, ns: total.ns }
}

/// Each version's statistics as Triton's `inference.ModelStatistics`.
pub fn model_statistics(rows: Vec<VersionStatistics>) -> ModelStatisticsResponse {
    let model_stats = rows
        .into_iter()
        .map(|row| {
            let [success, fail, queue, compute_input, compute_infer, compute_output, cache_hit, cache_miss] =
                row.inference_stats.map(|(_, total)| Some(duration(total)));
            ModelStatistics {
                name: row.name,
                version: row.version,
                last_inference: row.last_inference,
                inference_count: row.inference_count,
                execution_count: row.execution_count,
                inference_stats: Some(InferStatistics {
                    success,
                    fail,
                    queue,
                    compute_input,
                    compute_infer,
                    compute_output,
                    cache_hit,
                    cache_miss,
                }),
                batch_stats: row
                    .batch_stats
                    .iter()
                    .map(|b| InferBatchStatistics {
                        batch_size: b.batch_size,
                        compute_input: Some(duration(b.compute_input)),
                        compute_infer: Some(duration(b.compute_infer)),
                        compute_output: Some(duration(b.compute_output)),
                    })
                    .collect(),
                // Host memory (see `VersionStatistics::memory_bytes`), Triton's "CPU" kind.
                memory_usage: row.memory_bytes.map(|byte_size| MemoryUsage { r#type: "CPU".into(), id: 0, byte_size }).into_iter().collect(),
                response_stats: HashMap::new(),
            }
        })
        .collect();
    ModelStatisticsResponse { model_stats }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::oip::tensors::{OutputData, OutputTensor};
    use super::super::proto::model_infer_request::InferRequestedOutputTensor;

    fn input(datatype: &str, shape: Vec<i64>, contents: Option<InferTensorContents>) -> InferInputTensor {
        InferInputTensor { name: "image".into(), datatype: datatype.into(), shape, parameters: HashMap::new(), contents }
    }

    #[test]
    fn raw_contents_pair_with_inputs_in_order() {
        let request = ModelInferRequest {
            inputs: vec![input("UINT8", vec![1, 1, 1, 3], None)],
            raw_input_contents: vec![Bytes::from_static(&[1, 2, 3])],
            ..Default::default()
        };
        let parsed = infer_request(request).unwrap();
        assert_eq!(parsed.inputs[0].u8_values().unwrap(), [1, 2, 3]);
        assert!(parsed.outputs.is_none() && parsed.id.is_none());
        let mismatched = ModelInferRequest {
            inputs: vec![input("UINT8", vec![3], None), input("UINT8", vec![3], None)],
            raw_input_contents: vec![Bytes::from_static(&[1, 2, 3])],
            ..Default::default()
        };
        assert!(infer_request(mismatched).unwrap_err().contains("one per input"));
    }

    #[test]
    fn typed_contents_become_the_same_tensors() {
        let bytes = InferTensorContents { bytes_contents: vec![Bytes::from_static(b"jpeg")], ..Default::default() };
        let parsed = infer_request(ModelInferRequest { inputs: vec![input("BYTES", vec![1], Some(bytes))], ..Default::default() }).unwrap();
        assert_eq!(parsed.inputs[0].bytes_elements(|_| unreachable!()).unwrap(), [Bytes::from_static(b"jpeg")]);
        let floats = InferTensorContents { fp32_contents: vec![0.5, -1.0], ..Default::default() };
        let parsed = infer_request(ModelInferRequest { inputs: vec![input("FP32", vec![2], Some(floats))], ..Default::default() }).unwrap();
        assert_eq!(parsed.inputs[0].f32_values().unwrap(), [0.5, -1.0]);
        let too_big = InferTensorContents { uint_contents: vec![256], ..Default::default() };
        let error = infer_request(ModelInferRequest { inputs: vec![input("UINT8", vec![1], Some(too_big))], ..Default::default() }).unwrap_err();
        assert!(error.contains("0..=255"), "{error}");
        let empty = infer_request(ModelInferRequest { inputs: vec![input("BYTES", vec![1], None)], ..Default::default() }).unwrap_err();
        assert!(empty.contains("no data"), "{empty}");
    }

    #[test]
    fn parameters_keep_their_types_for_the_shared_parser() {
        let mut output_parameters = HashMap::new();
        output_parameters.insert("classification".to_string(), InferParameter { parameter_choice: Some(ParameterChoice::Int64Param(3)) });
        let mut parameters = HashMap::new();
        parameters.insert("score_threshold".to_string(), InferParameter { parameter_choice: Some(ParameterChoice::DoubleParam(0.25)) });
        parameters.insert("flag".to_string(), InferParameter { parameter_choice: Some(ParameterChoice::BoolParam(true)) });
        let request = ModelInferRequest {
            id: "frame-7".into(),
            parameters,
            inputs: vec![input("UINT8", vec![1], None)],
            outputs: vec![InferRequestedOutputTensor { name: "scores".into(), parameters: output_parameters }],
            raw_input_contents: vec![Bytes::from_static(&[0])],
            ..Default::default()
        };
        let parsed = infer_request(request).unwrap();
        assert_eq!(parsed.id.as_deref(), Some("frame-7"));
        assert_eq!(parsed.parameters["score_threshold"], Value::from(0.25));
        assert_eq!(parsed.parameters["flag"], Value::Bool(true));
        assert_eq!(parsed.outputs.unwrap()[0].parameters["classification"], Value::from(3));
    }

    #[test]
    fn outputs_go_to_raw_contents_in_order() {
        let answer = TensorAnswer {
            model_name: "m".into(),
            model_version: "1".into(),
            id: Some("x".into()),
            outputs: vec![
                (OutputTensor { name: "scores".into(), shape: vec![1, 2], data: OutputData::Fp32(vec![0.25, 0.75]) }, false),
                (OutputTensor { name: "num_detections".into(), shape: vec![1], data: OutputData::Int32(vec![3]) }, true),
            ],
            timing_headers: axum::http::HeaderMap::new(),
        };
        let response = infer_response(answer);
        assert_eq!(response.id, "x");
        assert_eq!(response.outputs[0].datatype, "FP32");
        assert_eq!(response.outputs[1].shape, [1]);
        assert_eq!(response.raw_output_contents[0].as_ref(), [0.25f32.to_le_bytes(), 0.75f32.to_le_bytes()].concat());
        assert_eq!(response.raw_output_contents[1].as_ref(), 3i32.to_le_bytes());
    }
}
