//! Fuzz target: see `rotq::fuzzing::rotate_quantize`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rotq::fuzzing::rotate_quantize(data));
