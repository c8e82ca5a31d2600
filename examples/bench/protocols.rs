//! REST against gRPC on the default classifier, as shipped: the same Rust load generator
//! (one thread, closed loop) sends the same photo as /v1's raw body, as REST V2 with binary
//! tensors (a BYTES image, binary `scores` back), as gRPC `ModelInfer` with the image in
//! `raw_input_contents` (what `tritonclient.grpc` sends), and as gRPC with the decoded pixels
//! (UINT8 [1, H, W, 3]). Concurrency 1 and 16, three runs interleaved (every transport once per
//! run, so drift hits all alike), medians reported.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use plotters::prelude::*;
use tonic::transport::Channel;
use visionserve::api::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use visionserve::api::grpc::proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use visionserve::api::grpc::proto::ModelInferRequest;

use crate::load::{closed_loop_with, http_sender, Send, ServerUnderTest, Stats};

pub const MODEL: &str = "mobilenet_v2";
const RUNS: usize = 3;
pub const CONCURRENCY: [usize; 2] = [1, 16];

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Transport {
    RestV1,
    RestV2Binary,
    GrpcBytes,
    GrpcPixels,
}

impl Transport {
    pub const ALL: [Transport; 4] = [Transport::RestV1, Transport::RestV2Binary, Transport::GrpcBytes, Transport::GrpcPixels];

    pub fn label(self) -> &'static str {
        match self {
            Transport::RestV1 => "REST /v1 (raw JPEG body)",
            Transport::RestV2Binary => "REST V2 (BYTES image, binary tensors)",
            Transport::GrpcBytes => "gRPC ModelInfer (BYTES image)",
            Transport::GrpcPixels => "gRPC ModelInfer (UINT8 pixels)",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Transport::RestV1 => "REST /v1",
            Transport::RestV2Binary => "REST V2",
            Transport::GrpcBytes => "gRPC BYTES",
            Transport::GrpcPixels => "gRPC UINT8",
        }
    }
}

pub struct ProtocolRow {
    pub transport: Transport,
    pub concurrency: usize,
    /// One per run, in run order.
    pub runs: Vec<Stats>,
}

impl ProtocolRow {
    fn median(&self, value: impl Fn(&Stats) -> f64) -> f64 {
        let mut values: Vec<f64> = self.runs.iter().map(value).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    }

    pub fn throughput(&self) -> f64 {
        self.median(|s| s.throughput)
    }

    pub fn p50(&self) -> f64 {
        self.median(|s| s.p50)
    }

    pub fn p99(&self) -> f64 {
        self.median(|s| s.p99)
    }
}

/// The V2 request body with the binary tensor extension: the JSON header, then the image as
/// one length-prefixed BYTES element; `scores` comes back binary. Returns (body, JSON length).
fn v2_binary_body(jpeg: &[u8]) -> (Vec<u8>, usize) {
    let header = serde_json::json!({
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": jpeg.len() + 4}}],
        "outputs": [{"name": "scores", "parameters": {"binary_data": true}}]
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend((jpeg.len() as u32).to_le_bytes());
    body.extend_from_slice(jpeg);
    (body, header.len())
}

fn grpc_request(jpeg: &[u8], pixels: bool) -> ModelInferRequest {
    let (input, raw) = if pixels {
        let image = image::load_from_memory(jpeg).unwrap().to_rgb8();
        let shape = vec![1, i64::from(image.height()), i64::from(image.width()), 3];
        (InferInputTensor { name: "pixels".into(), datatype: "UINT8".into(), shape, ..Default::default() }, image.into_raw())
    } else {
        let mut element = (jpeg.len() as u32).to_le_bytes().to_vec();
        element.extend_from_slice(jpeg);
        (InferInputTensor { name: "image".into(), datatype: "BYTES".into(), shape: vec![1], ..Default::default() }, element)
    };
    ModelInferRequest {
        model_name: MODEL.into(),
        inputs: vec![input],
        outputs: vec![InferRequestedOutputTensor { name: "scores".into(), ..Default::default() }],
        raw_input_contents: vec![raw.into()],
        ..Default::default()
    }
}

/// Makes the sender of one request of `transport`, to send again and again. Called inside the
/// load generator's runtime: HTTP and gRPC clients keep their connections on the runtime that
/// made them.
type MakeSend = Box<dyn Fn() -> Send>;

fn sender(server: &ServerUnderTest, transport: Transport, jpeg: &[u8]) -> MakeSend {
    match transport {
        Transport::RestV1 | Transport::RestV2Binary => {
            let (url, body, headers) = if transport == Transport::RestV1 {
                (server.url(MODEL), jpeg.to_vec(), vec![("content-type".to_string(), "image/jpeg".to_string())])
            } else {
                let (body, json_length) = v2_binary_body(jpeg);
                let headers = vec![
                    ("content-type".to_string(), "application/octet-stream".to_string()),
                    ("inference-header-content-length".to_string(), json_length.to_string()),
                ];
                (format!("{}/v2/models/{MODEL}/infer", server.base), body, headers)
            };
            let body = axum::body::Bytes::from(body);
            Box::new(move || {
                let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                http_sender(&url, body.clone(), &headers, 64)
            })
        }
        Transport::GrpcBytes | Transport::GrpcPixels => {
            let request = grpc_request(jpeg, transport == Transport::GrpcPixels);
            let endpoint = Channel::from_shared(server.grpc.clone()).unwrap();
            Box::new(move || {
                // One channel (one HTTP/2 connection) for every client, as tritonclient has.
                let channel = endpoint.connect_lazy();
                let request = request.clone();
                Arc::new(move || {
                    let mut client = GrpcInferenceServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20);
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

/// Every transport at every concurrency, `RUNS` times interleaved, on one server as shipped.
pub fn measure(binary: &Path, repository: &Path, jpeg: &[u8], seconds: f64) -> Vec<ProtocolRow> {
    let server = ServerUnderTest::start_as_shipped_only(binary, repository, MODEL);
    let senders: Vec<(Transport, MakeSend)> = Transport::ALL.iter().map(|&t| (t, sender(&server, t, jpeg))).collect();
    let mut rows: Vec<ProtocolRow> = Transport::ALL
        .iter()
        .flat_map(|&transport| CONCURRENCY.iter().map(move |&concurrency| ProtocolRow { transport, concurrency, runs: Vec::new() }))
        .collect();
    for run in 1..=RUNS {
        for (transport, send) in &senders {
            for &concurrency in &CONCURRENCY {
                println!("[bench] protocols, run {run}/{RUNS}: {}, concurrency {concurrency}", transport.label());
                let stats = closed_loop_with(concurrency, Duration::from_secs_f64(seconds), send.as_ref());
                println!("        {:.1} req/s, p50 {:.2} ms, p99 {:.2} ms, errors {}", stats.throughput, stats.p50, stats.p99, stats.errors);
                let row = rows.iter_mut().find(|r| r.transport == *transport && r.concurrency == concurrency).unwrap();
                row.runs.push(stats);
            }
        }
    }
    rows
}

fn row(rows: &[ProtocolRow], transport: Transport, concurrency: usize) -> &ProtocolRow {
    rows.iter().find(|r| r.transport == transport && r.concurrency == concurrency).unwrap()
}

pub fn render(rows: &[ProtocolRow], photo: &str) -> String {
    let mut out = format!(
        "\n### REST and gRPC, {MODEL} as shipped ({photo}; median of {RUNS} interleaved runs)\n\n\
         | transport | c=16 req/s | ×REST V2 | ×/v1 | c=1 p50 ms | ×REST V2 | ×/v1 | c=16 p99 ms | errors |\n|---|---|---|---|---|---|---|---|---|\n"
    );
    let v2 = (row(rows, Transport::RestV2Binary, 16), row(rows, Transport::RestV2Binary, 1));
    let v1 = (row(rows, Transport::RestV1, 16), row(rows, Transport::RestV1, 1));
    for transport in Transport::ALL {
        let (busy, single) = (row(rows, transport, 16), row(rows, transport, 1));
        let errors: u64 = busy.runs.iter().chain(&single.runs).map(|s| s.errors).sum();
        out.push_str(&format!(
            "| {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {errors} |\n",
            transport.label(),
            busy.throughput(),
            busy.throughput() / v2.0.throughput(),
            busy.throughput() / v1.0.throughput(),
            single.p50(),
            single.p50() / v2.1.p50(),
            single.p50() / v1.1.p50(),
            busy.p99(),
        ));
    }
    let grpc = (row(rows, Transport::GrpcBytes, 16), row(rows, Transport::GrpcBytes, 1));
    let verdict = |met: bool| if met { "met" } else { "missed" };
    out.push_str(&format!(
        "\nTargets (gRPC BYTES against REST V2 binary, the same protocol over the two transports): throughput at c=16 ≥ 0.95×: \
         {:.2}× ({}); p50 at c=1 ≤ 1.05×: {:.2}× ({}).\n",
        grpc.0.throughput() / v2.0.throughput(),
        verdict(grpc.0.throughput() >= 0.95 * v2.0.throughput()),
        grpc.1.p50() / v2.1.p50(),
        verdict(grpc.1.p50() <= 1.05 * v2.1.p50()),
    ));
    out
}

/// Two panels: req/s at concurrency 16 and p50 at concurrency 1, a bar per transport with its
/// three runs as dots.
pub fn draw(path: &Path, rows: &[ProtocolRow]) {
    let font: &'static [u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, font);
    let root = BitMapBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let (left, right) = root.split_horizontally(550);
    let panels: [(_, usize, &str, fn(&Stats) -> f64); 2] =
        [(left, 16, "req/s at concurrency 16 (higher is better)", |s| s.throughput), (right, 1, "p50 ms at concurrency 1 (lower is better)", |s| s.p50)];
    let colours = [BLUE, CYAN, RED, MAGENTA];
    for (area, concurrency, title, value) in panels {
        let max = rows.iter().filter(|r| r.concurrency == concurrency).flat_map(|r| r.runs.iter().map(value)).fold(1e-9, f64::max) * 1.2;
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..Transport::ALL.len() as f64, 0f64..max)
            .unwrap();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(Transport::ALL.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.01 { Transport::ALL.get(i).map(|t| t.short().to_string()).unwrap_or_default() } else { String::new() }
            })
            .draw()
            .unwrap();
        for (i, transport) in Transport::ALL.iter().enumerate() {
            let r = row(rows, *transport, concurrency);
            let median = r.median(value);
            let x = i as f64;
            chart.draw_series(std::iter::once(Rectangle::new([(x + 0.2, 0.0), (x + 0.8, median)], colours[i].mix(0.6).filled()))).unwrap();
            chart.draw_series(r.runs.iter().map(|s| Circle::new((x + 0.5, value(s)), 3, BLACK.filled()))).unwrap();
        }
    }
    root.present().unwrap();
}
