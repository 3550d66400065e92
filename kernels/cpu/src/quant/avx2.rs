//! AVX2 block codecs for q8_0 and q4_0, byte-identical to the oracle (ggml's reference).
//!
//! They repeat the reference arithmetic lane by lane: a multiply then a separate add (no FMA),
//! truncating conversions whose out-of-range result (`INT32_MIN`) keeps its low byte, exactly
//! as `rotq_reference`'s x86-64 semantics say. Blocks holding NaN/Inf are left to the caller.

#![cfg(target_arch = "x86_64")]

use half::f16;
use std::arch::x86_64::*;

/// Loads the 32 values of a block and returns them with their absolute values' maximum, or
/// `None` when a value is NaN or ±Inf.
#[inline(always)]
unsafe fn load_block(x: &[f32]) -> Option<([__m256; 4], f32)> {
    // SAFETY: only called from this module's kernels, which run with the target features these
    // intrinsics need and pass pointers and indices within the slices their callers gave them.
    unsafe {
        let p = x.as_ptr();
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let inf_bits = _mm256_set1_epi32(0x7F7F_FFFF);
        let mut v = [_mm256_setzero_ps(); 4];
        let mut amax = _mm256_setzero_ps();
        let mut bad = _mm256_setzero_si256();
        for (k, vk) in v.iter_mut().enumerate() {
            // SAFETY: the caller passes exactly 32 values.
            *vk = _mm256_loadu_ps(p.add(8 * k));
            let a = _mm256_and_ps(*vk, abs_mask);
            bad = _mm256_or_si256(bad, _mm256_cmpgt_epi32(_mm256_castps_si256(a), inf_bits));
            amax = _mm256_max_ps(amax, a);
        }
        if _mm256_movemask_epi8(bad) != 0 {
            return None;
        }
        let hi = _mm256_extractf128_ps::<1>(amax);
        let m = _mm_max_ps(_mm256_castps256_ps128(amax), hi);
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m));
        Some((v, _mm_cvtss_f32(m)))
    }
}

/// f32 → f16 bits, round to nearest even (F16C; the same bits as the oracle's conversion).
#[inline(always)]
unsafe fn f16_bits(x: f32) -> u16 {
    // SAFETY: only called from this module's kernels, which run with the target features these
    // intrinsics need and pass pointers and indices within the slices their callers gave them.
    unsafe {
        _mm_extract_epi16::<0>(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(x))) as u16
    }
}

/// The index of the first lane of the block whose magnitude equals `amax`.
#[inline(always)]
unsafe fn first_with_magnitude(v: &[__m256; 4], amax: f32) -> usize {
    // SAFETY: only called from this module's kernels, which run with the target features these
    // intrinsics need and pass pointers and indices within the slices their callers gave them.
    unsafe {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let target = _mm256_set1_ps(amax);
        let mut bits = 0u32;
        for (k, vk) in v.iter().enumerate() {
            let eq = _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_and_ps(*vk, abs_mask), target);
            bits |= (_mm256_movemask_ps(eq) as u32) << (8 * k);
        }
        bits.trailing_zeros() as usize
    }
}

/// `d ? 1/d : 0`.
#[inline(always)]
fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// q8_0: `d = amax/127`, codes `roundf(x·(1/d))` (half away from zero). Returns false (and
/// writes nothing) for a block holding NaN/Inf.
///
/// # Safety
/// AVX2 must be available; `x` holds 32 values and `out` 34 bytes.
#[target_feature(enable = "avx2,fma,f16c")]
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
            // A subnormal scale: the oracle's conversion rules decide the (all-zero) codes.
            return false;
        }
        let id = _mm256_set1_ps(id);
        out[..2].copy_from_slice(&f16_bits(d).to_le_bytes());
        let half = _mm256_set1_ps(0.5);
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
        let one = _mm256_set1_ps(1.0);
        let mut c = [_mm256_setzero_si256(); 4];
        for (ck, vk) in c.iter_mut().zip(v) {
            let s = _mm256_mul_ps(vk, id);
            // roundf: truncate, then step away from zero when the dropped part is at least 1/2.
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(s);
            let frac = _mm256_and_ps(_mm256_sub_ps(s, t), abs_mask);
            let up = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, half);
            let step = _mm256_and_ps(up, _mm256_or_ps(one, _mm256_and_ps(s, sign_mask)));
            *ck = _mm256_cvttps_epi32(_mm256_add_ps(t, step));
        }
        // Codes are within ±127, so the saturating packs are exact; then undo their lane order.
        let a = _mm256_packs_epi32(c[0], c[1]);
        let b = _mm256_packs_epi32(c[2], c[3]);
        let bytes = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(a, b),
            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
        );
        // SAFETY: out holds 34 bytes; 32 are written from offset 2.
        _mm256_storeu_si256(out.as_mut_ptr().add(2).cast(), bytes);
        true
    }
}

/// q4_0: `d = max/−8` (`max` the first value of largest magnitude), codes
/// `min(15, trunc(x·(1/d) + 8.5))`. Returns false for a block holding NaN/Inf.
///
/// # Safety
/// AVX2 must be available; `x` holds 32 values and `out` 18 bytes.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q4_0(x: &[f32], out: &mut [u8]) -> bool {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // intrinsic and pointer access below.
    unsafe {
        let Some((v, amax)) = load_block(x) else {
            return false;
        };
        // The first value whose magnitude is the maximum, with its sign (+0 for an all-zero block,
        // as ggml's scan that starts from +0 leaves it).
        let max = if amax == 0.0 {
            0.0
        } else {
            x[first_with_magnitude(&v, amax)]
        };
        let d = max / -8.0;
        let id = inverse(d);
        if !id.is_finite() {
            return false;
        }
        let id = _mm256_set1_ps(id);
        out[..2].copy_from_slice(&f16_bits(d).to_le_bytes());
        let offset = _mm256_set1_ps(8.5);
        let fifteen = _mm256_set1_epi32(15);
        let mut c = [_mm256_setzero_si256(); 4];
        for (ck, vk) in c.iter_mut().zip(v) {
            let s = _mm256_add_ps(_mm256_mul_ps(vk, id), offset);
            *ck = _mm256_min_epi32(_mm256_cvttps_epi32(s), fifteen);
        }
        // Byte j = code j | code (j + 16) << 4; codes are 0..=15.
        let w0 = _mm256_or_si256(c[0], _mm256_slli_epi32::<4>(c[2]));
        let w1 = _mm256_or_si256(c[1], _mm256_slli_epi32::<4>(c[3]));
        let words = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(w0, w1));
        let bytes = _mm_packus_epi16(
            _mm256_castsi256_si128(words),
            _mm256_extracti128_si256::<1>(words),
        );
        // SAFETY: out holds 18 bytes; 16 are written from offset 2.
        _mm_storeu_si128(out.as_mut_ptr().add(2).cast(), bytes);
        true
    }
}

/// Widens 8 bytes of signed codes to f32 and multiplies by `d`.
#[inline(always)]
unsafe fn scale_i8x8(p: *const u8, d: __m256) -> __m256 {
    // SAFETY: only called from this module's kernels, which run with the target features these
    // intrinsics need and pass pointers and indices within the slices their callers gave them.
    unsafe {
        // SAFETY: the caller guarantees 8 readable bytes at `p`.
        let b = _mm_loadl_epi64(p.cast());
        _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), d)
    }
}

/// Dequantizes one q8_0 block (34 bytes) into 32 values (inlined into its AVX2 caller).
#[inline(always)]
unsafe fn q8_0_block(b: &[u8], out: &mut [f32]) {
    // SAFETY: only called from this module's kernels, which run with the target features these
    // intrinsics need and pass pointers and indices within the slices their callers gave them.
    unsafe {
        let d = _mm256_set1_ps(f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32());
        for k in 0..4 {
            // SAFETY: bytes 2 + 8k .. 10 + 8k and values 8k .. 8k + 8 are in range for k < 4.
            _mm256_storeu_ps(
                out.as_mut_ptr().add(8 * k),
                scale_i8x8(b.as_ptr().add(2 + 8 * k), d),
            );
        }
    }
}

/// Dequantizes one q4_0 block (18 bytes) into 32 values (inlined into its AVX2 caller).
#[inline(always)]
unsafe fn q4_0_block(b: &[u8], out: &mut [f32]) {
    // SAFETY: only called from this module's kernels, which run with the target features these
    // intrinsics need and pass pointers and indices within the slices their callers gave them.
    unsafe {
        let d = _mm256_set1_ps(f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32());
        // SAFETY: bytes 2..18 are in range.
        let q = _mm_loadu_si128(b.as_ptr().add(2).cast());
        let low = _mm_and_si128(q, _mm_set1_epi8(0x0F));
        let high = _mm_and_si128(_mm_srli_epi16::<4>(q), _mm_set1_epi8(0x0F));
        let eight = _mm256_set1_epi32(8);
        let o = out.as_mut_ptr();
        for (k, nibbles) in [
            low,
            _mm_srli_si128::<8>(low),
            high,
            _mm_srli_si128::<8>(high),
        ]
        .into_iter()
        .enumerate()
        {
            let c = _mm256_sub_epi32(_mm256_cvtepu8_epi32(nibbles), eight);
            // SAFETY: values 8k .. 8k + 8 are in range for k < 4.
            _mm256_storeu_ps(o.add(8 * k), _mm256_mul_ps(_mm256_cvtepi32_ps(c), d));
        }
    }
}

/// Dequantizes a row of q8_0 blocks (34 bytes per 32 values).
///
/// # Safety
/// AVX2 and F16C must be available; `b` holds whole blocks for `out`'s values.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dequantize_row_q8_0(b: &[u8], out: &mut [f32]) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // intrinsic and pointer access below.
    unsafe {
        for (bb, o) in b.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
            q8_0_block(bb, o);
        }
    }
}

/// Dequantizes a row of q4_0 blocks (18 bytes per 32 values).
///
/// # Safety
/// AVX2 and F16C must be available; `b` holds whole blocks for `out`'s values.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dequantize_row_q4_0(b: &[u8], out: &mut [f32]) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // intrinsic and pointer access below.
    unsafe {
        for (bb, o) in b.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
            q4_0_block(bb, o);
        }
    }
}

/// f32 → f16 (round to nearest even, as the oracle) for a whole row.
///
/// # Safety
/// AVX2 and F16C must be available; `out.len() == 2 * x.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_f16(x: &[f32], out: &mut [u8]) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // intrinsic and pointer access below.
    unsafe {
        let n = x.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 <= x.len() and 2 * (i + 8) <= out.len().
            let h =
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(x.as_ptr().add(i)));
            _mm_storeu_si128(out.as_mut_ptr().add(2 * i).cast(), h);
        }
        for i in n..x.len() {
            out[2 * i..2 * i + 2].copy_from_slice(&f16::from_f32(x[i]).to_bits().to_le_bytes());
        }
    }
}

/// f16 → f32 for a whole row.
///
/// # Safety
/// AVX2 and F16C must be available; `b.len() == 2 * out.len()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dequantize_f16(b: &[u8], out: &mut [f32]) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // intrinsic and pointer access below.
    unsafe {
        let n = out.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            // SAFETY: 2 * (i + 8) <= b.len() and i + 8 <= out.len().
            let h = _mm_loadu_si128(b.as_ptr().add(2 * i).cast());
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        for i in n..out.len() {
            out[i] = f16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])).to_f32();
        }
    }
}

/// bf16 → f32 (a shift; NaNs quieted) for a whole row.
///
/// # Safety
/// AVX2 must be available; `b.len() == 2 * out.len()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dequantize_bf16(b: &[u8], out: &mut [f32]) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // intrinsic and pointer access below.
    unsafe {
        let n = out.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            // SAFETY: 2 * (i + 8) <= b.len() and i + 8 <= out.len().
            let h = _mm_loadu_si128(b.as_ptr().add(2 * i).cast());
            let w = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
            // NaNs come out quiet, as the oracle's conversion makes them.
            let abs = _mm256_and_si256(w, _mm256_set1_epi32(0x7FFF_FFFF));
            let nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7F80_0000));
            let w = _mm256_or_si256(w, _mm256_and_si256(nan, _mm256_set1_epi32(0x0040_0000)));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_castsi256_ps(w));
        }
        for i in n..out.len() {
            out[i] = half::bf16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])).to_f32();
        }
    }
}
