//! The GGUF reader on synthetic files (round trips, every defect, truncations, random
//! mutations), on the fuzz corpus, and on the real SmolLM2 file when it is present.

mod common;

use common::{values, File};
use proptest::prelude::*;
use rotq_model::gguf::{ErrorKind, Gguf, GgufError, Value};
use rotq_reference::KvFormat;
use std::io::Cursor;
use std::path::Path;

const F32: u32 = 0;
const Q4_1: u32 = 3;
const Q8_0: u32 = 8;
const Q6_K: u32 = 14;

fn parse(bytes: &[u8]) -> Result<Gguf, GgufError> {
    Gguf::parse(Cursor::new(bytes), Path::new("t.gguf"), bytes.len() as u64)
}

fn kind(bytes: &[u8]) -> ErrorKind {
    parse(bytes).expect_err("a defective file parsed").kind
}

/// The bytes of a tensor of `dims` (ggml's order: rows of `dims[0]` values) in `f`.
fn encode(f: KvFormat, dims: &[u64], seed: u64) -> Vec<u8> {
    let n = dims.iter().product::<u64>() as usize;
    f.quantize_rows(&values(n, seed), dims[0] as usize).unwrap()
}

/// Every value type, nested arrays, and f32, q8_0 and q4_1 tensors.
fn sample() -> File {
    File::new()
        .kv("general.architecture", Value::String("llama".into()))
        .kv("u8", Value::U8(200))
        .kv("i8", Value::I8(-5))
        .kv("u16", Value::U16(60000))
        .kv("i16", Value::I16(-30000))
        .kv("u32", Value::U32(4_000_000_000))
        .kv("i32", Value::I32(-7))
        .kv("u64", Value::U64(1 << 40))
        .kv("i64", Value::I64(1 << 50))
        .kv("f32", Value::F32(1e-5))
        .kv("f64", Value::F64(0.25))
        .kv("bool", Value::Bool(true))
        .kv(
            "names",
            Value::Array(vec![Value::String("a b".into()), Value::String("ü".into())]),
        )
        .kv("empty", Value::Array(vec![]))
        .kv(
            "nested",
            Value::Array(vec![Value::Array(vec![Value::I16(1), Value::I16(-2)])]),
        )
        .tensor("norm", &[8, 2], F32, encode(KvFormat::F32, &[8, 2], 1))
        .tensor("q8", &[64, 2], Q8_0, encode(KvFormat::Q8_0, &[64, 2], 2))
        .tensor("q41", &[32, 3], Q4_1, encode(KvFormat::Q4_1, &[32, 3], 3))
}

#[test]
fn round_trip_metadata() {
    let f = sample();
    let g = parse(&f.bytes()).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.path(), Path::new("t.gguf"));
    let keys: Vec<_> = g.metadata().iter().map(|(k, _)| k.clone()).collect();
    let want: Vec<_> = f.kvs.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(keys, want, "insertion order");
    for (k, v) in &f.kvs {
        assert_eq!(g.get(k), Some(v), "{k}");
    }
    assert_eq!(g.str("general.architecture").unwrap(), "llama");
    assert_eq!(g.u64("u8").unwrap(), 200);
    assert_eq!(g.u64("i64").unwrap(), 1 << 50);
    assert_eq!(g.u32("u32").unwrap(), 4_000_000_000);
    assert_eq!(g.u32("u16").unwrap(), 60000);
    assert_eq!(g.f32("f32").unwrap(), 1e-5);
    assert_eq!(g.f32("f64").unwrap(), 0.25);
    assert!(g.bool("bool").unwrap());
    assert_eq!(g.str_array("names").unwrap(), ["a b", "ü"]);
    assert!(g.str_array("empty").unwrap().is_empty());
}

#[test]
fn accessor_errors() {
    let g = parse(&sample().bytes()).unwrap();
    let k = |r: Result<(), GgufError>| r.unwrap_err().kind;
    assert!(matches!(
        k(g.u64("nope").map(drop)),
        ErrorKind::MissingKey(_)
    ));
    assert!(matches!(
        k(g.u64("i32").map(drop)),
        ErrorKind::OutOfRange { .. }
    ));
    assert!(matches!(
        k(g.u32("u64").map(drop)),
        ErrorKind::OutOfRange { .. }
    ));
    assert!(matches!(
        k(g.u64("f32").map(drop)),
        ErrorKind::WrongType { .. }
    ));
    assert!(matches!(
        k(g.f32("u8").map(drop)),
        ErrorKind::WrongType { .. }
    ));
    assert!(matches!(
        k(g.str("u8").map(drop)),
        ErrorKind::WrongType { .. }
    ));
    assert!(matches!(
        k(g.bool("u8").map(drop)),
        ErrorKind::WrongType { .. }
    ));
    assert!(matches!(
        k(g.str_array("nested").map(drop)),
        ErrorKind::WrongType { .. }
    ));
    assert!(matches!(
        k(g.tensor("nope").map(drop)),
        ErrorKind::NoTensor(_)
    ));
    let msg = g.str("u8").unwrap_err().to_string();
    assert_eq!(msg, "t.gguf: metadata key \"u8\" is u8, expected string");
}

#[test]
fn round_trip_tensors() {
    let f = sample();
    let (bytes, layout) = f.write();
    let g = parse(&bytes).unwrap();
    assert_eq!(g.data_offset(), layout.data_offset as u64);
    assert_eq!(g.tensors().len(), 3);
    for (t, want) in g.tensors().iter().zip(&f.tensors) {
        assert_eq!(
            (&t.name, &t.dims, t.ggml_type),
            (&want.name, &want.dims, want.ty)
        );
        let format = match t.ggml_type {
            F32 => KvFormat::F32,
            Q8_0 => KvFormat::Q8_0,
            _ => KvFormat::Q4_1,
        };
        assert_eq!(t.type_name(), format.name());
        let got = g.read_tensor_f32(Cursor::new(&bytes), &t.name).unwrap();
        assert_eq!(
            got,
            format
                .dequantize_rows(&want.data, want.dims[0] as usize)
                .unwrap(),
            "{}",
            t.name
        );
        assert_eq!(got.len() as u64, t.n_elements());
    }
    // The same through a real file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sample.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let g = Gguf::open(&path).unwrap();
    let q41 = g.tensor_f32("q41").unwrap();
    assert_eq!(
        q41,
        KvFormat::Q4_1
            .dequantize_rows(&f.tensors[2].data, 32)
            .unwrap()
    );
}

#[test]
fn version_2_and_custom_alignment() {
    let mut f = sample();
    f.version = 2;
    assert_eq!(parse(&f.bytes()).unwrap().version(), 2);
    let mut f = sample().kv("general.alignment", Value::U32(64));
    f.alignment = 64;
    let bytes = f.bytes();
    let g = parse(&bytes).unwrap();
    assert_eq!((g.alignment(), g.data_offset() % 64), (64, 0));
    let got = g.read_tensor_f32(Cursor::new(&bytes), "q8").unwrap();
    assert_eq!(
        got,
        KvFormat::Q8_0
            .dequantize_rows(&f.tensors[1].data, 64)
            .unwrap()
    );
}

#[test]
fn empty_file_and_no_tensors() {
    assert!(parse(&File::new().bytes()).unwrap().tensors().is_empty());
    assert!(matches!(kind(b""), ErrorKind::Truncated { .. }));
}

#[test]
fn every_truncation_is_an_error() {
    let f = sample();
    let (bytes, layout) = f.write();
    let last = f.tensors.last().unwrap();
    let data_end = bytes.len() - last.data.len().next_multiple_of(32) + last.data.len();
    let table_end = layout.tensor_offsets.last().unwrap() + 8;
    for len in 0..bytes.len() {
        let cut = &bytes[..len];
        let err = match parse(cut) {
            Err(e) => e,
            Ok(_) if len >= data_end => continue, // only the trailing padding is cut
            Ok(_) => panic!("parsed truncated at {len} of {}", bytes.len()),
        };
        let msg = err.to_string();
        assert!(msg.starts_with("t.gguf: ") && !msg.contains('\n'), "{msg}");
        // A reader shorter than the length it was said to have: an error too, while the cut
        // is in the part the parser reads (the tensor data is read only when asked for).
        let lying = Gguf::parse(Cursor::new(cut), Path::new("t.gguf"), bytes.len() as u64);
        assert!(
            len >= table_end || lying.is_err(),
            "lying length, cut at {len}"
        );
    }
}

#[test]
fn truncated_message_says_where() {
    let (bytes, layout) = sample().write();
    let cut = &bytes[..layout.tensor_entries[1] + 3];
    let msg = parse(cut).unwrap_err().to_string();
    assert_eq!(msg, "t.gguf: truncated tensor table (tensor 2 of 3: name)");
}

#[test]
fn header_defects() {
    let good = sample().bytes();
    let mut b = good.clone();
    b[..4].copy_from_slice(b"GGML");
    assert!(matches!(kind(&b), ErrorKind::BadMagic(m) if &m == b"GGML"));
    for v in [0u32, 1, 4, 0x0300_0000] {
        let mut b = good.clone();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        assert!(matches!(kind(&b), ErrorKind::UnsupportedVersion(x) if x == v));
    }
    let mut b = good.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(kind(&b), ErrorKind::CountTooLarge { .. }));
    let mut b = good;
    b[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(matches!(kind(&b), ErrorKind::CountTooLarge { .. }));
}

/// A file whose only metadata entry is `key` with the raw value `payload` of type `type_id`.
fn one_raw_kv(key: &[u8], type_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    common::put_str(&mut b, key);
    b.extend(type_id.to_le_bytes());
    b.extend(payload);
    b
}

#[test]
fn metadata_defects() {
    let huge_string = u64::MAX.to_le_bytes();
    let e = kind(&one_raw_kv(b"k", 8, &huge_string));
    assert!(
        matches!(
            e,
            ErrorKind::CountTooLarge {
                count: u64::MAX,
                ..
            }
        ),
        "{e}"
    );
    let mut huge_array = 0u32.to_le_bytes().to_vec();
    huge_array.extend(1000u64.to_le_bytes());
    huge_array.extend([0u8; 999]);
    assert!(matches!(
        kind(&one_raw_kv(b"k", 9, &huge_array)),
        ErrorKind::CountTooLarge { .. }
    ));
    assert!(matches!(
        kind(&one_raw_kv(b"\xff\xfe", 4, &[0; 4])),
        ErrorKind::BadUtf8 { .. }
    ));
    let mut bad_str = 2u64.to_le_bytes().to_vec();
    bad_str.extend(b"\xc3(");
    assert!(matches!(
        kind(&one_raw_kv(b"k", 8, &bad_str)),
        ErrorKind::BadUtf8 { .. }
    ));
    let e = kind(&one_raw_kv(b"k", 13, &[0; 8]));
    assert!(matches!(e, ErrorKind::UnknownValueType { type_id: 13, .. }));
    let mut bad_elem = 99u32.to_le_bytes().to_vec();
    bad_elem.extend(1u64.to_le_bytes());
    bad_elem.push(0);
    let e = kind(&one_raw_kv(b"k", 9, &bad_elem));
    assert!(matches!(e, ErrorKind::UnknownValueType { type_id: 99, .. }));
    assert!(matches!(
        kind(&one_raw_kv(b"k", 7, &[2])),
        ErrorKind::BadBool { byte: 2, .. }
    ));
    // Arrays of arrays of … ten deep.
    let mut deep = Value::U8(1);
    for _ in 0..10 {
        deep = Value::Array(vec![deep]);
    }
    let e = kind(&File::new().kv("deep", deep).bytes());
    assert!(matches!(e, ErrorKind::TooDeep { .. }));
    let dup = File::new().kv("a", Value::U8(1)).kv("a", Value::U8(2));
    assert!(matches!(kind(&dup.bytes()), ErrorKind::DuplicateKey(k) if k == "a"));
    for bad in [Value::U32(0), Value::U32(48), Value::U64(32)] {
        let f = File::new().kv("general.alignment", bad);
        assert!(matches!(kind(&f.bytes()), ErrorKind::BadAlignment(_)));
    }
}

fn bad_tensor(f: &File) -> String {
    match kind(&f.bytes()) {
        ErrorKind::BadTensor { reason, .. } => reason,
        other => panic!("expected BadTensor, got {other}"),
    }
}

#[test]
fn tensor_defects() {
    let data = || encode(KvFormat::F32, &[8], 1);
    let one = |dims: &[u64], ty: u32| File::new().tensor("t", dims, ty, data());
    assert!(bad_tensor(&one(&[], F32)).contains("0 dimensions"));
    assert!(bad_tensor(&one(&[1, 1, 1, 1, 8], F32)).contains("5 dimensions"));
    assert!(bad_tensor(&one(&[1 << 32, 1 << 32], F32)).contains("overflow"));
    assert!(bad_tensor(&one(&[u64::MAX], F32)).contains("overflow"));
    assert!(bad_tensor(&one(&[16, 2], Q8_0)).contains("not a multiple"));
    assert!(bad_tensor(&one(&[9], F32)).contains("past the end"));
    let long = File::new().tensor(&"x".repeat(64), &[8], F32, data());
    assert!(bad_tensor(&long).contains("name longer"));
    let e = kind(&one(&[8], 4).bytes());
    assert!(matches!(e, ErrorKind::UnknownTensorType { type_id: 4, .. }));
    let dup = one(&[8], F32).tensor("t", &[8], F32, data());
    assert!(matches!(kind(&dup.bytes()), ErrorKind::DuplicateTensor(n) if n == "t"));

    let (mut b, layout) = one(&[8], F32).write();
    b[layout.tensor_offsets[0]] = 4; // offset 4: misaligned
    let ErrorKind::BadTensor { reason, .. } = kind(&b) else {
        panic!()
    };
    assert!(
        reason.contains("not a multiple of the alignment 32"),
        "{reason}"
    );
    b[layout.tensor_offsets[0]..][..8].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
    let ErrorKind::BadTensor { reason, .. } = kind(&b) else {
        panic!()
    };
    assert!(reason.contains("past the end"), "{reason}");
}

#[test]
fn unsupported_type_is_a_typed_error() {
    let f = File::new().tensor("blk.0.ffn_down.weight", &[256], Q6_K, vec![0; 210]);
    let bytes = f.bytes();
    let g = parse(&bytes).unwrap();
    let err = g
        .read_tensor_f32(Cursor::new(&bytes), "blk.0.ffn_down.weight")
        .unwrap_err();
    assert!(matches!(
        err.kind,
        ErrorKind::UnsupportedTensorType { type_id: 14, .. }
    ));
    let msg = err.to_string();
    assert!(
        msg.contains("blk.0.ffn_down.weight") && msg.contains("q6_K (14)"),
        "{msg}"
    );
}

#[test]
fn data_read_errors() {
    let bytes = sample().bytes();
    let g = parse(&bytes).unwrap();
    let short = &bytes[..bytes.len() - 40];
    let err = g.read_tensor_f32(Cursor::new(short), "q41").unwrap_err();
    assert!(matches!(err.kind, ErrorKind::Io { .. }), "{err}");
    let err = g.tensor_f32("q41").unwrap_err(); // t.gguf does not exist
    assert!(matches!(err.kind, ErrorKind::Io { .. }));
    assert!(err
        .to_string()
        .starts_with("t.gguf: cannot read tensor \"q41\""));
}

/// Parses `bytes` and reads every tensor it declares: never panics, whatever the bytes.
fn exercise(bytes: &[u8]) {
    if let Ok(g) = parse(bytes) {
        for t in g.tensors() {
            if t.n_elements() <= 1 << 20 {
                let _ = g.read_tensor_f32(Cursor::new(bytes), &t.name);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn mutations_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = sample().bytes();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        exercise(&bytes);
    }
}

fn corpus_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/gguf")
}

#[test]
fn fuzz_corpus_replays() {
    let files: Vec<_> = std::fs::read_dir(corpus_dir())
        .expect("fuzz/corpus/gguf")
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!files.is_empty());
    for path in files {
        exercise(&std::fs::read(&path).unwrap());
    }
}

/// Writes the fuzz target's seed corpus: `cargo test -p rotq-model --test gguf -- --ignored`.
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let q8 = File::new()
        .kv("general.architecture", Value::String("llama".into()))
        .kv("llama.block_count", Value::U32(1))
        .tensor("w", &[64, 2], Q8_0, encode(KvFormat::Q8_0, &[64, 2], 4));
    let q41 = File::new()
        .kv(
            "tokenizer.ggml.tokens",
            Value::Array(vec![Value::String("a".into()); 3]),
        )
        .tensor("n", &[8], F32, encode(KvFormat::F32, &[8], 5))
        .tensor("w", &[32, 2], Q4_1, encode(KvFormat::Q4_1, &[32, 2], 6));
    let mut v2 = sample();
    v2.version = 2;
    for (name, f) in [
        ("seed-small-q8_0", q8),
        ("seed-small-q4_1", q41),
        ("seed-all-types-v2", v2),
    ] {
        std::fs::write(dir.join(name), f.bytes()).unwrap();
    }
}

#[test]
fn smollm2_file() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let g = Gguf::open(&path).unwrap();
    assert_eq!(g.tensors().len(), 272);
    assert_eq!(g.metadata().len(), 33);
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.str("general.architecture").unwrap(), "llama");
    assert_eq!(g.u64("llama.block_count").unwrap(), 30);
    assert_eq!(g.str_array("tokenizer.ggml.tokens").unwrap().len(), 49152);
    assert_eq!(g.str_array("tokenizer.ggml.merges").unwrap().len(), 48900);
    let emb = g.tensor("token_embd.weight").unwrap();
    assert_eq!(
        (emb.dims.as_slice(), emb.ggml_type),
        (&[576, 49152][..], Q8_0)
    );
    let q = g.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!((q.dims.as_slice(), q.ggml_type), (&[576, 576][..], Q4_1));
    let norm = g.tensor_f32("blk.0.attn_norm.weight").unwrap();
    assert_eq!(norm.len(), 576);
    assert!(norm.iter().all(|v| v.is_finite()));
    let wq = g.tensor_f32("blk.0.attn_q.weight").unwrap();
    assert_eq!(wq.len(), 576 * 576);
    assert!(wq.iter().all(|v| v.is_finite()) && wq.iter().any(|&v| v != 0.0));
}

/// Metadata arrays are bounded in all (each element takes 32 bytes or more in memory): a file
/// of 16 Mi + 1 one-byte elements is refused before they are read.
#[test]
fn too_many_metadata_values_are_refused() {
    let count: u64 = (1 << 24) + 1;
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    let key = b"big";
    b.extend((key.len() as u64).to_le_bytes());
    b.extend(key);
    b.extend(9u32.to_le_bytes()); // array
    b.extend(0u32.to_le_bytes()); // of u8
    b.extend(count.to_le_bytes());
    b.resize(b.len() + count as usize, 7);
    let len = b.len() as u64;
    let err = rotq_model::gguf::Gguf::parse(
        std::io::Cursor::new(b),
        std::path::Path::new("big.gguf"),
        len,
    )
    .expect_err("refused");
    assert!(
        err.to_string().contains("more than 16777216 values"),
        "{err}"
    );
}

/// A three-block llama file: the embedding, three blocks of two tensors, the output norm.
fn three_blocks() -> File {
    let mut f = sample().kv("llama.block_count", Value::U32(3)).tensor(
        "token_embd.weight",
        &[32, 4],
        Q8_0,
        encode(KvFormat::Q8_0, &[32, 4], 4),
    );
    for b in 0..3 {
        f = f
            .tensor(
                &format!("blk.{b}.attn_norm.weight"),
                &[8],
                F32,
                encode(KvFormat::F32, &[8], 10 + b),
            )
            .tensor(
                &format!("blk.{b}.attn_q.weight"),
                &[32, 2],
                Q4_1,
                encode(KvFormat::Q4_1, &[32, 2], 20 + b),
            );
    }
    f.tensor(
        "output_norm.weight",
        &[8],
        F32,
        encode(KvFormat::F32, &[8], 30),
    )
}

/// `write_first_layers`: all blocks give the file back byte for byte; fewer keep every key
/// (the block count set) and every tensor outside the dropped blocks, with the same values;
/// 0 blocks or more than the model's are refused.
#[test]
fn first_layers_are_written_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("three.gguf");
    let bytes = three_blocks().bytes();
    std::fs::write(&src, &bytes).unwrap();
    let g = Gguf::open(&src).unwrap();
    let mut all = Vec::new();
    let n = g.write_first_layers(3, &mut all).unwrap();
    assert_eq!(n as usize, all.len());
    assert!(all == bytes, "three of three blocks differ from the file");

    let cut_path = dir.path().join("one.gguf");
    let mut cut = std::fs::File::create(&cut_path).unwrap();
    g.write_first_layers(1, &mut cut).unwrap();
    drop(cut);
    let c = Gguf::open(&cut_path).unwrap();
    assert_eq!(c.u64("llama.block_count").unwrap(), 1);
    assert_eq!(c.get("llama.block_count"), Some(&Value::U32(1)));
    for (k, v) in g
        .metadata()
        .iter()
        .filter(|(k, _)| k != "llama.block_count")
    {
        assert_eq!(c.get(k), Some(v), "{k}");
    }
    let names: Vec<&str> = c.tensors().iter().map(|t| t.name.as_str()).collect();
    let kept: Vec<&str> = g
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| !n.starts_with("blk.1.") && !n.starts_with("blk.2."))
        .collect();
    assert_eq!(names, kept);
    for name in kept {
        assert_eq!(
            c.tensor_f32(name).unwrap(),
            g.tensor_f32(name).unwrap(),
            "{name}"
        );
    }
    for bad in [0, 4] {
        let e = g.write_first_layers(bad, &mut Vec::new()).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::OutOfRange { .. }), "{bad}: {e}");
    }
}

/// SmolLM2 cut to its first 2 of 30 blocks: 20 of 272 tensors, and the runner loads it.
#[test]
fn smollm2_first_layers_load() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let g = Gguf::open(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("smollm2-2.gguf");
    let mut out = std::fs::File::create(&cut).unwrap();
    g.write_first_layers(2, &mut out).unwrap();
    drop(out);
    let c = Gguf::open(&cut).unwrap();
    assert_eq!(c.tensors().len(), 20);
    assert_eq!(c.u64("llama.block_count").unwrap(), 2);
    let model = rotq_model::load::llama(&c).unwrap();
    assert_eq!(model.config.n_layers, 2);
}
