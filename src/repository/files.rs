//! What a folder's files are, to tell whether they changed: each file's path, size and
//! modification time, read through symlinks (`make models` links model files into a cache).
//! Repository polling compares a model folder's with what it last acted on, and a polled
//! reload keeps a version whose own files are what they were when it loaded.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::model_config::ModelConfig;

/// Every file under a folder, as path, size and modification time, sorted.
pub type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

pub fn fingerprint(dir: &Path) -> Fingerprint {
    let mut files = Vec::new();
    walk(dir, 0, &mut files);
    files.sort();
    files
}

/// A version's files: its folder, and the files its config names wherever they are (a model
/// file or labels may sit beside the version folders, `file = "../model.pt"`).
pub fn version_fingerprint(dir: &Path, config: &ModelConfig) -> Fingerprint {
    let mut files = Vec::new();
    walk(dir, 0, &mut files);
    let named = std::iter::once(config.model_file()).chain(config.labels.clone()).chain(config.runtime.op_libraries.iter().cloned());
    for file in named {
        // Those inside the folder are then counted twice, alike on both sides of a comparison.
        files.push(stamp(if file.is_absolute() { file } else { dir.join(file) }));
    }
    files.sort();
    files
}

fn stamp(path: PathBuf) -> (PathBuf, u64, Option<SystemTime>) {
    match std::fs::metadata(&path) {
        Ok(meta) => {
            let (len, modified) = (meta.len(), meta.modified().ok());
            (path, len, modified)
        }
        // Not there (yet), or a dangling link: a file with no size.
        Err(_) => (path, 0, None),
    }
}

/// Model folders are two levels deep at most (model/version/file); a little more is read in
/// case a model keeps files in a sub-folder.
fn walk(dir: &Path, depth: usize, files: &mut Fingerprint) {
    let Ok(read) = std::fs::read_dir(dir) else { return };
    for entry in read.flatten() {
        let path = entry.path();
        if std::fs::metadata(&path).is_ok_and(|meta| meta.is_dir()) {
            if depth < 3 {
                walk(&path, depth + 1, files);
            }
        } else {
            files.push(stamp(path));
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

    #[test]
    fn a_version_fingerprint_covers_a_model_file_outside_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let version = dir.path().join("2");
        std::fs::create_dir(&version).unwrap();
        let text = "task = \"classification\"\nfile = \"../shared.pt\"\n[input]\nwidth = 8\nheight = 8\nresize = \"stretch\"\n[output]\nconvention = \"logits\"\n";
        std::fs::write(version.join("config.toml"), text).unwrap();
        let config = ModelConfig::parse(text).unwrap();
        std::fs::write(dir.path().join("shared.pt"), "x").unwrap();
        let before = version_fingerprint(&version, &config);
        assert_eq!(before.len(), 2, "{before:?}");
        std::fs::write(dir.path().join("shared.pt"), "xyz").unwrap();
        assert_ne!(version_fingerprint(&version, &config), before, "the shared model file changed");
    }
}
