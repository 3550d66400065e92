//! # rotq: rotated quantized KV caches for inference engines
//!
//! Multiplying Q and K by the same orthonormal matrix `R` (a Hadamard transform) leaves every
//! attention score unchanged but spreads K's outlier channels over all of them, so a 4- or
//! 8-bit cache of the rotated K loses far less; V may be rotated too, the output being rotated
//! back. This crate is what an engine depends on:
//!
//! - [`cache::RotatedKvCache`]: one layer's cache on the CPU or a CUDA device — append keys and
//!   values (rotated and quantized in one pass), attend (prefill or decode), shift positions
//!   (context shift), drop tokens; contiguous or paged.
//! - [`pool`]: the batch engine API — one paged pool per layer for many sequences, in the
//!   engine's memory; a step's new keys and values in one call through a slot mapping; the
//!   batch's attention planned once and run per layer, with an optional mask and log-sum-exp.
//! - [`checkpoint`]: the rotations a compressed-tensors checkpoint (SpinQuant R3) asks for.
//! - The vocabulary and the oracle ([`reference`]: [`Rotation`], [`KvFormat`],
//!   [`AttentionParams`], the tolerance table) and the kernels ([`cpu`], and [`cuda`] with the
//!   default feature `cuda`).
//!
//! Build without the CUDA backend with `default-features = false`. The C ABI is the crate
//! `rotq-capi`; the command-line tools (`rotq`, `autotune`) live in their own crates and are
//! not dependencies of this one.
//!
//! ```
//! use rotq::cache::{Backend, CacheSpec, Paging, RotatedKvCache};
//! use rotq::{AttentionParams, KvFormat, Rotation, RotationPlan};
//! let spec = CacheSpec {
//!     k_format: KvFormat::Q4_0,
//!     v_format: KvFormat::Q8_0,
//!     plan: RotationPlan { qk: Some(Rotation::hadamard(64)?), v: None },
//!     n_heads: 2,
//!     head_dim: 64,
//!     v_dim: 64,
//!     capacity: 256,
//!     paging: Paging::Paged { page_tokens: 16 },
//!     query: rotq::QueryMode::Auto,
//! };
//! let mut cache = RotatedKvCache::on(spec, &Backend::open("cpu")?)?;
//! let rows = |n: usize| (0..n * 2 * 64).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>();
//! cache.append(&rows(10), &rows(10))?; // a prompt of 10 tokens
//! let q = rows(1); // one decode step, 2 query heads
//! let params = AttentionParams { causal: true, pos_offset: 9, ..Default::default() };
//! let out = cache.attention(&q, 1, 2, &params)?;
//! assert_eq!(out.len(), 2 * 64);
//! # Ok::<(), rotq::Error>(())
//! ```
#![forbid(unsafe_code)]

pub mod cache;
/// Checkpoint-driven rotation: a compressed-tensors `transform_config` (from a model's
/// `config.json`) as a [`RotationPlan`] per attention layer.
pub mod checkpoint;
pub mod defaults;
mod error;
pub mod pool;

pub use error::Error;
pub use rotq_cpu as cpu;
pub use rotq_cpu::QueryMode;
#[cfg(feature = "cuda")]
pub use rotq_cuda as cuda;
pub use rotq_reference as reference;
pub use rotq_reference::{
    attention, rotated_quantized_attention, AttentionParams, KvCacheSpec, KvFormat, Rotation,
    RotationPlan, RotationSpec,
};

/// The README's Rust code, compiled and run as a doctest so that the guide stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
