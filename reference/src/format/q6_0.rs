//! q6_0 as ik_llama.cpp lays it out: 6-bit symmetric codes, one f16 scale per 32 values.
//!
//! Layout (26 B): `d: f16`, `qh: [u8; 8]`, `qs: [u8; 16]`. Codes `q ∈ 0..64`, value
//! `(q − 32)·d`. The low 4 bits of value `j` (`j < 16`) are the low nibble of `qs[j]`, those of
//! value `j + 16` its high nibble. The two high bits of values `j` and `j + 16` form
//! `h = (q_j >> 4) | ((q_{j+16} >> 4) << 2)`, stored in `qh[j % 8]` at bit `4·(j / 8)`.
//!
//! Quantization follows ik_llama.cpp's CPU `quantize_row_q6_0_ref` operation for operation:
//! ggml's q5_0 recipe with 6 bits for the codes (`d = max / −32`, `max` the first element of
//! largest |x| with its sign; `q = min(63, (int8)(x·(1/d) + 32.5))`), then the stored scale is
//! refined to the weighted least-squares `Σ w·x·q' / Σ w·q'²` over `q' = q − 32` with weights
//! `w = (x/d)²` (plain `d` when that denominator is 0). ik_llama.cpp's CUDA copy kernel stores
//! the plain `d` instead; the codes are the same either way.

use super::ggml::{inverse, signed_abs_max, trunc_i8, QK};
use super::scalar::{f16_bits, f16_value, read_u16, write_u16};

pub(crate) fn quantize(x: &[f32], out: &mut [u8]) {
    let d = signed_abs_max(x) / -32.0;
    let id = inverse(d);
    let (qh, qs) = out[2..].split_at_mut(QK / 4);
    qh.fill(0);
    let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
    for j in 0..QK / 2 {
        let (x0, x1) = (x[j] * id, x[j + QK / 2] * id);
        let (w0, w1) = (x0 * x0, x1 * x1);
        let c0 = trunc_i8(x0 + 32.5).min(63) as u8;
        let c1 = trunc_i8(x1 + 32.5).min(63) as u8;
        qs[j] = (c0 & 0x0F) | ((c1 & 0x0F) << 4);
        let h = (c0 >> 4) | ((c1 >> 4) << 2);
        qh[j % (QK / 4)] |= h << (4 * (j / (QK / 4)));
        let (q0, q1) = (f32::from(c0) - 32.0, f32::from(c1) - 32.0);
        sumqx += w0 * x[j] * q0 + w1 * x[j + QK / 2] * q1;
        sumq2 += w0 * q0 * q0 + w1 * q1 * q1;
    }
    let stored = if sumq2 > 0.0 { sumqx / sumq2 } else { d };
    write_u16(out, 0, f16_bits(stored));
}

pub(crate) fn dequantize(b: &[u8], out: &mut [f32]) {
    let d = f16_value(read_u16(b, 0));
    let (qh, qs) = b[2..].split_at(QK / 4);
    for j in 0..QK / 2 {
        let h = qh[j % (QK / 4)] >> (4 * (j / (QK / 4)));
        let c0 = (qs[j] & 0x0F) | ((h << 4) & 0x30);
        let c1 = (qs[j] >> 4) | ((h << 2) & 0x30);
        out[j] = (i32::from(c0) - 32) as f32 * d;
        out[j + QK / 2] = (i32::from(c1) - 32) as f32 * d;
    }
}

/// One step at the clamped end (codes are chosen with the plain `d`), plus 32 times the
/// distance between `d` and the stored (refined, f16) scale.
pub(crate) fn bound(x: &[f32], bytes: &[u8]) -> f64 {
    let d = signed_abs_max(x) / -32.0;
    let stored = f16_value(read_u16(bytes, 0));
    f64::from(d.abs()) + 32.0 * (f64::from(d) - f64::from(stored)).abs()
}
