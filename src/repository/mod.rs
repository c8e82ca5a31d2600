//! The model repository: one folder per model, each with a `config.toml`, a model file and
//! optional labels. Scanning never fails as a whole: a broken folder becomes a model that is
//! `failed` with its reason, and the others serve.

pub mod config;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use serde::Serialize;

use crate::engine::{self, ModelRuntime};
use config::ModelConfig;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModelStatus {
    Loading,
    Ready,
    Failed,
}

#[derive(Clone)]
enum ModelState {
    Loading,
    Ready(ModelRuntime),
    Failed(String),
}

/// One model of the repository and where it stands.
pub struct ModelEntry {
    pub name: String,
    pub dir: PathBuf,
    /// `None` when the config itself could not be read; the reason is in the state.
    pub config: Option<Arc<ModelConfig>>,
    pub labels: Arc<Vec<String>>,
    pub file_size: Option<u64>,
    state: RwLock<ModelState>,
    parameter_count: RwLock<Option<u64>>,
}

impl ModelEntry {
    fn failed(name: String, dir: PathBuf, reason: String) -> Self {
        Self {
            name,
            dir,
            config: None,
            labels: Arc::new(Vec::new()),
            file_size: None,
            state: RwLock::new(ModelState::Failed(reason)),
            parameter_count: RwLock::new(None),
        }
    }

    pub fn status(&self) -> (ModelStatus, Option<String>) {
        match &*self.state.read().unwrap() {
            ModelState::Loading => (ModelStatus::Loading, None),
            ModelState::Ready(_) => (ModelStatus::Ready, None),
            ModelState::Failed(reason) => (ModelStatus::Failed, Some(reason.clone())),
        }
    }

    /// The runtime when the model serves; otherwise why not.
    pub fn runtime(&self) -> Result<ModelRuntime, String> {
        match &*self.state.read().unwrap() {
            ModelState::Ready(runtime) => Ok(runtime.clone()),
            ModelState::Loading => Err("still loading".into()),
            ModelState::Failed(reason) => Err(reason.clone()),
        }
    }

    /// Counted from the loaded module; frozen modules have none left to count, so then the
    /// count the exporter recorded in the config.
    pub fn parameter_count(&self) -> Option<u64> {
        let counted = (*self.parameter_count.read().unwrap()).filter(|&n| n > 0);
        counted.or_else(|| self.config.as_ref().and_then(|c| c.provenance.parameter_count))
    }

    pub fn model_file(&self) -> Option<PathBuf> {
        self.config.as_ref().map(|c| self.dir.join(&c.file))
    }
}

/// All models found in the repository folder, by name.
pub struct ModelRepository {
    pub root: PathBuf,
    models: BTreeMap<String, Arc<ModelEntry>>,
}

impl ModelRepository {
    /// Reads every `*/config.toml` under `root` (only `only`, when given). Reading is cheap;
    /// loading the models happens in [`ModelRepository::load_all`].
    pub fn scan(root: &Path, only: &[String]) -> std::io::Result<Self> {
        let mut models = BTreeMap::new();
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join("config.toml").is_file())
            .collect();
        dirs.sort();
        for dir in dirs {
            let entry = read_entry(&dir);
            if only.is_empty() || only.contains(&entry.name) {
                models.insert(entry.name.clone(), Arc::new(entry));
            }
        }
        for wanted in only {
            if !models.contains_key(wanted) {
                let reason = format!("no folder with a config.toml for '{wanted}' in {}", root.display());
                models.insert(wanted.clone(), Arc::new(ModelEntry::failed(wanted.clone(), root.join(wanted), reason)));
            }
        }
        Ok(Self { root: root.to_path_buf(), models })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ModelEntry>> {
        self.models.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<ModelEntry>> {
        self.models.values()
    }

    /// Total workers of the models that will load, to divide the cores among them.
    fn total_workers(&self) -> usize {
        self.models
            .values()
            .filter_map(|m| m.config.as_ref())
            .map(|c| c.runtime.workers)
            .sum::<usize>()
            .max(1)
    }

    /// Loads and warms up every model that is `loading`, one after another, then starts its
    /// workers. Failures are recorded per model and logged with the model's name.
    pub fn load_all(&self) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let default_threads = (cores / self.total_workers()).max(1);
        for entry in self.models.values() {
            let Some(config) = entry.config.clone() else {
                let (_, reason) = entry.status();
                tracing::error!(model = %entry.name, reason = reason.unwrap_or_default(), "model is broken");
                continue;
            };
            let threads = if config.runtime.intra_op_threads > 0 { config.runtime.intra_op_threads } else { default_threads };
            let started = Instant::now();
            let result = load_op_libraries(entry, &config)
                .and_then(|()| engine::load_model(&config, &entry.dir.join(&config.file), threads));
            match result {
                Ok(loaded) => {
                    *entry.parameter_count.write().unwrap() = Some(loaded.parameter_count);
                    let runtime = engine::spawn_workers(&entry.name, loaded, Arc::clone(&config), threads);
                    *entry.state.write().unwrap() = ModelState::Ready(runtime);
                    tracing::info!(
                        model = %entry.name,
                        workers = config.runtime.workers,
                        intra_op_threads = threads,
                        seconds = started.elapsed().as_secs_f32(),
                        "model ready"
                    );
                }
                Err(reason) => {
                    tracing::error!(model = %entry.name, %reason, "model failed to load");
                    *entry.state.write().unwrap() = ModelState::Failed(reason);
                }
            }
        }
    }
}

fn load_op_libraries(entry: &ModelEntry, config: &ModelConfig) -> Result<(), String> {
    for lib in &config.runtime.op_libraries {
        let path = if lib.is_absolute() { lib.clone() } else { entry.dir.join(lib) };
        engine::ops::load_op_library(&path)?;
    }
    Ok(())
}

fn read_entry(dir: &Path) -> ModelEntry {
    let folder_name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let text = match std::fs::read_to_string(dir.join("config.toml")) {
        Ok(t) => t,
        Err(e) => return ModelEntry::failed(folder_name, dir.into(), format!("config.toml unreadable: {e}")),
    };
    let config = match ModelConfig::parse(&text) {
        Ok(c) => c,
        Err(e) => return ModelEntry::failed(folder_name, dir.into(), format!("bad config.toml: {e}")),
    };
    let name = config.name.clone().unwrap_or(folder_name);
    let mut state = ModelState::Loading;
    let model_file = dir.join(&config.file);
    let file_size = std::fs::metadata(&model_file).ok().map(|m| m.len());
    if file_size.is_none() {
        state = ModelState::Failed(format!("model file '{}' is missing", config.file.display()));
    }
    let labels = match &config.labels {
        None => Vec::new(),
        Some(file) => match std::fs::read_to_string(dir.join(file)) {
            Ok(text) => text.lines().map(|l| l.trim_end().to_string()).collect(),
            Err(e) => {
                state = ModelState::Failed(format!("labels file '{}' unreadable: {e}", file.display()));
                Vec::new()
            }
        },
    };
    ModelEntry {
        name,
        dir: dir.into(),
        config: Some(Arc::new(config)),
        labels: Arc::new(labels),
        file_size,
        state: RwLock::new(state),
        parameter_count: RwLock::new(None),
    }
}
