//! `rotq-cpu`: the SIMD CPU kernels of rotq. **Not built yet: this crate holds no kernels.**
//!
//! What will live here: runtime-dispatched (x86-64 AVX2+FMA, aarch64 NEON, portable scalar)
//! batched in-place FWHT for every rotation `rotq-reference` specifies, fused
//! rotate-quantize into every KV-cache format of the registry, dequantize, and flash
//! attention (prefill and decode) over a rotated, quantized cache, each with a tunable
//! `Config`. Every kernel is checked against the `rotq-reference` oracle.
