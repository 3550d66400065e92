//! Fuzz target: the GGUF reader (`rotq_model::gguf`) on arbitrary bytes must return an error
//! or a file, never panic, and then read every tensor it declares (up to 1 Mi values, so that a
//! large declared tensor does not make a run slow) without panicking either. The corpus replay
//! test is `fuzz_corpus_replays` in model/tests/gguf.rs.
#![no_main]

use rotq_model::gguf::Gguf;
use std::io::Cursor;
use std::path::Path;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(g) = Gguf::parse(Cursor::new(data), Path::new("fuzz.gguf"), data.len() as u64) else {
        return;
    };
    for t in g.tensors() {
        if t.n_elements() <= 1 << 20 {
            let _ = g.read_tensor_f32(Cursor::new(data), &t.name);
        }
    }
});
