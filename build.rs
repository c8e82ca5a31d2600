//! Give the binary an rpath to the libtorch folder that torch-sys linked against, so it runs
//! without LD_LIBRARY_PATH. torch-sys declares `links = "tch"` and prints `libtorch_lib`, which
//! cargo hands to us as DEP_TCH_LIBTORCH_LIB.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        // DT_RPATH rather than DT_RUNPATH: it also applies to libraries opened later with
        // dlopen (torchvision's _C.so needs libtorch_python.so from the same folder).
        println!("cargo:rustc-link-arg=-Wl,--disable-new-dtags");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        // AOTInductor packages and torchvision's operators dlopen libtorch.so by name; keep it
        // in the process so that lookup succeeds without a library path.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{dir}");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
