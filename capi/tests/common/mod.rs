//! What the C ABI's test files share.

use rotq_capi::rotq_last_error;
use std::ffi::CStr;

/// This thread's last error message.
pub fn last_error() -> String {
    // SAFETY: rotq_last_error returns a NUL-terminated string valid until the next call.
    unsafe { CStr::from_ptr(rotq_last_error()) }
        .to_string_lossy()
        .into_owned()
}
