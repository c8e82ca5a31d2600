//! Pipelines in the repository: folders with a `pipeline.toml`, read at start (and again by
//! repository polling when the file changes). A pipeline has
//! no state of its own but its request counters: its steps are models of this repository,
//! looked up again for every request (so a step's reload or new default version takes effect
//! for the next request), and its status is its steps' status.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{InferenceStatistics, LookupError, ModelEntry, ModelRepository, ModelStatus, StatusReport};
use crate::model_config::Task;
use crate::pipeline::{PipelineSpec, PIPELINE_FILE};

pub struct PipelineEntry {
    pub name: String,
    pub dir: PathBuf,
    /// The parsed `pipeline.toml`, or why it could not be read.
    pub spec: Result<Arc<PipelineSpec>, String>,
    /// Its requests, whole (as Triton counts an ensemble's): each step is also counted, as one
    /// request, in its own model's statistics.
    pub statistics: InferenceStatistics,
}

/// The model versions a pipeline's request runs on.
pub struct PipelineSteps {
    pub detect: Arc<ModelEntry>,
    pub classify: Arc<ModelEntry>,
}

/// Every folder with a `pipeline.toml` directly under `root` (when `only` is given, those it
/// names).
pub(super) fn scan(root: &Path, only: &[String]) -> std::io::Result<BTreeMap<String, Arc<PipelineEntry>>> {
    let mut pipelines = BTreeMap::new();
    for entry in std::fs::read_dir(root)? {
        let dir = entry?.path();
        let file = dir.join(PIPELINE_FILE);
        if !file.is_file() {
            continue;
        }
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !only.is_empty() && !only.contains(&name) {
            continue;
        }
        pipelines.insert(name.clone(), Arc::new(read_pipeline(name, dir)));
    }
    Ok(pipelines)
}

/// One pipeline folder as its `pipeline.toml` reads now; a broken one keeps the reason.
fn read_pipeline(name: String, dir: PathBuf) -> PipelineEntry {
    let spec = std::fs::read_to_string(dir.join(PIPELINE_FILE))
        .map_err(|e| format!("{PIPELINE_FILE} unreadable: {e}"))
        .and_then(|text| PipelineSpec::parse(&text))
        .map(Arc::new);
    if let Err(reason) = &spec {
        tracing::error!(pipeline = %name, %reason, "pipeline is broken");
    }
    PipelineEntry { name, dir, spec, statistics: InferenceStatistics::default() }
}

/// Why a pipeline cannot run now, in the words of the step that stops it.
#[derive(Debug)]
pub enum StepError {
    /// The pipeline itself is broken (its file, or a step that is not a model of the right task).
    Broken(String),
    /// A step's model or version is not in the repository.
    Missing { step: &'static str, error: LookupError },
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::Broken(reason) => write!(f, "{reason}"),
            StepError::Missing { step, error } => write!(f, "step '{step}': {error}"),
        }
    }
}

impl ModelRepository {
    /// Reads a pipeline folder's `pipeline.toml` again (repository polling) and swaps it in: the
    /// next request runs the new steps, requests under way finish on the old. A file that no
    /// longer parses keeps the pipeline serving as it was, and says why (`load_failure`), as a
    /// model's failed reload does.
    pub fn reload_pipeline(&self, name: &str, dir: &Path) -> Result<(), String> {
        let _admin = self.admin.lock().unwrap();
        let entry = read_pipeline(name.to_string(), dir.to_path_buf());
        let mut failures = self.load_failures.lock().unwrap();
        let mut pipelines = self.pipelines.write().unwrap();
        match (&entry.spec, pipelines.get(name)) {
            // Broken now: the pipeline that served goes on, and a new one is not listed as a
            // failed pipeline (that would hold the server's readiness back), only reported.
            (Err(reason), old) if old.is_none_or(|old| old.spec.is_ok()) => {
                failures.insert(name.to_string(), reason.clone());
                Err(reason.clone())
            }
            (spec, _) => {
                let outcome = spec.as_ref().map(|_| ()).map_err(|reason| reason.clone());
                match &outcome {
                    Ok(()) => failures.remove(name),
                    Err(reason) => failures.insert(name.to_string(), reason.clone()),
                };
                pipelines.insert(name.to_string(), Arc::new(entry));
                outcome
            }
        }
    }

    /// Stops serving a pipeline whose folder is gone; requests under way finish.
    pub fn remove_pipeline(&self, name: &str) -> bool {
        let _admin = self.admin.lock().unwrap();
        self.load_failures.lock().unwrap().remove(name);
        self.pipelines.write().unwrap().remove(name).is_some()
    }

    /// The versions a pipeline's steps run now: each step's pinned version, or its default.
    pub fn pipeline_steps(&self, pipeline: &PipelineEntry) -> Result<PipelineSteps, StepError> {
        let spec = pipeline.spec.as_ref().map_err(|e| StepError::Broken(e.clone()))?;
        let detect = self
            .get(&spec.detect.model, spec.detect.version.as_deref())
            .map_err(|error| StepError::Missing { step: "detect", error })?;
        let classify = self
            .get(&spec.classify.model, spec.classify.version.as_deref())
            .map_err(|error| StepError::Missing { step: "classify", error })?;
        for (step, entry, task) in [("detect", &detect, Task::Detection), ("classify", &classify, Task::Classification)] {
            if let Some(config) = &entry.config {
                if config.task != task {
                    return Err(StepError::Broken(format!(
                        "step '{step}' must be a {task:?} model; '{}' is a {:?} model",
                        entry.name, config.task
                    )));
                }
            }
        }
        Ok(PipelineSteps { detect, classify })
    }

    /// A pipeline's status: failed when it is broken, otherwise the least ready of its steps
    /// (an unloaded step unloads the pipeline), with the step named in the reason.
    pub fn pipeline_status(&self, pipeline: &PipelineEntry) -> StatusReport {
        let steps = match self.pipeline_steps(pipeline) {
            Ok(steps) => steps,
            Err(e) => return StatusReport { status: ModelStatus::Failed, reason: Some(e.to_string()) },
        };
        for (step, entry) in [("detect", &steps.detect), ("classify", &steps.classify)] {
            let report = entry.status();
            if !report.is_ready() {
                let why = report.reason.map(|r| format!(": {r}")).unwrap_or_default();
                let status = format!("{:?}", report.status).to_lowercase();
                return StatusReport {
                    status: report.status,
                    reason: Some(format!("step '{step}' (model '{}' version {}) is {status}{why}", entry.name, entry.version)),
                };
            }
        }
        StatusReport { status: ModelStatus::Ready, reason: None }
    }
}
