//! Reading the header, metadata and tensor table of a GGUF file from any `Read + Seek`.
//!
//! The file is untrusted: every length and count is checked against the bytes left in the file
//! before anything is allocated for it, every size and offset is computed with checked
//! arithmetic, and every failure is a [`GgufError`] that says where in the file it happened.

use super::error::{ErrorKind, GgufError};
use super::ggml_type::GgmlType;
use super::{TensorInfo, Value};
use std::collections::HashMap;
use std::io::{ErrorKind as IoKind, Read, Seek, SeekFrom};
use std::path::Path;

/// Arrays of arrays deeper than this are refused (GGUF writers produce depth 1).
pub(super) const MAX_DEPTH: usize = 4;
/// The most array elements the metadata may hold in all (each takes 32 bytes or more in memory,
/// whatever it took in the file): 16 Mi, a hundred times a large vocabulary's tokens, merges
/// and scores, and about 0.5 GiB in memory.
pub(super) const MAX_VALUES: u64 = 1 << 24;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// ggml's `GGML_MAX_NAME` less the terminating NUL.
const MAX_NAME: u64 = 63;
/// The fewest bytes one metadata entry takes: key length, type, a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// The fewest bytes one tensor entry takes: name length, dim count, one dim, type, offset.
const MIN_TENSOR_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// What the parser found, before [`super::Gguf`] wraps it.
pub(super) struct Parsed {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub data_offset: u64,
    pub alignment: u64,
}

/// A reader that knows its position, the file's length and where in the file it is.
struct Src<'p, R> {
    r: R,
    pos: u64,
    len: u64,
    path: &'p Path,
    section: &'static str,
    item: String,
    /// Array elements read so far (bounded by [`MAX_VALUES`]).
    values: u64,
}

impl<R: Read> Src<'_, R> {
    fn at(&self, field: &str) -> String {
        if self.item.is_empty() {
            format!("{} ({field})", self.section)
        } else {
            format!("{} ({}: {field})", self.section, self.item)
        }
    }

    fn err(&self, kind: ErrorKind) -> GgufError {
        GgufError::new(self.path, kind)
    }

    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn fill(&mut self, buf: &mut [u8], field: &str) -> Result<(), GgufError> {
        if buf.len() as u64 > self.left() {
            return Err(self.err(ErrorKind::Truncated { at: self.at(field) }));
        }
        self.r.read_exact(buf).map_err(|e| {
            let at = self.at(field);
            self.err(match e.kind() {
                IoKind::UnexpectedEof => ErrorKind::Truncated { at },
                _ => ErrorKind::Io { at, source: e },
            })
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.fill(&mut b, field)?;
        Ok(b)
    }

    fn u32(&mut self, field: &str) -> Result<u32, GgufError> {
        self.array(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &str) -> Result<u64, GgufError> {
        self.array(field).map(u64::from_le_bytes)
    }

    /// A count of items at least `min_bytes` each, refused if the rest of the file can't hold
    /// that many.
    fn count(&mut self, min_bytes: u64, field: &str) -> Result<u64, GgufError> {
        let count = self.u64(field)?;
        let left = self.left();
        if count > left / min_bytes.max(1) {
            return Err(self.err(ErrorKind::CountTooLarge {
                at: self.at(field),
                count,
                left,
            }));
        }
        Ok(count)
    }

    fn string(&mut self, field: &str) -> Result<String, GgufError> {
        let n = self.count(1, field)?;
        let mut buf = vec![0u8; n as usize];
        self.fill(&mut buf, field)?;
        String::from_utf8(buf).map_err(|_| self.err(ErrorKind::BadUtf8 { at: self.at(field) }))
    }

    fn value(&mut self, type_id: u32, depth: usize, field: &str) -> Result<Value, GgufError> {
        Ok(match type_id {
            0 => Value::U8(u8::from_le_bytes(self.array(field)?)),
            1 => Value::I8(i8::from_le_bytes(self.array(field)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(field)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(field)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(field)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(field)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(field)?)),
            7 => match self.array::<1>(field)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                byte => {
                    let at = self.at(field);
                    return Err(self.err(ErrorKind::BadBool { at, byte }));
                }
            },
            8 => Value::String(self.string(field)?),
            9 => self.array_value(depth, field)?,
            10 => Value::U64(u64::from_le_bytes(self.array(field)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(field)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(field)?)),
            _ => {
                let at = self.at(field);
                return Err(self.err(ErrorKind::UnknownValueType { at, type_id }));
            }
        })
    }

    fn array_value(&mut self, depth: usize, field: &str) -> Result<Value, GgufError> {
        if depth >= MAX_DEPTH {
            let at = self.at(field);
            return Err(self.err(ErrorKind::TooDeep { at, max: MAX_DEPTH }));
        }
        let elem = self.u32(field)?;
        let min_bytes = match elem {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 4 + 8,
            _ => {
                let at = self.at(field);
                return Err(self.err(ErrorKind::UnknownValueType { at, type_id: elem }));
            }
        };
        let count = self.count(min_bytes, field)?;
        self.values = self.values.saturating_add(count);
        if self.values > MAX_VALUES {
            let at = self.at(field);
            return Err(self.err(ErrorKind::TooManyValues {
                at,
                max: MAX_VALUES,
            }));
        }
        let mut items = Vec::with_capacity(count as usize);
        for _ in 0..count {
            items.push(self.value(elem, depth + 1, field)?);
        }
        Ok(Value::Array(items))
    }
}

/// Parses everything but the tensor data; see [`super::Gguf::parse`].
pub(super) fn parse<R: Read + Seek>(
    mut reader: R,
    path: &Path,
    file_len: u64,
) -> Result<Parsed, GgufError> {
    reader.seek(SeekFrom::Start(0)).map_err(|source| {
        let at = "the start of the file".to_string();
        GgufError::new(path, ErrorKind::Io { at, source })
    })?;
    let mut s = Src {
        r: reader,
        pos: 0,
        len: file_len,
        path,
        section: "header",
        item: String::new(),
        values: 0,
    };
    let magic = s.array::<4>("magic")?;
    if &magic != b"GGUF" {
        return Err(s.err(ErrorKind::BadMagic(magic)));
    }
    let version = s.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(s.err(ErrorKind::UnsupportedVersion(version)));
    }
    let n_tensors = s.count(MIN_TENSOR_BYTES, "tensor count")?;
    let n_kv = s.count(MIN_KV_BYTES, "metadata key count")?;
    let metadata = read_metadata(&mut s, n_kv)?;
    let alignment = alignment(&metadata).map_err(|k| s.err(k))?;
    let tensors = read_tensor_table(&mut s, n_tensors)?;
    let data_offset = s
        .pos
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| s.err(ErrorKind::BadAlignment(alignment.to_string())))?;
    for t in &tensors {
        check_placement(t, data_offset, alignment, file_len).map_err(|reason| {
            let name = t.name.clone();
            s.err(ErrorKind::BadTensor { name, reason })
        })?;
    }
    Ok(Parsed {
        version,
        metadata,
        tensors,
        data_offset,
        alignment,
    })
}

fn read_metadata<R: Read>(s: &mut Src<R>, n_kv: u64) -> Result<Vec<(String, Value)>, GgufError> {
    s.section = "metadata";
    let mut seen = HashMap::new();
    let mut metadata = Vec::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        s.item = format!("key {} of {n_kv}", i + 1);
        let key = s.string("key")?;
        s.item = format!("key {} of {n_kv}: {key}", i + 1);
        let type_id = s.u32("value type")?;
        let value = s.value(type_id, 0, "value")?;
        if seen.insert(key.clone(), ()).is_some() {
            return Err(s.err(ErrorKind::DuplicateKey(key)));
        }
        metadata.push((key, value));
    }
    Ok(metadata)
}

/// `general.alignment`: a power-of-two `u32`, 32 when absent.
fn alignment(metadata: &[(String, Value)]) -> Result<u64, ErrorKind> {
    match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => Ok(32),
        Some((_, Value::U32(a))) if a.is_power_of_two() => Ok(u64::from(*a)),
        Some((_, v)) => Err(ErrorKind::BadAlignment(format!("{v:?}"))),
    }
}

fn read_tensor_table<R: Read>(s: &mut Src<R>, n: u64) -> Result<Vec<TensorInfo>, GgufError> {
    s.section = "tensor table";
    let mut seen = HashMap::new();
    let mut tensors = Vec::with_capacity(n as usize);
    for i in 0..n {
        s.item = format!("tensor {} of {n}", i + 1);
        let name = s.string("name")?;
        s.item = format!("tensor {} of {n}: {name}", i + 1);
        let bad = |s: &Src<R>, name: &str, reason: String| {
            let name = name.to_string();
            Err(s.err(ErrorKind::BadTensor { name, reason }))
        };
        if name.len() as u64 > MAX_NAME {
            return bad(s, &name, format!("name longer than {MAX_NAME} bytes"));
        }
        let n_dims = s.u32("dimension count")?;
        if !(1..=MAX_DIMS).contains(&n_dims) {
            return bad(
                s,
                &name,
                format!("{n_dims} dimensions (expected 1 to {MAX_DIMS})"),
            );
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(s.u64("dimension")?);
        }
        let ggml_type = s.u32("type")?;
        let offset = s.u64("offset")?;
        if seen.insert(name.clone(), ()).is_some() {
            return Err(s.err(ErrorKind::DuplicateTensor(name)));
        }
        let Some(ty) = GgmlType::from_id(ggml_type) else {
            let kind = ErrorKind::UnknownTensorType {
                name,
                type_id: ggml_type,
            };
            return Err(s.err(kind));
        };
        let t = TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        };
        if let Err(reason) = byte_len(&t, ty) {
            return bad(s, &t.name, reason);
        }
        tensors.push(t);
    }
    Ok(tensors)
}

/// The tensor's bytes in the file, or why its shape can't be right.
pub(super) fn byte_len(t: &TensorInfo, ty: GgmlType) -> Result<u64, String> {
    let mut n: u64 = 1;
    for &d in &t.dims {
        n = n
            .checked_mul(d)
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| format!("dimensions {:?} overflow 63 bits", t.dims))?;
    }
    if !t.dims[0].is_multiple_of(ty.block_size) {
        return Err(format!(
            "row length {} is not a multiple of {}'s block of {}",
            t.dims[0], ty.name, ty.block_size
        ));
    }
    (n / ty.block_size)
        .checked_mul(ty.block_bytes)
        .ok_or_else(|| format!("{n} values of {} overflow 64 bits of bytes", ty.name))
}

fn check_placement(
    t: &TensorInfo,
    data_offset: u64,
    alignment: u64,
    len: u64,
) -> Result<(), String> {
    if !t.offset.is_multiple_of(alignment) {
        return Err(format!(
            "data offset {} is not a multiple of the alignment {alignment}",
            t.offset
        ));
    }
    let ty = GgmlType::from_id(t.ggml_type).ok_or("unknown type")?;
    let bytes = byte_len(t, ty)?;
    let end = data_offset
        .checked_add(t.offset)
        .and_then(|start| start.checked_add(bytes));
    match end {
        Some(end) if end <= len => Ok(()),
        _ => Err(format!(
            "data ({bytes} bytes at offset {} after the data section's start {data_offset}) \
             runs past the end of the file ({len} bytes)",
            t.offset
        )),
    }
}
