//! `rotq-reference`: the oracle of rotq, and the vocabulary every other crate shares.
//!
//! It is the specification: dense, slow and obviously right, accumulating in f64.
//! * [`hadamard`]: the one Hadamard spec (Sylvester powers of two up to 2^15, and
//!   `m·2^k` for `m ∈ {12, 20, 28, 40}` interoperable with Dao-AILab fast-hadamard-transform);
//! * [`rotation`]: Hadamard, block-diagonal, randomized (seeded, reproducible) and explicit
//!   orthogonal rotations, forward and inverse;
//! * [`format`]: the one registry of KV-cache formats (ggml byte-exact q8_0, q4_0, q4_1, q5_0,
//!   q5_1, iq4_nl; ik_llama.cpp's q6_0; int4; fp8 e4m3; f32/f16/bf16);
//! * [`attention`]: dense attention (GQA/MQA, causal with offset, sliding window, soft-cap,
//!   additive mask, log-sum-exp), unquantized and on a rotated, quantized cache;
//! * [`lloyd_max`] and [`turboquant`]: TurboQuant's Lloyd–Max codebooks (computed exactly,
//!   checked in) and its MSE and inner-product (QJL) quantizers of a rotated row;
//! * [`rope`]: RoPE position shifts, and the context shift of a rotated, quantized K cache;
//! * [`metrics`] and the one [`tolerance`] table; the one [`Error`];
//! * [`tuned`]: the tuning cache the autotuner writes and the kernels read.
//!
//! ```
//! use rotq_reference::{KvFormat, Rotation};
//! // Rotate a row with an outlier, quantize it to q4_0, and undo both.
//! let mut x: Vec<f64> = (0..128).map(|i| ((i * 37 % 11) as f64 - 5.0) * 0.1).collect();
//! x[3] = 40.0;
//! let r = Rotation::hadamard(128).unwrap();
//! r.forward_in_place(&mut x).unwrap();
//! let x32: Vec<f32> = x.iter().map(|v| *v as f32).collect();
//! let codes = KvFormat::Q4_0.quantize_row(&x32).unwrap();
//! let mut y: Vec<f64> = KvFormat::Q4_0.dequantize_row(&codes).unwrap().into_iter().map(f64::from).collect();
//! r.inverse_in_place(&mut y).unwrap();
//! assert!((y[3] - 40.0).abs() < 1.0);
//! ```
#![deny(unsafe_code)]

pub mod attention;
mod error;
pub mod format;
pub mod hadamard;
pub mod lloyd_max;
pub mod metrics;
pub mod rope;
pub mod rotation;
pub mod tolerance;
pub mod tuned;
pub mod turboquant;

pub use attention::{
    attention, attention_f64, attention_f64_masked, attention_masked, rotated_quantized_attention,
    Attention, AttentionParams, AttentionShape, KvCacheSpec, RotationPlan,
};
pub use error::{Error, Result};
pub use format::KvFormat;
pub use rotation::{Rotation, RotationSpec};
