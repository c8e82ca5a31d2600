//! ByteTrack (Zhang et al., "ByteTrack: Multi-Object Tracking by Associating Every Detection
//! Box", ECCV 2022), as its authors' code runs it: a constant-velocity Kalman filter on
//! (centre x, centre y, aspect ratio, height), and two associations by IoU per frame — the
//! confident detections against every track (tracked and lost), then the weak ones
//! (0.1 < score < the track threshold) against the tracks still unmatched, which is what keeps
//! an occluded object's id when its score drops. A new track is confirmed by its second
//! detection (on the first frame at once); a lost track is kept for `lost_frames` frames, and
//! found again under its old id. The paper's defaults; class-agnostic, as the paper's tracker is.
//!
//! Checked against `supervision`'s port of the authors' code (tests/python/test_tracking.py).

use nalgebra::{SMatrix, SVector};

use super::detection::BoundingBox;

type Mean = SVector<f64, 8>;
type Covariance = SMatrix<f64, 8, 8>;
type Measurement = SVector<f64, 4>;

/// The tracker's settings; [`Default`] is the paper's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrackerSettings {
    /// Detections at or above it take part in the first association (and may start a track
    /// when `0.1` over it); those between 0.1 and it in the second.
    pub track_threshold: f32,
    /// The first association's largest cost (1 − IoU × score) for a match.
    pub match_threshold: f32,
    /// Frames a lost track is kept for, to be found again under its id.
    pub lost_frames: u64,
}

impl Default for TrackerSettings {
    fn default() -> Self {
        TrackerSettings { track_threshold: 0.5, match_threshold: 0.8, lost_frames: 30 }
    }
}

/// Weak detections at or under this are ignored (the paper's lower bound).
const LOW_SCORE: f32 = 0.1;
/// The second association's largest cost (1 − IoU), and the unconfirmed tracks'.
const SECOND_MATCH: f64 = 0.5;
const UNCONFIRMED_MATCH: f64 = 0.7;
/// A tracked and a lost track closer than this (1 − IoU) are one object: the younger goes.
const DUPLICATE: f64 = 0.15;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Tracked,
    Lost,
}

#[derive(Debug, Clone)]
struct Track {
    /// The id users see, given once the track is confirmed.
    id: Option<u64>,
    confirmed: bool,
    state: State,
    mean: Mean,
    covariance: Covariance,
    /// The frame it was last seen in, and the one it started in.
    frame: u64,
    start_frame: u64,
    tracklet_len: u64,
    /// Which input detection updated it this frame, if any.
    matched: Option<usize>,
}

impl Track {
    fn bbox(&self) -> BoundingBox {
        let (cx, cy, a, h) = (self.mean[0], self.mean[1], self.mean[2], self.mean[3]);
        let w = a * h;
        BoundingBox { x1: (cx - w / 2.0) as f32, y1: (cy - h / 2.0) as f32, x2: (cx + w / 2.0) as f32, y2: (cy + h / 2.0) as f32 }
    }
}

/// One detection as the tracker sees it: its box in pixels and its score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observed {
    pub bbox: BoundingBox,
    pub score: f32,
}

/// A track where it stands after a frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrackedBox {
    pub id: u64,
    /// The filter's estimate, not the detection's box.
    pub bbox: BoundingBox,
}

/// One video's tracker: feed it every frame in order.
#[derive(Debug, Clone)]
pub struct ByteTrack {
    settings: TrackerSettings,
    frame: u64,
    tracked: Vec<Track>,
    lost: Vec<Track>,
    next_id: u64,
}

impl ByteTrack {
    pub fn new(settings: TrackerSettings) -> ByteTrack {
        ByteTrack { settings, frame: 0, tracked: Vec::new(), lost: Vec::new(), next_id: 1 }
    }

    /// A frame's detections: each one's track id (`None` for a detection no confirmed track
    /// holds), in the order given.
    pub fn update(&mut self, detections: &[Observed]) -> Vec<Option<u64>> {
        self.frame += 1;
        let frame = self.frame;
        let high: Vec<usize> = (0..detections.len()).filter(|&i| detections[i].score > self.settings.track_threshold).collect();
        let low: Vec<usize> = (0..detections.len())
            .filter(|&i| detections[i].score > LOW_SCORE && detections[i].score < self.settings.track_threshold)
            .collect();

        let (mut unconfirmed, confirmed): (Vec<Track>, Vec<Track>) = std::mem::take(&mut self.tracked).into_iter().partition(|t| !t.confirmed);
        // The first association: confident detections against the tracked and the lost.
        let mut pool: Vec<Track> = confirmed;
        pool.append(&mut std::mem::take(&mut self.lost));
        for track in pool.iter_mut().chain(unconfirmed.iter_mut()) {
            track.matched = None;
        }
        for track in &mut pool {
            predict(track);
        }
        let costs = fused_costs(&pool, detections, &high);
        let (matches, unmatched_pool, unmatched_high) = assign(&costs, pool.len(), high.len(), f64::from(self.settings.match_threshold));
        for (t, d) in matches {
            observe(&mut pool[t], &detections[high[d]].bbox, high[d], frame, &mut self.next_id);
        }
        // The second: weak detections against the tracked ones still unmatched.
        let remaining: Vec<usize> = unmatched_pool.iter().copied().filter(|&t| pool[t].state == State::Tracked).collect();
        let costs = iou_costs(remaining.iter().map(|&t| pool[t].bbox()), low.iter().map(|&d| detections[d].bbox));
        let (matches, unmatched_remaining, _) = assign(&costs, remaining.len(), low.len(), SECOND_MATCH);
        for (r, d) in matches {
            observe(&mut pool[remaining[r]], &detections[low[d]].bbox, low[d], frame, &mut self.next_id);
        }
        for r in unmatched_remaining {
            pool[remaining[r]].state = State::Lost;
        }
        // Tracks begun last frame: confirmed by a confident detection now, or dropped.
        let left: Vec<usize> = unmatched_high.iter().map(|&d| high[d]).collect();
        let costs = fused_costs(&unconfirmed, detections, &left);
        let (matches, dropped, unmatched_left) = assign(&costs, unconfirmed.len(), left.len(), UNCONFIRMED_MATCH);
        for (t, d) in matches {
            observe(&mut unconfirmed[t], &detections[left[d]].bbox, left[d], frame, &mut self.next_id);
        }
        let dropped: Vec<bool> = (0..unconfirmed.len()).map(|t| dropped.contains(&t)).collect();
        let mut kept_unconfirmed: Vec<Track> = unconfirmed.into_iter().zip(dropped).filter(|(_, d)| !d).map(|(t, _)| t).collect();
        // New tracks from the confident detections nobody took.
        let mut started = Vec::new();
        for &d in unmatched_left.iter().map(|&i| &left[i]) {
            if detections[d].score < self.settings.track_threshold + 0.1 {
                continue;
            }
            let (mean, covariance) = initiate(&to_xyah(&detections[d].bbox));
            let confirmed = frame == 1;
            let id = confirmed.then(|| take_id(&mut self.next_id));
            started.push(Track { id, confirmed, state: State::Tracked, mean, covariance, frame, start_frame: frame, tracklet_len: 0, matched: Some(d) });
        }
        // The authors' order: the tracked first (as they stood, then the re-found), then the new.
        let lost_frames = self.settings.lost_frames;
        let (mut tracked, lost): (Vec<Track>, Vec<Track>) = pool.into_iter().partition(|t| t.state == State::Tracked);
        tracked.append(&mut kept_unconfirmed);
        tracked.append(&mut started);
        let lost: Vec<Track> = lost.into_iter().filter(|t| frame - t.frame <= lost_frames).collect();
        let (tracked, lost) = without_duplicates(tracked, lost);
        self.tracked = tracked;
        self.lost = lost;

        let mut ids = vec![None; detections.len()];
        for track in self.tracked.iter().filter(|t| t.confirmed) {
            if let Some(d) = track.matched {
                ids[d] = track.id;
            }
        }
        ids
    }

    /// A frame with no detection run (detecting every Nth frame): every track moves on by
    /// its velocity, none is lost for it. The confirmed tracks' boxes on that frame.
    pub fn coast(&mut self) -> Vec<TrackedBox> {
        self.frame += 1;
        for track in self.tracked.iter_mut().chain(self.lost.iter_mut()) {
            predict(track);
            track.matched = None;
            // Not seen, but not missed either: the lost-track clock counts detection frames.
            track.frame += 1;
        }
        self.tracked
            .iter()
            .filter(|t| t.confirmed && t.state == State::Tracked)
            .filter_map(|t| t.id.map(|id| TrackedBox { id, bbox: t.bbox() }))
            .collect()
    }

    /// The ids of the confirmed tracks alive (tracked or lost).
    pub fn confirmed_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.tracked.iter().chain(&self.lost).filter_map(|t| t.id)
    }

    /// Tracks alive (tracked or lost).
    #[cfg(test)]
    fn alive(&self) -> usize {
        self.tracked.len() + self.lost.len()
    }
}

fn take_id(next: &mut u64) -> u64 {
    let id = *next;
    *next += 1;
    id
}

/// A track updated with its detection this frame (re-found when it was lost).
fn observe(track: &mut Track, bbox: &BoundingBox, detection: usize, frame: u64, next_id: &mut u64) {
    let was_lost = track.state == State::Lost;
    let (mean, covariance) = kalman_update(&track.mean, &track.covariance, &to_xyah(bbox));
    track.mean = mean;
    track.covariance = covariance;
    track.state = State::Tracked;
    track.frame = frame;
    track.matched = Some(detection);
    if was_lost {
        track.tracklet_len = 0;
        return;
    }
    track.tracklet_len += 1;
    if !track.confirmed {
        track.confirmed = true;
        if track.id.is_none() {
            track.id = Some(take_id(next_id));
        }
    }
}

fn without_duplicates(tracked: Vec<Track>, lost: Vec<Track>) -> (Vec<Track>, Vec<Track>) {
    let costs = iou_costs(tracked.iter().map(Track::bbox), lost.iter().map(Track::bbox));
    let (mut drop_tracked, mut drop_lost) = (vec![false; tracked.len()], vec![false; lost.len()]);
    for (a, row) in costs.iter().enumerate() {
        for (b, &cost) in row.iter().enumerate() {
            if cost < DUPLICATE {
                let age = |t: &Track| t.frame - t.start_frame;
                if age(&tracked[a]) > age(&lost[b]) {
                    drop_lost[b] = true;
                } else {
                    drop_tracked[a] = true;
                }
            }
        }
    }
    let keep = |tracks: Vec<Track>, drop: Vec<bool>| tracks.into_iter().zip(drop).filter(|(_, d)| !d).map(|(t, _)| t).collect();
    (keep(tracked, drop_tracked), keep(lost, drop_lost))
}

fn iou(a: &BoundingBox, b: &BoundingBox) -> f64 {
    let (a, b) = ([a.x1, a.y1, a.x2, a.y2].map(f64::from), [b.x1, b.y1, b.x2, b.y2].map(f64::from));
    let inter = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0) * (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union == 0.0 || !union.is_finite() {
        0.0
    } else {
        inter / union
    }
}

/// Rows: tracks; columns: detections; 1 − IoU.
fn iou_costs(tracks: impl Iterator<Item = BoundingBox>, detections: impl Iterator<Item = BoundingBox> + Clone) -> Vec<Vec<f64>> {
    tracks.map(|t| detections.clone().map(|d| 1.0 - iou(&t, &d)).collect()).collect()
}

/// 1 − IoU × the detection's score: the authors' first association.
fn fused_costs(tracks: &[Track], detections: &[Observed], which: &[usize]) -> Vec<Vec<f64>> {
    tracks
        .iter()
        .map(|t| {
            let bbox = t.bbox();
            which.iter().map(|&d| 1.0 - iou(&bbox, &detections[d].bbox) * f64::from(detections[d].score)).collect()
        })
        .collect()
}

/// The minimum-cost assignment of rows to columns (as scipy's `linear_sum_assignment`), with
/// pairs over `threshold` left unmatched: the matches, the unmatched rows, the unmatched columns.
fn assign(costs: &[Vec<f64>], rows: usize, columns: usize, threshold: f64) -> (Vec<(usize, usize)>, Vec<usize>, Vec<usize>) {
    if rows == 0 || columns == 0 {
        return (Vec::new(), (0..rows).collect(), (0..columns).collect());
    }
    // Costs over the threshold all cost the same just over it (the authors' clipping), so
    // the assignment never trades a good pair for a hopeless one.
    let ceiling = threshold + 1e-4;
    let n = rows.max(columns);
    let mut square = vec![vec![ceiling; n]; n];
    for (r, row) in costs.iter().enumerate() {
        for (c, &cost) in row.iter().enumerate() {
            square[r][c] = cost.min(ceiling);
        }
    }
    let column_of = hungarian(&square);
    let mut matches = Vec::new();
    let (mut row_taken, mut column_taken) = (vec![false; rows], vec![false; columns]);
    for (r, &c) in column_of.iter().enumerate().take(rows) {
        if c < columns && square[r][c] <= threshold {
            matches.push((r, c));
            row_taken[r] = true;
            column_taken[c] = true;
        }
    }
    let unmatched = |taken: Vec<bool>| taken.iter().enumerate().filter(|(_, &t)| !t).map(|(i, _)| i).collect();
    (matches, unmatched(row_taken), unmatched(column_taken))
}

/// The Hungarian method (Kuhn–Munkres with potentials, O(n³)) on a square matrix: each row's column.
fn hungarian(cost: &[Vec<f64>]) -> Vec<usize> {
    let n = cost.len();
    let (mut u, mut v) = (vec![0.0; n + 1], vec![0.0; n + 1]);
    let mut row_of = vec![0usize; n + 1];
    let mut way = vec![0usize; n + 1];
    for i in 1..=n {
        row_of[0] = i;
        let mut j0 = 0;
        let mut min = vec![f64::INFINITY; n + 1];
        let mut used = vec![false; n + 1];
        loop {
            used[j0] = true;
            let i0 = row_of[j0];
            let (mut delta, mut j1) = (f64::INFINITY, 0);
            for j in 1..=n {
                if !used[j] {
                    let reduced = cost[i0 - 1][j - 1] - u[i0] - v[j];
                    if reduced < min[j] {
                        min[j] = reduced;
                        way[j] = j0;
                    }
                    if min[j] < delta {
                        delta = min[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=n {
                if used[j] {
                    u[row_of[j]] += delta;
                    v[j] -= delta;
                } else {
                    min[j] -= delta;
                }
            }
            j0 = j1;
            if row_of[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            row_of[j0] = row_of[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut column_of = vec![0; n];
    for j in 1..=n {
        column_of[row_of[j] - 1] = j - 1;
    }
    column_of
}

fn to_xyah(b: &BoundingBox) -> Measurement {
    let (w, h) = (f64::from(b.x2 - b.x1), f64::from(b.y2 - b.y1));
    Measurement::new(f64::from(b.x1) + w / 2.0, f64::from(b.y1) + h / 2.0, w / h, h)
}

// The authors' Kalman filter: noise scaled by the box's height.
const POSITION_WEIGHT: f64 = 1.0 / 20.0;
const VELOCITY_WEIGHT: f64 = 1.0 / 160.0;

fn initiate(m: &Measurement) -> (Mean, Covariance) {
    let h = m[3];
    let mean = Mean::from_iterator(m.iter().copied().chain([0.0; 4]));
    let std = [
        2.0 * POSITION_WEIGHT * h,
        2.0 * POSITION_WEIGHT * h,
        1e-2,
        2.0 * POSITION_WEIGHT * h,
        10.0 * VELOCITY_WEIGHT * h,
        10.0 * VELOCITY_WEIGHT * h,
        1e-5,
        10.0 * VELOCITY_WEIGHT * h,
    ];
    (mean, Covariance::from_diagonal(&Mean::from_iterator(std.iter().map(|s| s * s))))
}

fn motion() -> Covariance {
    let mut f = Covariance::identity();
    for i in 0..4 {
        f[(i, i + 4)] = 1.0;
    }
    f
}

/// One frame on: a lost track's height stops changing (the authors zero its velocity).
fn predict(track: &mut Track) {
    let mut mean = track.mean;
    if track.state != State::Tracked {
        mean[7] = 0.0;
    }
    let h = mean[3];
    let std = [
        POSITION_WEIGHT * h,
        POSITION_WEIGHT * h,
        1e-2,
        POSITION_WEIGHT * h,
        VELOCITY_WEIGHT * h,
        VELOCITY_WEIGHT * h,
        1e-5,
        VELOCITY_WEIGHT * h,
    ];
    let noise = Covariance::from_diagonal(&Mean::from_iterator(std.iter().map(|s| s * s)));
    let f = motion();
    track.mean = f * mean;
    track.covariance = f * track.covariance * f.transpose() + noise;
}

fn kalman_update(mean: &Mean, covariance: &Covariance, m: &Measurement) -> (Mean, Covariance) {
    let h = mean[3];
    let std = [POSITION_WEIGHT * h, POSITION_WEIGHT * h, 1e-1, POSITION_WEIGHT * h];
    let projection = SMatrix::<f64, 4, 8>::identity();
    let innovation_noise = SMatrix::<f64, 4, 4>::from_diagonal(&Measurement::from_iterator(std.iter().map(|s| s * s)));
    let projected_mean = projection * mean;
    let projected_cov = projection * covariance * projection.transpose() + innovation_noise;
    let cross = covariance * projection.transpose(); // 8×4
    // K = P Hᵀ S⁻¹, by Cholesky (S is symmetric positive definite).
    let gain = match projected_cov.cholesky() {
        Some(chol) => chol.solve(&cross.transpose()).transpose(),
        None => return (*mean, *covariance),
    };
    let new_mean = mean + gain * (m - projected_mean);
    let new_covariance = covariance - gain * projected_cov * gain.transpose();
    (new_mean, new_covariance)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed(x: f32, y: f32, w: f32, h: f32, score: f32) -> Observed {
        Observed { bbox: BoundingBox { x1: x, y1: y, x2: x + w, y2: y + h }, score }
    }

    #[test]
    fn hungarian_finds_the_cheapest_assignment() {
        let cost = vec![vec![4.0, 1.0, 3.0], vec![2.0, 0.0, 5.0], vec![3.0, 2.0, 2.0]];
        let columns = hungarian(&cost);
        let total: f64 = columns.iter().enumerate().map(|(r, &c)| cost[r][c]).sum();
        assert_eq!(total, 5.0);
        assert_eq!(columns, vec![1, 0, 2]);
    }

    #[test]
    fn assignment_leaves_pairs_over_the_threshold_unmatched() {
        let costs = vec![vec![0.1, 0.95], vec![0.9, 0.99]];
        let (matches, rows, columns) = assign(&costs, 2, 2, 0.8);
        assert_eq!(matches, vec![(0, 0)]);
        assert_eq!(rows, vec![1]);
        assert_eq!(columns, vec![1]);
    }

    #[test]
    fn two_objects_moving_keep_their_ids() {
        let mut tracker = ByteTrack::new(TrackerSettings::default());
        let mut seen = Vec::new();
        for f in 0..40 {
            let x = f as f32 * 4.0;
            let ids = tracker.update(&[boxed(10.0 + x, 20.0, 50.0, 80.0, 0.9), boxed(400.0 - x, 200.0, 60.0, 60.0, 0.8)]);
            seen.push(ids);
        }
        assert_eq!(seen[0], vec![Some(1), Some(2)], "the first frame confirms at once");
        assert!(seen.iter().all(|ids| ids == &seen[0]), "{seen:?}");
    }

    #[test]
    fn a_later_track_is_confirmed_by_its_second_detection() {
        let mut tracker = ByteTrack::new(TrackerSettings::default());
        tracker.update(&[boxed(10.0, 10.0, 40.0, 40.0, 0.9)]);
        let second = tracker.update(&[boxed(12.0, 10.0, 40.0, 40.0, 0.9), boxed(300.0, 300.0, 40.0, 40.0, 0.9)]);
        assert_eq!(second, vec![Some(1), None]);
        let third = tracker.update(&[boxed(14.0, 10.0, 40.0, 40.0, 0.9), boxed(302.0, 300.0, 40.0, 40.0, 0.9)]);
        assert_eq!(third, vec![Some(1), Some(2)]);
    }

    #[test]
    fn a_weak_detection_keeps_an_occluded_track() {
        let mut tracker = ByteTrack::new(TrackerSettings::default());
        for f in 0..5 {
            tracker.update(&[boxed(10.0 + f as f32 * 3.0, 10.0, 40.0, 40.0, 0.9)]);
        }
        // The score drops under the track threshold: the second association holds it.
        assert_eq!(tracker.update(&[boxed(25.0, 10.0, 40.0, 40.0, 0.3)]), vec![Some(1)]);
        assert_eq!(tracker.update(&[boxed(28.0, 10.0, 40.0, 40.0, 0.9)]), vec![Some(1)]);
    }

    #[test]
    fn a_lost_track_is_found_again_then_forgotten_after_lost_frames() {
        let settings = TrackerSettings { lost_frames: 5, ..TrackerSettings::default() };
        let mut tracker = ByteTrack::new(settings);
        for _ in 0..3 {
            tracker.update(&[boxed(100.0, 100.0, 40.0, 40.0, 0.9)]);
        }
        for _ in 0..3 {
            assert_eq!(tracker.update(&[]), Vec::<Option<u64>>::new());
        }
        assert_eq!(tracker.update(&[boxed(100.0, 100.0, 40.0, 40.0, 0.9)]), vec![Some(1)], "re-found within lost_frames");
        for _ in 0..7 {
            tracker.update(&[]);
        }
        assert_eq!(tracker.alive(), 0, "forgotten after lost_frames");
        tracker.update(&[boxed(100.0, 100.0, 40.0, 40.0, 0.9)]);
        assert_eq!(tracker.update(&[boxed(100.0, 100.0, 40.0, 40.0, 0.9)]), vec![Some(2)], "a new id");
    }

    #[test]
    fn coasting_moves_tracks_by_their_velocity() {
        let mut tracker = ByteTrack::new(TrackerSettings::default());
        for f in 0..10 {
            tracker.update(&[boxed(10.0 + f as f32 * 5.0, 10.0, 40.0, 40.0, 0.9)]);
        }
        let coasted = tracker.coast();
        assert_eq!(coasted.len(), 1);
        assert_eq!(coasted[0].id, 1);
        assert!((coasted[0].bbox.x1 - 60.0).abs() < 2.0, "{:?}", coasted[0].bbox);
        assert_eq!(tracker.update(&[boxed(65.0, 10.0, 40.0, 40.0, 0.9)]), vec![Some(1)]);
    }
}
