//! The element-wise formats: f32, f16, bf16 (little-endian, one value per "block").

use super::scalar::{bf16_bits, bf16_value, f16_bits, f16_value, read_u16, write_u16};

pub(crate) fn quantize_f32(x: &[f32], out: &mut [u8]) {
    out.copy_from_slice(&x[0].to_le_bytes());
}

pub(crate) fn dequantize_f32(b: &[u8], out: &mut [f32]) {
    out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

pub(crate) fn quantize_f16(x: &[f32], out: &mut [u8]) {
    write_u16(out, 0, f16_bits(x[0]));
}

pub(crate) fn dequantize_f16(b: &[u8], out: &mut [f32]) {
    out[0] = f16_value(read_u16(b, 0));
}

pub(crate) fn quantize_bf16(x: &[f32], out: &mut [u8]) {
    write_u16(out, 0, bf16_bits(x[0]));
}

pub(crate) fn dequantize_bf16(b: &[u8], out: &mut [f32]) {
    out[0] = bf16_value(read_u16(b, 0));
}

pub(crate) fn bound_f32(_: &[f32], _: &[u8]) -> f64 {
    0.0
}

/// Half an ulp (2^−11 relative), or half the smallest subnormal step (2^−25); infinite where
/// the value overflows f16.
pub(crate) fn bound_f16(x: &[f32], _: &[u8]) -> f64 {
    if f16_value(f16_bits(x[0])).is_infinite() {
        return f64::INFINITY;
    }
    f64::from(x[0].abs()) * 2f64.powi(-11) + 2f64.powi(-25)
}

/// Half an ulp (2^−8 relative), or half the smallest subnormal step (2^−134).
pub(crate) fn bound_bf16(x: &[f32], _: &[u8]) -> f64 {
    f64::from(x[0].abs()) * 2f64.powi(-8) + 2f64.powi(-134)
}
