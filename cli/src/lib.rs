//! What the `rotq` command line is made of: the file commands, the format evaluation
//! (`eval`), the benchmarks against the peers (`bench`), the heatmaps, the activation dumps.
//! None of it is part of the engine library (`rotq`), so that an engine depending on rotq
//! compiles none of this crate's dependencies (clap, plotters, png, indicatif).

pub mod activations;
pub mod bench;
pub mod bench_cuda;
pub mod checkpoint;
pub mod eval;
pub mod eval_backend;
pub mod eval_grid;
pub mod eval_model;
pub mod files;
pub mod heatmap;
pub mod io;
pub mod npy;
pub mod oracle_check;

use std::path::PathBuf;

/// Errors of the tools: the engine's, plus files, plots and options.
///
/// ```
/// let err = rotq_cli::io::read_f32(std::path::Path::new("/no/such/file.f32")).unwrap_err();
/// assert!(err.to_string().starts_with("/no/such/file.f32: "));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The engine library refused or failed (bad input, checkpoint, CUDA).
    #[error(transparent)]
    Engine(#[from] rotq::Error),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file, as the user named it.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// Input data that does not fit the request (lengths, sizes).
    #[error("{0}")]
    Input(String),
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
    /// A measurement could not be taken (the timed call or the clock failed).
    #[error("timing: {0}")]
    Timing(#[from] rotq_autotune::timing::TimingError),
    /// A heatmap could not be drawn or encoded.
    #[error("heatmap {}: {reason}", path.display())]
    Plot {
        /// The PNG being made.
        path: PathBuf,
        /// What the plotting or encoding library said.
        reason: String,
    },
}

impl From<rotq_reference::Error> for Error {
    fn from(e: rotq_reference::Error) -> Self {
        Self::Engine(e.into())
    }
}

impl From<rotq_cuda::CudaError> for Error {
    fn from(e: rotq_cuda::CudaError) -> Self {
        Self::Engine(e.into())
    }
}
