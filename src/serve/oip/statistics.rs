//! Triton's statistics extension (`GET /v2/models[/{m}[/versions/{v}]]/stats`, gRPC
//! `ModelStatistics`): what each version has served, read from the counters the core keeps
//! (`repository::InferenceStatistics`) and the engine (`batch_stats`). A pipeline is listed as
//! Triton lists an ensemble: its whole requests under its one version, with no forwards of its
//! own (each step is counted in its model's statistics too).

use crate::engine::BatchRow;
use crate::error::ApiError;
use crate::pipeline::PIPELINE_VERSION;
use crate::repository::{DurationTotal, InferenceStatistics, ModelEntry, PipelineEntry, Servable};
use crate::serve::Core;

/// One version's statistics, as both transports write them.
pub struct VersionStatistics {
    pub name: String,
    pub version: String,
    /// Milliseconds since the Unix epoch at the last answered request; 0 never.
    pub last_inference: u64,
    pub inference_count: u64,
    /// Forward passes since the version last loaded.
    pub execution_count: u64,
    /// `success`, `fail`, `queue`, `compute_input`, `compute_infer`, `compute_output`,
    /// `cache_hit`, `cache_miss`, in Triton's order.
    pub inference_stats: [(&'static str, DurationTotal); 8],
    /// Per batch size that ran since the version loaded.
    pub batch_stats: Vec<BatchRow>,
    /// What loading the version cost in host memory, in bytes (the growth of the process's peak
    /// resident memory over its load and warm-up, at least its file's size), while it is loaded.
    pub memory_bytes: Option<u64>,
}

fn of(entry: &ModelEntry) -> VersionStatistics {
    let runtime = entry.runtime().ok();
    VersionStatistics {
        execution_count: runtime.as_ref().map_or(0, |r| r.executions()),
        batch_stats: runtime.as_ref().map(|r| r.batch_statistics()).unwrap_or_default(),
        memory_bytes: runtime.and(entry.memory_estimate()),
        ..counted(&entry.name, &entry.version, &entry.statistics)
    }
}

fn of_pipeline(pipeline: &PipelineEntry) -> VersionStatistics {
    counted(&pipeline.name, PIPELINE_VERSION, &pipeline.statistics)
}

fn counted(name: &str, version: &str, s: &InferenceStatistics) -> VersionStatistics {
    VersionStatistics {
        name: name.to_string(),
        version: version.to_string(),
        last_inference: s.last_inference_ms(),
        inference_count: s.inference_count(),
        execution_count: 0,
        batch_stats: Vec::new(),
        memory_bytes: None,
        inference_stats: [
            ("success", s.success.read()),
            ("fail", s.fail.read()),
            ("queue", s.queue.read()),
            ("compute_input", s.compute_input.read()),
            ("compute_infer", s.compute_infer.read()),
            ("compute_output", s.compute_output.read()),
            ("cache_hit", s.cache_hit.read()),
            ("cache_miss", s.cache_miss.read()),
        ],
    }
}

/// Every version of every model, then every pipeline, when `name` is `None`; every version of
/// one model, or the one version named; a pipeline's one row. An unknown model or version is
/// 404.
pub fn statistics(core: &Core, name: Option<&str>, version: Option<&str>) -> Result<Vec<VersionStatistics>, ApiError> {
    let Some(name) = name else {
        let families = core.repository.families();
        let models = families.iter().flat_map(|f| f.versions.values().map(|e| of(e)));
        return Ok(models.chain(core.repository.pipelines().iter().map(|p| of_pipeline(p))).collect());
    };
    if core.repository.pipeline(name).is_some() || version.is_some() {
        return Ok(match core.repository.lookup(name, version).map_err(ApiError::from)? {
            Servable::Model(entry) => vec![of(&entry)],
            Servable::Pipeline(pipeline) => vec![of_pipeline(&pipeline)],
        });
    }
    let family = core.repository.family(name).ok_or_else(|| ApiError::ModelNotFound(name.to_string()))?;
    Ok(family.versions.values().map(|e| of(e)).collect())
}
