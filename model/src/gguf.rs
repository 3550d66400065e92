//! A reader of GGUF files (versions 2 and 3), the format llama.cpp stores models in: the
//! metadata (hyperparameters, the tokenizer's vocabulary) and the tensor table come in when
//! the file is opened; a tensor's bytes are read, and dequantized to f32 through rotq's own
//! format registry ([`rotq_reference::KvFormat`]), only when asked for.
//!
//! The file is untrusted input: a malformed one is a [`GgufError`] that names the file and
//! what is wrong, never a panic, and nothing is allocated for a length or count before it is
//! checked against the bytes left in the file.
//!
//! ```
//! use rotq_model::gguf::{Gguf, Value};
//! use std::{io::Cursor, path::Path};
//! // A GGUF v3 file with one metadata key and no tensors.
//! let mut f = b"GGUF".to_vec();
//! f.extend(3u32.to_le_bytes()); // version
//! f.extend(0u64.to_le_bytes()); // tensors
//! f.extend(1u64.to_le_bytes()); // metadata keys
//! f.extend(17u64.to_le_bytes()); // key length
//! f.extend(b"llama.block_count");
//! f.extend(4u32.to_le_bytes()); // type: u32
//! f.extend(30u32.to_le_bytes());
//! let g = Gguf::parse(Cursor::new(&f), Path::new("tiny.gguf"), f.len() as u64).unwrap();
//! assert_eq!(g.u64("llama.block_count").unwrap(), 30);
//! assert_eq!(g.get("llama.block_count"), Some(&Value::U32(30)));
//! assert!(g.tensors().is_empty());
//! ```

mod error;
mod ggml_type;
mod parse;
mod write;

pub use error::{ErrorKind, GgufError};
pub use ggml_type::GgmlType;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// A GGUF metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `uint8`.
    U8(u8),
    /// `int8`.
    I8(i8),
    /// `uint16`.
    U16(u16),
    /// `int16`.
    I16(i16),
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `uint64`.
    U64(u64),
    /// `int64`.
    I64(i64),
    /// `float32`.
    F32(f32),
    /// `float64`.
    F64(f64),
    /// `bool`.
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array (GGUF arrays hold one element type; nested arrays are arrays of arrays).
    Array(Vec<Value>),
}

impl Value {
    /// The GGUF name of the value's type, for messages (`u32`, `string`, `array`, …).
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }

    /// The value as a `u64` if it is an integer of any width that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
}

/// One entry of the tensor table: where a tensor's bytes are and how to read them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Its shape in ggml order: `dims[0]` varies fastest (the row length).
    pub dims: Vec<u64>,
    /// ggml's type id (`GGML_TYPE_Q4_1` = 3, …); see [`GgmlType`].
    pub ggml_type: u32,
    /// Where its bytes start, relative to the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The number of values (the product of `dims`; the parser checked it fits 63 bits).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |n, &d| n.saturating_mul(d))
    }

    /// ggml's name of the tensor's type (`q4_1`), or `"unknown"`.
    pub fn type_name(&self) -> &'static str {
        GgmlType::from_id(self.ggml_type).map_or("unknown", |t| t.name)
    }
}

/// An open GGUF file: its metadata and tensor table (the tensor data stays on disk).
///
/// Build one with [`Gguf::open`] (a file) or [`Gguf::parse`] (any reader); see the
/// [module documentation](self) for an example.
#[derive(Debug)]
pub struct Gguf {
    path: PathBuf,
    version: u32,
    metadata: Vec<(String, Value)>,
    keys: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    names: HashMap<String, usize>,
    data_offset: u64,
    alignment: u64,
}

/// How many bytes of a tensor are read at a time (rounded down to whole blocks).
const CHUNK_BYTES: usize = 1 << 20;

impl Gguf {
    /// Opens the GGUF file at `path` and reads its header, metadata and tensor table (not the
    /// tensor data, which [`Gguf::tensor_f32`] reads).
    ///
    /// ```no_run
    /// let g = rotq_model::gguf::Gguf::open("model.gguf".as_ref())?;
    /// println!("{} layers", g.u64("llama.block_count")?);
    /// # Ok::<(), rotq_model::gguf::GgufError>(())
    /// ```
    pub fn open(path: &Path) -> Result<Gguf, GgufError> {
        let io = |at: &str, source| {
            let at = at.to_string();
            GgufError::new(path, ErrorKind::Io { at, source })
        };
        let file = File::open(path).map_err(|e| io("the file", e))?;
        let len = file
            .metadata()
            .map_err(|e| io("the file's length", e))?
            .len();
        Gguf::parse(BufReader::new(file), path, len)
    }

    /// Reads the header, metadata and tensor table from `reader`, a file of `file_len` bytes
    /// (from its start, whatever its position); `path` names it in messages and is where
    /// [`Gguf::tensor_f32`] reads the data from. Tests and fuzzers parse in-memory files with
    /// it (see the [module documentation](self)).
    pub fn parse<R: Read + Seek>(reader: R, path: &Path, file_len: u64) -> Result<Gguf, GgufError> {
        let p = parse::parse(reader, path, file_len)?;
        let index = |names: Vec<&String>| {
            names
                .into_iter()
                .enumerate()
                .map(|(i, k)| (k.clone(), i))
                .collect()
        };
        Ok(Gguf {
            path: path.to_path_buf(),
            version: p.version,
            keys: index(p.metadata.iter().map(|(k, _)| k).collect()),
            names: index(p.tensors.iter().map(|t| &t.name).collect()),
            metadata: p.metadata,
            tensors: p.tensors,
            data_offset: p.data_offset,
            alignment: p.alignment,
        })
    }

    /// The file's path, as given to [`Gguf::open`] or [`Gguf::parse`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Every metadata key and value, in the file's order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// Where the data section starts in the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The data section's alignment (`general.alignment`, 32 when absent).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    fn err(&self, kind: ErrorKind) -> GgufError {
        GgufError::new(&self.path, kind)
    }

    /// The value of metadata key `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.keys.get(key).map(|&i| &self.metadata[i].1)
    }

    fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key)
            .ok_or_else(|| self.err(ErrorKind::MissingKey(key.to_string())))
    }

    fn wrong_type(&self, key: &str, expected: &'static str, found: &Value) -> GgufError {
        let (key, found) = (key.to_string(), found.type_name().to_string());
        self.err(ErrorKind::WrongType {
            key,
            expected,
            found,
        })
    }

    /// Metadata key `key` as a `u64`: any integer type, if not negative.
    pub fn u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| match v {
            Value::I8(_) | Value::I16(_) | Value::I32(_) | Value::I64(_) => {
                let (key, value) = (key.to_string(), format!("{v:?}"));
                self.err(ErrorKind::OutOfRange {
                    key,
                    value,
                    expected: "u64",
                })
            }
            _ => self.wrong_type(key, "a non-negative integer", v),
        })
    }

    /// Metadata key `key` as a `u32`: any integer type, if it fits.
    pub fn u32(&self, key: &str) -> Result<u32, GgufError> {
        let v = self.u64(key)?;
        u32::try_from(v).map_err(|_| {
            self.err(ErrorKind::OutOfRange {
                key: key.to_string(),
                value: v.to_string(),
                expected: "u32",
            })
        })
    }

    /// Metadata key `key` as an `f32`: an `f32`, or an `f64` rounded to `f32`.
    pub fn f32(&self, key: &str) -> Result<f32, GgufError> {
        match self.require(key)? {
            Value::F32(v) => Ok(*v),
            Value::F64(v) => Ok(*v as f32),
            v => Err(self.wrong_type(key, "f32", v)),
        }
    }

    /// Metadata key `key` as a string.
    pub fn str(&self, key: &str) -> Result<&str, GgufError> {
        match self.require(key)? {
            Value::String(s) => Ok(s),
            v => Err(self.wrong_type(key, "string", v)),
        }
    }

    /// Metadata key `key` as a boolean.
    pub fn bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.require(key)? {
            Value::Bool(b) => Ok(*b),
            v => Err(self.wrong_type(key, "bool", v)),
        }
    }

    /// Metadata key `key` as an array of strings (a vocabulary, merges).
    pub fn str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let v = self.require(key)?;
        let Value::Array(items) = v else {
            return Err(self.wrong_type(key, "array of strings", v));
        };
        items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.as_str()),
                other => Err(self.wrong_type(key, "array of strings", other)),
            })
            .collect()
    }

    /// The tensor table, in the file's order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.names
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| self.err(ErrorKind::NoTensor(name.to_string())))
    }

    /// Reads tensor `name` and dequantizes it to f32 (row-major, `dims[0]` fastest), through
    /// rotq's format registry. Memory: the result plus a chunk of at most 1 MiB.
    ///
    /// The types are f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0 and iq4_nl; any other is an
    /// [`ErrorKind::UnsupportedTensorType`].
    ///
    /// ```no_run
    /// let g = rotq_model::gguf::Gguf::open("model.gguf".as_ref())?;
    /// let norm = g.tensor_f32("blk.0.attn_norm.weight")?;
    /// # Ok::<(), rotq_model::gguf::GgufError>(())
    /// ```
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let file = File::open(&self.path).map_err(|source| {
            let at = format!("tensor {name:?}");
            self.err(ErrorKind::Io { at, source })
        })?;
        self.read_tensor_f32(file, name)
    }

    /// [`Gguf::tensor_f32`] reading from `reader` (the same file's bytes) instead of opening
    /// [`Gguf::path`]: for files parsed from memory.
    pub fn read_tensor_f32<R: Read + Seek>(
        &self,
        mut reader: R,
        name: &str,
    ) -> Result<Vec<f32>, GgufError> {
        let t = self.tensor(name)?;
        let ty = GgmlType::from_id(t.ggml_type).ok_or_else(|| {
            let (name, type_id) = (name.to_string(), t.ggml_type);
            self.err(ErrorKind::UnknownTensorType { name, type_id })
        })?;
        let format = ty.kv_format().ok_or_else(|| {
            self.err(ErrorKind::UnsupportedTensorType {
                name: name.to_string(),
                type_id: t.ggml_type,
                type_name: ty.name,
            })
        })?;
        let bad = |reason: String| {
            let name = name.to_string();
            self.err(ErrorKind::BadTensor { name, reason })
        };
        let bytes = parse::byte_len(t, ty).map_err(bad)?;
        let n = usize::try_from(t.n_elements())
            .map_err(|_| bad("too many values for this machine".into()))?;
        let bytes = usize::try_from(bytes).map_err(|_| bad("too large for this machine".into()))?;
        let mut out = vec![0.0f32; n];
        if n == 0 {
            return Ok(out);
        }
        let io = |source| {
            let at = format!("tensor {name:?} data");
            self.err(ErrorKind::Io { at, source })
        };
        let start = (self.data_offset.checked_add(t.offset))
            .ok_or_else(|| bad("data offset overflows".into()))?;
        reader.seek(SeekFrom::Start(start)).map_err(io)?;
        let (block_size, block_bytes) = (format.block_size(), format.block_bytes());
        let chunk_blocks = (CHUNK_BYTES / block_bytes).max(1);
        let mut buf = vec![0u8; bytes.min(chunk_blocks * block_bytes)];
        for out in out.chunks_mut(chunk_blocks * block_size) {
            let buf = &mut buf[..out.len() / block_size * block_bytes];
            reader.read_exact(buf).map_err(io)?;
            format.dequantize_into(buf, out).map_err(|source| {
                let name = name.to_string();
                self.err(ErrorKind::Format { name, source })
            })?;
        }
        Ok(out)
    }
}
