//! `make bench-tls`: what TLS costs on the default classifier as shipped. Two servers over the
//! same repository, one plain and one with `--tls-cert` (a P-256 certificate made here with
//! openssl), both warm, driven one at a time in interleaved rounds so neither gets the quieter
//! minutes: keep-alive throughput at concurrency 16 (`/v1` predict on the 640×480 photo), and
//! the cost of a new connection (connect, handshake, `GET /health/live`, close), one after another.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::load::{bytes_of, closed_loop_with, http_sender_on, ServerUnderTest, Stats, JPEG};

const ROUNDS: usize = 5;
const CONCURRENCY: usize = 16;
const NEW_CONNECTIONS: usize = 300;

pub struct TlsFigures {
    /// Keep-alive throughput and latency at c=16, per round: (plain, TLS).
    pub rounds: Vec<(Stats, Stats)>,
    /// A new connection each request, sequential: (plain, TLS).
    pub new_connection: (Stats, Stats),
}

/// A CA and a server certificate for 127.0.0.1 in a temporary folder: (folder, CA PEM).
fn certificates() -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir.path()).output().expect("openssl (Debian: apt-get install openssl)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    run(&[&["req", "-x509"], &ec[..], &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=bench CA"]].concat());
    run(&[&["req"], &ec[..], &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]].concat());
    std::fs::write(dir.path().join("ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    run(&["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext"]);
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    (dir, ca)
}

fn client(ca: Option<&[u8]>, keep_alive: bool) -> reqwest::Client {
    let mut builder = reqwest::Client::builder().pool_max_idle_per_host(if keep_alive { CONCURRENCY } else { 0 });
    if let Some(ca) = ca {
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(ca).unwrap());
    }
    builder.build().unwrap()
}

fn predict(url: String, jpeg: &[u8], ca: Option<Vec<u8>>) -> impl Fn() -> crate::load::Send {
    let body = bytes_of(jpeg);
    move || http_sender_on(client(ca.as_deref(), true), &url, body.clone(), &JPEG)
}

/// `NEW_CONNECTIONS` requests one after another, each on a connection of its own.
fn new_connections(url: String, ca: Option<&[u8]>) -> Stats {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = client(ca, false);
        let mut histogram = hdrhistogram::Histogram::<u64>::new(3).unwrap();
        let started = Instant::now();
        for _ in 0..NEW_CONNECTIONS {
            let t = Instant::now();
            let answer = client.get(&url).header("connection", "close").send().await.expect("a new connection");
            assert_eq!(answer.status(), 200);
            let _ = answer.bytes().await;
            histogram.record(t.elapsed().as_micros() as u64).unwrap();
        }
        crate::load::answered(&histogram, started.elapsed())
    })
}

pub fn measure(binary: &Path, repository: &Path, jpeg: &[u8], seconds: f64) -> TlsFigures {
    let (dir, ca) = certificates();
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    let only = ["--models", "mobilenet_v2"];
    let plain = ServerUnderTest::start_as_shipped_with(binary, repository, &only);
    let tls_flags = [&only[..], &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]].concat();
    let tls = ServerUnderTest::start_tls(binary, repository, &tls_flags, &ca);
    let duration = Duration::from_secs_f64(seconds);
    let run_plain = || closed_loop_with(CONCURRENCY, duration, &predict(plain.url("mobilenet_v2"), jpeg, None));
    let run_tls = || closed_loop_with(CONCURRENCY, duration, &predict(tls.url("mobilenet_v2"), jpeg, Some(ca.clone())));
    println!("[bench] TLS: one warm-up run of each, not counted");
    let _ = (run_plain(), run_tls());
    let mut rounds = Vec::new();
    for round in 1..=ROUNDS {
        // Which goes first alternates, so a drift of the machine's speed favours neither.
        let plain_first = round % 2 == 1;
        println!("[bench] TLS round {round} of {ROUNDS}: {}, c={CONCURRENCY}, {seconds} s each", if plain_first { "plain, then TLS" } else { "TLS, then plain" });
        let (p, t) = if plain_first {
            let p = run_plain();
            (p, run_tls())
        } else {
            let t = run_tls();
            (run_plain(), t)
        };
        println!("[bench]   plain {:.1} req/s, TLS {:.1} req/s ({:.3} ×)", p.throughput, t.throughput, t.throughput / p.throughput);
        assert!(p.errors == 0 && t.errors == 0, "errors under load: plain {}, TLS {}", p.errors, t.errors);
        rounds.push((p, t));
    }
    println!("[bench] {NEW_CONNECTIONS} new connections each, one after another");
    let new_plain = new_connections(format!("{}/health/live", plain.base), None);
    let new_tls = new_connections(format!("{}/health/live", tls.base), Some(&ca));
    TlsFigures { rounds, new_connection: (new_plain, new_tls) }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

pub fn render(f: &TlsFigures, seconds: f64) -> String {
    let mut text = format!(
        "\nmobilenet_v2 as shipped (`--models mobilenet_v2`, default version), `/v1` predict of the 640×480 JPEG, \
         keep-alive, closed loop at c={CONCURRENCY}, {seconds} s per run, plain and TLS (ECDSA P-256, TLS 1.3, ring) interleaved \
         (the first of each pair alternating) after one uncounted warm-up run of each:\n\n\
         | round | plain req/s | TLS req/s | TLS ÷ plain | plain p99 ms | TLS p99 ms |\n|---|---|---|---|---|---|\n"
    );
    for (i, (p, t)) in f.rounds.iter().enumerate() {
        text.push_str(&format!("| {} | {:.1} | {:.1} | {:.3} | {:.1} | {:.1} |\n", i + 1, p.throughput, t.throughput, t.throughput / p.throughput, p.p99, t.p99));
    }
    let ratio = median(f.rounds.iter().map(|(p, t)| t.throughput / p.throughput).collect());
    let (p, t) = &f.new_connection;
    text.push_str(&format!(
        "\nMedian TLS ÷ plain: **{ratio:.3}** (target ≥ 0.95: {}).\n\n\
         A new connection per request ({NEW_CONNECTIONS} one after another, `GET /health/live`): plain p50 {:.2} ms / p99 {:.2}, \
         TLS p50 {:.2} ms / p99 {:.2}; **a new TLS connection costs {:.2} ms more** (p50).\n",
        if ratio >= 0.95 { "met" } else { "missed" },
        p.p50, p.p99, t.p50, t.p99, t.p50 - p.p50
    ));
    text
}

pub fn rows(f: &TlsFigures) -> Vec<(&'static str, Stats)> {
    let last = f.rounds.last().expect("a round");
    vec![
        ("plain c=16", last.0.clone()),
        ("TLS c=16", last.1.clone()),
        ("plain new conn", f.new_connection.0.clone()),
        ("TLS new conn", f.new_connection.1.clone()),
    ]
}
