//! The reader's one error type: the file's path plus what is wrong with it, so that every
//! message names the file (`model.gguf: truncated tensor table (tensor 12 of 272: name)`).

use std::path::{Path, PathBuf};

/// Something wrong with a GGUF file or with a question asked of it.
///
/// Every malformed input ends here, never in a panic; the `Display` is one line that starts
/// with the file's path.
///
/// ```
/// use rotq_model::gguf::{ErrorKind, Gguf};
/// use std::{io::Cursor, path::Path};
/// let bytes = b"GGML\x03\0\0\0";
/// let err = Gguf::parse(Cursor::new(bytes), Path::new("x.gguf"), 8).unwrap_err();
/// assert!(matches!(err.kind, ErrorKind::BadMagic(_)));
/// assert!(err.to_string().starts_with("x.gguf: "));
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", path.display())]
pub struct GgufError {
    /// The file the error is about.
    pub path: PathBuf,
    /// What is wrong.
    pub kind: ErrorKind,
}

impl GgufError {
    /// An error about the file at `path`.
    pub fn new(path: &Path, kind: ErrorKind) -> GgufError {
        GgufError {
            path: path.to_path_buf(),
            kind,
        }
    }
}

/// What is wrong, without the file's name (the variants a caller or a test tells apart).
///
/// `at` fields say where in the file, as `section (item: field)`, for example
/// `metadata (key 3 of 33: general.name: value)`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reading the file failed (it vanished, shrank, or the disk failed).
    #[error("cannot read {at}: {source}")]
    Io {
        /// What was being read.
        at: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The first four bytes are not `GGUF`.
    #[error("not a GGUF file (magic {0:02x?}, expected \"GGUF\")")]
    BadMagic([u8; 4]),
    /// A GGUF version other than 2 and 3 (version 1 used 32-bit counts; big-endian files show
    /// a byte-swapped version).
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    /// The file ends inside a field.
    #[error("truncated {at}")]
    Truncated {
        /// The field cut short.
        at: String,
    },
    /// A length or count larger than the bytes left in the file could hold.
    #[error("{at}: {count} is more than the {left} bytes left in the file can hold")]
    CountTooLarge {
        /// The length or count.
        at: String,
        /// Its value.
        count: u64,
        /// Bytes left after it.
        left: u64,
    },
    /// A string that is not UTF-8.
    #[error("{at}: not valid UTF-8")]
    BadUtf8 {
        /// The string.
        at: String,
    },
    /// A metadata value type id outside GGUF's 0..=12.
    #[error("{at}: unknown value type {type_id}")]
    UnknownValueType {
        /// The value.
        at: String,
        /// The type id read.
        type_id: u32,
    },
    /// A boolean byte other than 0 and 1.
    #[error("{at}: boolean byte {byte} is neither 0 nor 1")]
    BadBool {
        /// The value.
        at: String,
        /// The byte read.
        byte: u8,
    },
    /// Arrays of arrays nested deeper than the reader follows.
    #[error("{at}: arrays nested deeper than {max} levels")]
    TooDeep {
        /// The value.
        at: String,
        /// The deepest nesting accepted.
        max: usize,
    },
    /// Metadata arrays holding more elements in all than the reader keeps in memory.
    #[error("{at}: the metadata's arrays hold more than {max} values in all")]
    TooManyValues {
        /// The array that went over.
        at: String,
        /// The most accepted.
        max: u64,
    },
    /// The same metadata key twice.
    #[error("duplicate metadata key {0:?}")]
    DuplicateKey(String),
    /// The same tensor name twice.
    #[error("duplicate tensor name {0:?}")]
    DuplicateTensor(String),
    /// `general.alignment` that is not a power-of-two `u32`.
    #[error("general.alignment {0} is not a power of two")]
    BadAlignment(String),
    /// A tensor whose entry in the table cannot be right.
    #[error("tensor {name:?}: {reason}")]
    BadTensor {
        /// The tensor.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A ggml tensor type id this reader does not know at all.
    #[error("tensor {name:?}: unknown ggml type {type_id}")]
    UnknownTensorType {
        /// The tensor.
        name: String,
        /// Its type id.
        type_id: u32,
    },
    /// A known ggml tensor type that rotq's format registry cannot dequantize.
    #[error("tensor {name:?}: unsupported tensor type {type_name} ({type_id}); supported: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl")]
    UnsupportedTensorType {
        /// The tensor.
        name: String,
        /// Its type id.
        type_id: u32,
        /// ggml's name for the type.
        type_name: &'static str,
    },
    /// No tensor of that name.
    #[error("no tensor named {0:?}")]
    NoTensor(String),
    /// No metadata key of that name.
    #[error("no metadata key {0:?}")]
    MissingKey(String),
    /// A metadata value of another type than asked for.
    #[error("metadata key {key:?} is {found}, expected {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// What was asked for.
        expected: &'static str,
        /// What the file holds.
        found: String,
    },
    /// An integer that does not fit the type asked for.
    #[error("metadata key {key:?}: {value} does not fit {expected}")]
    OutOfRange {
        /// The key.
        key: String,
        /// The value, as text.
        value: String,
        /// The type asked for.
        expected: &'static str,
    },
    /// Dequantizing a tensor's bytes failed in rotq's format registry.
    #[error("tensor {name:?}: {source}")]
    Format {
        /// The tensor.
        name: String,
        /// The registry's error.
        source: rotq_reference::Error,
    },
    /// The vocabulary cannot make a tokenizer.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A tokenizer model or pre-tokenizer this crate does not implement.
    #[error("unsupported tokenizer: model {model:?}, pre-tokenizer {pre:?} (supported: model \"gpt2\" with pre \"smollm\" or \"gpt2\")")]
    UnsupportedTokenizer {
        /// `tokenizer.ggml.model`.
        model: String,
        /// `tokenizer.ggml.pre` (empty when absent).
        pre: String,
    },
}
