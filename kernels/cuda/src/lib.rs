//! `rotq-cuda`: the CUDA kernels of rotq, compiled at run time by NVRTC through cudarc, so the
//! crate builds (and its tests skip) on machines without CUDA.
//!
//! - [`Device`]: opens `cuda:N`, reports what it is, compiles each (kernel, configuration)
//!   once for the device's architecture and caches the module.
//! - [`CudaRotation`]: in-place Hadamard rotation of rows (f32, f16, bf16): every power of two
//!   up to 2^15, m·2^k for m ∈ {12, 20, 28, 40}, block-diagonal and randomized (signs fused).
//!   Butterflies run in registers, then across lanes with warp shuffles, then across warps
//!   through shared memory; rows move with 16-byte loads and stores. A row is one thread
//!   block, so a rotation needs at most 1024 threads of at most 64 values and its row in
//!   shared memory (227 KiB on an H100): m·2^k up to 12·2^12, 20·2^11, 28·2^10 and 40·2^10,
//!   and block rotations of rows up to 2^16 values; larger ones are refused with
//!   `UnsupportedDim`. Explicit orthogonal matrices run as a pass of their own (`d`
//!   multiply-adds a value), in the rotation, the codec and attention alike.
//! - [`CudaCodec`]: fused rotate-quantize of f32/f16/bf16 rows into cache blocks of every
//!   registry format, at a cache position of a contiguous or paged cache (one read of the
//!   input, one write of the blocks), and dequantize with the inverse rotation.
//! - [`CudaAttention`]: decode attention for a batch of sequences straight from the quantized
//!   cache (any formats for K and V, contiguous or paged, GQA, causal, window, soft-cap), Q
//!   rotated and the output rotated back inside the kernels; split over the cache and merged.
//!
//! - [`batch`]: the batch engine API on the device: pools, queries, tables and lengths in the
//!   engine's device memory, planned on the host, run on the engine's stream (graph-capturable).
//!
//! Every kernel matches the `rotq-reference` oracle (see `tests/`). Quantization uses exact
//! f32 arithmetic (`--fmad=false`) so that the bytes equal the oracle's quantizer applied to
//! the kernel's own rotated values.
//!
//! Set `ROTQ_CUDA_LOG=1` to print each module's compile time as it is built.

mod attention;
mod attention_module;
pub mod batch;
mod codec;
#[cfg(test)]
mod cubins;
mod decode_module;
mod device;
mod error;
mod flash_module;
mod kernel;
mod matrix;
mod rotation;
pub mod tuned;
mod turbo;

pub use attention::{
    auto_splits, check_format, check_head_dim, CacheLayout, CudaAttention, CudaKvCache,
    DecodeConfig, DecodeSeq, PrefillConfig, HEAD_DIM_STEP, MAX_GROUP, MAX_HEAD_DIM,
    MIN_AUTO_SPLIT_TOKENS, TENSOR_CORE_K_FORMATS, TENSOR_CORE_V_FORMATS,
};
pub use codec::{CacheTarget, CudaCodec};
pub use device::{cuda_available, Device, DeviceInfo, Tuning};
pub use error::{CudaError, Result};
pub use kernel::RowConfig;
pub use rotation::{CudaRotation, GpuElement};
pub use turbo::MAX_VLLM_KEY_DIM_CUDA;
