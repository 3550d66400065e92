//! Replays every fuzz target's corpus (`fuzz/corpus/<target>/`: the seeds, and every input a
//! fuzzer found worth keeping, crashes included once fixed) through the same checks the
//! targets run (`rotq_testkit::fuzzing`), so that `cargo test` guards what fuzzing found.

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
    replay("dequantize", rotq_testkit::fuzzing::dequantize);
}

#[test]
fn rotation_corpus() {
    replay("rotation", rotq_testkit::fuzzing::rotation);
}

#[test]
fn rotate_quantize_corpus() {
    replay("rotate_quantize", rotq_testkit::fuzzing::rotate_quantize);
}

#[test]
fn attention_corpus() {
    replay("attention", rotq_testkit::fuzzing::attention);
}

#[test]
fn tune_cache_corpus() {
    replay("tune_cache", rotq_testkit::fuzzing::tune_cache);
}

#[test]
fn transform_config_corpus() {
    replay("transform_config", rotq_testkit::fuzzing::transform_config);
}

#[test]
fn batch_corpus() {
    replay("batch", rotq_testkit::fuzzing::batch);
}

/// Empty and tiny inputs: refused or handled, never a panic.
#[test]
fn empty_and_tiny_inputs_are_refused_not_crashed() {
    for data in [&[][..], &[0], &[4, 1], &[3; 35][..]] {
        rotq_testkit::fuzzing::dequantize(data);
        rotq_testkit::fuzzing::rotation(data);
        rotq_testkit::fuzzing::rotate_quantize(data);
        rotq_testkit::fuzzing::attention(data);
        rotq_testkit::fuzzing::tune_cache(data);
        rotq_testkit::fuzzing::transform_config(data);
        rotq_testkit::fuzzing::batch(data);
    }
}
