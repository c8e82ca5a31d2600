//! `make swarm-test`'s load: a steady open loop through the swarm stack's proxy while
//! scripts/swarm-test.sh rolls the service to a new image and kills a replica.
//!
//! The script and this load share one events file of `EPOCH_SECONDS LABEL` lines: this side
//! writes `steady` when the load is on, the script writes each phase as it begins (`rolling
//! update`, `kill`, ...) and `done` to end the run. Every request is put in the phase during
//! which it was sent. At the end: a table per phase (printed, and appended to `--out`), a
//! timeline chart, and a JSON summary the script judges.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::load::{closed_loop, epoch_now, open_loop_timeline, Outcomes, Sent, Stats};

/// The load is this share of the measured capacity of two replicas: sized so that one replica
/// alone carries it (as N+1 sizing does), since a killed replica leaves one; and a start-first
/// update runs a third replica (loading and warming its models) on the same cores for a while.
const LOAD_SHARE: f64 = 0.4;

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
    let started = epoch_now();
    append_event(events_file, "steady");
    println!("[bench] swarm: {capacity:.1} req/s; load on at {rate:.1} req/s until the script writes `done`");
    // The events file is read at most every 200 ms, not at every request.
    let last_look = Mutex::new(Instant::now());
    let go_on = |clock: Instant| {
        let mut last = last_look.lock().unwrap();
        if last.elapsed() < Duration::from_millis(200) {
            return true;
        }
        *last = Instant::now();
        clock.elapsed() <= limit && !events(events_file).iter().any(|(_, label)| label == "done")
    };
    let sent = open_loop_timeline(url, jpeg, rate, &go_on);
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
        // When the open loop began and how many it sent in all (the script holds them against
        // the proxy's log lines: a request the proxy closed without an answer has none).
        "started": f.started,
        "sent": f.points.len(),
        // Every request not answered 200: when it was sent (epoch seconds) and its status (0: no answer).
        "not_answered": f.points.iter().filter(|p| p.1 != 200).map(|p| serde_json::json!([f.started + p.0, p.1])).collect::<Vec<_>>(),
        "phases": f.phases.iter().map(|p| serde_json::json!({
            "label": p.label, "seconds": p.seconds, "sent": p.sent,
            "refused": p.stats.refused, "failed": p.stats.errors, "p50_ms": p.stats.p50, "p99_ms": p.stats.p99,
        })).collect::<Vec<_>>(),
    })
}

/// Every request over time, the phases marked.
pub fn draw_timeline(path: &Path, f: &SwarmFigures) {
    let marks: Vec<(f64, String)> = f.marks.iter().map(|(at, label)| (at - f.started, label.clone())).collect();
    crate::report::draw_timeline(path, "Swarm: rolling update and a killed replica under load", &f.points, &marks);
}
