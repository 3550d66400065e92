//! ggml's linear block formats q8_0, q4_0, q4_1, q5_0, q5_1: byte-for-byte `quantize_row_*_ref`
//! and `dequantize_row_*`.
//!
//! Each quantizer repeats ggml's f32 arithmetic operation for operation (no fused multiply-add,
//! the same order), so the bytes are identical for every finite input. Two details matter for
//! that: the codes are computed with the *unrounded* f32 scale `id = 1/d`, while `d` is stored
//! rounded to f16; and the float → int conversions are C truncations (`(int8_t)(x + 8.5f)`),
//! or `roundf` (half away from zero) for q8_0, converted as [`trunc_i8`] says.
//!
//! Layouts (little-endian, one block of 32 values):
//! * q8_0 (34 B): `d: f16`, `qs: [i8; 32]`; value `qs[j]·d`.
//! * q4_0 (18 B): `d: f16`, `qs: [u8; 16]`; value `j` is the low nibble of `qs[j]`, value
//!   `j + 16` the high nibble; value `(q − 8)·d`.
//! * q4_1 (20 B): `d: f16`, `m: f16`, `qs: [u8; 16]` as q4_0; value `q·d + m`.
//! * q5_0 (22 B): `d: f16`, `qh: u32` (bit `j` = 5th bit of value `j`), `qs` as q4_0 for the
//!   low 4 bits; value `(q − 16)·d`.
//! * q5_1 (24 B): `d: f16`, `m: f16`, `qh`, `qs` as q5_0; value `q·d + m`.

use super::scalar::{f16_bits, f16_value, read_u16, write_u16, F16_NAN};

/// Values per block of every format here.
pub(crate) const QK: usize = 32;

/// ggml's absolute-maximum search that keeps the sign: the first element of largest |x|.
pub(crate) fn signed_abs_max(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// ggml's `min`/`max` scan starting from `±FLT_MAX`.
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// `d ? 1.0f/d : 0.0f`.
pub(crate) fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// C's `(int8_t)f` as ggml's x86-64 builds compute it: truncate toward zero to `int32`
/// (`cvttss2si`, which yields `INT32_MIN` for NaN and out-of-range values), keep the low byte.
///
/// In-range values (every code of a block with a normal scale) are plain truncations. The
/// out-of-range case arises only when `1/d` overflows f32 (a block whose largest |x| is below
/// about 1e-36): its codes come out 0, as ggml writes them on x86-64, and its f16 scale is 0
/// either way, so every value dequantizes to 0.
pub(crate) fn trunc_i8(f: f32) -> i8 {
    const LIMIT: f32 = 2_147_483_648.0; // 2^31
    if f.is_nan() || !(-LIMIT..LIMIT).contains(&f) {
        0
    } else {
        f as i32 as i8
    }
}

pub(crate) fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    let amax = x
        .iter()
        .fold(0.0f32, |m, v| if m > v.abs() { m } else { v.abs() });
    let d = amax / 127.0;
    let id = inverse(d);
    write_u16(out, 0, f16_bits(d));
    for (o, &v) in out[2..].iter_mut().zip(x) {
        *o = trunc_i8((v * id).round()) as u8;
    }
}

pub(crate) fn dequantize_q8_0(b: &[u8], out: &mut [f32]) {
    let d = f16_value(read_u16(b, 0));
    for (o, &q) in out.iter_mut().zip(&b[2..]) {
        *o = f32::from(q as i8) * d;
    }
}

pub(crate) fn quantize_q4_0(x: &[f32], out: &mut [u8]) {
    let d = signed_abs_max(x) / -8.0;
    let id = inverse(d);
    write_u16(out, 0, f16_bits(d));
    for j in 0..QK / 2 {
        let lo = trunc_i8(x[j] * id + 8.5).min(15) as u8;
        let hi = trunc_i8(x[j + QK / 2] * id + 8.5).min(15) as u8;
        out[2 + j] = lo | (hi << 4);
    }
}

pub(crate) fn dequantize_q4_0(b: &[u8], out: &mut [f32]) {
    let d = f16_value(read_u16(b, 0));
    for j in 0..QK / 2 {
        let q = b[2 + j];
        out[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        out[j + QK / 2] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

pub(crate) fn quantize_q4_1(x: &[f32], out: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    write_u16(out, 0, f16_bits(d));
    write_u16(out, 2, f16_bits(min));
    for j in 0..QK / 2 {
        let lo = trunc_i8((x[j] - min) * id + 0.5).min(15) as u8;
        let hi = trunc_i8((x[j + QK / 2] - min) * id + 0.5).min(15) as u8;
        out[4 + j] = lo | (hi << 4);
    }
}

pub(crate) fn dequantize_q4_1(b: &[u8], out: &mut [f32]) {
    let d = f16_value(read_u16(b, 0));
    let m = f16_value(read_u16(b, 2));
    for j in 0..QK / 2 {
        let q = b[4 + j];
        out[j] = f32::from(q & 0x0F) * d + m;
        out[j + QK / 2] = f32::from(q >> 4) * d + m;
    }
}

/// Packs 32 five-bit codes the ggml way: low nibbles as q4_0, 5th bits into `qh`.
fn pack5(codes: &[u8; QK], qh_qs: &mut [u8]) {
    let mut qh = 0u32;
    for j in 0..QK / 2 {
        let (c0, c1) = (codes[j], codes[j + QK / 2]);
        qh_qs[4 + j] = (c0 & 0x0F) | ((c1 & 0x0F) << 4);
        qh |= u32::from((c0 & 0x10) >> 4) << j;
        qh |= u32::from((c1 & 0x10) >> 4) << (j + QK / 2);
    }
    qh_qs[..4].copy_from_slice(&qh.to_le_bytes());
}

/// The 32 five-bit codes of a `qh` + `qs` pair.
fn unpack5(qh_qs: &[u8]) -> [u8; QK] {
    let qh = u32::from_le_bytes([qh_qs[0], qh_qs[1], qh_qs[2], qh_qs[3]]);
    let mut codes = [0u8; QK];
    for j in 0..QK / 2 {
        let q = qh_qs[4 + j];
        codes[j] = (q & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
        codes[j + QK / 2] = (q >> 4) | ((((qh >> (j + QK / 2)) & 1) as u8) << 4);
    }
    codes
}

pub(crate) fn quantize_q5_0(x: &[f32], out: &mut [u8]) {
    let d = signed_abs_max(x) / -16.0;
    let id = inverse(d);
    write_u16(out, 0, f16_bits(d));
    let mut codes = [0u8; QK];
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = trunc_i8(v * id + 16.5).min(31) as u8;
    }
    pack5(&codes, &mut out[2..]);
}

pub(crate) fn dequantize_q5_0(b: &[u8], out: &mut [f32]) {
    let d = f16_value(read_u16(b, 0));
    for (o, c) in out.iter_mut().zip(unpack5(&b[2..])) {
        *o = (i32::from(c) - 16) as f32 * d;
    }
}

pub(crate) fn quantize_q5_1(x: &[f32], out: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    write_u16(out, 0, f16_bits(d));
    write_u16(out, 2, f16_bits(min));
    let mut codes = [0u8; QK];
    for (c, &v) in codes.iter_mut().zip(x) {
        // `(uint8_t)(x0 + 0.5f)`: no clamp in ggml; the value is at most 31.5 by construction.
        *c = trunc_i8((v - min) * id + 0.5) as u8;
    }
    pack5(&codes, &mut out[4..]);
}

pub(crate) fn dequantize_q5_1(b: &[u8], out: &mut [f32]) {
    let d = f16_value(read_u16(b, 0));
    let m = f16_value(read_u16(b, 2));
    for (o, c) in out.iter_mut().zip(unpack5(&b[4..])) {
        *o = f32::from(c) * d + m;
    }
}

/// Poisons a block whose leading f16 scale(s) are `scales` fields: NaN scale(s), zero codes.
pub(crate) fn poison(out: &mut [u8], scales: usize) {
    out.fill(0);
    for s in 0..scales {
        write_u16(out, 2 * s, F16_NAN);
    }
}

/// The f16-stored scale of a block and its distance from the f32 scale used for the codes.
pub(crate) fn scale_error(d: f32) -> (f64, f64) {
    let stored = f16_value(f16_bits(d));
    (f64::from(d.abs()), (f64::from(d) - f64::from(stored)).abs())
}

/// Worst-case |x − dequant(quant(x))| for a block of a symmetric format whose codes span
/// `q_min..=q_max` steps of `d = |max| / steps_below`: one full step at the clamped end, at
/// most `q_span` steps times the f16 rounding of `d`.
pub(crate) fn symmetric_bound(x: &[f32], steps_below: f32, q_span: f64) -> f64 {
    let (d, dd) = scale_error(signed_abs_max(x) / steps_below);
    d + q_span * dd
}

/// Worst-case error of an affine (`q·d + m`) format: half a step, the f16 rounding of `d` over
/// `levels − 1` steps, and the f16 rounding of the minimum.
pub(crate) fn affine_bound(x: &[f32], levels: f32) -> f64 {
    let (min, max) = min_max(x);
    let (d, dd) = scale_error((max - min) / (levels - 1.0));
    let m_err = (f64::from(min) - f64::from(f16_value(f16_bits(min)))).abs();
    d / 2.0 + f64::from(levels - 1.0) * dd + m_err
}

/// Worst-case error of q8_0: half a step plus 127 times the f16 rounding of the step.
pub(crate) fn q8_0_bound(x: &[f32], _: &[u8]) -> f64 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let (d, dd) = scale_error(amax / 127.0);
    d / 2.0 + 127.0 * dd
}

pub(crate) fn q4_0_bound(x: &[f32], _: &[u8]) -> f64 {
    symmetric_bound(x, 8.0, 8.0)
}

pub(crate) fn q5_0_bound(x: &[f32], _: &[u8]) -> f64 {
    symmetric_bound(x, 16.0, 16.0)
}

pub(crate) fn q4_1_bound(x: &[f32], _: &[u8]) -> f64 {
    affine_bound(x, 16.0)
}

pub(crate) fn q5_1_bound(x: &[f32], _: &[u8]) -> f64 {
    affine_bound(x, 32.0)
}
