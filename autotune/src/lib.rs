//! `rotq-autotune`: the autotuner of rotq. **Not built yet: there is no `autotune` binary.**
//!
//! What will live here: a `Tunable` interface implemented by every CPU and CUDA kernel, shape
//! buckets, a (budgeted) search over each kernel's `Config`, a correctness gate that rejects
//! any candidate whose output disagrees with the `rotq-reference` oracle under its tolerance
//! table, trustworthy timing, and the on-disk cache (`ROTQ_TUNE_CACHE`, else
//! `$XDG_CACHE_HOME/rotq/tuned.json`) that the kernels read at run time.
