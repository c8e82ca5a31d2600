//! Model metadata: the list (every model in the repository, loaded or not, and folders whose
//! first load failed), one model in detail, and one version of it.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::model_path::ModelPath;
use super::AppState;
use crate::error::ApiError;
use crate::pipeline::PIPELINE_VERSION;
use crate::repository::{ModelEntry, PipelineEntry, Servable};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(list))
        .route("/v1/models/{name}", get(detail))
        .route("/v1/models/{name}/versions/{version}", get(detail))
}

fn summary(model: &ModelEntry) -> Value {
    let report = model.status();
    let mut value = json!({"name": model.name, "version": model.version, "status": report.status});
    if let Some(reason) = report.reason {
        value["reason"] = json!(reason);
    }
    // Models on demand: what it cost to load, and when it was last used.
    if let Some(bytes) = model.memory_estimate() {
        value["memory_estimate_bytes"] = json!(bytes);
    }
    if let Some(ms) = model.last_used_ms() {
        value["last_used_ms"] = json!(ms);
    }
    if model.is_pinned() {
        value["pinned"] = json!(true);
    }
    if let Some(config) = &model.config {
        value["task"] = json!(config.task);
        value["format"] = json!(config.format);
        value["precision"] = json!(config.compile.precision);
        value["input"] = json!(config.input);
        value["provenance"] = json!(config.provenance);
    }
    value
}

fn with_versions(state: &AppState, model: &ModelEntry, mut value: Value) -> Value {
    if let Some(family) = state.repository.family(&model.name) {
        value["versions"] = json!(family.version_names());
        value["default_version"] = json!(family.default_version);
    }
    // A reload (management call or repository polling) that failed while this one serves.
    if let Some(reason) = state.repository.load_failure(&model.name) {
        value["last_load_error"] = json!(reason);
    }
    value
}

/// Every model (its default version), then every pipeline with its steps.
async fn list(State(state): State<AppState>) -> Json<Value> {
    let mut models: Vec<Value> = state.repository.iter().iter().map(|m| with_versions(&state, m, summary(m))).collect();
    models.extend(state.repository.pipelines().iter().map(|p| pipeline_summary(&state, p)));
    models.extend(state.repository.never_loaded_failures().into_iter().map(|failed| {
        json!({
            "name": failed.name,
            "version": failed.default_version,
            "status": "failed",
            "reason": "its first load failed; nothing of it serves",
            "last_load_error": failed.reason,
            "versions": failed.versions,
            "default_version": failed.default_version,
        })
    }));
    Json(json!({"models": models}))
}

fn describe(state: &AppState, model: &ModelEntry) -> Value {
    let mut value = with_versions(state, model, summary(model));
    if let Some(config) = &model.config {
        value["labels_count"] = json!(model.labels.len());
        value["output"] = json!(config.output);
        value["runtime"] = json!(config.runtime);
        value["workers"] = json!(model.workers());
        value["reserved_executors"] = json!(model.reserved_executors());
        // The shared pool at this moment: executors running this version's batches, and how
        // many it may use at once (its cap, bounded by the pool).
        if let Ok(runtime) = model.runtime() {
            value["executors_now"] = json!(runtime.executors_now());
            value["executors_max"] = json!(runtime.parallelism());
            value["queued_requests"] = json!(runtime.queue_depth());
            value["batch_bound"] = json!(runtime.batch_bound());
        }
        value["batching"] = json!(config.batching);
        value["parameter_count"] = json!(model.parameter_count());
        value["file_size_bytes"] = json!(model.file_size);
    }
    value
}

/// One model (or version) in detail, with KServe V1's `ready` (what its SDK's
/// `is_model_ready` reads), by the repository's one readiness rule.
async fn detail(State(state): State<AppState>, model: ModelPath) -> Result<Json<Value>, ApiError> {
    let servable = state.repository.lookup(&model.name, model.version())?;
    let ready = state.repository.is_ready(&servable);
    let mut value = match &servable {
        Servable::Pipeline(pipeline) => pipeline_summary(&state, pipeline),
        Servable::Model(entry) => describe(&state, entry),
    };
    value["ready"] = json!(ready);
    Ok(Json(value))
}

/// A pipeline in `/v1/models`: its status (its steps'), and its steps as configured.
fn pipeline_summary(state: &AppState, pipeline: &PipelineEntry) -> Value {
    let report = state.repository.pipeline_status(pipeline);
    let mut value = json!({
        "name": pipeline.name,
        "version": PIPELINE_VERSION,
        "status": report.status,
        "kind": "pipeline",
        "task": "detection",
        "versions": [PIPELINE_VERSION],
        "default_version": PIPELINE_VERSION,
    });
    if let Some(reason) = report.reason {
        value["reason"] = json!(reason);
    }
    // A polled pipeline.toml that no longer reads, while the one before serves.
    if let Some(reason) = state.repository.load_failure(&pipeline.name) {
        value["last_load_error"] = json!(reason);
    }
    if let Ok(spec) = &pipeline.spec {
        value["steps"] = json!({"detect": spec.detect, "classify": spec.classify});
        if let Some(description) = &spec.description {
            value["description"] = json!(description);
        }
    }
    value
}
