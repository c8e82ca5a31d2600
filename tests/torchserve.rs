//! TorchServe's inference API against the real binary: `/ping`, and `/predictions` answering
//! in the shapes of TorchServe's default handlers with the same results /v1 gives (both come
//! from the one post-processing path). (Against the default models and with TorchServe's own
//! client habits: tests/python/test_torchserve_api.py.)

mod common;

use std::sync::OnceLock;

use base64::Engine as _;
use common::{client, jpeg, predict_raw, Server};
use reqwest::blocking::multipart;
use serde_json::Value;

const CLASSIFIER: &str = "resnet18";
/// Random-init, it scores many boxes just above 0.5: TorchServe's fixed threshold keeps them.
const YOLO: &str = "yolo_tiny";
const PROBABILITY_MAP: &str = "tiny_text_map";

/// One inference thread: every forward then runs with the same intra-op thread count, so the
/// same image gives the same bits on both routes (with the pool's adaptive split, a forward run
/// beside another uses fewer threads, and the random-init YOLO's scores sit right at 0.5).
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let repo = common::test_models();
        Server::start_ready(&["--model-repository", repo.to_str().unwrap(), "--models", "resnet18,yolo_tiny,tiny_text_map", "--inference-threads", "1"])
    })
}

fn predictions(path: &str, body: Vec<u8>) -> (u16, Value) {
    let response = client().post(server().url(path)).header("content-type", "image/jpeg").body(body).send().unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap())
}

#[test]
fn ping_answers_the_readiness_rule() {
    let response = client().get(server().url("/ping")).send().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().unwrap(), serde_json::json!({"status": "Healthy"}));
}

#[test]
fn the_classifier_answers_v1s_top_five_as_label_to_probability() {
    let image = jpeg(320, 240, 11);
    let (status, answer) = predictions(&format!("/predictions/{CLASSIFIER}"), image.clone());
    assert_eq!(status, 200, "{answer}");
    let v1 = predict_raw(server(), CLASSIFIER, "", image.clone(), "image/jpeg").1;
    let top = v1["results"][0]["predictions"].as_array().unwrap();
    let answer = answer.as_object().unwrap();
    assert_eq!(answer.len(), 5);
    for (prediction, (label, score)) in top.iter().zip(answer) {
        assert_eq!(prediction["label"].as_str().unwrap(), label);
        assert!((prediction["score"].as_f64().unwrap() - score.as_f64().unwrap()).abs() < 1e-6);
    }
    // A pinned version ("1.0" names folder 1) and base64 text give the same answer.
    let (_, pinned) = predictions(&format!("/predictions/{CLASSIFIER}/1.0"), image.clone());
    assert_eq!(pinned.as_object().unwrap().keys().collect::<Vec<_>>(), answer.keys().collect::<Vec<_>>());
    let text = base64::engine::general_purpose::STANDARD.encode(&image);
    let response = client()
        .post(server().url(&format!("/predictions/{CLASSIFIER}")))
        .header("content-type", "text/plain")
        .body(text)
        .send()
        .unwrap();
    let from_text: Value = response.json().unwrap();
    assert_eq!(from_text.as_object().unwrap().keys().collect::<Vec<_>>(), answer.keys().collect::<Vec<_>>());
}

#[test]
fn the_detector_answers_every_v1_detection_above_one_half() {
    let image = jpeg(400, 260, 12);
    let (status, answer) = predictions(&format!("/predictions/{YOLO}"), image.clone());
    assert_eq!(status, 200, "{answer}");
    // TorchServe's object detector keeps every box scoring 0.5 or more, with no cap.
    let v1 = predict_raw(server(), YOLO, "?score_threshold=0.5&max_detections=10000", image, "image/jpeg").1;
    let expected = v1["results"][0]["detections"].as_array().unwrap();
    let answer = answer.as_array().unwrap();
    assert!(!answer.is_empty(), "the test needs detections above 0.5");
    assert_eq!(answer.len(), expected.len());
    for (got, want) in answer.iter().zip(expected) {
        let b = &want["box"];
        assert_eq!(got["score"], want["score"]);
        assert_eq!(got[want["label"].as_str().unwrap()], serde_json::json!([b["x1"], b["y1"], b["x2"], b["y2"]]));
    }
}

#[test]
fn the_segmenter_answers_v1s_mask_with_a_probability_per_pixel() {
    let image = jpeg(96, 64, 13);
    let (status, answer) = predictions(&format!("/predictions/{PROBABILITY_MAP}"), image.clone());
    assert_eq!(status, 200);
    let rows = answer.as_array().unwrap();
    assert_eq!(rows.len(), 64);
    let v1 = predict_raw(server(), PROBABILITY_MAP, "", image, "image/jpeg").1;
    let png = base64::engine::general_purpose::STANDARD.decode(v1["results"][0]["mask"]["data"].as_str().unwrap()).unwrap();
    let mask = image::load_from_memory(&png).unwrap().to_luma8();
    for (y, row) in rows.iter().enumerate() {
        let row = row.as_array().unwrap();
        assert_eq!(row.len(), 96);
        for (x, pixel) in row.iter().enumerate() {
            assert_eq!(pixel[0].as_u64().unwrap(), u64::from(mask.get_pixel(x as u32, y as u32).0[0]), "({x}, {y})");
            let p = pixel[1].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&p), "{pixel}");
        }
    }
}

#[test]
fn several_images_answer_a_list_in_order() {
    let images = [jpeg(120, 90, 14), jpeg(90, 120, 15)];
    let form = images.iter().enumerate().fold(multipart::Form::new(), |form, (i, image)| {
        form.part("data", multipart::Part::bytes(image.clone()).file_name(format!("{i}.jpg")))
    });
    let response = client().post(server().url(&format!("/predictions/{CLASSIFIER}"))).multipart(form).send().unwrap();
    assert_eq!(response.status(), 200);
    let answers: Value = response.json().unwrap();
    let answers = answers.as_array().unwrap();
    assert_eq!(answers.len(), 2);
    for (answer, image) in answers.iter().zip(images) {
        let (_, alone) = predictions(&format!("/predictions/{CLASSIFIER}"), image);
        let labels = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(labels(answer), labels(&alone));
    }
}
