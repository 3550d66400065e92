//! Fuzz target: see `rotq::fuzzing::rotation`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rotq::fuzzing::rotation(data));
