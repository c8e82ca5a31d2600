//! Give the binary an rpath to the libtorch folder that torch-sys linked against, so it runs
//! without LD_LIBRARY_PATH. torch-sys declares `links = "tch"` and prints `libtorch_lib`, which
//! cargo hands to us as DEP_TCH_LIBTORCH_LIB.
//!
//! Only what the binary uses is linked (`--as-needed`: libtorch_cpu, libc10): the pip wheel's
//! libtorch.so would pull in libtorch_cuda and 3 GB of CUDA libraries even on a CPU machine.
//! Libraries opened later (torchvision's operators) find theirs through the same rpath.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        // DT_RPATH rather than DT_RUNPATH: it also applies to libraries opened later with
        // dlopen (torchvision's _C.so needs libtorch_python.so from the same folder).
        println!("cargo:rustc-link-arg=-Wl,--disable-new-dtags");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        // GPU builds (`make test-gpu`, docker/Dockerfile.cuda): keep libtorch_cuda linked, or
        // `--as-needed` drops it and CUDA is never available to the process.
        println!("cargo:rerun-if-env-changed=VISIONSERVE_CUDA");
        if std::env::var("VISIONSERVE_CUDA").is_ok_and(|v| v == "1") {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
