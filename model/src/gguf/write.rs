//! Writing a GGUF file back: the same metadata and tensors, or a model cut to its first
//! layers (the real weights in a file small enough for a machine, or a test, that cannot take
//! the whole model). Written in the reader's terms, so that what it writes it reads back equal.

use super::parse::byte_len;
use super::{ErrorKind, GgmlType, Gguf, GgufError, TensorInfo, Value};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};

impl Gguf {
    /// Writes to `out` this model with only its first `n_layers` blocks: every metadata key as
    /// it is but `{arch}.block_count` (set to `n_layers`, its type kept), every tensor but those
    /// of blocks `n_layers` and up (`blk.N.…`), their bytes copied from this file a megabyte at
    /// a time. Returns the bytes written. `n_layers` of 0 or above the model's is refused.
    ///
    /// ```no_run
    /// use rotq_model::gguf::Gguf;
    /// let g = Gguf::open("SmolLM2-135M.gguf".as_ref())?;
    /// let mut out = std::fs::File::create("first-4-layers.gguf").unwrap();
    /// g.write_first_layers(4, &mut out)?;
    /// # Ok::<(), rotq_model::gguf::GgufError>(())
    /// ```
    pub fn write_first_layers(
        &self,
        n_layers: usize,
        out: &mut impl Write,
    ) -> Result<u64, GgufError> {
        let arch = self.str("general.architecture")?.to_string();
        let key = format!("{arch}.block_count");
        let layers = self.u64(&key)?;
        if n_layers == 0 || n_layers as u64 > layers {
            return Err(self.error(ErrorKind::OutOfRange {
                key,
                value: n_layers.to_string(),
                expected: "1 to the model's block count",
            }));
        }
        let kept_block =
            |name: &str| match name.strip_prefix("blk.").and_then(|r| r.split('.').next()) {
                Some(i) => i.parse::<usize>().map_or(true, |i| i < n_layers),
                None => true,
            };
        let metadata: Vec<(String, Value)> = self
            .metadata()
            .iter()
            .map(|(k, v)| {
                let v = if *k == key {
                    match v {
                        Value::U32(_) => Value::U32(n_layers as u32),
                        Value::I32(_) => Value::I32(n_layers as i32),
                        Value::I64(_) => Value::I64(n_layers as i64),
                        _ => Value::U64(n_layers as u64),
                    }
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect();
        let tensors: Vec<&TensorInfo> = self
            .tensors()
            .iter()
            .filter(|t| kept_block(&t.name))
            .collect();
        self.write_with(&metadata, &tensors, out)
    }

    /// Writes `metadata` and `tensors` (entries of this file's table, their bytes read from it)
    /// as a GGUF file of this file's version and alignment.
    fn write_with(
        &self,
        metadata: &[(String, Value)],
        tensors: &[&TensorInfo],
        out: &mut impl Write,
    ) -> Result<u64, GgufError> {
        let align = self.alignment();
        let pad = |n: u64| n.next_multiple_of(align) - n;
        let lens: Vec<u64> = tensors
            .iter()
            .map(|t| {
                let ty = GgmlType::from_id(t.ggml_type).ok_or_else(|| {
                    self.error(ErrorKind::UnknownTensorType {
                        name: t.name.clone(),
                        type_id: t.ggml_type,
                    })
                })?;
                byte_len(t, ty).map_err(|reason| {
                    self.error(ErrorKind::BadTensor {
                        name: t.name.clone(),
                        reason,
                    })
                })
            })
            .collect::<Result<_, _>>()?;
        let mut head = b"GGUF".to_vec();
        head.extend(self.version().to_le_bytes());
        head.extend((tensors.len() as u64).to_le_bytes());
        head.extend((metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut head, k);
            head.extend(v.type_id().to_le_bytes());
            v.encode(&mut head);
        }
        let mut offset = 0u64;
        for (t, &len) in tensors.iter().zip(&lens) {
            put_str(&mut head, &t.name);
            head.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend(d.to_le_bytes());
            }
            head.extend(t.ggml_type.to_le_bytes());
            head.extend(offset.to_le_bytes());
            offset += len + pad(len);
        }
        head.resize(head.len() + pad(head.len() as u64) as usize, 0);
        let io = |at: &str| {
            let at = at.to_string();
            move |source| self.error(ErrorKind::Io { at, source })
        };
        out.write_all(&head).map_err(io("writing the header"))?;
        let mut written = head.len() as u64;
        let mut src = BufReader::new(File::open(self.path()).map_err(io("the source file"))?);
        let mut buf = vec![0u8; 1 << 20];
        for (t, &len) in tensors.iter().zip(&lens) {
            src.seek(SeekFrom::Start(self.data_offset() + t.offset))
                .map_err(io(&format!("tensor {:?}", t.name)))?;
            let mut left = len;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                src.read_exact(&mut buf[..n])
                    .map_err(io(&format!("tensor {:?}", t.name)))?;
                out.write_all(&buf[..n])
                    .map_err(io("writing tensor data"))?;
                left -= n as u64;
            }
            let zeros = vec![0u8; pad(len) as usize];
            out.write_all(&zeros).map_err(io("writing tensor data"))?;
            written += len + zeros.len() as u64;
        }
        out.flush().map_err(io("writing"))?;
        Ok(written)
    }

    fn error(&self, kind: ErrorKind) -> GgufError {
        GgufError::new(self.path(), kind)
    }
}

impl Value {
    /// GGUF's type id of the value (an array's element type follows it in [`Value::encode`]).
    ///
    /// ```
    /// use rotq_model::gguf::Value;
    /// assert_eq!(Value::U32(7).type_id(), 4);
    /// assert_eq!(Value::Array(vec![]).type_id(), 9);
    /// ```
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// Appends the value's bytes as a GGUF file holds them, without its type id; an array's
    /// element type is its first element's (u8 for an empty one: a reader takes any).
    ///
    /// ```
    /// use rotq_model::gguf::Value;
    /// let mut out = Vec::new();
    /// Value::String("ab".into()).encode(&mut out);
    /// assert_eq!(out, [2, 0, 0, 0, 0, 0, 0, 0, b'a', b'b']);
    /// ```
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Value::U8(x) => out.extend(x.to_le_bytes()),
            Value::I8(x) => out.extend(x.to_le_bytes()),
            Value::U16(x) => out.extend(x.to_le_bytes()),
            Value::I16(x) => out.extend(x.to_le_bytes()),
            Value::U32(x) => out.extend(x.to_le_bytes()),
            Value::I32(x) => out.extend(x.to_le_bytes()),
            Value::U64(x) => out.extend(x.to_le_bytes()),
            Value::I64(x) => out.extend(x.to_le_bytes()),
            Value::F32(x) => out.extend(x.to_le_bytes()),
            Value::F64(x) => out.extend(x.to_le_bytes()),
            Value::Bool(x) => out.push(u8::from(*x)),
            Value::String(s) => put_str(out, s),
            Value::Array(items) => {
                out.extend(items.first().map_or(0, Value::type_id).to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for item in items {
                    item.encode(out);
                }
            }
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}
