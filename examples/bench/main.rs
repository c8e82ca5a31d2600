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
//!
//! `ceiling.rs` measures in process, `load.rs` drives the server, `report.rs` writes tables and
//! charts; this file runs them in order.

mod ceiling;
mod load;
mod pipeline;
mod poll;
mod perf_analyzer;
mod protocols;
mod report;
mod shipped;
mod swarm;
mod tls;

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use clap::Parser;
use visionserve::model_config::{ModelConfig, ModelFormat};

use ceiling::{format_name, measure_ceiling, model_name};
use load::{closed_loop, open_loop, Row, ServerUnderTest, Stats};
use report::{draw_chart, draw_format_chart, render_formats, render_report, split_name, FormatSummary};

#[derive(Parser)]
struct Args {
    /// The server binary.
    #[arg(long, default_value = "target/release/visionserve")]
    server: PathBuf,
    /// Model folders to measure (config.toml + model file); a numbered version folder
    /// (`models/mobilenet_v2/2`) is measured under its model's name, labelled with its format.
    #[arg(long, value_delimiter = ',', required_unless_present_any = ["url", "shipped", "protocols", "pipeline", "cache", "perf_analyzer", "tls", "poll", "swarm"])]
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
    /// Instead of the sweep: the server over this repository as shipped (configs untouched,
    /// every version loaded), each model on the 640×480 and a 12 MP photo at concurrency 1,
    /// 16 and 160 (a retry storm). Appends the table to `--out`, draws `shipped.png`.
    #[arg(long)]
    shipped: Option<PathBuf>,

    /// A Python with PIL, for `--shipped` to time PIL's `draft()` decoding of the 12 MP photo
    /// in the same run (the yardstick of scaled decoding).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Also (or, without --models, only): REST against gRPC on this repository's default
    /// classifier as shipped — /v1, V2 binary, gRPC BYTES and gRPC UINT8 at concurrency 1 and
    /// 16, three interleaved runs. Appends the table to `--out`, draws `protocols.png`.
    #[arg(long)]
    protocols: Option<PathBuf>,
    /// Also (or, without --models, only): the pipeline `detect_then_classify` of this repository
    /// against its steps on a photo with five detections. Appends to `--out`, draws `pipeline.png`.
    #[arg(long)]
    pipeline: Option<PathBuf>,
    /// Also (or, without --models, only): mobilenet_v2 of this repository with the response
    /// cache on, the same photo again and again (hits), against the server without it; c=1.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Instead of everything else: Triton's perf_analyzer (this executable) beside our load
    /// generator on `--repository`'s mobilenet_v2 as shipped, over HTTP and gRPC, concurrency
    /// 1, 4 and 16. Appends the table to `--out`, draws `perf_analyzer.png`.
    #[arg(long, requires = "repository")]
    perf_analyzer: Option<PathBuf>,
    /// Also (or, without --models, only): mobilenet_v2 of this repository over TLS against
    /// plain HTTP, keep-alive at c=16 and a new connection per request. Draws `tls.png`.
    #[arg(long)]
    tls: Option<PathBuf>,
    /// Also (or, without --models, only): 20 version swaps of this repository's mobilenet_v2
    /// by repository polling under an open loop at 80 % of capacity. Draws `polling.png`.
    #[arg(long)]
    poll: Option<PathBuf>,
    /// Instead of everything else: `make swarm-test`'s load through the stack's proxy, this
    /// predict URL, until `--swarm-events` holds `done` (see examples/bench/swarm.rs). Appends
    /// the table to `--out`, draws `swarm.png` in `--chart-dir`.
    #[arg(long, requires = "swarm_events")]
    swarm: Option<String>,
    /// The events file `--swarm` shares with scripts/swarm-test.sh.
    #[arg(long)]
    swarm_events: Option<PathBuf>,
    /// Where `--swarm` writes its JSON summary for the script to judge.
    #[arg(long)]
    swarm_summary: Option<PathBuf>,
    /// `--swarm` stops after this many seconds even without `done`.
    #[arg(long, default_value_t = 900)]
    swarm_limit_secs: u64,
    /// The model repository `--perf-analyzer` serves.
    #[arg(long)]
    repository: Option<PathBuf>,
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
        // Answered requests only in req/s and latencies (goodput); refusals (503) apart, with
        // the share of the machine the load generator itself used.
        println!("| concurrency | req/s answered | p50 ms | p95 ms | p99 ms | refused | refused p99 ms | errors | generator CPU |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for &c in &args.concurrency {
            let (cpu_before, started) = (process_cpu_seconds(), std::time::Instant::now());
            let s = closed_loop(url, &body, c, Duration::from_secs_f64(args.seconds));
            let share = (process_cpu_seconds() - cpu_before) / started.elapsed().as_secs_f64() / cores as f64;
            println!(
                "| {c} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {} | {:.0} % |",
                s.throughput, s.p50, s.p95, s.p99, s.refused, s.refused_p99, s.errors, share * 100.0
            );
        }
        return;
    }
    if let (Some(url), Some(events)) = (&args.swarm, &args.swarm_events) {
        let figures = swarm::measure(url, &body, events, args.seconds, Duration::from_secs(args.swarm_limit_secs));
        std::fs::create_dir_all(&args.chart_dir).unwrap();
        let chart = args.chart_dir.join("swarm.png");
        swarm::draw_timeline(&chart, &figures);
        let report = format!("\n## Swarm, {} — {cores} cores, {cpu}\n{}\n![swarm timeline]({})\n", utc_now(), swarm::render(&figures), chart.display());
        println!("{report}");
        let mut out = std::fs::OpenOptions::new().create(true).append(true).open(&args.out).unwrap();
        out.write_all(report.as_bytes()).unwrap();
        if let Some(path) = &args.swarm_summary {
            std::fs::write(path, serde_json::to_vec_pretty(&swarm::summary_json(&figures)).unwrap()).unwrap();
        }
        return;
    }
    if let Some(repository) = &args.shipped {
        let photos = shipped::photos(&body);
        println!("[bench] as shipped: {repository:?}; photos: {}", photos.iter().map(|(n, b)| format!("{n} ({} bytes)", b.len())).collect::<Vec<_>>().join(", "));
        let draft = shipped::pil_draft_ms(args.python.as_deref(), &photos[1].1);
        println!("[bench] PIL draft() on the 12 MP photo: {draft:?}");
        let rows = shipped::measure(&args.server, repository, &photos, args.seconds);
        println!("[bench] all models at once");
        let mixed = shipped::measure_mixed(&args.server, repository, &shipped::models(repository), &photos[0].1, args.seconds);
        let report = format!(
            "\n## As shipped, {} — {cores} cores, {cpu}\n{}{}",
            utc_now(),
            shipped::render(&rows, &draft),
            shipped::render_mixed(&mixed)
        );
        println!("{report}");
        std::fs::create_dir_all(&args.chart_dir).unwrap();
        let chart = args.chart_dir.join("shipped.png");
        shipped::draw(&chart, &rows);
        let mut out = std::fs::OpenOptions::new().create(true).append(true).open(&args.out).unwrap();
        write!(out, "{report}\n![as shipped]({})\n", chart.display()).unwrap();
        println!("[bench] appended to {}, chart {}", args.out.display(), chart.display());
        return;
    }
    if let (Some(tool), Some(repository)) = (&args.perf_analyzer, &args.repository) {
        let rows = perf_analyzer::measure(&args.server, repository, tool, args.seconds);
        std::fs::create_dir_all(&args.chart_dir).unwrap();
        let chart = args.chart_dir.join("perf_analyzer.png");
        perf_analyzer::draw(&chart, &rows);
        let report = format!(
            "\n## perf_analyzer, {} — {cores} cores, {cpu}\n{}\n![perf_analyzer against our load generator]({})\n",
            utc_now(),
            perf_analyzer::render(&rows, args.seconds),
            chart.display()
        );
        println!("{report}");
        let mut out = std::fs::OpenOptions::new().create(true).append(true).open(&args.out).unwrap();
        out.write_all(report.as_bytes()).unwrap();
        println!("[bench] appended to {}, chart {}", args.out.display(), chart.display());
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
    if args.models.is_empty() {
        let mut report = String::new();
        if let Some(repository) = &args.protocols {
            report.push_str(&format!("\n## Protocols, {} — {cores} cores, {cpu}\n{}", utc_now(), protocol_report(&args, repository, &body)));
        }
        if let Some(repository) = &args.pipeline {
            report.push_str(&format!("\n## Pipeline, {} — {cores} cores, {cpu}\n{}", utc_now(), pipeline_report(&args, repository)));
        }
        if let Some(repository) = &args.poll {
            report.push_str(&format!("\n## Repository polling, {} — {cores} cores, {cpu}\n{}", utc_now(), poll_report(&args, repository, &body)));
        }
        if let Some(repository) = &args.tls {
            report.push_str(&format!("\n## TLS, {} — {cores} cores, {cpu}\n{}", utc_now(), tls_report(&args, repository, &body)));
        }
        if let Some(repository) = &args.cache {
            report.push_str(&format!("\n## Response cache, {} — {cores} cores, {cpu}\n{}", utc_now(), cache_report(&args, repository, &body)));
        }
        println!("{report}");
        let mut out = std::fs::OpenOptions::new().create(true).append(true).open(&args.out).unwrap();
        out.write_all(report.as_bytes()).unwrap();
        println!("[bench] appended to {}", args.out.display());
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
    if let Some(repository) = &args.protocols {
        report.push_str(&protocol_report(&args, repository, &body));
    }
    if let Some(repository) = &args.pipeline {
        report.push_str(&pipeline_report(&args, repository));
    }
    if let Some(repository) = &args.cache {
        report.push_str(&cache_report(&args, repository, &body));
    }
    println!("{report}");
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&args.out).unwrap();
    file.write_all(report.as_bytes()).unwrap();
    println!("[bench] appended to {} and drew {}", args.out.display(), args.chart_dir.display());
}

/// mobilenet_v2 answered from the response cache against computed, one client: a table and a
/// chart of the latency quantiles.
fn cache_report(args: &Args, repository: &std::path::Path, body: &[u8]) -> String {
    let seconds = Duration::from_secs_f64(args.seconds);
    let mut rows = Vec::new();
    for (label, flags) in [
        ("cache off (computed)", vec!["--models", "mobilenet_v2"]),
        ("cache on, every request a hit", vec!["--models", "mobilenet_v2", "--response-cache-bytes", "67108864"]),
    ] {
        println!("[bench] response cache: {label}");
        let server = ServerUnderTest::start_as_shipped_with(&args.server, repository, &flags);
        let stats = closed_loop(&server.url("mobilenet_v2"), body, 1, seconds);
        println!("        {:.1} req/s, p50 {:.2} ms, p99 {:.2} ms", stats.throughput, stats.p50, stats.p99);
        rows.push((label, stats));
    }
    let hit = &rows[1].1;
    let mut out = format!(
        "\n### Response cache: mobilenet_v2 as shipped, the 640×480 JPEG ({} bytes uploaded each time), concurrency 1, {} s\n\n\
         | server | req/s | p50 ms | p99 ms |\n|---|---|---|---|\n",
        body.len(),
        args.seconds
    );
    for (label, s) in &rows {
        out.push_str(&format!("| {label} | {:.1} | {:.2} | {:.2} |\n", s.throughput, s.p50, s.p99));
    }
    out.push_str(&format!(
        "\nTarget: a hit's p50 ≤ 2 ms including the upload: {:.2} ms ({}).\n",
        hit.p50,
        if hit.p50 <= 2.0 { "met" } else { "missed" }
    ));
    std::fs::create_dir_all(&args.chart_dir).unwrap();
    let chart = args.chart_dir.join("cache.png");
    report::draw_quantiles(&chart, "mobilenet_v2, one client: computed against cached", &rows);
    out.push_str(&format!("\n![response cache]({})\n", chart.display()));
    out
}

/// The pipeline against its steps: the table and its chart.
fn pipeline_report(args: &Args, repository: &std::path::Path) -> String {
    println!("[bench] the pipeline against its steps, from {repository:?}, as shipped");
    let figures = pipeline::measure(&args.server, repository);
    std::fs::create_dir_all(&args.chart_dir).unwrap();
    let chart = args.chart_dir.join("pipeline.png");
    pipeline::draw(&chart, &figures);
    format!("{}\n![the pipeline against its steps]({})\n", pipeline::render(&figures), chart.display())
}

/// REST against gRPC on the repository's classifier: the table and its chart.
fn poll_report(args: &Args, repository: &std::path::Path, body: &[u8]) -> String {
    let figures = poll::measure(&args.server, repository, body, args.seconds);
    std::fs::create_dir_all(&args.chart_dir).unwrap();
    let chart = args.chart_dir.join("polling.png");
    report::draw_quantiles(&chart, "Version swaps by repository polling at 80 % load: latency", &poll::rows(&figures));
    let timeline = args.chart_dir.join("polling-timeline.png");
    poll::draw_timeline(&timeline, &figures);
    format!(
        "{}\n{}\n![version swaps under load]({})\n![every request during the swaps]({})\n",
        poll::render(&figures, args.seconds),
        poll::refusals_by_moment(&figures),
        chart.display(),
        timeline.display()
    )
}

fn tls_report(args: &Args, repository: &std::path::Path, body: &[u8]) -> String {
    println!("[bench] TLS against plain HTTP: mobilenet_v2 from {repository:?}, as shipped");
    let figures = tls::measure(&args.server, repository, body, args.seconds);
    std::fs::create_dir_all(&args.chart_dir).unwrap();
    let chart = args.chart_dir.join("tls.png");
    report::draw_quantiles(&chart, "TLS against plain HTTP: latency (c=16 keep-alive; new connections)", &tls::rows(&figures));
    format!("{}\n![TLS against plain HTTP]({})\n", tls::render(&figures, args.seconds), chart.display())
}

fn protocol_report(args: &Args, repository: &std::path::Path, body: &[u8]) -> String {
    println!("[bench] REST against gRPC: {} from {repository:?}, as shipped", protocols::MODEL);
    let rows = protocols::measure(&args.server, repository, body, args.seconds);
    std::fs::create_dir_all(&args.chart_dir).unwrap();
    let chart = args.chart_dir.join("protocols.png");
    protocols::draw(&chart, &rows);
    format!("{}\n![REST and gRPC]({})\n", protocols::render(&rows, "640×480 JPEG"), chart.display())
}

/// CPU seconds (user + system) this process has used so far.
fn process_cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

fn utc_now() -> String {
    let out = Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output().ok();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}

fn sample_jpeg() -> Vec<u8> {
    let source = image::load_from_memory(include_bytes!("../../assets/samples/coffee.jpg")).unwrap();
    let resized = source.resize_exact(640, 480, image::imageops::FilterType::Triangle);
    let mut out = std::io::Cursor::new(Vec::new());
    resized.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
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
/// The label of the server as a user gets it in the side-by-side comparison.
const SHIPPED: &str = "visionserve as shipped";

/// Starts one visionserve setting of the comparison.
type Start<'a> = Box<dyn Fn() -> ServerUnderTest + 'a>;

/// Runs clear of noise for #15's ratio targets: as shipped against the best hand-tuned setting
/// of the sweep at concurrency 16 (req/s) and at concurrency 1 (p50), three rounds, the
/// settings interleaved within each round, each on the small photo; the medians compared.
fn interleaved_medians(
    starts: &[(String, Start<'_>)],
    results: &[(String, &'static str, usize, Stats)],
    name: &str,
    photo: &(&'static str, Vec<u8>),
    duration: Duration,
) -> String {
    let hand_tuned = |c: usize, better: &dyn Fn(&Stats, &Stats) -> std::cmp::Ordering| {
        results
            .iter()
            .filter(|(l, p, cc, _)| l.starts_with("visionserve") && l != SHIPPED && *p == photo.0 && *cc == c)
            .max_by(|a, b| better(&a.3, &b.3))
            .map(|(l, ..)| l.clone())
    };
    let (Some(best16), Some(best1)) = (
        hand_tuned(16, &|a, b| a.throughput.total_cmp(&b.throughput)),
        hand_tuned(1, &|a, b| b.p50.total_cmp(&a.p50)),
    ) else {
        return String::new();
    };
    let mut labels = vec![SHIPPED.to_string(), best16.clone()];
    if !labels.contains(&best1) {
        labels.push(best1.clone());
    }
    // (label, concurrency) -> one Stats per round
    let mut runs: Vec<(String, usize, Vec<Stats>)> = Vec::new();
    for round in 1..=3 {
        for label in &labels {
            let Some((_, start)) = starts.iter().find(|(l, _)| l == label) else { continue };
            let server = start();
            for c in [1, 16] {
                println!("[compare] interleaved round {round}: {label}, {}, concurrency {c}", photo.0);
                let stats = closed_loop(&server.url(name), &photo.1, c, duration);
                match runs.iter_mut().find(|(l, cc, _)| l == label && *cc == c) {
                    Some((_, _, all)) => all.push(stats),
                    None => runs.push((label.clone(), c, vec![stats])),
                }
            }
        }
    }
    // One setting's figure at one concurrency, round by round.
    let samples = |label: &str, c: usize, of: &dyn Fn(&Stats) -> f64| -> Vec<f64> {
        runs.iter().filter(|(l, cc, _)| l == label && *cc == c).flat_map(|(_, _, all)| all.iter().map(of)).collect()
    };
    let median = |label: &str, c: usize, of: &dyn Fn(&Stats) -> f64| {
        let mut values = samples(label, c, of);
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let values = |label: &str, c: usize, of: &dyn Fn(&Stats) -> f64| {
        samples(label, c, of).iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join(", ")
    };
    let throughput = |s: &Stats| s.throughput;
    let p50 = |s: &Stats| s.p50;
    let (shipped16, tuned16) = (median(SHIPPED, 16, &throughput), median(&best16, 16, &throughput));
    let (shipped1, tuned1) = (median(SHIPPED, 1, &p50), median(&best1, 1, &p50));
    format!(
        "\nAs shipped against the best hand-tuned settings of this sweep, three interleaved rounds on the {} photo (medians; each round's figures in brackets):\n\n\
         | | as shipped | best hand-tuned | ratio | target |\n|---|---|---|---|---|\n\
         | concurrency 16, req/s | {shipped16:.1} ({}) | {tuned16:.1} ({}; {best16}) | **{:.2}×** | ≥ 0.95× |\n\
         | concurrency 1, p50 ms | {shipped1:.1} ({}) | {tuned1:.1} ({}; {best1}) | **{:.2}×** | ≤ 1.1× |\n",
        photo.0,
        values(SHIPPED, 16, &throughput),
        values(&best16, 16, &throughput),
        shipped16 / tuned16,
        values(SHIPPED, 1, &p50),
        values(&best1, 1, &p50),
        shipped1 / tuned1,
    )
}

fn compare(args: &Args, body: &[u8], cpu: &str, cores: usize) {
    let name = model_name(&args.models[0]);
    let duration = Duration::from_secs_f64(args.seconds);
    // The bench's 640×480 photo at concurrency 1 and 16, and the same photo at 0.1, 1, 3 and
    // 12 MP (the last one phone-size) at 16.
    let photos = shipped::photos(body);
    let sizes = shipped::photo_sizes();
    let mut legs: Vec<(&'static str, &[u8], usize)> = vec![(photos[0].0, &photos[0].1, 1), (photos[0].0, &photos[0].1, 16)];
    legs.extend(sizes.iter().map(|(name, bytes)| (*name, bytes.as_slice(), 16)));
    let mut results: Vec<(String, &'static str, usize, Stats)> = Vec::new();
    let run = |label: &str, url: &str, results: &mut Vec<(String, &'static str, usize, Stats)>| {
        for &(photo, bytes, c) in &legs {
            println!("[compare] {label}, {photo}, concurrency {c}");
            let stats = closed_loop(url, bytes, c, duration);
            println!("          {:.1} req/s, p99 {:.1} ms, errors {}", stats.throughput, stats.p99, stats.errors + stats.refused);
            results.push((label.to_string(), photo, c, stats));
        }
    };
    // Every visionserve setting, by label, with a way to start it again (for the interleaved
    // runs below). As a user gets it first: the repository the model folder is in, configs
    // untouched, only this model (every version; its default serves).
    let mut starts: Vec<(String, Start<'_>)> = Vec::new();
    if let Some(repository) = args.models[0].parent().and_then(|family| family.parent()) {
        let model = name.clone();
        starts.push((SHIPPED.to_string(), Box::new(move || ServerUnderTest::start_as_shipped_only(&args.server, repository, &model))));
    }
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
            starts.push((label, Box::new(move || ServerUnderTest::start(&args.server, dir, split, batching, 64))));
        }
    }
    for (label, start) in &starts {
        let server = start();
        run(label, &server.url(&name), &mut results);
    }
    for entry in &args.compare {
        let (label, url) = entry.split_once('=').expect("--compare takes LABEL=URL");
        run(label, url, &mut results);
    }
    let mut report = format!(
        "\n## Side by side, {} — {cores} cores, {cpu}\n\nThe same model (`{name}`; the other servers and visionserve's `torchscript` rows serve its TorchScript file, visionserve's `aoti` rows its AOTInductor package of the same weights, `as shipped` the model's folder as `make run` serves it), the same photos (the bench's 640×480 JPEG, and one photo at 0.1, 1, 3 and 12 MP — {} — quality 92), the same closed-loop client, {} s per step, 127.0.0.1. Errors include refusals.\n\n| server and setting | photo | concurrency | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|---|\n",
        utc_now(),
        sizes.iter().map(|(n, b)| format!("{n} {} bytes", b.len())).collect::<Vec<_>>().join(", "),
        args.seconds
    );
    for (label, photo, c, s) in &results {
        report += &format!("| {label} | {photo} | {c} | {:.1} | {:.1} | {:.1} | {} |\n", s.throughput, s.p50, s.p99, s.errors + s.refused);
    }
    let best_on = |ours: bool, photo: &str| {
        results
            .iter()
            .filter(|(l, p, c, _)| *c == 16 && *p == photo && l.starts_with("visionserve") == ours)
            .max_by(|a, b| a.3.throughput.total_cmp(&b.3.throughput))
            .map(|(l, _, c, s)| (l.clone(), *c, s.clone()))
    };
    let best = |ours: bool| best_on(ours, photos[0].0);
    if let (Some(us), Some(them)) = (best_on(true, photos[1].0), best_on(false, photos[1].0)) {
        report += &format!(
            "\nOn the 12 MP photo at concurrency 16, the best visionserve setting ({}) serves **{:.2}×** the best other ({}), {:.1} against {:.1} req/s (target ≥ 3×).\n",
            us.0, us.2.throughput / them.2.throughput.max(1e-9), them.0, us.2.throughput, them.2.throughput
        );
    }
    let best_of = |format: &str| {
        results
            .iter()
            .filter(|(l, p, c, _)| *c == 16 && *p == photos[0].0 && l.starts_with(&format!("visionserve {format}")))
            .max_by(|a, b| a.3.throughput.total_cmp(&b.3.throughput))
            .map(|(l, _, c, s)| (l.clone(), *c, s.clone()))
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
    report += &interleaved_medians(&starts, &results, &name, &photos[0], duration);
    // req/s against photo size: as shipped, the best hand-tuned visionserve setting at each
    // size, and the best other server at each size.
    let line = |label: &str, pick: &dyn Fn(&str) -> bool| {
        let points: Vec<(f64, f64)> = sizes
            .iter()
            .filter_map(|(size, _)| {
                let best = results.iter().filter(|(l, p, c, _)| *c == 16 && p == size && pick(l)).map(|(_, _, _, s)| s.throughput).fold(f64::NAN, f64::max);
                let megapixels: f64 = size.trim_end_matches(" MP").parse().ok()?;
                best.is_finite().then_some((megapixels, best))
            })
            .collect();
        (label.to_string(), points)
    };
    let lines = vec![
        line(SHIPPED, &|l| l == SHIPPED),
        line("visionserve, best hand-tuned setting at each size", &|l| l.starts_with("visionserve") && l != SHIPPED),
        line("other servers, best setting at each size", &|l| !l.starts_with("visionserve")),
    ];
    report += "\n| photo | visionserve as shipped | visionserve best hand-tuned | other best | as shipped ÷ other |\n|---|---|---|---|---|\n";
    for (size, _) in &sizes {
        let at = |k: usize| lines[k].1.iter().find(|p| format!("{} MP", p.0) == *size).map(|p| p.1);
        let cell = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_default();
        let ratio = match (at(0), at(2)) {
            (Some(us), Some(them)) if them > 0.0 => format!("**{:.2}×**", us / them),
            _ => String::new(),
        };
        report += &format!("| {size} | {} | {} | {} | {ratio} |\n", cell(at(0)), cell(at(1)), cell(at(2)));
    }
    std::fs::create_dir_all(&args.chart_dir).unwrap();
    let chart = args.chart_dir.join("photo-size.png");
    shipped::draw_photo_sizes(&chart, &lines);
    report += &format!("\n![req/s against photo size]({})\n", chart.display());
    println!("{report}");
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&args.out).unwrap();
    file.write_all(report.as_bytes()).unwrap();
}
