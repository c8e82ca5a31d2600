//! The Open Inference Protocol's tensors on the wire, without HTTP: the inference request as
//! JSON, optionally followed by the binary tensor data extension (`Inference-Header-Content-
//! Length` gives the JSON's length; each input with `parameters.binary_data_size` takes that
//! many bytes from what follows, in input order), and the response in the same two forms.
//! Binary layouts follow Triton: little-endian numbers, row-major; `BYTES` elements are each
//! a 4-byte little-endian length and that many bytes.

use axum::body::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// One inference request, its binary data already cut out for each input.
#[derive(Debug)]
pub struct InferRequest {
    pub id: Option<String>,
    pub parameters: Map<String, Value>,
    pub inputs: Vec<InputTensor>,
    pub outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Debug)]
pub struct InputTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    data: TensorData,
}

#[derive(Debug)]
enum TensorData {
    Json(Value),
    Binary(Bytes),
    /// `BYTES` elements already apart (gRPC's `contents.bytes_contents`).
    Elements(Vec<Bytes>),
}

#[derive(Debug, Deserialize)]
pub struct RequestedOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

/// The fields we read, each checked strictly; any other (`model_name` and `model_version`,
/// which KServe's SDK always sends, or anything else) is ignored, as Triton and KServe do.
#[derive(Deserialize)]
struct JsonRequest {
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<JsonInput>,
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Deserialize)]
struct JsonInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    data: Option<Value>,
}

/// Splits and parses a request body. `header_length` is `Inference-Header-Content-Length`,
/// present when binary data follows the JSON.
pub fn parse_request(body: Bytes, header_length: Option<usize>) -> Result<InferRequest, String> {
    let json_length = header_length.unwrap_or(body.len());
    if json_length > body.len() {
        return Err(format!("Inference-Header-Content-Length is {json_length} but the body has {} bytes", body.len()));
    }
    let request: JsonRequest =
        serde_json::from_slice(&body[..json_length]).map_err(|e| format!("malformed inference request: {e}"))?;
    let mut offset = json_length;
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        let data = match (input.parameters.get("binary_data_size"), input.data) {
            (Some(size), None) => {
                let size = size
                    .as_u64()
                    .and_then(|s| usize::try_from(s).ok())
                    .ok_or_else(|| format!("input '{}': binary_data_size must be a non-negative integer", input.name))?;
                let end = offset.checked_add(size).filter(|&end| end <= body.len()).ok_or_else(|| {
                    format!("input '{}' declares {size} bytes of binary data but the body ends first", input.name)
                })?;
                let slice = body.slice(offset..end);
                offset = end;
                TensorData::Binary(slice)
            }
            (Some(_), Some(_)) => return Err(format!("input '{}' has both data and binary_data_size", input.name)),
            (None, Some(data)) => TensorData::Json(data),
            (None, None) => return Err(format!("input '{}' has no data", input.name)),
        };
        if input.shape.iter().any(|&d| d < 0) {
            return Err(format!("input '{}' has a negative dimension in shape {:?}", input.name, input.shape));
        }
        inputs.push(InputTensor { name: input.name, shape: input.shape, datatype: input.datatype, data });
    }
    if offset != body.len() {
        return Err(format!("{} bytes after the JSON belong to no input", body.len() - offset));
    }
    Ok(InferRequest { id: request.id, parameters: request.parameters, inputs, outputs: request.outputs })
}

impl InputTensor {
    /// An input whose data is Triton's binary layout (REST's binary extension, gRPC's
    /// `raw_input_contents` or typed contents written out little-endian).
    pub fn binary(name: String, shape: Vec<i64>, datatype: String, data: Bytes) -> Result<InputTensor, String> {
        InputTensor::new(name, shape, datatype, TensorData::Binary(data))
    }

    /// A `BYTES` input whose elements arrive apart.
    pub fn elements(name: String, shape: Vec<i64>, datatype: String, elements: Vec<Bytes>) -> Result<InputTensor, String> {
        InputTensor::new(name, shape, datatype, TensorData::Elements(elements))
    }

    fn new(name: String, shape: Vec<i64>, datatype: String, data: TensorData) -> Result<InputTensor, String> {
        if shape.iter().any(|&d| d < 0) {
            return Err(format!("input '{name}' has a negative dimension in shape {shape:?}"));
        }
        Ok(InputTensor { name, shape, datatype, data })
    }

    /// Elements the shape holds; the data must hold as many.
    pub fn element_count(&self) -> Result<usize, String> {
        self.shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
            .ok_or_else(|| format!("input '{}' has an impossible shape {:?}", self.name, self.shape))
    }

    fn json_values(&self, data: &Value) -> Result<Vec<Value>, String> {
        let mut values = Vec::new();
        flatten(data, &mut values);
        let expected = self.element_count()?;
        if values.len() != expected {
            return Err(format!("input '{}' has shape {:?} but {} values", self.name, self.shape, values.len()));
        }
        Ok(values)
    }

    fn binary_of_width(&self, bytes: &Bytes, width: usize) -> Result<(), String> {
        let expected = self.element_count()?.checked_mul(width);
        if expected != Some(bytes.len()) {
            return Err(format!(
                "input '{}' has shape {:?} of {} but {} bytes of binary data",
                self.name, self.shape, self.datatype, bytes.len()
            ));
        }
        Ok(())
    }

    /// `BYTES` elements: base64 strings in JSON, length-prefixed in binary.
    pub fn bytes_elements(&self, decode_text: impl Fn(&str) -> Result<Bytes, String>) -> Result<Vec<Bytes>, String> {
        let elements = match &self.data {
            TensorData::Json(data) => self
                .json_values(data)?
                .iter()
                .map(|v| v.as_str().ok_or_else(|| "BYTES elements must be strings (base64 images)".to_string()).and_then(&decode_text))
                .collect::<Result<Vec<_>, _>>()?,
            TensorData::Binary(bytes) => split_length_prefixed(bytes)?,
            TensorData::Elements(elements) => elements.clone(),
        };
        if elements.len() != self.element_count()? {
            return Err(format!("input '{}' has shape {:?} but {} elements", self.name, self.shape, elements.len()));
        }
        Ok(elements)
    }

    pub fn u8_values(&self) -> Result<Vec<u8>, String> {
        match &self.data {
            TensorData::Json(data) => self
                .json_values(data)?
                .iter()
                .map(|v| v.as_u64().filter(|x| *x <= 255).map(|x| x as u8).ok_or_else(|| "UINT8 values must be integers within 0..=255".to_string()))
                .collect(),
            TensorData::Binary(bytes) => {
                self.binary_of_width(bytes, 1)?;
                Ok(bytes.to_vec())
            }
            TensorData::Elements(_) => Err(format!("input '{}' holds BYTES elements, not UINT8 values", self.name)),
        }
    }

    pub fn f32_values(&self) -> Result<Vec<f32>, String> {
        match &self.data {
            TensorData::Json(data) => self
                .json_values(data)?
                .iter()
                .map(|v| v.as_f64().map(|x| x as f32).ok_or_else(|| "FP32 values must be numbers".to_string()))
                .collect(),
            TensorData::Binary(bytes) => {
                self.binary_of_width(bytes, 4)?;
                Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
            TensorData::Elements(_) => Err(format!("input '{}' holds BYTES elements, not FP32 values", self.name)),
        }
    }
}

fn flatten(value: &Value, out: &mut Vec<Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| flatten(v, out)),
        other => out.push(other.clone()),
    }
}

/// Triton's binary `BYTES` layout: each element a u32 little-endian length, then its bytes.
pub fn split_length_prefixed(bytes: &Bytes) -> Result<Vec<Bytes>, String> {
    let mut elements = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let header = bytes.get(at..at + 4).ok_or("BYTES data ends inside an element's length")?;
        let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let start = at + 4;
        let end = start.checked_add(length).filter(|&e| e <= bytes.len()).ok_or("BYTES element runs past the data")?;
        elements.push(bytes.slice(start..end));
        at = end;
    }
    Ok(elements)
}

/// An output tensor, typed, before it is written as JSON or binary.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub data: OutputData,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OutputData {
    Fp32(Vec<f32>),
    Uint8(Vec<u8>),
    Int32(Vec<i32>),
    Int64(Vec<i64>),
    Bytes(Vec<String>),
}

impl OutputData {
    pub fn datatype(&self) -> &'static str {
        match self {
            OutputData::Fp32(_) => "FP32",
            OutputData::Uint8(_) => "UINT8",
            OutputData::Int32(_) => "INT32",
            OutputData::Int64(_) => "INT64",
            OutputData::Bytes(_) => "BYTES",
        }
    }

    fn to_json(&self) -> Value {
        match self {
            OutputData::Fp32(v) => json!(v),
            OutputData::Uint8(v) => json!(v),
            OutputData::Int32(v) => json!(v),
            OutputData::Int64(v) => json!(v),
            OutputData::Bytes(v) => json!(v),
        }
    }

    /// Triton's binary layout, as REST's binary extension and gRPC's `raw_output_contents`
    /// carry it.
    pub fn to_binary(&self) -> Vec<u8> {
        match self {
            OutputData::Fp32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            OutputData::Uint8(v) => v.clone(),
            OutputData::Int32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            OutputData::Int64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            OutputData::Bytes(v) => v
                .iter()
                .flat_map(|s| (s.len() as u32).to_le_bytes().into_iter().chain(s.bytes()))
                .collect(),
        }
    }
}

/// The response body: JSON with each output's data inline, or — for outputs sent as binary —
/// `binary_data_size` in the JSON and the bytes after it. Returns the body and, when any
/// output is binary, the JSON's length for `Inference-Header-Content-Length`.
pub fn encode_response(mut head: Map<String, Value>, outputs: &[(OutputTensor, bool)]) -> (Vec<u8>, Option<usize>) {
    let mut binary = Vec::new();
    let mut described = Vec::with_capacity(outputs.len());
    for (tensor, as_binary) in outputs {
        let mut value = json!({"name": tensor.name, "datatype": tensor.data.datatype(), "shape": tensor.shape});
        if *as_binary {
            let bytes = tensor.data.to_binary();
            value["parameters"] = json!({"binary_data_size": bytes.len()});
            binary.extend(bytes);
        } else {
            value["data"] = tensor.data.to_json();
        }
        described.push(value);
    }
    head.insert("outputs".into(), Value::Array(described));
    let mut body = serde_json::to_vec(&Value::Object(head)).expect("JSON values serialise");
    if outputs.iter().any(|(_, b)| *b) {
        let json_length = body.len();
        body.extend(binary);
        (body, Some(json_length))
    } else {
        (body, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary_request(json: Value, tail: &[u8]) -> (Bytes, usize) {
        let mut body = serde_json::to_vec(&json).unwrap();
        let length = body.len();
        body.extend_from_slice(tail);
        (Bytes::from(body), length)
    }

    #[test]
    fn binary_inputs_are_cut_in_order_and_checked_against_their_shape() {
        let floats: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut tail = floats.clone();
        tail.extend([7u8, 8, 9]);
        let (body, length) = binary_request(
            json!({"inputs": [
                {"name": "a", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
                {"name": "b", "shape": [3], "datatype": "UINT8", "parameters": {"binary_data_size": 3}}
            ]}),
            &tail,
        );
        let request = parse_request(body, Some(length)).unwrap();
        assert_eq!(request.inputs[0].f32_values().unwrap(), [1.5, -2.0]);
        assert_eq!(request.inputs[1].u8_values().unwrap(), [7, 8, 9]);
        assert!(request.inputs[1].f32_values().is_err(), "3 bytes are not FP32 [3]");
    }

    #[test]
    fn fields_we_do_not_read_are_ignored_and_those_we_read_are_checked() {
        // KServe's SDK always sends model_name (and may send model_version).
        let sdk = json!({"model_name": "m", "model_version": "1", "future_field": {"x": 1},
                         "inputs": [{"name": "a", "shape": [2], "datatype": "UINT8", "data": [1, 2], "extra": true}]});
        let request = parse_request(Bytes::from(serde_json::to_vec(&sdk).unwrap()), None).unwrap();
        assert_eq!(request.inputs[0].u8_values().unwrap(), [1, 2]);
        let wrong_type = json!({"inputs": [{"name": "a", "shape": "two", "datatype": "UINT8", "data": [1, 2]}]});
        assert!(parse_request(Bytes::from(serde_json::to_vec(&wrong_type).unwrap()), None).is_err());
        let no_inputs = json!({"model_name": "m"});
        assert!(parse_request(Bytes::from(serde_json::to_vec(&no_inputs).unwrap()), None).is_err());
    }

    #[test]
    fn binary_lengths_that_do_not_add_up_are_errors() {
        let input = json!({"inputs": [{"name": "a", "shape": [2], "datatype": "UINT8", "parameters": {"binary_data_size": 2}}]});
        let (short, length) = binary_request(input.clone(), &[1]);
        assert!(parse_request(short, Some(length)).unwrap_err().contains("ends first"));
        let (long, length) = binary_request(input.clone(), &[1, 2, 3]);
        assert!(parse_request(long, Some(length)).unwrap_err().contains("belong to no input"));
        let (body, _) = binary_request(input, &[1, 2]);
        assert!(parse_request(body.clone(), Some(body.len() + 1)).is_err());
        let huge = json!({"inputs": [{"name": "a", "shape": [i64::MAX, 4], "datatype": "UINT8", "data": [1]}]});
        let request = parse_request(Bytes::from(huge.to_string()), None).unwrap();
        assert!(request.inputs[0].u8_values().unwrap_err().contains("impossible shape"));
    }

    #[test]
    fn bytes_elements_in_both_forms() {
        let mut tail = Vec::new();
        for element in [&b"abc"[..], b""] {
            tail.extend((element.len() as u32).to_le_bytes());
            tail.extend(element);
        }
        let (body, length) =
            binary_request(json!({"inputs": [{"name": "i", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": tail.len()}}]}), &tail);
        let request = parse_request(body, Some(length)).unwrap();
        let elements = request.inputs[0].bytes_elements(|_| unreachable!()).unwrap();
        assert_eq!(elements, [Bytes::from_static(b"abc"), Bytes::new()]);
        let json_body = json!({"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}]});
        let request = parse_request(Bytes::from(json_body.to_string()), None).unwrap();
        let decoded = request.inputs[0].bytes_elements(|t| Ok(Bytes::from(t.to_string()))).unwrap();
        assert_eq!(decoded, [Bytes::from_static(b"aGk=")]);
        assert!(split_length_prefixed(&Bytes::from_static(&[5, 0, 0, 0, 1])).is_err());
        assert!(split_length_prefixed(&Bytes::from_static(&[5, 0])).is_err());
    }

    #[test]
    fn responses_put_binary_outputs_after_the_json() {
        let scores = OutputTensor { name: "scores".into(), shape: vec![1, 2], data: OutputData::Fp32(vec![0.25, 0.75]) };
        let labels = OutputTensor { name: "labels".into(), shape: vec![1], data: OutputData::Bytes(vec!["cat".into()]) };
        let (body, length) = encode_response(Map::new(), &[(scores.clone(), true), (labels.clone(), false)]);
        let length = length.unwrap();
        let head: Value = serde_json::from_slice(&body[..length]).unwrap();
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(head["outputs"][1]["data"], json!(["cat"]));
        assert_eq!(&body[length..], [0.25f32.to_le_bytes(), 0.75f32.to_le_bytes()].concat());
        let (plain, none) = encode_response(Map::new(), &[(labels, false)]);
        assert!(none.is_none());
        assert!(serde_json::from_slice::<Value>(&plain).is_ok());
        let binary_bytes = OutputData::Bytes(vec!["ab".into()]).to_binary();
        assert_eq!(binary_bytes, [2, 0, 0, 0, b'a', b'b']);
    }
}
