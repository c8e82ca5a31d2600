//! The load: the release binary started on 127.0.0.1 over a one-model repository, driven by a
//! closed loop (a fixed number of clients) or an open loop (a fixed rate), with latency
//! quantiles of the answered and of the refused requests.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::ceiling::model_name;
use crate::Split;

pub struct ServerUnderTest {
    pub child: Child,
    pub base: String,
    /// The gRPC listener, as `http://host:port` for tonic's client.
    pub grpc: String,
    pub _repo: tempfile::TempDir,
}

impl ServerUnderTest {
    pub fn start(binary: &Path, model_dir: &Path, split: Split, batching: bool, queue_capacity: usize) -> Self {
        let repo = tempfile::tempdir().unwrap();
        let name = model_name(model_dir);
        let target = repo.path().join(&name);
        std::fs::create_dir(&target).unwrap();
        let mut config: toml::Table = std::fs::read_to_string(model_dir.join("config.toml")).unwrap().parse().unwrap();
        for entry in std::fs::read_dir(model_dir).unwrap().flatten() {
            if entry.file_name() != "config.toml" {
                std::os::unix::fs::symlink(std::fs::canonicalize(entry.path()).unwrap(), target.join(entry.file_name())).unwrap();
            }
        }
        let runtime = config.entry("runtime").or_insert(toml::Value::Table(Default::default())).as_table_mut().unwrap();
        runtime.insert("workers".into(), (split.workers as i64).into());
        runtime.insert("intra_op_threads".into(), (split.threads as i64).into());
        let batching_table = config.entry("batching").or_insert(toml::Value::Table(Default::default())).as_table_mut().unwrap();
        // Batching on: the model's own batch bound when it has one (an AOTInductor package
        // accepts no more than it was exported for), else 8.
        let own = batching_table.get("max_batch_size").and_then(|v| v.as_integer()).filter(|&n| n > 1).unwrap_or(8);
        batching_table.insert("max_batch_size".into(), (if batching { own } else { 1 }).into());
        batching_table.insert("max_delay_ms".into(), (if batching { 2 } else { 0 }).into());
        batching_table.insert("queue_capacity".into(), (queue_capacity as i64).into());
        std::fs::write(target.join("config.toml"), toml::to_string(&config).unwrap()).unwrap();
        let path = repo.path().to_path_buf();
        Self::spawn(binary, &path, repo, &[])
    }

    /// The server over `repository` exactly as it is (the configs a user gets).
    pub fn start_as_shipped(binary: &Path, repository: &Path) -> Self {
        Self::spawn(binary, repository, tempfile::tempdir().unwrap(), &[])
    }

    /// As shipped, serving only `models` of the repository.
    pub fn start_as_shipped_only(binary: &Path, repository: &Path, models: &str) -> Self {
        Self::start_as_shipped_with(binary, repository, &["--models", models])
    }

    /// As shipped, with these flags added.
    pub fn start_as_shipped_with(binary: &Path, repository: &Path, flags: &[&str]) -> Self {
        Self::spawn(binary, repository, tempfile::tempdir().unwrap(), flags)
    }

    /// As shipped with these flags, which turn TLS on; `ca` (PEM) verifies its certificate.
    pub fn start_tls(binary: &Path, repository: &Path, flags: &[&str], ca: &[u8]) -> Self {
        Self::spawn_with_ca(binary, repository, tempfile::tempdir().unwrap(), flags, Some(ca))
    }

    fn spawn(binary: &Path, repository: &Path, repo: tempfile::TempDir, extra: &[&str]) -> Self {
        Self::spawn_with_ca(binary, repository, repo, extra, None)
    }

    fn spawn_with_ca(binary: &Path, repository: &Path, repo: tempfile::TempDir, extra: &[&str], ca: Option<&[u8]>) -> Self {
        let mut child = Command::new(binary)
            .args(["--addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--model-repository"])
            .arg(repository)
            .args(extra)
            .env("RUST_LOG", "warn,visionserve=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the server");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (grpc_tx, grpc_rx) = std::sync::mpsc::channel();
        // BENCH_SERVER_LOG=<file>: the server's log kept beside the figures, to see what a
        // phase's latencies were made of.
        let mut log = std::env::var_os("BENCH_SERVER_LOG").and_then(|path| std::fs::File::create(path).ok());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(file) = log.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(file, "{line}");
                }
                for (scheme, url_scheme) in [("grpc", "http"), ("grpcs", "https")] {
                    if let Some(addr) = line.split(&format!("listening on {scheme}://")).nth(1) {
                        let _ = grpc_tx.send(format!("{url_scheme}://{}", addr.trim()));
                    }
                }
                for scheme in ["http", "https"] {
                    if let Some(rest) = line.split(&format!("listening on {scheme}://")).nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or_default();
                        let _ = tx.send(format!("{scheme}://{addr}"));
                    }
                }
            }
        });
        let grpc = grpc_rx.recv_timeout(Duration::from_secs(60)).expect("gRPC address");
        let base = rx.recv_timeout(Duration::from_secs(60)).expect("server address");
        let server = ServerUnderTest { child, base, grpc, _repo: repo };
        let started = Instant::now();
        let mut client = reqwest::blocking::Client::builder();
        if let Some(ca) = ca {
            client = client.add_root_certificate(reqwest::Certificate::from_pem(ca).expect("the CA certificate"));
        }
        let client = client.build().unwrap();
        while client.get(format!("{}/health/ready", server.base)).send().map(|r| r.status() != 200).unwrap_or(true) {
            assert!(started.elapsed() < Duration::from_secs(120), "server not ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    pub fn url(&self, model: &str) -> String {
        format!("{}/v1/models/{model}/predict", self.base)
    }

    /// CPU seconds (user + system) the server has used so far, from /proc.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces): utime and stime are the 12th
        // and 13th, in clock ticks.
        let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // SAFETY: sysconf has no preconditions.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        (ticks(11) + ticks(12)) / per_second
    }

    /// The JPEGs the server has decoded at each reduced DCT scale so far (`/metrics`).
    pub fn scaled_decodes(&self) -> Vec<(String, f64)> {
        let text = reqwest::blocking::get(format!("{}/metrics", self.base)).and_then(|r| r.text()).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("visionserve_scaled_decodes_total{scale=\"")?;
                let (scale, count) = rest.split_once("\"}")?;
                Some((scale.to_string(), count.trim().parse().ok()?))
            })
            .collect()
    }

    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
            .unwrap_or(0)
    }
}

impl Drop for ServerUnderTest {
    fn drop(&mut self) {
        // SIGTERM for a graceful drain, then make sure.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub throughput: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub errors: u64,
    pub refused: u64,
    pub refused_p99: f64,
}

#[derive(Clone, Debug)]
pub struct Row {
    pub split: Split,
    pub batching: bool,
    pub concurrency: usize,
    pub stats: Stats,
}

pub fn runtime() -> tokio::runtime::Runtime {
    // One thread for the load generator: it shares the machine with the server.
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// What a load generator saw: the latencies of answered requests and of refusals (503) apart
/// (a client without back-off retries a refusal at once), and the failures.
#[derive(Clone)]
pub struct Outcomes {
    answered: Arc<Mutex<Histogram<u64>>>,
    refused: Arc<Mutex<Histogram<u64>>>,
    errors: Arc<AtomicU64>,
}

impl Outcomes {
    pub fn new() -> Self {
        Outcomes {
            answered: Arc::new(Mutex::new(Histogram::new(3).unwrap())),
            refused: Arc::new(Mutex::new(Histogram::new(3).unwrap())),
            errors: Arc::new(AtomicU64::new(0)),
        }
    }

    /// One request's outcome, as an HTTP status (gRPC's codes mapped to theirs; 0: failed).
    pub fn record(&self, status: u16, took: Duration) {
        let micros = took.as_micros() as u64;
        match status {
            200 => self.answered.lock().unwrap().record(micros).unwrap(),
            503 => self.refused.lock().unwrap().record(micros).unwrap(),
            _ => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn stats(&self, elapsed: Duration) -> Stats {
        let refused = self.refused.lock().unwrap();
        Stats {
            errors: self.errors.load(Ordering::Relaxed),
            refused: refused.len(),
            refused_p99: refused.value_at_quantile(0.99) as f64 / 1000.0,
            ..answered(&self.answered.lock().unwrap(), elapsed)
        }
    }
}

pub fn closed_loop(url: &str, body: &[u8], concurrency: usize, duration: Duration) -> Stats {
    let body = bytes_of(body);
    closed_loop_with(concurrency, duration, &|| http_sender(url, body.clone(), &JPEG, concurrency))
}

/// The headers of a raw JPEG body.
pub const JPEG: [(&str, &str); 1] = [("content-type", "image/jpeg")];

/// A POST of `body` with `headers` to `url`, reading the whole answer, on a client with room
/// for `concurrency` connections.
pub fn http_sender(url: &str, body: axum::body::Bytes, headers: &[(&str, &str)], concurrency: usize) -> Send {
    http_sender_on(reqwest::Client::builder().pool_max_idle_per_host(concurrency).build().unwrap(), url, body, headers)
}

/// The same on a client of the caller's (TLS roots, pool settings).
pub fn http_sender_on(client: reqwest::Client, url: &str, body: axum::body::Bytes, headers: &[(&str, &str)]) -> Send {
    let url = url.to_string();
    let headers: Vec<(String, String)> = headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    Arc::new(move || {
        let mut request = client.post(&url).body(body.clone());
        for (name, value) in &headers {
            request = request.header(name, value);
        }
        Box::pin(async move {
            match request.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    if r.bytes().await.is_ok() { status } else { 0 }
                }
                Err(_) => 0,
            }
        })
    })
}

/// One request of any transport: its status as HTTP's (200 answered, 503 refused, else failed).
pub type Send = Arc<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = u16> + std::marker::Send>> + std::marker::Send + Sync>;

/// `concurrency` clients each sending `send()` back to back for `duration`, after a few
/// warm-up requests; on the one-thread runtime the load generator uses everywhere, where
/// `make_send` makes the sender (its connections live on that runtime).
pub fn closed_loop_with(concurrency: usize, duration: Duration, make_send: &dyn Fn() -> Send) -> Stats {
    let rt = runtime();
    rt.block_on(async {
        let send = make_send();
        for _ in 0..concurrency.min(4) {
            send().await;
        }
        let outcomes = Outcomes::new();
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let (send, outcomes, stop) = (Arc::clone(&send), outcomes.clone(), Arc::clone(&stop));
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        let status = send().await;
                        outcomes.record(status, t.elapsed());
                    }
                })
            })
            .collect();
        tokio::time::sleep(duration).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        outcomes.stats(started.elapsed())
    })
}

/// Throughput and latency quantiles (ms) of the answered requests in `h` (microseconds).
pub fn answered(h: &Histogram<u64>, elapsed: Duration) -> Stats {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Stats { throughput: h.len() as f64 / elapsed.as_secs_f64(), p50: ms(0.5), p95: ms(0.95), p99: ms(0.99), ..Default::default() }
}

pub fn bytes_of(body: &[u8]) -> axum::body::Bytes {
    axum::body::Bytes::copy_from_slice(body)
}

/// Requests at a fixed rate, whether or not earlier ones have been answered.
pub fn open_loop(url: &str, body: &[u8], rate: f64, duration: Duration) -> Stats {
    open_loop_while(url, body, rate, &|started: Instant| started.elapsed() < duration)
}

/// The same for as long as `go_on(started)` says.
pub fn open_loop_while(url: &str, body: &[u8], rate: f64, go_on: &(dyn Fn(Instant) -> bool + Sync)) -> Stats {
    let started = Instant::now();
    let sent = open_loop_timeline(url, body, rate, go_on);
    stats_of(sent.iter(), started.elapsed())
}

/// One request of an open loop: when it was sent (seconds since the Unix epoch, so it lines
/// up with other processes' clocks and logs), its status and how long it took.
pub struct Sent {
    pub at: f64,
    pub status: u16,
    pub took: Duration,
}

pub fn epoch_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// An open loop that keeps every request's outcome, for timelines and phases.
pub fn open_loop_timeline(url: &str, body: &[u8], rate: f64, go_on: &(dyn Fn(Instant) -> bool + Sync)) -> Vec<Sent> {
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    runtime().block_on(async {
        let send = http_sender(url, bytes_of(body), &JPEG, 64);
        let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        let started = Instant::now();
        let mut tasks = Vec::new();
        while go_on(started) {
            interval.tick().await;
            let (send, sent) = (Arc::clone(&send), Arc::clone(&sent));
            tasks.push(tokio::spawn(async move {
                let at = epoch_now();
                let t = Instant::now();
                let status = send().await;
                sent.lock().unwrap().push(Sent { at, status, took: t.elapsed() });
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let mut sent = std::mem::take(&mut *sent.lock().unwrap());
    sent.sort_by(|a, b| a.at.total_cmp(&b.at));
    sent
}

/// The figures of some of those requests, over `elapsed`.
pub fn stats_of<'a>(sent: impl Iterator<Item = &'a Sent>, elapsed: Duration) -> Stats {
    let outcomes = Outcomes::new();
    for s in sent {
        outcomes.record(s.status, s.took);
    }
    outcomes.stats(elapsed)
}
