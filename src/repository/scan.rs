//! Reading the repository folder: which folders hold a model, their versions, each version's
//! config and labels. Reading never fails as a whole: a broken folder becomes a `failed` entry
//! with its reason. Nothing here loads a model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::entry::{ModelEntry, ModelState, ModelStatus};
use super::{ModelFamily, VersionKey, FLAT_VERSION};
use crate::model_config::ModelConfig;

/// Written by models/aoti.py into a version folder whose package failed its gates.
const NOT_INSTALLED: &str = "not-installed.txt";

/// A model name can only name a folder directly under the repository.
pub(super) fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Folders directly under `root` that hold a model: a `config.toml`, or numbered version
/// folders that do.
pub(super) fn model_folders(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("config.toml").is_file() || !version_folders(p).is_empty())
        .collect();
    dirs.sort();
    Ok(dirs)
}

fn version_folders(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(read) = std::fs::read_dir(dir) else { return Vec::new() };
    read.filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("config.toml").is_file())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_string();
            (!name.is_empty() && name.chars().all(|c| c.is_ascii_digit())).then_some((name, p))
        })
        .collect()
}

pub(super) fn family_of(name: String, entries: Vec<ModelEntry>) -> ModelFamily {
    let versions: BTreeMap<VersionKey, Arc<ModelEntry>> =
        entries.into_iter().map(|e| (VersionKey::new(&e.version), Arc::new(e))).collect();
    // The newest version; never one whose package `make models` compiled but did not install
    // (an INT8 variant that failed its gate on this machine) while an older one can serve.
    let default_version = versions
        .values()
        .rev()
        .find(|e| e.status().status != ModelStatus::NotInstalled)
        .or_else(|| versions.values().next_back())
        .map(|e| e.version.clone())
        .unwrap_or_else(|| FLAT_VERSION.into());
    ModelFamily { name, versions, default_version, default_chosen: false }
}

/// One model folder: flat (version 1) or with numbered versions; the newest is the default.
pub(super) fn read_family(dir: &Path) -> ModelFamily {
    let folder_name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if dir.join("config.toml").is_file() {
        let entry = read_entry(dir, folder_name.clone(), FLAT_VERSION);
        let name = entry.name.clone();
        return family_of(name, vec![entry]);
    }
    let entries = version_folders(dir)
        .into_iter()
        .map(|(version, path)| {
            let mut entry = read_entry(&path, folder_name.clone(), &version);
            // A versioned model is named by its folder, whatever each version's config says.
            entry.name = folder_name.clone();
            entry
        })
        .collect();
    family_of(folder_name, entries)
}

fn read_entry(dir: &Path, folder_name: String, version: &str) -> ModelEntry {
    let text = match std::fs::read_to_string(dir.join("config.toml")) {
        Ok(t) => t,
        Err(e) => return ModelEntry::failed(folder_name, version.into(), dir.into(), format!("config.toml unreadable: {e}")),
    };
    let config = match ModelConfig::parse(&text) {
        Ok(c) => c,
        Err(e) => return ModelEntry::failed(folder_name, version.into(), dir.into(), format!("bad config.toml: {e}")),
    };
    let name = config.name.clone().unwrap_or(folder_name);
    let mut state = ModelState::Loading;
    let model_file = dir.join(config.model_file());
    let file_size = std::fs::metadata(&model_file).ok().map(|m| m.len());
    if file_size.is_none() {
        // models/aoti.py's record of a package it would not install, and why.
        state = match std::fs::read_to_string(dir.join(NOT_INSTALLED)) {
            Ok(why) => ModelState::NotInstalled(format!("not installed on this machine: {}", why.trim())),
            Err(_) => ModelState::Failed(format!("model file '{}' is missing", config.model_file().display())),
        };
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
    ModelEntry::new(name, version.to_string(), dir.into(), Arc::new(config), labels, file_size, state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_cannot_leave_the_repository() {
        for bad in ["", ".", "..", "../etc", "a/b", "a\0b", "%2e%2e", &"x".repeat(201)] {
            assert!(!is_safe_name(bad), "{bad:?}");
        }
        assert!(is_safe_name("resnet18_v1.2-int8"));
    }
}
