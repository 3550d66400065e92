//! Fuzz target: see `rotq::fuzzing::tune_cache`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rotq::fuzzing::tune_cache(data));
