//! Replays every fuzz target's corpus (`fuzz/corpus/<target>/`: the seeds, and every input a
//! fuzzer found worth keeping, crashes included once fixed) through the same checks the
//! targets run (`rotq::fuzzing`), so that `cargo test` guards what fuzzing found.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{target}: an empty corpus");
    for f in files {
        let data = std::fs::read(&f).unwrap();
        let result = std::panic::catch_unwind(|| check(&data));
        assert!(result.is_ok(), "{target}: {} fails", f.display());
    }
}

#[test]
fn dequantize_corpus() {
    replay("dequantize", rotq::fuzzing::dequantize);
}

#[test]
fn rotation_corpus() {
    replay("rotation", rotq::fuzzing::rotation);
}

#[test]
fn rotate_quantize_corpus() {
    replay("rotate_quantize", rotq::fuzzing::rotate_quantize);
}

#[test]
fn attention_corpus() {
    replay("attention", rotq::fuzzing::attention);
}

#[test]
fn tune_cache_corpus() {
    replay("tune_cache", rotq::fuzzing::tune_cache);
}

#[test]
fn transform_config_corpus() {
    replay("transform_config", rotq::fuzzing::transform_config);
}

/// Empty and tiny inputs: refused or handled, never a panic.
#[test]
fn empty_and_tiny_inputs_are_refused_not_crashed() {
    for data in [&[][..], &[0], &[4, 1], &[3; 35][..]] {
        rotq::fuzzing::dequantize(data);
        rotq::fuzzing::rotation(data);
        rotq::fuzzing::rotate_quantize(data);
        rotq::fuzzing::attention(data);
        rotq::fuzzing::tune_cache(data);
        rotq::fuzzing::transform_config(data);
    }
}
