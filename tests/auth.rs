//! API keys on the inference routes, and CORS only when configured, against the real binary.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{client, jpeg, metric_value, test_models, Server};

const BOXES_SCORES: &str = "tiny_ssd";

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
    // KServe V1 inference is guarded; its metadata on the same path is not.
    assert_eq!(post(&format!("/v1/models/{BOXES_SCORES}:predict"), None).status(), 401);
    let b64 = base64::engine::general_purpose::STANDARD.encode(jpeg(64, 64, 1));
    let kserve = client()
        .post(guarded.url(&format!("/v1/models/{BOXES_SCORES}:predict")))
        .bearer_auth("alpha")
        .json(&serde_json::json!({"instances": [{"b64": b64}, {"data": b64}]}))
        .send()
        .unwrap();
    assert_eq!(kserve.status(), 200);
    let predictions: serde_json::Value = kserve.json().unwrap();
    assert_eq!(predictions["predictions"].as_array().map(Vec::len), Some(2), "{predictions}");
    let described: serde_json::Value = client().get(guarded.url(&format!("/v1/models/{BOXES_SCORES}"))).send().unwrap().json().unwrap();
    assert_eq!(described["ready"], true);
    let explain = client().post(guarded.url(&format!("/v1/models/{BOXES_SCORES}:explain"))).bearer_auth("alpha").body("{}").send().unwrap();
    assert_eq!(explain.status(), 501);
    // Each protocol's requests are counted under its name, refused keys included.
    let metrics = client().get(guarded.url("/metrics")).send().unwrap().text().unwrap();
    for (protocol, status) in [("kserve_v1", "200"), ("kserve_v1", "401"), ("v2", "401"), ("torchserve", "401"), ("v1", "403")] {
        let counted = metric_value(&metrics, "visionserve_requests_total", &[&format!("protocol=\"{protocol}\""), &format!("status=\"{status}\"")]);
        assert!(counted >= 1.0, "{protocol} {status} not counted:\n{metrics}");
    }
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
    // A server with no CORS configured answers no CORS headers at all.
    let plain = Server::start(&["--model-repository", repo.to_str().unwrap(), "--models", BOXES_SCORES]);
    let plain = client().get(plain.url("/v1/models")).header("origin", "https://app.example").send().unwrap();
    assert!(plain.headers().get("access-control-allow-origin").is_none());
}
