//! Shared libraries loaded into the process with their symbols global: libraries that register
//! extra TorchScript operators (torchvision's `nms`, `roi_align`, ...), which must be loaded
//! before a model that uses them, and `libtorch.so` for AOTInductor packages. One `dlopen`.

use std::ffi::{CStr, CString, OsStr};
use std::path::Path;

/// `dlopen`s `library` (a path, or a name found through the library path and the binary's
/// rpath) with `RTLD_NOW | RTLD_GLOBAL`. The handle is kept for the process's life, since
/// what the library registered must stay. Fails with the loader's own message.
pub(crate) fn dlopen_global(library: &OsStr) -> Result<(), String> {
    let c_name = CString::new(library.as_encoded_bytes()).map_err(|_| "the library path contains a NUL byte".to_string())?;
    // SAFETY: a plain dlopen of a NUL-terminated path; the handle is deliberately leaked.
    let handle = unsafe { libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if !handle.is_null() {
        return Ok(());
    }
    // SAFETY: dlerror returns a thread-local C string or NULL.
    let error = unsafe { libc::dlerror() };
    Err(if error.is_null() {
        "unknown dlopen error".to_string()
    } else {
        // SAFETY: non-null, NUL-terminated, valid until the next dl* call on this thread.
        unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned()
    })
}

/// Loads an operator library before the models that need it.
pub fn load_op_library(path: &Path) -> Result<(), String> {
    dlopen_global(path.as_os_str()).map_err(|message| format!("could not load operator library {}: {message}", path.display()))
}
