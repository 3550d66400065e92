//! The NEON FWHT: stages 1 and 2 inside each 4-lane register (with the input signs fused into
//! the load), then two stages per pass over the row (radix 4), the output factor fused into
//! the stores of the last pass. The same passes as the AVX2 path with 4-lane registers.

#![cfg(target_arch = "aarch64")]

use super::portable::{self, Post};
use std::arch::aarch64::*;

#[inline(always)]
unsafe fn bfly(u: float32x4_t, v: float32x4_t) -> (float32x4_t, float32x4_t) {
    // SAFETY: only called from this module's kernels, which run with the target features these
    // intrinsics need and pass pointers and indices within the slices their callers gave them.
    unsafe { (vaddq_f32(u, v), vsubq_f32(u, v)) }
}

/// Stages 1 and 2 within one register of 4 consecutive values.
#[inline(always)]
unsafe fn in_register(v: float32x4_t) -> float32x4_t {
    // SAFETY: only called from this module's kernels, which run with the target features these
    // intrinsics need and pass pointers and indices within the slices their callers gave them.
    unsafe {
        // Stage 1: [a, b, c, d] → [a + b, a − b, c + d, c − d].
        let r = vrev64q_f32(v);
        let v = vtrn1q_f32(vaddq_f32(v, r), vsubq_f32(v, r));
        // Stage 2: [a, b, c, d] → [a + c, b + d, a − c, b − d].
        let (lo, hi) = (vget_low_f32(v), vget_high_f32(v));
        vcombine_f32(vadd_f32(lo, hi), vsub_f32(lo, hi))
    }
}

#[inline(always)]
unsafe fn finish(v: float32x4_t, post: Option<Post<'_>>, i: usize) -> float32x4_t {
    // SAFETY: only called from this module's kernels, which run with the target features these
    // intrinsics need and pass pointers and indices within the slices their callers gave them.
    unsafe {
        match post {
            None => v,
            Some(Post::Scale(s)) => vmulq_n_f32(v, s),
            // SAFETY: `i + 4 <= n` and a per-element factor vector has length n.
            Some(Post::Vector(p)) => vmulq_f32(v, vld1q_f32(p.as_ptr().add(i))),
        }
    }
}

/// Unnormalized Sylvester transform with input factor `pre` and output factor `post`.
///
/// # Safety
/// NEON must be available; `x.len()` must be a power of two, and `pre` / a `post` vector must
/// have length `x.len()`.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn fwht(x: &mut [f32], pre: Option<&[f32]>, post: Post<'_>) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // intrinsic and pointer access below.
    unsafe {
        let n = x.len();
        if n < 4 {
            portable::fwht(x, pre, post);
            return;
        }
        let p = x.as_mut_ptr();
        let last = if n == 4 { Some(post) } else { None };
        // SAFETY: (whole body) every index below is < n by the loop bounds and n is a multiple
        // of 4.
        for i in (0..n).step_by(4) {
            let mut v = vld1q_f32(p.add(i));
            if let Some(s) = pre {
                v = vmulq_f32(v, vld1q_f32(s.as_ptr().add(i)));
            }
            vst1q_f32(p.add(i), finish(in_register(v), last, i));
        }
        let mut h = 4;
        while h < n {
            if 4 * h <= n {
                let last = if 4 * h == n { Some(post) } else { None };
                for base in (0..n).step_by(4 * h) {
                    for j in (base..base + h).step_by(4) {
                        let (a, b) = bfly(vld1q_f32(p.add(j)), vld1q_f32(p.add(j + h)));
                        let (c, d) = bfly(vld1q_f32(p.add(j + 2 * h)), vld1q_f32(p.add(j + 3 * h)));
                        let (ac0, ac1) = bfly(a, c);
                        let (bd0, bd1) = bfly(b, d);
                        vst1q_f32(p.add(j), finish(ac0, last, j));
                        vst1q_f32(p.add(j + h), finish(bd0, last, j + h));
                        vst1q_f32(p.add(j + 2 * h), finish(ac1, last, j + 2 * h));
                        vst1q_f32(p.add(j + 3 * h), finish(bd1, last, j + 3 * h));
                    }
                }
                h *= 4;
            } else {
                for j in (0..h).step_by(4) {
                    let (a, b) = bfly(vld1q_f32(p.add(j)), vld1q_f32(p.add(j + h)));
                    vst1q_f32(p.add(j), finish(a, Some(post), j));
                    vst1q_f32(p.add(j + h), finish(b, Some(post), j + h));
                }
                h *= 2;
            }
        }
    }
}
