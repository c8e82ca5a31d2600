//! `make bench-poll`: version swaps by repository polling under steady load. mobilenet_v2's
//! TorchScript version from the repository as shipped, copied into a repository of its own
//! (the model file linked), served with `--repository-poll-secs 1 --repository-poll-settle-secs 2`.
//! Its capacity is measured first (closed loop, c=16); then an open loop at 80 % of it, steady,
//! and again while 20 swaps are made one after another: each adds version k+1 and removes
//! version k-1 in one go (two versions on disk), and waits until the listing's default is k+1.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::load::{closed_loop, open_loop, open_loop_while, ServerUnderTest, Stats};

const SWAPS: usize = 20;
const LOAD_SHARE: f64 = 0.8;

pub struct PollFigures {
    pub capacity: f64,
    pub rate: f64,
    pub steady: Stats,
    pub swapping: Stats,
    pub swap_seconds: Vec<f64>,
}

fn write_version(source: &Path, target: &Path) {
    std::fs::create_dir_all(target).unwrap();
    for entry in std::fs::read_dir(source).unwrap().flatten() {
        let real = std::fs::canonicalize(entry.path()).unwrap();
        std::os::unix::fs::symlink(real, target.join(entry.file_name())).unwrap();
    }
}

fn default_version(base: &str) -> Option<String> {
    let listing: serde_json::Value = reqwest::blocking::get(format!("{base}/v1/models")).ok()?.json().ok()?;
    let model = listing["models"].as_array()?.iter().find(|m| m["name"] == "mobilenet_v2")?;
    (model["status"] == "ready").then(|| model["default_version"].as_str().map(String::from)).flatten()
}

pub fn measure(binary: &Path, repository: &Path, jpeg: &[u8], seconds: f64) -> PollFigures {
    let source = repository.join("mobilenet_v2").join("1");
    let repo = tempfile::tempdir().unwrap();
    let model_dir: PathBuf = repo.path().join("mobilenet_v2");
    write_version(&source, &model_dir.join("1"));
    let flags = ["--repository-poll-secs", "1", "--repository-poll-settle-secs", "2"];
    let server = ServerUnderTest::start_as_shipped_with(binary, repo.path(), &flags);
    let url = server.url("mobilenet_v2");
    let duration = Duration::from_secs_f64(seconds);
    println!("[bench] polling: capacity, closed loop c=16, {seconds} s");
    let capacity = closed_loop(&url, jpeg, 16, duration).throughput;
    let rate = capacity * LOAD_SHARE;
    println!("[bench] polling: {capacity:.1} req/s; steady open loop at {rate:.1} req/s, {seconds} s");
    let steady = open_loop(&url, jpeg, rate, duration);
    println!("[bench] polling: {SWAPS} swaps under the same load");
    let done = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (done, base, model_dir) = (Arc::clone(&done), server.base.clone(), model_dir.clone());
        std::thread::spawn(move || {
            let mut times = Vec::new();
            for k in 2..SWAPS + 2 {
                let started = Instant::now();
                write_version(&source, &model_dir.join(k.to_string()));
                if k > 2 {
                    std::fs::remove_dir_all(model_dir.join((k - 2).to_string())).unwrap();
                }
                while default_version(&base).as_deref() != Some(k.to_string().as_str()) {
                    assert!(started.elapsed() < Duration::from_secs(120), "swap to version {k} not seen");
                    std::thread::sleep(Duration::from_millis(50));
                }
                times.push(started.elapsed().as_secs_f64());
                println!("[bench]   swap {} of {SWAPS}: version {k} serving after {:.1} s", k - 1, started.elapsed().as_secs_f64());
            }
            done.store(true, Ordering::Relaxed);
            times
        })
    };
    let swapping = open_loop_while(&url, jpeg, rate, &|_| !done.load(Ordering::Relaxed));
    let swap_seconds = swapper.join().unwrap();
    PollFigures { capacity, rate, steady, swapping, swap_seconds }
}

pub fn render(f: &PollFigures, seconds: f64) -> String {
    let mean = f.swap_seconds.iter().sum::<f64>() / f.swap_seconds.len() as f64;
    let ratio = f.swapping.p99 / f.steady.p99;
    let failed = f.swapping.errors + f.swapping.refused;
    format!(
        "\nmobilenet_v2 version 1 (TorchScript) as shipped, `--repository-poll-secs 1 --repository-poll-settle-secs 2`; \
         capacity {:.1} req/s (closed loop c=16, {seconds} s); open loop at {:.0} % of it ({:.1} req/s) on the 640×480 JPEG. \
         {SWAPS} swaps, each adding version k+1 and removing k-1, {:.1} s each on average (settle and poll included), {:.0} s in all.\n\n\
         | phase | answered req/s | p50 ms | p99 ms | refused (503) | errors |\n|---|---|---|---|---|---|\n\
         | steady, {seconds} s | {:.1} | {:.1} | {:.1} | {} | {} |\n\
         | during the swaps | {:.1} | {:.1} | {:.1} | {} | {} |\n\n\
         Failed requests during the swaps: **{failed}** (target 0: {}); p99 during the swaps ÷ steady: **{ratio:.2}** (target ≤ 1.2: {}).\n",
        f.capacity,
        LOAD_SHARE * 100.0,
        f.rate,
        mean,
        f.swap_seconds.iter().sum::<f64>(),
        f.steady.throughput, f.steady.p50, f.steady.p99, f.steady.refused, f.steady.errors,
        f.swapping.throughput, f.swapping.p50, f.swapping.p99, f.swapping.refused, f.swapping.errors,
        if failed == 0 { "met" } else { "missed" },
        if ratio <= 1.2 { "met" } else { "missed" },
    )
}

pub fn rows(f: &PollFigures) -> Vec<(&'static str, Stats)> {
    vec![("steady, 80 %", f.steady.clone()), ("20 swaps, 80 %", f.swapping.clone())]
}
