//! NumPy `.npy` files: a small, careful reader and writer for the arrays `rotq eval` takes
//! (little-endian f32, f16 or f64, C order), with a typed error for every way a file can be
//! wrong.
//!
//! The format (NumPy's `NEP 1`): the magic `\x93NUMPY`, a major and minor version byte, the
//! header length (u16 little-endian in version 1, u32 in versions 2 and 3), then the header, a
//! Python dict literal such as `{'descr': '<f4', 'fortran_order': False, 'shape': (256, 2, 64), }`
//! padded with spaces and ended by a newline, then the values back to back. Anything else
//! (another dtype or byte order, Fortran order, object arrays, a file shorter or longer than
//! its shape says) is an [`NpyError`].
//!
//! **Why not a crate.** The maintained readers (`npyz` 0.9, which reads f16, and
//! `ndarray-npy` 0.10) parse the header with `py_literal` 0.4, a PEG grammar without
//! memoization that parses every nested list, tuple or dict twice: a header whose `descr`
//! nests 22 lists deep (a 100-byte file) takes 26 s to be refused, and each level doubles
//! that, so a small corrupt file would hang `rotq eval`. `npyz` also panics with overflow
//! checks on (debug builds) when the shape's element count overflows `u64`, allocates the
//! header length a file claims (up to 4 GiB) before reading it, and rejects Python 2's `3L`.
//! Guarding against all of that would take the header scanning this module does anyway, so
//! the header is read here, in one pass, by a cursor that never backtracks; the tests
//! `deeply_nested_headers_are_refused_without_backtracking` and
//! `absurd_shapes_are_refused_before_allocating` (cli/tests/npy.rs) hold it there.
//!
//! ```
//! use rotq_cli::npy::{encode, parse, NpyDtype};
//! let bytes = encode(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], NpyDtype::F16).unwrap();
//! let a = parse(&bytes).unwrap();
//! assert_eq!(a.shape, vec![2, 3]);
//! assert_eq!(a.dtype, NpyDtype::F16);
//! assert_eq!(a.data[5], 6.0);
//! ```

use crate::Error;
use half::f16;
use ndarray::Array3;
use std::fmt;
use std::path::Path;

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// The element types read (all little-endian); f16 and f64 values become f32.
///
/// ```
/// assert_eq!(rotq_cli::npy::NpyDtype::F16.descr(), "<f2");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpyDtype {
    /// `<f2`, IEEE binary16.
    F16,
    /// `<f4`, IEEE binary32.
    F32,
    /// `<f8`, IEEE binary64 (rounded to f32 on reading).
    F64,
}

impl NpyDtype {
    /// NumPy's `descr` string.
    pub fn descr(self) -> &'static str {
        match self {
            NpyDtype::F16 => "<f2",
            NpyDtype::F32 => "<f4",
            NpyDtype::F64 => "<f8",
        }
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            NpyDtype::F16 => 2,
            NpyDtype::F32 => 4,
            NpyDtype::F64 => 8,
        }
    }

    fn from_descr(descr: &str) -> Option<Self> {
        // `=` (native) is little-endian on every machine rotq runs on; `|` is only for 1-byte
        // types, never a float.
        match descr {
            "<f2" | "=f2" => Some(NpyDtype::F16),
            "<f4" | "=f4" => Some(NpyDtype::F32),
            "<f8" | "=f8" => Some(NpyDtype::F64),
            _ => None,
        }
    }
}

impl fmt::Display for NpyDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.descr())
    }
}

/// Everything that can be wrong with a `.npy` file (the facade's [`Error::Npy`] adds the path).
///
/// ```
/// use rotq_cli::npy::{parse, NpyError};
/// assert!(matches!(parse(b"PK\x03\x04 a zip file"), Err(NpyError::NotNpy)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NpyError {
    /// The file does not start with `\x93NUMPY`.
    #[error("not a .npy file (it does not start with \\x93NUMPY)")]
    NotNpy,
    /// A format version other than 1.0, 2.0 or 3.0.
    #[error("unsupported .npy version {major}.{minor} (1.0, 2.0 and 3.0 are read)")]
    UnsupportedVersion {
        /// Major version byte.
        major: u8,
        /// Minor version byte.
        minor: u8,
    },
    /// The file ends before its header or its values do.
    #[error("truncated: {what} needs {needed} bytes, the file has {found}")]
    Truncated {
        /// What was being read (`the header`, `the values of shape [..]`).
        what: String,
        /// Bytes needed.
        needed: usize,
        /// Bytes there.
        found: usize,
    },
    /// More bytes after the values than the shape accounts for.
    #[error("shape {shape:?} of {dtype} takes {expected} bytes of values, the file has {found}")]
    ShapeMismatch {
        /// The header's shape.
        shape: Vec<usize>,
        /// The header's dtype.
        dtype: NpyDtype,
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes after the header.
        found: usize,
    },
    /// The header is not the dict NumPy writes.
    #[error("bad header: {0}")]
    BadHeader(String),
    /// A dtype other than little-endian f16, f32 or f64.
    #[error("dtype {0} is not read: want little-endian f32 ('<f4'), f16 ('<f2') or f64 ('<f8')")]
    UnsupportedDtype(String),
    /// Column-major data (`fortran_order: True`).
    #[error(
        "Fortran (column-major) order is not read: save a C-order array (np.ascontiguousarray)"
    )]
    FortranOrder,
    /// An array of another rank than the reader needs.
    #[error("shape {shape:?} has rank {}, want {want}", shape.len())]
    Rank {
        /// The header's shape.
        shape: Vec<usize>,
        /// The rank wanted.
        want: usize,
    },
}

/// A parsed array: its shape, its stored dtype and its values as f32 (C order).
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The dtype the file stored.
    pub dtype: NpyDtype,
    /// The values in C order.
    pub data: Vec<f32>,
}

/// What a `.npy` header says: the array's shape and dtype, and where its values start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NpyHeader {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The dtype of the values.
    pub dtype: NpyDtype,
    /// Bytes before the values: magic, version, header length and header.
    pub data_start: usize,
}

/// The longest preamble: magic (6), version (2) and a 4-byte header length.
const PREAMBLE: usize = 12;

/// Where the header of a file starting with `head` lies: its start, its end (the values' start)
/// and whether it is UTF-8 (version 3) rather than ASCII. `head` holds the first
/// `min(PREAMBLE, file_len)` bytes at least; errors count `file_len` bytes.
fn header_span(head: &[u8], file_len: usize) -> Result<(usize, usize, bool), NpyError> {
    if head.len() < MAGIC.len() || &head[..MAGIC.len()] != MAGIC {
        return Err(NpyError::NotNpy);
    }
    let truncated = |what: &str, needed: usize| NpyError::Truncated {
        what: what.into(),
        needed,
        found: file_len,
    };
    let (major, minor) = match head.get(6..8) {
        Some(v) => (v[0], v[1]),
        None => return Err(truncated("the version", 8)),
    };
    let (len_bytes, utf8) = match (major, minor) {
        (1, 0) => (2, false),
        (2, 0) => (4, false),
        (3, 0) => (4, true),
        _ => return Err(NpyError::UnsupportedVersion { major, minor }),
    };
    let start = 8 + len_bytes;
    let len_field = head
        .get(8..start)
        .ok_or_else(|| truncated("the header length", start))?;
    let header_len = len_field
        .iter()
        .rev()
        .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
    let data_start = start
        .checked_add(header_len)
        .ok_or_else(|| NpyError::BadHeader("header length overflows".into()))?;
    Ok((start, data_start, utf8))
}

/// Parses the header of a file of `file_len` bytes that starts with `head` (which holds the
/// whole header, or the whole file), and checks that the file holds exactly the values its
/// shape says, before any of them is read.
fn parse_header(head: &[u8], file_len: usize) -> Result<NpyHeader, NpyError> {
    let (start, data_start, utf8) = header_span(head, file_len)?;
    let truncated = |what: &str, needed: usize| NpyError::Truncated {
        what: what.into(),
        needed,
        found: file_len,
    };
    let header = head
        .get(start..data_start)
        .ok_or_else(|| truncated("the header", data_start))?;
    let header = if utf8 {
        std::str::from_utf8(header).map_err(|_| NpyError::BadHeader("not UTF-8".into()))?
    } else {
        if !header.is_ascii() {
            return Err(NpyError::BadHeader("not ASCII".into()));
        }
        std::str::from_utf8(header).map_err(|_| NpyError::BadHeader("not ASCII".into()))?
    };
    let h = Header::parse(header)?;
    let count = h
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|n| n.checked_mul(h.dtype.size()))
        .ok_or_else(|| NpyError::BadHeader(format!("shape {:?} overflows", h.shape)))?;
    let values = file_len.saturating_sub(data_start);
    if values < count {
        return Err(truncated(
            &format!("the values of shape {:?} ({})", h.shape, h.dtype),
            data_start.saturating_add(count),
        ));
    }
    if values > count {
        return Err(NpyError::ShapeMismatch {
            shape: h.shape,
            dtype: h.dtype,
            expected: count,
            found: values,
        });
    }
    Ok(NpyHeader {
        shape: h.shape,
        dtype: h.dtype,
        data_start,
    })
}

/// Parses the bytes of a `.npy` file.
///
/// ```
/// use rotq_cli::npy::{encode, parse, NpyDtype, NpyError};
/// let mut bytes = encode(&[4], &[1.0, 2.0, 3.0, 4.0], NpyDtype::F32).unwrap();
/// bytes.pop();
/// assert!(matches!(parse(&bytes), Err(NpyError::Truncated { .. })));
/// ```
pub fn parse(bytes: &[u8]) -> Result<NpyArray, NpyError> {
    let h = parse_header(bytes, bytes.len())?;
    let values = &bytes[h.data_start..];
    let data = match h.dtype {
        NpyDtype::F16 => values
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        NpyDtype::F32 => crate::io::decode_f32(values).collect(),
        NpyDtype::F64 => values
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                f64::from_le_bytes(b) as f32
            })
            .collect(),
    };
    Ok(NpyArray {
        shape: h.shape,
        dtype: h.dtype,
        data,
    })
}

/// The bytes of a version 1.0 `.npy` file of `shape` holding `data` (C order) stored as
/// `dtype` (f16 rounds to nearest even; f64 widens exactly).
///
/// ```
/// use rotq_cli::npy::{encode, NpyDtype};
/// let b = encode(&[1, 2], &[0.5, 1.5], NpyDtype::F32).unwrap();
/// assert_eq!(b.len() % 64, 8 % 64); // a 64-byte aligned header, then 2 x 4 bytes
/// assert!(encode(&[3], &[0.5], NpyDtype::F32).is_err());
/// ```
pub fn encode(shape: &[usize], data: &[f32], dtype: NpyDtype) -> Result<Vec<u8>, NpyError> {
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| NpyError::BadHeader(format!("shape {shape:?} overflows")))?;
    if count != data.len() {
        return Err(NpyError::ShapeMismatch {
            shape: shape.to_vec(),
            dtype,
            expected: count.saturating_mul(dtype.size()),
            found: data.len().saturating_mul(dtype.size()),
        });
    }
    let dims = match shape {
        [one] => format!("({one},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {dims}, }}",
        dtype.descr()
    );
    // Pad with spaces so that magic + version + length + header + '\n' is a multiple of 64.
    let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let header_len = u16::try_from(header.len())
        .map_err(|_| NpyError::BadHeader(format!("a header of {} bytes", header.len())))?;
    let mut out = Vec::with_capacity(10 + header.len() + count * dtype.size());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for &v in data {
        match dtype {
            NpyDtype::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
            NpyDtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
            NpyDtype::F64 => out.extend_from_slice(&f64::from(v).to_le_bytes()),
        }
    }
    Ok(out)
}

/// Reads the `.npy` file at `path`; errors name the file.
///
/// ```
/// let e = rotq_cli::npy::read(std::path::Path::new("/no/such.npy")).unwrap_err();
/// assert!(e.to_string().starts_with("/no/such.npy"));
/// ```
pub fn read(path: &Path) -> Result<NpyArray, Error> {
    let bytes = crate::io::read_bytes(path)?;
    parse(&bytes).map_err(|source| Error::Npy {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads the header of the `.npy` file at `path`, and only the header: the shape and dtype of
/// a file of any size, checked as [`parse`] checks them (the file's length included) before
/// any value is read. Errors name the file.
///
/// ```
/// use rotq_cli::npy::{read_header, write, NpyDtype};
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("k.npy");
/// write(&path, &[2, 1, 2], &[1.0, 2.0, 3.0, 4.0], NpyDtype::F16).unwrap();
/// let h = read_header(&path).unwrap();
/// assert_eq!((h.shape, h.dtype), (vec![2, 1, 2], NpyDtype::F16));
/// assert_eq!(std::fs::metadata(&path).unwrap().len(), h.data_start as u64 + 8);
/// ```
pub fn read_header(path: &Path) -> Result<NpyHeader, Error> {
    use std::io::Read;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let npy = |source| Error::Npy {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let file_len = usize::try_from(file_len).unwrap_or(usize::MAX);
    let mut head = Vec::new();
    let mut read_to = |head: &mut Vec<u8>, end: usize| {
        let more = end.saturating_sub(head.len()) as u64;
        (&mut file).take(more).read_to_end(head).map_err(io)
    };
    read_to(&mut head, PREAMBLE)?;
    let (_, data_start, _) = header_span(&head, file_len).map_err(npy)?;
    read_to(&mut head, data_start)?;
    parse_header(&head, file_len).map_err(npy)
}

/// Reads a 3-D array (`[tokens, heads, dim]` for `rotq eval`); another rank is
/// [`NpyError::Rank`].
///
/// ```
/// use rotq_cli::npy::{read3, write, NpyDtype};
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("k.npy");
/// write(&path, &[2, 1, 2], &[1.0, 2.0, 3.0, 4.0], NpyDtype::F32).unwrap();
/// assert_eq!(read3(&path).unwrap()[[1, 0, 1]], 4.0);
/// ```
pub fn read3(path: &Path) -> Result<Array3<f32>, Error> {
    let a = read(path)?;
    let err = |source| Error::Npy {
        path: path.to_path_buf(),
        source,
    };
    match a.shape[..] {
        [n, h, d] => Array3::from_shape_vec((n, h, d), a.data)
            .map_err(|e| err(NpyError::BadHeader(e.to_string()))),
        _ => Err(err(NpyError::Rank {
            shape: a.shape,
            want: 3,
        })),
    }
}

/// Writes `data` of `shape` as a `.npy` file of `dtype`, atomically.
pub fn write(path: &Path, shape: &[usize], data: &[f32], dtype: NpyDtype) -> Result<(), Error> {
    let bytes = encode(shape, data, dtype).map_err(|source| Error::Npy {
        path: path.to_path_buf(),
        source,
    })?;
    crate::io::write_atomic(path, &bytes)
}

/// The three keys of a header.
struct Header {
    dtype: NpyDtype,
    shape: Vec<usize>,
}

impl Header {
    fn parse(text: &str) -> Result<Self, NpyError> {
        let mut p = Literal {
            s: text.as_bytes(),
            at: 0,
        };
        let (mut descr, mut fortran, mut shape) = (None, None, None);
        p.expect(b'{')?;
        loop {
            p.skip_space();
            if p.eat(b'}') {
                break;
            }
            let key = p.string()?;
            p.expect(b':')?;
            p.skip_space();
            match key.as_str() {
                "descr" => {
                    if p.peek() != Some(b'\'') && p.peek() != Some(b'"') {
                        // A list: a structured dtype.
                        return Err(NpyError::UnsupportedDtype(
                            "a structured (record) dtype".into(),
                        ));
                    }
                    descr = Some(p.string()?);
                }
                "fortran_order" => fortran = Some(p.boolean()?),
                "shape" => shape = Some(p.tuple()?),
                other => {
                    return Err(NpyError::BadHeader(format!("unexpected key '{other}'")));
                }
            }
            p.skip_space();
            if !p.eat(b',') {
                p.expect(b'}')?;
                break;
            }
        }
        p.skip_space();
        if p.at != p.s.len() {
            return Err(NpyError::BadHeader("text after the dict".into()));
        }
        let descr = descr.ok_or_else(|| NpyError::BadHeader("no 'descr'".into()))?;
        let fortran = fortran.ok_or_else(|| NpyError::BadHeader("no 'fortran_order'".into()))?;
        let shape = shape.ok_or_else(|| NpyError::BadHeader("no 'shape'".into()))?;
        let dtype = NpyDtype::from_descr(&descr).ok_or(NpyError::UnsupportedDtype(descr))?;
        if fortran {
            return Err(NpyError::FortranOrder);
        }
        Ok(Header { dtype, shape })
    }
}

/// A cursor over the few Python literals a header holds.
struct Literal<'a> {
    s: &'a [u8],
    at: usize,
}

impl Literal<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn skip_space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), NpyError> {
        self.skip_space();
        if self.eat(c) {
            Ok(())
        } else {
            Err(NpyError::BadHeader(format!(
                "expected '{}' at byte {}",
                c as char, self.at
            )))
        }
    }

    /// A quoted string without escapes (NumPy writes none in these keys and values).
    fn string(&mut self) -> Result<String, NpyError> {
        self.skip_space();
        let quote = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => {
                return Err(NpyError::BadHeader(format!(
                    "expected a quoted string at byte {}",
                    self.at
                )))
            }
        };
        self.at += 1;
        let start = self.at;
        while let Some(c) = self.peek() {
            if c == quote {
                let s = String::from_utf8_lossy(&self.s[start..self.at]).into_owned();
                self.at += 1;
                return Ok(s);
            }
            if c == b'\\' {
                return Err(NpyError::BadHeader("escapes in a string".into()));
            }
            self.at += 1;
        }
        Err(NpyError::BadHeader("an unterminated string".into()))
    }

    fn boolean(&mut self) -> Result<bool, NpyError> {
        for (word, value) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if self.s[self.at..].starts_with(word) {
                self.at += word.len();
                return Ok(value);
            }
        }
        Err(NpyError::BadHeader(format!(
            "expected True or False at byte {}",
            self.at
        )))
    }

    /// `()`, `(n,)`, `(a, b, c)`; Python 2 long suffixes (`3L`) accepted.
    fn tuple(&mut self) -> Result<Vec<usize>, NpyError> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            self.skip_space();
            if self.eat(b')') {
                return Ok(dims);
            }
            let start = self.at;
            while matches!(self.peek(), Some(b'0'..=b'9')) {
                self.at += 1;
            }
            let digits = std::str::from_utf8(&self.s[start..self.at]).unwrap_or("");
            let d: usize = digits.parse().map_err(|_| {
                NpyError::BadHeader(format!("expected a dimension at byte {start}"))
            })?;
            dims.push(d);
            self.eat(b'L');
            self.skip_space();
            if !self.eat(b',') {
                self.expect(b')')?;
                return Ok(dims);
            }
        }
    }
}
