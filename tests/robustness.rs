//! Bad input, faults, slow clients and shutdown, against the real binary: the corpus in
//! `tests/corpus/files/` through every input path, decompression bombs and resident memory,
//! a model whose forward raises, slowloris and slow uploads, the connection limit, and
//! SIGTERM under load.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{encode, synthetic_image, test_models, Server};
use reqwest::blocking::{multipart, Client};
use serde_json::{json, Value};

const MODEL: &str = "resnet18";

fn client() -> Client {
    // Every answer must come well within this: a hung connection fails the test.
    Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

fn corpus(kind: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/files").join(kind);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "corpus {} is missing: run tests/corpus/make_corpus.py", dir.display());
    files
}

/// What a client sees when it sends `bytes` as one image over one input path.
#[derive(Debug, Clone, Copy)]
enum InputPath {
    Raw,
    Multipart,
    JsonBase64,
    V2BytesJson,
    V2BytesBinary,
    TorchServe,
}

const PATHS: [InputPath; 6] =
    [InputPath::Raw, InputPath::Multipart, InputPath::JsonBase64, InputPath::V2BytesJson, InputPath::V2BytesBinary, InputPath::TorchServe];

fn send(server: &Server, path: InputPath, name: &str, bytes: &[u8]) -> (u16, Value) {
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    // Labels as a careless client would: by extension, so an HTML page goes as image/png.
    let label = if name.ends_with(".jpg") { "image/jpeg" } else { "image/png" };
    let request = match path {
        InputPath::Raw => client().post(server.url(&format!("/v1/models/{MODEL}/predict"))).header("content-type", label).body(bytes.to_vec()),
        InputPath::Multipart => {
            let part = multipart::Part::bytes(bytes.to_vec()).file_name(name.to_string()).mime_str(label).unwrap();
            client().post(server.url(&format!("/v1/models/{MODEL}/predict"))).multipart(multipart::Form::new().part("image", part))
        }
        InputPath::JsonBase64 => client().post(server.url(&format!("/v1/models/{MODEL}/predict"))).json(&json!({"images": [b64]})),
        InputPath::V2BytesJson => client()
            .post(server.url(&format!("/v2/models/{MODEL}/infer")))
            .json(&json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]})),
        InputPath::V2BytesBinary => {
            let mut element = (bytes.len() as u32).to_le_bytes().to_vec();
            element.extend_from_slice(bytes);
            let head = json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": element.len()}}]});
            let mut body = serde_json::to_vec(&head).unwrap();
            let length = body.len();
            body.extend(element);
            client()
                .post(server.url(&format!("/v2/models/{MODEL}/infer")))
                .header("inference-header-content-length", length.to_string())
                .body(body)
        }
        InputPath::TorchServe => client().put(server.url(&format!("/predictions/{MODEL}"))).body(bytes.to_vec()),
    };
    let response = request.send().unwrap_or_else(|e| panic!("{path:?} {name}: no answer: {e}"));
    let status = response.status().as_u16();
    let text = response.text().unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| json!({"unparsed": text})))
}

/// The JSON error shape of the path: `{"error": "..."}` on V2, `{"error": {code, message}}`
/// elsewhere.
fn assert_error_shape(path: InputPath, body: &Value, context: &str) {
    let error = &body["error"];
    let ok = match path {
        InputPath::V2BytesJson | InputPath::V2BytesBinary => error.as_str().is_some_and(|m| !m.is_empty()),
        _ => error["code"].as_str().is_some() && error["message"].as_str().is_some_and(|m| !m.is_empty()),
    };
    assert!(ok, "{context}: not the error shape: {body}");
    let text = body.to_string();
    assert!(!text.contains("/root/") && !text.contains(".rs:") && !text.contains("panicked"), "{context}: internals leak: {text}");
}

fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn corpus_server() -> Server {
    let repo = test_models();
    let server = Server::start(&["--model-repository", repo.to_str().unwrap(), "--models", "resnet18,fixed_shape"]);
    assert_eq!(server.wait_until_settled(Duration::from_secs(120)).status(), 200);
    server
}

#[test]
fn the_corpus_through_every_input_path_gets_200_or_a_clear_400() {
    let server = corpus_server();
    for (name, bytes) in corpus("accepted") {
        for path in PATHS {
            let (status, body) = send(&server, path, &name, &bytes);
            assert_eq!(status, 200, "{path:?} {name}: {body}");
        }
    }
    for (name, bytes) in corpus("rejected") {
        for path in PATHS {
            let (status, body) = send(&server, path, &name, &bytes);
            assert_eq!(status, 400, "{path:?} {name}: {body}");
            assert_error_shape(path, &body, &format!("{path:?} {name}"));
        }
    }
    // A JPEG labelled as PNG is read for what it is.
    let jpeg = encode(&synthetic_image(64, 48, 1), image::ImageFormat::Jpeg);
    let (status, _) = send(&server, InputPath::Raw, "lying.png", &jpeg);
    assert_eq!(status, 200);
    assert_eq!(client().get(server.url("/health/ready")).send().unwrap().status(), 200, "still serving");
}

#[test]
fn malformed_requests_get_the_right_4xx_and_never_a_5xx() {
    let server = corpus_server();
    let predict = server.url(&format!("/v1/models/{MODEL}/predict"));
    let jpeg = encode(&synthetic_image(64, 48, 2), image::ImageFormat::Jpeg);
    let raw = |content_type: &str, body: Vec<u8>| {
        let r = client().post(&predict).header("content-type", content_type).body(body).send().unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().unwrap_or(Value::Null))
    };
    let mut cases: Vec<(&str, (u16, Value), u16)> = vec![
        ("multipart without a boundary", raw("multipart/form-data", b"--x\r\n\r\nabc".to_vec()), 400),
        (
            "unterminated multipart part",
            raw("multipart/form-data; boundary=xyz", b"--xyz\r\ncontent-disposition: form-data; name=\"a\"; filename=\"a.jpg\"\r\n\r\nabc".to_vec()),
            400,
        ),
        ("malformed JSON", raw("application/json", b"{\"images\": [".to_vec()), 400),
        ("deeply nested JSON", raw("application/json", [vec![b'['; 100_000], vec![b']'; 100_000]].concat()), 400),
        ("JSON of the wrong shape", raw("application/json", br#"{"images": "abc"}"#.to_vec()), 400),
        ("bad base64", raw("application/json", br#"{"images": ["%%%not base64%%%"]}"#.to_vec()), 400),
        // Just over the 20 MiB limit: read up to the limit, then refused. (A client still
        // writing far past the limit may see the connection close before it reads the 413.)
        ("JSON over the body limit", raw("application/json", vec![b' '; 21 * 1024 * 1024]), 413),
        ("unsupported content type", raw("text/csv", b"a,b".to_vec()), 415),
    ];
    let mut parts = multipart::Form::new();
    for i in 0..1000 {
        parts = parts.part("image", multipart::Part::bytes(b"x".to_vec()).file_name(format!("{i}.jpg")));
    }
    let r = client().post(&predict).multipart(parts).send().unwrap();
    cases.push(("1000 multipart parts", (r.status().as_u16(), r.json().unwrap_or(Value::Null)), 400));
    for (query, what) in [("top_k=abc", "wrong type"), ("top_k=0", "out of range"), ("top_k=1e9", "out of range"), ("score_threshold=0.5", "not for this task")] {
        let r = client().post(format!("{predict}?{query}")).header("content-type", "image/jpeg").body(jpeg.clone()).send().unwrap();
        cases.push((what, (r.status().as_u16(), r.json().unwrap_or(Value::Null)), 422));
    }
    let long = "a".repeat(10_000);
    for name in ["ghost", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "%00", "a%00b", long.as_str(), "%2e%2e%2f%2e%2e%2fmodels"] {
        for route in ["/v1/models/{}/predict", "/v2/models/{}/infer", "/predictions/{}", "/v1/models/{}"] {
            let url = server.url(&route.replace("{}", name));
            let r = client().post(&url).header("content-type", "image/jpeg").body(jpeg.clone()).send().unwrap();
            let status = r.status().as_u16();
            assert!((400..500).contains(&status), "{url}: {status}");
        }
    }
    for (what, (status, body), expected) in cases {
        assert_eq!(status, expected, "{what}: {body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
    }
    assert_eq!(client().get(server.url("/health/ready")).send().unwrap().status(), 200, "still serving");
}

#[test]
fn a_hundred_bombs_are_refused_before_decoding_and_memory_stays_flat() {
    let server = corpus_server();
    let bombs: Vec<_> = corpus("rejected").into_iter().filter(|(name, _)| name.starts_with("bomb_")).collect();
    assert_eq!(bombs.len(), 3);
    // Warm up the allocator and the paths first, so the measurement sees steady state.
    for (name, bytes) in &bombs {
        send(&server, InputPath::Raw, name, bytes);
    }
    let before = resident_kib(server.pid());
    let started = Instant::now();
    for i in 0..100 {
        let (name, bytes) = &bombs[i % bombs.len()];
        let (status, body) = send(&server, PATHS[i % PATHS.len()], name, bytes);
        assert_eq!(status, 400, "{name}: {body}");
        let message = body["error"]["message"].as_str().or(body["error"].as_str()).unwrap_or_default().to_string();
        assert!(message.contains("pixel"), "{name}: refused for the wrong reason: {body}");
    }
    let after = resident_kib(server.pid());
    let elapsed = started.elapsed();
    eprintln!("100 bombs: resident {before} KiB → {after} KiB in {elapsed:?}");
    // A single 100000 × 100000 decode would need 28 GiB; a few MiB of allocator noise is fine.
    assert!(after < before + 32 * 1024, "resident memory grew from {before} to {after} KiB");
    assert!(elapsed < Duration::from_secs(20), "bombs took {elapsed:?}: were they decoded?");
}

#[test]
fn a_model_exported_for_another_shape_fails_only_those_requests() {
    let server = corpus_server();
    let predict = server.url("/v1/models/fixed_shape/predict");
    let post = |w: u32, h: u32| {
        let r = client().post(&predict).header("content-type", "image/png").body(encode(&synthetic_image(w, h, 3), image::ImageFormat::Png)).send().unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().unwrap())
    };
    assert_eq!(post(32, 32).0, 200);
    let (status, body) = post(48, 40);
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "model_failed");
    assert!(body["error"]["message"].as_str().unwrap().contains("fixed_shape"), "{body}");
    // The same worker serves on.
    for _ in 0..3 {
        assert_eq!(post(32, 32).0, 200);
    }
    let metrics = client().get(server.url("/metrics")).send().unwrap().text().unwrap();
    assert!(!metrics.lines().any(|l| l.starts_with("visionserve_worker_restarts_total{model=\"fixed_shape\"}")), "no restart was needed");
}

/// Reads from `stream` until the server closes it; returns what came and how long it took.
fn read_until_closed(mut stream: TcpStream, limit: Duration) -> (String, Duration) {
    stream.set_read_timeout(Some(limit)).unwrap();
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server kept the connection open for {:?}: {e}", started.elapsed()),
        }
    }
    (String::from_utf8_lossy(&received).into_owned(), started.elapsed())
}

#[test]
fn slow_clients_are_cut_off_and_the_connection_limit_answers_503() {
    let repo = test_models();
    let server = Server::start(&[
        "--model-repository", repo.to_str().unwrap(), "--models", "tiny_ssd",
        "--header-read-timeout-secs", "2", "--body-timeout-secs", "2", "--max-connections", "4",
    ]);
    assert_eq!(server.wait_until_settled(Duration::from_secs(60)).status(), 200);
    let addr = server.base.trim_start_matches("http://").to_string();

    // Slowloris: headers that never end are cut after the header timeout.
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\n").unwrap();
    let (_, took) = read_until_closed(slow, Duration::from_secs(10));
    assert!(took < Duration::from_secs(5), "slow headers held the connection for {took:?}");

    // A slow upload: the body stalls after a few bytes and is refused after the body timeout.
    let mut upload = TcpStream::connect(&addr).unwrap();
    upload
        .write_all(b"POST /v1/models/tiny_ssd/predict HTTP/1.1\r\nhost: x\r\ncontent-type: image/jpeg\r\ncontent-length: 100000\r\n\r\n\xff\xd8\xff")
        .unwrap();
    let (answer, took) = read_until_closed(upload, Duration::from_secs(15));
    assert!(took < Duration::from_secs(8), "a stalled upload held the connection for {took:?}");
    assert!(answer.starts_with("HTTP/1.1 4"), "a stalled upload got: {answer}");

    // Four kept-alive connections fill the limit (each answered once, so each is surely
    // accepted); the fifth is told so, at once.
    let held: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut stream = TcpStream::connect(&addr).unwrap();
            stream.write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
            let mut answer = [0u8; 12];
            stream.read_exact(&mut answer).unwrap();
            assert_eq!(&answer[9..12], b"200");
            stream
        })
        .collect();
    let extra = TcpStream::connect(&addr).unwrap();
    let (answer, took) = read_until_closed(extra, Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 503"), "over the limit: {answer}");
    assert!(answer.contains("too_many_connections") && answer.contains("x-request-id: "), "{answer}");
    assert!(took < Duration::from_secs(2));
    drop(held);
    // The freed slots serve again.
    std::thread::sleep(Duration::from_millis(300));
    let metrics = client().get(server.url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains("visionserve_connections_refused_total"), "refusals are counted");
}

#[test]
fn sigterm_under_load_answers_every_accepted_request_then_exits_zero() {
    let repo = test_models();
    let mut server = Server::start(&["--model-repository", repo.to_str().unwrap(), "--models", MODEL, "--shutdown-grace-secs", "30"]);
    assert_eq!(server.wait_until_settled(Duration::from_secs(120)).status(), 200);
    let image = encode(&synthetic_image(320, 240, 5), image::ImageFormat::Jpeg);
    let url = server.url(&format!("/v1/models/{MODEL}/predict"));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (url, image) = (url.clone(), image.clone());
            std::thread::spawn(move || {
                let r = client().post(&url).header("content-type", "image/jpeg").body(image).send();
                r.map(|r| (r.status().as_u16(), r.json::<Value>().ok()))
            })
        })
        .collect();
    // Wait until all 16 are inside the server (answered or in flight), then ask it to stop.
    let metrics_url = server.url("/metrics");
    let started = Instant::now();
    let model_label = format!("model=\"{MODEL}\"");
    loop {
        let text = client().get(&metrics_url).send().unwrap().text().unwrap();
        let accepted: f64 = text
            .lines()
            .filter(|l| l.starts_with("visionserve_in_flight_requests{") || l.starts_with("visionserve_requests_total{"))
            .filter(|l| l.contains(&model_label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if accepted >= 16.0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "requests never all got in: {accepted}");
        std::thread::sleep(Duration::from_millis(2));
    }
    unsafe {
        libc::kill(server.pid() as i32, libc::SIGTERM);
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(TcpStream::connect(server.base.trim_start_matches("http://")).is_err(), "new connections are refused while draining");
    for c in clients {
        let (status, body) = c.join().unwrap().expect("an accepted request lost its answer");
        assert_eq!(status, 200);
        assert_eq!(body.unwrap()["results"][0]["predictions"].as_array().unwrap().len(), 5, "a full answer");
    }
    let exited = Instant::now();
    loop {
        if let Some(status) = server.try_wait() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(exited.elapsed() < Duration::from_secs(30), "the server did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends a `bytes`-long upload to `path` in 64 kB writes, then reads the answer. Every write
/// must go through: a server that answered without reading would reset the connection.
fn upload_then_read(addr: &str, path: &str, extra_headers: &str, bytes: usize) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: image/jpeg\r\ncontent-length: {bytes}\r\n{extra_headers}\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut sent = 0;
    while sent < bytes {
        let n = chunk.len().min(bytes - sent);
        if let Err(e) = stream.write_all(&chunk[..n]) {
            panic!("{path}: the upload broke after {sent} of {bytes} bytes ({e}): the server answered without reading it");
        }
        sent += n;
    }
    read_until_closed(stream, Duration::from_secs(30)).0
}

#[test]
fn an_unread_upload_is_read_before_the_refusal_goes_back() {
    let repo = test_models();
    let server = Server::start(&["--model-repository", repo.to_str().unwrap(), "--models", "tiny_ssd", "--api-keys", "upload-key"]);
    assert_eq!(server.wait_until_settled(Duration::from_secs(60)).status(), 200);
    let addr = server.base.trim_start_matches("http://").to_string();
    // 16 MB: more than loopback's socket buffers hold, under the 20 MB body limit.
    let size = 16 * 1024 * 1024;
    let key = "authorization: Bearer upload-key\r\n";
    for (path, headers, status) in [
        ("/predictions/no_such_model", key, "404"),
        ("/v2/models/tiny_ssd/infer", "", "401"),
        ("/v1/models/tiny_ssd/predict", "", "401"),
        ("/no/such/route", "", "404"),
    ] {
        let answer = upload_then_read(&addr, path, headers, size);
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{path}: {}", answer.lines().next().unwrap_or(""));
    }
    // Over the limit: the 413 is read too (the rest is drained up to the limit once more).
    let answer = upload_then_read(&addr, "/predictions/tiny_ssd", key, 24 * 1024 * 1024);
    assert!(answer.starts_with("HTTP/1.1 413"), "{}", answer.lines().next().unwrap_or(""));
}
