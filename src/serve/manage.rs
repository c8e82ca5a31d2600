//! Model management as every protocol's management API runs it (Triton's repository extension
//! over REST and gRPC, TorchServe's management API): the repository index, load (or reload)
//! and unload, each keeping the response cache in step.

use crate::repository::{LoadPriority, LookupError, ModelStatus, Reload};
use crate::serve::Core;

fn state_name(status: ModelStatus) -> &'static str {
    match status {
        ModelStatus::Ready => "READY",
        ModelStatus::Loading => "LOADING",
        ModelStatus::Failed | ModelStatus::Unloaded | ModelStatus::OnDemand | ModelStatus::NotInstalled => "UNAVAILABLE",
    }
}

/// One row of Triton's repository index.
pub struct IndexRow {
    pub name: String,
    pub version: Option<String>,
    pub state: &'static str,
    pub reason: Option<String>,
}

/// Every version of every model in the repository map, then (unless only ready ones are
/// asked for) folders on disk not yet in it: the index both REST and gRPC answer.
pub async fn repository_index(core: &Core, ready_only: bool) -> Vec<IndexRow> {
    let mut rows = Vec::new();
    for entry in core.repository.entries() {
        let report = entry.status();
        if ready_only && !report.is_ready() {
            continue;
        }
        rows.push(IndexRow {
            name: entry.name.clone(),
            version: Some(entry.version.clone()),
            state: state_name(report.status),
            reason: report.reason,
        });
    }
    if !ready_only {
        let repository = core.repository.clone();
        let unlisted = tokio::task::spawn_blocking(move || repository.unlisted_on_disk()).await.unwrap_or_default();
        for name in unlisted {
            let reason = core.repository.load_failure(&name).unwrap_or_else(|| "not loaded".into());
            rows.push(IndexRow { name, version: None, state: "UNAVAILABLE", reason: Some(reason) });
        }
    }
    rows
}

/// Loads (or reloads) on a blocking thread; the admin lock serialises loads. The model's
/// cached answers go (they are of the versions it replaces).
pub async fn load(core: &Core, name: String) -> Result<Vec<String>, String> {
    let repository = core.repository.clone();
    let model = name.clone();
    let loaded = tokio::task::spawn_blocking(move || repository.load(&name, Reload::Everything, LoadPriority::Normal))
        .await
        .unwrap_or_else(|e| Err(format!("the load failed: {e}")));
    if let (Ok(_), Some(cache)) = (&loaded, &core.cache) {
        cache.invalidate(&model);
    }
    loaded
}

/// Stops serving one version of a model, or all, and drops its cached answers.
pub fn unload(core: &Core, name: &str, version: Option<&str>) -> Result<(), LookupError> {
    core.repository.unload(name, version)?;
    if let Some(cache) = &core.cache {
        cache.invalidate(name);
    }
    Ok(())
}

