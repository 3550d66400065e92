//! `rotq-fuzz`: the cargo-fuzz (libFuzzer) targets of rotq. **Not built yet: no targets.**
//!
//! What will live here: targets that decode arbitrary bytes as every cache format, run every
//! rotation and rotate-quantize on arbitrary rows against the `rotq-reference` oracle, run
//! attention on arbitrary small shapes, and parse the tuning cache, each with a seed corpus.
