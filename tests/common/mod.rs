//! What every integration test file shares: the real `visionserve` binary started on an
//! ephemeral port (its log kept for tests to read), an HTTP client, test images, and the
//! checks of the error shape and of metrics.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::Value;

pub struct Server {
    pub base: String,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// The gRPC listener's address, once the server has said it.
    grpc: Arc<Mutex<Option<String>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The random-init test repository made by `models/export.py --set test` (`make test-models`).
pub fn test_models() -> PathBuf {
    let dir = std::env::var("VISIONSERVE_TEST_MODELS").expect(
        "VISIONSERVE_TEST_MODELS is not set: run the suite with `make test`, which exports the test models first",
    );
    let dir = PathBuf::from(dir);
    assert!(dir.is_dir(), "VISIONSERVE_TEST_MODELS={} is not a folder", dir.display());
    dir
}

impl Server {
    /// Starts the server with `args` on 127.0.0.1:0 and waits until it listens.
    pub fn start(args: &[&str]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_visionserve"));
        command.args(["--addr", "127.0.0.1:0"]);
        // gRPC on an ephemeral port too, so servers started in parallel do not collide.
        if !args.contains(&"--grpc-addr") {
            command.args(["--grpc-addr", "127.0.0.1:0"]);
        }
        command
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: prctl in the child before exec; it only asks the kernel to kill the server
        // when this test process dies, so a failed test never leaves a server running.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        // PR_SET_PDEATHSIG fires when the spawning *thread* exits, and test threads end with
        // their test: spawn from a helper thread that lives as long as the test process.
        let (child_tx, child_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = child_tx.send(command.spawn());
            loop {
                std::thread::park();
            }
        });
        let mut child = child_rx.recv().unwrap().expect("starting visionserve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let grpc = Arc::new(Mutex::new(None));
        let (kept, grpc_said) = (Arc::clone(&log), Arc::clone(&grpc));
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                kept.lock().unwrap().push(line.clone());
                if let Some(addr) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                if let Some(addr) = line.split("listening on grpc://").nth(1) {
                    *grpc_said.lock().unwrap() = Some(format!("http://{}", addr.trim()));
                }
                if std::env::var_os("VISIONSERVE_TEST_LOGS").is_some() {
                    eprintln!("[server] {line}");
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(60)).expect("server did not report its address");
        Server { base: format!("http://{addr}"), child, log, grpc }
    }

    /// The gRPC listener (`http://127.0.0.1:<port>`, as tonic's client takes it).
    pub fn grpc_url(&self) -> String {
        let started = Instant::now();
        loop {
            if let Some(url) = self.grpc.lock().unwrap().clone() {
                return url;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "the server did not report a gRPC address");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server and waits until every model it loads is ready.
    pub fn start_ready(args: &[&str]) -> Server {
        let server = Server::start(args);
        let ready = server.wait_until_settled(Duration::from_secs(180));
        assert_eq!(ready.status(), 200, "test models did not all load: {}", ready.text().unwrap());
        server
    }

    /// The server a test file shares: over the test models (only `models` when not empty),
    /// started once, every model ready.
    pub fn shared(cell: &'static OnceLock<Server>, models: &[&str]) -> &'static Server {
        cell.get_or_init(|| {
            let repo = test_models();
            let only = models.join(",");
            let mut args = vec!["--model-repository", repo.to_str().unwrap()];
            if !models.is_empty() {
                args.extend(["--models", only.as_str()]);
            }
            Server::start_ready(&args)
        })
    }

    /// The server's log lines so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Waits until `/health/ready` answers `expected` (200 or 503 with failures settled).
    pub fn wait_until_settled(&self, timeout: Duration) -> reqwest::blocking::Response {
        let client = reqwest::blocking::Client::new();
        let started = Instant::now();
        loop {
            if let Ok(response) = client.get(self.url("/v1/models")).send() {
                let body: serde_json::Value = response.json().unwrap();
                let loading = body["models"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|m| m["status"] == "loading");
                if !loading {
                    return client.get(self.url("/health/ready")).send().unwrap();
                }
            }
            assert!(started.elapsed() < timeout, "models still loading after {timeout:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }
}

/// A synthetic photo-like RGB image: gradients and a few solid shapes.
pub fn synthetic_image(width: u32, height: u32, seed: u8) -> image::RgbImage {
    image::RgbImage::from_fn(width, height, |x, y| {
        let inside = (x / 40 + y / 40 + seed as u32) % 3 == 0;
        if inside {
            image::Rgb([200u8.wrapping_add(seed), 40, 60])
        } else {
            image::Rgb([(x * 255 / width) as u8, (y * 255 / height) as u8, seed.wrapping_mul(37)])
        }
    })
}

pub fn encode(image: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(image.clone()).write_to(&mut out, format).unwrap();
    out.into_inner()
}

pub fn jpeg(width: u32, height: u32, seed: u8) -> Vec<u8> {
    encode(&synthetic_image(width, height, seed), image::ImageFormat::Jpeg)
}

pub fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

/// `POST /v1/models/{model}/predict{query}` with `body`: status and JSON answer.
pub fn predict_raw(server: &Server, model: &str, query: &str, body: Vec<u8>, content_type: &str) -> (u16, Value) {
    let response = client()
        .post(server.url(&format!("/v1/models/{model}/predict{query}")))
        .header("content-type", content_type)
        .body(body)
        .send()
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap())
}

/// The one JSON error shape, with the expected status and code.
pub fn assert_error(status: u16, body: &Value, expected_status: u16, code: &str) {
    assert_eq!(status, expected_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

/// The sum of a metric's samples whose label set contains every one of `labels`.
pub fn metric_value(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
