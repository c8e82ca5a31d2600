//! Triton's perf_analyzer beside our own load generator, on the same server and the same
//! requests: mobilenet_v2 as shipped, the input perf_analyzer makes from the model's metadata
//! (random `UINT8 [1, 224, 224, 3]` pixels, binary tensors over HTTP, `raw_input_contents`
//! over gRPC), concurrency 1, 4 and 16, each figure from a run of its own. perf_analyzer's
//! throughput and latencies are its own (its CSV); ours are the closed loop's. The two should
//! agree within 10 %, or the difference be explained.

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
    pub perf_analyzer: Stats,
    pub ours: Stats,
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
            println!("[bench] perf_analyzer, {}, concurrency {concurrency}", protocol.label());
            let theirs = run_perf_analyzer(perf_analyzer, &server, protocol, concurrency, seconds);
            println!("        perf_analyzer: {:.1} infer/s, p50 {:.2} ms, p99 {:.2} ms", theirs.throughput, theirs.p50, theirs.p99);
            let ours = closed_loop_with(concurrency, Duration::from_secs_f64(seconds), send.as_ref());
            println!("        ours:          {:.1} req/s, p50 {:.2} ms, p99 {:.2} ms, errors {}", ours.throughput, ours.p50, ours.p99, ours.errors);
            rows.push(Row { protocol, concurrency, perf_analyzer: theirs, ours });
        }
    }
    rows
}

pub fn render(rows: &[Row], seconds: f64) -> String {
    let mut out = format!(
        "\n### perf_analyzer and our load generator, {MODEL} as shipped, random UINT8 [1, {SIDE}, {SIDE}, 3] pixels, {seconds} s a figure\n\n\
         | protocol | concurrency | perf_analyzer infer/s | ours req/s | ours ÷ theirs | p50 ms theirs / ours | p99 ms theirs / ours | our errors |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    let mut worst: f64 = 0.0;
    for r in rows {
        let ratio = r.ours.throughput / r.perf_analyzer.throughput.max(1e-9);
        worst = worst.max((ratio - 1.0).abs());
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.2} | {:.2} / {:.2} | {:.2} / {:.2} | {} |\n",
            r.protocol.label(),
            r.concurrency,
            r.perf_analyzer.throughput,
            r.ours.throughput,
            ratio,
            r.perf_analyzer.p50,
            r.ours.p50,
            r.perf_analyzer.p99,
            r.ours.p99,
            r.ours.errors
        ));
    }
    out.push_str(&format!(
        "\nTarget: the two within 10 % of each other: largest throughput difference {:.0} % ({}).\n",
        worst * 100.0,
        if worst <= 0.10 { "met" } else { "missed" }
    ));
    out
}

/// Throughput against concurrency: perf_analyzer's and ours, for each protocol.
pub fn draw(path: &Path, rows: &[Row]) {
    let font: &'static [u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, font);
    let root = BitMapBackend::new(path, (800, 460)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let max = rows.iter().flat_map(|r| [r.perf_analyzer.throughput, r.ours.throughput]).fold(1e-9, f64::max) * 1.2;
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
            .map(|r| (r.concurrency as f64, if theirs { r.perf_analyzer.throughput } else { r.ours.throughput }))
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
