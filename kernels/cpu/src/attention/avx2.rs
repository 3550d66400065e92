//! AVX2+FMA helpers of the attention kernel.

use super::{KvCacheView, RegFormat, PREFETCH_TOKENS};
use std::arch::x86_64::*;
use std::ops::Range;

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: only called from this module's kernels, which run with the target features these
    // intrinsics need and pass pointers and indices within the slices their callers gave them.
    unsafe {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)))
    }
}

/// `out[j · stride + t] = q_j · k_t`: blocks of four query rows × two keys keep eight
/// accumulators in registers (each key load serves four rows, each query load two keys),
/// reduced together at the end.
///
/// # Safety
/// AVX2 and FMA must be available; `q` and `keys` hold whole rows of `d`, and `out` holds
/// `(q rows − 1) · stride + keys rows` values.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn score_tile(q: &[f32], keys: &[f32], d: usize, out: &mut [f32], stride: usize) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // intrinsic and pointer access below.
    unsafe {
        let (rows, n_t) = (q.len() / d, keys.len() / d);
        let d8 = d / 8 * 8;
        let (pq, pk) = (q.as_ptr(), keys.as_ptr());
        // SAFETY: (whole body) rows j < rows, keys t < n_t and columns i < d, so every access
        // is inside `q`, `keys` or `out` (of the documented sizes).
        let scalar_tail =
            |j: usize, t: usize| -> f32 { (d8..d).map(|i| q[j * d + i] * keys[t * d + i]).sum() };
        let mut j = 0;
        while j + 4 <= rows {
            let mut t = 0;
            while t + 2 <= n_t {
                let mut a = [_mm256_setzero_ps(); 8];
                for i in (0..d8).step_by(8) {
                    let k0 = _mm256_loadu_ps(pk.add(t * d + i));
                    let k1 = _mm256_loadu_ps(pk.add((t + 1) * d + i));
                    for r in 0..4 {
                        let qv = _mm256_loadu_ps(pq.add((j + r) * d + i));
                        a[2 * r] = _mm256_fmadd_ps(qv, k0, a[2 * r]);
                        a[2 * r + 1] = _mm256_fmadd_ps(qv, k1, a[2 * r + 1]);
                    }
                }
                // Horizontal sums of the eight accumulators at once: lane r of `sums` is a[r].
                let h01 = _mm256_hadd_ps(a[0], a[1]);
                let h23 = _mm256_hadd_ps(a[2], a[3]);
                let h45 = _mm256_hadd_ps(a[4], a[5]);
                let h67 = _mm256_hadd_ps(a[6], a[7]);
                let h0123 = _mm256_hadd_ps(h01, h23);
                let h4567 = _mm256_hadd_ps(h45, h67);
                let sums = _mm256_add_ps(
                    _mm256_permute2f128_ps::<0x20>(h0123, h4567),
                    _mm256_permute2f128_ps::<0x31>(h0123, h4567),
                );
                let mut lanes = [0.0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), sums);
                for r in 0..4 {
                    out[(j + r) * stride + t] = lanes[2 * r] + scalar_tail(j + r, t);
                    out[(j + r) * stride + t + 1] = lanes[2 * r + 1] + scalar_tail(j + r, t + 1);
                }
                t += 2;
            }
            if t < n_t {
                for r in 0..4 {
                    out[(j + r) * stride + t] = dot(&q[(j + r) * d..][..d], &keys[t * d..][..d]);
                }
            }
            j += 4;
        }
        for r in j..rows {
            for t in 0..n_t {
                out[r * stride + t] = dot(&q[r * d..][..d], &keys[t * d..][..d]);
            }
        }
    }
}

/// `Σ a·b` with one 8-lane accumulator.
#[inline(always)]
unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: only called from this module's kernels, which run with the target features these
    // intrinsics need and pass pointers and indices within the slices their callers gave them.
    unsafe {
        let d8 = a.len() / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        for i in (0..d8).step_by(8) {
            // SAFETY: i + 8 <= d8 <= a.len() == b.len().
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                acc,
            );
        }
        hsum(acc) + (d8..a.len()).map(|i| a[i] * b[i]).sum::<f32>()
    }
}

/// `exp(x)` for 8 lanes (Cephes' single-precision polynomial, ~1 ulp): 0 below the
/// smallest normal result (and for −Inf), +Inf above the largest, NaN kept.
#[inline(always)]
unsafe fn exp8(x: __m256) -> __m256 {
    // SAFETY: only called from this module's kernels, which run with the target features these
    // intrinsics need and pass pointers and indices within the slices their callers gave them.
    unsafe {
        let hi = _mm256_set1_ps(88.376_26);
        let lo = _mm256_set1_ps(-87.336_55);
        let xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
        let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693_359_4), xc);
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(k),
            _mm256_set1_epi32(127),
        ));
        let v = _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
        let v = _mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo));
        let v = _mm256_blendv_ps(
            v,
            _mm256_set1_ps(f32::INFINITY),
            _mm256_cmp_ps::<_CMP_GT_OQ>(x, hi),
        );
        _mm256_blendv_ps(v, x, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x))
    }
}

/// `row[i] ← exp(row[i] − m)`, returning the sum.
///
/// # Safety
/// AVX2 and FMA must be available.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn exp_shifted(row: &mut [f32], m: f32) -> f32 {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // intrinsic and pointer access below.
    unsafe {
        let n8 = row.len() / 8 * 8;
        let mv = _mm256_set1_ps(m);
        let mut sum = _mm256_setzero_ps();
        let p = row.as_mut_ptr();
        // SAFETY: i + 8 <= n8 <= row.len().
        for i in (0..n8).step_by(8) {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv));
            _mm256_storeu_ps(p.add(i), e);
            sum = _mm256_add_ps(sum, e);
        }
        let mut total = hsum(sum);
        for v in &mut row[n8..] {
            *v = (*v - m).exp();
            total += *v;
        }
        total
    }
}

/// `acc += Σ_t w[t] · rows[t]`, 64 columns at a time held in registers across the rows.
///
/// # Safety
/// AVX2 and FMA must be available; `rows.len() == w.len() * acc.len()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn weighted_sum(acc: &mut [f32], w: &[f32], rows: &[f32]) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // intrinsic and pointer access below.
    unsafe {
        let d = acc.len();
        let pa = acc.as_mut_ptr();
        let pr = rows.as_ptr();
        let mut c = 0;
        // SAFETY: (all loops) column c + 8·j + 8 <= d and row t < w.len(), so every access is
        // inside `acc` or `rows`.
        while c + 64 <= d {
            let mut r = [_mm256_setzero_ps(); 8];
            for (j, rj) in r.iter_mut().enumerate() {
                *rj = _mm256_loadu_ps(pa.add(c + 8 * j));
            }
            for (t, wt) in w.iter().enumerate() {
                let wv = _mm256_set1_ps(*wt);
                let row = pr.add(t * d + c);
                for (j, rj) in r.iter_mut().enumerate() {
                    *rj = _mm256_fmadd_ps(wv, _mm256_loadu_ps(row.add(8 * j)), *rj);
                }
            }
            for (j, rj) in r.iter().enumerate() {
                _mm256_storeu_ps(pa.add(c + 8 * j), *rj);
            }
            c += 64;
        }
        while c + 8 <= d {
            let mut r = _mm256_loadu_ps(pa.add(c));
            for (t, wt) in w.iter().enumerate() {
                r = _mm256_fmadd_ps(_mm256_set1_ps(*wt), _mm256_loadu_ps(pr.add(t * d + c)), r);
            }
            _mm256_storeu_ps(pa.add(c), r);
            c += 8;
        }
        for col in c..d {
            for (t, wt) in w.iter().enumerate() {
                acc[col] += wt * rows[t * d + col];
            }
        }
    }
}

/// Broadcasts the f16 scale stored at `p` (F16C; `half`'s conversion would dispatch per call).
#[inline(always)]
unsafe fn scale_at(p: *const u8) -> __m256 {
    // SAFETY: only called from this module's kernels, which run with the target features these
    // intrinsics need and pass pointers and indices within the slices their callers gave them.
    unsafe {
        // SAFETY: the caller guarantees two readable bytes at `p`.
        let bits = p.cast::<u16>().read_unaligned();
        _mm256_cvtph_ps(_mm_set1_epi16(bits as i16))
    }
}

/// A cache row format decoded in registers: values are exact, as the oracle dequantizes them
/// (`d · code` is exact in f32 for every register format). One type per format, so that each
/// loop is compiled for one format, free of per-chunk dispatch.
trait RowDecoder {
    /// Values `16·c .. 16·c + 16` of the row at `row`.
    ///
    /// # Safety
    /// `row` points at a whole row whose length (a multiple of 32 values) is at least `16·c + 16`.
    unsafe fn decode16(&self, row: *const u8, c: usize) -> [__m256; 2];

    /// Whether [`Self::decode16`] leaves out a per-row scale, which the loops apply once per
    /// row (to a dot product, or to a token's weights) instead of once per value.
    const ROW_SCALE: bool = false;

    /// The row's scale where [`Self::ROW_SCALE`] holds.
    ///
    /// # Safety
    /// `row` points at a whole row.
    #[inline(always)]
    unsafe fn row_scale(&self, row: *const u8) -> f32 {
        let _ = row;
        1.0
    }
}

struct Q4_0;
struct Q8_0;
struct F16;

impl RowDecoder for Q4_0 {
    #[inline(always)]
    unsafe fn decode16(&self, row: *const u8, c: usize) -> [__m256; 2] {
        // SAFETY: only called from this module's kernels, which run with the target features these
        // intrinsics need and pass pointers and indices within the slices their callers gave them.
        unsafe {
            // SAFETY: block c / 2 (18 bytes) of the row is whole.
            let block = row.add(18 * (c / 2));
            let d = scale_at(block);
            let qs = _mm_loadu_si128(block.add(2).cast());
            // Values 0..16 of a block are the low nibbles, 16..32 the high ones.
            let nib = if c.is_multiple_of(2) {
                qs
            } else {
                _mm_srli_epi16::<4>(qs)
            };
            let codes = _mm_sub_epi8(_mm_and_si128(nib, _mm_set1_epi8(0x0F)), _mm_set1_epi8(8));
            let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
            let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(codes)));
            [_mm256_mul_ps(lo, d), _mm256_mul_ps(hi, d)]
        }
    }
}

impl RowDecoder for Q8_0 {
    #[inline(always)]
    unsafe fn decode16(&self, row: *const u8, c: usize) -> [__m256; 2] {
        // SAFETY: only called from this module's kernels, which run with the target features these
        // intrinsics need and pass pointers and indices within the slices their callers gave them.
        unsafe {
            // SAFETY: block c / 2 (34 bytes) of the row is whole.
            let block = row.add(34 * (c / 2));
            let d = scale_at(block);
            let qs = block.add(2 + 16 * (c % 2));
            let lo = _mm256_cvtepi8_epi32(_mm_loadl_epi64(qs.cast()));
            let hi = _mm256_cvtepi8_epi32(_mm_loadl_epi64(qs.add(8).cast()));
            [
                _mm256_mul_ps(_mm256_cvtepi32_ps(lo), d),
                _mm256_mul_ps(_mm256_cvtepi32_ps(hi), d),
            ]
        }
    }
}

impl RowDecoder for F16 {
    #[inline(always)]
    unsafe fn decode16(&self, row: *const u8, c: usize) -> [__m256; 2] {
        // SAFETY: only called from this module's kernels, which run with the target features these
        // intrinsics need and pass pointers and indices within the slices their callers gave them.
        unsafe {
            // SAFETY: values 16·c .. 16·c + 16 (32 bytes from 32·c) are in the row.
            let p = row.add(32 * c);
            [
                _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast())),
            ]
        }
    }
}

/// rotq's 4-bit TurboQuant rows (`tq4`): the codebook of the row length in two registers,
/// each 4-bit code looked up by a permute; the row's f16 scale (stored after the codes) is
/// applied once per row ([`RowDecoder::ROW_SCALE`]): `s · Σ q c` for `Σ q (s c)`, equal up to
/// f32 rounding.
struct Tq4 {
    lo: __m256,
    hi: __m256,
    /// Byte offset of the scale: after the `d / 2` bytes of codes.
    scale_at: usize,
}

impl Tq4 {
    /// The decoder of rows of `d` values (a length `tq4` takes).
    #[inline(always)]
    unsafe fn new(d: usize) -> Self {
        let levels = crate::quant::turbo::tq4_levels(d);
        // SAFETY: only called from this module's kernels, which run with AVX2; `levels` holds 16.
        unsafe {
            Self {
                lo: _mm256_loadu_ps(levels.as_ptr()),
                hi: _mm256_loadu_ps(levels.as_ptr().add(8)),
                scale_at: d / 2,
            }
        }
    }

    /// The levels of eight codes (i32 lanes, 0..16): the low three bits pick within a half,
    /// bit 3 (moved to the sign) the half.
    #[inline(always)]
    unsafe fn lookup(&self, codes: __m256i) -> __m256 {
        // SAFETY: only called from this module's kernels, which run with AVX2.
        unsafe {
            _mm256_blendv_ps(
                _mm256_permutevar8x32_ps(self.lo, codes),
                _mm256_permutevar8x32_ps(self.hi, codes),
                _mm256_castsi256_ps(_mm256_slli_epi32::<28>(codes)),
            )
        }
    }
}

impl RowDecoder for Tq4 {
    const ROW_SCALE: bool = true;

    #[inline(always)]
    unsafe fn row_scale(&self, row: *const u8) -> f32 {
        // SAFETY: the scale's two bytes end the row; F16C is enabled in this module's kernels.
        unsafe {
            let bits = row.add(self.scale_at).cast::<u16>().read_unaligned();
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
        }
    }

    #[inline(always)]
    unsafe fn decode16(&self, row: *const u8, c: usize) -> [__m256; 2] {
        // SAFETY: only called from this module's kernels, which run with the target features these
        // intrinsics need and pass pointers and indices within the slices their callers gave them.
        unsafe {
            // SAFETY: values 16·c .. 16·c + 16 are the 8 bytes from 8·c, inside the codes.
            // Eight codes are one little-endian u32 (value j in bits 4j .. 4j + 4): broadcast
            // from memory and shifted lane by lane, they come out in order with no shuffle
            // (shuffles share one port with the lookups' permutes).
            // (Rows are not 4-byte aligned: an unaligned read, which the broadcast folds in.)
            let p = row.add(8 * c).cast::<i32>();
            let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
            let mask = _mm256_set1_epi32(0x0F);
            let codes = |p: *const i32| {
                let w = _mm256_set1_epi32(p.read_unaligned());
                _mm256_and_si256(_mm256_srlv_epi32(w, shifts), mask)
            };
            // The levels alone: the loops apply the row's scale once (ROW_SCALE).
            [self.lookup(codes(p)), self.lookup(codes(p.add(1)))]
        }
    }
}

/// `out[r · stride + t − start] = q_r · k_t` for four query rows `q_r` and the keys `t` of
/// `tokens`, each K row decoded in registers once for the four rows.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `k` is in format `f` with `k.dim % 32 == 0`,
/// `q.len() == 4 · k.dim`, `tokens.end <= k.n_tokens`, `head < k.n_heads`, and `out` holds
/// `3 · stride + tokens.len()` values. `v` (the V cache, whose rows of `tokens` are prefetched)
/// may be any view.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)] // a kernel's operands, each with its own role
pub(super) unsafe fn fused_scores(
    f: RegFormat,
    q: &[f32],
    k: &KvCacheView<'_>,
    v: &KvCacheView<'_>,
    head: usize,
    tokens: Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // intrinsic and pointer access below.
    unsafe {
        // SAFETY: the caller's contract, passed on.
        match f {
            RegFormat::Q4_0 => scores_in(&Q4_0, q, k, v, head, tokens, out, stride),
            RegFormat::Q8_0 => scores_in(&Q8_0, q, k, v, head, tokens, out, stride),
            RegFormat::F16 => scores_in(&F16, q, k, v, head, tokens, out, stride),
            RegFormat::Tq4 => scores_in(&Tq4::new(k.dim), q, k, v, head, tokens, out, stride),
        }
    }
}

/// [`fused_scores`] for one format.
#[inline(always)]
#[allow(clippy::too_many_arguments)] // as fused_scores
unsafe fn scores_in<D: RowDecoder>(
    dec: &D,
    q: &[f32],
    k: &KvCacheView<'_>,
    v: &KvCacheView<'_>,
    head: usize,
    tokens: Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    // SAFETY: only called from this module's kernels, which run with the target features these
    // intrinsics need and pass pointers and indices within the slices their callers gave them.
    unsafe {
        let d = k.dim;
        let pq = q.as_ptr();
        for t in tokens.clone() {
            k.prefetch(t + PREFETCH_TOKENS, head);
            // The weighted sum reads this token's V row next: start loading it now.
            v.prefetch(t, head);
            let row = k.row_ptr(t, head);
            // Two accumulators per row: eight independent FMA chains hide the FMA latency.
            let mut a = [_mm256_setzero_ps(); 8];
            for c in (0..d / 16).step_by(2) {
                // A whole block per step, so each half's decoding is known at compile time.
                for (c, v) in [(c, dec.decode16(row, c)), (c + 1, dec.decode16(row, c + 1))] {
                    for (r, pair) in a.chunks_exact_mut(2).enumerate() {
                        // SAFETY: r < 4 and 16·c + 16 <= d, inside q's four rows.
                        let qr = pq.add(r * d + 16 * c);
                        pair[0] = _mm256_fmadd_ps(_mm256_loadu_ps(qr), v[0], pair[0]);
                        pair[1] = _mm256_fmadd_ps(_mm256_loadu_ps(qr.add(8)), v[1], pair[1]);
                    }
                }
            }
            let row_sum = |r: usize| _mm256_add_ps(a[2 * r], a[2 * r + 1]);
            // Lane r of `s` is the sum of row r's accumulators.
            let h = _mm256_hadd_ps(
                _mm256_hadd_ps(row_sum(0), row_sum(1)),
                _mm256_hadd_ps(row_sum(2), row_sum(3)),
            );
            let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            let s = if D::ROW_SCALE {
                let scale = dec.row_scale(row);
                if scale.is_finite() {
                    _mm_mul_ps(s, _mm_set1_ps(scale))
                } else {
                    // ±∞ or NaN: the values themselves are ±∞ or NaN, and their products
                    // must meet as the oracle's do (∞ − ∞ is NaN), not as s · Σ q c.
                    scaled_dots(dec, pq, d, row, scale)
                }
            } else {
                s
            };
            let mut lanes = [0.0f32; 4];
            _mm_storeu_ps(lanes.as_mut_ptr(), s);
            for (r, x) in lanes.into_iter().enumerate() {
                out[r * stride + t - tokens.start] = x;
            }
        }
    }
}

/// The four dot products of query rows `q` (rows of `d`) with the row's values `scale · c`
/// scaled value by value, for a row scale that is not finite. Lane r holds row r's.
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scaled_dots<D: RowDecoder>(
    dec: &D,
    q: *const f32,
    d: usize,
    row: *const u8,
    scale: f32,
) -> __m128 {
    // SAFETY: the caller's (scores_in's) contract: `q` holds four rows of `d`, `row` a whole row.
    unsafe {
        let mut lanes = [0f32; 4];
        for c in 0..d / 16 {
            let v = dec.decode16(row, c);
            let v = [
                _mm256_mul_ps(v[0], _mm256_set1_ps(scale)),
                _mm256_mul_ps(v[1], _mm256_set1_ps(scale)),
            ];
            let mut a = [0f32; 16];
            _mm256_storeu_ps(a.as_mut_ptr(), v[0]);
            _mm256_storeu_ps(a.as_mut_ptr().add(8), v[1]);
            for (r, lane) in lanes.iter_mut().enumerate() {
                for (i, x) in a.iter().enumerate() {
                    *lane += *q.add(r * d + 16 * c + i) * x;
                }
            }
        }
        _mm_loadu_ps(lanes.as_ptr())
    }
}

/// `acc_r += Σ_t w[r · stride + t − start] · v_t` for four output rows `acc_r` (consecutive
/// rows of `v.dim`) and the V rows `t` of `tokens`: sixteen columns of the four rows stay in
/// registers while the tokens stream past, each V chunk decoded once for the four rows.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `v` is in format `f` with `v.dim % 32 == 0`,
/// `acc.len() == 4 · v.dim`, `tokens.end <= v.n_tokens`, `head < v.n_heads`, and `w` holds
/// `3 · stride + tokens.len()` values.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn fused_weighted_sum(
    f: RegFormat,
    acc: &mut [f32],
    w: &[f32],
    stride: usize,
    v: &KvCacheView<'_>,
    head: usize,
    tokens: Range<usize>,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // intrinsic and pointer access below.
    unsafe {
        // SAFETY: the caller's contract, passed on.
        match f {
            RegFormat::Q4_0 => weighted_sum_in(&Q4_0, acc, w, stride, v, head, tokens),
            RegFormat::Q8_0 => weighted_sum_in(&Q8_0, acc, w, stride, v, head, tokens),
            RegFormat::F16 => weighted_sum_in(&F16, acc, w, stride, v, head, tokens),
            RegFormat::Tq4 => weighted_sum_in(&Tq4::new(v.dim), acc, w, stride, v, head, tokens),
        }
    }
}

/// [`fused_weighted_sum`] for one format.
#[inline(always)]
unsafe fn weighted_sum_in<D: RowDecoder>(
    dec: &D,
    acc: &mut [f32],
    w: &[f32],
    stride: usize,
    v: &KvCacheView<'_>,
    head: usize,
    tokens: Range<usize>,
) {
    // SAFETY: only called from this module's kernels, which run with the target features these
    // intrinsics need and pass pointers and indices within the slices their callers gave them.
    unsafe {
        let d = v.dim;
        let pa = acc.as_mut_ptr();
        // The four rows' weights token-major, so one pointer reaches a token's four weights.
        const SPAN: usize = 256;
        let mut wt = [[0.0f32; 4]; SPAN];
        let step = v.n_heads * v.row_bytes;
        let mut t0 = tokens.start;
        while t0 < tokens.end {
            // Within one page of a paged view, where rows follow each other by `step`.
            let n = (tokens.end - t0).min(SPAN).min(v.run_from(t0));
            let first = v.row_ptr(t0, head);
            for (i, wi) in wt[..n].iter_mut().enumerate() {
                // A per-row scale goes into the token's weights (SAFETY: row t0 + i of the
                // view, `step` after row t0 in this page).
                let scale = if D::ROW_SCALE {
                    dec.row_scale(first.wrapping_add(i * step))
                } else {
                    1.0
                };
                for (r, x) in wi.iter_mut().enumerate() {
                    *x = w[r * stride + t0 - tokens.start + i] * scale;
                }
            }
            for c in 0..d / 16 {
                let mut a = [_mm256_setzero_ps(); 8];
                for (r, pair) in a.chunks_exact_mut(2).enumerate() {
                    // SAFETY: r < 4 and 16·c + 16 <= d, inside acc's four rows.
                    pair[0] = _mm256_loadu_ps(pa.add(r * d + 16 * c));
                    pair[1] = _mm256_loadu_ps(pa.add(r * d + 16 * c + 8));
                }
                let mut row = first;
                for wi in &wt[..n] {
                    // SAFETY: `row` is row (t, head) for a t in `tokens`, inside the view (the n
                    // tokens from t0 lie in one page, `step` apart).
                    let x = dec.decode16(row, c);
                    row = row.wrapping_add(step);
                    for (pair, wr) in a.chunks_exact_mut(2).zip(wi) {
                        let wr = _mm256_broadcast_ss(wr);
                        pair[0] = _mm256_fmadd_ps(wr, x[0], pair[0]);
                        pair[1] = _mm256_fmadd_ps(wr, x[1], pair[1]);
                    }
                }
                for (r, pair) in a.chunks_exact(2).enumerate() {
                    // SAFETY: as for the loads above.
                    _mm256_storeu_ps(pa.add(r * d + 16 * c), pair[0]);
                    _mm256_storeu_ps(pa.add(r * d + 16 * c + 8), pair[1]);
                }
            }
            t0 += n;
        }
    }
}

/// The largest head dimension the integer decode path takes (its query blocks live on the
/// stack); larger heads use the f32 path on the same (quantized) queries.
pub(super) const MAX_INT_DIM: usize = 512;

/// Four query rows as q8_0 integers: `codes[r · d + i]` and one scale per 32-value block,
/// `scales[r · d / 32 + b]`, such that `scale · code` is the row's value.
pub(super) struct IntQuery {
    codes: [i8; 4 * MAX_INT_DIM],
    scales: [f32; 4 * MAX_INT_DIM / 32],
    /// Per block and 4-byte lane, the K format's code offset times the lane's sum of query
    /// codes: what the products of unsigned K codes carry beyond the signed ones (see
    /// [`IntBlocks`]); made once per query, not per tile of keys.
    fix: [[i32; 8]; 4 * MAX_INT_DIM / 32],
    /// The offset `fix` was made for.
    offset: i32,
}

/// The integer form of four query rows that went through q8_0 (and were then scaled), made
/// by [`super::int_codes`], for a K cache in `f`. `None` where the rows hold a NaN or an
/// infinity, `d` is over [`MAX_INT_DIM`] (the f32 path takes those: the same values, the same
/// spec), or `f` has no integer codes.
pub(super) fn int_query(q: &[f32], d: usize, f: RegFormat) -> Option<IntQuery> {
    let offset = match f {
        RegFormat::Q4_0 => Q4_0::OFFSET,
        RegFormat::Q8_0 => Q8_0::OFFSET,
        RegFormat::F16 | RegFormat::Tq4 => return None,
    };
    if d > MAX_INT_DIM || !d.is_multiple_of(32) || q.len() != 4 * d {
        return None;
    }
    if q.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let mut iq = IntQuery {
        codes: [0; 4 * MAX_INT_DIM],
        scales: [0.0; 4 * MAX_INT_DIM / 32],
        fix: [[0; 8]; 4 * MAX_INT_DIM / 32],
        offset,
    };
    super::int_codes(q, &mut iq.codes[..q.len()], &mut iq.scales[..q.len() / 32]);
    for (fix, block) in iq.fix.iter_mut().zip(iq.codes[..q.len()].chunks_exact(32)) {
        for (lane, bytes) in fix.iter_mut().zip(block.chunks_exact(4)) {
            *lane = offset * bytes.iter().map(|&c| i32::from(c)).sum::<i32>();
        }
    }
    Some(iq)
}

/// Whether this CPU has AVX-VNNI (`vpdpbusd` on 256-bit registers), checked once.
pub(super) fn has_avx_vnni() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avxvnni"))
}

/// A K row format whose blocks of 32 values are integer codes times an f16 scale, read as
/// unsigned bytes `u = code + OFFSET` (q4_0's nibbles as they are stored; q8_0's codes with
/// the sign bit flipped), so that `vpdpbusd` / `maddubs` (unsigned × signed) multiply them
/// by the signed query codes; `Σ code · q = Σ u · q − OFFSET · Σ q` is then exact.
trait IntBlocks {
    /// What the unsigned codes add to the signed ones.
    const OFFSET: i32;
    /// Block `b` of the row at `row`: its 32 unsigned codes (in value order) and its scale.
    ///
    /// # Safety
    /// AVX2 and F16C; `row` points at a whole row of more than `b` blocks.
    unsafe fn block(row: *const u8, b: usize) -> (__m256i, f32);
}

/// The f16 scale stored at `p`, as f32 (F16C).
#[inline(always)]
unsafe fn scale_f32(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees two readable bytes at `p` and F16C.
    unsafe {
        let bits = p.cast::<u16>().read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(bits as i16)))
    }
}

impl IntBlocks for Q4_0 {
    const OFFSET: i32 = 8;

    #[inline(always)]
    unsafe fn block(row: *const u8, b: usize) -> (__m256i, f32) {
        // SAFETY: block b (18 bytes) of the row is whole (the caller's contract).
        unsafe {
            let block = row.add(18 * b);
            let qs = _mm_loadu_si128(block.add(2).cast());
            let low = _mm_set1_epi8(0x0F);
            // Values 0..16 are the low nibbles, 16..32 the high ones (codes + 8).
            let lo = _mm_and_si128(qs, low);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), low);
            (_mm256_set_m128i(hi, lo), scale_f32(block))
        }
    }
}

impl IntBlocks for Q8_0 {
    const OFFSET: i32 = 128;

    #[inline(always)]
    unsafe fn block(row: *const u8, b: usize) -> (__m256i, f32) {
        // SAFETY: block b (34 bytes) of the row is whole (the caller's contract).
        unsafe {
            let block = row.add(34 * b);
            let codes = _mm256_loadu_si256(block.add(2).cast());
            (
                _mm256_xor_si256(codes, _mm256_set1_epi8(i8::MIN)),
                scale_f32(block),
            )
        }
    }
}

/// The eight partial sums of `Σ u · q` over a block: one `vpdpbusd` with AVX-VNNI; two
/// instructions (`maddubs`, `madd`) on AVX2, whose 16-bit pair sums cannot overflow for q4_0's
/// nibbles (2 · 15 · 127); q8_0's unsigned codes would, so without VNNI q8_0 multiplies the
/// signed codes (`sign`) and needs no offset.
trait IntDot {
    /// Whether the products are of the unsigned codes (and need the offset's correction).
    fn unsigned<D: IntBlocks>() -> bool;
    /// The block's partial sums for the unsigned codes `u` and the query codes `q`.
    ///
    /// # Safety
    /// The instruction sets of the implementing type.
    unsafe fn dot<D: IntBlocks>(u: __m256i, q: __m256i) -> __m256i;
}

struct Vnni;
struct Madd;

impl IntDot for Vnni {
    #[inline(always)]
    fn unsigned<D: IntBlocks>() -> bool {
        true
    }

    #[inline(always)]
    unsafe fn dot<D: IntBlocks>(u: __m256i, q: __m256i) -> __m256i {
        // SAFETY: AVX-VNNI (the caller's contract); register operands only.
        unsafe { _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, q) }
    }
}

impl IntDot for Madd {
    #[inline(always)]
    fn unsigned<D: IntBlocks>() -> bool {
        D::OFFSET < 16
    }

    #[inline(always)]
    unsafe fn dot<D: IntBlocks>(u: __m256i, q: __m256i) -> __m256i {
        // SAFETY: AVX2 (the caller's contract); register operands only.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            if Self::unsigned::<D>() {
                _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), ones)
            } else {
                // maddubs multiplies unsigned by signed bytes: |k| times q with k's sign.
                let k = _mm256_xor_si256(u, _mm256_set1_epi8(i8::MIN));
                let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(k, k), _mm256_sign_epi8(q, k));
                _mm256_madd_epi16(pairs, ones)
            }
        }
    }
}

/// [`fused_scores`] with quantized queries: `out[r · stride + t − start]` is the score of
/// query row `r` (of `iq`) and key `t`, each block's codes multiplied as integers (exact) and
/// scaled by the product of the two blocks' scales, in f32 (with AVX-VNNI where the CPU has
/// it).
///
/// # Safety
/// AVX2, FMA and F16C must be available; `k` is in format `f` (q4_0 or q8_0) with
/// `k.dim % 32 == 0` and `k.dim <= MAX_INT_DIM`, `iq` was made for rows of `k.dim`,
/// `tokens.end <= k.n_tokens`, `head < k.n_heads`, and `out` holds
/// `3 · stride + tokens.len()` values. `v` (prefetched) may be any view.
#[inline]
#[allow(clippy::too_many_arguments)] // as fused_scores
pub(super) unsafe fn fused_int_scores(
    f: RegFormat,
    iq: &IntQuery,
    k: &KvCacheView<'_>,
    v: &KvCacheView<'_>,
    head: usize,
    tokens: Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    // SAFETY: the caller's contract, passed on; the VNNI loops only where the CPU has it.
    unsafe {
        match (f, has_avx_vnni()) {
            (RegFormat::Q4_0, true) => int_scores_vnni::<Q4_0>(iq, k, v, head, tokens, out, stride),
            (RegFormat::Q8_0, true) => int_scores_vnni::<Q8_0>(iq, k, v, head, tokens, out, stride),
            (RegFormat::Q4_0, false) => {
                int_scores_avx2::<Q4_0>(iq, k, v, head, tokens, out, stride)
            }
            (RegFormat::Q8_0, false) => {
                int_scores_avx2::<Q8_0>(iq, k, v, head, tokens, out, stride)
            }
            (RegFormat::F16 | RegFormat::Tq4, _) => {}
        }
    }
}

/// [`fused_int_scores`] with AVX-VNNI.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn int_scores_vnni<D: IntBlocks>(
    iq: &IntQuery,
    k: &KvCacheView<'_>,
    v: &KvCacheView<'_>,
    head: usize,
    tokens: Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    // SAFETY: the caller's contract, passed on.
    unsafe { int_scores_in::<D, Vnni>(iq, k, v, head, tokens, out, stride) }
}

/// [`fused_int_scores`] with AVX2 only.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn int_scores_avx2<D: IntBlocks>(
    iq: &IntQuery,
    k: &KvCacheView<'_>,
    v: &KvCacheView<'_>,
    head: usize,
    tokens: Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    // SAFETY: the caller's contract, passed on.
    unsafe { int_scores_in::<D, Madd>(iq, k, v, head, tokens, out, stride) }
}

/// [`fused_int_scores`] for one format and one way of multiplying bytes.
#[inline(always)]
unsafe fn int_scores_in<D: IntBlocks, M: IntDot>(
    iq: &IntQuery,
    k: &KvCacheView<'_>,
    v: &KvCacheView<'_>,
    head: usize,
    tokens: Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    // SAFETY: only called from fused_int_scores, under its contract: every block index is
    // below d / 32 and every code offset below 4 · d inside `iq`.
    unsafe {
        let d = k.dim;
        let nb = d / 32;
        let pc = iq.codes.as_ptr();
        debug_assert_eq!(
            iq.offset,
            D::OFFSET,
            "an integer query made for another format"
        );
        for t in tokens.clone() {
            k.prefetch(t + PREFETCH_TOKENS, head);
            v.prefetch(t, head);
            let row = k.row_ptr(t, head);
            let mut acc = [_mm256_setzero_ps(); 4];
            for b in 0..nb {
                let (codes, dk) = D::block(row, b);
                let dkv = _mm256_set1_ps(dk);
                for (r, a) in acc.iter_mut().enumerate() {
                    let qv = _mm256_loadu_si256(pc.add(r * d + 32 * b).cast());
                    let mut dot = M::dot::<D>(codes, qv);
                    if M::unsigned::<D>() {
                        // The offset taken off per lane in integers, so that each lane holds
                        // its four products' exact sum (small: the lanes' f32 sum then
                        // rounds as the f32 loops do).
                        let fix = _mm256_loadu_si256(iq.fix[r * nb + b].as_ptr().cast());
                        dot = _mm256_sub_epi32(dot, fix);
                    }
                    let sums = _mm256_cvtepi32_ps(dot);
                    let s = _mm256_mul_ps(dkv, _mm256_broadcast_ss(&iq.scales[r * nb + b]));
                    *a = _mm256_fmadd_ps(sums, s, *a);
                }
            }
            let h = _mm256_hadd_ps(
                _mm256_hadd_ps(acc[0], acc[1]),
                _mm256_hadd_ps(acc[2], acc[3]),
            );
            let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            let mut lanes = [0.0f32; 4];
            _mm_storeu_ps(lanes.as_mut_ptr(), s);
            for (r, x) in lanes.into_iter().enumerate() {
                out[r * stride + t - tokens.start] = x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rotq_reference::KvFormat;

    /// Both ways of multiplying bytes give the same exact integers, so the same bits: the
    /// AVX2 `maddubs` loop (signed q8_0 codes, unsigned q4_0 nibbles) and the AVX-VNNI one
    /// (unsigned codes with the offset taken off in integers). Random codes over every value,
    /// extreme blocks (all ±127 queries against all-extreme keys) and an all-zero query block.
    #[test]
    fn vnni_and_maddubs_scores_are_the_same_bits() {
        if !(is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"))
        {
            eprintln!("skipped: no AVX2");
            return;
        }
        let (n, h, d) = (37usize, 2usize, 128usize);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for format in [KvFormat::Q4_0, KvFormat::Q8_0] {
            let row_bytes = format.row_bytes(d).unwrap();
            let mut bytes: Vec<u8> = (0..n * h * row_bytes).map(|_| next() as u8).collect();
            // Sane f16 scales (random bytes may be NaN or Inf), extreme codes in token 0.
            let block = row_bytes / (d / 32);
            for (i, chunk) in bytes.chunks_exact_mut(block).enumerate() {
                let scale = half::f16::from_f32(0.01 + (i % 7) as f32 * 0.003).to_bits();
                chunk[..2].copy_from_slice(&scale.to_le_bytes());
                if i < h * d / 32 {
                    chunk[2..].fill(if format == KvFormat::Q8_0 { 0x81 } else { 0x00 });
                }
            }
            let k = KvCacheView::new(format, &bytes, n, h, d).unwrap();
            let mut q: Vec<f32> = (0..4 * d).map(|_| (next() % 255) as f32 - 127.0).collect();
            q[..32].fill(127.0); // a block at the extreme
            q[32..64].fill(-127.0);
            q[64..96].fill(0.0); // and an all-zero one
                                 // Queries as the kernel sees them: through q8_0 and back.
            rotq_reference::attention::quantize_query_in_place(&mut q).unwrap();
            let f = if format == KvFormat::Q4_0 {
                RegFormat::Q4_0
            } else {
                RegFormat::Q8_0
            };
            let iq = int_query(&q, d, f).unwrap();
            let stride = n;
            let (mut a, mut b) = (vec![0f32; 4 * n], vec![0f32; 4 * n]);
            for head in 0..h {
                // SAFETY: AVX2, FMA and F16C were checked; K is q4_0 or q8_0 of d = 128
                // values; every token of the view; `a` and `b` hold 4 rows of `n`.
                unsafe {
                    match f {
                        RegFormat::Q4_0 => {
                            int_scores_avx2::<Q4_0>(&iq, &k, &k, head, 0..n, &mut a, stride)
                        }
                        _ => int_scores_avx2::<Q8_0>(&iq, &k, &k, head, 0..n, &mut a, stride),
                    }
                }
                if !has_avx_vnni() {
                    eprintln!("skipped: no AVX-VNNI (the AVX2 loop ran alone)");
                    return;
                }
                // SAFETY: as above, and AVX-VNNI was detected.
                unsafe {
                    match f {
                        RegFormat::Q4_0 => {
                            int_scores_vnni::<Q4_0>(&iq, &k, &k, head, 0..n, &mut b, stride)
                        }
                        _ => int_scores_vnni::<Q8_0>(&iq, &k, &k, head, 0..n, &mut b, stride),
                    }
                }
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "{format} head {head}");
                // And the scores are the dot products of the dequantized rows.
                let deq = format.dequantize_row(k.row(0, head)).unwrap();
                let want: f64 = deq
                    .iter()
                    .zip(&q)
                    .map(|(x, y)| f64::from(*x) * f64::from(*y))
                    .sum();
                assert!(
                    (f64::from(a[0]) - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{format}: {} vs {want}",
                    a[0]
                );
            }
        }
    }
}
