//! The one error type of rotq: a variant per class of bad input.

/// Everything the oracle (and, later, every kernel) can reject.
///
/// Library code never panics on user input: it returns one of these.
///
/// ```
/// use rotq_reference::{Error, Rotation};
/// let err = Rotation::hadamard(6).unwrap_err();
/// assert!(matches!(err, Error::UnsupportedDim { n: 6, .. }));
/// assert!(err.to_string().contains("6"));
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No Hadamard transform of this size is supported.
    #[error("unsupported dimension {n} for {what}: {hint}")]
    UnsupportedDim {
        /// The dimension asked for.
        n: usize,
        /// Which rotation was asked for.
        what: &'static str,
        /// What would be accepted.
        hint: &'static str,
    },
    /// A block-diagonal rotation whose block is not a power of two dividing the dimension.
    #[error(
        "block size {block} must be a power of two (at most 32768) that divides the dimension {n}"
    )]
    InvalidBlock {
        /// The dimension.
        n: usize,
        /// The block size asked for.
        block: usize,
    },
    /// An explicit rotation matrix that is not square.
    #[error("rotation matrix must be square, got {rows}x{cols}")]
    NotSquare {
        /// Rows of the matrix.
        rows: usize,
        /// Columns of the matrix.
        cols: usize,
    },
    /// An explicit rotation matrix that is not orthogonal (or holds NaN/Inf).
    #[error(
        "rotation matrix is not orthogonal: max |R*R^T - I| = {deviation:e} exceeds {tolerance:e}"
    )]
    NotOrthogonal {
        /// The largest entry of |R·Rᵀ − I| (NaN if R holds NaN/Inf).
        deviation: f64,
        /// The largest accepted.
        tolerance: f64,
    },
    /// A buffer or vector of the wrong length.
    #[error("{what}: expected length {expected}, got {actual}")]
    LengthMismatch {
        /// Which argument.
        what: &'static str,
        /// The length required.
        expected: usize,
        /// The length given.
        actual: usize,
    },
    /// A row whose length is not a whole number of the format's blocks.
    #[error("row length {row_len} is not a positive multiple of the {format} block size {block}")]
    RowNotMultipleOfBlock {
        /// The format's name.
        format: &'static str,
        /// The row length given.
        row_len: usize,
        /// The format's block size.
        block: usize,
    },
    /// A byte buffer that is not a whole number of encoded rows.
    #[error("{actual} bytes are not a whole number of {format} rows of {row_bytes} bytes")]
    TruncatedBuffer {
        /// The format's name.
        format: &'static str,
        /// Bytes per encoded row.
        row_bytes: usize,
        /// Bytes given.
        actual: usize,
    },
    /// A format name that the registry does not know.
    #[error("unknown format `{0}` (known: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl, q6_0, int4, fp8_e4m3, tq2, tq3, tq4, tq2_qjl, tq3_qjl, tq4_qjl)")]
    UnknownFormat(String),
    /// A rotation spec that does not parse.
    #[error("unknown rotation `{0}` (expected none, hadamard, randomized:SEED or block:B)")]
    UnknownRotation(String),
    /// Tensors whose shapes do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A parameter outside its domain.
    #[error("invalid {name}: {reason}")]
    InvalidParameter {
        /// The parameter's name.
        name: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// A size computation that would overflow `usize`.
    #[error("size overflow computing {0}")]
    Overflow(&'static str),
}

/// Shorthand for `Result<T, rotq_reference::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
