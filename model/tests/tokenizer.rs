//! The byte-level BPE tokenizer: on a small synthetic vocabulary (merges, errors, round trips
//! of any text), and on SmolLM2's against ids from Hugging Face `tokenizers`
//! (tests/data/tokenizer-smollm2.json, made by make-tokenizer-vector.py).

mod common;

use common::File;
use proptest::prelude::*;
use rotq_model::gguf::{ErrorKind, Gguf, Value};
use rotq_model::tokenizer::Tokenizer;
use std::io::Cursor;
use std::path::Path;

/// GPT-2's stand-in character of each byte (the test's own copy of the table).
fn byte_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
    if printable(b) {
        return b as char;
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).unwrap()
}

fn strings(v: &[String]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.clone())).collect())
}

/// A vocabulary of the 256 byte tokens plus the merges' results, and a `<s>` token.
fn synthetic(pre: &str, merges: &[&str]) -> File {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    tokens.push("<s>".into());
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let merges: Vec<String> = merges.iter().map(|m| m.to_string()).collect();
    File::new()
        .kv("tokenizer.ggml.model", Value::String("gpt2".into()))
        .kv("tokenizer.ggml.pre", Value::String(pre.into()))
        .kv("tokenizer.ggml.tokens", strings(&tokens))
        .kv("tokenizer.ggml.merges", strings(&merges))
        .kv("tokenizer.ggml.bos_token_id", Value::U32(256))
}

fn build(f: &File) -> Result<Tokenizer, rotq_model::gguf::GgufError> {
    let bytes = f.bytes();
    let g = Gguf::parse(
        Cursor::new(&bytes),
        Path::new("tok.gguf"),
        bytes.len() as u64,
    )
    .unwrap();
    Tokenizer::from_gguf(&g)
}

/// "Ġ" is the stand-in of the space.
const MERGES: &[&str] = &["l l", "h e", "he ll", "hell o", "Ġ w", "1 2", "Ġ Ġ"];

#[test]
fn merges_by_rank() {
    let tok = build(&synthetic("smollm", MERGES)).unwrap();
    assert_eq!(tok.vocab_size(), 257 + MERGES.len());
    assert_eq!(
        (tok.bos(), tok.eos(), tok.add_bos()),
        (Some(256), None, false)
    );
    let id = |t: &str| {
        (0..tok.vocab_size() as u32)
            .find(|&i| tok.token(i) == Some(t))
            .unwrap()
    };
    // "hello": l+l first (rank 0), then h+e, he+ll, hell+o.
    assert_eq!(tok.encode("hello"), [id("hello")]);
    assert_eq!(
        tok.encode("hello world"),
        [id("hello"), id("Ġw"), id("o"), id("r"), id("l"), id("d")]
    );
    // Digits are split one by one under "smollm" (the merge "1 2" never applies) …
    assert_eq!(tok.encode("x12"), [id("x"), id("1"), id("2")]);
    // … but not under "gpt2".
    let gpt2 = build(&synthetic("gpt2", MERGES)).unwrap();
    assert_eq!(gpt2.encode("x12"), [id("x"), id("12")]);
    // `\s+(?!\S)`: of three spaces before a word, two go alone and one goes with the word.
    assert_eq!(tok.encode("a   w"), [id("a"), id("ĠĠ"), id("Ġw")]);
    assert_eq!(
        tok.decode(&[id("hello"), id("Ġw"), 9999]),
        "hello w\u{fffd}"
    );
    assert_eq!(tok.decode(&[256]), "<s>");
}

#[test]
fn unsupported_and_broken_vocabularies() {
    let mut f = synthetic("llama3", MERGES);
    let e = build(&f).unwrap_err();
    assert!(matches!(&e.kind, ErrorKind::UnsupportedTokenizer { pre, .. } if pre == "llama3"));
    assert!(
        e.to_string().starts_with("tok.gguf: unsupported tokenizer"),
        "{e}"
    );
    f.kvs[0].1 = Value::String("llama".into());
    assert!(matches!(
        build(&f).unwrap_err().kind,
        ErrorKind::UnsupportedTokenizer { .. }
    ));

    let mut f = synthetic("smollm", &["l l"]);
    f.kvs[3].1 = strings(&["q z".to_string()]);
    let e = build(&f).unwrap_err();
    assert!(
        matches!(&e.kind, ErrorKind::Tokenizer(m) if m.contains("merge 1")),
        "{e}"
    );
    f.kvs[3].1 = strings(&["ll".to_string()]);
    assert!(matches!(
        build(&f).unwrap_err().kind,
        ErrorKind::Tokenizer(_)
    ));
    let mut f = synthetic("smollm", MERGES);
    f.kvs[2].1 = strings(&["a".to_string()]);
    let e = build(&f).unwrap_err();
    assert!(matches!(&e.kind, ErrorKind::Tokenizer(m) if m.contains("not a byte-level")));
    let f = synthetic("smollm", MERGES).kv("tokenizer.ggml.eos_token_id", Value::U32(1 << 20));
    assert!(matches!(
        build(&f).unwrap_err().kind,
        ErrorKind::Tokenizer(_)
    ));
    let f = synthetic("smollm", MERGES).kv("tokenizer.ggml.add_bos_token", Value::U8(1));
    assert!(matches!(
        build(&f).unwrap_err().kind,
        ErrorKind::WrongType { .. }
    ));
}

#[test]
fn bytes_without_a_token_are_dropped() {
    let mut f = synthetic("smollm", &["! !"]);
    let Value::Array(tokens) = &mut f.kvs[2].1 else {
        panic!()
    };
    tokens[4] = Value::String("\u{4}".into()); // byte 0x04 loses its token ("Ą")
    let tok = build(&f).unwrap();
    // The neighbours of the dropped byte (one piece: a punctuation run) merge as if it were
    // not there.
    assert_eq!(tok.encode("!\u{4}!"), [257]);
    assert_eq!(tok.decode(&[257]), "!!");
}

proptest! {
    #[test]
    fn decode_inverts_encode(text in any::<String>()) {
        let tok = build(&synthetic("smollm", MERGES)).unwrap();
        prop_assert_eq!(tok.decode(&tok.encode(&text)), text);
    }
}

#[test]
fn smollm2_matches_hugging_face() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let g = Gguf::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(
        (tok.bos(), tok.eos(), tok.add_bos()),
        (Some(1), Some(2), false)
    );
    let vector = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tokenizer-smollm2.json");
    let vector: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vector).unwrap()).unwrap();
    let cases = vector["cases"].as_array().unwrap();
    assert!(cases.len() >= 15);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text);
        assert_eq!(got, want, "{text:?}");
        if case["lossless"].as_bool().unwrap() {
            assert_eq!(tok.decode(&got), text);
        }
    }
    assert_eq!(tok.decode(&[1]), "<|im_start|>");
}

#[test]
fn long_runs_stay_fast_and_exact() {
    let tok = build(&synthetic("smollm", MERGES)).unwrap();
    for text in [
        " ".repeat(100_000) + "w",
        "l".repeat(100_000),
        "!?".repeat(50_000),
    ] {
        let t = std::time::Instant::now();
        let ids = tok.encode(&text);
        assert_eq!(tok.decode(&ids), text);
        assert!(t.elapsed().as_secs_f64() < 5.0, "{:?}", t.elapsed());
    }
    // 100 000 spaces then a word: 99 999 spaces as ĠĠ pairs and one alone, then "Ġw".
    let ids = tok.encode(&(" ".repeat(100_000) + "w"));
    assert_eq!(ids.len(), 49_999 + 1 + 1);
}
