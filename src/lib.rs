#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod activations;
pub mod bench;
pub mod bench_cuda;
pub mod cache;
/// Checkpoint-driven rotation: a compressed-tensors `transform_config` (from a model's
/// `config.json`) as a [`RotationPlan`] per attention layer.
pub mod checkpoint;
pub mod eval;
pub mod eval_backend;
pub mod eval_grid;
pub mod files;
#[doc(hidden)]
pub mod fuzzing;
pub mod heatmap;
pub mod io;
pub mod npy;
pub mod oracle_check;

pub use rotq_cuda as cuda;
pub use rotq_reference as reference;
pub use rotq_reference::{
    attention, rotated_quantized_attention, AttentionParams, KvCacheSpec, KvFormat, Rotation,
    RotationPlan, RotationSpec,
};

use std::path::PathBuf;

/// Errors of the facade: the oracle's, plus file and input errors.
///
/// ```
/// let err = rotq::io::read_f32(std::path::Path::new("/no/such/file.f32")).unwrap_err();
/// assert!(err.to_string().starts_with("/no/such/file.f32: "));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad input to the oracle (shape, format, rotation, …).
    #[error(transparent)]
    Reference(#[from] rotq_reference::Error),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// Input data that does not fit the request (lengths, sizes).
    #[error("{0}")]
    Input(String),
    /// The CUDA backend failed (no driver or device, compile, launch, memory).
    #[error(transparent)]
    Cuda(#[from] rotq_cuda::CudaError),
    /// A `.npy` file that cannot be read as asked (see [`npy::NpyError`]).
    #[error("{}: {source}", path.display())]
    Npy {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: npy::NpyError,
    },
    /// `--device cuda:N` asked for a GPU that cannot be used here.
    #[error("no CUDA device for {device}: {source}")]
    NoCudaDevice {
        /// The device asked for.
        device: String,
        /// Why it cannot be opened (no driver, no such device, driver too old, …).
        source: rotq_cuda::CudaError,
    },
    /// A kernel's attention output disagrees with the oracle's on the same cache bytes.
    #[error("the {backend} kernel disagrees with the oracle on {what}: {mismatch}")]
    OracleMismatch {
        /// Which kernels (`cpu`, `cuda:0`).
        backend: String,
        /// The combination, layer and rows compared.
        what: String,
        /// The measured errors and the tolerance.
        mismatch: rotq_reference::tolerance::Mismatch,
    },
    /// A heatmap could not be drawn or encoded.
    #[error("heatmap {}: {reason}", path.display())]
    Plot {
        /// The PNG being made.
        path: PathBuf,
        /// What the plotting or encoding library said.
        reason: String,
    },
}
