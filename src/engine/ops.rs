//! Loading shared libraries that register extra TorchScript operators (torchvision's `nms`,
//! `roi_align`, ...). They must be loaded with RTLD_GLOBAL before a model that uses them.

use std::ffi::CString;
use std::path::Path;

/// `dlopen`s `path` with `RTLD_NOW | RTLD_GLOBAL`; the handle is kept for the process's life,
/// since the operators it registered must stay.
pub fn load_op_library(path: &Path) -> Result<(), String> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("operator library path {} contains a NUL byte", path.display()))?;
    // SAFETY: a plain dlopen of a NUL-terminated path; the handle is deliberately leaked.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a thread-local C string or NULL.
        let message = unsafe {
            let err = libc::dlerror();
            if err.is_null() {
                "unknown dlopen error".to_string()
            } else {
                std::ffi::CStr::from_ptr(err).to_string_lossy().into_owned()
            }
        };
        return Err(format!("could not load operator library {}: {message}", path.display()));
    }
    Ok(())
}
