//! The engine's rules, apart from the machinery that carries them out: which model's batch an
//! idle executor takes next, how many threads a forward gets, how large a batch pays, and
//! whether a request is admitted. Pure functions of numbers, unit-tested here; `pool.rs`,
//! `backend.rs` and `ModelRuntime::try_admit` only apply them.

use std::time::Duration;

// ---- Scheduling: which model goes next ----

/// What a version with work has on the next free executor.
#[derive(Debug, Clone, Copy)]
pub struct Claim {
    /// Fewer of its reserved executors run it than it was promised.
    pub reserved: bool,
    /// Its oldest job's wait in units of its own time per image.
    pub wait_for_size: f64,
}

/// The index of the strongest claim: an unmet reservation first, then the longest wait for
/// its size (so short jobs pass long ones, and a long one's claim still grows with every
/// millisecond: none starves).
pub fn strongest(claims: impl Iterator<Item = Claim>) -> Option<usize> {
    claims
        .enumerate()
        .max_by(|(_, a), (_, b)| a.reserved.cmp(&b.reserved).then(a.wait_for_size.total_cmp(&b.wait_for_size)))
        .map(|(i, _)| i)
}

/// A job's wait in units of its model's time per image (at least 1 ms, so a model with no
/// history yet, or a trivially fast one, does not claim every executor).
pub fn wait_for_size(waited: Duration, per_image: Duration) -> f64 {
    waited.as_secs_f64() / per_image.max(Duration::from_millis(1)).as_secs_f64()
}

// ---- Threads per forward ----

/// The intra-op threads of one forward: the model's own setting when it has one; otherwise the
/// cores divided among the executors busy now, so a lone request runs on every core (the
/// low-latency split) and a busy server one forward per core (the throughput split).
pub fn threads_for(own: usize, cores: usize, busy: usize) -> usize {
    if own > 0 {
        own
    } else {
        (cores / busy.max(1)).max(1)
    }
}

// ---- The batch bound ----

/// The batch sizes measured at load: powers of two below `max`, and `max`.
pub fn batch_sizes(max: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |s| Some(s * 2)).take_while(|&s| s < max).collect();
    sizes.push(max);
    sizes
}

/// Whether measuring larger batches can stop: the last one measured was over a quarter dearer
/// per image than the best so far (their cost only grows, and a big batch of a slow model
/// takes seconds).
pub fn stop_measuring(per_image: &[f64]) -> bool {
    let best = per_image.iter().copied().fold(f64::INFINITY, f64::min);
    per_image.last().is_some_and(|&last| last > best * 1.25)
}

/// The smallest batch size whose measured time per image is within 5 % of the cheapest. On a
/// CPU a batch is not always cheaper per image than one image (BENCHMARKS.md, "batch only as
/// far as it pays"), so the server measures, and batches only as far as it pays.
pub fn cheapest_batch(sizes: &[usize], per_image: &[f64]) -> usize {
    let cheapest = per_image.iter().copied().fold(f64::INFINITY, f64::min);
    sizes.iter().zip(per_image).find(|(_, &cost)| cost <= cheapest * 1.05).map(|(&size, _)| size).unwrap_or(1)
}

// ---- Admission ----

/// Whether a request reaches a model fresh, or as a later step of work already under way (a
/// pipeline's second model): refusing the latter for `max_queue_ms` would throw the first
/// step's work away to shorten a queue, so it is held only to its deadline and the queue's bound.
/// A live stream's frame is `Sheddable`: another frame follows it in a tenth of a second, so it
/// is the first thing a growing queue turns away — admitted only while the wait is within half
/// of what a fresh request is admitted to — and a busy server drops frames before it refuses
/// a photo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    New,
    Continuing,
    Sheddable,
}

/// Images a model's queue always admits, whatever `max_queue_ms` says: what 16 clients keep
/// waiting, and at least a full batch for each executor that may serve it, so a slow model is
/// not refused under ordinary load and its executors never run dry. No more than that: every
/// image admitted beyond what keeps the executors busy only lengthens every admitted wait.
pub const MIN_QUEUE_IMAGES: usize = 16;

/// What admission weighs for one version at one moment.
#[derive(Debug, Clone, Copy)]
pub struct QueueState {
    /// How long a request arriving now would wait for an executor.
    pub expected_wait: Duration,
    /// What is left of the request's deadline.
    pub time_left: Duration,
    /// The model's `max_queue_ms` (0: no such bound).
    pub max_queue_ms: u64,
    /// How long [`MIN_QUEUE_IMAGES`] (or a batch per executor, if more) take to clear.
    pub floor: Duration,
}

/// The floor's size in images: [`MIN_QUEUE_IMAGES`], or a full batch per executor if more.
pub fn floor_images(parallelism: usize, batch_bound: usize) -> usize {
    MIN_QUEUE_IMAGES.max(parallelism * batch_bound)
}

/// Whether a request can be answered in time: its expected wait must be within what is left of
/// its deadline, and — arriving fresh — within the model's `max_queue_ms` or the floor's time,
/// whichever is longer; a sheddable frame within half of that (half the floor's time where
/// the model sets no `max_queue_ms`).
pub fn admits(state: QueueState, arrival: Arrival) -> bool {
    if state.expected_wait > state.time_left {
        return false;
    }
    let fresh_bound = Duration::from_millis(state.max_queue_ms).max(state.floor);
    match arrival {
        Arrival::Continuing => true,
        Arrival::New => state.max_queue_ms == 0 || state.expected_wait <= fresh_bound,
        Arrival::Sheddable => state.expected_wait <= fresh_bound / 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_counts_in_units_of_the_models_own_work() {
        let fast = Duration::from_millis(10);
        let slow = Duration::from_millis(50);
        // A classifier waiting 30 ms has waited longer for its size than a detector waiting 100 ms...
        assert!(wait_for_size(Duration::from_millis(30), fast) > wait_for_size(Duration::from_millis(100), slow));
        // ...but a detector's claim grows with its wait, so it is not passed for ever.
        assert!(wait_for_size(Duration::from_millis(200), slow) > wait_for_size(Duration::from_millis(30), fast));
        // A model with no history yet counts as 1 ms an image, not as infinitely fast.
        assert_eq!(wait_for_size(Duration::from_millis(5), Duration::ZERO), 5.0);
    }

    #[test]
    fn an_unmet_reservation_goes_first_then_the_longest_wait_for_size() {
        let claim = |reserved, wait_for_size| Claim { reserved, wait_for_size };
        assert_eq!(strongest([claim(false, 3.0), claim(false, 9.0), claim(false, 1.0)].into_iter()), Some(1));
        assert_eq!(strongest([claim(false, 30.0), claim(true, 0.5), claim(false, 9.0)].into_iter()), Some(1));
        assert_eq!(strongest([claim(true, 2.0), claim(true, 4.0)].into_iter()), Some(1));
        assert_eq!(strongest(std::iter::empty()), None);
    }

    #[test]
    fn a_lone_forward_gets_every_core_and_a_busy_pool_one_each() {
        assert_eq!(threads_for(0, 8, 1), 8);
        assert_eq!(threads_for(0, 8, 8), 1);
        assert_eq!(threads_for(0, 2, 3), 1);
        assert_eq!(threads_for(0, 8, 0), 8);
        assert_eq!(threads_for(3, 8, 8), 3, "the model's own setting wins");
    }

    #[test]
    fn measures_powers_of_two_up_to_the_configured_bound() {
        assert_eq!(batch_sizes(8), vec![1, 2, 4, 8]);
        assert_eq!(batch_sizes(6), vec![1, 2, 4, 6]);
        assert_eq!(batch_sizes(2), vec![1, 2]);
        assert!(!stop_measuring(&[10.0, 9.0, 11.0]));
        assert!(stop_measuring(&[10.0, 9.0, 11.5]));
        assert!(!stop_measuring(&[]));
    }

    #[test]
    fn batches_only_as_far_as_it_is_cheaper_per_image() {
        // Overhead amortised: the largest batch is the cheapest.
        assert_eq!(cheapest_batch(&[1, 2, 4, 8], &[10.0, 6.0, 4.0, 3.0]), 8);
        // Larger batches cost more per image (caches): one at a time.
        assert_eq!(cheapest_batch(&[1, 2, 4, 8], &[10.0, 10.4, 11.0, 12.0]), 1);
        // Within 5 % of the cheapest, the smaller batch wins (less waiting for its slowest image).
        assert_eq!(cheapest_batch(&[1, 2, 4, 8], &[10.0, 8.1, 8.0, 7.9]), 2);
    }

    #[test]
    fn admission_weighs_the_deadline_the_queue_bound_and_the_floor() {
        let ms = Duration::from_millis;
        let state = |wait, left, max_queue_ms, floor| QueueState { expected_wait: ms(wait), time_left: ms(left), max_queue_ms, floor: ms(floor) };
        // Past the deadline: refused, however the request arrives.
        assert!(!admits(state(500, 400, 0, 0), Arrival::New));
        assert!(!admits(state(500, 400, 0, 0), Arrival::Continuing));
        // Past max_queue_ms but above the floor's time: admitted.
        assert!(admits(state(300, 10_000, 100, 400), Arrival::New));
        // Past both: refused when fresh, admitted as a pipeline's later step.
        assert!(!admits(state(500, 10_000, 100, 400), Arrival::New));
        assert!(admits(state(500, 10_000, 100, 400), Arrival::Continuing));
        // No max_queue_ms: only the deadline counts.
        assert!(admits(state(5_000, 10_000, 0, 0), Arrival::New));
        // A stream's frame goes first: past half the fresh bound it is turned away while a photo
        // is still admitted, and where max_queue_ms is 0 it is held to half the floor's time.
        assert!(admits(state(200, 10_000, 100, 400), Arrival::Sheddable));
        assert!(!admits(state(300, 10_000, 100, 400), Arrival::Sheddable));
        assert!(admits(state(300, 10_000, 100, 400), Arrival::New));
        assert!(!admits(state(300, 10_000, 0, 400), Arrival::Sheddable));
        assert!(admits(state(300, 10_000, 0, 400), Arrival::New));
        assert!(!admits(state(100, 50, 100, 400), Arrival::Sheddable));
        assert!(admits(state(0, 1_000, 0, 0), Arrival::Sheddable));
        assert_eq!(floor_images(2, 4), 16);
        assert_eq!(floor_images(4, 8), 32);
    }
}
