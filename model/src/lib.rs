//! A minimal model runner for rotq's end-to-end evaluation (`rotq eval --model`): it reads a
//! GGUF file, tokenizes text with the file's own vocabulary, and runs the llama forward pass
//! on the CPU with every layer's attention going through [`rotq::cache::RotatedKvCache`],
//! exactly as an engine would call it. It is a tool, not part of the engine library: an engine
//! that depends on `rotq` compiles none of it.

mod cublas;
pub mod gguf;
pub mod grid;
pub mod llama;
pub mod load;
pub mod perplexity;
pub mod plan;
pub mod shift;
pub mod tokenizer;

/// What can go wrong when loading or running a model.
///
/// ```
/// let err = rotq_model::llama::Matrix::new(2, 2, vec![]).unwrap_err();
/// assert!(err.to_string().contains("2 x 2"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The engine library refused a cache or an attention call.
    #[error(transparent)]
    Engine(#[from] rotq::Error),
    /// Weights or a configuration whose shapes the runner cannot use.
    #[error("{0}")]
    Shape(String),
    /// A GGUF file that cannot be read.
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    /// The GPU that runs the matrix products failed (cuBLAS missing, out of memory, a call).
    #[error("GPU: {0}")]
    Gpu(String),
    /// A readable model file the runner cannot run (architecture, shapes, head dimension).
    #[error("{}: {reason}", path.display())]
    Model {
        /// The file.
        path: std::path::PathBuf,
        /// What the runner cannot do with it.
        reason: String,
    },
}
