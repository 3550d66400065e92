//! `rotq-cpu`: the CPU kernels of rotq, each checked against the `rotq-reference` oracle.
//!
//! * [`CpuRotation`]: batched in-place FWHT (every rotation of the spec) on f32/f16/bf16 rows;
//! * [`CacheCodec`]: fused rotate-quantize into a KV cache of any registry format, at a row
//!   offset, and dequantize (+ inverse rotation) out of it;
//! * [`attention`]: flash attention over rotated, quantized K/V caches, prefill and decode, one
//!   sequence or a planned batch ([`BatchPlan`]) with additive masks and log-sum-exp.
//!
//! Instruction sets are chosen at run time ([`Isa`]); threads come from rayon. Each kernel
//! takes a `Config` with serde, a default and a search space for the autotuner; a kernel not
//! given one explicitly uses what `autotune --device cpu` recorded for its shape ([`tuned`]),
//! else its default.

pub mod attention;
mod fwht;
mod isa;
mod quant;
pub mod tuned;

pub use attention::{
    AttentionConfig, AttentionMask, BatchPlan, CpuAttention, DecodeRequest, KvCacheView, QueryMode,
    SeqAttention,
};
pub use fwht::{CpuRotation, FwhtConfig};
pub use isa::Isa;
pub use quant::{CacheCodec, Element, QuantizeConfig};
