//! Give the binary an rpath to the libtorch folder that torch-sys linked against, so it runs
//! without LD_LIBRARY_PATH. torch-sys declares `links = "tch"` and prints `libtorch_lib`, which
//! cargo hands to us as DEP_TCH_LIBTORCH_LIB.
//!
//! Only what the binary uses is linked (`--as-needed`: libtorch_cpu, libc10): the pip wheel's
//! libtorch.so would pull in libtorch_cuda and 3 GB of CUDA libraries even on a CPU machine.
//! Libraries opened later (torchvision's operators) find theirs through the same rpath.
//!
//! It also compiles `csrc/aoti_shim.cpp`, the C interface to AOTInductor's package loader,
//! against the same libtorch's headers.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/aoti_shim.cpp");
    compile_protos();
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        compile_aoti_shim(std::path::Path::new(&dir));
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

/// The headers sit beside the library folder in both the pip wheel and a libtorch download.
fn compile_aoti_shim(lib_dir: &std::path::Path) {
    let include = lib_dir.parent().expect("libtorch's lib folder has a parent").join("include");
    cc::Build::new()
        .cpp(true)
        .file("csrc/aoti_shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        // The pip wheel is built with the new libstdc++ ABI.
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("visionserve_aoti_shim");
}

/// The gRPC service (server and, for the bench and tests, client) from `proto/`, with the
/// file descriptor set that server reflection serves.
fn compile_protos() {
    println!("cargo:rerun-if-changed=proto/grpc_service.proto");
    println!("cargo:rerun-if-changed=proto/model_config.proto");
    println!("cargo:rerun-if-changed=proto/streams.proto");
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("protoc-bin-vendored ships protoc for this platform");
    std::env::set_var("PROTOC", protoc);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("inference_descriptor.bin"))
        // Tensor payloads stay reference-counted slices of the received message, not copies.
        .bytes(".inference")
        .compile_protos(&["proto/grpc_service.proto", "proto/model_config.proto"], &["proto"])
        .expect("compiling proto/grpc_service.proto and proto/model_config.proto");
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("streams_descriptor.bin"))
        .compile_protos(&["proto/streams.proto"], &["proto"])
        .expect("compiling proto/streams.proto");
}
