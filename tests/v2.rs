//! The Open Inference Protocol (V2) over REST against the real binary: metadata, readiness,
//! BYTES, UINT8 and FP32 inputs, the classification extension, detection tensors, errors.
//! (Binary tensors and tritonclient: tests/python/test_v2_tritonclient.py.)

mod common;

use std::sync::OnceLock;

use base64::Engine as _;
use common::{client, jpeg, predict_raw, Server};
use serde_json::{json, Value};

const CLASSIFIER: &str = "resnet18";
const BOXES_SCORES: &str = "tiny_ssd";

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    Server::shared(&SERVER, &["resnet18", "tiny_ssd"])
}

fn v2_infer(model: &str, request: Value) -> (u16, Value) {
    let response = client().post(server().url(&format!("/v2/models/{model}/infer"))).json(&request).send().unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap())
}

#[test]
fn open_inference_protocol_v2_answers_like_v1() {
    let s = server();
    let meta: Value = client().get(s.url("/v2")).send().unwrap().json().unwrap();
    assert_eq!(meta["name"], "visionserve");
    assert_eq!(client().get(s.url("/v2/health/live")).send().unwrap().status(), 200);
    assert_eq!(client().get(s.url("/v2/health/ready")).send().unwrap().status(), 200);
    assert_eq!(client().get(s.url(&format!("/v2/models/{CLASSIFIER}/ready"))).send().unwrap().status(), 200);
    assert_eq!(client().get(s.url(&format!("/v2/models/{CLASSIFIER}/versions/1/ready"))).send().unwrap().status(), 200);
    let model: Value = client().get(s.url(&format!("/v2/models/{CLASSIFIER}"))).send().unwrap().json().unwrap();
    // Pixels at the model's size, as Triton's image clients make them; BYTES is accepted too.
    assert_eq!(model["inputs"][0]["datatype"], "UINT8");
    assert_eq!(model["inputs"][0]["shape"], json!([-1, 224, 224, 3]));
    assert_eq!(model["parameters"]["also_accepts"][0]["datatype"], "BYTES");
    assert_eq!(model["outputs"][0]["shape"], json!([-1, 1000]));

    // BYTES: a base64 JPEG, the same answer as /v1.
    let image = jpeg(320, 240, 9);
    let v1 = predict_raw(server(), CLASSIFIER, "", image.clone(), "image/jpeg").1;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&image);
    let (status, body) = v2_infer(CLASSIFIER, json!({"id": "42", "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "42");
    assert_eq!(body["outputs"][0]["shape"], json!([1, 1000]));
    let scores: Vec<f64> = serde_json::from_value(body["outputs"][0]["data"].clone()).unwrap();
    let top = &v1["results"][0]["predictions"][0];
    let index = top["index"].as_u64().unwrap() as usize;
    assert!((scores[index] - top["score"].as_f64().unwrap()).abs() < 1e-5);

    // The classification extension.
    let (status, body) = v2_infer(CLASSIFIER, json!({
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}],
        "outputs": [{"name": "scores", "parameters": {"classification": 3}}]}));
    assert_eq!(status, 200, "{body}");
    let first = body["outputs"][0]["data"][0].as_str().unwrap();
    assert!(first.ends_with(&format!(":{index}:{}", top["label"].as_str().unwrap())), "{first}");
    assert_eq!(body["outputs"][0]["shape"], json!([1, 3]));

    // UINT8 pixels go through the same preprocessing as an encoded image.
    let decoded = image::load_from_memory(&image).unwrap().to_rgb8();
    let pixels: Vec<u8> = decoded.as_raw().clone();
    let (status, body) = v2_infer(CLASSIFIER, json!({"inputs": [{"name": "pixels", "shape": [1, 240, 320, 3], "datatype": "UINT8", "data": pixels}]}));
    assert_eq!(status, 200, "{body}");
    let uint8_scores: Vec<f64> = serde_json::from_value(body["outputs"][0]["data"].clone()).unwrap();
    assert!((uint8_scores[index] - scores[index]).abs() < 1e-5);

    // FP32 of the wrong size is refused; detection answers padded box tensors.
    let (status, body) = v2_infer(CLASSIFIER, json!({"inputs": [{"name": "x", "shape": [1, 3, 2, 2], "datatype": "FP32", "data": vec![0.0f32; 12]}]}));
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("224"), "{body}");
    let (status, body) = v2_infer(BOXES_SCORES, json!({"parameters": {"score_threshold": 0.0},
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]}));
    assert_eq!(status, 200, "{body}");
    let count = body["outputs"][3]["data"][0].as_i64().unwrap();
    assert!(count > 0);
    assert_eq!(body["outputs"][0]["shape"], json!([1, count, 4]));

    let (status, body) = v2_infer("ghost", json!({"inputs": []}));
    assert_eq!(status, 404);
    assert!(body["error"].as_str().is_some(), "{body}");
    let (status, _) = v2_infer(CLASSIFIER, json!({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [b64]}]}));
    assert_eq!(status, 400);
}

fn success_count(model: &str) -> (u64, u64, u64) {
    let stats: Value = client().get(server().url(&format!("/v2/models/{model}/stats"))).send().unwrap().json().unwrap();
    let row = &stats["model_stats"][0];
    let n = |v: &Value| v.as_u64().unwrap();
    (n(&row["inference_stats"]["success"]["count"]), n(&row["inference_count"]), n(&row["execution_count"]))
}

#[test]
fn kserves_sdk_fields_are_ignored_and_each_request_is_counted_in_the_statistics() {
    let b64 = base64::engine::general_purpose::STANDARD.encode(jpeg(96, 64, 4));
    let before = success_count(CLASSIFIER);
    // What KServe's InferenceRESTClient sends: model_name and model_version at the top.
    let (status, body) = v2_infer(CLASSIFIER, json!({
        "model_name": CLASSIFIER, "model_version": "1", "id": "sdk",
        "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [b64, b64], "parameters": {}}]}));
    assert_eq!(status, 200, "{body}");
    let after = success_count(CLASSIFIER);
    // Other tests share this server, so at least ours is counted.
    assert!(after.0 > before.0, "success count {before:?} → {after:?}");
    assert!(after.1 >= before.1 + 2, "two images inferred: {before:?} → {after:?}");
    assert!(after.2 > before.2, "at least one forward: {before:?} → {after:?}");
    let stats: Value = client().get(server().url(&format!("/v2/models/{CLASSIFIER}/stats"))).send().unwrap().json().unwrap();
    let inference = &stats["model_stats"][0]["inference_stats"];
    assert!(inference["compute_infer"]["ns"].as_u64().unwrap() > 0);
    assert!(inference["success"]["ns"].as_u64().unwrap() >= inference["compute_infer"]["ns"].as_u64().unwrap());
    assert!(stats["model_stats"][0]["last_inference"].as_u64().unwrap() > 1_700_000_000_000);

    // Per batch size, the forwards that ran; the host memory loading took.
    let row = &stats["model_stats"][0];
    let batches = row["batch_stats"].as_array().unwrap();
    assert!(!batches.is_empty(), "{row}");
    for batch in batches {
        assert!(batch["batch_size"].as_u64().unwrap() >= 1);
        assert!(batch["compute_infer"]["ns"].as_u64().unwrap() > 0, "{batch}");
        assert_eq!(batch["compute_input"]["count"], batch["compute_infer"]["count"]);
    }
    assert_eq!(row["memory_usage"][0]["type"], "CPU");
    assert!(row["memory_usage"][0]["byte_size"].as_u64().unwrap() > 1_000_000, "{row}");

    // A request refused after its version was found is one of its failures.
    let fails = |stats: &Value| stats["model_stats"][0]["inference_stats"]["fail"]["count"].as_u64().unwrap();
    let (status, _) = v2_infer(CLASSIFIER, json!({"inputs": [{"name": "image", "shape": [1, 2, 2, 4], "datatype": "UINT8", "data": vec![0u8; 16]}]}));
    assert_eq!(status, 400);
    let later: Value = client().get(server().url(&format!("/v2/models/{CLASSIFIER}/stats"))).send().unwrap().json().unwrap();
    assert!(fails(&later) > fails(&stats), "{later}");

    let config: Value = client().get(server().url(&format!("/v2/models/{CLASSIFIER}/config"))).send().unwrap().json().unwrap();
    assert_eq!(config["output"][0], json!({"name": "scores", "data_type": "TYPE_FP32", "dims": [1000], "label_filename": "labels.txt"}));
    assert!(config["dynamic_batching"]["preferred_batch_size"][0].as_i64().unwrap() >= 1);
    assert_eq!(config["backend"], "pytorch");
}
