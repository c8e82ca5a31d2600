//! The web page and its sample images, served from the binary (the page's behaviour in a
//! browser: tests/browser/page.test.mjs).

mod common;

use std::sync::OnceLock;

use common::{client, Server};
use serde_json::Value;



/// The page needs no model: a server over an empty repository serves it.
fn server() -> &'static (Server, tempfile::TempDir) {
    static SERVER: OnceLock<(Server, tempfile::TempDir)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let empty = tempfile::tempdir().unwrap();
        (Server::start(&["--model-repository", empty.path().to_str().unwrap()]), empty)
    })
}

#[test]
fn the_web_page_and_its_samples_are_served_from_the_binary() {
    // A browser asks for HTML; an API client asking `/` gets KServe V1's liveness instead.
    let alive: Value = client().get(server().0.url("/")).send().unwrap().json().unwrap();
    assert_eq!(alive, serde_json::json!({"status": "alive"}));
    let page = client().get(server().0.url("/")).header("accept", "text/html,application/xhtml+xml,*/*;q=0.8").send().unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = page.text().unwrap();
    assert!(html.contains("/v1/models") && !html.contains("https://"), "the page must not load from a CDN");
    let samples: Value = client().get(server().0.url("/samples")).send().unwrap().json().unwrap();
    let samples = samples["samples"].as_array().unwrap();
    // The page offers the project's sample photos (assets/samples/); none would pass the loop.
    assert!(samples.len() >= 3, "the page lists too few samples: {samples:?}");
    for sample in samples {
        let bytes = client().get(server().0.url(sample["url"].as_str().unwrap())).send().unwrap().bytes().unwrap();
        assert!(image::load_from_memory(&bytes).is_ok(), "{sample}");
    }
    let missing = client().get(server().0.url("/samples/nope.jpg")).send().unwrap();
    assert_eq!(missing.status(), 404);
}
