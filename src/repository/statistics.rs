//! What one version has served, in the terms of Triton's statistics extension
//! (`/v2/models/{m}/stats`, gRPC `ModelStatistics`): per request, the successes and failures
//! with their whole duration, and the time spent queued, preparing the input (decode and
//! preprocess), in the forward pass and finishing the output; cache hits and misses; the
//! images inferred and when the last one was. The serving core records them
//! (`serve::infer::answer`); counters only ever grow, as Triton's do, for the life of the
//! version's entry (a reload starts new ones).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use crate::engine::{DurationCounter, DurationTotal};

#[derive(Debug, Default)]
pub struct InferenceStatistics {
    pub success: DurationCounter,
    pub fail: DurationCounter,
    pub queue: DurationCounter,
    pub compute_input: DurationCounter,
    pub compute_infer: DurationCounter,
    pub compute_output: DurationCounter,
    pub cache_hit: DurationCounter,
    pub cache_miss: DurationCounter,
    /// Images inferred (a request of 4 images counts 4; cache hits count none).
    inference_count: AtomicU64,
    /// Milliseconds since the Unix epoch at the last answered request; 0 never.
    last_inference_ms: AtomicU64,
}

/// One request's stage times, as the core measured them.
#[derive(Debug, Clone, Copy)]
pub struct ServedRequest {
    pub images: usize,
    pub total: Duration,
    pub queue: Duration,
    pub compute_input: Duration,
    pub compute_infer: Duration,
    pub compute_output: Duration,
}

impl InferenceStatistics {
    /// A request answered by running the model.
    pub fn served(&self, request: ServedRequest) {
        self.success.record(request.total);
        self.queue.record(request.queue);
        self.compute_input.record(request.compute_input);
        self.compute_infer.record(request.compute_infer);
        self.compute_output.record(request.compute_output);
        self.inference_count.fetch_add(request.images as u64, Ordering::Relaxed);
        self.touch();
    }

    /// A request answered whole from the response cache, `lookup` being the time that took.
    pub fn cache_hit(&self, lookup: Duration) {
        self.cache_hit.record(lookup);
        self.success.record(lookup);
        self.touch();
    }

    pub fn failed(&self, total: Duration) {
        self.fail.record(total);
    }

    pub fn inference_count(&self) -> u64 {
        self.inference_count.load(Ordering::Relaxed)
    }

    pub fn last_inference_ms(&self) -> u64 {
        self.last_inference_ms.load(Ordering::Relaxed)
    }

    fn touch(&self) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.last_inference_ms.fetch_max(now, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_add_up_per_stage_and_hits_count_as_successes_without_inferences() {
        let stats = InferenceStatistics::default();
        let ms = Duration::from_millis;
        stats.served(ServedRequest { images: 4, total: ms(10), queue: ms(1), compute_input: ms(2), compute_infer: ms(5), compute_output: ms(1) });
        stats.served(ServedRequest { images: 1, total: ms(20), queue: ms(3), compute_input: ms(2), compute_infer: ms(5), compute_output: ms(1) });
        stats.cache_hit(ms(1));
        stats.failed(ms(7));
        assert_eq!(stats.success.read(), DurationTotal { count: 3, ns: 31_000_000 });
        assert_eq!(stats.queue.read(), DurationTotal { count: 2, ns: 4_000_000 });
        assert_eq!(stats.compute_infer.read(), DurationTotal { count: 2, ns: 10_000_000 });
        assert_eq!(stats.cache_hit.read().count, 1);
        assert_eq!(stats.fail.read(), DurationTotal { count: 1, ns: 7_000_000 });
        assert_eq!(stats.inference_count(), 5);
        assert!(stats.last_inference_ms() > 1_700_000_000_000);
    }
}
