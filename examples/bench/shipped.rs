//! The server as a user gets it: `make run`'s repository with its configs untouched, every
//! default model loaded with every version, on the bench's 640 × 480 photo and on a 12 MP
//! phone-size photo, at concurrency 1 (with the median `x-preprocess-time-ms` of sequential
//! requests), 16, and 160 (a retry storm: zero think time, `Retry-After` ignored).

use std::path::Path;
use std::time::Duration;

use plotters::prelude::*;

use crate::load::{closed_loop, ServerUnderTest, Stats};

/// The photos: the bench's small one, and a 4032 × 3024 JPEG (quality 92) made from a project
/// photo with a little deterministic noise, so that it weighs what a phone photo weighs.
pub fn photos(small: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    vec![("640×480", small.to_vec()), ("12 MP", photo_of(4032, 3024))]
}

/// The same photo at 0.1, 1, 3 and 12 megapixels (4:3), for req/s against photo size.
pub fn photo_sizes() -> Vec<(&'static str, Vec<u8>)> {
    vec![("0.1 MP", photo_of(365, 274)), ("1 MP", photo_of(1155, 866)), ("3 MP", photo_of(2000, 1500)), ("12 MP", photo_of(4032, 3024))]
}

/// A project photo resized to `width × height` with a little deterministic noise (so that it
/// weighs what a camera's JPEG of that size weighs), encoded at quality 92.
fn photo_of(width: u32, height: u32) -> Vec<u8> {
    let source = image::load_from_memory(include_bytes!("../../assets/samples/coffee.jpg")).unwrap();
    let mut big = source.resize_exact(width, height, image::imageops::FilterType::CatmullRom).to_rgb8();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for value in big.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *value = value.saturating_add((state % 13) as u8).saturating_sub(6);
    }
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 92).encode_image(&big).unwrap();
    jpeg
}

/// Answered req/s against photo size (megapixels, log scale) at concurrency 16, one line per
/// server: `lines` are (label, [(megapixels, req/s)]).
pub fn draw_photo_sizes(path: &Path, lines: &[(String, Vec<(f64, f64)>)]) {
    let font: &'static [u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, font);
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let max = lines.iter().flat_map(|(_, points)| points.iter().map(|p| p.1)).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption("req/s against photo size (concurrency 16, one model, same client)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d((0.08f64..15.0).log_scale(), 0f64..max)
        .unwrap();
    chart.configure_mesh().x_desc("megapixels (JPEG, quality 92)").y_desc("answered req/s").draw().unwrap();
    let colours = [BLUE, GREEN, RED, MAGENTA, CYAN, BLACK];
    for (i, (label, points)) in lines.iter().enumerate() {
        let colour = colours[i % colours.len()];
        chart
            .draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(2)))
            .unwrap()
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, colour.filled()))).unwrap();
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).position(SeriesLabelPosition::UpperRight).draw().unwrap();
    root.present().unwrap();
}

pub struct ShippedRow {
    pub model: String,
    pub photo: &'static str,
    pub concurrency: usize,
    pub stats: Stats,
    /// Median `x-preprocess-time-ms` of sequential requests (concurrency 1 only).
    pub preprocess_ms: Option<f64>,
    /// The DCT scale those requests were decoded at ("1" when whole; concurrency 1 only).
    pub decode_scale: Option<String>,
    /// CPU seconds the server used during the step.
    pub server_cpu_s: f64,
    pub seconds: f64,
}

impl ShippedRow {
    fn answered(&self) -> f64 {
        self.stats.throughput * self.seconds
    }
}

/// Server CPU per refusal in a storm row: the step's server CPU, less what its answered requests
/// cost at the CPU per answer of the same model and photo at concurrency 16, over its refusals.
pub fn cpu_per_refusal_us(rows: &[ShippedRow], storm: &ShippedRow) -> Option<f64> {
    let calm = rows.iter().find(|r| r.model == storm.model && r.photo == storm.photo && r.concurrency == 16)?;
    if storm.stats.refused == 0 || calm.answered() == 0.0 {
        return None;
    }
    let per_answer = calm.server_cpu_s / calm.answered();
    Some(((storm.server_cpu_s - storm.answered() * per_answer).max(0.0) / storm.stats.refused as f64) * 1e6)
}

/// Median milliseconds PIL (libjpeg-turbo) takes to decode `photo` with `draft()` at each DCT
/// scale, measured by `python` in this run: the yardstick for our scaled decoding. Empty when
/// no Python with PIL is given.
pub fn pil_draft_ms(python: Option<&Path>, photo: &[u8]) -> Vec<(String, f64)> {
    let Some(python) = python else { return Vec::new() };
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), photo).unwrap();
    let script = r#"
import io, statistics, sys, time
from PIL import Image
data = open(sys.argv[1], "rb").read()
width, height = Image.open(io.BytesIO(data)).size
for scale in (1, 2, 4, 8):
    times = []
    for _ in range(11):
        started = time.perf_counter()
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (width // scale, height // scale))
        image.load()
        times.append((time.perf_counter() - started) * 1000)
    print("1" if scale == 1 else f"1/{scale}", statistics.median(times))
"#;
    let output = std::process::Command::new(python).arg("-c").arg(script).arg(file.path()).output();
    let Ok(output) = output else { return Vec::new() };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| {
            let (scale, ms) = l.split_once(' ')?;
            Some((scale.to_string(), ms.parse().ok()?))
        })
        .collect()
}

fn median_preprocess_ms(url: &str, photo: &[u8]) -> f64 {
    let client = reqwest::blocking::Client::new();
    let mut times: Vec<f64> = (0..11)
        .filter_map(|_| {
            let r = client.post(url).header("content-type", "image/jpeg").body(photo.to_vec()).send().ok()?;
            r.headers().get("x-preprocess-time-ms")?.to_str().ok()?.parse().ok()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times.get(times.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The models of `repository`: its folders.
pub fn models(repository: &Path) -> Vec<String> {
    let mut models: Vec<String> = std::fs::read_dir(repository)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with('_') && !name.starts_with('.'))
        .collect();
    models.sort();
    models
}

/// Every model of `repository`, as shipped, one at a time.
pub fn measure(binary: &Path, repository: &Path, photos: &[(&'static str, Vec<u8>)], seconds: f64) -> Vec<ShippedRow> {
    let server = ServerUnderTest::start_as_shipped(binary, repository);
    let models = models(repository);
    let mut rows = Vec::new();
    for model in models {
        let url = server.url(&model);
        for (photo, bytes) in photos {
            for concurrency in [1, 16, 160] {
                let before = server.scaled_decodes();
                let preprocess_ms = (concurrency == 1).then(|| median_preprocess_ms(&url, bytes));
                let decode_scale = (concurrency == 1).then(|| {
                    let after = server.scaled_decodes();
                    let grew = |(scale, count): &(String, f64)| before.iter().find(|(s, _)| s == scale).map_or(*count > 0.0, |(_, was)| count > was);
                    after.iter().find(|entry| grew(entry)).map_or_else(|| "1".to_string(), |(scale, _)| scale.clone())
                });
                let cpu_before = server.cpu_seconds();
                let stats = closed_loop(&url, bytes, concurrency, Duration::from_secs_f64(seconds));
                let server_cpu_s = server.cpu_seconds() - cpu_before;
                println!(
                    "    {model} {photo} c={concurrency}: {:.1} req/s, p50 {:.1} ms, p99 {:.1} ms, refused {} (p99 {:.1} ms){}",
                    stats.throughput,
                    stats.p50,
                    stats.p99,
                    stats.refused,
                    stats.refused_p99,
                    preprocess_ms.map(|p| format!(", preprocess p50 {p:.1} ms")).unwrap_or_default()
                );
                rows.push(ShippedRow { model: model.clone(), photo, concurrency, stats, preprocess_ms, decode_scale, server_cpu_s, seconds });
            }
        }
    }
    rows
}

/// All models at once: concurrency 16 split as evenly as it goes across them, the small photo,
/// one closed loop per model running side by side. Returns each model's answered req/s.
pub fn measure_mixed(binary: &Path, repository: &Path, models: &[String], photo: &[u8], seconds: f64) -> Vec<(String, Stats)> {
    let server = ServerUnderTest::start_as_shipped(binary, repository);
    let loops: Vec<_> = models
        .iter()
        .enumerate()
        .map(|(i, model)| {
            let clients = 16 / models.len() + usize::from(i < 16 % models.len());
            let (url, photo, model) = (server.url(model), photo.to_vec(), model.clone());
            std::thread::spawn(move || (model, closed_loop(&url, &photo, clients, Duration::from_secs_f64(seconds))))
        })
        .collect();
    loops.into_iter().map(|t| t.join().unwrap()).collect()
}

pub fn render_mixed(mixed: &[(String, Stats)]) -> String {
    let total: f64 = mixed.iter().map(|(_, s)| s.throughput).sum();
    let mut s = String::from("\nAll models at once, concurrency 16 split across them, 640×480 photo:\n\n| model | answered req/s | p99 ms | refused |\n|---|---|---|---|\n");
    for (model, stats) in mixed {
        s += &format!("| {model} | {:.1} | {:.1} | {} |\n", stats.throughput, stats.p99, stats.refused);
    }
    s += &format!("| **total** | **{total:.1}** | | |\n");
    s
}

pub fn render(rows: &[ShippedRow], draft: &[(String, f64)]) -> String {
    let mut s = String::from(
        "\nAs shipped (`make run`'s repository, configs untouched, every version loaded; closed loop, \
         zero think time, `Retry-After` ignored; the load generator shares the cores). Preprocess: \
         the median `x-preprocess-time-ms` (decode + resize + normalise) of 11 sequential requests, \
         the DCT scale they were decoded at, and that time over PIL's `draft()` decoding the same \
         file at the same scale in this run (libjpeg-turbo). Server CPU per refusal: the storm \
         step's server CPU, less its answered requests at the CPU per answer of the concurrency-16 \
         step, over its refusals.\n\n\
         | model | photo | concurrency | answered req/s | p50 ms | p99 ms | refused | refused p99 ms | server CPU µs per refusal | preprocess p50 ms (sequential) | decode scale | × PIL draft |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let pil = r.decode_scale.as_ref().and_then(|scale| draft.iter().find(|(s, _)| s == scale)).filter(|_| r.photo == "12 MP");
        let ratio = match (r.preprocess_ms, pil) {
            (Some(ours), Some((_, theirs))) => format!("{:.2} ({theirs:.1} ms)", ours / theirs),
            _ => String::new(),
        };
        let per_refusal = (r.concurrency == 160).then(|| cpu_per_refusal_us(rows, r)).flatten();
        s += &format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {} | {} | {} | {} |\n",
            r.model,
            r.photo,
            r.concurrency,
            r.stats.throughput,
            r.stats.p50,
            r.stats.p99,
            r.stats.refused,
            r.stats.refused_p99,
            per_refusal.map(|us| format!("{us:.0}")).unwrap_or_default(),
            r.preprocess_ms.map(|p| format!("{p:.1}")).unwrap_or_default(),
            r.decode_scale.clone().unwrap_or_default(),
            ratio
        );
    }
    s
}

/// Answered req/s per model, for each photo and concurrency.
pub fn draw(path: &Path, rows: &[ShippedRow]) {
    let font: &'static [u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, font);
    let mut models: Vec<&str> = rows.iter().map(|r| r.model.as_str()).collect();
    models.dedup();
    let bars: Vec<(&str, usize, RGBColor)> = vec![
        ("640×480", 16, BLUE),
        ("640×480", 160, CYAN),
        ("12 MP", 16, RED),
        ("12 MP", 160, MAGENTA),
    ];
    let root = BitMapBackend::new(path, (320 * models.len().max(1) as u32 + 200, 480)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let max = rows.iter().map(|r| r.stats.throughput).fold(1.0, f64::max) * 1.25;
    let mut chart = ChartBuilder::on(&root)
        .caption("as shipped: answered req/s (concurrency 16; 160 = retry storm)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..models.len() as f64, 0f64..max)
        .unwrap();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(models.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 { models.get(i).map(|n| n.to_string()).unwrap_or_default() } else { String::new() }
        })
        .y_desc("answered req/s")
        .draw()
        .unwrap();
    for (i, model) in models.iter().enumerate() {
        for (slot, (photo, concurrency, colour)) in bars.iter().enumerate() {
            if let Some(r) = rows.iter().find(|r| r.model == *model && r.photo == *photo && r.concurrency == *concurrency) {
                let x0 = i as f64 + 0.1 + slot as f64 * 0.2;
                chart.draw_series(std::iter::once(Rectangle::new([(x0, 0.0), (x0 + 0.18, r.stats.throughput)], colour.filled()))).unwrap();
            }
        }
    }
    for (photo, concurrency, colour) in bars {
        let colour = colour;
        chart
            .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())
            .unwrap()
            .label(format!("{photo}, concurrency {concurrency}"))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).position(SeriesLabelPosition::UpperRight).draw().unwrap();
    root.present().unwrap();
}
