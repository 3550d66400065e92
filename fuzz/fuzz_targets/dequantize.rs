//! Fuzz target: see `rotq::fuzzing::dequantize`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rotq::fuzzing::dequantize(data));
