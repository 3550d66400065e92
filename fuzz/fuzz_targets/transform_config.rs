//! Fuzz target: see `rotq::fuzzing::transform_config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rotq::fuzzing::transform_config(data));
