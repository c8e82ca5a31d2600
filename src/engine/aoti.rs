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
/// Written by AOTInductor itself: "cpu" or "cuda".
const KEY_DEVICE: &str = "AOTI_DEVICE_KEY";

mod ffi {
    use std::ffi::{c_char, c_int, c_void};
    use torch_sys::C_tensor;

    extern "C" {
        pub fn vs_torch_version() -> *const c_char;
        pub fn vs_free(pointer: *mut c_void);
        pub fn vs_aoti_metadata(path: *const c_char, error: *mut *mut c_char) -> *mut c_char;
        pub fn vs_aoti_load(path: *const c_char, device_index: c_int, num_runners: usize, error: *mut *mut c_char) -> *mut c_void;
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
    Ok(PackageInfo { max_batch })
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

/// A loaded AOTInductor package. Its runners are shared by every worker: concurrent `run`
/// calls each take a free runner (and wait for one when all are busy).
pub struct AotiModel {
    handle: NonNull<c_void>,
    pub info: PackageInfo,
}

// SAFETY: AOTIModelPackageLoader::run is safe to call from several threads at once (its
// container hands each call its own runner, under a lock); the handle is freed only on drop.
unsafe impl Send for AotiModel {}
unsafe impl Sync for AotiModel {}

impl AotiModel {
    /// Checks the package's metadata, then loads it with `runners` model instances.
    pub fn load(path: &Path, device: Device, runners: usize) -> Result<AotiModel, String> {
        let metadata = read_metadata(path)?;
        let info = check_package(&metadata, device, torch_version(), cpu_flags_digest())?;
        ensure_libtorch_loaded()?;
        let device_index = match device {
            Device::Cuda(i) => i as i32,
            _ => -1,
        };
        let c_path = c_path(path)?;
        let mut error = std::ptr::null_mut();
        // SAFETY: valid C string; the shim returns a loader or null with an error message.
        let handle = unsafe { ffi::vs_aoti_load(c_path.as_ptr(), device_index, runners.max(1), &mut error) };
        match NonNull::new(handle) {
            Some(handle) => Ok(AotiModel { handle, info }),
            None => Err(format!("AOTInductor load failed: {}", first_line(&take_error(error)))),
        }
    }

    /// One forward pass. A C++ exception (wrong shape, wrong device) comes back as `Err`.
    pub fn run(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, String> {
        let pointers: Vec<*mut torch_sys::C_tensor> = inputs.iter().map(|t| t.as_ptr() as *mut _).collect();
        let mut outputs: *mut *mut torch_sys::C_tensor = std::ptr::null_mut();
        let mut count = 0usize;
        let mut error = std::ptr::null_mut();
        // SAFETY: the input tensors outlive the call (the shim copies the handles); on success
        // the shim hands over `count` new tensors in a malloc'd array.
        let ok = unsafe {
            ffi::vs_aoti_run(self.handle.as_ptr(), pointers.as_ptr(), pointers.len(), &mut outputs, &mut count, &mut error)
        };
        if !ok {
            return Err(first_line(&take_error(error)).to_string());
        }
        // SAFETY: each pointer is a heap at::Tensor now owned by us; tch frees it on drop.
        let tensors = (0..count).map(|i| unsafe { Tensor::from_ptr(*outputs.add(i)) }).collect();
        unsafe { ffi::vs_free(outputs as *mut c_void) };
        Ok(tensors)
    }
}

impl Drop for AotiModel {
    fn drop(&mut self) {
        // SAFETY: the handle came from vs_aoti_load and is freed once.
        unsafe { ffi::vs_aoti_free(self.handle.as_ptr()) };
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
        assert_eq!(check_package(&good(), Device::Cpu, "2.13.0", "abc"), Ok(PackageInfo { max_batch: 8 }));
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
