//! `rotq-cuda`: the CUDA kernels of rotq. **Not built yet: this crate holds no kernels.**
//!
//! What will live here: CUDA C sources compiled at run time by NVRTC through cudarc (so the
//! crate builds on machines without CUDA), covering FWHT, randomized Hadamard, fused
//! rotate-quantize into every KV-cache format (contiguous and paged), dequantize, and flash
//! attention for prefill and decode. Every kernel is checked against the `rotq-reference`
//! oracle; tests print `skipped: no CUDA device` where no GPU is present.
