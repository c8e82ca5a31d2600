//! How long a new request would wait in a model's queue, from one estimator: the images
//! queued, times the recent service time per image, divided by the workers that take them.
//! Admission refuses a request whose expected wait is over its budget (its deadline, or the
//! model's `max_queue_ms`) at once, before it is decoded, instead of letting it queue for an
//! answer that comes too late; `/metrics` exports the same estimate for autoscaling.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The recent forward-pass time per image of one model version, as an exponentially weighted
/// moving average (each batch weighs `WEIGHT`), lock-free for the workers that record it.
#[derive(Debug)]
pub struct ServiceTime {
    nanos_per_image: AtomicU64,
}

/// How much one batch moves the average: recent enough to follow a change of load or of
/// input sizes within a few batches, smooth enough that one slow batch does not refuse a burst.
const WEIGHT: f64 = 0.25;

impl ServiceTime {
    /// Starts from `seed` (the warm-up's time), until real batches are measured.
    pub fn new(seed: Duration) -> Self {
        ServiceTime { nanos_per_image: AtomicU64::new(seed.as_nanos() as u64) }
    }

    pub fn record(&self, forward: Duration, images: usize) {
        if images == 0 {
            return;
        }
        let sample = forward.as_nanos() as f64 / images as f64;
        // Workers race here; a lost update only drops one sample of a moving average.
        let old = self.nanos_per_image.load(Ordering::Relaxed) as f64;
        let new = old + WEIGHT * (sample - old);
        self.nanos_per_image.store(new as u64, Ordering::Relaxed);
    }

    pub fn per_image(&self) -> Duration {
        Duration::from_nanos(self.nanos_per_image.load(Ordering::Relaxed))
    }
}

/// Images waiting in a queue: added when a job is queued, taken off when a worker takes it.
#[derive(Debug, Default)]
pub struct QueuedImages(AtomicUsize);

impl QueuedImages {
    pub fn add(&self, images: usize) {
        self.0.fetch_add(images, Ordering::Relaxed);
    }

    pub fn take(&self, images: usize) {
        // Saturating: a miscount must never wrap around to a huge wait.
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(images)));
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// A request let in by admission but not queued yet (it is being read and decoded): it counts
/// as one image waiting, so that a burst of requests arriving together does not each see the
/// same short queue. Released when its job is queued, or when the request ends first.
#[derive(Debug)]
pub struct Admission {
    pending: Arc<QueuedImages>,
    released: AtomicBool,
}

impl Admission {
    pub fn new(pending: Arc<QueuedImages>) -> Self {
        pending.add(1);
        Admission { pending, released: AtomicBool::new(false) }
    }

    pub fn release(&self) {
        if !self.released.swap(true, Ordering::Relaxed) {
            self.pending.take(1);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.release();
    }
}

/// The one estimate of a new request's queue wait: `queued` images ahead of it, each taking
/// `per_image`, shared among `workers`.
pub fn expected_wait(queued: usize, per_image: Duration, workers: usize) -> Duration {
    per_image.mul_f64(queued as f64 / workers.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_grows_with_the_queue_and_shrinks_with_workers() {
        let per_image = Duration::from_millis(20);
        assert_eq!(expected_wait(0, per_image, 1), Duration::ZERO);
        assert_eq!(expected_wait(10, per_image, 1), Duration::from_millis(200));
        assert_eq!(expected_wait(10, per_image, 2), Duration::from_millis(100));
        assert_eq!(expected_wait(3, per_image, 0), Duration::from_millis(60));
    }

    #[test]
    fn the_service_time_follows_recent_batches() {
        let service = ServiceTime::new(Duration::from_millis(100));
        for _ in 0..30 {
            // Batches of 4 images in 40 ms: 10 ms an image.
            service.record(Duration::from_millis(40), 4);
        }
        let per_image = service.per_image().as_secs_f64() * 1000.0;
        assert!((per_image - 10.0).abs() < 0.1, "{per_image} ms");
        service.record(Duration::from_millis(500), 0);
        assert!((service.per_image().as_secs_f64() * 1000.0 - per_image).abs() < 1e-9, "an empty batch is no sample");
        // One slow batch moves it, but only part of the way.
        service.record(Duration::from_millis(50), 1);
        let after = service.per_image().as_secs_f64() * 1000.0;
        assert!(after > 15.0 && after < 30.0, "{after} ms");
    }

    #[test]
    fn an_admission_counts_until_released_once() {
        let pending = Arc::new(QueuedImages::default());
        let first = Admission::new(Arc::clone(&pending));
        let second = Admission::new(Arc::clone(&pending));
        assert_eq!(pending.get(), 2);
        first.release();
        first.release();
        assert_eq!(pending.get(), 1);
        drop(first);
        drop(second);
        assert_eq!(pending.get(), 0);
    }

    #[test]
    fn queued_images_never_go_below_zero() {
        let queued = QueuedImages::default();
        queued.add(3);
        queued.take(2);
        assert_eq!(queued.get(), 1);
        queued.take(5);
        assert_eq!(queued.get(), 0);
    }
}
