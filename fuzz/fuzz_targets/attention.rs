//! Fuzz target: see `rotq::fuzzing::attention`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rotq::fuzzing::attention(data));
