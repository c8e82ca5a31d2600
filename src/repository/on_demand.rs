//! Models loaded on demand, within a budget (`--max-loaded-models`, `--memory-budget-mb`).
//!
//! With a budget set, only pinned versions (`runtime.pinned = true`) load at start; every other
//! version of the repository waits as `on_demand` and loads on its first request. Before a load
//! the least recently used unpinned versions are unloaded until the new one fits. Loads run one
//! at a time (the repository's admin lock); concurrent first requests of one version wait for
//! its one load. An unloaded version's memory goes once its in-flight requests finish (they
//! hold the runtime), and freed heap is handed back to the system (`malloc_trim`).
//!
//! What a version costs is an estimate, not resident memory: allocators keep freed memory and
//! AOTInductor packages map shared libraries, so resident memory moves for reasons of its own.
//! The estimate is the growth of the process's peak resident memory over the load and warm-up
//! (the peak is reset just before, `/proc/self/clear_refs`), at least the model file's size;
//! before its first load, a version is counted at twice its file's size.
//!
//! Versions an admin unloaded, or that `--models` left out, are `unloaded`, not `on_demand`:
//! they are never loaded by a request.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::entry::{LoadPriority, ModelState};
use super::{ModelEntry, ModelRepository, ModelStatus};

/// The budget; a field left `None` does not limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OnDemandPolicy {
    pub max_loaded_models: Option<usize>,
    pub memory_budget_bytes: Option<u64>,
}

impl OnDemandPolicy {
    pub fn is_active(&self) -> bool {
        self.max_loaded_models.is_some() || self.memory_budget_bytes.is_some()
    }
}

/// The instant the process (the repository) started: `last_used` is counted from it.
pub(super) fn process_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Resident and peak resident memory of this process, in bytes (`/proc/self/status`).
fn memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |field: &str| {
        text.lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}

/// Starts a new peak: the kernel resets VmHWM to the current resident size.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Hands freed heap back to the system after an unload.
fn trim_heap() {
    // SAFETY: malloc_trim only walks glibc's own arenas; it takes no pointers of ours.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Loads a version (see `ModelEntry::load`) and records what it cost: the growth of the peak
/// resident memory over the load and warm-up, at least the model file's size.
pub(super) fn load_measured(entry: &ModelEntry, priority: LoadPriority) -> Result<Duration, String> {
    reset_peak();
    let (before, _) = memory();
    let started = Instant::now();
    entry.load(priority)?;
    let (_, peak) = memory();
    let estimate = peak.saturating_sub(before).max(entry.file_size.unwrap_or(0));
    entry.usage.memory_estimate.store(estimate, Ordering::Relaxed);
    Ok(started.elapsed())
}

/// What a version is counted at in the budget.
fn cost(entry: &ModelEntry) -> u64 {
    entry.memory_estimate().unwrap_or_else(|| entry.file_size.unwrap_or(0) * 2)
}

impl ModelRepository {
    /// Sets the budget; call before [`ModelRepository::load_all`].
    pub fn set_on_demand(&mut self, policy: OnDemandPolicy) {
        self.on_demand = policy;
    }

    pub fn on_demand(&self) -> OnDemandPolicy {
        self.on_demand
    }

    /// Makes sure the version serves, loading it if it waits on demand. Returns how long the
    /// load took when this call (or the one it waited for) loaded it. Blocking: call it off
    /// the async reactor.
    pub fn ensure_loaded(&self, entry: &Arc<ModelEntry>) -> Result<Option<Duration>, String> {
        if !matches!(entry.status().status, ModelStatus::OnDemand | ModelStatus::Loading) {
            return Ok(None);
        }
        let waited = Instant::now();
        // One load per version: later callers wait here, then find it ready.
        let _loading = entry.usage.loading.lock().unwrap();
        match entry.status().status {
            ModelStatus::Ready => return Ok(Some(waited.elapsed())),
            ModelStatus::OnDemand => {}
            // Loading at start (not on demand), failed, unloaded: the caller reports it.
            _ => return Ok(None),
        }
        let _admin = self.admin.lock().unwrap();
        self.make_room_for(entry);
        entry.set_state(ModelState::Loading);
        let took = load_measured(entry, LoadPriority::Normal)?;
        let estimate = entry.memory_estimate().unwrap_or(0);
        tracing::info!(model = %entry.name, version = %entry.version, seconds = took.as_secs_f32(), estimate_bytes = estimate, "model loaded on demand");
        metrics::histogram!(crate::metrics::MODEL_LOAD_SECONDS, "model" => entry.name.clone()).record(took.as_secs_f64());
        Ok(Some(waited.elapsed()))
    }

    /// Unloads the least recently used unpinned versions until `incoming` fits the budget.
    /// Called with the admin lock held.
    fn make_room_for(&self, incoming: &Arc<ModelEntry>) {
        let policy = self.on_demand;
        loop {
            let loaded: Vec<Arc<ModelEntry>> = self
                .entries()
                .into_iter()
                .filter(|e| !Arc::ptr_eq(e, incoming) && matches!(e.status().status, ModelStatus::Ready | ModelStatus::Loading))
                .collect();
            let count_over = policy.max_loaded_models.is_some_and(|max| loaded.len() + 1 > max);
            let bytes: u64 = loaded.iter().map(|e| cost(e)).sum::<u64>() + cost(incoming);
            let bytes_over = policy.memory_budget_bytes.is_some_and(|budget| bytes > budget);
            if !count_over && !bytes_over {
                return;
            }
            let victim = loaded
                .iter()
                .filter(|e| !e.is_pinned() && e.status().status == ModelStatus::Ready)
                .min_by_key(|e| e.last_used_ms().unwrap_or(0));
            let Some(victim) = victim else {
                tracing::warn!(model = %incoming.name, "over the on-demand budget with only pinned models loaded; loading anyway");
                return;
            };
            tracing::info!(model = %victim.name, version = %victim.version, for_model = %incoming.name, "unloading the least recently used model to make room");
            victim.set_state(ModelState::OnDemand);
            metrics::counter!(crate::metrics::MODEL_EVICTIONS, "model" => victim.name.clone()).increment(1);
            trim_heap();
        }
    }
}
