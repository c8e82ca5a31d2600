//! `make bench`: how close the served throughput comes to what libtorch alone can do here.
//!
//! 1. The ceiling, in process, no HTTP: the same TorchScript file, {1 worker × 2 threads,
//!    2 workers × 1 thread} × batch {1, 4, 8}, with decode and preprocessing excluded and
//!    included.
//! 2. The server (the release binary, on 127.0.0.1), closed-loop load at each concurrency,
//!    for each worker/thread split, with and without dynamic batching.
//! 3. Overload: open-loop at twice the best sustained rate against a short queue.
//!
//! Prints a table, appends it to BENCHMARKS.md and draws a PNG chart. Every run is bounded in
//! time; all traffic goes to 127.0.0.1. `--soak-seconds N` instead runs N seconds at 70 % of
//! the measured capacity and reports the server's resident memory over time.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use plotters::prelude::*;
use tch::{Device, IValue, Tensor};
use visionserve::engine::Backend;
use visionserve::image::{decode_image, preprocess, DecodeLimits};
use visionserve::repository::config::{ModelConfig, ModelFormat, OutputConvention};

#[derive(Parser)]
struct Args {
    /// The server binary.
    #[arg(long, default_value = "target/release/visionserve")]
    server: PathBuf,
    /// Model folders to measure (config.toml + model file); a numbered version folder
    /// (`models/mobilenet_v2/2`) is measured under its model's name, labelled with its format.
    #[arg(long, value_delimiter = ',', required_unless_present = "url")]
    models: Vec<PathBuf>,
    /// Instead of everything else: drive this predict URL of a running server (for example
    /// from docker compose) at each concurrency and print the table.
    #[arg(long)]
    url: Option<String>,
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    /// Seconds of load at each step.
    #[arg(long, default_value_t = 6.0)]
    seconds: f64,
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    #[arg(long, default_value = "docs/bench")]
    chart_dir: PathBuf,
    /// Run a soak test of this many seconds instead of the sweep (first model, best split).
    #[arg(long, default_value_t = 0)]
    soak_seconds: u64,
    /// Instead of the sweep: compare this server (first model) with other servers' predict
    /// URLs for the same model, given as `LABEL=URL` (repeatable), at concurrency 1 and 16.
    #[arg(long)]
    compare: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Split {
    workers: usize,
    threads: usize,
}

const SPLITS: [Split; 2] = [Split { workers: 1, threads: 2 }, Split { workers: 2, threads: 1 }];

fn main() {
    let args = Args::parse();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let body = sample_jpeg();
    println!("[bench] {cores} cores, {cpu}; body: 640×480 JPEG, {} bytes", body.len());
    if let Some(url) = &args.url {
        println!("| concurrency | req/s | p50 ms | p95 ms | p99 ms | errors |\n|---|---|---|---|---|---|");
        for &c in &args.concurrency {
            let s = closed_loop(url, &body, c, Duration::from_secs_f64(args.seconds));
            println!("| {c} | {:.1} | {:.1} | {:.1} | {:.1} | {} |", s.throughput, s.p50, s.p95, s.p99, s.errors);
        }
        return;
    }
    if args.soak_seconds > 0 {
        soak(&args, &body);
        return;
    }
    if !args.compare.is_empty() {
        compare(&args, &body, &cpu, cores);
        return;
    }
    let mut report = format!(
        "\n## Run of {} — {cores} cores, {cpu}\n\nLoad: a 640×480 JPEG (`assets/samples/coffee.jpg` resized), closed loop, {} s per step, 127.0.0.1.\n",
        utc_now(),
        args.seconds
    );
    let mut charts = Vec::new();
    let mut formats: Vec<FormatSummary> = Vec::new();
    for dir in &args.models {
        let name = model_name(dir);
        let config = ModelConfig::parse(&std::fs::read_to_string(dir.join("config.toml")).unwrap()).unwrap();
        let label = format!("{name} ({})", format_name(config.format));
        println!("[bench] {label}: measuring the in-process ceiling");
        let ceiling = measure_ceiling(dir, &config, &body);
        let best_ceiling = ceiling.iter().filter(|c| c.with_preprocessing).map(|c| c.images_per_second).fold(0.0, f64::max);
        let single_forward = ceiling
            .iter()
            .find(|c| c.split == SPLITS[0] && c.batch == 1 && !c.with_preprocessing)
            .map(|c| 1000.0 / c.images_per_second)
            .unwrap_or(0.0);
        let single_with_decode = ceiling
            .iter()
            .find(|c| c.split == SPLITS[0] && c.batch == 1 && c.with_preprocessing)
            .map(|c| 1000.0 / c.images_per_second)
            .unwrap_or(0.0);
        let mut rows = Vec::new();
        for split in SPLITS {
            for batching in [false, true] {
                let server = ServerUnderTest::start(&args.server, dir, split, batching, 64);
                for &c in &args.concurrency {
                    println!("[bench] {label}: {} workers × {} threads, batching {}, concurrency {c}", split.workers, split.threads, if batching { "on" } else { "off" });
                    let stats = closed_loop(&server.url(&name), &body, c, Duration::from_secs_f64(args.seconds));
                    println!("        {:.1} req/s, p50 {:.1} ms, p99 {:.1} ms, errors {}", stats.throughput, stats.p50, stats.p99, stats.errors);
                    rows.push(Row { split, batching, concurrency: c, stats });
                }
            }
        }
        let best = rows.iter().filter(|r| r.concurrency == 16).max_by(|a, b| a.stats.throughput.total_cmp(&b.stats.throughput)).cloned();
        // Overload: the lowest-latency setting at concurrency 1, with a queue of one request
        // per worker, driven at twice the best sustained rate.
        let quick = rows.iter().filter(|r| r.concurrency == 1).min_by(|a, b| a.stats.p99.total_cmp(&b.stats.p99)).cloned();
        let overload = best.as_ref().zip(quick.as_ref()).map(|(b, q)| {
            println!("[bench] {label}: overload at twice {:.1} req/s", b.stats.throughput);
            let server = ServerUnderTest::start(&args.server, dir, q.split, q.batching, q.split.workers);
            let stats = open_loop(&server.url(&name), &body, b.stats.throughput * 2.0, Duration::from_secs_f64(args.seconds));
            (q.split, q.batching, stats)
        });
        report.push_str(&render_report(&label, &ceiling, &rows, best_ceiling, single_forward, single_with_decode, overload.as_ref()));
        formats.push(FormatSummary::of(&name, config.format, &ceiling, &rows, single_with_decode));
        let chart_name = format!("{name}-{}", format_name(config.format));
        charts.push((chart_name, label, rows));
    }
    std::fs::create_dir_all(&args.chart_dir).unwrap();
    for (file, label, rows) in &charts {
        let path = args.chart_dir.join(format!("{file}.png"));
        draw_chart(&path, label, rows);
        report.push_str(&format!("\n![{label}: throughput and p99 against concurrency]({})\n", path.display()));
    }
    if formats.iter().any(|f| f.format == ModelFormat::Aoti) {
        report.push_str(&render_formats(&formats));
        let path = args.chart_dir.join("formats.png");
        draw_format_chart(&path, &formats);
        report.push_str(&format!("\n![TorchScript against AOTInductor, per model]({})\n", path.display()));
    }
    println!("{report}");
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&args.out).unwrap();
    file.write_all(report.as_bytes()).unwrap();
    println!("[bench] appended to {} and drew {}", args.out.display(), args.chart_dir.display());
}

fn utc_now() -> String {
    let out = Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output().ok();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}

fn sample_jpeg() -> Vec<u8> {
    let source = image::load_from_memory(include_bytes!("../assets/samples/coffee.jpg")).unwrap();
    let resized = source.resize_exact(640, 480, image::imageops::FilterType::Triangle);
    let mut out = std::io::Cursor::new(Vec::new());
    resized.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

// --- the ceiling -----------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Ceiling {
    split: Split,
    batch: usize,
    with_preprocessing: bool,
    images_per_second: f64,
}

/// A numbered version folder is named after its model.
fn model_name(dir: &Path) -> String {
    let leaf = dir.file_name().unwrap().to_string_lossy().to_string();
    if leaf.chars().all(|c| c.is_ascii_digit()) {
        if let Some(parent) = dir.canonicalize().ok().and_then(|d| d.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().to_string())) {
            return parent;
        }
    }
    leaf
}

fn format_name(format: ModelFormat) -> &'static str {
    match format {
        ModelFormat::Torchscript => "torchscript",
        ModelFormat::Aoti => "aoti",
    }
}

fn measure_ceiling(dir: &Path, config: &ModelConfig, body: &[u8]) -> Vec<Ceiling> {
    let file = dir.join(config.model_file());
    let (backend, _) = Backend::load(config, &file, Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let module = Arc::new(backend);
    let mut out = Vec::new();
    for split in SPLITS {
        for batch in [1usize, 4, 8] {
            for with_preprocessing in [false, true] {
                let images_per_second = ceiling_run(&module, config, body, split, batch, with_preprocessing, Duration::from_secs(2));
                println!("        {} × {} threads, batch {batch}, preprocessing {}: {images_per_second:.1} img/s",
                    split.workers, split.threads, if with_preprocessing { "included" } else { "excluded" });
                out.push(Ceiling { split, batch, with_preprocessing, images_per_second });
            }
        }
    }
    out
}

fn ceiling_run(module: &Arc<Backend>, config: &ModelConfig, body: &[u8], split: Split, batch: usize, with_preprocessing: bool, duration: Duration) -> f64 {
    let images = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..split.workers)
        .map(|_| {
            let module = Arc::clone(module);
            let config = config.clone();
            let body = body.to_vec();
            let images = Arc::clone(&images);
            std::thread::spawn(move || {
                let _guard = tch::no_grad_guard();
                tch::set_num_threads(split.threads as i32);
                let prepare = || {
                    let rgb = decode_image(&body, DecodeLimits { max_pixels: u64::MAX }).unwrap();
                    preprocess(&rgb, &config.input).unwrap()
                };
                let fixed = prepare();
                let run = |data: &[f32], n: usize| {
                    let g = fixed.geometry;
                    let input = Tensor::from_slice(data).view([n as i64, 3, g.input_height as i64, g.input_width as i64]);
                    if config.output.convention == OutputConvention::TorchvisionDetection {
                        let list: Vec<Tensor> = (0..n as i64).map(|i| input.get(i)).collect();
                        module.forward(IValue::TensorList(list)).unwrap();
                    } else {
                        module.forward(IValue::Tensor(input)).unwrap();
                    }
                };
                let batch_data: Vec<f32> = (0..batch).flat_map(|_| fixed.data.iter().copied()).collect();
                for _ in 0..5 {
                    run(&batch_data, batch); // warm-up: the profiling executor's first runs
                }
                let started = Instant::now();
                while started.elapsed() < duration {
                    if with_preprocessing {
                        let data: Vec<f32> = (0..batch).flat_map(|_| prepare().data).collect();
                        run(&data, batch);
                    } else {
                        run(&batch_data, batch);
                    }
                    images.fetch_add(batch as u64, Ordering::Relaxed);
                }
                started.elapsed()
            })
        })
        .collect();
    let elapsed = handles.into_iter().map(|h| h.join().unwrap()).max().unwrap();
    images.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64()
}

// --- the server ------------------------------------------------------------------------------

struct ServerUnderTest {
    child: Child,
    base: String,
    _repo: tempfile::TempDir,
}

impl ServerUnderTest {
    fn start(binary: &Path, model_dir: &Path, split: Split, batching: bool, queue_capacity: usize) -> Self {
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

        let mut child = Command::new(binary)
            .args(["--addr", "127.0.0.1:0", "--model-repository"])
            .arg(repo.path())
            .env("RUST_LOG", "warn,visionserve=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the server");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let base = rx.recv_timeout(Duration::from_secs(60)).expect("server address");
        let server = ServerUnderTest { child, base, _repo: repo };
        let started = Instant::now();
        while reqwest::blocking::get(format!("{}/health/ready", server.base)).map(|r| r.status() != 200).unwrap_or(true) {
            assert!(started.elapsed() < Duration::from_secs(120), "server not ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn url(&self, model: &str) -> String {
        format!("{}/v1/models/{model}/predict", self.base)
    }

    fn rss_kib(&self) -> u64 {
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
struct Stats {
    throughput: f64,
    p50: f64,
    p95: f64,
    p99: f64,
    errors: u64,
    refused: u64,
    refused_p99: f64,
}

#[derive(Clone, Debug)]
struct Row {
    split: Split,
    batching: bool,
    concurrency: usize,
    stats: Stats,
}

fn runtime() -> tokio::runtime::Runtime {
    // One thread for the load generator: it shares the machine with the server.
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn closed_loop(url: &str, body: &[u8], concurrency: usize, duration: Duration) -> Stats {
    let rt = runtime();
    rt.block_on(async {
        let client = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build().unwrap();
        let body = bytes_of(body);
        // Warm the connections and the model.
        for _ in 0..concurrency.min(4) {
            let _ = client.post(url).header("content-type", "image/jpeg").body(body.clone()).send().await;
        }
        let histogram = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
        let errors = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let (client, body, url) = (client.clone(), body.clone(), url.to_string());
                let (histogram, errors, stop) = (Arc::clone(&histogram), Arc::clone(&errors), Arc::clone(&stop));
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        let ok = match client.post(&url).header("content-type", "image/jpeg").body(body.clone()).send().await {
                            Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                            Err(_) => false,
                        };
                        if ok {
                            histogram.lock().unwrap().record(t.elapsed().as_micros() as u64).unwrap();
                        } else {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(duration).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        let h = histogram.lock().unwrap();
        Stats { errors: errors.load(Ordering::Relaxed), ..answered(&h, started.elapsed()) }
    })
}

/// Throughput and latency quantiles (ms) of the answered requests in `h` (microseconds).
fn answered(h: &Histogram<u64>, elapsed: Duration) -> Stats {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Stats { throughput: h.len() as f64 / elapsed.as_secs_f64(), p50: ms(0.5), p95: ms(0.95), p99: ms(0.99), ..Default::default() }
}

fn bytes_of(body: &[u8]) -> axum::body::Bytes {
    axum::body::Bytes::copy_from_slice(body)
}

/// Requests at a fixed rate, whether or not earlier ones have been answered.
fn open_loop(url: &str, body: &[u8], rate: f64, duration: Duration) -> Stats {
    let rt = runtime();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let accepted = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
        let refused = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
        let errors = Arc::new(AtomicU64::new(0));
        let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        let started = Instant::now();
        let mut tasks = Vec::new();
        while started.elapsed() < duration {
            interval.tick().await;
            let (client, url, body) = (client.clone(), url.to_string(), body.to_vec());
            let (accepted, refused, errors) = (Arc::clone(&accepted), Arc::clone(&refused), Arc::clone(&errors));
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                match client.post(&url).header("content-type", "image/jpeg").body(body).send().await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.bytes().await;
                        accepted.lock().unwrap().record(t.elapsed().as_micros() as u64).unwrap();
                    }
                    Ok(r) if r.status() == 503 => refused.lock().unwrap().record(t.elapsed().as_micros() as u64).unwrap(),
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let a = accepted.lock().unwrap();
        let r = refused.lock().unwrap();
        Stats {
            errors: errors.load(Ordering::Relaxed),
            refused: r.len(),
            refused_p99: r.value_at_quantile(0.99) as f64 / 1000.0,
            ..answered(&a, started.elapsed())
        }
    })
}

// --- the report ------------------------------------------------------------------------------

fn split_name(s: Split) -> String {
    format!("{}×{}", s.workers, s.threads)
}

fn render_report(
    name: &str,
    ceiling: &[Ceiling],
    rows: &[Row],
    best_ceiling: f64,
    single_forward_ms: f64,
    single_with_decode_ms: f64,
    overload: Option<&(Split, bool, Stats)>,
) -> String {
    let mut s = format!("\n### {name}\n\nIn-process ceiling (img/s; workers × threads):\n\n| split | batch | preprocessing excluded | included |\n|---|---|---|---|\n");
    for split in SPLITS {
        for batch in [1, 4, 8] {
            let get = |pre: bool| {
                ceiling.iter().find(|c| c.split == split && c.batch == batch && c.with_preprocessing == pre).map_or(0.0, |c| c.images_per_second)
            };
            s += &format!("| {} | {batch} | {:.1} | {:.1} |\n", split_name(split), get(false), get(true));
        }
    }
    s += "\nServed (closed loop):\n\n| split | batching | concurrency | req/s | p50 ms | p95 ms | p99 ms | errors | server ÷ ceiling |\n|---|---|---|---|---|---|---|---|---|\n";
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.0} % |\n",
            split_name(r.split),
            if r.batching { "on, 2 ms" } else { "off" },
            r.concurrency,
            r.stats.throughput,
            r.stats.p50,
            r.stats.p95,
            r.stats.p99,
            r.stats.errors,
            100.0 * r.stats.throughput / best_ceiling.max(1e-9)
        );
    }
    let best16 = rows.iter().filter(|r| r.concurrency == 16).map(|r| r.stats.throughput).fold(0.0, f64::max);
    let p99_c1 = rows.iter().filter(|r| r.concurrency == 1).map(|r| r.stats.p99).fold(f64::INFINITY, f64::min);
    s += &format!(
        "\n- Best served throughput at concurrency 16: **{best16:.1} req/s** = **{:.0} %** of the best in-process ceiling with decode and preprocessing ({best_ceiling:.1} img/s; target ≥ 90 %).\n",
        100.0 * best16 / best_ceiling.max(1e-9)
    );
    s += &format!(
        "- p99 at concurrency 1 (best setting): **{p99_c1:.1} ms**, against one forward ({single_forward_ms:.1} ms) + decode and preprocessing = {single_with_decode_ms:.1} ms: ratio **{:.2}** (target ≤ 1.3).\n",
        p99_c1 / single_with_decode_ms.max(1e-9)
    );
    if let Some((split, batching, o)) = overload {
        let unloaded_p99 = rows.iter().filter(|r| r.concurrency == 1).map(|r| r.stats.p99).fold(f64::INFINITY, f64::min);
        s += &format!(
            "- Overload (open loop at 2× the best rate; split {}, batching {}, queue of {} = one per worker): accepted {:.1} req/s with p99 {:.1} ms ({:.1}× the unloaded p99; target ≤ 2×); {} refused with 503, p99 of a refusal {:.1} ms (target ≤ 10 ms); {} other errors.\n",
            split_name(*split), if *batching { "on" } else { "off" }, split.workers,
            o.throughput, o.p99, o.p99 / unloaded_p99.max(1e-9), o.refused, o.refused_p99, o.errors
        );
    }
    s
}

/// One model in one format, for the side-by-side table.
struct FormatSummary {
    name: String,
    format: ModelFormat,
    /// One forward at batch 1 (1 worker × 2 threads, preprocessing excluded).
    forward_ms: f64,
    /// Best in-process img/s, preprocessing excluded and included.
    ceiling: f64,
    ceiling_with_preprocessing: f64,
    forward_and_decode_ms: f64,
    c1_p99: f64,
    c16_throughput: f64,
    c16_p99: f64,
}

impl FormatSummary {
    fn of(name: &str, format: ModelFormat, ceiling: &[Ceiling], rows: &[Row], forward_and_decode_ms: f64) -> Self {
        let best = |pre: bool| ceiling.iter().filter(|c| c.with_preprocessing == pre).map(|c| c.images_per_second).fold(0.0, f64::max);
        let forward_ms = ceiling
            .iter()
            .find(|c| c.split == SPLITS[0] && c.batch == 1 && !c.with_preprocessing)
            .map_or(0.0, |c| 1000.0 / c.images_per_second);
        let c1 = rows.iter().filter(|r| r.concurrency == 1).min_by(|a, b| a.stats.p99.total_cmp(&b.stats.p99));
        let c16 = rows.iter().filter(|r| r.concurrency == 16).max_by(|a, b| a.stats.throughput.total_cmp(&b.stats.throughput));
        FormatSummary {
            name: name.to_string(),
            format,
            forward_ms,
            ceiling: best(false),
            ceiling_with_preprocessing: best(true),
            forward_and_decode_ms,
            c1_p99: c1.map_or(0.0, |r| r.stats.p99),
            c16_throughput: c16.map_or(0.0, |r| r.stats.throughput),
            c16_p99: c16.map_or(0.0, |r| r.stats.p99),
        }
    }
}

fn render_formats(formats: &[FormatSummary]) -> String {
    let mut s = String::from(
        "\n### TorchScript against AOTInductor\n\n| model | format | forward, batch 1 (ms) | in-process img/s (no preprocessing) | with preprocessing | served p99 at c=1 (ms) | p99 ÷ (forward + decode) | served req/s at c=16 | p99 at c=16 (ms) |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for f in formats {
        s += &format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} |\n",
            f.name, format_name(f.format), f.forward_ms, f.ceiling, f.ceiling_with_preprocessing, f.c1_p99,
            f.c1_p99 / f.forward_and_decode_ms.max(1e-9), f.c16_throughput, f.c16_p99
        );
    }
    for aoti in formats.iter().filter(|f| f.format == ModelFormat::Aoti) {
        if let Some(ts) = formats.iter().find(|f| f.name == aoti.name && f.format == ModelFormat::Torchscript) {
            s += &format!(
                "\n- {}: AOTInductor forward {:.2}× faster at batch 1; served at c=16 {:.1} req/s = **{:.2}×** the TorchScript in-process ceiling with preprocessing ({:.1} img/s; target ≥ 1.5×) and {:.2}× the ceiling without it ({:.1}); p99 at c=1 ÷ (forward + decode) **{:.2}** (target ≤ 1.3).",
                aoti.name, ts.forward_ms / aoti.forward_ms.max(1e-9), aoti.c16_throughput,
                aoti.c16_throughput / ts.ceiling_with_preprocessing.max(1e-9), ts.ceiling_with_preprocessing,
                aoti.c16_throughput / ts.ceiling.max(1e-9), ts.ceiling, aoti.c1_p99 / aoti.forward_and_decode_ms.max(1e-9)
            );
        }
    }
    s + "\n"
}

/// Bars per model: served req/s at c=16 for each format, beside the TorchScript ceiling.
fn draw_format_chart(path: &Path, formats: &[FormatSummary]) {
    let font: &'static [u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, font);
    let mut names: Vec<&str> = formats.iter().map(|f| f.name.as_str()).collect();
    names.dedup();
    let root = BitMapBackend::new(path, (300 * names.len().max(1) as u32 + 200, 480)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let max = formats.iter().map(|f| f.c16_throughput.max(f.ceiling_with_preprocessing)).fold(1.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption("served req/s at concurrency 16: TorchScript, AOTInductor", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..names.len() as f64, 0f64..max)
        .unwrap();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(names.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 { names.get(i).map(|n| n.to_string()).unwrap_or_default() } else { String::new() }
        })
        .y_desc("req/s")
        .draw()
        .unwrap();
    for (i, name) in names.iter().enumerate() {
        for (slot, format, colour) in [(0.0, ModelFormat::Torchscript, BLUE), (1.0, ModelFormat::Aoti, RED)] {
            if let Some(f) = formats.iter().find(|f| f.name == *name && f.format == format) {
                let x0 = i as f64 + 0.15 + slot * 0.35;
                chart.draw_series(std::iter::once(Rectangle::new([(x0, 0.0), (x0 + 0.3, f.c16_throughput)], colour.filled()))).unwrap();
                if format == ModelFormat::Torchscript {
                    let line = vec![(i as f64 + 0.1, f.ceiling_with_preprocessing), (i as f64 + 0.9, f.ceiling_with_preprocessing)];
                    chart.draw_series(LineSeries::new(line, BLACK.stroke_width(2))).unwrap();
                }
            }
        }
    }
    chart.draw_series(std::iter::empty::<Rectangle<(f64, f64)>>()).unwrap().label("TorchScript, served").legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], BLUE.filled()));
    chart.draw_series(std::iter::empty::<Rectangle<(f64, f64)>>()).unwrap().label("AOTInductor, served").legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], RED.filled()));
    chart.draw_series(std::iter::empty::<PathElement<(f64, f64)>>()).unwrap().label("TorchScript in-process ceiling (with preprocessing)").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.stroke_width(2)));
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).position(SeriesLabelPosition::UpperRight).draw().unwrap();
    root.present().unwrap();
}

fn draw_chart(path: &Path, name: &str, rows: &[Row]) {
    let font: &'static [u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, font);
    let root = BitMapBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let (left, right) = root.split_horizontally(600);
    let concurrencies: Vec<usize> = {
        let mut c: Vec<usize> = rows.iter().map(|r| r.concurrency).collect();
        c.sort();
        c.dedup();
        c
    };
    let x_of = |c: usize| concurrencies.iter().position(|&x| x == c).unwrap() as f64;
    let series: Vec<(String, Vec<&Row>)> = SPLITS
        .iter()
        .flat_map(|&split| [false, true].map(move |batching| (split, batching)))
        .map(|(split, batching)| {
            (
                format!("{} workers×threads, batching {}", split_name(split), if batching { "on" } else { "off" }),
                rows.iter().filter(|r| r.split == split && r.batching == batching).collect(),
            )
        })
        .collect();
    let colours = [RED, BLUE, GREEN, MAGENTA];
    for (area, title, metric) in [
        (&left, format!("{name}: throughput (req/s)"), 0),
        (&right, format!("{name}: p99 latency (ms)"), 1),
    ] {
        let value = |r: &Row| if metric == 0 { r.stats.throughput } else { r.stats.p99 };
        let max = rows.iter().map(value).fold(1.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(-0.2f64..(concurrencies.len() as f64 - 0.8), 0f64..max)
            .unwrap();
        chart
            .configure_mesh()
            .x_labels(concurrencies.len())
            .x_label_formatter(&|x| concurrencies.get(x.round() as usize).map(|c| c.to_string()).unwrap_or_default())
            .x_desc("concurrency")
            .draw()
            .unwrap();
        for ((label, points), colour) in series.iter().zip(colours) {
            let data: Vec<(f64, f64)> = points.iter().map(|r| (x_of(r.concurrency), value(r))).collect();
            chart
                .draw_series(LineSeries::new(data.clone(), colour.stroke_width(2)))
                .unwrap()
                .label(label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
            chart.draw_series(data.iter().map(|&p| Circle::new(p, 3, colour.filled()))).unwrap();
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).position(SeriesLabelPosition::UpperLeft).draw().unwrap();
    }
    root.present().unwrap();
}

// --- soak ------------------------------------------------------------------------------------

fn soak(args: &Args, body: &[u8]) {
    let dir = &args.models[0];
    let name = model_name(dir);
    let split = Split { workers: 2, threads: 1 };
    let server = ServerUnderTest::start(&args.server, dir, split, true, 64);
    println!("[soak] measuring capacity at concurrency 16");
    let capacity = closed_loop(&server.url(&name), body, 16, Duration::from_secs(10)).throughput;
    let rate = capacity * 0.7;
    println!("[soak] {capacity:.1} req/s capacity; {rate:.1} req/s for {} s", args.soak_seconds);
    let warm_rss = server.rss_kib();
    let mut samples = vec![(0u64, warm_rss)];
    let mut total = Stats::default();
    let mut elapsed = 0;
    while elapsed < args.soak_seconds {
        let step = 30.min(args.soak_seconds - elapsed);
        let stats = open_loop(&server.url(&name), body, rate, Duration::from_secs(step));
        elapsed += step;
        let rss = server.rss_kib();
        samples.push((elapsed, rss));
        total.errors += stats.errors + stats.refused;
        println!("[soak] {elapsed:>4} s: RSS {:.1} MiB, {:.1} req/s, p99 {:.1} ms, errors {}", rss as f64 / 1024.0, stats.throughput, stats.p99, stats.errors + stats.refused);
    }
    // Growth measured from the first sample after a minute of load (warm-up done).
    let baseline = samples.iter().find(|(t, _)| *t >= 60).map(|s| s.1).unwrap_or(warm_rss);
    let last = samples.last().unwrap().1;
    let growth = 100.0 * (last as f64 - baseline as f64) / baseline as f64;
    let mut report = format!(
        "\n## Soak of {} — {name}, {} s at {rate:.1} req/s (70 % of {capacity:.1})\n\n| second | RSS MiB |\n|---|---|\n",
        utc_now(),
        args.soak_seconds
    );
    for (t, rss) in &samples {
        report += &format!("| {t} | {:.1} |\n", *rss as f64 / 1024.0);
    }
    report += &format!("\nResident memory grew **{growth:.2} %** after warm-up (target < 5 %); {} errors or refusals.\n", total.errors);
    println!("{report}");
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&args.out).unwrap();
    file.write_all(report.as_bytes()).unwrap();
}

// --- side by side with another server ---------------------------------------------------------

/// visionserve serving each of `--models` (the same model, e.g. its TorchScript file and its
/// AOTInductor package) beside the other servers' URLs.
fn compare(args: &Args, body: &[u8], cpu: &str, cores: usize) {
    let name = model_name(&args.models[0]);
    let duration = Duration::from_secs_f64(args.seconds);
    let mut results: Vec<(String, usize, Stats)> = Vec::new();
    for dir in &args.models {
        let format = ModelConfig::parse(&std::fs::read_to_string(dir.join("config.toml")).unwrap()).unwrap().format;
        let settings = [Split { workers: 2, threads: 1 }, Split { workers: 1, threads: 2 }]
            .into_iter()
            .flat_map(|split| [(split, false), (split, true)]);
        for (split, batching) in settings {
            let label = format!(
                "visionserve {}, {} workers × threads, batching {}",
                format_name(format),
                split_name(split),
                if batching { "on / 2 ms" } else { "off" }
            );
            let server = ServerUnderTest::start(&args.server, dir, split, batching, 64);
            for c in [1usize, 16] {
                println!("[compare] {label}, concurrency {c}");
                let stats = closed_loop(&server.url(&name), body, c, duration);
                println!("          {:.1} req/s, p99 {:.1} ms, errors {}", stats.throughput, stats.p99, stats.errors);
                results.push((label.clone(), c, stats));
            }
        }
    }
    for entry in &args.compare {
        let (label, url) = entry.split_once('=').expect("--compare takes LABEL=URL");
        for c in [1usize, 16] {
            println!("[compare] {label}, concurrency {c}");
            let stats = closed_loop(url, body, c, duration);
            println!("          {:.1} req/s, p99 {:.1} ms, errors {}", stats.throughput, stats.p99, stats.errors);
            results.push((label.to_string(), c, stats));
        }
    }
    let mut report = format!(
        "\n## Side by side, {} — {cores} cores, {cpu}\n\nThe same model (`{name}`; the other servers and visionserve's `torchscript` rows serve its TorchScript file, visionserve's `aoti` rows its AOTInductor package of the same weights), the same 640×480 JPEG, the same closed-loop client, {} s per step, 127.0.0.1.\n\n| server and setting | concurrency | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|\n",
        utc_now(),
        args.seconds
    );
    for (label, c, s) in &results {
        report += &format!("| {label} | {c} | {:.1} | {:.1} | {:.1} | {} |\n", s.throughput, s.p50, s.p99, s.errors);
    }
    let best = |ours: bool| {
        results
            .iter()
            .filter(|(l, c, _)| *c == 16 && l.starts_with("visionserve") == ours)
            .max_by(|a, b| a.2.throughput.total_cmp(&b.2.throughput))
            .cloned()
    };
    let best_of = |format: &str| {
        results
            .iter()
            .filter(|(l, c, _)| *c == 16 && l.starts_with(&format!("visionserve {format}")))
            .max_by(|a, b| a.2.throughput.total_cmp(&b.2.throughput))
            .cloned()
    };
    if let (Some(us), Some(them)) = (best(true), best(false)) {
        report += &format!(
            "\nAt concurrency 16, the best visionserve setting ({}) serves **{:.2}×** the throughput of the best other ({}), {:.1} against {:.1} req/s (target ≥ 1.3×), with p99 {:.0} ms against {:.0} ms (target: lower).\n",
            us.0, us.2.throughput / them.2.throughput.max(1e-9), them.0, us.2.throughput, them.2.throughput, us.2.p99, them.2.p99
        );
        for format in ["torchscript", "aoti"] {
            if let Some(ours) = best_of(format) {
                report += &format!(
                    "- best visionserve {format} setting: {:.1} req/s = **{:.2}×** the best other server{}.\n",
                    ours.2.throughput, ours.2.throughput / them.2.throughput.max(1e-9),
                    if format == "aoti" { " (target ≥ 2×)" } else { "" }
                );
            }
        }
    }
    println!("{report}");
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&args.out).unwrap();
    file.write_all(report.as_bytes()).unwrap();
}
