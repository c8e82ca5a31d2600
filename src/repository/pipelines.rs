//! Pipelines in the repository: folders with a `pipeline.toml`, read at start. A pipeline has
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
        let spec = std::fs::read_to_string(&file)
            .map_err(|e| format!("{PIPELINE_FILE} unreadable: {e}"))
            .and_then(|text| PipelineSpec::parse(&text))
            .map(Arc::new);
        if let Err(reason) = &spec {
            tracing::error!(pipeline = %name, %reason, "pipeline is broken");
        }
        pipelines.insert(name.clone(), Arc::new(PipelineEntry { name, dir, spec, statistics: InferenceStatistics::default() }));
    }
    Ok(pipelines)
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
