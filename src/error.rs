//! The engine library's one error type.

/// What can go wrong in the engine library: bad input, a checkpoint that cannot be read as a
/// rotation, or the CUDA backend failing. Every variant names an engine failure; the tools'
/// failures (files, plots, command-line options) are the CLI's own.
///
/// ```
/// use rotq::cache::{CacheSpec, RotatedKvCache};
/// let err = RotatedKvCache::new(CacheSpec { n_heads: 0, ..Default::default() }).unwrap_err();
/// assert!(matches!(err, rotq::Error::Reference(_)));
/// assert!(err.to_string().contains("n_heads"), "{err}");
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad input: a shape, format, rotation, size, length or parameter the call cannot take
    /// (the oracle's vocabulary of input errors, shared by every backend).
    #[error(transparent)]
    Reference(#[from] rotq_reference::Error),
    /// A checkpoint's transform config or its weights could not be read as rotations.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// The CUDA backend failed (no driver or device, compile, launch, memory).
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Cuda(#[from] rotq_cuda::CudaError),
}
