//! The AVX2 FWHT: stages 1, 2 and 4 inside each 8-lane register (with the input signs fused
//! into the load), then two stages per pass over the row (radix 4), the output factor fused
//! into the stores of the last pass.

#![cfg(target_arch = "x86_64")]

use super::portable::{self, Post};
use std::arch::x86_64::*;

/// `(u, v) ← (u + v, u − v)` on registers.
#[inline(always)]
unsafe fn bfly(u: __m256, v: __m256) -> (__m256, __m256) {
    // SAFETY: only called from this module's kernels, which run with the target features these
    // intrinsics need and pass pointers and indices within the slices their callers gave them.
    unsafe { (_mm256_add_ps(u, v), _mm256_sub_ps(u, v)) }
}

/// Stages 1, 2 and 4 within one register of 8 consecutive values.
#[inline(always)]
unsafe fn in_register(v: __m256) -> __m256 {
    // SAFETY: only called from this module's kernels, which run with the target features these
    // intrinsics need and pass pointers and indices within the slices their callers gave them.
    unsafe {
        // Stage 1: lane i pairs with i ^ 1; even lanes keep the sum, odd lanes the difference.
        let sw = _mm256_permute_ps::<0b10_11_00_01>(v);
        let v = _mm256_blend_ps::<0b1010_1010>(_mm256_add_ps(v, sw), _mm256_sub_ps(sw, v));
        // Stage 2: lane i pairs with i ^ 2.
        let sw = _mm256_permute_ps::<0b01_00_11_10>(v);
        let v = _mm256_blend_ps::<0b1100_1100>(_mm256_add_ps(v, sw), _mm256_sub_ps(sw, v));
        // Stage 4: lane i pairs with i ^ 4 (the other 128-bit half).
        let sw = _mm256_permute2f128_ps::<0x01>(v, v);
        _mm256_blend_ps::<0b1111_0000>(_mm256_add_ps(v, sw), _mm256_sub_ps(sw, v))
    }
}

/// Multiplies register `v`, which holds elements `i..i + 8`, by the output factor.
#[inline(always)]
unsafe fn finish(v: __m256, post: Option<Post<'_>>, i: usize) -> __m256 {
    // SAFETY: only called from this module's kernels, which run with the target features these
    // intrinsics need and pass pointers and indices within the slices their callers gave them.
    unsafe {
        match post {
            None => v,
            Some(Post::Scale(s)) => _mm256_mul_ps(v, _mm256_set1_ps(s)),
            // SAFETY: `i + 8 <= n` and a per-element factor vector has length n.
            Some(Post::Vector(p)) => _mm256_mul_ps(v, _mm256_loadu_ps(p.as_ptr().add(i))),
        }
    }
}

/// Unnormalized Sylvester transform with input factor `pre` and output factor `post`.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x.len()` must be a power of two, and `pre` / a `post`
/// vector must have length `x.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn fwht(x: &mut [f32], pre: Option<&[f32]>, post: Post<'_>) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // intrinsic and pointer access below.
    unsafe {
        let n = x.len();
        if n < 8 {
            portable::fwht(x, pre, post);
            return;
        }
        let p = x.as_mut_ptr();
        let last = if n == 8 { Some(post) } else { None };
        // SAFETY: (whole body) every index below is < n by the loop bounds, n is a multiple of 8,
        // and unaligned loads/stores are used throughout.
        for i in (0..n).step_by(8) {
            let mut v = _mm256_loadu_ps(p.add(i));
            if let Some(s) = pre {
                v = _mm256_mul_ps(v, _mm256_loadu_ps(s.as_ptr().add(i)));
            }
            _mm256_storeu_ps(p.add(i), finish(in_register(v), last, i));
        }
        let mut h = 8;
        while h < n {
            if 4 * h <= n {
                // Stages h and 2h at once over blocks of 4h.
                let last = if 4 * h == n { Some(post) } else { None };
                for base in (0..n).step_by(4 * h) {
                    for j in (base..base + h).step_by(8) {
                        let (a, b) = bfly(_mm256_loadu_ps(p.add(j)), _mm256_loadu_ps(p.add(j + h)));
                        let (c, d) = bfly(
                            _mm256_loadu_ps(p.add(j + 2 * h)),
                            _mm256_loadu_ps(p.add(j + 3 * h)),
                        );
                        let (ac0, ac1) = bfly(a, c);
                        let (bd0, bd1) = bfly(b, d);
                        _mm256_storeu_ps(p.add(j), finish(ac0, last, j));
                        _mm256_storeu_ps(p.add(j + h), finish(bd0, last, j + h));
                        _mm256_storeu_ps(p.add(j + 2 * h), finish(ac1, last, j + 2 * h));
                        _mm256_storeu_ps(p.add(j + 3 * h), finish(bd1, last, j + 3 * h));
                    }
                }
                h *= 4;
            } else {
                // One stage left (h = n/2).
                for j in (0..h).step_by(8) {
                    let (a, b) = bfly(_mm256_loadu_ps(p.add(j)), _mm256_loadu_ps(p.add(j + h)));
                    _mm256_storeu_ps(p.add(j), finish(a, Some(post), j));
                    _mm256_storeu_ps(p.add(j + h), finish(b, Some(post), j + h));
                }
                h *= 2;
            }
        }
    }
}

/// [`portable::mix`] compiled for AVX2 (the compiler vectorizes its inner loops 8 wide).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn mix(x: &[f32], y: &mut [f32], signs: &[f32], m: usize, post: Post<'_>) {
    portable::mix(x, y, signs, m, post)
}
