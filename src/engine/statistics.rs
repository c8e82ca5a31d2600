//! What the forwards of one loaded version cost, per batch size: Triton's `batch_stats`
//! (`/v2/models/{m}/stats`, gRPC `ModelStatistics`). Each forward of N images is one execution
//! of batch size N, split into the three stages Triton names: laying the images out as the
//! model's input (`compute_input`), the forward itself (`compute_infer`) and turning its output
//! into plain Rust data (`compute_output`). The request-level counters, built on the same
//! [`DurationCounter`], are the repository's (`repository::InferenceStatistics`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A count of events and their cumulative duration.
#[derive(Debug, Default)]
pub struct DurationCounter {
    count: AtomicU64,
    nanos: AtomicU64,
}

impl DurationCounter {
    pub fn record(&self, duration: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.nanos.fetch_add(duration.as_nanos().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    pub fn read(&self) -> DurationTotal {
        DurationTotal { count: self.count.load(Ordering::Relaxed), ns: self.nanos.load(Ordering::Relaxed) }
    }
}

/// [`DurationCounter`] read at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DurationTotal {
    pub count: u64,
    pub ns: u64,
}

/// One forward's stage times (summed over its groups when a batch of mixed input sizes ran as
/// several forwards).
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardTimes {
    pub input: Duration,
    pub infer: Duration,
    pub output: Duration,
}

#[derive(Debug, Default)]
struct BatchSizeCounters {
    compute_input: DurationCounter,
    compute_infer: DurationCounter,
    compute_output: DurationCounter,
}

/// Counters for every batch size from 1 to the model's bound, fixed at load: recording is
/// three atomic adds, no lock on the executor's path.
#[derive(Debug)]
pub struct BatchStatistics {
    by_size: Vec<BatchSizeCounters>,
}

/// One batch size's totals, as the statistics extension lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRow {
    pub batch_size: u64,
    pub compute_input: DurationTotal,
    pub compute_infer: DurationTotal,
    pub compute_output: DurationTotal,
}

impl BatchStatistics {
    pub fn new(max_batch_size: usize) -> Self {
        BatchStatistics { by_size: (0..max_batch_size.max(1)).map(|_| BatchSizeCounters::default()).collect() }
    }

    /// A forward of `batch_size` images that answered. Sizes past the bound (none run there)
    /// are not counted rather than counted under another size.
    pub fn record(&self, batch_size: usize, times: ForwardTimes) {
        let Some(counters) = batch_size.checked_sub(1).and_then(|i| self.by_size.get(i)) else { return };
        counters.compute_input.record(times.input);
        counters.compute_infer.record(times.infer);
        counters.compute_output.record(times.output);
    }

    /// The batch sizes that have run, smallest first (Triton lists only those).
    pub fn rows(&self) -> Vec<BatchRow> {
        self.by_size
            .iter()
            .enumerate()
            .map(|(i, c)| BatchRow {
                batch_size: i as u64 + 1,
                compute_input: c.compute_input.read(),
                compute_infer: c.compute_infer.read(),
                compute_output: c.compute_output.read(),
            })
            .filter(|row| row.compute_infer.count > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_forward_counts_under_its_batch_size_and_only_sizes_that_ran_are_listed() {
        let stats = BatchStatistics::new(4);
        let ms = Duration::from_millis;
        stats.record(1, ForwardTimes { input: ms(1), infer: ms(5), output: ms(2) });
        stats.record(4, ForwardTimes { input: ms(2), infer: ms(9), output: ms(3) });
        stats.record(4, ForwardTimes { input: ms(2), infer: ms(11), output: ms(3) });
        stats.record(0, ForwardTimes::default());
        stats.record(5, ForwardTimes::default());
        let rows = stats.rows();
        assert_eq!(rows.iter().map(|r| r.batch_size).collect::<Vec<_>>(), vec![1, 4]);
        assert_eq!(rows[1].compute_infer, DurationTotal { count: 2, ns: 20_000_000 });
        assert_eq!(rows[1].compute_input, DurationTotal { count: 2, ns: 4_000_000 });
        assert_eq!(rows[0].compute_output, DurationTotal { count: 1, ns: 2_000_000 });
    }
}
