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

/// Whether this CPU has the dot-product instructions (`sdot`, Armv8.2's FEAT_DotProd) the
/// integer decode path needs; without them the f32 loops take the (same) quantized queries.
pub(super) fn has_dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// `acc + Σ` of the products of `a` and `b`'s bytes, four at a time per lane (`sdot`; its
/// intrinsic is not yet stable in Rust).
///
/// # Safety
/// The CPU has the dot-product extension.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: a register-only instruction the caller guarantees the CPU has.
    unsafe {
        std::arch::asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// Scores with quantized queries over a q4_0 (`q4`) or q8_0 K cache: `out[j · stride + t −
/// start]` is the score of query row `j` (of `rows`) and key `t` of `tokens`, each 32-value
/// block's codes multiplied as integers (exact) and scaled by the two blocks' scales in f32,
/// as the AVX2 integer loop does. `codes` holds the rows' q8_0 codes (`rows · d`), `scales`
/// their block scales (`rows · d / 32`).
///
/// # Safety
/// NEON and the dot-product extension must be available; `k` is in q4_0 (`q4`) or q8_0 with
/// `k.dim % 32 == 0`, `codes.len() == rows · k.dim`, `scales.len() == rows · k.dim / 32`,
/// `tokens.end <= k.n_tokens`, `head < k.n_heads`, and `out` holds
/// `(rows − 1) · stride + tokens.len()` values.
#[target_feature(enable = "neon,dotprod")]
#[allow(clippy::too_many_arguments)] // a kernel's operands, each with its own role
pub(super) unsafe fn int_scores(
    q4: bool,
    codes: &[i8],
    scales: &[f32],
    rows: usize,
    k: &super::KvCacheView<'_>,
    head: usize,
    tokens: std::ops::Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract: every K row read is a
    // whole row of the view (`k.row` checks it), every code read lies in `codes`.
    unsafe {
        let d = k.dim;
        let nb = d / 32;
        let pc = codes.as_ptr();
        let low = vdupq_n_u8(0x0F);
        let eight = vdupq_n_s8(8);
        for t in tokens.clone() {
            let row = k.row(t, head);
            let at = t - tokens.start;
            for j in 0..rows {
                out[j * stride + at] = 0.0;
            }
            for b in 0..nb {
                let (block, len) = if q4 { (18 * b, 18) } else { (34 * b, 34) };
                let block = &row[block..block + len];
                let dk = half::f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32();
                let (lo, hi) = if q4 {
                    // Values 0..16 are the low nibbles, 16..32 the high ones; codes nibble − 8.
                    let x = vld1q_u8(block.as_ptr().add(2));
                    (
                        vsubq_s8(vreinterpretq_s8_u8(vandq_u8(x, low)), eight),
                        vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(x)), eight),
                    )
                } else {
                    let p = block.as_ptr().add(2).cast::<i8>();
                    (vld1q_s8(p), vld1q_s8(p.add(16)))
                };
                for j in 0..rows {
                    let q = pc.add(j * d + 32 * b);
                    let acc = sdot(vdupq_n_s32(0), lo, vld1q_s8(q));
                    let acc = sdot(acc, hi, vld1q_s8(q.add(16)));
                    let s = dk * scales[j * nb + b];
                    out[j * stride + at] += vaddvq_s32(acc) as f32 * s;
                }
            }
        }
    }
}
