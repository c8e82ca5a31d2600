//! Triton's perf_analyzer beside our own load generator, on the same server and the same
//! requests: mobilenet_v2 as shipped, the input perf_analyzer makes from the model's metadata
//! (random `UINT8 [1, 224, 224, 3]` pixels, binary tensors over HTTP, `raw_input_contents`
//! over gRPC), concurrency 1, 4 and 16. perf_analyzer's throughput and latencies are its own
//! (its CSV); ours are the closed loop's. Each figure is the median of [`ROUNDS`] runs, the two
//! tools taking turns (which goes first alternates), because on a shared VM the server's own
//! speed drifts between runs by more than the tools could differ. Beside each figure, the CPU
//! the load generator itself used (cores busy over the run: on a machine of few cores the
//! client takes its CPU from the server) and the server's own mean forward time per answered
//! request over the run, from its statistics extension (perf_analyzer prints it as the
//! server's "compute infer"): a difference the forward time shares is the server's speed
//! drifting, not the generators differing. The two should agree within 10 %, or the difference be explained.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use plotters::prelude::*;
use tonic::transport::Channel;
use visionserve::api::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use visionserve::api::grpc::proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use visionserve::api::grpc::proto::ModelInferRequest;

use crate::load::{closed_loop_with, http_sender, Send, ServerUnderTest, Stats};

pub const MODEL: &str = "mobilenet_v2";
pub const CONCURRENCY: [usize; 3] = [1, 4, 16];
pub const ROUNDS: usize = 3;
const SIDE: usize = 224;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Protocol {
    Http,
    Grpc,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http => "HTTP (V2, binary tensors)",
            Protocol::Grpc => "gRPC",
        }
    }
}

pub struct Row {
    pub protocol: Protocol,
    pub concurrency: usize,
    pub perf_analyzer: Measured,
    pub ours: Measured,
}

/// One run's figures, the cores its load generator kept busy on average, and the server's
/// mean forward time per request answered during the run.
#[derive(Clone)]
pub struct Measured {
    pub stats: Stats,
    pub client_cores: f64,
    pub server_ms: f64,
}

/// Requests the server has answered for the model (every version) and their total forward
/// time (`compute_infer`) in ns.
fn served(server: &ServerUnderTest) -> (f64, f64) {
    let text = reqwest::blocking::get(format!("{}/v2/models/{MODEL}/stats", server.base)).and_then(|r| r.text()).expect("the statistics");
    let stats: serde_json::Value = serde_json::from_str(&text).expect("statistics as JSON");
    stats["model_stats"].as_array().expect("model_stats").iter().fold((0.0, 0.0), |(count, ns), row| {
        let infer = &row["inference_stats"]["compute_infer"];
        (count + infer["count"].as_f64().unwrap_or(0.0), ns + infer["ns"].as_f64().unwrap_or(0.0))
    })
}

/// CPU seconds (user + system) of this process, or of its reaped children.
fn cpu_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage writes one rusage into the zeroed struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Runs `run` and measures the cores `who` used and the server's forward time per request
/// meanwhile.
fn measured(server: &ServerUnderTest, who: libc::c_int, run: impl FnOnce() -> Stats) -> Measured {
    let (cpu, wall, before) = (cpu_seconds(who), std::time::Instant::now(), served(server));
    let stats = run();
    let client_cores = (cpu_seconds(who) - cpu) / wall.elapsed().as_secs_f64();
    let after = served(server);
    Measured { stats, client_cores, server_ms: (after.1 - before.1) / (after.0 - before.0).max(1.0) / 1e6 }
}

/// Pixels as perf_analyzer's random data would be (any byte is a valid pixel), fixed by a seed.
fn pixels() -> Vec<u8> {
    let mut state: u32 = 0x9e37_79b9;
    (0..SIDE * SIDE * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect()
}

fn sender(server: &ServerUnderTest, protocol: Protocol, pixels: &[u8]) -> Box<dyn Fn() -> Send> {
    let shape = [1, SIDE as i64, SIDE as i64, 3];
    match protocol {
        Protocol::Http => {
            let header = serde_json::json!({
                "inputs": [{"name": "image", "shape": shape, "datatype": "UINT8", "parameters": {"binary_data_size": pixels.len()}}],
                "outputs": [{"name": "scores", "parameters": {"binary_data": true}}]
            })
            .to_string();
            let mut body = header.clone().into_bytes();
            body.extend_from_slice(pixels);
            let body = axum::body::Bytes::from(body);
            let url = format!("{}/v2/models/{MODEL}/infer", server.base);
            let length = header.len().to_string();
            Box::new(move || {
                let headers = [("content-type", "application/octet-stream"), ("inference-header-content-length", length.as_str())];
                http_sender(&url, body.clone(), &headers, 64)
            })
        }
        Protocol::Grpc => {
            let request = ModelInferRequest {
                model_name: MODEL.into(),
                inputs: vec![InferInputTensor { name: "image".into(), datatype: "UINT8".into(), shape: shape.to_vec(), ..Default::default() }],
                outputs: vec![InferRequestedOutputTensor { name: "scores".into(), ..Default::default() }],
                raw_input_contents: vec![pixels.to_vec().into()],
                ..Default::default()
            };
            let endpoint = Channel::from_shared(server.grpc.clone()).unwrap();
            Box::new(move || {
                let channel = endpoint.connect_lazy();
                let request = request.clone();
                Arc::new(move || {
                    let mut client = GrpcInferenceServiceClient::new(channel.clone());
                    let request = request.clone();
                    Box::pin(async move {
                        match client.model_infer(request).await {
                            Ok(_) => 200,
                            Err(status) if status.code() == tonic::Code::Unavailable => 503,
                            Err(_) => 0,
                        }
                    })
                })
            })
        }
    }
}

/// One perf_analyzer run at one concurrency: its CSV's throughput and p50/p99 (µs → ms).
fn run_perf_analyzer(perf_analyzer: &Path, server: &ServerUnderTest, protocol: Protocol, concurrency: usize, seconds: f64) -> Stats {
    let csv = tempfile::NamedTempFile::new().unwrap();
    let url = match protocol {
        Protocol::Http => server.base.trim_start_matches("http://").to_string(),
        Protocol::Grpc => server.grpc.trim_start_matches("http://").to_string(),
    };
    let mut command = Command::new(perf_analyzer);
    command.args(["-m", MODEL, "-u", &url, "--concurrency-range", &concurrency.to_string()]);
    command.args(["--measurement-interval", &((seconds * 1000.0) as u64).to_string(), "--max-trials", "3"]);
    // Any spread is accepted: the figure is the last window's, as perf_analyzer reports it.
    command.args(["--stability-percentage", "999", "-f"]).arg(csv.path());
    if protocol == Protocol::Grpc {
        command.args(["-i", "grpc"]);
    }
    let output = command.output().expect("running perf_analyzer");
    assert!(output.status.success(), "perf_analyzer failed: {}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let text = std::fs::read_to_string(csv.path()).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let values: Vec<f64> = lines.next().unwrap().split(',').map(|v| v.parse().unwrap_or(0.0)).collect();
    let column = |name: &str| values[header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("no column {name} in {header:?}"))];
    Stats { throughput: column("Inferences/Second"), p50: column("p50 latency") / 1000.0, p99: column("p99 latency") / 1000.0, ..Default::default() }
}

pub fn measure(binary: &Path, repository: &Path, perf_analyzer: &Path, seconds: f64) -> Vec<Row> {
    let server = ServerUnderTest::start_as_shipped_only(binary, repository, MODEL);
    let pixels = pixels();
    let mut rows = Vec::new();
    for protocol in [Protocol::Http, Protocol::Grpc] {
        let send = sender(&server, protocol, &pixels);
        for concurrency in CONCURRENCY {
            let (mut theirs, mut ours) = (Vec::new(), Vec::new());
            for round in 0..ROUNDS {
                println!("[bench] perf_analyzer, {}, concurrency {concurrency}, round {}/{ROUNDS}", protocol.label(), round + 1);
                // perf_analyzer is a child, counted once reaped; our generator runs in this process.
                let mut run_theirs = || {
                    let run = measured(&server, libc::RUSAGE_CHILDREN, || run_perf_analyzer(perf_analyzer, &server, protocol, concurrency, seconds));
                    let s = &run.stats;
                    println!("        perf_analyzer: {:.1} infer/s, p50 {:.2} ms, p99 {:.2} ms, {:.2} cores, server forward {:.2} ms", s.throughput, s.p50, s.p99, run.client_cores, run.server_ms);
                    theirs.push(run);
                };
                let mut run_ours = || {
                    let run = measured(&server, libc::RUSAGE_SELF, || closed_loop_with(concurrency, Duration::from_secs_f64(seconds), send.as_ref()));
                    let s = &run.stats;
                    println!("        ours:          {:.1} req/s, p50 {:.2} ms, p99 {:.2} ms, {:.2} cores, server forward {:.2} ms, errors {}", s.throughput, s.p50, s.p99, run.client_cores, run.server_ms, s.errors);
                    ours.push(run);
                };
                if round % 2 == 0 {
                    run_theirs();
                    run_ours();
                } else {
                    run_ours();
                    run_theirs();
                }
            }
            rows.push(Row { protocol, concurrency, perf_analyzer: median(theirs), ours: median(ours) });
        }
    }
    rows
}

/// The run of median throughput (its latencies and CPU with it; errors summed over the runs).
fn median(mut runs: Vec<Measured>) -> Measured {
    let errors = runs.iter().map(|r| r.stats.errors).sum();
    runs.sort_by(|a, b| a.stats.throughput.total_cmp(&b.stats.throughput));
    let middle = runs.swap_remove(runs.len() / 2);
    Measured { stats: Stats { errors, ..middle.stats }, ..middle }
}

/// ours ÷ theirs, and the same at equal server speed: each throughput times the server's
/// forward time per request during its run (a server that forwards 10 % slower answers 10 %
/// fewer requests, whoever sends them).
fn ratios(r: &Row) -> (f64, f64) {
    let (theirs, ours) = (&r.perf_analyzer, &r.ours);
    let raw = ours.stats.throughput / theirs.stats.throughput.max(1e-9);
    (raw, raw * ours.server_ms / theirs.server_ms.max(1e-9))
}

pub fn render(rows: &[Row], seconds: f64) -> String {
    let mut out = format!(
        "\n### perf_analyzer and our load generator, {MODEL} as shipped, random UINT8 [1, {SIDE}, {SIDE}, 3] pixels, medians of {ROUNDS} interleaved runs of {seconds} s (perf_analyzer: its last of 3 windows)\n\n\
         | protocol | concurrency | perf_analyzer infer/s | ours req/s | ours ÷ theirs | at equal server forward time | p50 ms theirs / ours | p99 ms theirs / ours | client cores theirs / ours | server forward ms per request theirs / ours | our errors |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    let (mut worst, mut worst_equal): (f64, f64) = (0.0, 0.0);
    for r in rows {
        let (theirs, ours) = (&r.perf_analyzer.stats, &r.ours.stats);
        let (raw, equal) = ratios(r);
        worst = worst.max((raw - 1.0).abs());
        worst_equal = worst_equal.max((equal - 1.0).abs());
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} / {:.2} | {} |\n",
            r.protocol.label(),
            r.concurrency,
            theirs.throughput,
            ours.throughput,
            raw,
            equal,
            theirs.p50,
            ours.p50,
            theirs.p99,
            ours.p99,
            r.perf_analyzer.client_cores,
            r.ours.client_cores,
            r.perf_analyzer.server_ms,
            r.ours.server_ms,
            ours.errors
        ));
    }
    let verdict = |d: f64| if d <= 0.10 { "met" } else { "missed" };
    out.push_str(&format!(
        "\nTarget: the two within 10 % of each other: largest throughput difference {:.0} % ({}); at equal server forward \
         time {:.0} % ({}). Client cores: the CPU each load generator used over its run (perf_analyzer's over all its \
         windows), taken from the same cores as the server's. Server forward ms: the server's own mean forward time per \
         answered request over the run (its statistics extension).\n",
        worst * 100.0,
        verdict(worst),
        worst_equal * 100.0,
        verdict(worst_equal)
    ));
    out
}

/// Throughput against concurrency: perf_analyzer's and ours, for each protocol.
pub fn draw(path: &Path, rows: &[Row]) {
    let font: &'static [u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, font);
    let root = BitMapBackend::new(path, (800, 460)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let max = rows.iter().flat_map(|r| [r.perf_analyzer.stats.throughput, r.ours.stats.throughput]).fold(1e-9, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{MODEL}: perf_analyzer against our load generator (req/s)"), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..17f64, 0f64..max)
        .unwrap();
    chart.configure_mesh().x_desc("concurrency").draw().unwrap();
    let series: [(Protocol, bool, RGBColor, &str); 4] = [
        (Protocol::Http, true, BLUE, "HTTP, perf_analyzer"),
        (Protocol::Http, false, CYAN, "HTTP, ours"),
        (Protocol::Grpc, true, RED, "gRPC, perf_analyzer"),
        (Protocol::Grpc, false, MAGENTA, "gRPC, ours"),
    ];
    for (protocol, theirs, colour, label) in series {
        let points: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.protocol == protocol)
            .map(|r| (r.concurrency as f64, if theirs { r.perf_analyzer.stats.throughput } else { r.ours.stats.throughput }))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
            .unwrap()
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, colour.filled()))).unwrap();
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().unwrap();
    root.present().unwrap();
}
