//! `make swarm-test`'s load: a steady open loop through the swarm stack's proxy while
//! scripts/swarm-test.sh rolls the service to a new image and kills a replica.
//!
//! The script and this load share one events file of `EPOCH_SECONDS LABEL` lines: this side
//! writes `steady` when the load is on, the script writes each phase as it begins (`rolling
//! update`, `kill`, ...) and `done` to end the run. Every request is put in the phase during
//! which it was sent. At the end: a table per phase (printed, and appended to `--out`), a
//! timeline chart, and a JSON summary the script judges.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::load::{bytes_of, closed_loop, http_sender, runtime, Outcomes, Stats, JPEG};

/// The load is this share of the measured capacity of two replicas: sized so that one replica
/// alone carries it (as N+1 sizing does), since a killed replica leaves one; and a start-first
/// update runs a third replica (loading and warming its models) on the same cores for a while.
const LOAD_SHARE: f64 = 0.4;

struct Sent {
    at: f64,
    status: u16,
    took: Duration,
}

fn epoch_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

fn events(path: &Path) -> Vec<(f64, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (at, label) = line.split_once(' ')?;
            Some((at.parse().ok()?, label.trim().to_string()))
        })
        .collect()
}

fn append_event(path: &Path, label: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    writeln!(file, "{:.3} {label}", epoch_now()).unwrap();
}

pub struct Phase {
    pub label: String,
    pub seconds: f64,
    pub sent: usize,
    pub stats: Stats,
}

pub struct SwarmFigures {
    pub capacity: f64,
    pub rate: f64,
    pub phases: Vec<Phase>,
    started: f64,
    marks: Vec<(f64, String)>,
    points: Vec<(f64, u16, f64)>,
}

/// Capacity first (closed loop, c=8), then the open loop until the script writes `done`
/// (or `limit` passes: a run never outlives its script by much).
pub fn measure(url: &str, jpeg: &[u8], events_file: &Path, seconds: f64, limit: Duration) -> SwarmFigures {
    println!("[bench] swarm: capacity through the proxy, closed loop c=8, {seconds} s");
    let capacity = closed_loop(url, jpeg, 8, Duration::from_secs_f64(seconds)).throughput;
    let rate = (capacity * LOAD_SHARE).max(1.0);
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let started = epoch_now();
    append_event(events_file, "steady");
    println!("[bench] swarm: {capacity:.1} req/s; load on at {rate:.1} req/s until the script writes `done`");
    let clock = Instant::now();
    runtime().block_on(async {
        let send = http_sender(url, bytes_of(jpeg), &JPEG, 64);
        let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        let mut tasks = Vec::new();
        let mut last_look = Instant::now();
        loop {
            interval.tick().await;
            if last_look.elapsed() > Duration::from_millis(200) {
                last_look = Instant::now();
                if clock.elapsed() > limit || events(events_file).iter().any(|(_, label)| label == "done") {
                    break;
                }
            }
            let (send, sent) = (Arc::clone(&send), Arc::clone(&sent));
            tasks.push(tokio::spawn(async move {
                let at = epoch_now();
                let t = Instant::now();
                let status = send().await;
                sent.lock().unwrap().push(Sent { at, status, took: t.elapsed() });
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let marks: Vec<(f64, String)> = events(events_file).into_iter().filter(|(at, _)| *at >= started - 1.0).collect();
    let phases = split_into_phases(&sent, &marks);
    let points = sent.iter().map(|s| (s.at - started, s.status, s.took.as_secs_f64() * 1000.0)).collect();
    SwarmFigures { capacity, rate, phases, started, marks, points }
}

/// Each request in the phase that was on when it was sent (`done` ends the last phase).
fn split_into_phases(sent: &[Sent], marks: &[(f64, String)]) -> Vec<Phase> {
    let bounds: Vec<(f64, f64, &str)> = marks
        .windows(2)
        .map(|w| (w[0].0, w[1].0, w[0].1.as_str()))
        .chain(marks.last().filter(|(_, l)| l != "done").map(|(at, l)| (*at, f64::MAX, l.as_str())))
        .collect();
    bounds
        .into_iter()
        .map(|(from, to, label)| {
            let outcomes = Outcomes::new();
            let mut count = 0;
            for s in sent.iter().filter(|s| s.at >= from && s.at < to) {
                outcomes.record(s.status, s.took);
                count += 1;
            }
            let end = if to == f64::MAX { sent.iter().map(|s| s.at).fold(from, f64::max) } else { to };
            let seconds = (end - from).max(0.001);
            Phase { label: label.to_string(), seconds, sent: count, stats: outcomes.stats(Duration::from_secs_f64(seconds)) }
        })
        .collect()
}

pub fn render(f: &SwarmFigures) -> String {
    let mut table = format!(
        "\nThrough the stack's HAProxy on 127.0.0.1 (docker/swarm/stack.yml, two replicas of the image as built, 1 CPU each); \
         mobilenet_v2 on the 640×480 JPEG. Capacity {:.1} req/s (closed loop c=8); open loop at {:.0} % of it ({:.1} req/s).\n\n\
         | phase | seconds | sent | answered | refused (503) | failed | p50 ms | p99 ms |\n|---|---|---|---|---|---|---|---|\n",
        f.capacity,
        LOAD_SHARE * 100.0,
        f.rate
    );
    for p in &f.phases {
        let answered = p.sent as u64 - p.stats.errors - p.stats.refused;
        table.push_str(&format!(
            "| {} | {:.1} | {} | {answered} | {} | {} | {:.1} | {:.1} |\n",
            p.label, p.seconds, p.sent, p.stats.refused, p.stats.errors, p.stats.p50, p.stats.p99
        ));
    }
    table
}

/// What the script judges: per phase, what the client saw.
pub fn summary_json(f: &SwarmFigures) -> serde_json::Value {
    serde_json::json!({
        "capacity": f.capacity,
        "rate": f.rate,
        // Every request not answered 200: when it was sent (epoch seconds) and its status (0: no answer).
        "not_answered": f.points.iter().filter(|p| p.1 != 200).map(|p| serde_json::json!([f.started + p.0, p.1])).collect::<Vec<_>>(),
        "phases": f.phases.iter().map(|p| serde_json::json!({
            "label": p.label, "seconds": p.seconds, "sent": p.sent,
            "refused": p.stats.refused, "failed": p.stats.errors, "p50_ms": p.stats.p50, "p99_ms": p.stats.p99,
        })).collect::<Vec<_>>(),
    })
}

/// Latency of every request over time (answered blue, refused orange, failed red at the top),
/// the phases as vertical lines.
pub fn draw_timeline(path: &Path, f: &SwarmFigures) {
    let font: &'static [u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, font);
    let root = BitMapBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let end = f.points.iter().map(|p| p.0).fold(1.0, f64::max) + 1.0;
    let top = f.points.iter().map(|p| p.2).fold(10.0, f64::max) * 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption("Swarm: rolling update and a killed replica under load", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..end, (1f64..top).log_scale())
        .unwrap();
    chart.configure_mesh().x_desc("seconds").y_desc("latency ms (failed: red, at the top)").draw().unwrap();
    let dots = |status: fn(u16) -> bool, color: RGBColor, at_top: bool| {
        f.points
            .iter()
            .filter(move |p| status(p.1))
            .map(move |p| Circle::new((p.0, if at_top { top / 1.5 } else { p.2.max(1.0) }), 2, color.filled()))
    };
    chart.draw_series(dots(|s| s == 200, BLUE, false)).unwrap();
    chart.draw_series(dots(|s| s == 503, RGBColor(230, 140, 0), false)).unwrap();
    chart.draw_series(dots(|s| s != 200 && s != 503, RED, true)).unwrap();
    for (at, label) in &f.marks {
        let x = at - f.started;
        chart.draw_series(LineSeries::new([(x, 1.0), (x, top)], BLACK.mix(0.5))).unwrap();
        chart.draw_series(std::iter::once(Text::new(label.clone(), (x + 0.3, top / 3.0), ("sans-serif", 13)))).unwrap();
    }
    root.present().unwrap();
}
