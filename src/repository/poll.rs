//! Repository polling (`--repository-poll-secs`): the repository folder is read again at that
//! interval and what changed is done the way the management API does it — a new model folder
//! is loaded; in a changed one (a new version folder, a replaced model file or config) the
//! versions whose files changed are loaded beside the old, warmed, and the model swapped in at
//! once (`ModelRepository::load` with `Reload::Changed`: versions unchanged keep serving as
//! they are, warm); a removed one is unloaded, its requests finishing first. A pipeline folder's
//! `pipeline.toml` is read again when it changes, and a broken one leaves the old steps
//! serving. Polled loads run at idle CPU priority (`LoadPriority::Background`), so they take
//! only what serving leaves. Polling and management calls take the same lock, so they never
//! interleave.
//!
//! **A folder is taken only once it has settled**: every file in it (names, sizes and
//! modification times, read through symlinks) unchanged for the settle interval
//! (`--repository-poll-settle-secs`). A model copied in file by file, with pauses shorter than
//! that, is therefore never loaded half-way; no marker file is needed. A load that fails keeps
//! the old model serving, is logged with its reason and counted
//! (`visionserve_repository_poll_loads_total{outcome="failed"}`, and
//! `visionserve_repository_poll_failing{model}` stays 1 until a later change loads); it is
//! retried when the folder changes again, not at every poll.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::files::{fingerprint, Fingerprint};
use super::scan::{model_folders, read_family};
use super::{LoadPriority, ModelRepository, Reload};

#[derive(Debug, Clone, Copy)]
pub struct PollSettings {
    pub interval: Duration,
    pub settle: Duration,
}

/// What a folder held when it was last acted on.
struct Acted {
    /// The model's (or pipeline's) name.
    model: String,
    kind: Kind,
    fingerprint: Fingerprint,
}

/// What a folder holds: a model (a `config.toml`, or version folders) or a pipeline (a
/// `pipeline.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Model,
    Pipeline,
}

/// A folder under the repository, what it holds, and the name it serves under.
struct Folder {
    folder: String,
    dir: PathBuf,
    kind: Kind,
}

impl Folder {
    fn served_name(&self) -> String {
        match self.kind {
            Kind::Model => read_family(&self.dir).name,
            Kind::Pipeline => self.folder.clone(),
        }
    }
}

/// A folder whose files differ from what was acted on, and since when they have not changed.
struct Settling {
    fingerprint: Fingerprint,
    since: Instant,
}

/// Starts the polling thread. `only` (`--models`) limits it to those folders, as at start.
pub fn spawn(repository: Arc<ModelRepository>, settings: PollSettings, only: Vec<String>) -> std::io::Result<()> {
    let mut poller = Poller::new(&repository, settings, only);
    std::thread::Builder::new().name("repository-poll".into()).spawn(move || loop {
        std::thread::sleep(settings.interval);
        poller.poll(&repository, Instant::now());
    })?;
    tracing::info!(interval_secs = settings.interval.as_secs_f32(), settle_secs = settings.settle.as_secs_f32(), "polling the repository for changes");
    Ok(())
}

struct Poller {
    settings: PollSettings,
    only: Vec<String>,
    acted: BTreeMap<String, Acted>,
    settling: BTreeMap<String, Settling>,
}

impl Poller {
    /// What is on disk now is what the start loaded.
    fn new(repository: &ModelRepository, settings: PollSettings, only: Vec<String>) -> Self {
        let mut poller = Poller { settings, only, acted: BTreeMap::new(), settling: BTreeMap::new() };
        for folder in poller.folders(repository) {
            let acted = Acted { model: folder.served_name(), kind: folder.kind, fingerprint: fingerprint(&folder.dir) };
            poller.acted.insert(folder.folder, acted);
        }
        poller
    }

    fn folders(&self, repository: &ModelRepository) -> Vec<Folder> {
        let dirs = match model_folders(&repository.root) {
            Ok(dirs) => dirs,
            Err(e) => {
                tracing::warn!(repository = %repository.root.display(), error = %e, "repository unreadable; polling again later");
                return Vec::new();
            }
        };
        let pipelines = std::fs::read_dir(&repository.root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|dir| dir.join(crate::pipeline::PIPELINE_FILE).is_file());
        let models = dirs.into_iter().filter(|dir| !dir.join(crate::pipeline::PIPELINE_FILE).is_file());
        models
            .map(|dir| (dir, Kind::Model))
            .chain(pipelines.map(|dir| (dir, Kind::Pipeline)))
            .filter_map(|(dir, kind)| Some(Folder { folder: dir.file_name()?.to_str()?.to_string(), dir, kind }))
            .filter(|f| self.only.is_empty() || self.only.contains(&f.folder))
            .collect()
    }

    fn poll(&mut self, repository: &ModelRepository, now: Instant) {
        let folders = self.folders(repository);
        let present: Vec<&String> = folders.iter().map(|f| &f.folder).collect();
        let removed: Vec<String> = self.acted.keys().filter(|folder| !present.contains(folder)).cloned().collect();
        for folder in removed {
            let Some(acted) = self.acted.remove(&folder) else { continue };
            self.settling.remove(&folder);
            Self::remove(repository, &acted, &folder);
        }
        for folder in folders {
            let now_on_disk = fingerprint(&folder.dir);
            let key = folder.folder.clone();
            if self.acted.get(&key).is_some_and(|a| a.fingerprint == now_on_disk) {
                self.settling.remove(&key);
                continue;
            }
            let settling = self.settling.entry(key.clone()).or_insert_with(|| Settling { fingerprint: now_on_disk.clone(), since: now });
            if settling.fingerprint != now_on_disk {
                *settling = Settling { fingerprint: now_on_disk, since: now };
                continue;
            }
            if now.duration_since(settling.since) < self.settings.settle {
                continue;
            }
            let fingerprint = self.settling.remove(&key).map(|s| s.fingerprint).unwrap_or_default();
            let model = folder.served_name();
            let is_new = !self.acted.contains_key(&key);
            match folder.kind {
                Kind::Model => self.load(repository, &model, is_new),
                Kind::Pipeline => Self::reload_pipeline(repository, &model, &folder.dir, is_new),
            }
            self.acted.insert(key, Acted { model, kind: folder.kind, fingerprint });
        }
    }

    fn remove(repository: &ModelRepository, acted: &Acted, folder: &str) {
        let removed = match acted.kind {
            Kind::Model => repository.unload(&acted.model, None).map_err(|e| e.to_string()),
            Kind::Pipeline => repository.remove_pipeline(&acted.model).then_some(()).ok_or_else(|| "no such pipeline".to_string()),
        };
        match removed {
            Ok(()) => {
                metrics::counter!(crate::metrics::REPOSITORY_POLL_LOADS, "model" => acted.model.clone(), "outcome" => "unloaded").increment(1);
                tracing::info!(model = %acted.model, folder, kind = ?acted.kind, "folder removed; unloaded once its requests finish");
            }
            Err(e) => tracing::warn!(model = %acted.model, error = %e, "folder removed; nothing to unload"),
        }
    }

    /// A pipeline is its file: read again and swapped in, nothing to warm.
    fn reload_pipeline(repository: &ModelRepository, name: &str, dir: &std::path::Path, is_new: bool) {
        tracing::info!(pipeline = name, new = is_new, "pipeline folder changed and settled; reading it again");
        let outcome = repository.reload_pipeline(name, dir);
        Self::count(name, &outcome);
        match outcome {
            Ok(()) => tracing::info!(pipeline = name, "polled pipeline change swapped in"),
            Err(reason) => tracing::error!(pipeline = name, %reason, "polled pipeline change is broken; what served before goes on serving"),
        }
    }

    /// The outcome in the polling metrics.
    fn count<T>(name: &str, outcome: &Result<T, String>) {
        let (label, failing) = if outcome.is_ok() { ("loaded", 0.0) } else { ("failed", 1.0) };
        metrics::counter!(crate::metrics::REPOSITORY_POLL_LOADS, "model" => name.to_string(), "outcome" => label).increment(1);
        metrics::gauge!(crate::metrics::REPOSITORY_POLL_FAILING, "model" => name.to_string()).set(failing);
    }

    fn load(&self, repository: &ModelRepository, model: &str, is_new: bool) {
        let started = Instant::now();
        tracing::info!(model, new = is_new, "model folder changed and settled; loading what changed beside what serves");
        let outcome = repository.load(model, Reload::Changed, LoadPriority::Background);
        Self::count(model, &outcome);
        match outcome {
            Ok(versions) => tracing::info!(model, ?versions, seconds = started.elapsed().as_secs_f32(), "polled change loaded and swapped in"),
            Err(reason) => {
                let serving = if is_new { "nothing was serving it" } else { "the previous load keeps serving" };
                tracing::error!(model, %reason, "polled change failed to load; {serving}; retried when its files change again");
            }
        }
    }
}
