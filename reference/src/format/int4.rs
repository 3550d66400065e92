//! int4: symmetric 4-bit integers with one f16 scale per group of 32 (rotq's own layout).
//!
//! The layout PyTorch-style int4 paths use: two's-complement-free offset codes packed in
//! consecutive pairs, and a symmetric range that keeps 0 exact and ±amax representable.
//!
//! * scale `s = amax / 7` (f32), stored as f16 in the first 2 bytes (little-endian);
//! * codes `q = round_half_even(x · (1/s))` clamped to `[−7, 7]` (computed with the unrounded
//!   f32 `1/s`; `1/s = 0` when `s = 0`), stored as `q + 8`;
//! * byte `2 + i` holds value `2i` in its low nibble and value `2i + 1` in its high nibble;
//! * value `(nibble − 8) · s_f16`.
//!
//! 18 bytes per 32 values (4.5 bits per value).

use super::ggml::inverse;
use super::scalar::{abs_max, f16_bits, f16_value, read_u16, write_u16};

pub(crate) fn quantize(x: &[f32], out: &mut [u8]) {
    let s = abs_max(x) / 7.0;
    let id = inverse(s);
    write_u16(out, 0, f16_bits(s));
    let code = |v: f32| ((v * id).round_ties_even().clamp(-7.0, 7.0) as i8 + 8) as u8;
    for (o, pair) in out[2..].iter_mut().zip(x.chunks_exact(2)) {
        *o = code(pair[0]) | (code(pair[1]) << 4);
    }
}

pub(crate) fn dequantize(b: &[u8], out: &mut [f32]) {
    let s = f16_value(read_u16(b, 0));
    for (pair, &q) in out.chunks_exact_mut(2).zip(&b[2..]) {
        pair[0] = (i32::from(q & 0x0F) - 8) as f32 * s;
        pair[1] = (i32::from(q >> 4) - 8) as f32 * s;
    }
}

/// Half a step, plus 7 times the f16 rounding of the step.
pub(crate) fn bound(x: &[f32], _: &[u8]) -> f64 {
    let s = abs_max(x) / 7.0;
    let dd = (f64::from(s) - f64::from(f16_value(f16_bits(s)))).abs();
    f64::from(s) / 2.0 + 7.0 * dd
}
