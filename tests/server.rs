//! Integration tests: the real binary on an ephemeral port, serving the random-init test
//! models (every task and output convention) over HTTP.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use common::{encode, synthetic_image, test_models, Server};
use image::ImageFormat;
use reqwest::blocking::{multipart, Client};
use serde_json::{json, Value};

const CLASSIFIER: &str = "resnet18";
const SEGMENTER: &str = "lraspp_mobilenet_v3_large";
const RCNN: &str = "fasterrcnn_mobilenet_v3_large_320_fpn";
const YOLO: &str = "yolo_tiny";
const PROBABILITY_MAP: &str = "tiny_text_map";
const BOXES_SCORES: &str = "tiny_ssd";
/// About 0.1 s a forward pass, raises on a nearly white image; batch 4, 150 ms delay, queue 2.
const FAULT_PROBE: &str = "fault_probe";

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let repo = test_models();
        let server = Server::start(&["--model-repository", repo.to_str().unwrap()]);
        let ready = server.wait_until_settled(Duration::from_secs(180));
        assert_eq!(ready.status(), 200, "test models did not all load: {}", ready.text().unwrap());
        server
    })
}

fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

fn jpeg(width: u32, height: u32, seed: u8) -> Vec<u8> {
    encode(&synthetic_image(width, height, seed), ImageFormat::Jpeg)
}

fn predict_raw(model: &str, query: &str, body: Vec<u8>, content_type: &str) -> (u16, Value) {
    let response = client()
        .post(server().url(&format!("/v1/models/{model}/predict{query}")))
        .header("content-type", content_type)
        .body(body)
        .send()
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap())
}

fn assert_error(status: u16, body: &Value, expected_status: u16, code: &str) {
    assert_eq!(status, expected_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

#[test]
fn health_and_model_metadata() {
    let s = server();
    let live: Value = client().get(s.url("/health/live")).send().unwrap().json().unwrap();
    assert_eq!(live["status"], "live");
    let ready = client().get(s.url("/health/ready")).send().unwrap();
    assert_eq!(ready.status(), 200);

    let list: Value = client().get(s.url("/v1/models")).send().unwrap().json().unwrap();
    let models = list["models"].as_array().unwrap();
    assert_eq!(models.len(), 8, "{list}");
    for m in models {
        assert_eq!(m["status"], "ready");
        assert!(m["provenance"]["weights"].as_str().unwrap().starts_with("random-init"), "{m}");
        assert!(m["input"]["width"].as_u64().unwrap() > 0);
    }
    let detail: Value = client().get(s.url(&format!("/v1/models/{CLASSIFIER}"))).send().unwrap().json().unwrap();
    assert_eq!(detail["task"], "classification");
    assert_eq!(detail["labels_count"], 1000);
    // resnet18 has 11,689,512 parameters.
    assert_eq!(detail["parameter_count"], 11_689_512);
    assert!(detail["file_size_bytes"].as_u64().unwrap() > 40_000_000);
    assert_eq!(detail["batching"]["max_batch_size"], 4);
    assert_eq!(detail["runtime"]["workers"], 1);
}

#[test]
fn classification_answers_top_k_in_order_with_timing_headers() {
    let response = client()
        .post(server().url(&format!("/v1/models/{CLASSIFIER}/predict")))
        .header("content-type", "image/jpeg")
        .body(jpeg(320, 240, 1))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    for header in ["x-queue-time-ms", "x-inference-time-ms", "x-request-id"] {
        assert!(response.headers().contains_key(header), "missing {header}");
    }
    let body: Value = response.json().unwrap();
    assert_eq!(body["model"], CLASSIFIER);
    assert_eq!(body["task"], "classification");
    let predictions = body["results"][0]["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 5);
    let scores: Vec<f64> = predictions.iter().map(|p| p["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert!(scores.iter().sum::<f64>() <= 1.0 + 1e-6);
    assert!(predictions[0]["label"].as_str().unwrap().len() > 1);

    let (status, body) = predict_raw(CLASSIFIER, "?top_k=3", jpeg(320, 240, 1), "image/jpeg");
    assert_eq!(status, 200);
    assert_eq!(body["results"][0]["predictions"].as_array().unwrap().len(), 3);
    // Same image, same answer: the top-3 equals the first three of the top-5.
    assert_eq!(body["results"][0]["predictions"][0], predictions[0]);
}

#[test]
fn multipart_and_json_carry_several_images_in_order() {
    let images = [jpeg(300, 200, 2), encode(&synthetic_image(150, 260, 3), ImageFormat::Png)];
    let singles: Vec<Value> = images
        .iter()
        .map(|img| predict_raw(CLASSIFIER, "", img.clone(), "application/octet-stream").1["results"][0].clone())
        .collect();
    assert_ne!(singles[0], singles[1], "the two test images should classify differently");

    let form = multipart::Form::new()
        .part("image", multipart::Part::bytes(images[0].clone()).file_name("a.jpg"))
        .part("image", multipart::Part::bytes(images[1].clone()).file_name("b.png"))
        .text("top_k", "5");
    let response = client()
        .post(server().url(&format!("/v1/models/{CLASSIFIER}/predict")))
        .multipart(form)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().unwrap();
    assert_eq!(body["results"].as_array().unwrap().len(), 2);
    for (got, want) in body["results"].as_array().unwrap().iter().zip(&singles) {
        assert_top_matches(got, want);
    }

    let b64 = base64::engine::general_purpose::STANDARD;
    let json_body = json!({"images": [b64.encode(&images[1]), b64.encode(&images[0])]});
    let response = client()
        .post(server().url(&format!("/v1/models/{CLASSIFIER}/predict")))
        .json(&json_body)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().unwrap();
    assert_top_matches(&body["results"][0], &singles[1]);
    assert_top_matches(&body["results"][1], &singles[0]);
}

/// Same indices, scores equal to float noise (batched and single forwards may differ in the
/// last bits).
fn assert_top_matches(got: &Value, want: &Value) {
    let a = got["predictions"].as_array().unwrap();
    let b = want["predictions"].as_array().unwrap();
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x["index"], y["index"], "{got} vs {want}");
        assert!((x["score"].as_f64().unwrap() - y["score"].as_f64().unwrap()).abs() < 1e-4);
    }
}

fn decode_mask_png(result: &Value) -> image::GrayImage {
    let data = result["mask"]["data"].as_str().unwrap();
    let png = base64::engine::general_purpose::STANDARD.decode(data).unwrap();
    image::load_from_memory(&png).unwrap().to_luma8()
}

#[test]
fn segmentation_masks_cover_the_original_image() {
    let (status, body) = predict_raw(SEGMENTER, "", jpeg(333, 211, 4), "image/jpeg");
    assert_eq!(status, 200, "{body}");
    let result = &body["results"][0];
    assert_eq!((result["width"].as_u64(), result["height"].as_u64()), (Some(333), Some(211)));
    let mask = decode_mask_png(result);
    assert_eq!(mask.dimensions(), (333, 211));
    let classes = result["classes"].as_array().unwrap();
    let total: u64 = classes.iter().map(|c| c["pixels"].as_u64().unwrap()).sum();
    assert_eq!(total, 333 * 211);
    // The summary counts exactly the mask's pixels.
    for class in classes {
        let index = class["index"].as_u64().unwrap() as u8;
        let count = mask.pixels().filter(|p| p.0[0] == index).count() as u64;
        assert_eq!(count, class["pixels"].as_u64().unwrap());
        assert!(index < 21);
    }

    let (status, body) = predict_raw(SEGMENTER, "?mask_format=rle", jpeg(333, 211, 4), "image/jpeg");
    assert_eq!(status, 200);
    let mask = &body["results"][0]["mask"];
    assert_eq!(mask["format"], "rle");
    assert_eq!(mask["size"], json!([211, 333]));
    assert_eq!(mask["classes"].as_array().unwrap().len(), classes.len());

    let (status, body) = predict_raw(SEGMENTER, "?mask_format=none", jpeg(333, 211, 4), "image/jpeg");
    assert_eq!(status, 200);
    assert!(body["results"][0].get("mask").is_none());
}

#[test]
fn probability_map_segmentation_has_two_classes_at_original_size() {
    let (status, body) = predict_raw(PROBABILITY_MAP, "", jpeg(200, 90, 5), "image/jpeg");
    assert_eq!(status, 200, "{body}");
    let mask = decode_mask_png(&body["results"][0]);
    assert_eq!(mask.dimensions(), (200, 90));
    assert!(mask.pixels().all(|p| p.0[0] <= 1));
}

fn check_detections(body: &Value, width: f64, height: f64, min_score: f64, max: usize) -> usize {
    let detections = body["results"][0]["detections"].as_array().unwrap();
    assert!(detections.len() <= max);
    let mut previous = f64::INFINITY;
    for d in detections {
        let score = d["score"].as_f64().unwrap();
        assert!(score >= min_score && score <= previous + 1e-9, "{d}");
        previous = score;
        let b = &d["box"];
        let (x1, y1, x2, y2) = (b["x1"].as_f64().unwrap(), b["y1"].as_f64().unwrap(), b["x2"].as_f64().unwrap(), b["y2"].as_f64().unwrap());
        assert!(0.0 <= x1 && x1 <= x2 && x2 <= width, "{d}");
        assert!(0.0 <= y1 && y1 <= y2 && y2 <= height, "{d}");
        assert!(d["label"].as_str().is_some());
    }
    detections.len()
}

#[test]
fn every_detection_convention_answers_boxes_in_original_pixels() {
    for model in [YOLO, BOXES_SCORES, RCNN] {
        let (status, body) =
            predict_raw(model, "?score_threshold=0.0&max_detections=50", jpeg(400, 260, 6), "image/jpeg");
        assert_eq!(status, 200, "{model}: {body}");
        let count = check_detections(&body, 400.0, 260.0, 0.0, 50);
        assert!(count > 0, "{model} found nothing at threshold 0");
        let (status, body) = predict_raw(model, "?score_threshold=0.99", jpeg(400, 260, 6), "image/jpeg");
        assert_eq!(status, 200);
        check_detections(&body, 400.0, 260.0, 0.99, 100);
    }
}

#[test]
fn bad_requests_get_the_right_status_and_one_json_shape() {
    let (s, b) = predict_raw("no_such_model", "", jpeg(10, 10, 0), "image/jpeg");
    assert_error(s, &b, 404, "model_not_found");
    let (s, b) = predict_raw(CLASSIFIER, "", b"hello".to_vec(), "text/plain");
    assert_error(s, &b, 415, "unsupported_media_type");
    let (s, b) = predict_raw(CLASSIFIER, "", b"\xff\xd8\xff garbage".to_vec(), "image/jpeg");
    assert_error(s, &b, 400, "invalid_image");
    let (s, b) = predict_raw(CLASSIFIER, "", Vec::new(), "image/jpeg");
    assert_error(s, &b, 400, "invalid_image");
    let (s, b) = predict_raw(CLASSIFIER, "?top_k=0", jpeg(10, 10, 0), "image/jpeg");
    assert_error(s, &b, 422, "invalid_parameter");
    let (s, b) = predict_raw(CLASSIFIER, "?top_k=many", jpeg(10, 10, 0), "image/jpeg");
    assert_error(s, &b, 422, "invalid_parameter");
    let (s, b) = predict_raw(CLASSIFIER, "?score_threshold=0.5", jpeg(10, 10, 0), "image/jpeg");
    assert_error(s, &b, 422, "invalid_parameter");
    let (s, b) = predict_raw(YOLO, "?iou_threshold=2", jpeg(10, 10, 0), "image/jpeg");
    assert_error(s, &b, 422, "invalid_parameter");
    let (s, b) = predict_raw(SEGMENTER, "?mask_format=gif", jpeg(10, 10, 0), "image/jpeg");
    assert_error(s, &b, 422, "invalid_parameter");
    let (s, b) = predict_raw(CLASSIFIER, "", b"{\"images\": [\"%%%\"]}".to_vec(), "application/json");
    assert_error(s, &b, 400, "bad_request");
    let (s, b) = predict_raw(CLASSIFIER, "", b"{not json".to_vec(), "application/json");
    assert_error(s, &b, 400, "bad_request");
    // Over the default 20 MiB body limit.
    let (s, b) = predict_raw(CLASSIFIER, "", vec![0u8; 21 * 1024 * 1024], "image/jpeg");
    assert_error(s, &b, 413, "payload_too_large");
    let response = client().get(server().url("/v1/nowhere")).send().unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().unwrap();
    assert_eq!(body["error"]["code"], "not_found");
}

#[test]
fn broken_model_folders_are_reported_and_the_others_serve() {
    let repo = tempfile::tempdir().unwrap();
    let good = repo.path().join("good");
    std::fs::create_dir(&good).unwrap();
    let source = test_models().join(BOXES_SCORES);
    for file in ["config.toml", "labels.txt", "model.pt"] {
        std::fs::copy(source.join(file), good.join(file)).unwrap();
    }
    let no_file = repo.path().join("missing_file");
    std::fs::create_dir(&no_file).unwrap();
    std::fs::copy(source.join("config.toml"), no_file.join("config.toml")).unwrap();
    std::fs::copy(source.join("labels.txt"), no_file.join("labels.txt")).unwrap();
    let bad_config = repo.path().join("bad_config");
    std::fs::create_dir(&bad_config).unwrap();
    std::fs::write(bad_config.join("config.toml"), "task = \"juggling\"\n").unwrap();
    let not_torchscript = repo.path().join("not_torchscript");
    std::fs::create_dir(&not_torchscript).unwrap();
    std::fs::copy(source.join("config.toml"), not_torchscript.join("config.toml")).unwrap();
    std::fs::copy(source.join("labels.txt"), not_torchscript.join("labels.txt")).unwrap();
    std::fs::write(not_torchscript.join("model.pt"), b"this is not a zip archive").unwrap();

    let server = Server::start(&["--model-repository", repo.path().to_str().unwrap()]);
    let ready = server.wait_until_settled(Duration::from_secs(60));
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().unwrap();
    assert_eq!(body["ready"], json!(["good"]));
    let failed: Vec<&str> = body["not_ready"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(failed, ["bad_config", "missing_file", "not_torchscript"]);
    for m in body["not_ready"].as_array().unwrap() {
        assert!(!m["reason"].as_str().unwrap().is_empty(), "{m}");
    }
    let reason = |name: &str| {
        body["not_ready"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap()["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(reason("bad_config").contains("juggling"), "{}", reason("bad_config"));
    assert!(reason("missing_file").contains("model.pt"));
    assert!(reason("not_torchscript").contains("TorchScript"));

    let response = client()
        .post(server.url("/v1/models/good/predict"))
        .header("content-type", "image/jpeg")
        .body(jpeg(64, 64, 1))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = client()
        .post(server.url("/v1/models/missing_file/predict"))
        .header("content-type", "image/jpeg")
        .body(jpeg(64, 64, 1))
        .send()
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().unwrap();
    assert_eq!(body["error"]["code"], "model_not_ready");
}

#[test]
fn rendered_overlays_are_pngs_of_the_input_size() {
    for (model, query, accept) in [
        (CLASSIFIER, "?render=png", "application/json"),
        (SEGMENTER, "", "image/png"),
        (YOLO, "?render=png&score_threshold=0.3", "*/*"),
        (RCNN, "?render=png&score_threshold=0", "*/*"),
    ] {
        let response = client()
            .post(server().url(&format!("/v1/models/{model}/predict{query}")))
            .header("content-type", "image/jpeg")
            .header("accept", accept)
            .body(jpeg(300, 180, 7))
            .send()
            .unwrap();
        assert_eq!(response.status(), 200, "{model}");
        assert_eq!(response.headers()["content-type"], "image/png", "{model}");
        assert!(response.headers().contains_key("x-inference-time-ms"));
        let png = image::load_from_memory(&response.bytes().unwrap()).unwrap().to_rgb8();
        assert_eq!(png.dimensions(), (300, 180), "{model}");
        // Something was drawn: the overlay differs from the decoded input.
        let input = image::load_from_memory(&jpeg(300, 180, 7)).unwrap().to_rgb8();
        let changed = png.pixels().zip(input.pixels()).filter(|(a, b)| a != b).count();
        assert!(changed > 300, "{model}: only {changed} pixels changed");
    }
    let form = multipart::Form::new()
        .part("image", multipart::Part::bytes(jpeg(40, 40, 1)).file_name("a.jpg"))
        .part("image", multipart::Part::bytes(jpeg(40, 40, 2)).file_name("b.jpg"));
    let response = client()
        .post(server().url(&format!("/v1/models/{CLASSIFIER}/predict?render=png")))
        .multipart(form)
        .send()
        .unwrap();
    assert_eq!(response.status(), 422);
    let (s, b) = predict_raw(CLASSIFIER, "?render=gif", jpeg(40, 40, 1), "image/jpeg");
    assert_error(s, &b, 422, "invalid_parameter");
}

#[test]
fn the_web_page_and_its_samples_are_served_from_the_binary() {
    let page = client().get(server().url("/")).send().unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = page.text().unwrap();
    assert!(html.contains("/v1/models") && !html.contains("https://"), "the page must not load from a CDN");
    let samples: Value = client().get(server().url("/samples")).send().unwrap().json().unwrap();
    for sample in samples["samples"].as_array().unwrap() {
        let bytes = client().get(server().url(sample["url"].as_str().unwrap())).send().unwrap().bytes().unwrap();
        assert!(image::load_from_memory(&bytes).is_ok(), "{sample}");
    }
    let missing = client().get(server().url("/samples/nope.jpg")).send().unwrap();
    assert_eq!(missing.status(), 404);
}

fn png_of(value: u8) -> Vec<u8> {
    encode(&image::RgbImage::from_pixel(16, 16, image::Rgb([value; 3])), ImageFormat::Png)
}

fn probe(body: Vec<u8>, timeout: Option<Duration>, request_timeout_ms: Option<u64>) -> reqwest::Result<reqwest::blocking::Response> {
    let mut builder = Client::builder();
    if let Some(t) = timeout {
        builder = builder.timeout(t);
    }
    let mut request = builder
        .build()
        .unwrap()
        .post(server().url(&format!("/v1/models/{FAULT_PROBE}/predict")))
        .header("content-type", "image/png")
        .body(body);
    if let Some(ms) = request_timeout_ms {
        request = request.header("x-request-timeout-ms", ms.to_string());
    }
    request.send()
}

fn metric_value(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The queue, batcher and deadlines, on one model, in one sequence (the scenarios would
/// disturb each other in parallel).
#[test]
fn batcher_isolates_failures_and_enforces_deadlines_queue_limits_and_disconnects() {
    let s = server();
    // 1. A bad image and a good one in the same batch: only the bad one fails.
    let bright = std::thread::spawn(|| probe(png_of(255), None, None).unwrap());
    std::thread::sleep(Duration::from_millis(30));
    let dark = probe(png_of(20), None, None).unwrap();
    let bright = bright.join().unwrap();
    assert_eq!(dark.status(), 200);
    assert_eq!(dark.headers()["x-batch-size"], "2", "the two requests should share a batch");
    assert_eq!(bright.status(), 500);
    let body: Value = bright.json().unwrap();
    assert_eq!(body["error"]["code"], "model_failed");
    assert!(!body["error"]["message"].as_str().unwrap().contains("TorchScript"), "internals leak: {body}");
    // 2. The same worker keeps serving.
    assert_eq!(probe(png_of(40), None, None).unwrap().status(), 200);

    // 3. A deadline shorter than the work: 504, and the job is dropped, not computed.
    let started = std::time::Instant::now();
    let late = probe(png_of(30), None, Some(60)).unwrap();
    assert_eq!(late.status(), 504);
    let body: Value = late.json().unwrap();
    assert_eq!(body["error"]["code"], "deadline_exceeded");
    assert!(started.elapsed() < Duration::from_millis(1000));
    let invalid = client()
        .post(s.url(&format!("/v1/models/{FAULT_PROBE}/predict")))
        .header("content-type", "image/png")
        .header("x-request-timeout-ms", "soon")
        .body(png_of(30))
        .send()
        .unwrap();
    assert_eq!(invalid.status(), 422);

    // 4. Over capacity: refused at once with 503 and Retry-After; the rest are answered.
    let burst: Vec<_> = (0..12)
        .map(|i| {
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                let response = probe(png_of(10 + i), None, None).unwrap();
                (response.status().as_u16(), response.headers().get("retry-after").is_some(), started.elapsed())
            })
        })
        .collect();
    let outcomes: Vec<_> = burst.into_iter().map(|t| t.join().unwrap()).collect();
    let refused: Vec<_> = outcomes.iter().filter(|o| o.0 == 503).collect();
    assert!(!refused.is_empty(), "12 requests at once on a queue of 2 must overflow: {outcomes:?}");
    assert!(outcomes.iter().all(|o| o.0 == 200 || o.0 == 503), "{outcomes:?}");
    for (_, retry_after, took) in &refused {
        assert!(retry_after, "503 without Retry-After");
        assert!(*took < Duration::from_millis(250), "a refusal took {took:?}");
    }

    // 5. A client that hangs up while queued is skipped, not computed.
    let metrics = || client().get(s.url("/metrics")).send().unwrap().text().unwrap();
    let skipped_before = metric_value(&metrics(), "visionserve_jobs_skipped_total", &[FAULT_PROBE]);
    let busy: Vec<_> = (0..2).map(|i| std::thread::spawn(move || probe(png_of(50 + i), None, None).unwrap().status())).collect();
    std::thread::sleep(Duration::from_millis(200));
    assert!(probe(png_of(60), Some(Duration::from_millis(60)), None).is_err(), "the client should give up first");
    for b in busy {
        assert_eq!(b.join().unwrap(), 200);
    }
    std::thread::sleep(Duration::from_millis(500));
    let text = metrics();
    let skipped_after = metric_value(&text, "visionserve_jobs_skipped_total", &[FAULT_PROBE]);
    assert!(skipped_after > skipped_before, "no skipped job counted:\n{text}");
}

#[test]
fn metrics_expose_the_documented_names() {
    let (status, _) = predict_raw(CLASSIFIER, "", jpeg(64, 64, 3), "image/jpeg");
    assert_eq!(status, 200);
    let (status, _) = predict_raw(CLASSIFIER, "?top_k=0", jpeg(64, 64, 3), "image/jpeg");
    assert_eq!(status, 422);
    let response = client().get(server().url("/metrics")).send().unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().unwrap();
    for name in [
        "visionserve_requests_total",
        "visionserve_request_duration_seconds_bucket",
        "visionserve_preprocess_duration_seconds_bucket",
        "visionserve_queue_duration_seconds_bucket",
        "visionserve_inference_duration_seconds_bucket",
        "visionserve_postprocess_duration_seconds_bucket",
        "visionserve_batch_size_bucket",
        "visionserve_queue_depth",
        "visionserve_in_flight_requests",
        "visionserve_model_ready",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}");
    }
    assert!(metric_value(&text, "visionserve_requests_total", &["model=\"resnet18\"", "status=\"200\""]) >= 1.0);
    assert!(metric_value(&text, "visionserve_requests_total", &["model=\"resnet18\"", "status=\"422\""]) >= 1.0);
    assert_eq!(metric_value(&text, "visionserve_model_ready", &["model=\"resnet18\""]), 1.0);
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
    assert_eq!(model["inputs"][0]["datatype"], "BYTES");
    assert_eq!(model["outputs"][0]["shape"], json!([-1, 1000]));

    // BYTES: a base64 JPEG, the same answer as /v1.
    let image = jpeg(320, 240, 9);
    let v1 = predict_raw(CLASSIFIER, "", image.clone(), "image/jpeg").1;
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

#[test]
fn api_keys_guard_inference_routes_and_cors_is_opt_in() {
    let keys_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(keys_file.path(), "# rotated monthly\nfrom-file\n").unwrap();
    let repo = test_models();
    let guarded = Server::start(&[
        "--model-repository", repo.to_str().unwrap(), "--models", BOXES_SCORES,
        "--api-keys", "alpha,beta", "--api-keys-file", keys_file.path().to_str().unwrap(),
        "--cors-origins", "https://app.example",
    ]);
    assert_eq!(guarded.wait_until_settled(Duration::from_secs(60)).status(), 200);
    let post = |path: &str, key: Option<&str>| {
        let mut request = client().post(guarded.url(path)).header("content-type", "image/jpeg").body(jpeg(64, 64, 1));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send().unwrap()
    };
    let predict = format!("/v1/models/{BOXES_SCORES}/predict");
    let missing = post(&predict, None);
    assert_eq!(missing.status(), 401);
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    assert_eq!(post(&predict, Some("gamma")).status(), 403);
    assert_eq!(post(&predict, Some("beta")).status(), 200);
    assert_eq!(post(&predict, Some("from-file")).status(), 200);
    assert_eq!(post(&format!("/predictions/{BOXES_SCORES}"), None).status(), 401);
    assert_eq!(post(&format!("/v2/models/{BOXES_SCORES}/infer"), None).status(), 401);
    // Health, metadata and metrics stay open.
    assert_eq!(client().get(guarded.url("/health/ready")).send().unwrap().status(), 200);
    assert_eq!(client().get(guarded.url("/v1/models")).send().unwrap().status(), 200);
    // CORS answers the configured origin only.
    let preflight = client()
        .request(reqwest::Method::OPTIONS, guarded.url(&predict))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .send()
        .unwrap();
    assert_eq!(preflight.headers()["access-control-allow-origin"], "https://app.example");
    let other = client().get(guarded.url("/v1/models")).header("origin", "https://evil.example").send().unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    // The shared server has no CORS configured: no CORS headers at all.
    let plain = client().get(server().url("/v1/models")).header("origin", "https://app.example").send().unwrap();
    assert!(plain.headers().get("access-control-allow-origin").is_none());
}
