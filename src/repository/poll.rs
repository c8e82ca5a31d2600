//! Repository polling (`--repository-poll-secs`): the repository folder is read again at that
//! interval and what changed is done the way the management API does it — a new model folder
//! is loaded, a changed one (a new version folder, a replaced model file or config) is loaded
//! again whole, beside the old, warmed and swapped in at once (`ModelRepository::load`), and a
//! removed one is unloaded, its requests finishing first. Polling and management calls take
//! the same lock, so they never interleave.
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
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::scan::{model_folders, read_family};
use super::ModelRepository;

#[derive(Debug, Clone, Copy)]
pub struct PollSettings {
    pub interval: Duration,
    pub settle: Duration,
}

/// Every file under a model folder (versions included), as path, size and modification time.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn fingerprint(dir: &Path) -> Fingerprint {
    let mut files = Vec::new();
    walk(dir, 0, &mut files);
    files.sort();
    files
}

/// Model folders are two levels deep at most (model/version/file); a little more is read in
/// case a model keeps files in a sub-folder.
fn walk(dir: &Path, depth: usize, files: &mut Fingerprint) {
    let Ok(read) = std::fs::read_dir(dir) else { return };
    for entry in read.flatten() {
        let path = entry.path();
        // Through symlinks: `make models` links model files into a cache.
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => {
                if depth < 3 {
                    walk(&path, depth + 1, files);
                }
            }
            Ok(meta) => files.push((path, meta.len(), meta.modified().ok())),
            // A dangling link (its target not there yet) counts as a file with no size.
            Err(_) => files.push((path, 0, None)),
        }
    }
}

/// What a folder held when it was last acted on.
struct Acted {
    model: String,
    fingerprint: Fingerprint,
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
        for (folder, dir) in poller.folders(repository) {
            let model = read_family(&dir).name;
            poller.acted.insert(folder, Acted { model, fingerprint: fingerprint(&dir) });
        }
        poller
    }

    fn folders(&self, repository: &ModelRepository) -> Vec<(String, PathBuf)> {
        let dirs = match model_folders(&repository.root) {
            Ok(dirs) => dirs,
            Err(e) => {
                tracing::warn!(repository = %repository.root.display(), error = %e, "repository unreadable; polling again later");
                return Vec::new();
            }
        };
        dirs.into_iter()
            .filter(|dir| !dir.join(crate::pipeline::PIPELINE_FILE).is_file())
            .filter_map(|dir| Some((dir.file_name()?.to_str()?.to_string(), dir)))
            .filter(|(folder, _)| self.only.is_empty() || self.only.contains(folder))
            .collect()
    }

    fn poll(&mut self, repository: &ModelRepository, now: Instant) {
        let folders = self.folders(repository);
        let present: Vec<&String> = folders.iter().map(|(folder, _)| folder).collect();
        let removed: Vec<String> = self.acted.keys().filter(|folder| !present.contains(folder)).cloned().collect();
        for folder in removed {
            let Some(acted) = self.acted.remove(&folder) else { continue };
            self.settling.remove(&folder);
            match repository.unload(&acted.model, None) {
                Ok(()) => {
                    metrics::counter!(crate::metrics::REPOSITORY_POLL_LOADS, "model" => acted.model.clone(), "outcome" => "unloaded").increment(1);
                    tracing::info!(model = %acted.model, folder, "model folder removed; unloaded once its requests finish");
                }
                Err(e) => tracing::warn!(model = %acted.model, error = %e, "model folder removed; nothing to unload"),
            }
        }
        for (folder, dir) in folders {
            let now_on_disk = fingerprint(&dir);
            if self.acted.get(&folder).is_some_and(|a| a.fingerprint == now_on_disk) {
                self.settling.remove(&folder);
                continue;
            }
            let settling = self.settling.entry(folder.clone()).or_insert_with(|| Settling { fingerprint: now_on_disk.clone(), since: now });
            if settling.fingerprint != now_on_disk {
                *settling = Settling { fingerprint: now_on_disk, since: now };
                continue;
            }
            if now.duration_since(settling.since) < self.settings.settle {
                continue;
            }
            let fingerprint = self.settling.remove(&folder).map(|s| s.fingerprint).unwrap_or_default();
            let model = read_family(&dir).name;
            let is_new = !self.acted.contains_key(&folder);
            self.load(repository, &model, is_new);
            self.acted.insert(folder, Acted { model, fingerprint });
        }
    }

    fn load(&self, repository: &ModelRepository, model: &str, is_new: bool) {
        let started = Instant::now();
        tracing::info!(model, new = is_new, "model folder changed and settled; loading it beside what serves");
        match repository.load(model) {
            Ok(versions) => {
                metrics::counter!(crate::metrics::REPOSITORY_POLL_LOADS, "model" => model.to_string(), "outcome" => "loaded").increment(1);
                metrics::gauge!(crate::metrics::REPOSITORY_POLL_FAILING, "model" => model.to_string()).set(0.0);
                tracing::info!(model, ?versions, seconds = started.elapsed().as_secs_f32(), "polled change loaded and swapped in");
            }
            Err(reason) => {
                metrics::counter!(crate::metrics::REPOSITORY_POLL_LOADS, "model" => model.to_string(), "outcome" => "failed").increment(1);
                metrics::gauge!(crate::metrics::REPOSITORY_POLL_FAILING, "model" => model.to_string()).set(1.0);
                let serving = if is_new { "nothing was serving it" } else { "the previous load keeps serving" };
                tracing::error!(model, %reason, "polled change failed to load; {serving}; retried when its files change again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_sees_new_grown_and_removed_files() {
        let dir = tempfile::tempdir().unwrap();
        let version = dir.path().join("1");
        std::fs::create_dir(&version).unwrap();
        std::fs::write(version.join("config.toml"), "a").unwrap();
        let first = fingerprint(dir.path());
        assert_eq!(first.len(), 1);
        assert_eq!(fingerprint(dir.path()), first, "nothing changed");
        std::fs::write(version.join("model.pt"), "x").unwrap();
        let second = fingerprint(dir.path());
        assert_ne!(second, first);
        std::fs::write(version.join("model.pt"), "xy").unwrap();
        assert_ne!(fingerprint(dir.path()), second, "a file growing is a change");
        std::fs::remove_file(version.join("model.pt")).unwrap();
        assert_eq!(fingerprint(dir.path()).len(), 1);
        std::os::unix::fs::symlink(dir.path().join("not-yet"), version.join("link")).unwrap();
        assert!(fingerprint(dir.path()).iter().any(|(p, size, time)| p.ends_with("link") && *size == 0 && time.is_none()));
    }
}
