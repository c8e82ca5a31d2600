//! /v1 against the real binary on an ephemeral port, serving the random-init test models
//! (every task and output convention): metadata, predictions in each task's shape, several
//! images per request, errors, broken model folders, and rendered overlays.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use common::{assert_error, client, encode, jpeg, predict_raw, synthetic_image, test_models, Server};
use image::{GenericImageView, ImageFormat};
use reqwest::blocking::multipart;
use serde_json::{json, Value};

const CLASSIFIER: &str = "resnet18";
const SEGMENTER: &str = "lraspp_mobilenet_v3_large";
const RCNN: &str = "fasterrcnn_mobilenet_v3_large_320_fpn";
const YOLO: &str = "yolo_tiny";
const PROBABILITY_MAP: &str = "tiny_text_map";
const BOXES_SCORES: &str = "tiny_ssd";
const MASK_RCNN: &str = "mask_rcnn_small";

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    Server::shared(&SERVER, &[])
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
    assert_eq!(models.len(), 9, "{list}");
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
    // No cap configured: the model may use every executor of the pool (one per core).
    assert!(detail["runtime"]["workers"].is_null(), "{detail}");
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(detail["workers"], cores, "{detail}");
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

    let (status, body) = predict_raw(server(), CLASSIFIER, "?top_k=3", jpeg(320, 240, 1), "image/jpeg");
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
        .map(|img| predict_raw(server(), CLASSIFIER, "", img.clone(), "application/octet-stream").1["results"][0].clone())
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
    let (status, body) = predict_raw(server(), SEGMENTER, "", jpeg(333, 211, 4), "image/jpeg");
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

    let (status, body) = predict_raw(server(), SEGMENTER, "?mask_format=rle", jpeg(333, 211, 4), "image/jpeg");
    assert_eq!(status, 200);
    let mask = &body["results"][0]["mask"];
    assert_eq!(mask["format"], "rle");
    assert_eq!(mask["size"], json!([211, 333]));
    assert_eq!(mask["classes"].as_array().unwrap().len(), classes.len());

    let (status, body) = predict_raw(server(), SEGMENTER, "?mask_format=none", jpeg(333, 211, 4), "image/jpeg");
    assert_eq!(status, 200);
    assert!(body["results"][0].get("mask").is_none());
}

#[test]
fn probability_map_segmentation_has_two_classes_at_original_size() {
    let (status, body) = predict_raw(server(), PROBABILITY_MAP, "", jpeg(200, 90, 5), "image/jpeg");
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
            predict_raw(server(), model, "?score_threshold=0.0&max_detections=50", jpeg(400, 260, 6), "image/jpeg");
        assert_eq!(status, 200, "{model}: {body}");
        let count = check_detections(&body, 400.0, 260.0, 0.0, 50);
        assert!(count > 0, "{model} found nothing at threshold 0");
        let (status, body) = predict_raw(server(), model, "?score_threshold=0.99", jpeg(400, 260, 6), "image/jpeg");
        assert_eq!(status, 200);
        check_detections(&body, 400.0, 260.0, 0.99, 100);
    }
}

#[test]
fn instance_masks_cover_the_original_image_in_every_encoding() {
    let (w, h) = (400u32, 260u32);
    let mut areas = Vec::new();
    for format in ["rle", "png", "polygon", "none"] {
        let query = format!("?score_threshold=0.0&max_detections=5&mask_format={format}");
        let (status, body) = predict_raw(server(), MASK_RCNN, &query, jpeg(w, h, 6), "image/jpeg");
        assert_eq!(status, 200, "{format}: {body}");
        assert_eq!(body["task"], "instance_segmentation");
        assert_eq!(check_detections(&body, f64::from(w), f64::from(h), 0.0, 5), 5, "{format}");
        let detections = body["results"][0]["detections"].as_array().unwrap();
        for d in detections {
            let mask = &d["mask"];
            match format {
                "rle" => {
                    assert_eq!(mask["size"], json!([h, w]));
                    assert!(!mask["counts"].as_str().unwrap().is_empty());
                }
                "png" => {
                    let (left, width) = (mask["left"].as_u64().unwrap(), mask["width"].as_u64().unwrap());
                    let (top, height) = (mask["top"].as_u64().unwrap(), mask["height"].as_u64().unwrap());
                    assert!(left + width <= u64::from(w) && top + height <= u64::from(h), "{mask}");
                    if width > 0 {
                        let png = base64::engine::general_purpose::STANDARD.decode(mask["data"].as_str().unwrap()).unwrap();
                        let region = image::load_from_memory(&png).unwrap().to_luma8();
                        assert_eq!(u64::from(region.width()), width);
                        // The region's set pixels are the instance's area.
                        let set = region.pixels().filter(|p| p.0[0] == 255).count() as u64;
                        assert_eq!(set, d["area"].as_u64().unwrap());
                    }
                }
                "polygon" => assert!(mask["polygons"].as_array().unwrap().iter().all(|p| p.as_array().unwrap().len() >= 3)),
                _ => assert!(mask.is_null()),
            }
        }
        areas.push(detections.iter().map(|d| d["area"].as_u64().unwrap()).collect::<Vec<_>>());
    }
    // Every encoding describes the same masks.
    assert!(areas.windows(2).all(|pair| pair[0] == pair[1]), "{areas:?}");
    let (status, body) = predict_raw(server(), MASK_RCNN, "?mask_format=jpeg", jpeg(40, 40, 1), "image/jpeg");
    assert_error(status, &body, 422, "invalid_parameter");
}

#[test]
fn bad_requests_get_the_right_status_and_one_json_shape() {
    let (s, b) = predict_raw(server(), "no_such_model", "", jpeg(10, 10, 0), "image/jpeg");
    assert_error(s, &b, 404, "model_not_found");
    let (s, b) = predict_raw(server(), CLASSIFIER, "", b"hello".to_vec(), "text/plain");
    assert_error(s, &b, 415, "unsupported_media_type");
    let (s, b) = predict_raw(server(), CLASSIFIER, "", b"\xff\xd8\xff garbage".to_vec(), "image/jpeg");
    assert_error(s, &b, 400, "invalid_image");
    let (s, b) = predict_raw(server(), CLASSIFIER, "", Vec::new(), "image/jpeg");
    assert_error(s, &b, 400, "invalid_image");
    let (s, b) = predict_raw(server(), CLASSIFIER, "?top_k=0", jpeg(10, 10, 0), "image/jpeg");
    assert_error(s, &b, 422, "invalid_parameter");
    let (s, b) = predict_raw(server(), CLASSIFIER, "?top_k=many", jpeg(10, 10, 0), "image/jpeg");
    assert_error(s, &b, 422, "invalid_parameter");
    let (s, b) = predict_raw(server(), CLASSIFIER, "?score_threshold=0.5", jpeg(10, 10, 0), "image/jpeg");
    assert_error(s, &b, 422, "invalid_parameter");
    let (s, b) = predict_raw(server(), YOLO, "?iou_threshold=2", jpeg(10, 10, 0), "image/jpeg");
    assert_error(s, &b, 422, "invalid_parameter");
    let (s, b) = predict_raw(server(), SEGMENTER, "?mask_format=gif", jpeg(10, 10, 0), "image/jpeg");
    assert_error(s, &b, 422, "invalid_parameter");
    let (s, b) = predict_raw(server(), CLASSIFIER, "", b"{\"images\": [\"%%%\"]}".to_vec(), "application/json");
    assert_error(s, &b, 400, "bad_request");
    let (s, b) = predict_raw(server(), CLASSIFIER, "", b"{not json".to_vec(), "application/json");
    assert_error(s, &b, 400, "bad_request");
    // Over the default 20 MiB body limit.
    let (s, b) = predict_raw(server(), CLASSIFIER, "", vec![0u8; 21 * 1024 * 1024], "image/jpeg");
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

    let (status, _) = predict_raw(&server, "good", "", jpeg(64, 64, 1), "image/jpeg");
    assert_eq!(status, 200);
    let (status, body) = predict_raw(&server, "missing_file", "", jpeg(64, 64, 1), "image/jpeg");
    assert_error(status, &body, 503, "model_not_ready");
}

#[test]
fn rendered_overlays_are_pngs_of_the_input_size() {
    for (model, query, accept) in [
        (CLASSIFIER, "?render=png", "application/json"),
        (SEGMENTER, "", "image/png"),
        (YOLO, "?render=png&score_threshold=0.3", "*/*"),
        (RCNN, "?render=png&score_threshold=0", "*/*"),
        (MASK_RCNN, "?render=png&score_threshold=0&max_detections=5", "*/*"),
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
    let (s, b) = predict_raw(server(), CLASSIFIER, "?render=gif", jpeg(40, 40, 1), "image/jpeg");
    assert_error(s, &b, 422, "invalid_parameter");
}

/// A photo far larger than the model needs is decoded at a reduced scale, and every answer is
/// still in the photo's own pixels: the mask covers it, boxes lie within it, an overlay is its
/// size (overlays decode whole).
#[test]
fn a_large_jpeg_is_decoded_scaled_and_answered_in_its_own_pixels() {
    let photo = jpeg(2400, 1800, 8);
    let scaled = || {
        let text = client().get(server().url("/metrics")).send().unwrap().text().unwrap();
        common::metric_value(&text, "visionserve_scaled_decodes_total", &[])
    };
    let before = scaled();
    // lraspp stretches to 256 × 256: twice that fits in 1/4 of the photo (600 × 450).
    let (status, body) = predict_raw(server(), SEGMENTER, "", photo.clone(), "image/jpeg");
    assert_eq!(status, 200, "{body}");
    assert_eq!(decode_mask_png(&body["results"][0]).dimensions(), (2400, 1800));
    assert!(scaled() > before, "the segmenter's input was not decoded scaled");
    let (status, body) = predict_raw(server(), YOLO, "?score_threshold=0.3&max_detections=20", photo.clone(), "image/jpeg");
    assert_eq!(status, 200);
    assert!(check_detections(&body, 2400.0, 1800.0, 0.3, 20) > 0);
    let (status, body) = predict_raw(server(), CLASSIFIER, "", photo.clone(), "image/jpeg");
    assert_eq!(status, 200);
    assert_eq!(body["results"][0]["predictions"].as_array().unwrap().len(), 5);
    let overlay = client()
        .post(server().url(&format!("/v1/models/{YOLO}/predict?render=png")))
        .header("content-type", "image/jpeg")
        .body(photo)
        .send()
        .unwrap();
    assert_eq!(overlay.status(), 200);
    assert_eq!(image::load_from_memory(&overlay.bytes().unwrap()).unwrap().dimensions(), (2400, 1800));
}
