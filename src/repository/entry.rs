//! One version of one model and its status machine: `loading` → `ready` (with its runtime) or
//! `failed` (with the reason); `unloaded` when an admin or `--models` takes it out of service.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use serde::Serialize;

use crate::engine::{self, ModelRuntime};
use crate::model_config::ModelConfig;
use super::files::{version_fingerprint, Fingerprint};
use super::statistics::InferenceStatistics;

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModelStatus {
    Loading,
    Ready,
    Failed,
    /// In the repository but not serving: left out by `--models`, or unloaded by an admin.
    Unloaded,
    /// Not loaded now, and loaded by its first request (models on demand).
    OnDemand,
    /// Its package was built but not installed on this machine (an INT8 variant below its
    /// accuracy or speed gate, `make models`): listed with the reason, never served, and not
    /// holding readiness back.
    NotInstalled,
}

/// Where a version stands, and why when it does not serve.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusReport {
    pub status: ModelStatus,
    pub reason: Option<String>,
}

impl StatusReport {
    pub fn is_ready(&self) -> bool {
        self.status == ModelStatus::Ready
    }
}

#[derive(Clone)]
pub(super) enum ModelState {
    Loading,
    Ready(ModelRuntime),
    Failed(String),
    Unloaded,
    OnDemand,
    NotInstalled(String),
}

fn next_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// One version of one model and where it stands.
pub struct ModelEntry {
    pub name: String,
    pub version: String,
    /// Which reading of this version it is: every scan or reload makes new entries with new
    /// numbers, so results computed by an earlier one (the response cache) never pass for
    /// this one's.
    pub generation: u64,
    pub dir: PathBuf,
    /// `None` when the config itself could not be read; the reason is in the state.
    pub config: Option<Arc<ModelConfig>>,
    pub labels: Arc<Vec<String>>,
    pub file_size: Option<u64>,
    /// Its files as read with its config: a polled reload keeps this version, loaded as it is,
    /// when they are unchanged.
    pub(super) files: Fingerprint,
    state: RwLock<ModelState>,
    parameter_count: RwLock<Option<u64>>,
    /// Models on demand: when a request last used this version, and what loading it cost.
    pub(super) usage: Usage,
    /// What it has served (Triton's statistics extension).
    pub statistics: InferenceStatistics,
}

/// What loading on demand needs to know of a version.
#[derive(Default)]
pub(super) struct Usage {
    /// Milliseconds since the process started, at the last request; 0 never.
    pub last_used_ms: std::sync::atomic::AtomicU64,
    /// Bytes the last load cost (see `ModelRepository::ensure_loaded`); 0 unknown.
    pub memory_estimate: std::sync::atomic::AtomicU64,
    /// Held while this version loads on demand, so concurrent first requests wait for the
    /// one load instead of starting their own.
    pub loading: std::sync::Mutex<()>,
}

impl ModelEntry {
    pub(super) fn new(
        name: String,
        version: String,
        dir: PathBuf,
        config: Arc<ModelConfig>,
        labels: Vec<String>,
        file_size: Option<u64>,
        state: ModelState,
    ) -> Self {
        let files = version_fingerprint(&dir, &config);
        Self {
            name,
            version,
            generation: next_generation(),
            dir,
            config: Some(config),
            labels: Arc::new(labels),
            file_size,
            files,
            state: RwLock::new(state),
            parameter_count: RwLock::new(None),
            usage: Usage::default(),
            statistics: InferenceStatistics::default(),
        }
    }

    pub(super) fn failed(name: String, version: String, dir: PathBuf, reason: String) -> Self {
        Self {
            name,
            version,
            generation: next_generation(),
            dir,
            config: None,
            labels: Arc::new(Vec::new()),
            file_size: None,
            files: Fingerprint::new(),
            state: RwLock::new(ModelState::Failed(reason)),
            parameter_count: RwLock::new(None),
            usage: Usage::default(),
            statistics: InferenceStatistics::default(),
        }
    }

    pub fn status(&self) -> StatusReport {
        let (status, reason) = match &*self.state.read().unwrap() {
            ModelState::Loading => (ModelStatus::Loading, None),
            ModelState::Ready(_) => (ModelStatus::Ready, None),
            ModelState::Failed(reason) => (ModelStatus::Failed, Some(reason.clone())),
            ModelState::Unloaded => (ModelStatus::Unloaded, Some("not loaded".into())),
            ModelState::OnDemand => (ModelStatus::OnDemand, Some("not loaded now; its first request loads it".into())),
            ModelState::NotInstalled(reason) => (ModelStatus::NotInstalled, Some(reason.clone())),
        };
        StatusReport { status, reason }
    }

    /// The runtime when the model serves; otherwise why not.
    pub fn runtime(&self) -> Result<ModelRuntime, String> {
        match &*self.state.read().unwrap() {
            ModelState::Ready(runtime) => Ok(runtime.clone()),
            ModelState::Loading => Err("still loading".into()),
            ModelState::Failed(reason) | ModelState::NotInstalled(reason) => Err(reason.clone()),
            ModelState::Unloaded => Err("not loaded".into()),
            ModelState::OnDemand => Err("not loaded now; its first request loads it".into()),
        }
    }

    /// Whether the on-demand policy must keep this version loaded.
    pub fn is_pinned(&self) -> bool {
        self.config.as_ref().is_some_and(|c| c.runtime.pinned)
    }

    /// When a request last used this version, as milliseconds since the process started.
    pub fn last_used_ms(&self) -> Option<u64> {
        Some(self.usage.last_used_ms.load(std::sync::atomic::Ordering::Relaxed)).filter(|&ms| ms > 0)
    }

    /// What loading this version cost, in bytes, when it has been loaded (see
    /// `ModelRepository::ensure_loaded`).
    pub fn memory_estimate(&self) -> Option<u64> {
        Some(self.usage.memory_estimate.load(std::sync::atomic::Ordering::Relaxed)).filter(|&b| b > 0)
    }

    /// Records a request's use of this version.
    pub fn touch(&self) {
        let ms = super::process_start().elapsed().as_millis().max(1) as u64;
        self.usage.last_used_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counted from the loaded module; frozen modules have none left to count, so then the
    /// count the exporter recorded in the config.
    pub fn parameter_count(&self) -> Option<u64> {
        let counted = (*self.parameter_count.read().unwrap()).filter(|&n| n > 0);
        counted.or_else(|| self.config.as_ref().and_then(|c| c.provenance.parameter_count))
    }

    /// Executors of the pool this version may use at once (0 unless ready).
    pub fn workers(&self) -> usize {
        self.runtime().map(|r| r.workers()).unwrap_or(0)
    }

    /// Executors kept for this version whenever it has work (0 unless ready or scaled).
    pub fn reserved_executors(&self) -> usize {
        self.runtime().map(|r| r.reserved()).unwrap_or(0)
    }

    pub(super) fn set_state(&self, state: ModelState) {
        *self.state.write().unwrap() = state;
    }

    /// Loads the model file, warms it up and gives it a queue in the inference pool; records
    /// the outcome.
    pub(super) fn load(&self, priority: LoadPriority) -> Result<(), String> {
        let Some(config) = self.config.clone() else {
            return Err(self.status().reason.unwrap_or_default());
        };
        if let StatusReport { status: ModelStatus::Failed | ModelStatus::NotInstalled, reason: Some(reason) } = self.status() {
            // Broken at scan time (missing file, unreadable labels), or a package `make models`
            // would not install: loading cannot help.
            return Err(reason);
        }
        let started = Instant::now();
        let result = on_a_thread_of_its_own(priority, || {
            load_op_libraries(&self.dir, &config).and_then(|()| engine::load_model(&config, &self.dir.join(config.model_file())))
        });
        match result {
            Ok(loaded) => {
                *self.parameter_count.write().unwrap() = Some(loaded.parameter_count);
                let runtime = engine::serve(&self.name, Arc::new(loaded), Arc::clone(&config), config.runtime.workers);
                let workers = runtime.workers();
                self.set_state(ModelState::Ready(runtime));
                tracing::info!(
                    model = %self.name,
                    version = %self.version,
                    workers,
                    seconds = started.elapsed().as_secs_f32(),
                    "model ready"
                );
                Ok(())
            }
            Err(reason) => {
                tracing::error!(model = %self.name, version = %self.version, %reason, "model failed to load");
                self.set_state(ModelState::Failed(reason.clone()));
                Err(reason)
            }
        }
    }
}

/// How a load shares the CPU with the traffic being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadPriority {
    Normal,
    /// Only CPU time the inference threads leave idle (Linux `SCHED_IDLE`): repository polling,
    /// which loads beside traffic nobody paused. On a saturated server such a load waits for
    /// idle time, however long; its timings are the loading thread's CPU time, so being
    /// preempted does not make the model look slow (`engine::load_model`).
    Background,
}

/// Reads and warms a model on a thread that ends with the load. libtorch's OpenMP runtime
/// keeps a thread team for every thread that has run a parallel region, and once the process
/// holds more such threads than cores it stops spinning at barriers, which made every
/// forward of a 2-core server 2.5 x slower after one load from a long-lived thread (the
/// polling thread; the management API's blocking threads live on too). A thread of its own
/// also keeps a lowered priority to this load: without CAP_SYS_NICE it cannot be raised back.
fn on_a_thread_of_its_own<T: Send>(priority: LoadPriority, load: impl FnOnce() -> Result<T, String> + Send) -> Result<T, String> {
    std::thread::scope(|scope| {
        let loader = std::thread::Builder::new()
            .name("model-load".into())
            .spawn_scoped(scope, move || {
                if priority == LoadPriority::Background {
                    run_at_idle_priority();
                }
                load()
            })
            .map_err(|e| format!("could not start a thread to load it: {e}"))?;
        loader.join().unwrap_or_else(|_| Err("the load panicked".into()))
    })
}

fn run_at_idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler only reads the parameter it is given; pid 0 is this thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "SCHED_IDLE refused; this load runs at the normal priority");
    }
}

/// The custom-operator libraries a version's config names, loaded before its model.
fn load_op_libraries(dir: &Path, config: &ModelConfig) -> Result<(), String> {
    for lib in &config.runtime.op_libraries {
        let path = if lib.is_absolute() { lib.clone() } else { dir.join(lib) };
        engine::ops::load_op_library(&path)?;
    }
    Ok(())
}
