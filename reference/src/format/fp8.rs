//! fp8_e4m3: OCP FP8 E4M3 ("e4m3fn": no infinities, max ±448) with one f32 scale per 32 values
//! (rotq's own layout).
//!
//! A per-block scale (rather than vLLM's per-tensor one) keeps the oracle row-local, like every
//! other format here.
//!
//! * scale `s = amax / 448` (f32), stored first as 4 little-endian bytes;
//! * codes: `v = x / s` (an f32 division, not a product with `1/s`: for a block of tiny values
//!   `s` is subnormal and `1/s` would overflow; `v = 0` when `s = 0`), then the E4M3 code whose
//!   value is nearest `v`, ties to the even code; `|v| > 448` saturates to ±448; the sign bit
//!   is `v`'s sign bit (so −0 encodes as `0x80`);
//! * byte `4 + j` holds value `j`; value `e4m3(code) · s`.
//!
//! E4M3 code `c`: sign `c >> 7`, exponent `e = (c >> 3) & 15`, mantissa `m = c & 7`; value
//! `m · 2^−9` when `e = 0`, else `(1 + m/8) · 2^(e−7)`; `0x7F`/`0xFF` are NaN.
//! 36 bytes per 32 values (9 bits per value).

use super::scalar::abs_max;

/// The largest finite E4M3 magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// Value of a non-negative, non-NaN E4M3 code `0..=0x7E`.
fn magnitude(c: u8) -> f64 {
    let (e, m) = (i32::from((c >> 3) & 0x0F), f64::from(c & 0x07));
    if e == 0 {
        m * 2f64.powi(-9)
    } else {
        (1.0 + m / 8.0) * 2f64.powi(e - 7)
    }
}

/// The E4M3 code nearest `v` (ties to even, saturating at ±448; NaN → 0x7F).
///
/// ```
/// use rotq_reference::format::fp8::{e4m3_decode, e4m3_encode};
/// assert_eq!(e4m3_decode(e4m3_encode(1.0625)), 1.0); // a tie between 1.0 and 1.125: even wins
/// assert_eq!(e4m3_decode(e4m3_encode(1e9)), 448.0);
/// ```
pub fn e4m3_encode(v: f32) -> u8 {
    if v.is_nan() {
        return 0x7F;
    }
    let sign = if v.is_sign_negative() { 0x80 } else { 0x00 };
    let a = f64::from(v.abs());
    // The finite magnitudes increase with the code: find the first code at or above `a`.
    let above = (0u8..=0x7E).find(|&c| magnitude(c) >= a).unwrap_or(0x7E);
    let code = if above == 0 || magnitude(above) == a {
        above
    } else {
        let below = above - 1;
        let (dl, du) = (a - magnitude(below), magnitude(above) - a);
        if dl < du || (dl == du && below % 2 == 0) {
            below
        } else {
            above
        }
    };
    sign | code
}

/// The value of an E4M3 code.
pub fn e4m3_decode(c: u8) -> f32 {
    let a = c & 0x7F;
    if a == 0x7F {
        return f32::NAN;
    }
    let m = magnitude(a) as f32;
    if c & 0x80 != 0 {
        -m
    } else {
        m
    }
}

pub(crate) fn quantize(x: &[f32], out: &mut [u8]) {
    let s = abs_max(x) / E4M3_MAX;
    out[..4].copy_from_slice(&s.to_le_bytes());
    for (o, &v) in out[4..].iter_mut().zip(x) {
        *o = e4m3_encode(if s == 0.0 { 0.0 } else { v / s });
    }
}

pub(crate) fn dequantize(b: &[u8], out: &mut [f32]) {
    let s = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (o, &c) in out.iter_mut().zip(&b[4..]) {
        *o = e4m3_decode(c) * s;
    }
}

/// Poisoned block: NaN scale, zero codes.
pub(crate) fn poison(out: &mut [u8]) {
    out.fill(0);
    out[..4].copy_from_slice(&f32::NAN.to_le_bytes());
}

/// Half an E4M3 step: 2^−4 relative for normals, 2^−10 absolute (in code units) for subnormals.
pub(crate) fn bound(x: &[f32], _: &[u8]) -> f64 {
    let amax = f64::from(abs_max(x));
    let s = amax / f64::from(E4M3_MAX);
    amax / 16.0 + s / 1024.0
}
