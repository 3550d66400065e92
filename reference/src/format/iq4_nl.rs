//! ggml's iq4_nl: 4-bit codes into a fixed non-linear codebook, one f16 scale per 32 values.
//!
//! Byte-for-byte `quantize_iq4_nl(src, dst, 1, n, NULL)` (no importance weights, so each value
//! is weighted by `x²`, and 7 scale trials either side of the first guess) and
//! `dequantize_row_iq4_nl`. Layout (18 B): `d: f16`, `qs: [u8; 16]`, value `j` the low nibble of
//! `qs[j]` and value `j + 16` its high nibble; value `d · KVALUES[q]`.
//!
//! As in ggml the f32 sums run in index order without fused multiply-add.

use super::ggml::QK;
use super::scalar::{f16_bits, f16_value, read_u16, write_u16};

/// The iq4_nl codebook (`kvalues_iq4nl`).
pub const KVALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Scale trials either side of the first guess (`ntry` in ggml).
const NTRY: i32 = 7;

/// Blocks whose largest |x| is below this are stored as all zeros (`GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// Index of the codebook value nearest `x` (ties go up), as ggml's `best_index_int8`.
fn best_index(x: f32) -> usize {
    let v = |i: usize| f32::from(KVALUES[i]);
    if x <= v(0) {
        return 0;
    }
    if x >= v(15) {
        return 15;
    }
    let (mut lo, mut hi) = (0usize, 15usize);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if x < v(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    if x - v(hi - 1) < v(hi) - x {
        hi - 1
    } else {
        hi
    }
}

/// `Σ w·q·x` and `Σ w·q²` over the block for codes chosen with inverse scale `id`.
fn weighted_sums(x: &[f32], id: f32) -> (f32, f32) {
    let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
    for &v in x {
        let q = f32::from(KVALUES[best_index(id * v)]);
        let w = v * v;
        sumqx += w * q * v;
        sumq2 += w * q * q;
    }
    (sumqx, sumq2)
}

/// The scale ggml picks for one block (0 for a block below `GROUP_MAX_EPS`).
fn block_scale(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        return 0.0;
    }
    let v0 = f32::from(KVALUES[0]);
    let d = -max / v0;
    let (sumqx, sumq2) = weighted_sums(x, 1.0 / d);
    let mut d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
    let mut best = d * sumqx;
    for itry in -NTRY..=NTRY {
        let id = (itry as f32 + v0) / max;
        let (sumqx, sumq2) = weighted_sums(x, id);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    d
}

pub(crate) fn quantize(x: &[f32], out: &mut [u8]) {
    let d = block_scale(x);
    write_u16(out, 0, f16_bits(d));
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for j in 0..QK / 2 {
        let lo = best_index(id * x[j]) as u8;
        let hi = best_index(id * x[j + QK / 2]) as u8;
        out[2 + j] = lo | (hi << 4);
    }
}

pub(crate) fn dequantize(b: &[u8], out: &mut [f32]) {
    let d = f16_value(read_u16(b, 0));
    for j in 0..QK / 2 {
        let q = b[2 + j];
        out[j] = d * f32::from(KVALUES[usize::from(q & 0x0F)]);
        out[j + QK / 2] = d * f32::from(KVALUES[usize::from(q >> 4)]);
    }
}

/// Worst-case error given the stored scale `d`: half the widest codebook gap (24) inside the
/// codebook's range, plus whatever lies beyond `−127·|d|` or `113·|d|`, plus the f16 rounding
/// of the scale over the largest code (127).
pub(crate) fn bound(x: &[f32], bytes: &[u8]) -> f64 {
    let d32 = block_scale(x);
    let stored = f64::from(f16_value(read_u16(bytes, 0))).abs();
    let dd = (f64::from(d32) - f64::from(f16_value(f16_bits(d32)))).abs();
    let amax = x.iter().fold(0.0f64, |m, v| m.max(f64::from(v.abs())));
    let beyond = (amax - 113.0 * stored).max(0.0);
    12.0 * stored + beyond + 127.0 * dd
}
