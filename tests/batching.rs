//! The batcher and the limits around it against the real binary: failures isolated within a
//! batch, deadlines, a full queue refused at once, clients that hang up skipped, the request
//! ids of a batch in the worker's log, and the metrics that report all of it.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::{client, encode, jpeg, metric_value, predict_raw, Server};
use image::ImageFormat;
use reqwest::blocking::Client;
use serde_json::Value;

const CLASSIFIER: &str = "resnet18";
/// About 0.1 s a forward pass, raises on a nearly white image; batch 4, 150 ms delay, queue 2.
const FAULT_PROBE: &str = "fault_probe";

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    Server::shared(&SERVER, &["fault_probe", "resnet18"])
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

/// The queue, batcher and deadlines, on one model, in one sequence (the scenarios would
/// disturb each other in parallel).
#[test]
fn batcher_isolates_failures_and_enforces_deadlines_queue_limits_and_disconnects() {
    let s = server();
    // 1. A bad image and a good one in the same batch: only the bad one fails. Each carries
    // its own request id, which the worker's log lines about the batch name.
    let with_id = |value: u8, id: &'static str| {
        client()
            .post(s.url(&format!("/v1/models/{FAULT_PROBE}/predict")))
            .header("content-type", "image/png")
            .header("x-request-id", id)
            .body(png_of(value))
            .send()
            .unwrap()
    };
    let bright = std::thread::spawn(move || with_id(255, "bright-request-1"));
    std::thread::sleep(Duration::from_millis(30));
    let dark = with_id(20, "dark-request-1");
    let bright = bright.join().unwrap();
    assert_eq!(bright.headers()["x-request-id"], "bright-request-1");
    let log = s.log();
    let batch_line = log.iter().find(|l| l.contains("batched forward failed")).expect("the failed batch is logged");
    assert!(batch_line.contains("bright-request-1") && batch_line.contains("dark-request-1"), "{batch_line}");
    let alone = log.iter().find(|l| l.contains("forward pass failed")).expect("the failing image is logged");
    assert!(alone.contains("bright-request-1"), "{alone}");
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

    // 6. Admission by expected wait: with a forward running and an image queued behind it, a
    // request whose deadline is shorter than the expected wait is refused at once (503,
    // Retry-After), not queued to time out; the queue itself is not full.
    std::thread::sleep(Duration::from_millis(300));
    let refused_before = metric_value(&metrics(), "visionserve_admission_refused_total", &[FAULT_PROBE]);
    let four = (0..4).fold(reqwest::blocking::multipart::Form::new(), |form, i| {
        form.part("image", reqwest::blocking::multipart::Part::bytes(png_of(70 + i)).file_name(format!("{i}.png")))
    });
    let url = s.url(&format!("/v1/models/{FAULT_PROBE}/predict"));
    let running = std::thread::spawn(move || client().post(url).multipart(four).send().unwrap().status());
    std::thread::sleep(Duration::from_millis(30));
    let queued = std::thread::spawn(|| probe(png_of(80), None, None).unwrap().status());
    std::thread::sleep(Duration::from_millis(30));
    let started = std::time::Instant::now();
    let hurried = probe(png_of(81), None, Some(15)).unwrap();
    assert_eq!(hurried.status(), 503, "a request that cannot be answered in 15 ms is refused at once");
    assert!(started.elapsed() < Duration::from_millis(100), "the refusal took {:?}", started.elapsed());
    assert_eq!(hurried.headers()["retry-after"], "1");
    assert_eq!(running.join().unwrap(), 200);
    assert_eq!(queued.join().unwrap(), 200);
    let text = metrics();
    assert!(metric_value(&text, "visionserve_admission_refused_total", &[FAULT_PROBE]) > refused_before, "{text}");
    assert!(text.contains("visionserve_expected_queue_wait_seconds{model=\"fault_probe\"}"), "{text}");
}

#[test]
fn metrics_expose_the_documented_names() {
    let (status, _) = predict_raw(server(), CLASSIFIER, "", jpeg(64, 64, 3), "image/jpeg");
    assert_eq!(status, 200);
    let (status, _) = predict_raw(server(), CLASSIFIER, "?top_k=0", jpeg(64, 64, 3), "image/jpeg");
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

/// A refusal for overload is held `--refusal-delay-ms` before it is answered, so that clients
/// retrying without waiting cost one refusal per delay — but never past the request's own
/// deadline. A server of its own, with a hold (400 ms) far longer than a refusal takes.
#[test]
fn overload_refusals_are_held_but_never_past_their_deadline() {
    let repo = common::test_models();
    let s = Server::start_ready(&["--model-repository", repo.to_str().unwrap(), "--models", FAULT_PROBE, "--refusal-delay-ms", "400"]);
    let url = s.url(&format!("/v1/models/{FAULT_PROBE}/predict"));
    let send = |value: u8, deadline_ms: Option<u64>| {
        let mut request = client().post(&url).header("content-type", "image/png").body(png_of(value));
        if let Some(ms) = deadline_ms {
            request = request.header("x-request-timeout-ms", ms.to_string());
        }
        let started = std::time::Instant::now();
        let status = request.send().unwrap().status().as_u16();
        (status, started.elapsed())
    };
    // 12 at once on a queue of 2: the overflow is refused, each refusal held ~400 ms.
    let outcomes: Vec<_> = std::thread::scope(|scope| {
        let burst: Vec<_> = (0..12).map(|i| scope.spawn(move || send(90 + i, None))).collect();
        burst.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let refused: Vec<_> = outcomes.iter().filter(|o| o.0 == 503).collect();
    assert!(!refused.is_empty(), "12 requests at once on a queue of 2 must overflow: {outcomes:?}");
    for (_, took) in &refused {
        assert!(*took >= Duration::from_millis(400) && *took < Duration::from_millis(1500), "a refusal took {took:?}");
    }
    // With a forward running and an image queued, a 15 ms deadline cannot be met: refused,
    // and answered at its deadline, not after the 400 ms hold.
    std::thread::scope(|scope| {
        let running = scope.spawn(|| {
            let four = (0..4).fold(reqwest::blocking::multipart::Form::new(), |form, i| {
                form.part("image", reqwest::blocking::multipart::Part::bytes(png_of(110 + i)).file_name(format!("{i}.png")))
            });
            (client().post(&url).multipart(four).send().unwrap().status().as_u16(), Duration::ZERO)
        });
        std::thread::sleep(Duration::from_millis(30));
        let queued = scope.spawn(|| send(101, None));
        std::thread::sleep(Duration::from_millis(30));
        let (status, took) = send(102, Some(15));
        assert_eq!(status, 503);
        assert!(took < Duration::from_millis(300), "a refusal was held past its 15 ms deadline: {took:?}");
        assert_eq!(running.join().unwrap().0, 200);
        assert_eq!(queued.join().unwrap().0, 200);
    });
}
