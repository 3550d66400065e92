//! Fuzz target: see `rotq_testkit::fuzzing::batch`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rotq_testkit::fuzzing::batch(data));
