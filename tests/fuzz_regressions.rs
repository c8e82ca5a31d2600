//! Every input saved under `fuzz/regressions/<target>/` (crashes found by `make fuzz`, once
//! fixed, and seeds worth keeping) runs through the same check as the fuzz target, on stable
//! Rust, in `make test`. The corpus of `tests/corpus/files/` runs through the image target too.

use std::path::{Path, PathBuf};

use visionserve::fuzz_checks;

fn inputs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort();
    files.into_iter().map(|p| {
        let bytes = std::fs::read(&p).unwrap();
        (p, bytes)
    }).collect()
}

fn run(target: &str, check: fn(&[u8])) -> usize {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut all = inputs(&root.join("fuzz/regressions").join(target));
    if target == "decode_preprocess" {
        all.extend(inputs(&root.join("tests/corpus/files/accepted")));
        all.extend(inputs(&root.join("tests/corpus/files/rejected")));
    }
    for (path, bytes) in &all {
        if std::panic::catch_unwind(|| check(bytes)).is_err() {
            panic!("{target}: {} fails its check again", path.display());
        }
    }
    all.len()
}

#[test]
fn saved_fuzz_inputs_pass_their_checks() {
    let counts = [
        ("decode_preprocess", run("decode_preprocess", fuzz_checks::decode_preprocess)),
        ("request_parsing", run("request_parsing", fuzz_checks::request_parsing)),
        ("v2_binary", run("v2_binary", fuzz_checks::v2_binary)),
        ("rle_nms", run("rle_nms", fuzz_checks::rle_nms)),
    ];
    eprintln!("inputs checked: {counts:?}");
    assert!(counts[0].1 >= 20, "the image corpus is missing");
    // Every other target has saved inputs: a folder renamed or emptied would otherwise make
    // this test pass on nothing.
    for (target, count) in &counts[1..] {
        assert!(*count > 0, "no saved inputs for {target} under fuzz/regressions/{target}/");
    }
}
