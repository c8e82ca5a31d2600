//! The model repository: one folder per model, each with a `config.toml`, a model file and
//! optional labels — or, for a model with several versions, numbered sub-folders
//! (`models/<name>/<version>/config.toml`). `scan` reads the folders, `entry` holds each
//! version's status, and this module is the lifecycle: load, reload, scale, unload, and the
//! one readiness rule every protocol's health route answers with.
//!
//! The map of models is swapped, never edited in place: a handler takes an `Arc<ModelEntry>`
//! at the start of a request and keeps config, labels and workers of that one version until it
//! answers, while the management API loads, reloads, scales or unloads behind it.

mod entry;
mod files;
mod on_demand;
mod pipelines;
pub mod poll;
mod scan;
mod statistics;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;

pub use entry::{LoadPriority, ModelEntry, ModelStatus, StatusReport};
pub use on_demand::OnDemandPolicy;
use on_demand::process_start;
pub use statistics::{DurationTotal, InferenceStatistics, ServedRequest};
pub use pipelines::{PipelineEntry, PipelineSteps, StepError};
use entry::ModelState;
use scan::{family_of, is_safe_name, model_folders, read_family};
use crate::pipeline::PIPELINE_VERSION;

/// The version a folder without numbered sub-folders has.
pub const FLAT_VERSION: &str = "1";

/// Every version of one model, and the one a request gets when it names none.
#[derive(Clone)]
pub struct ModelFamily {
    pub name: String,
    pub versions: BTreeMap<VersionKey, Arc<ModelEntry>>,
    pub default_version: String,
    /// Whether `default_version` was chosen through the management API (kept across reloads)
    /// rather than being the newest installed version (which a reload recomputes).
    pub default_chosen: bool,
}

/// Versions order numerically ("10" after "9"), whatever their text.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct VersionKey(u64, String);

impl VersionKey {
    pub fn new(version: &str) -> Self {
        VersionKey(version.parse().unwrap_or(u64::MAX), version.to_string())
    }
}

impl ModelFamily {
    pub fn default_entry(&self) -> &Arc<ModelEntry> {
        self.versions
            .get(&VersionKey::new(&self.default_version))
            .or_else(|| self.versions.values().next_back())
            .expect("a family has at least one version")
    }

    pub fn version(&self, version: &str) -> Option<&Arc<ModelEntry>> {
        // TorchServe clients name versions "1.0"; a folder is named "1".
        let plain = version.strip_suffix(".0").unwrap_or(version);
        self.versions.get(&VersionKey::new(version)).or_else(|| self.versions.get(&VersionKey::new(plain)))
    }

    pub fn version_names(&self) -> Vec<String> {
        self.versions.values().map(|e| e.version.clone()).collect()
    }
}

/// What a load does with the versions of a model that serve already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// Every version is loaded again: the management API's load, which an admin calls to start
    /// afresh (a file may have changed in a way its size and time do not show).
    Everything,
    /// A version that serves and whose files (sizes and times, see `files`) are what they were
    /// keeps serving as it is, warm, with its statistics and cached answers; only new and
    /// changed versions load. Repository polling: adding a version costs that version's load.
    Changed,
}

/// Why a lookup found nothing.
#[derive(Debug)]
pub enum LookupError {
    NoModel(String),
    NoVersion { name: String, version: String, known: Vec<String> },
    /// A pipeline has one version.
    NoPipelineVersion { name: String, version: String },
}

impl std::fmt::Display for LookupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LookupError::NoModel(name) => write!(f, "model '{name}' is not in the repository"),
            LookupError::NoVersion { name, version, known } => {
                write!(f, "model '{name}' has no version '{version}' (it has {})", known.join(", "))
            }
            LookupError::NoPipelineVersion { name, version } => {
                write!(f, "pipeline '{name}' has no version '{version}' (it has {PIPELINE_VERSION})")
            }
        }
    }
}

/// What a request's name and version address.
#[derive(Clone)]
pub enum Servable {
    Model(Arc<ModelEntry>),
    Pipeline(Arc<PipelineEntry>),
}

/// All models found in the repository folder, by name.
pub struct ModelRepository {
    pub root: PathBuf,
    families: RwLock<BTreeMap<String, Arc<ModelFamily>>>,
    /// Folders with a `pipeline.toml`: chains of the models above, read at start and again by
    /// repository polling when the file changes.
    pipelines: RwLock<BTreeMap<String, Arc<PipelineEntry>>>,
    /// One management operation at a time: loads are slow and must not interleave.
    admin: Mutex<()>,
    /// Models on demand: off unless a budget is set.
    on_demand: OnDemandPolicy,
    /// Why the last load of a model (management call or repository polling) failed, until one
    /// succeeds; what served before goes on serving meanwhile.
    load_failures: Mutex<BTreeMap<String, String>>,
    /// Set on SIGTERM: readiness turns false at once so load balancers stop routing here,
    /// while the listeners go on serving for the shutdown delay.
    draining: std::sync::atomic::AtomicBool,
}

impl ModelRepository {
    /// Reads every model folder under `root`. Models not named in `only` (when given) are
    /// listed but left unloaded. Reading is cheap; loading happens in
    /// [`ModelRepository::load_all`].
    pub fn scan(root: &Path, only: &[String]) -> std::io::Result<Self> {
        let pipelines = pipelines::scan(root, only)?;
        // A pipeline named in --models brings its steps along.
        let mut only = only.to_vec();
        if !only.is_empty() {
            only.retain(|name| !pipelines.contains_key(name));
            only.extend(pipelines.values().filter_map(|p| p.spec.as_ref().ok()).flat_map(|s| [s.detect.model.clone(), s.classify.model.clone()]));
        }
        let only = only.as_slice();
        let mut families = BTreeMap::new();
        for dir in model_folders(root)? {
            let family = read_family(&dir);
            if !only.is_empty() && !only.contains(&family.name) {
                for entry in family.versions.values() {
                    entry.set_state(ModelState::Unloaded);
                }
            }
            families.insert(family.name.clone(), Arc::new(family));
        }
        for wanted in only {
            if !families.contains_key(wanted) {
                let reason = format!("no folder with a config.toml for '{wanted}' in {}", root.display());
                let entry = ModelEntry::failed(wanted.clone(), FLAT_VERSION.into(), root.join(wanted), reason);
                families.insert(wanted.clone(), Arc::new(family_of(wanted.clone(), vec![entry])));
            }
        }
        process_start();
        Ok(Self {
            root: root.to_path_buf(),
            families: RwLock::new(families),
            pipelines: RwLock::new(pipelines),
            admin: Mutex::new(()),
            on_demand: OnDemandPolicy::default(),
            load_failures: Mutex::new(BTreeMap::new()),
            draining: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// What a request names, asked once per request by every protocol: a model's version (its
    /// default unless one is named), or a pipeline (which has only version 1).
    pub fn lookup(&self, name: &str, version: Option<&str>) -> Result<Servable, LookupError> {
        if let Some(pipeline) = self.pipeline(name) {
            return match version {
                None | Some(PIPELINE_VERSION) | Some("1.0") => Ok(Servable::Pipeline(pipeline)),
                Some(other) => Err(LookupError::NoPipelineVersion { name: name.to_string(), version: other.to_string() }),
            };
        }
        self.get(name, version).map(Servable::Model)
    }

    /// Whether what `lookup` found serves now: a model version's readiness, or a pipeline's
    /// (its steps').
    pub fn is_ready(&self, servable: &Servable) -> bool {
        match servable {
            Servable::Model(entry) => entry.status().is_ready(),
            Servable::Pipeline(pipeline) => self.pipeline_status(pipeline).is_ready(),
        }
    }

    /// The model's default version, or the version asked for.
    pub fn get(&self, name: &str, version: Option<&str>) -> Result<Arc<ModelEntry>, LookupError> {
        let family = self.family(name).ok_or_else(|| LookupError::NoModel(name.to_string()))?;
        match version {
            None => Ok(Arc::clone(family.default_entry())),
            Some(v) => family.version(v).cloned().ok_or_else(|| LookupError::NoVersion {
                name: name.to_string(),
                version: v.to_string(),
                known: family.version_names(),
            }),
        }
    }

    /// The pipeline of that name, if the repository has one.
    pub fn pipeline(&self, name: &str) -> Option<Arc<PipelineEntry>> {
        self.pipelines.read().unwrap().get(name).cloned()
    }

    pub fn pipelines(&self) -> Vec<Arc<PipelineEntry>> {
        self.pipelines.read().unwrap().values().cloned().collect()
    }

    pub fn family(&self, name: &str) -> Option<Arc<ModelFamily>> {
        self.families.read().unwrap().get(name).cloned()
    }

    pub fn families(&self) -> Vec<Arc<ModelFamily>> {
        self.families.read().unwrap().values().cloned().collect()
    }

    /// The default version of every model.
    pub fn iter(&self) -> Vec<Arc<ModelEntry>> {
        self.families().iter().map(|f| Arc::clone(f.default_entry())).collect()
    }

    /// Every version of every model.
    pub fn entries(&self) -> Vec<Arc<ModelEntry>> {
        self.families().iter().flat_map(|f| f.versions.values().cloned().collect::<Vec<_>>()).collect()
    }

    /// The versions that should serve now: everything not deliberately unloaded and not
    /// waiting to be loaded on demand.
    pub fn serving_entries(&self) -> Vec<Arc<ModelEntry>> {
        self.entries()
            .into_iter()
            .filter(|e| !matches!(e.status().status, ModelStatus::Unloaded | ModelStatus::OnDemand | ModelStatus::NotInstalled))
            .collect()
    }

    /// The one readiness rule, for every protocol's health route: the server is ready when
    /// every version that should serve is ready and there is at least one (or one to load on
    /// demand). An empty repository is not ready (a pod that serves nothing must not get
    /// traffic); versions an admin unloaded, or that `--models` left out, do not hold
    /// readiness back, nor do those waiting to be loaded on demand: with a budget set, the
    /// server is ready when its pinned models are.
    /// From now on the server is not ready (it is shutting down); it is never undone.
    pub fn begin_draining(&self) {
        self.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn readiness(&self) -> Readiness {
        let mut readiness = Readiness { draining: self.draining.load(std::sync::atomic::Ordering::Relaxed), ..Readiness::default() };
        readiness.on_demand = self.entries().iter().filter(|e| e.status().status == ModelStatus::OnDemand).count();
        for entry in self.serving_entries() {
            let name = if entry.version == FLAT_VERSION { entry.name.clone() } else { format!("{}/{}", entry.name, entry.version) };
            let report = entry.status();
            if report.is_ready() {
                readiness.ready.push(name);
            } else {
                readiness.not_ready.push(NotReady { name, status: report.status, reason: report.reason });
            }
        }
        // A pipeline is ready when its steps are; a broken one holds readiness back.
        for pipeline in self.pipelines() {
            let report = self.pipeline_status(&pipeline);
            match report.status {
                ModelStatus::Ready => readiness.ready.push(pipeline.name.clone()),
                ModelStatus::Unloaded | ModelStatus::OnDemand | ModelStatus::NotInstalled => {}
                status => readiness.not_ready.push(NotReady { name: pipeline.name.clone(), status, reason: report.reason }),
            }
        }
        readiness
    }

    /// Loads and warms up every version that is `loading`, one after another, and gives each
    /// a queue in the inference pool. Failures are recorded per version and logged with the
    /// model's name.
    pub fn load_all(&self) {
        let _admin = self.admin.lock().unwrap();
        if self.on_demand.is_active() {
            // With a budget, only pinned versions load now; the rest on their first request.
            for entry in self.entries() {
                if entry.status().status == ModelStatus::Loading && !entry.is_pinned() {
                    entry.set_state(ModelState::OnDemand);
                }
            }
        }
        for entry in self.entries() {
            match entry.status() {
                StatusReport { status: ModelStatus::Loading, .. } => {
                    let _ = on_demand::load_measured(&entry, LoadPriority::Normal);
                }
                StatusReport { status: ModelStatus::Failed, reason } => {
                    tracing::error!(model = %entry.name, version = %entry.version, reason = reason.unwrap_or_default(), "model is broken");
                }
                _ => {}
            }
        }
    }

    /// Reads the model's folder again and loads its versions (every one, or with
    /// [`Reload::Changed`] those whose files changed), then swaps the whole model in at once.
    /// Requests already holding the old version finish on it; new ones get the new one. When
    /// any version fails, nothing is swapped and the old model keeps serving.
    /// Blocking: call it off the async reactor.
    pub fn load(&self, name: &str, reload: Reload, priority: LoadPriority) -> Result<Vec<String>, String> {
        let _admin = self.admin.lock().unwrap();
        let outcome = self.load_and_swap(name, reload, priority);
        let mut failures = self.load_failures.lock().unwrap();
        match &outcome {
            Ok(_) => failures.remove(name),
            Err(reason) => failures.insert(name.to_string(), reason.clone()),
        };
        outcome
    }

    /// Why the model's last load failed, while no later one has succeeded.
    pub fn load_failure(&self, name: &str) -> Option<String> {
        self.load_failures.lock().unwrap().get(name).cloned()
    }

    /// Models and pipelines whose first load failed (a folder polling found, a management
    /// load of a folder not listed yet): never in the map, so nothing else lists them. They are
    /// reported, not listed as failed versions, because a failed version holds readiness back,
    /// and a broken folder dropped into a running fleet's repository must not take every
    /// replica out. Each as its folder reads now.
    pub fn never_loaded_failures(&self) -> Vec<NeverLoaded> {
        let failed: Vec<(String, String)> = {
            let families = self.families.read().unwrap();
            let pipelines = self.pipelines.read().unwrap();
            let failures = self.load_failures.lock().unwrap();
            failures
                .iter()
                .filter(|(name, _)| !families.contains_key(*name) && !pipelines.contains_key(*name))
                .map(|(n, r)| (n.clone(), r.clone()))
                .collect()
        };
        failed
            .into_iter()
            .filter_map(|(name, reason)| {
                if let Ok(dir) = self.folder_of(&name) {
                    let family = read_family(&dir);
                    let versions = family.version_names();
                    return Some(NeverLoaded { name, versions, default_version: family.default_version, reason });
                }
                let is_pipeline = is_safe_name(&name) && self.root.join(&name).join(crate::pipeline::PIPELINE_FILE).is_file();
                is_pipeline.then(|| NeverLoaded { name, versions: vec![PIPELINE_VERSION.into()], default_version: PIPELINE_VERSION.into(), reason })
            })
            .collect()
    }

    fn load_and_swap(&self, name: &str, reload: Reload, priority: LoadPriority) -> Result<Vec<String>, String> {
        let dir = self.folder_of(name)?;
        let mut family = read_family(&dir);
        if family.name != name {
            return Err(format!("the folder for '{name}' serves a model named '{}'", family.name));
        }
        let old = self.family(name);
        let mut kept = Vec::new();
        if let (Reload::Changed, Some(old)) = (reload, &old) {
            for (key, entry) in family.versions.iter_mut() {
                if let Some(serving) = old.versions.get(key).filter(|s| s.status().is_ready() && s.files == entry.files) {
                    *entry = Arc::clone(serving);
                    kept.push(entry.version.clone());
                }
            }
        }
        // A version `make models` did not install stays listed as such; the others must load.
        for entry in family.versions.values().filter(|e| e.status().status != ModelStatus::NotInstalled && !kept.contains(&e.version)) {
            on_demand::load_measured(entry, priority).map_err(|reason| format!("version {}: {reason}", entry.version))?;
        }
        // Keep a default version chosen through the API when it still exists; otherwise the
        // newest, so a version folder added is what requests get once it is loaded.
        if let Some(old) = old {
            if old.default_chosen && family.versions.contains_key(&VersionKey::new(&old.default_version)) {
                family.default_version = old.default_version.clone();
                family.default_chosen = true;
            }
        }
        let versions = family.version_names();
        self.families.write().unwrap().insert(name.to_string(), Arc::new(family));
        tracing::info!(model = %name, ?versions, unchanged_kept = ?kept, "model loaded and swapped in");
        Ok(versions)
    }

    /// Stops serving one version, or all. Requests already holding it finish; its queue leaves
    /// the pool once drained.
    pub fn unload(&self, name: &str, version: Option<&str>) -> Result<(), LookupError> {
        let _admin = self.admin.lock().unwrap();
        let targets = match version {
            Some(_) => vec![self.get(name, version)?],
            None => self.family(name).ok_or_else(|| LookupError::NoModel(name.to_string()))?.versions.values().cloned().collect(),
        };
        for entry in targets {
            if entry.config.is_some() {
                entry.set_state(ModelState::Unloaded);
                tracing::info!(model = %name, version = %entry.version, "model unloaded");
            }
        }
        Ok(())
    }

    /// Keeps `reserved` executors of the inference pool for the version whenever it has work,
    /// and lets it use at most `cap` at once (unchanged when `None`); takes effect for the next
    /// batch. Returns the cap now in force.
    pub fn scale(&self, name: &str, version: Option<&str>, reserved: usize, cap: Option<usize>) -> Result<usize, ScaleError> {
        let _admin = self.admin.lock().unwrap();
        let entry = self.get(name, version).map_err(ScaleError::Lookup)?;
        let cap = entry.runtime().map_err(ScaleError::NotReady)?.rescale(reserved, cap);
        tracing::info!(model = %name, version = %entry.version, reserved, cap, "model scaled");
        Ok(cap)
    }

    pub fn set_default_version(&self, name: &str, version: &str) -> Result<(), LookupError> {
        let _admin = self.admin.lock().unwrap();
        let entry = self.get(name, Some(version))?;
        let mut families = self.families.write().unwrap();
        let family = families.get(name).ok_or_else(|| LookupError::NoModel(name.to_string()))?;
        let mut changed = (**family).clone();
        changed.default_version = entry.version.clone();
        changed.default_chosen = true;
        families.insert(name.to_string(), Arc::new(changed));
        Ok(())
    }

    /// Model folders on disk that are not (yet) in the repository's map, by name.
    pub fn unlisted_on_disk(&self) -> Vec<String> {
        let mut known = self.families.read().unwrap().keys().cloned().collect::<Vec<_>>();
        known.extend(self.pipelines.read().unwrap().keys().cloned());
        model_folders(&self.root)
            .unwrap_or_default()
            .iter()
            .map(|dir| read_family(dir).name)
            .filter(|name| !known.contains(name))
            .collect()
    }

    /// The folder a model lives in: its known folder, or a folder of that name.
    fn folder_of(&self, name: &str) -> Result<PathBuf, String> {
        if let Some(family) = self.family(name) {
            let entry = family.default_entry();
            // A version folder is named by its version under a folder without a config.toml;
            // a flat model's folder holds the config itself. (A versioned model with only a
            // folder `1` looks flat by its version alone.)
            let parent = entry.dir.parent().filter(|p| !p.join("config.toml").is_file());
            let in_version_folder = entry.dir.file_name().is_some_and(|n| n == entry.version.as_str());
            let dir = match parent {
                Some(parent) if in_version_folder => parent.to_path_buf(),
                _ => entry.dir.clone(),
            };
            if dir.is_dir() {
                return Ok(dir);
            }
        }
        if !is_safe_name(name) {
            return Err(format!("'{name}' is not a valid model name"));
        }
        model_folders(&self.root)
            .map_err(|e| format!("repository unreadable: {e}"))?
            .into_iter()
            .find(|dir| read_family(dir).name == name)
            .ok_or_else(|| format!("no folder for model '{name}' in the repository"))
    }
}

/// A model or pipeline folder whose first load failed, as it reads now.
pub struct NeverLoaded {
    pub name: String,
    pub versions: Vec<String>,
    pub default_version: String,
    pub reason: String,
}

/// Whether the server is ready, and if not, why.
#[derive(Debug, Default)]
pub struct Readiness {
    /// Versions that serve, as `name` (flat folders) or `name/version`.
    pub ready: Vec<String>,
    pub not_ready: Vec<NotReady>,
    /// Versions waiting to be loaded by their first request.
    pub on_demand: usize,
    /// Shutting down: every model may still be warm, but no new traffic should come here.
    pub draining: bool,
}

#[derive(Debug, Serialize)]
pub struct NotReady {
    pub name: String,
    pub status: ModelStatus,
    pub reason: Option<String>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        !self.draining && self.not_ready.is_empty() && (!self.ready.is_empty() || self.on_demand > 0)
    }

    /// The reason when no single model is to blame.
    pub fn reason(&self) -> Option<&'static str> {
        if self.draining {
            return Some("shutting down");
        }
        (self.ready.is_empty() && self.not_ready.is_empty() && self.on_demand == 0).then_some("the repository holds no model")
    }
}

#[derive(Debug)]
pub enum ScaleError {
    Lookup(LookupError),
    NotReady(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_numerically_and_accept_torchserve_names() {
        assert!(VersionKey::new("10") > VersionKey::new("9"));
        let entry = |v: &str| ModelEntry::failed("m".into(), v.into(), PathBuf::new(), "x".into());
        let family = family_of("m".into(), vec![entry("2"), entry("10"), entry("1")]);
        assert_eq!(family.default_version, "10");
        assert_eq!(family.version("1.0").unwrap().version, "1");
        assert_eq!(family.version_names(), ["1", "2", "10"]);
        assert!(family.version("3").is_none());
    }

    #[test]
    fn a_draining_server_is_not_ready_and_says_why() {
        let root = tempfile::tempdir().unwrap();
        let repository = ModelRepository::scan(root.path(), &[]).unwrap();
        repository.begin_draining();
        let readiness = repository.readiness();
        assert!(readiness.draining && !readiness.is_ready());
        assert_eq!(readiness.reason(), Some("shutting down"));
    }

    #[test]
    fn an_empty_repository_is_not_ready_and_says_why() {
        let root = tempfile::tempdir().unwrap();
        let readiness = ModelRepository::scan(root.path(), &[]).unwrap().readiness();
        assert!(!readiness.is_ready());
        assert_eq!(readiness.reason(), Some("the repository holds no model"));
    }

    #[test]
    fn scan_reads_flat_and_versioned_folders() {
        let root = tempfile::tempdir().unwrap();
        let config = "task = \"classification\"\n[input]\nwidth = 8\nheight = 8\nresize = \"stretch\"\n[output]\nconvention = \"logits\"\n";
        for dir in ["flat", "versioned/1", "versioned/3", "versioned/notes"] {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
            std::fs::write(root.path().join(dir).join("config.toml"), config).unwrap();
        }
        let repo = ModelRepository::scan(root.path(), &["flat".into()]).unwrap();
        let versioned = repo.family("versioned").unwrap();
        assert_eq!(versioned.version_names(), ["1", "3"]);
        assert_eq!(repo.get("versioned", None).unwrap().version, "3");
        // Not in --models: listed, not loaded.
        assert_eq!(repo.get("versioned", Some("1")).unwrap().status().status, ModelStatus::Unloaded);
        // In --models but its file is missing: failed, with the reason.
        let report = repo.get("flat", None).unwrap().status();
        assert_eq!(report.status, ModelStatus::Failed);
        assert!(report.reason.unwrap().contains("missing"));
        assert!(matches!(repo.get("versioned", Some("2")), Err(LookupError::NoVersion { .. })));
        // The failed "flat" holds readiness back; the unloaded versions do not.
        let readiness = repo.readiness();
        assert!(!readiness.is_ready());
        assert_eq!(readiness.not_ready.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["flat"]);
        assert_eq!(readiness.reason(), None);
        repo.set_default_version("versioned", "1").unwrap();
        assert_eq!(repo.get("versioned", None).unwrap().version, "1");
    }
}
