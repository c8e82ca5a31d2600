//! Triton's statistics extension (`GET /v2/models[/{m}[/versions/{v}]]/stats`, gRPC
//! `ModelStatistics`): what each version has served, read from the counters the core keeps
//! (`repository::InferenceStatistics`). A pipeline has none of its own: each of its steps is
//! counted in its model's statistics.

use std::sync::Arc;

use crate::error::ApiError;
use crate::repository::{DurationTotal, ModelEntry, Servable};
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
}

fn of(entry: &ModelEntry) -> VersionStatistics {
    let s = &entry.statistics;
    VersionStatistics {
        name: entry.name.clone(),
        version: entry.version.clone(),
        last_inference: s.last_inference_ms(),
        inference_count: s.inference_count(),
        execution_count: entry.runtime().map_or(0, |r| r.executions()),
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

/// Every version of every model when `name` is `None`; every version of one model, or the one
/// version named. An unknown model or version is 404; a pipeline is 400, naming its steps.
pub fn statistics(core: &Core, name: Option<&str>, version: Option<&str>) -> Result<Vec<VersionStatistics>, ApiError> {
    let Some(name) = name else {
        let families = core.repository.families();
        return Ok(families.iter().flat_map(|f| f.versions.values().map(|e| of(e))).collect());
    };
    if let Some(pipeline) = core.repository.pipeline(name) {
        let steps = match &pipeline.spec {
            Ok(spec) => format!(": see its steps' models, '{}' and '{}'", spec.detect.model, spec.classify.model),
            Err(_) => String::new(),
        };
        return Err(ApiError::BadRequest(format!("pipeline '{name}' keeps no statistics of its own{steps}")));
    }
    let family = core.repository.family(name).ok_or_else(|| ApiError::ModelNotFound(name.to_string()))?;
    let entries: Vec<Arc<ModelEntry>> = match version {
        None => family.versions.values().cloned().collect(),
        Some(version) => match core.repository.lookup(name, Some(version)).map_err(ApiError::from)? {
            Servable::Model(entry) => vec![entry],
            Servable::Pipeline(_) => Vec::new(),
        },
    };
    Ok(entries.iter().map(|e| of(e)).collect())
}
