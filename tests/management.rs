//! Model management against the real binary: versions, load, reload, scale, set-default and
//! unload through Triton's repository API and TorchServe's management API, all while clients
//! keep sending requests — none of which may fail.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{client, encode, synthetic_image, test_models, Server};
use serde_json::{json, Value};

const TOKEN: &str = "admin-token-0123456789";

/// A model folder whose files are links to the test classifier's.
fn link_model(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for file in ["config.toml", "model.pt", "labels.txt"] {
        std::os::unix::fs::symlink(from.join(file), to.join(file)).unwrap();
    }
}

fn admin(method: reqwest::Method, server: &Server, path: &str) -> (u16, Value) {
    let response = client().request(method, server.url(path)).bearer_auth(TOKEN).send().unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

#[test]
fn load_reload_scale_and_unload_under_load_fail_no_request() {
    let classifier = test_models().join("resnet18");
    let repo = tempfile::tempdir().unwrap();
    link_model(&classifier, &repo.path().join("clf/1"));
    link_model(&classifier, &repo.path().join("clf/2"));
    link_model(&classifier, &repo.path().join("other"));
    let server = Arc::new(Server::start(&[
        "--model-repository", repo.path().to_str().unwrap(), "--models", "clf", "--admin-token", TOKEN,
    ]));
    assert_eq!(server.wait_until_settled(Duration::from_secs(120)).status(), 200);

    // The token is required, and checked.
    let index = server.url("/v2/repository/index");
    assert_eq!(client().post(&index).send().unwrap().status(), 401);
    assert_eq!(client().post(&index).bearer_auth("admin-token-wrong-0000").send().unwrap().status(), 403);
    let (status, listed) = admin(reqwest::Method::POST, &server, "/v2/repository/index");
    assert_eq!(status, 200);
    let state_of = |name: &str, version: Option<&str>| {
        listed.as_array().unwrap().iter().find(|m| m["name"] == name && (version.is_none() || m["version"] == version.unwrap())).map(|m| m["state"].clone())
    };
    assert_eq!(state_of("clf", Some("1")), Some(json!("READY")));
    assert_eq!(state_of("clf", Some("2")), Some(json!("READY")));
    assert_eq!(state_of("other", None), Some(json!("UNAVAILABLE")), "models left out are listed: {listed}");

    // Clients keep calling the default version over /v1 and /v2 while the admin works.
    let image = encode(&synthetic_image(160, 120, 3), image::ImageFormat::Jpeg);
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::<(u16, String)>::new()));
    let clients: Vec<_> = (0..3)
        .map(|i| {
            let (server, stop, seen, image) = (Arc::clone(&server), Arc::clone(&stop), Arc::clone(&seen), image.clone());
            std::thread::spawn(move || {
                let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &image);
                while !stop.load(Ordering::Relaxed) {
                    let (status, version) = if i % 2 == 0 {
                        let r = client().post(server.url("/v1/models/clf/predict")).header("content-type", "image/jpeg").body(image.clone()).send().unwrap();
                        let status = r.status().as_u16();
                        let body: Value = r.json().unwrap();
                        (status, body["version"].as_str().unwrap_or("?").to_string())
                    } else {
                        let request = json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]});
                        let r = client().post(server.url("/v2/models/clf/infer")).json(&request).send().unwrap();
                        let status = r.status().as_u16();
                        let body: Value = r.json().unwrap();
                        (status, body["model_version"].as_str().unwrap_or("?").to_string())
                    };
                    seen.lock().unwrap().push((status, version));
                }
            })
        })
        .collect();
    let pause = || std::thread::sleep(Duration::from_millis(400));
    pause();
    // Reload: read from disk again, warm up, swap.
    assert_eq!(admin(reqwest::Method::POST, &server, "/v2/repository/models/clf/load").0, 200);
    pause();
    // Scale the default version to three workers.
    // Asynchronous unless asked (TorchServe's 202), synchronous 200; done before either answer.
    assert_eq!(admin(reqwest::Method::PUT, &server, "/models/clf?min_worker=3").0, 202);
    let (_, described) = admin(reqwest::Method::GET, &server, "/models/clf/2");
    assert_eq!(described[0]["minWorkers"], 3, "{described}");
    // Every parameter optional (min_worker defaults to 1, as in TorchServe); 0 keeps none.
    assert_eq!(admin(reqwest::Method::PUT, &server, "/models/clf?synchronous=true").0, 200);
    assert_eq!(admin(reqwest::Method::GET, &server, "/models/clf/2").1[0]["minWorkers"], 1);
    assert_eq!(admin(reqwest::Method::PUT, &server, "/models/clf/?min_worker=0&synchronous=true").0, 200, "trailing slash");
    assert_eq!(admin(reqwest::Method::GET, &server, "/models/clf/2").1[0]["minWorkers"], 0);
    assert_eq!(admin(reqwest::Method::PUT, &server, "/models/clf?min_worker=many").0, 400, "TorchServe's status for a bad parameter");
    // Every version at once, TorchServe's `all`.
    let (status, all) = admin(reqwest::Method::GET, &server, "/models/clf/all");
    assert_eq!((status, all.as_array().map(Vec::len)), (200, Some(2)), "{all}");
    // In pool terms: min_worker executors kept for the model whenever it has work, max_worker
    // the most it may use at once; both shown on /v1 too.
    assert_eq!(admin(reqwest::Method::PUT, &server, "/models/clf?min_worker=1&max_worker=2").0, 202);
    let (_, described) = admin(reqwest::Method::GET, &server, "/models/clf/2");
    assert_eq!((described[0]["minWorkers"].as_u64(), described[0]["maxWorkers"].as_u64()), (Some(1), Some(2)), "{described}");
    let v1: serde_json::Value = reqwest::blocking::get(format!("{}/v1/models/clf/versions/2", server.base)).unwrap().json().unwrap();
    assert_eq!((v1["reserved_executors"].as_u64(), v1["workers"].as_u64()), (Some(1), Some(2)), "{v1}");
    let (status, refused) = admin(reqwest::Method::PUT, &server, "/models/clf?min_worker=3&max_worker=2");
    assert_eq!(status, 400, "{refused}");
    pause();
    // Make version 1 the default, then unload version 2 behind the clients' backs.
    assert_eq!(admin(reqwest::Method::PUT, &server, "/models/clf/1/set-default").0, 200);
    pause();
    assert_eq!(admin(reqwest::Method::DELETE, &server, "/models/clf/2").0, 200);
    // Register a model that was left out, TorchServe style.
    let (status, registered) = admin(reqwest::Method::POST, &server, "/models?url=other");
    assert_eq!(status, 200, "{registered}");
    // Two models now, a page at a time: TorchServe's limit and next_page_token.
    let (_, first) = admin(reqwest::Method::GET, &server, "/models?limit=1");
    assert_eq!((first["models"].as_array().map(Vec::len), first["nextPageToken"].as_str()), (Some(1), Some("1")), "{first}");
    let (_, rest) = admin(reqwest::Method::GET, &server, "/models/?limit=5&next_page_token=1");
    assert!(rest.get("nextPageToken").is_none(), "{rest}");
    assert_ne!(first["models"][0], rest["models"][0]);
    pause();
    // A reload that cannot succeed swaps nothing: the model keeps serving.
    std::fs::remove_file(repo.path().join("clf/1/config.toml")).unwrap();
    std::fs::write(repo.path().join("clf/1/config.toml"), "task = 'not a task'").unwrap();
    let (status, failed) = admin(reqwest::Method::POST, &server, "/v2/repository/models/clf/load");
    assert_eq!(status, 400, "{failed}");
    assert!(failed["error"].as_str().unwrap().contains("config"), "{failed}");
    pause();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }

    let seen = seen.lock().unwrap();
    assert!(seen.len() >= 20, "too few requests to mean anything: {}", seen.len());
    let failed: Vec<_> = seen.iter().filter(|(s, _)| *s != 200).collect();
    assert!(failed.is_empty(), "{} of {} requests failed during management: {failed:?}", failed.len(), seen.len());
    assert_eq!(seen.first().unwrap().1, "2", "the newest version is the default");
    assert_eq!(seen.last().unwrap().1, "1", "set-default moved clients to version 1");

    // Pinned versions: served, unloaded, unknown.
    let pinned = |version: &str| {
        client().post(server.url(&format!("/v1/models/clf/versions/{version}/predict"))).header("content-type", "image/jpeg").body(image.clone()).send().unwrap()
    };
    let one = pinned("1");
    assert_eq!(one.status(), 200);
    assert_eq!(one.json::<Value>().unwrap()["version"], "1");
    assert_eq!(pinned("2").status(), 503);
    assert_eq!(pinned("7").status(), 404);
    let other = client().post(server.url("/predictions/other")).header("content-type", "image/jpeg").body(image.clone()).send().unwrap();
    assert_eq!(other.status(), 200);
    // Unloaded versions do not hold readiness back.
    assert_eq!(client().get(server.url("/health/ready")).send().unwrap().status(), 200);
}
