//! In-process router tests: the axum app driven with `oneshot`, no socket and no model. A
//! repository with only broken models exercises routing, error shapes and readiness.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;
use visionserve::api::{router, AppState, RequestLimits};
use visionserve::repository::ModelRepository;

fn limits() -> RequestLimits {
    RequestLimits { max_body_bytes: 1024, max_image_pixels: 1_000_000, max_images_per_request: 2, request_timeout_ms: 1000, refusal_delay_ms: 0 }
}

fn app_over(repo: &std::path::Path) -> axum::Router {
    let repository = ModelRepository::scan(repo, &[]).unwrap();
    router(AppState::builder(Arc::new(repository), limits()).build())
}

fn app() -> (axum::Router, tempfile::TempDir) {
    let repo = tempfile::tempdir().unwrap();
    let broken = repo.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(
        broken.join("config.toml"),
        "task = \"classification\"\n[input]\nwidth = 8\nheight = 8\nresize = \"stretch\"\n[output]\nconvention = \"logits\"\n",
    )
    .unwrap(); // valid config, but no model.pt
    std::fs::create_dir(repo.path().join("not_a_model")).unwrap(); // no config: ignored
    (app_over(repo.path()), repo)
}

async fn call(request: Request<Body>) -> (StatusCode, Option<String>, Value) {
    let (app, _repo) = app();
    call_app(app, request).await
}

async fn call_app(app: axum::Router, request: Request<Body>) -> (StatusCode, Option<String>, Value) {
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let request_id = response.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_string());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, request_id, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

fn post(uri: &str, content_type: &str, body: &'static [u8]) -> Request<Body> {
    Request::post(uri).header("content-type", content_type).body(Body::from(body)).unwrap()
}

#[tokio::test]
async fn liveness_is_independent_of_models_and_carries_a_request_id() {
    let (status, id, body) = call(get("/health/live")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "live");
    assert!(id.is_some_and(|id| id.len() >= 32));
}

#[tokio::test]
async fn readiness_names_the_broken_model_and_why() {
    let (status, _, body) = call(get("/health/ready")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["not_ready"][0]["name"], "broken");
    assert_eq!(body["not_ready"][0]["status"], "failed");
    assert!(body["not_ready"][0]["reason"].as_str().unwrap().contains("model.pt"));
}

/// The one readiness rule, answered by all three protocols: a failed model holds it back.
#[tokio::test]
async fn every_protocol_says_not_ready_while_a_model_is_broken() {
    let (status, _, body) = call(get("/v2/health/ready")).await;
    assert_eq!((status, body), (StatusCode::SERVICE_UNAVAILABLE, json!({"ready": false})));
    let (status, _, body) = call(get("/ping")).await;
    assert_eq!((status, body), (StatusCode::INTERNAL_SERVER_ERROR, json!({"status": "Unhealthy"})));
    let (status, _, body) = call(get("/v2/models/broken/ready")).await;
    assert_eq!((status, body), (StatusCode::SERVICE_UNAVAILABLE, json!({"name": "broken", "ready": false})));
}

/// An empty repository is not ready on any protocol: a pod that serves no model must not get
/// traffic. (TorchServe's /ping said Healthy here before the rule was one.)
#[tokio::test]
async fn an_empty_repository_is_not_ready_on_every_protocol() {
    let empty = tempfile::tempdir().unwrap();
    let (status, _, body) = call_app(app_over(empty.path()), get("/health/ready")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["reason"], "the repository holds no model");
    let (status, _, body) = call_app(app_over(empty.path()), get("/v2/health/ready")).await;
    assert_eq!((status, body), (StatusCode::SERVICE_UNAVAILABLE, json!({"ready": false})));
    let (status, _, body) = call_app(app_over(empty.path()), get("/ping")).await;
    assert_eq!((status, body), (StatusCode::INTERNAL_SERVER_ERROR, json!({"status": "Unhealthy"})));
    // Liveness does not depend on models.
    let (status, _, _) = call_app(app_over(empty.path()), get("/v2/health/live")).await;
    assert_eq!(status, StatusCode::OK);
}

/// V2's errors are the service's one error rendered in Triton's shape, with Triton's status
/// mapping and `Retry-After` on 503.
#[tokio::test]
async fn v2_errors_take_tritons_shape() {
    let (status, _, body) = call(get("/v2/models/ghost")).await;
    assert_eq!((status, body), (StatusCode::NOT_FOUND, json!({"error": "model 'ghost' is not in the repository"})));
    let (status, _, body) = call(get("/v2/models/broken/versions/3")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "model 'broken' has no version '3' (it has 1)");
    let (app, _repo) = app();
    let response = app.oneshot(post("/v2/models/broken/infer", "application/json", br#"{"inputs": [{"name": "i", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}]}"#)).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert!(body["error"].as_str().unwrap().starts_with("model 'broken' is not ready: "), "{body}");
    let (status, _, body) = call(post("/v2/models/broken/infer", "application/json", br#"{"inputs": []}"#)).await;
    assert_eq!((status, body), (StatusCode::BAD_REQUEST, json!({"error": "expected exactly one input, got 0"})));
    let (status, _, body) = call(post("/v2/models/broken/infer", "application/json", br#"{"inputs": [{"name": "i", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}], "parameters": {"score_threshold": 7}}"#)).await;
    assert_eq!((status, body), (StatusCode::BAD_REQUEST, json!({"error": "parameter 'score_threshold' must be a number within 0..=1"})));
}

#[tokio::test]
async fn model_list_shows_only_folders_with_a_config() {
    let (status, _, body) = call(get("/v1/models")).await;
    assert_eq!(status, StatusCode::OK);
    let models = body["models"].as_array().unwrap();
    assert_eq!(models.len(), 1);
    assert_eq!(models[0]["name"], "broken");
    assert_eq!(models[0]["task"], "classification");
}

#[tokio::test]
async fn predict_on_a_failed_model_is_503_and_unknown_model_404() {
    let (status, _, body) = call(post("/v1/models/broken/predict", "image/png", b"x")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["code"], "model_not_ready");
    let (status, _, body) = call(post("/v1/models/ghost/predict", "image/png", b"x")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "model_not_found");
    let (status, _, body) = call(get("/v1/models/ghost")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn body_limit_content_type_and_image_count_are_enforced_before_any_model() {
    let big: &'static [u8] = Box::leak(vec![0u8; 4096].into_boxed_slice());
    let (status, _, body) = call(post("/v1/models/broken/predict", "image/jpeg", big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"]["code"], "payload_too_large");
    let (status, _, body) = call(post("/v1/models/broken/predict", "text/csv", b"a,b")).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(body["error"]["code"], "unsupported_media_type");
    let (status, _, body) =
        call(post("/v1/models/broken/predict", "application/json", br#"{"images": ["aGk=", "aGk=", "aGk="]}"#)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["message"].as_str().unwrap().contains("limit of 2"));
    let (status, _, body) = call(post("/v1/models/broken/predict", "application/json", br#"{"images": []}"#)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "bad_request");
    let (status, _, body) = call(post("/v1/models/broken/predict", "multipart/form-data", b"--x--")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json_in_their_protocols_shape() {
    let (status, _, body) = call(get("/v1/nothing")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found");
    let (status, _, body) = call(get("/v1/models/broken/predict")).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["error"]["code"], "method_not_allowed");
    // Under /v2, Triton's shape: a string (tritonclient fails formatting an object).
    let (status, _, body) = call(get("/v2/nothing")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string(), "{body}");
    let (status, _, body) = call(get("/v2/models/broken/infer")).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(body["error"].is_string(), "{body}");
}

#[tokio::test]
async fn management_is_off_without_an_admin_token() {
    for (method, uri) in [("GET", "/models"), ("DELETE", "/models/broken")] {
        let request = Request::builder().method(method).uri(uri).body(Body::empty()).unwrap();
        let (status, _, body) = call(request).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {uri}");
        assert_eq!(body["error"]["code"], "management_disabled", "{method} {uri}");
    }
    let request = Request::builder().method("POST").uri("/v2/repository/index").body(Body::empty()).unwrap();
    let (status, _, body) = call(request).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body["error"].as_str().is_some_and(|m| m.contains("--admin-token")), "{body}");
}

#[tokio::test]
async fn the_contract_and_its_page_are_served() {
    let (app, _repo) = app();
    let response = app.oneshot(get("/openapi.yaml")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.into_body().collect().await.unwrap().to_bytes();
    assert!(text.starts_with(b"openapi: 3.1"));
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test]
async fn gzip_bodies_are_read_decompressed_and_a_bomb_is_413() {
    // Parsed as JSON once decompressed: the error is about the inputs, not the bytes.
    let body = gzip(br#"{"model_name": "broken", "inputs": []}"#);
    let request = Request::post("/v2/models/broken/infer").header("content-encoding", "gzip").body(Body::from(body)).unwrap();
    let (status, _, body) = call(request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("exactly one input"), "{body}");
    // 200 kB of zeros is a few hundred bytes compressed; the 1 kB limit counts what it becomes.
    let bomb = gzip(&vec![0u8; 200_000]);
    assert!(bomb.len() < 1024);
    for uri in ["/v2/models/broken/infer", "/v1/models/broken/predict"] {
        let request = Request::post(uri).header("content-encoding", "gzip").header("content-type", "image/jpeg").body(Body::from(bomb.clone())).unwrap();
        let (status, _, body) = call(request).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{uri}: {body}");
    }
    // An encoding we do not read is refused, not parsed as JSON.
    let request = Request::post("/v2/models/broken/infer").header("content-encoding", "br").body(Body::from("x")).unwrap();
    assert_eq!(call(request).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test]
async fn model_configuration_and_statistics_in_tritons_shape() {
    let (status, _, config) = call(get("/v2/models/broken/config")).await;
    assert_eq!(status, StatusCode::OK, "{config}");
    assert_eq!(config["name"], "broken");
    assert_eq!(config["max_batch_size"], 2, "the images a request may carry");
    assert_eq!(config["input"][0], json!({"name": "image", "data_type": "TYPE_UINT8", "dims": [8, 8, 3], "format": "FORMAT_NHWC"}));
    assert_eq!(config["output"][0]["data_type"], "TYPE_FP32");
    assert_eq!(config["instance_group"][0]["kind"], "KIND_CPU");
    assert_eq!(config["version_policy"], json!({"all": {}}));
    assert_eq!(call(get("/v2/models/broken/versions/1/config")).await.2, config);
    let (status, _, missing) = call(get("/v2/models/nothing/config")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(missing["error"].is_string(), "{missing}");

    let (status, _, all) = call(get("/v2/models/stats")).await;
    assert_eq!(status, StatusCode::OK);
    let row = &all["model_stats"][0];
    assert_eq!((row["name"].as_str(), row["version"].as_str()), (Some("broken"), Some("1")));
    assert_eq!(row["inference_stats"]["success"], json!({"count": 0, "ns": 0}));
    assert_eq!(row["execution_count"], 0);
    assert_eq!(call(get("/v2/models/broken/stats")).await.2, all);
    assert_eq!(call(get("/v2/models/broken/versions/1/stats")).await.2, all);
    assert_eq!(call(get("/v2/models/nothing/stats")).await.0, StatusCode::NOT_FOUND);
    let (_, _, server) = call(get("/v2")).await;
    for extension in ["model_configuration", "statistics"] {
        assert!(server["extensions"].as_array().unwrap().contains(&json!(extension)), "{server}");
    }
}

#[tokio::test]
async fn torchserves_api_description_and_trailing_slashes() {
    for request in [
        Request::builder().method("OPTIONS").uri("/").body(Body::empty()).unwrap(),
        get("/api-description"),
    ] {
        let (app, _repo) = app();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "application/json");
        let text = response.into_body().collect().await.unwrap().to_bytes();
        let description: Value = serde_json::from_slice(&text).expect("the API description is JSON");
        assert_eq!(description["openapi"], "3.1.0");
        assert!(description["paths"]["/predictions/{model}"].is_object(), "{}", description["paths"]);
    }
    // GET / is still the web page (to a browser) or KServe V1's liveness.
    assert_eq!(call(get("/")).await.2, json!({"status": "alive"}));
    // A trailing slash is the route without it.
    assert_eq!(call(get("/v2/models/broken/config/")).await.0, StatusCode::OK);
    assert_eq!(call(get("/health/live/")).await.0, StatusCode::OK);
}

/// Live streams: off by default (403 before the source is even parsed), and with an
/// allow-list, a source outside it is refused before anything is opened, its credentials not
/// said back; the request's own mistakes are 4xx; unknown ids are 404.
#[tokio::test]
async fn live_streams_are_off_by_default_and_held_to_the_allow_list() {
    let body = br#"{"source": "rtsp://127.0.0.1:8554/live", "model": "broken"}"#;
    let (status, _, answer) = call(post("/v1/streams", "application/json", body)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("--streams-allow"));
    let (status, _, answer) = call(get("/v1/streams")).await;
    assert_eq!((status, answer), (StatusCode::OK, json!({"streams": []})));
    for request in [get("/v1/streams/s1"), Request::delete("/v1/streams/s1").body(Body::empty()).unwrap(), get("/v1/streams/nope/events")] {
        assert_eq!(call(request).await.0, StatusCode::NOT_FOUND);
    }

    let repo = tempfile::tempdir().unwrap();
    let repository = ModelRepository::scan(repo.path(), &[]).unwrap();
    let allow = visionserve::video::AllowList::parse(&["rtsp://camera.local".to_string()]).unwrap();
    let settings = visionserve::serve::streams::StreamSettings { allow, ..Default::default() };
    let app = router(AppState::builder(Arc::new(repository), limits()).streams(settings).build());
    let cases: [(&'static [u8], StatusCode); 6] = [
        (br#"{"source": "rtsp://admin:hunter2@10.0.0.7/s1", "model": "m"}"#, StatusCode::FORBIDDEN),
        (br#"{"source": "file:///etc/passwd", "model": "m"}"#, StatusCode::FORBIDDEN),
        (br#"{"source": "concat:/a|/b", "model": "m"}"#, StatusCode::UNPROCESSABLE_ENTITY),
        (br#"{"source": "rtsp://camera.local/s1", "model": "m", "drop_policy": "never"}"#, StatusCode::UNPROCESSABLE_ENTITY),
        (br#"{"source": "rtsp://camera.local/s1", "model": "no_such_model"}"#, StatusCode::NOT_FOUND),
        (br#"{"source": "rtsp://camera.local/s1"}"#, StatusCode::BAD_REQUEST),
    ];
    for (body, expected) in cases {
        let (status, _, answer) = call_app(app.clone(), post("/v1/streams", "application/json", body)).await;
        assert_eq!(status, expected, "{}: {answer}", String::from_utf8_lossy(body));
        assert!(!answer.to_string().contains("hunter2"), "{answer}");
    }
}
