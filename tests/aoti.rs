//! AOTInductor packages (`format = "aoti"`) through the real binary: each test model's package
//! (`models/export.py` twins, compiled for this machine by `models/aoti.py`) is served as
//! version 2 beside its TorchScript file as version 1, so the two answer the same request in
//! the same server, on every protocol.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use common::{client, jpeg, test_models, Server};
use reqwest::blocking::multipart;
use serde_json::{json, Value};

const CLASSIFIER: &str = "resnet18";
const BOXES_SCORES: &str = "tiny_ssd";
/// Fully convolutional: the package takes any multiple of 32 up to 256 on each side.
const PROBABILITY_MAP: &str = "tiny_text_map";

fn twins() -> PathBuf {
    let dir = test_models().join("aoti");
    assert!(dir.is_dir(), "{} is missing: run `make test-models`", dir.display());
    dir
}

fn link(from: &Path, to: &Path) {
    std::os::unix::fs::symlink(from, to).unwrap_or_else(|e| panic!("{} -> {}: {e}", to.display(), from.display()));
}

/// Version 1 (TorchScript) and version 2 (AOTInductor) of each test model.
fn server() -> &'static Server {
    static SERVER: OnceLock<(Server, tempfile::TempDir)> = OnceLock::new();
    &SERVER
        .get_or_init(|| {
            let repo = tempfile::tempdir().unwrap();
            for name in [CLASSIFIER, BOXES_SCORES, PROBABILITY_MAP] {
                std::fs::create_dir(repo.path().join(name)).unwrap();
                link(&test_models().join(name), &repo.path().join(name).join("1"));
                link(&twins().join(name), &repo.path().join(name).join("2"));
            }
            let server = Server::start(&["--model-repository", repo.path().to_str().unwrap()]);
            let ready = server.wait_until_settled(Duration::from_secs(180));
            assert_eq!(ready.status(), 200, "models did not all load: {}", ready.text().unwrap());
            (server, repo)
        })
        .0
}

fn predict(model: &str, version: &str, query: &str, body: Vec<u8>) -> Value {
    let response = client()
        .post(server().url(&format!("/v1/models/{model}/versions/{version}/predict{query}")))
        .header("content-type", "image/jpeg")
        .body(body)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200, "{model} v{version}");
    let body: Value = response.json().unwrap();
    assert_eq!(body["version"], version);
    body
}

/// The model's own output tensor over V2, for version `version`.
fn raw_logits(model: &str, version: &str, image: &[u8]) -> Vec<f64> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(image);
    let request = json!({
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}],
        "outputs": [{"name": "raw_output"}],
    });
    let response = client()
        .post(server().url(&format!("/v2/models/{model}/versions/{version}/infer")))
        .json(&request)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().unwrap();
    assert_eq!(body["outputs"][0]["name"], "raw_output", "{body}");
    serde_json::from_value(body["outputs"][0]["data"].clone()).unwrap()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn argmax(v: &[f64]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0
}

#[test]
fn the_package_reports_its_format_and_outputs() {
    let detail: Value = client().get(server().url(&format!("/v1/models/{CLASSIFIER}/versions/2"))).send().unwrap().json().unwrap();
    assert_eq!(detail["format"], "aoti", "{detail}");
    assert_eq!(detail["status"], "ready");
    let v1: Value = client().get(server().url(&format!("/v1/models/{CLASSIFIER}/versions/1"))).send().unwrap().json().unwrap();
    assert_eq!(v1["format"], "torchscript");
    // The package's output, as the warm-up saw it, in the V2 metadata.
    let metadata: Value = client().get(server().url(&format!("/v2/models/{CLASSIFIER}/versions/2"))).send().unwrap().json().unwrap();
    assert_eq!(metadata["platform"], "pytorch_aoti");
    let raw = metadata["parameters"]["raw_outputs"].as_array().unwrap().iter().find(|o| o["name"] == "raw_output").cloned();
    assert_eq!(raw.map(|o| o["shape"].clone()), Some(json!([-1, 1000])), "{metadata}");
}

#[test]
fn classifier_logits_match_the_torchscript_twin() {
    for (i, image) in [jpeg(300, 200, 1), jpeg(224, 224, 2), jpeg(640, 480, 3), jpeg(120, 500, 4)].iter().enumerate() {
        let torchscript = raw_logits(CLASSIFIER, "1", image);
        let aoti = raw_logits(CLASSIFIER, "2", image);
        let scale = torchscript.iter().map(|x| x.abs()).fold(0.0, f64::max);
        let diff = max_abs_diff(&torchscript, &aoti);
        assert!(diff <= 1e-3 * scale.max(1.0), "image {i}: logits differ by {diff} (scale {scale})");
        assert_eq!(argmax(&torchscript), argmax(&aoti), "image {i}: top-1 differs");
        // And the post-processed answer: the same top-5, scores within 1e-3.
        let a = predict(CLASSIFIER, "1", "?top_k=5", image.clone());
        let b = predict(CLASSIFIER, "2", "?top_k=5", image.clone());
        let top = |v: &Value| -> Vec<(u64, f64)> {
            v["results"][0]["predictions"].as_array().unwrap().iter().map(|p| (p["index"].as_u64().unwrap(), p["score"].as_f64().unwrap())).collect()
        };
        let (ta, tb) = (top(&a), top(&b));
        assert_eq!(ta[0].0, tb[0].0, "image {i}");
        for ((_, sa), (_, sb)) in ta.iter().zip(&tb) {
            assert!((sa - sb).abs() <= 1e-3, "image {i}: {ta:?} vs {tb:?}");
        }
    }
}

#[test]
fn detector_boxes_match_the_torchscript_twin() {
    for (i, image) in [jpeg(400, 260, 6), jpeg(128, 128, 7), jpeg(90, 300, 8)].iter().enumerate() {
        let query = "?score_threshold=0.05&max_detections=100";
        let a = predict(BOXES_SCORES, "1", query, image.clone());
        let b = predict(BOXES_SCORES, "2", query, image.clone());
        let (da, db) = (a["results"][0]["detections"].as_array().unwrap(), b["results"][0]["detections"].as_array().unwrap());
        assert!(!da.is_empty(), "image {i}: the TorchScript twin found nothing at 0.05");
        assert_eq!(da.len(), db.len(), "image {i}: {a} vs {b}");
        for (x, y) in da.iter().zip(db) {
            assert_eq!(x["index"], y["index"], "image {i}");
            assert!((x["score"].as_f64().unwrap() - y["score"].as_f64().unwrap()).abs() <= 1e-3);
            for corner in ["x1", "y1", "x2", "y2"] {
                let (p, q) = (x["box"][corner].as_f64().unwrap(), y["box"][corner].as_f64().unwrap());
                assert!((p - q).abs() <= 1.0, "image {i}: {corner} {p} vs {q}");
            }
        }
    }
}

fn mask(body: &Value, index: usize) -> image::GrayImage {
    let data = body["results"][index]["mask"]["data"].as_str().unwrap();
    let png = base64::engine::general_purpose::STANDARD.decode(data).unwrap();
    image::load_from_memory(&png).unwrap().to_luma8()
}

#[test]
fn probability_maps_match_at_every_input_size() {
    // Sizes that become different multiples of 32 (the package's height and width are dynamic).
    for (w, h) in [(333, 211), (256, 256), (100, 250), (64, 32)] {
        let image = jpeg(w, h, 9);
        let (a, b) = (predict(PROBABILITY_MAP, "1", "", image.clone()), predict(PROBABILITY_MAP, "2", "", image));
        let (ma, mb) = (mask(&a, 0), mask(&b, 0));
        assert_eq!(ma.dimensions(), (w, h));
        assert_eq!(ma.dimensions(), mb.dimensions());
        let same = ma.pixels().zip(mb.pixels()).filter(|(p, q)| p == q).count();
        let agreement = same as f64 / (w * h) as f64;
        assert!(agreement >= 0.995, "{w}×{h}: masks agree on {:.2} % of pixels", agreement * 100.0);
    }
}

#[test]
fn any_batch_size_gives_each_image_its_own_answer() {
    // The package's batch dimension is dynamic (1..4); five images make a batch of 4 and one of 1.
    let images: Vec<Vec<u8>> = (0..5).map(|i| jpeg(200 + 20 * i, 150, 20 + i as u8)).collect();
    let singles: Vec<Value> = images.iter().map(|img| predict(CLASSIFIER, "2", "?top_k=3", img.clone())["results"][0].clone()).collect();
    for n in 1..=images.len() {
        let mut form = multipart::Form::new();
        for (i, img) in images[..n].iter().enumerate() {
            form = form.part("image", multipart::Part::bytes(img.clone()).file_name(format!("{i}.jpg")).mime_str("image/jpeg").unwrap());
        }
        let response = client()
            .post(server().url(&format!("/v1/models/{CLASSIFIER}/versions/2/predict?top_k=3")))
            .multipart(form)
            .send()
            .unwrap();
        assert_eq!(response.status(), 200);
        let batch_size: usize = response.headers()["x-batch-size"].to_str().unwrap().parse().unwrap();
        // Its own images, and perhaps another test's request batched with them.
        assert!(batch_size >= n, "all {n} images in the worker's batch, got {batch_size}");
        let body: Value = response.json().unwrap();
        for (i, single) in singles[..n].iter().enumerate() {
            let (a, b) = (&single["predictions"], &body["results"][i]["predictions"]);
            for (p, q) in a.as_array().unwrap().iter().zip(b.as_array().unwrap()) {
                assert_eq!(p["index"], q["index"], "batch of {n}, image {i}");
                assert!((p["score"].as_f64().unwrap() - q["score"].as_f64().unwrap()).abs() <= 1e-4);
            }
        }
    }
}

#[test]
fn the_package_serves_v2_and_torchserve_clients() {
    let image = jpeg(320, 240, 11);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&image);
    let request = json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]});
    let response = client().post(server().url(&format!("/v2/models/{BOXES_SCORES}/versions/2/infer"))).json(&request).send().unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().unwrap();
    assert_eq!(body["model_version"], "2");
    let names: Vec<&str> = body["outputs"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"boxes") && names.contains(&"scores"), "{body}");

    let torchserve = client().post(server().url(&format!("/predictions/{CLASSIFIER}/2"))).body(image.clone()).send().unwrap();
    assert_eq!(torchserve.status(), 200);
    let answer: Value = torchserve.json().unwrap();
    let top = answer.as_object().expect("TorchServe's image_classifier answer: label → score");
    assert_eq!(top.len(), 5, "{answer}");
    let v1: Value = client().post(server().url(&format!("/predictions/{CLASSIFIER}/1"))).body(image).send().unwrap().json().unwrap();
    assert_eq!(v1.as_object().unwrap().keys().next(), top.keys().next(), "same top label from both formats");
}

/// A repository of one healthy package and three broken ones, each with its own reason.
#[test]
fn broken_packages_fail_alone_with_the_reason() {
    let repo = tempfile::tempdir().unwrap();
    let package = twins().join(BOXES_SCORES);
    let config = std::fs::read_to_string(package.join("config.toml")).unwrap();
    let add = |name: &str, config: &str, model: Option<&Path>| {
        let dir = repo.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("config.toml"), config).unwrap();
        link(&package.join("labels.txt"), &dir.join("labels.txt"));
        match model {
            Some(file) => link(file, &dir.join("model.pt2")),
            None => std::fs::write(dir.join("model.pt2"), b"this is not a zip archive").unwrap(),
        }
    };
    let compiled = package.join("model.pt2");
    add("healthy", &config, Some(&compiled));
    // Exported for 128 × 128: a 96 × 96 input fails inside the compiled code at warm-up.
    add("wrong_shape", &config.replace("width = 128", "width = 96").replace("height = 128", "height = 96"), Some(&compiled));
    // Exported with batches up to 4.
    add("batch_too_large", &config.replace("max_batch_size = 4", "max_batch_size = 16"), Some(&compiled));
    add("not_a_package", &config, None);

    let server = Server::start(&["--model-repository", repo.path().to_str().unwrap()]);
    let ready = server.wait_until_settled(Duration::from_secs(120));
    assert_eq!(ready.status(), 503, "three models cannot load");
    let status = |name: &str| -> Value { client().get(server.url(&format!("/v1/models/{name}"))).send().unwrap().json().unwrap() };
    assert_eq!(status("healthy")["status"], "ready");
    let reason = |name: &str| {
        let s = status(name);
        assert_eq!(s["status"], "failed", "{name}: {s}");
        s["reason"].as_str().unwrap().to_string()
    };
    let wrong_shape = reason("wrong_shape");
    assert!(wrong_shape.contains("warm-up failed") && wrong_shape.contains("96"), "{wrong_shape}");
    let batch = reason("batch_too_large");
    assert!(batch.contains("batches of up to 4") && batch.contains("16"), "{batch}");
    assert!(reason("not_a_package").contains("not a readable AOTInductor package"));
    // The process is still serving: the healthy package answers.
    let response = client()
        .post(server.url("/v1/models/healthy/predict"))
        .header("content-type", "image/jpeg")
        .body(jpeg(128, 128, 5))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// An INT8 version that `make models` did not install (its gate failed: models/aoti.py writes
/// `not-installed.txt` and no model.pt2) is listed with the reason, answers 404, holds neither
/// readiness nor the default back; a package whose recorded precision is not its config's fails.
#[test]
fn an_int8_version_below_its_gate_is_listed_not_served() {
    let repo = tempfile::tempdir().unwrap();
    let package = twins().join(CLASSIFIER);
    let config = std::fs::read_to_string(package.join("config.toml")).unwrap();
    let int8 = format!("{config}\n[compile]\nprecision = \"int8\"\ntwin = \"1\"\n");
    let add = |name: &str, version: &str, config: &str, model: bool| {
        let dir = repo.path().join(name).join(version);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.toml"), config).unwrap();
        link(&package.join("labels.txt"), &dir.join("labels.txt"));
        if model {
            link(&package.join("model.pt2"), &dir.join("model.pt2"));
        }
        dir
    };
    add(CLASSIFIER, "1", &config, true);
    let refused = add(CLASSIFIER, "2", &int8, false);
    std::fs::write(refused.join("not-installed.txt"), "INT8 variant failed its gate on this machine: top-1 agreement 93.9 %\n").unwrap();
    // An FP32 package in a folder whose config says INT8.
    add("mislabelled", "1", &int8.replace("twin = \"1\"", "twin = \"0\""), true);

    let token = "admin-token-0123456789";
    let server = Server::start(&["--model-repository", repo.path().to_str().unwrap(), "--admin-token", token]);
    let ready = server.wait_until_settled(Duration::from_secs(120));
    let ready: Value = ready.json().unwrap();
    let not_ready: Vec<&str> = ready["not_ready"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(not_ready, ["mislabelled"], "{ready}");
    let get = |path: &str| -> Value { client().get(server.url(path)).send().unwrap().json().unwrap() };

    let family = get(&format!("/v1/models/{CLASSIFIER}"));
    assert_eq!(family["default_version"], "1", "{family}");
    assert_eq!(family["precision"], "fp32");
    let version = get(&format!("/v1/models/{CLASSIFIER}/versions/2"));
    assert_eq!(version["status"], "not_installed", "{version}");
    assert_eq!(version["precision"], "int8");
    assert!(version["reason"].as_str().unwrap().contains("top-1 agreement 93.9 %"), "{version}");
    let mislabelled = get("/v1/models/mislabelled");
    assert_eq!(mislabelled["status"], "failed");
    assert!(mislabelled["reason"].as_str().unwrap().contains("computes in fp32"), "{mislabelled}");

    let post = |path: &str| {
        let response = client().post(server.url(path)).header("content-type", "image/jpeg").body(jpeg(96, 96, 3)).send().unwrap();
        (response.status().as_u16(), response.json::<Value>().unwrap())
    };
    let (status, body) = post(&format!("/v1/models/{CLASSIFIER}/versions/2/predict"));
    assert_eq!(status, 404, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("not installed on this machine"), "{body}");
    let (status, body) = post(&format!("/v1/models/{CLASSIFIER}/predict"));
    assert_eq!((status, body["version"].as_str()), (200, Some("1")), "{body}");
    let v2 = |path: &str| client().get(server.url(path)).send().unwrap().status().as_u16();
    assert_eq!(v2(&format!("/v2/models/{CLASSIFIER}/versions/1/ready")), 200);
    assert_ne!(v2(&format!("/v2/models/{CLASSIFIER}/versions/2/ready")), 200);
    let metadata = get(&format!("/v2/models/{CLASSIFIER}/versions/1"));
    assert_eq!(metadata["parameters"]["precision"], "fp32", "{metadata}");

    // A reload through the management API keeps the version listed and the others serving.
    let reload = client().post(server.url(&format!("/v2/repository/models/{CLASSIFIER}/load"))).bearer_auth(token).send().unwrap();
    assert_eq!(reload.status(), 200, "{}", reload.text().unwrap());
    assert_eq!(get(&format!("/v1/models/{CLASSIFIER}/versions/2"))["status"], "not_installed");
}
