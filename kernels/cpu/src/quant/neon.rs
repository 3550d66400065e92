//! NEON block codecs for q8_0 and q4_0, byte-identical to the oracle (ggml's reference).
//!
//! As on AVX2: a multiply then a separate add (no fused multiply-add), `roundf` as `vrndaq`
//! (ties away from zero), truncating conversions. NEON's conversions saturate where x86's
//! return `INT32_MIN`, so blocks whose `1/d` overflows (where the oracle follows x86) are left
//! to the caller, like blocks holding NaN/Inf.

#![cfg(target_arch = "aarch64")]

use half::f16;
use std::arch::aarch64::*;

/// Loads a block of 32 values; `None` when one is NaN or ±Inf. Returns the largest magnitude.
#[inline(always)]
unsafe fn load_block(x: &[f32]) -> Option<([float32x4_t; 8], f32)> {
    // SAFETY: only called from this module's kernels, which run with the target features these
    // intrinsics need and pass pointers and indices within the slices their callers gave them.
    unsafe {
        let mut v = [vdupq_n_f32(0.0); 8];
        let mut amax = vdupq_n_f32(0.0);
        let mut bad = vdupq_n_u32(0);
        let limit = vdupq_n_u32(0x7F7F_FFFF);
        for (k, vk) in v.iter_mut().enumerate() {
            // SAFETY: the caller passes exactly 32 values.
            *vk = vld1q_f32(x.as_ptr().add(4 * k));
            let a = vabsq_f32(*vk);
            bad = vorrq_u32(bad, vcgtq_u32(vreinterpretq_u32_f32(a), limit));
            amax = vmaxq_f32(amax, a);
        }
        if vmaxvq_u32(bad) != 0 {
            return None;
        }
        Some((v, vmaxvq_f32(amax)))
    }
}

#[inline(always)]
fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// q8_0 (see the AVX2 twin). Returns false, writing nothing, for blocks left to the caller.
///
/// # Safety
/// NEON must be available; `x` holds 32 values and `out` 34 bytes.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn quantize_q8_0(x: &[f32], out: &mut [u8]) -> bool {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // intrinsic and pointer access below.
    unsafe {
        let Some((v, amax)) = load_block(x) else {
            return false;
        };
        let d = amax / 127.0;
        let id = inverse(d);
        if !id.is_finite() {
            return false;
        }
        out[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        for (k, vk) in v.iter().enumerate() {
            let c = vcvtq_s32_f32(vrndaq_f32(vmulq_n_f32(*vk, id)));
            // Narrow the four codes (within ±127) to bytes.
            let mut lanes = [0i32; 4];
            vst1q_s32(lanes.as_mut_ptr(), c);
            for (j, l) in lanes.iter().enumerate() {
                out[2 + 4 * k + j] = *l as i8 as u8;
            }
        }
        true
    }
}

/// q4_0 (see the AVX2 twin). Returns false, writing nothing, for blocks left to the caller.
///
/// # Safety
/// NEON must be available; `x` holds 32 values and `out` 18 bytes.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn quantize_q4_0(x: &[f32], out: &mut [u8]) -> bool {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // intrinsic and pointer access below.
    unsafe {
        let Some((v, amax)) = load_block(x) else {
            return false;
        };
        let max = if amax == 0.0 {
            0.0
        } else {
            x[x.iter().position(|e| e.abs() == amax).unwrap_or(0)]
        };
        let d = max / -8.0;
        let id = inverse(d);
        if !id.is_finite() {
            return false;
        }
        out[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        let offset = vdupq_n_f32(8.5);
        let fifteen = vdupq_n_s32(15);
        let mut codes = [0i32; 32];
        for (k, vk) in v.iter().enumerate() {
            let s = vaddq_f32(vmulq_n_f32(*vk, id), offset);
            // SAFETY: codes has 32 slots; k < 8.
            vst1q_s32(
                codes.as_mut_ptr().add(4 * k),
                vminq_s32(vcvtq_s32_f32(s), fifteen),
            );
        }
        for j in 0..16 {
            out[2 + j] = (codes[j] as u8 & 0x0F) | ((codes[j + 16] as u8) << 4);
        }
        true
    }
}

/// Dequantizes a row of q8_0 blocks.
///
/// # Safety
/// NEON must be available; `b` holds whole blocks for `out`'s values.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn dequantize_row_q8_0(b: &[u8], out: &mut [f32]) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // intrinsic and pointer access below.
    unsafe {
        for (bb, o) in b.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
            let d = f16::from_bits(u16::from_le_bytes([bb[0], bb[1]])).to_f32();
            for k in 0..4 {
                // SAFETY: bytes 2 + 8k .. 10 + 8k and values 8k .. 8k + 8 exist for k < 4.
                let q = vmovl_s8(vld1_s8(bb.as_ptr().add(2 + 8 * k).cast()));
                let lo = vcvtq_f32_s32(vmovl_s16(vget_low_s16(q)));
                let hi = vcvtq_f32_s32(vmovl_s16(vget_high_s16(q)));
                vst1q_f32(o.as_mut_ptr().add(8 * k), vmulq_n_f32(lo, d));
                vst1q_f32(o.as_mut_ptr().add(8 * k + 4), vmulq_n_f32(hi, d));
            }
        }
    }
}

/// Dequantizes a row of q4_0 blocks.
///
/// # Safety
/// NEON must be available; `b` holds whole blocks for `out`'s values.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn dequantize_row_q4_0(b: &[u8], out: &mut [f32]) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // intrinsic and pointer access below.
    unsafe {
        for (bb, o) in b.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
            let d = f16::from_bits(u16::from_le_bytes([bb[0], bb[1]])).to_f32();
            // SAFETY: bytes 2..18 exist.
            let q = vld1q_u8(bb.as_ptr().add(2));
            let low = vandq_u8(q, vdupq_n_u8(0x0F));
            let high = vshrq_n_u8::<4>(q);
            for (k, nibbles) in [
                vget_low_u8(low),
                vget_high_u8(low),
                vget_low_u8(high),
                vget_high_u8(high),
            ]
            .into_iter()
            .enumerate()
            {
                let c = vsubq_s16(vreinterpretq_s16_u16(vmovl_u8(nibbles)), vdupq_n_s16(8));
                let lo = vcvtq_f32_s32(vmovl_s16(vget_low_s16(c)));
                let hi = vcvtq_f32_s32(vmovl_s16(vget_high_s16(c)));
                // SAFETY: values 8k .. 8k + 8 exist for k < 4.
                vst1q_f32(o.as_mut_ptr().add(8 * k), vmulq_n_f32(lo, d));
                vst1q_f32(o.as_mut_ptr().add(8 * k + 4), vmulq_n_f32(hi, d));
            }
        }
    }
}
