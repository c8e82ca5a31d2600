//! AOTInductor packages (`.pt2`) from Rust, through the C shim in `csrc/aoti_shim.cpp`.
//!
//! A package holds machine code compiled for one torch version and one kind of CPU, so before
//! its code is loaded the metadata that `models/aoti.py` wrote into it is checked
//! against this binary's libtorch and this machine's CPU flags; a package made elsewhere is
//! refused with the reason and the fix (compile it again here).

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use super::first_line;
use tch::{Device, Tensor};

/// Metadata keys `models/aoti.py` writes into every package.
pub const KEY_TORCH_VERSION: &str = "visionserve.torch_version";
pub const KEY_CPU_FLAGS: &str = "visionserve.cpu_flags_sha256";
pub const KEY_MAX_BATCH: &str = "visionserve.max_batch";
/// The package's models for batch 1 with static shapes, by the thread count each was
/// compiled for: "1:batch1_t1,2:batch1_t2".
pub const KEY_BATCH1: &str = "visionserve.batch1_models";
/// "fp32" or "int8" (models/quantize.py); absent in packages compiled before INT8: FP32.
pub const KEY_PRECISION: &str = "visionserve.precision";
/// Written by AOTInductor itself: "cpu" or "cuda".
const KEY_DEVICE: &str = "AOTI_DEVICE_KEY";

mod ffi {
    use std::ffi::{c_char, c_int, c_void};
    use torch_sys::C_tensor;

    extern "C" {
        pub fn vs_torch_version() -> *const c_char;
        pub fn vs_free(pointer: *mut c_void);
        pub fn vs_aoti_metadata(path: *const c_char, error: *mut *mut c_char) -> *mut c_char;
        pub fn vs_aoti_load(
            path: *const c_char,
            model_name: *const c_char,
            device_index: c_int,
            num_runners: usize,
            error: *mut *mut c_char,
        ) -> *mut c_void;
        pub fn vs_aoti_run(
            handle: *mut c_void,
            inputs: *const *mut C_tensor,
            input_count: usize,
            outputs: *mut *mut *mut C_tensor,
            count: *mut usize,
            error: *mut *mut c_char,
        ) -> bool;
        pub fn vs_aoti_free(handle: *mut c_void);
    }
}

/// Takes the shim's malloc'd error message (if any) and frees it.
fn take_error(error: *mut c_char) -> String {
    if error.is_null() {
        return "unknown error".into();
    }
    // SAFETY: the shim hands out NUL-terminated strings from malloc; freed once, here.
    let text = unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned();
    unsafe { ffi::vs_free(error as *mut c_void) };
    text
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| format!("path '{}' contains a NUL byte", path.display()))
}

/// The libtorch version this binary was built with, e.g. "2.13.0".
pub fn torch_version() -> &'static str {
    // SAFETY: a static NUL-terminated string from the shim.
    unsafe { CStr::from_ptr(ffi::vs_torch_version()) }.to_str().unwrap_or("unknown")
}

/// SHA-256 (hex) of this machine's CPU feature flags, sorted, space-separated: the same
/// digest `models/aoti.py` computes and records. Empty where /proc/cpuinfo has none.
pub fn cpu_flags_digest() -> &'static str {
    static DIGEST: OnceLock<String> = OnceLock::new();
    DIGEST.get_or_init(|| {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        digest_of_flags(&cpuinfo)
    })
}

fn digest_of_flags(cpuinfo: &str) -> String {
    let Some(line) = cpuinfo.lines().find(|l| l.starts_with("flags")) else {
        return String::new();
    };
    let mut flags: Vec<&str> = line.split_once(':').map(|(_, v)| v).unwrap_or("").split_whitespace().collect();
    flags.sort_unstable();
    let digest = Sha256::digest(flags.join(" ").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The package's metadata, read from the archive without loading its compiled code.
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>, String> {
    let path = c_path(path)?;
    let mut error = std::ptr::null_mut();
    // SAFETY: valid C string in, malloc'd string or error out.
    let text = unsafe { ffi::vs_aoti_metadata(path.as_ptr(), &mut error) };
    if text.is_null() {
        return Err(format!("not a readable AOTInductor package: {}", first_line(&take_error(error))));
    }
    let lines = take_error(text);
    Ok(lines
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// What a package's metadata promises, once checked against this binary and machine.
#[derive(Debug, Clone, PartialEq)]
pub struct PackageInfo {
    /// Largest batch the package accepts (its batch dimension is dynamic from 1 up to this).
    pub max_batch: usize,
    /// The package's models for batch 1 alone (static shapes, faster), by the intra-op thread
    /// count each was compiled for: a static model is slow at another count.
    pub batch1_models: Vec<(usize, String)>,
    /// What the compiled model computes in: "fp32" or "int8".
    pub precision: String,
}

/// Refuses a package compiled for another torch version, another CPU, or another device kind,
/// naming what differs and how to fix it.
pub fn check_package(
    metadata: &HashMap<String, String>,
    device: Device,
    torch: &str,
    cpu_digest: &str,
) -> Result<PackageInfo, String> {
    const FIX: &str = "compile the package again on this machine (make models, or models/aoti.py)";
    let Some(built_with) = metadata.get(KEY_TORCH_VERSION) else {
        return Err(format!(
            "the package carries no '{KEY_TORCH_VERSION}' metadata, so its torch version and CPU cannot be checked; {FIX}"
        ));
    };
    // "2.13.0+cu130" and "2.13.0" are the same release; the local suffix names the wheel's CUDA.
    let release = built_with.split('+').next().unwrap_or(built_with);
    if release != torch {
        return Err(format!("the package was compiled with torch {built_with}, this server runs libtorch {torch}; {FIX}"));
    }
    let package_device = metadata.get(KEY_DEVICE).map(String::as_str).unwrap_or("cpu");
    let wanted = if device.is_cuda() { "cuda" } else { "cpu" };
    if package_device != wanted {
        return Err(format!("the package was compiled for {package_device}, the config runs it on {wanted}; {FIX} for {wanted}"));
    }
    match metadata.get(KEY_CPU_FLAGS) {
        Some(digest) if digest == cpu_digest => {}
        Some(_) => {
            let isa = metadata.get("AOTI_CPU_ISA").map(String::as_str).unwrap_or("unknown");
            return Err(format!(
                "the package was compiled for another CPU (instruction sets: {isa}; its CPU-flags digest differs from this machine's); {FIX}"
            ));
        }
        None => return Err(format!("the package carries no '{KEY_CPU_FLAGS}' metadata; {FIX}")),
    }
    let max_batch = match metadata.get(KEY_MAX_BATCH) {
        Some(n) => n.parse().map_err(|_| format!("bad '{KEY_MAX_BATCH}' metadata '{n}'"))?,
        None => 1,
    };
    let batch1_models = match metadata.get(KEY_BATCH1) {
        Some(list) if max_batch > 1 => parse_batch1_models(list)?,
        _ => Vec::new(),
    };
    let precision = metadata.get(KEY_PRECISION).cloned().unwrap_or_else(|| "fp32".into());
    Ok(PackageInfo { max_batch, batch1_models, precision })
}

fn parse_batch1_models(list: &str) -> Result<Vec<(usize, String)>, String> {
    list.split(',')
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let (threads, name) = entry.split_once(':').ok_or_else(|| format!("bad '{KEY_BATCH1}' metadata '{list}'"))?;
            let threads = threads.parse().map_err(|_| format!("bad '{KEY_BATCH1}' metadata '{list}'"))?;
            Ok((threads, name.to_string()))
        })
        .collect()
}

/// A package's compiled code checks each input's shape, strides and dtype against what it was
/// compiled for only when `AOTI_RUNTIME_CHECK_INPUTS` is set (read once per package); without
/// the check, an image of another size is read out of bounds instead of refused. Sets it
/// unless the operator set it already. Call before any other thread starts (setenv).
pub fn enable_input_checks() {
    if std::env::var_os("AOTI_RUNTIME_CHECK_INPUTS").is_none() {
        std::env::set_var("AOTI_RUNTIME_CHECK_INPUTS", "1");
    }
}

/// `libtorch.so` must be loaded, with its symbols global, before a package's compiled code
/// (which links it) is opened. The binary itself links only libtorch_cpu, so that TorchScript
/// deployments never map the CUDA libraries libtorch.so brings; only the first AOTInductor
/// model pays for it. Found through the binary's rpath to the torch lib folder.
fn ensure_libtorch_loaded() -> Result<(), String> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            super::ops::dlopen_global(std::ffi::OsStr::new("libtorch.so"))
                .map_err(|reason| format!("AOTInductor packages need libtorch.so, which could not be loaded: {reason}"))
        })
        .clone()
}

/// One model of a loaded package (the shim's loader handle).
struct Loader(NonNull<c_void>);

impl Loader {
    fn load(path: &CString, model_name: &str, device: Device, runners: usize) -> Result<Loader, String> {
        let device_index = match device {
            Device::Cuda(i) => i as i32,
            _ => -1,
        };
        let name = CString::new(model_name).map_err(|_| format!("model name '{model_name}' contains a NUL byte"))?;
        let mut error = std::ptr::null_mut();
        // SAFETY: valid C strings; the shim returns a loader or null with an error message.
        let handle = unsafe { ffi::vs_aoti_load(path.as_ptr(), name.as_ptr(), device_index, runners.max(1), &mut error) };
        NonNull::new(handle)
            .map(Loader)
            .ok_or_else(|| format!("AOTInductor load failed ({model_name}): {}", first_line(&take_error(error))))
    }

    fn run(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, String> {
        let pointers: Vec<*mut torch_sys::C_tensor> = inputs.iter().map(|t| t.as_ptr() as *mut _).collect();
        let mut outputs: *mut *mut torch_sys::C_tensor = std::ptr::null_mut();
        let mut count = 0usize;
        let mut error = std::ptr::null_mut();
        // SAFETY: the input tensors outlive the call (the shim copies the handles); on success
        // the shim hands over `count` new tensors in a malloc'd array.
        let ok =
            unsafe { ffi::vs_aoti_run(self.0.as_ptr(), pointers.as_ptr(), pointers.len(), &mut outputs, &mut count, &mut error) };
        if !ok {
            return Err(first_line(&take_error(error)).to_string());
        }
        // SAFETY: each pointer is a heap at::Tensor now owned by us; tch frees it on drop.
        let tensors = (0..count).map(|i| unsafe { Tensor::from_ptr(*outputs.add(i)) }).collect();
        unsafe { ffi::vs_free(outputs as *mut c_void) };
        Ok(tensors)
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // SAFETY: the handle came from vs_aoti_load and is freed once.
        unsafe { ffi::vs_aoti_free(self.0.as_ptr()) };
    }
}

/// A loaded AOTInductor package. Its runners are shared by every worker: concurrent `run`
/// calls each take a free runner (and wait for one when all are busy).
pub struct AotiModel {
    dynamic: Loader,
    /// The static batch-1 models by thread count: a one-image batch run at one of those counts
    /// goes to its model.
    batch1: Vec<(usize, Loader)>,
    pub info: PackageInfo,
}

// SAFETY: AOTIModelPackageLoader::run is safe to call from several threads at once (its
// container hands each call its own runner, under a lock); the handles are freed only on drop.
unsafe impl Send for AotiModel {}
unsafe impl Sync for AotiModel {}

impl AotiModel {
    /// Checks the package's metadata, then loads its dynamic model and the batch-1 models it
    /// lists, with `runners` model instances each.
    pub fn load(path: &Path, device: Device, runners: usize) -> Result<AotiModel, String> {
        let metadata = read_metadata(path)?;
        let info = check_package(&metadata, device, torch_version(), cpu_flags_digest())?;
        ensure_libtorch_loaded()?;
        let c_path = c_path(path)?;
        let dynamic = Loader::load(&c_path, "model", device, runners)?;
        let batch1 = info
            .batch1_models
            .iter()
            .map(|(threads, name)| Ok((*threads, Loader::load(&c_path, name, device, runners)?)))
            .collect::<Result<_, String>>()?;
        Ok(AotiModel { dynamic, batch1, info })
    }

    /// One forward pass: a one-image batch on the batch-1 model compiled for the thread count
    /// this forward runs at, where there is one. A C++ exception (wrong shape, wrong device)
    /// comes back as `Err`.
    pub fn run(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, String> {
        let one_image = inputs.first().is_some_and(|t| t.size().first() == Some(&1));
        let threads = tch::get_num_threads().max(1) as usize;
        match self.batch1.iter().find(|(compiled_for, _)| one_image && *compiled_for == threads) {
            Some((_, batch1)) => batch1.run(inputs),
            None => self.dynamic.run(inputs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn good() -> HashMap<String, String> {
        metadata(&[
            (KEY_TORCH_VERSION, "2.13.0+cu130"),
            (KEY_CPU_FLAGS, "abc"),
            (KEY_MAX_BATCH, "8"),
            ("AOTI_DEVICE_KEY", "cpu"),
            ("AOTI_CPU_ISA", "AVX512"),
        ])
    }

    #[test]
    fn accepts_a_package_from_this_torch_and_cpu() {
        assert_eq!(check_package(&good(), Device::Cpu, "2.13.0", "abc"), Ok(PackageInfo { max_batch: 8, batch1_models: vec![], precision: "fp32".into() }));
    }

    #[test]
    fn refuses_another_torch_version() {
        let err = check_package(&good(), Device::Cpu, "2.14.0", "abc").unwrap_err();
        assert!(err.contains("torch 2.13.0+cu130") && err.contains("2.14.0") && err.contains("compile the package again"), "{err}");
    }

    #[test]
    fn refuses_another_cpu() {
        let err = check_package(&good(), Device::Cpu, "2.13.0", "def").unwrap_err();
        assert!(err.contains("another CPU") && err.contains("AVX512"), "{err}");
    }

    #[test]
    fn refuses_a_package_for_another_device_kind() {
        let err = check_package(&good(), Device::Cuda(0), "2.13.0", "abc").unwrap_err();
        assert!(err.contains("compiled for cpu"), "{err}");
    }

    #[test]
    fn refuses_a_package_without_our_metadata() {
        let bare = metadata(&[("AOTI_DEVICE_KEY", "cpu")]);
        assert!(check_package(&bare, Device::Cpu, "2.13.0", "abc").unwrap_err().contains("no 'visionserve.torch_version'"));
    }

    #[test]
    fn batch1_models_are_read_by_thread_count_and_only_beside_a_dynamic_batch() {
        let mut m = good();
        m.insert(KEY_BATCH1.into(), "1:batch1_t1,2:batch1_t2".into());
        let models = check_package(&m, Device::Cpu, "2.13.0", "abc").unwrap().batch1_models;
        assert_eq!(models, vec![(1, "batch1_t1".to_string()), (2, "batch1_t2".to_string())]);
        m.insert(KEY_BATCH1.into(), "two:batch1_t2".into());
        assert!(check_package(&m, Device::Cpu, "2.13.0", "abc").unwrap_err().contains("bad"));
        m.insert(KEY_MAX_BATCH.into(), "1".into());
        assert!(check_package(&m, Device::Cpu, "2.13.0", "abc").unwrap().batch1_models.is_empty());
    }

    #[test]
    fn a_package_without_a_batch_bound_takes_one_image() {
        let mut m = good();
        m.remove(KEY_MAX_BATCH);
        assert_eq!(check_package(&m, Device::Cpu, "2.13.0", "abc").unwrap().max_batch, 1);
    }

    #[test]
    fn the_flags_digest_ignores_order_and_reads_the_first_flags_line() {
        let a = digest_of_flags("processor : 0\nflags\t\t: sse avx fma\nflags : other\n");
        let b = digest_of_flags("flags: fma sse avx\n");
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        assert_ne!(a, digest_of_flags("flags: sse avx\n"));
        assert_eq!(digest_of_flags("no flags here"), "");
    }
}
