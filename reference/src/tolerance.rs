//! The one table of tolerances: how far an output may be from the oracle, per operation and
//! precision. Tests, fuzzers and the autotuner's correctness gate all read it from here.
//!
//! Two measures, both relative to the reference so they hold at any scale:
//! * `rel_l2 = ‖out − ref‖₂ / ‖ref‖₂`;
//! * `max_abs = max |out − ref| / max |ref|`.
//!
//! | operation | f64 | f32 | f16 | bf16 |
//! |---|---|---|---|---|
//! | rotation | 1e-12, 1e-12 | 4e-6, 1.6e-5 | 1e-3, 4e-3 | 8e-3, 3e-2 |
//! | attention | 1e-12, 1e-12 | 1e-5, 1e-4 | 2e-3, 1e-2 | 1.6e-2, 6e-2 |
//! | query quantization (q8_0) | 2.51e-2, 4.43e-3 | (same) | (same) | (same) |
//!
//! The precision is that of the arithmetic and storage of the output being checked (f32 for a
//! kernel that computes and stores in f32; f16 for one that stores f16). The f32 rotation
//! bound leaves room for an explicit-matrix rotation (an n-term f32 dot product per value,
//! about `√n · 2^−24` relative); the butterflies of the FWHT stay well inside it. Attention on a
//! quantized cache is compared with the oracle's attention on the *same* dequantized cache, so
//! quantization error is not part of these numbers: it is bounded separately, per format, by
//! [`crate::KvFormat::error_bound`].
//!
//! **Query quantization** ([`Op::QueryQuantization`]) bounds how far a q8_0 round trip of a
//! query row (`crate::attention::quantized_query`) lies from the row, whatever computed it.
//! The proof, per 32-value block `x` with `a = max |x_i|` and `d = a / 127`: the codes are
//! `c_i = round(x_i · f32(1/d))` (`|c_i| ≤ 127`; the f32 reciprocal moves `x_i / d` by at most
//! `127 · 2^−23`), the stored scale is `f16(d)` (`|f16(d) − d| ≤ 2^−11 d` while `d` is a
//! normal f16), so `|c_i f16(d) − x_i| ≤ 127 · 2^−11 d + (1/2 + 2^−16) d ≤ 0.5622 d =
//! 0.004427 a`. That is the max-abs bound (`a` is at most the row's largest value), and
//! summing over blocks (`32 a² ≤ 32 ‖x_b‖²`) gives `rel_l2 ≤ √32 · 0.004427 = 0.02504`. The
//! precondition, as in ggml: every block's `a` in `[127 · 2^−14, 127 · 65504]`, where `d` is a
//! normal f16; below it the scale loses bits (a block under `127 · 2^−25` becomes zeros),
//! above it the scale overflows. A score `τ q̂·k` then lies within `τ · 0.02504 ‖q‖ ‖k‖` of the
//! exact one (Cauchy–Schwarz): attention with quantized queries is held to the attention row
//! against the oracle *on the same quantized queries*; what the rounding costs in attention
//! probabilities is measured by `rotq eval --query q8_0` (docs/eval.md).
//!
//! Quantized bytes are compared exactly, with one exception: a kernel whose arithmetic differs
//! from the oracle's in the last bit (a fused multiply-add, a reciprocal instead of a division)
//! may pick the neighbouring code for a value whose scaled input lies within that rounding of a
//! code boundary; its tests must show that each differing code is such a case.

use crate::metrics::{max_abs_rel, rel_l2};
use std::fmt;

/// The largest `max |R·Rᵀ − I|` accepted for an explicit rotation matrix: loose enough for an
/// f32-stored checkpoint matrix of size up to 2^15, tight enough to catch a wrong one.
pub const ORTHOGONALITY_TOLERANCE: f64 = 1e-4;

/// An operation that has a tolerance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Any [`crate::Rotation`], forward or inverse.
    Rotation,
    /// Attention (prefill or decode) on a given cache.
    Attention,
    /// A query row's q8_0 round trip against the row (one bound at every precision: the
    /// module docs prove it).
    QueryQuantization,
}

/// The precision of the output being checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// f64 arithmetic (the oracle against itself).
    F64,
    /// f32 arithmetic and storage.
    F32,
    /// f16 storage.
    F16,
    /// bf16 storage.
    Bf16,
}

/// Allowed distance from the oracle.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// Largest `‖out − ref‖ / ‖ref‖`.
    pub rel_l2: f64,
    /// Largest `max |out − ref| / max |ref|`.
    pub max_abs: f64,
}

/// What a comparison measured, when it failed.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mismatch {
    /// Measured relative L2 error.
    pub rel_l2: f64,
    /// Measured relative max-abs error.
    pub max_abs: f64,
    /// The tolerance it was held to.
    pub tolerance: Tolerance,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rel_l2 {:e} (allowed {:e}), max_abs {:e} (allowed {:e})",
            self.rel_l2, self.tolerance.rel_l2, self.max_abs, self.tolerance.max_abs
        )
    }
}

/// The tolerance of `op` at `precision`.
///
/// ```
/// use rotq_reference::tolerance::{tolerance, Op, Precision};
/// let t = tolerance(Op::Rotation, Precision::F32);
/// assert!(t.check(&[1.0, 2.0], &[1.0, 2.0 + 1e-7]).is_ok());
/// assert!(t.check(&[1.0, 2.0], &[1.0, 2.1]).is_err());
/// ```
pub fn tolerance(op: Op, precision: Precision) -> Tolerance {
    let (rel_l2, max_abs) = match (op, precision) {
        (Op::QueryQuantization, _) => (2.51e-2, 4.43e-3),
        (_, Precision::F64) => (1e-12, 1e-12),
        (Op::Rotation, Precision::F32) => (4e-6, 1.6e-5),
        (Op::Rotation, Precision::F16) => (1e-3, 4e-3),
        (Op::Rotation, Precision::Bf16) => (8e-3, 3e-2),
        (Op::Attention, Precision::F32) => (1e-5, 1e-4),
        (Op::Attention, Precision::F16) => (2e-3, 1e-2),
        (Op::Attention, Precision::Bf16) => (1.6e-2, 6e-2),
    };
    Tolerance { rel_l2, max_abs }
}

impl Tolerance {
    /// Compares `out` with `reference`. Positions where both are NaN (a documented NaN result)
    /// or both the same infinity are skipped; a NaN on one side only, an infinity on one side
    /// only (an infinite error), or a length difference is a mismatch.
    pub fn check(&self, out: &[f64], reference: &[f64]) -> Result<(), Mismatch> {
        let one_sided_nan = out
            .iter()
            .zip(reference)
            .any(|(o, r)| o.is_nan() != r.is_nan());
        let (o, r): (Vec<f64>, Vec<f64>) = out
            .iter()
            .zip(reference)
            .filter(|(o, r)| {
                let both_nan = o.is_nan() && r.is_nan();
                let same_infinity = o.is_infinite() && o == r;
                !(both_nan || same_infinity)
            })
            .unzip();
        let (rel, max) = (rel_l2(&o, &r), max_abs_rel(&o, &r));
        if out.len() == reference.len()
            && !one_sided_nan
            && rel <= self.rel_l2
            && max <= self.max_abs
        {
            Ok(())
        } else {
            Err(Mismatch {
                rel_l2: rel,
                max_abs: max,
                tolerance: *self,
            })
        }
    }
}
