//! The report: Markdown tables for BENCHMARKS.md and PNG charts.

use std::path::Path;

use plotters::prelude::*;
use visionserve::model_config::ModelFormat;

use crate::ceiling::{format_name, Ceiling};
use crate::load::{Row, Stats};
use crate::{Split, SPLITS};

pub fn split_name(s: Split) -> String {
    format!("{}×{}", s.workers, s.threads)
}

pub fn render_report(
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
pub struct FormatSummary {
    pub name: String,
    pub format: ModelFormat,
    /// One forward at batch 1 (1 worker × 2 threads, preprocessing excluded).
    pub forward_ms: f64,
    /// Best in-process img/s, preprocessing excluded and included.
    pub ceiling: f64,
    pub ceiling_with_preprocessing: f64,
    pub forward_and_decode_ms: f64,
    c1_p99: f64,
    c16_throughput: f64,
    c16_p99: f64,
}

impl FormatSummary {
    pub fn of(name: &str, format: ModelFormat, ceiling: &[Ceiling], rows: &[Row], forward_and_decode_ms: f64) -> Self {
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

pub fn render_formats(formats: &[FormatSummary]) -> String {
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
pub fn draw_format_chart(path: &Path, formats: &[FormatSummary]) {
    let font: &'static [u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
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

pub fn draw_chart(path: &Path, name: &str, rows: &[Row]) {
    let font: &'static [u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
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

/// Bars of p50 and p99 per labelled run (log scale: a cache hit and a forward pass differ by
/// an order of magnitude).
pub fn draw_quantiles(path: &Path, title: &str, rows: &[(&str, Stats)]) {
    let font: &'static [u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, font);
    let root = BitMapBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let max = rows.iter().map(|(_, s)| s.p99).fold(1.0, f64::max) * 2.0;
    let min = rows.iter().map(|(_, s)| s.p50).fold(f64::MAX, f64::min).max(0.01) / 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..rows.len() as f64, (min..max).log_scale())
        .unwrap();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 { rows.get(i).map(|r| r.0.to_string()).unwrap_or_default() } else { String::new() }
        })
        .y_desc("ms (p50 dark, p99 light)")
        .draw()
        .unwrap();
    for (i, (_, s)) in rows.iter().enumerate() {
        let x = i as f64;
        chart.draw_series(std::iter::once(Rectangle::new([(x + 0.25, min), (x + 0.75, s.p99)], BLUE.mix(0.3).filled()))).unwrap();
        chart.draw_series(std::iter::once(Rectangle::new([(x + 0.25, min), (x + 0.75, s.p50)], BLUE.mix(0.8).filled()))).unwrap();
    }
    root.present().unwrap();
}

/// Latency of every request over time (answered blue, refused orange, failed red at the top),
/// marks (seconds from the start, label) as vertical lines. `points`: (seconds from the start,
/// status, latency ms).
pub fn draw_timeline(path: &Path, caption: &str, points: &[(f64, u16, f64)], marks: &[(f64, String)]) {
    let font: &'static [u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, font);
    let root = BitMapBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let end = points.iter().map(|p| p.0).fold(1.0, f64::max) + 1.0;
    let top = points.iter().map(|p| p.2).fold(10.0, f64::max) * 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..end, (1f64..top).log_scale())
        .unwrap();
    chart.configure_mesh().x_desc("seconds").y_desc("latency ms (failed: red, at the top)").draw().unwrap();
    let dots = |status: fn(u16) -> bool, color: RGBColor, at_top: bool| {
        points
            .iter()
            .filter(move |p| status(p.1))
            .map(move |p| Circle::new((p.0, if at_top { top / 1.5 } else { p.2.max(1.0) }), 2, color.filled()))
    };
    chart.draw_series(dots(|s| s == 200, BLUE, false)).unwrap();
    chart.draw_series(dots(|s| s == 503, RGBColor(230, 140, 0), false)).unwrap();
    chart.draw_series(dots(|s| s != 200 && s != 503, RED, true)).unwrap();
    for (x, label) in marks {
        let x = *x;
        chart.draw_series(LineSeries::new([(x, 1.0), (x, top)], BLACK.mix(0.5))).unwrap();
        chart.draw_series(std::iter::once(Text::new(label.clone(), (x + 0.3, top / 3.0), ("sans-serif", 13)))).unwrap();
    }
    root.present().unwrap();
}
