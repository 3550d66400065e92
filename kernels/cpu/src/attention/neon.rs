//! NEON helpers of the attention kernel.

use std::arch::aarch64::*;

/// Dot products of the `out.len()` rows of `q` with `k`, two accumulators per row.
///
/// # Safety
/// NEON must be available; `q.len() == out.len() * k.len()`.
#[target_feature(enable = "neon")]
pub(super) unsafe fn dots(q: &[f32], k: &[f32], out: &mut [f32]) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // intrinsic and pointer access below.
    unsafe {
        let d = k.len();
        let d4 = d / 4 * 4;
        let pk = k.as_ptr();
        for (r, o) in out.iter_mut().enumerate() {
            let pq = q.as_ptr().add(r * d);
            let (mut a0, mut a1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
            let mut i = 0;
            // SAFETY: every load reads 4 values below d4 <= d in `q`'s row r or in `k`.
            while i + 8 <= d4 {
                a0 = vfmaq_f32(a0, vld1q_f32(pq.add(i)), vld1q_f32(pk.add(i)));
                a1 = vfmaq_f32(a1, vld1q_f32(pq.add(i + 4)), vld1q_f32(pk.add(i + 4)));
                i += 8;
            }
            if i < d4 {
                a0 = vfmaq_f32(a0, vld1q_f32(pq.add(i)), vld1q_f32(pk.add(i)));
            }
            let mut total = vaddvq_f32(vaddq_f32(a0, a1));
            for j in d4..d {
                total += q[r * d + j] * k[j];
            }
            *o = total;
        }
    }
}

/// `exp(x)` for 4 lanes (the same polynomial and special cases as the AVX2 path).
#[inline(always)]
unsafe fn exp4(x: float32x4_t) -> float32x4_t {
    // SAFETY: only called from this module's kernels, which run with the target features these
    // intrinsics need and pass pointers and indices within the slices their callers gave them.
    unsafe {
        let hi = vdupq_n_f32(88.376_26);
        let lo = vdupq_n_f32(-87.336_55);
        let xc = vminq_f32(vmaxq_f32(x, lo), hi);
        let k = vrndnq_f32(vmulq_n_f32(xc, std::f32::consts::LOG2_E));
        let r = vfmsq_f32(xc, k, vdupq_n_f32(0.693_359_4));
        let r = vfmsq_f32(r, k, vdupq_n_f32(-2.121_944_4e-4));
        let mut p = vdupq_n_f32(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = vfmaq_f32(vdupq_n_f32(c), p, r);
        }
        let y = vaddq_f32(vfmaq_f32(r, p, vmulq_f32(r, r)), vdupq_n_f32(1.0));
        let pow2 = vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(k), vdupq_n_s32(127)));
        let v = vmulq_f32(y, vreinterpretq_f32_s32(pow2));
        let v = vbslq_f32(vcltq_f32(x, lo), vdupq_n_f32(0.0), v);
        let v = vbslq_f32(vcgtq_f32(x, hi), vdupq_n_f32(f32::INFINITY), v);
        // NaN lanes compare unequal to themselves: keep them.
        vbslq_f32(vceqq_f32(x, x), v, x)
    }
}

/// `row[i] ← exp(row[i] − m)`, returning the sum.
///
/// # Safety
/// NEON must be available.
#[target_feature(enable = "neon")]
pub(super) unsafe fn exp_shifted(row: &mut [f32], m: f32) -> f32 {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // intrinsic and pointer access below.
    unsafe {
        let n4 = row.len() / 4 * 4;
        let mv = vdupq_n_f32(m);
        let mut sum = vdupq_n_f32(0.0);
        let p = row.as_mut_ptr();
        // SAFETY: i + 4 <= n4 <= row.len().
        for i in (0..n4).step_by(4) {
            let e = exp4(vsubq_f32(vld1q_f32(p.add(i)), mv));
            vst1q_f32(p.add(i), e);
            sum = vaddq_f32(sum, e);
        }
        let mut total = vaddvq_f32(sum);
        for v in &mut row[n4..] {
            *v = (*v - m).exp();
            total += *v;
        }
        total
    }
}

/// `acc += Σ_t w[t] · rows[t]`, 32 columns at a time held in registers across the rows.
///
/// # Safety
/// NEON must be available; `rows.len() == w.len() * acc.len()`.
#[target_feature(enable = "neon")]
pub(super) unsafe fn weighted_sum(acc: &mut [f32], w: &[f32], rows: &[f32]) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // intrinsic and pointer access below.
    unsafe {
        let d = acc.len();
        let pa = acc.as_mut_ptr();
        let pr = rows.as_ptr();
        let mut c = 0;
        // SAFETY: (all loops) column c + 4·j + 4 <= d and row t < w.len().
        while c + 32 <= d {
            let mut r = [vdupq_n_f32(0.0); 8];
            for (j, rj) in r.iter_mut().enumerate() {
                *rj = vld1q_f32(pa.add(c + 4 * j));
            }
            for (t, wt) in w.iter().enumerate() {
                let row = pr.add(t * d + c);
                for (j, rj) in r.iter_mut().enumerate() {
                    *rj = vfmaq_n_f32(*rj, vld1q_f32(row.add(4 * j)), *wt);
                }
            }
            for (j, rj) in r.iter().enumerate() {
                vst1q_f32(pa.add(c + 4 * j), *rj);
            }
            c += 32;
        }
        while c + 4 <= d {
            let mut r = vld1q_f32(pa.add(c));
            for (t, wt) in w.iter().enumerate() {
                r = vfmaq_n_f32(r, vld1q_f32(pr.add(t * d + c)), *wt);
            }
            vst1q_f32(pa.add(c), r);
            c += 4;
        }
        for col in c..d {
            for (t, wt) in w.iter().enumerate() {
                acc[col] += wt * rows[t * d + col];
            }
        }
    }
}
