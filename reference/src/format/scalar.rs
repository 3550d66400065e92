//! Scalar conversions shared by the formats: IEEE half and bfloat16, and the block helpers.

use half::{bf16, f16};

/// f32 → f16 bits, round to nearest even, as ggml's `GGML_FP32_TO_FP16` (overflow → ±Inf).
pub(crate) fn f16_bits(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

/// f16 bits → f32 (exact).
pub(crate) fn f16_value(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// f32 → bf16 bits, round to nearest even.
pub(crate) fn bf16_bits(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

/// bf16 bits → f32 (exact).
pub(crate) fn bf16_value(bits: u16) -> f32 {
    bf16::from_bits(bits).to_f32()
}

/// The f16 quiet NaN that marks a poisoned block's scale (see the module docs of `format`).
pub(crate) const F16_NAN: u16 = 0x7E00;

/// Reads the little-endian u16 at `at`.
pub(crate) fn read_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// Writes `v` little-endian at `at`.
pub(crate) fn write_u16(bytes: &mut [u8], at: usize, v: u16) {
    bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

/// Largest |x| of a block (0 for an empty or all-zero block).
pub(crate) fn abs_max(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Whether every value of the block is finite; a block that is not is poisoned.
pub(crate) fn all_finite(x: &[f32]) -> bool {
    x.iter().all(|v| v.is_finite())
}

/// Slack for the f32 rounding of a dequantized value of magnitude up to `amax`:
/// a few ulps, plus the smallest subnormal step.
pub(crate) fn f32_slack(amax: f64) -> f64 {
    amax * 4.0 * f64::from(f32::EPSILON) + 1e-44
}
