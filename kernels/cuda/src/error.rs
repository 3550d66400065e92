//! The one error type of the CUDA backend.

use cudarc::driver::{sys::cudaError_enum, DriverError};

/// Everything that can go wrong on the CUDA side, plus the oracle's input errors.
///
/// ```
/// let e = rotq_cuda::CudaError::NoDevice { ordinal: 3, count: 1 };
/// assert!(e.to_string().contains("cuda:3"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// libcuda could not be loaded: no NVIDIA driver on this machine.
    #[error("no CUDA driver: libcuda could not be loaded (is an NVIDIA driver installed?)")]
    NoDriver,
    /// libnvrtc could not be loaded, so kernels cannot be compiled.
    #[error(
        "no NVRTC: libnvrtc could not be loaded (add the CUDA toolkit's lib64 to LD_LIBRARY_PATH)"
    )]
    NoNvrtc,
    /// The device ordinal is not present.
    #[error("no CUDA device cuda:{ordinal} ({count} device(s) present)")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// How many devices the driver sees.
        count: usize,
    },
    /// A kernel object or buffer made for one device used with another.
    #[error("made for cuda:{expected}, used with cuda:{actual}")]
    WrongDevice {
        /// The device the kernel object was made for.
        expected: usize,
        /// The device of the call or buffer.
        actual: usize,
    },
    /// The driver is older than the CUDA version the kernels are built against.
    #[error("the NVIDIA driver supports CUDA {found}, rotq-cuda needs {needed} or newer (update the driver)")]
    DriverTooOld {
        /// The driver's CUDA version (13000 = 13.0).
        found: i32,
        /// The version needed.
        needed: i32,
    },
    /// A device name that is not `cuda:N`.
    #[error("bad device name {0:?}: expected cuda:N, e.g. cuda:0")]
    BadDeviceName(String),
    /// NVRTC rejected a kernel's source; `log` is NVRTC's log.
    #[error("NVRTC could not compile {kernel}: {log}")]
    Compile {
        /// The kernel module and its defines.
        kernel: String,
        /// NVRTC's log (or the error when no log could be read).
        log: String,
    },
    /// The device ran out of memory.
    #[error("out of GPU memory while {what}")]
    OutOfMemory {
        /// What was being done.
        what: String,
    },
    /// A launch or another driver call failed.
    #[error("CUDA error while {what}: {source}")]
    Driver {
        /// What was being done.
        what: String,
        /// The driver's error.
        source: DriverError,
    },
    /// A shape, length, rotation or format the oracle or this backend refuses.
    #[error(transparent)]
    Input(#[from] rotq_reference::Error),
}

/// Results of the CUDA backend.
pub type Result<T, E = CudaError> = std::result::Result<T, E>;

/// Adds context to driver errors, singling out out-of-memory.
pub(crate) trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, DriverError> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| {
            if source.0 == cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
                CudaError::OutOfMemory { what: what() }
            } else {
                CudaError::Driver {
                    what: what(),
                    source,
                }
            }
        })
    }
}
