//! The pipeline's cost against its steps, as shipped: `detect_then_classify` on a photo with
//! five detections, against the detector alone on the same photo plus one batched classifier
//! forward of five crops. Sequential requests (concurrency 1), medians of `ROUNDS`, the three
//! kinds interleaved.

use std::path::Path;
use std::time::Instant;

use plotters::prelude::*;

use crate::load::ServerUnderTest;

const PIPELINE: &str = "detect_then_classify";
const DETECTOR: &str = "ssd_mobilenet_v2_coco";
const CLASSIFIER: &str = "mobilenet_v2";
const ROUNDS: usize = 25;

/// The project's cat and coffee photos tiled 3 × 2 (the pipeline test's picture): five
/// detections the pipeline keeps; and the tiles themselves, as the classifier's five crops.
pub fn photo() -> (Vec<u8>, Vec<Vec<u8>>) {
    let cat = image::load_from_memory(include_bytes!("../../assets/samples/chelsea.jpg")).unwrap().resize_exact(400, 300, image::imageops::FilterType::Triangle);
    let cup = image::load_from_memory(include_bytes!("../../assets/samples/coffee.jpg")).unwrap().resize_exact(400, 300, image::imageops::FilterType::Triangle);
    let layout = [[&cat, &cup, &cat], [&cup, &cat, &cup]];
    let mut grid = image::RgbImage::new(1200, 600);
    for (y, row) in layout.iter().enumerate() {
        for (x, tile) in row.iter().enumerate() {
            image::imageops::replace(&mut grid, &tile.to_rgb8(), (x * 400) as i64, (y * 300) as i64);
        }
    }
    let jpeg = |image: &image::RgbImage| {
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 92).encode_image(image).unwrap();
        out
    };
    let crops = [&cat, &cup, &cat, &cup, &cat].iter().map(|t| jpeg(&t.to_rgb8())).collect();
    (jpeg(&grid), crops)
}

pub struct PipelineFigures {
    pub detections: usize,
    /// Median wall time of a request, ms.
    pub pipeline_ms: f64,
    pub detector_ms: f64,
    /// Median `x-inference-time-ms` of five crops in one request: one batched forward.
    pub classifier_forward_ms: f64,
    /// Median per-step headers of the pipeline's requests: (step 1 inference, step 2 inference).
    pub step_inference_ms: (f64, f64),
    pub step2_batch: usize,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn header_ms(response: &reqwest::blocking::Response, name: &str) -> f64 {
    response.headers().get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

pub fn measure(binary: &Path, repository: &Path) -> PipelineFigures {
    let server = ServerUnderTest::start_as_shipped_only(binary, repository, PIPELINE);
    let (grid, crops) = photo();
    let client = reqwest::blocking::Client::new();
    let pipeline = || client.post(server.url(PIPELINE)).header("content-type", "image/jpeg").body(grid.clone()).send().unwrap();
    let detector = || client.post(server.url(DETECTOR)).header("content-type", "image/jpeg").body(grid.clone()).send().unwrap();
    let classifier = || {
        let mut form = reqwest::blocking::multipart::Form::new();
        for (i, crop) in crops.iter().enumerate() {
            form = form.part(format!("image{i}"), reqwest::blocking::multipart::Part::bytes(crop.clone()).file_name(format!("crop{i}.jpg")).mime_str("image/jpeg").unwrap());
        }
        client.post(server.url(CLASSIFIER)).multipart(form).send().unwrap()
    };
    for _ in 0..3 {
        pipeline();
        detector();
        classifier();
    }
    let (mut pipeline_ms, mut detector_ms, mut forward_ms, mut step1, mut step2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut detections = 0;
    let mut step2_batch = 0;
    for round in 0..ROUNDS {
        if round % 5 == 0 {
            println!("[bench] pipeline: round {}/{ROUNDS}", round + 1);
        }
        let started = Instant::now();
        let response = pipeline();
        pipeline_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        step1.push(header_ms(&response, "x-step1-inference-time-ms"));
        step2.push(header_ms(&response, "x-step2-inference-time-ms"));
        step2_batch = header_ms(&response, "x-step2-batch-size") as usize;
        let body: serde_json::Value = response.json().unwrap();
        detections = body["results"][0]["detections"].as_array().map_or(0, Vec::len);
        let started = Instant::now();
        detector().bytes().unwrap();
        detector_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        let response = classifier();
        assert_eq!(header_ms(&response, "x-batch-size") as usize, crops.len(), "the five crops ran as one batch");
        forward_ms.push(header_ms(&response, "x-inference-time-ms"));
    }
    PipelineFigures {
        detections,
        pipeline_ms: median(pipeline_ms),
        detector_ms: median(detector_ms),
        classifier_forward_ms: median(forward_ms),
        step_inference_ms: (median(step1), median(step2)),
        step2_batch,
    }
}

pub fn render(f: &PipelineFigures) -> String {
    let budget = f.detector_ms + f.classifier_forward_ms;
    let ratio = f.pipeline_ms / budget;
    format!(
        "\n### Pipeline `{PIPELINE}` against its steps (a 1200×600 JPEG with {} detections kept; medians of {ROUNDS} sequential rounds)\n\n\
         | measure | ms |\n|---|---|\n\
         | detector alone ({DETECTOR}, whole request) | {:.1} |\n\
         | classifier, one batched forward of 5 crops ({CLASSIFIER}, `x-inference-time-ms`) | {:.1} |\n\
         | sum | {:.1} |\n\
         | **pipeline, whole request** | **{:.1}** |\n\
         | of which step 1 forward / step 2 forward (batch {}) | {:.1} / {:.1} |\n\n\
         Target: pipeline ≤ (detector + one batched forward of 5 crops) × 1.10: {:.2}× ({}).\n",
        f.detections,
        f.detector_ms,
        f.classifier_forward_ms,
        budget,
        f.pipeline_ms,
        f.step2_batch,
        f.step_inference_ms.0,
        f.step_inference_ms.1,
        ratio,
        if ratio <= 1.10 { "met" } else { "missed" }
    )
}

/// Bars: the detector, the batched classifier forward, their sum with the 10 % allowance,
/// and the pipeline.
pub fn draw(path: &Path, f: &PipelineFigures) {
    let font: &'static [u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, font);
    let bars = [
        ("detector", f.detector_ms, BLUE),
        ("classifier ×5 (1 forward)", f.classifier_forward_ms, CYAN),
        ("sum + 10 %", (f.detector_ms + f.classifier_forward_ms) * 1.1, RGBColor(150, 150, 150)),
        ("pipeline", f.pipeline_ms, RED),
    ];
    let root = BitMapBackend::new(path, (760, 420)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let max = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{PIPELINE}: ms per request, {} detections", f.detections), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..bars.len() as f64, 0f64..max)
        .unwrap();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 { bars.get(i).map(|b| b.0.to_string()).unwrap_or_default() } else { String::new() }
        })
        .y_desc("ms")
        .draw()
        .unwrap();
    for (i, (_, value, colour)) in bars.iter().enumerate() {
        let x = i as f64;
        chart.draw_series(std::iter::once(Rectangle::new([(x + 0.2, 0.0), (x + 0.8, *value)], colour.mix(0.7).filled()))).unwrap();
    }
    root.present().unwrap();
}
