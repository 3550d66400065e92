//! Dense attention in f64, unquantized and on a rotated, quantized KV cache.
//!
//! ## Shapes (row-major)
//! Q `[n_q, h_q, d]`, K `[n_kv, h_kv, d]`, V `[n_kv, h_kv, d_v]`, output `[n_q, h_q, d_v]`.
//! `h_q` must be a multiple of `h_kv` (GQA; MQA when `h_kv = 1`): query head `h` reads KV head
//! `h / (h_q / h_kv)`, so consecutive query heads share a KV head.
//!
//! ## Semantics
//! Query `i` sits at position `p0 + i` ([`AttentionParams::pos_offset`]); key `j` at position
//! `j`. Key `j` is visible to query `i` when
//! * not causal, or `j ≤ p0 + i`; and
//! * no sliding window, or `p0 + i − j < window` (keys `window` or more positions behind the
//!   query are masked; later keys are governed by causality alone).
//!
//! Score `s = scale · q·k` (scale default `1/√d`); with a soft-cap `c`, `s ← c · tanh(s / c)`;
//! with an additive mask `M` (`[n_q, n_kv]`, [`attention_f64_masked`]), `s ← s + M[i, j]`
//! after the soft-cap, as llama.cpp's `ggml_flash_attn_ext` adds its mask (ALiBi biases, or
//! −∞ to hide a key: a batch's padding, a tree of speculative tokens). Probabilities are the
//! softmax of the visible scores (max-subtracted, f64); the output is `Σ p_j v_j`.
//!
//! The log-sum-exp of a row ([`Attention::lse`]) is `max + ln Σ_j exp(s_j − max)` over its
//! visible keys, natural log, in the units of the final scores (after scale, soft-cap and
//! mask): what merging the outputs of two disjoint key sets needs (FlashInfer's cascade).
//!
//! ## Quantized queries ([`quantized_query`])
//! Attention *with quantized queries* is the same attention with each (rotated) query row of
//! every head replaced by its q8_0 round trip: the row through the registry's q8_0 encoder
//! (ggml's `quantize_row_q8_0`, byte for byte) and back. That is what a kernel computing
//! `K·Q` as integer dot products per 32-value block (times the two blocks' scales, as ggml's
//! CPU kernels do) computes: over an integer K format each block's products are exact
//! integers, so the f64 oracle on the round-tripped query is the exact value of that
//! arithmetic, and a kernel is held to the attention tolerance against it (the f32 sum of
//! `d / 32` terms, each one exactly representable integer sum times an exactly representable
//! product of two f16 scales, rounded once). The score scale is applied after the product, as
//! for unquantized queries. The cost of quantizing the query, against exact attention, is a
//! quality question measured by `rotq eval`, not a tolerance.
//!
//! ## Edge cases (documented results, tested)
//! * A query with no visible key (`n_kv = 0`, or causality/window masking everything) gets
//!   all-zero probabilities, a zero output row and LSE −∞.
//! * A mask value of −∞ hides its key: weight 0, but the key is still visible, so its V row is
//!   multiplied by that 0 (a NaN or Inf there gives NaN, as the kernels compute), and its score
//!   is still computed (a NaN score stays NaN: NaN + −∞ is NaN). Except when a mask hides
//!   *every* visible key of a row: the row has no visible key (zeros, LSE −∞), whatever K and V
//!   hold, as llama.cpp skips −∞ mask entries. A NaN mask value is a NaN score.
//! * IEEE f64 semantics otherwise: a NaN (or, without soft-cap, a +Inf) score in a row makes
//!   that row's probabilities, output and LSE NaN; a −Inf score is weight 0, and a row whose
//!   visible scores are all −Inf (from the data, not all from the mask) is NaN (0/0), its LSE
//!   NaN too. Keys outside causality and the window are never read, so NaN/Inf there (in K, V
//!   or the mask) has no effect.
//!
//! ## Rotated, quantized cache
//! [`rotated_quantized_attention`] runs the pipeline a kernel implements: `q ← R q`,
//! `k ← R k`, `v ← R_v v` (each in f64), K and V rounded to f32 and quantized per
//! `(token, head)` row of `d` (or `d_v`) values into their [`KvFormat`]s, dequantized, attention
//! on those values, and the output rotated back with `R_vᵀ`. With an f32 cache it equals plain
//! attention up to f64 rounding (tested), because `(R q)·(R k) = q·k` and
//! `Σ p (R_v v) = R_v Σ p v`.

use crate::error::{Error, Result};
use crate::format::KvFormat;
use crate::rotation::Rotation;
use ndarray::{Array2, Array3, ArrayView2, ArrayView3, Axis};

/// Attention options. The default is non-causal, no window, no soft-cap, scale `1/√d`.
///
/// ```
/// use rotq_reference::AttentionParams;
/// let p = AttentionParams { causal: true, pos_offset: 100, ..Default::default() };
/// assert_eq!(p.window, None);
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttentionParams {
    /// Score scale; `None` means `1/√d`. Must be finite.
    pub scale: Option<f64>,
    /// Mask keys after the query's position.
    pub causal: bool,
    /// Position of query 0 (`p0`): query `i` is at `p0 + i`.
    pub pos_offset: usize,
    /// Sliding window `W ≥ 1`: mask keys `W` or more positions behind the query.
    pub window: Option<usize>,
    /// Logit soft-cap `c > 0`: `s ← c · tanh(s / c)`.
    pub softcap: Option<f64>,
}

impl AttentionParams {
    /// Checks the parameters (finite scale, window ≥ 1, positive finite soft-cap).
    ///
    /// ```
    /// use rotq_reference::AttentionParams;
    /// assert!(AttentionParams { window: Some(0), ..Default::default() }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        if let Some(s) = self.scale {
            if !s.is_finite() {
                return Err(invalid("scale", format!("{s} is not finite")));
            }
        }
        if self.window == Some(0) {
            return Err(invalid("window", "must be at least 1".into()));
        }
        if let Some(c) = self.softcap {
            if !(c.is_finite() && c > 0.0) {
                return Err(invalid(
                    "softcap",
                    format!("{c} is not a positive finite number"),
                ));
            }
        }
        Ok(())
    }

    /// The score scale (default `1/√d`) and the soft-cap as the f32 kernels use them; each must
    /// be a normal f32 number (the scale may be 0), else `InvalidParameter`.
    ///
    /// ```
    /// use rotq_reference::AttentionParams;
    /// let (scale, cap) = AttentionParams::default().f32_factors(64).unwrap();
    /// assert_eq!((scale, cap), (0.125, None));
    /// let err = AttentionParams { scale: Some(1e300), ..Default::default() }.f32_factors(64);
    /// // (Floats are printed in scientific notation: never hundreds of digits.)
    /// assert!(err.unwrap_err().to_string().contains("1e300 is not a normal f32"));
    /// assert!(AttentionParams { scale: Some(1e-300), ..Default::default() }.f32_factors(64).is_err());
    /// ```
    pub fn f32_factors(&self, d: usize) -> Result<(f32, Option<f32>)> {
        let scale = self.scale.unwrap_or(1.0 / (d as f64).sqrt());
        for (name, v) in [("scale", Some(scale)), ("softcap", self.softcap)] {
            if let Some(v) = v {
                let f = v as f32;
                if !(f.is_finite() && (f.is_normal() || (name == "scale" && v == 0.0))) {
                    return Err(invalid(
                        name,
                        format!("{v:e} is not a normal f32 number, which the f32 kernels need"),
                    ));
                }
            }
        }
        Ok((scale as f32, self.softcap.map(|c| c as f32)))
    }

    /// Whether key `j` is visible to query `i`.
    ///
    /// ```
    /// use rotq_reference::AttentionParams;
    /// let p = AttentionParams { causal: true, pos_offset: 4, window: Some(2), ..Default::default() };
    /// assert!(p.visible(0, 3) && p.visible(0, 4)); // distance 1 and 0 are inside a window of 2
    /// assert!(!p.visible(0, 5) && !p.visible(0, 2)); // the future, and distance 2
    /// ```
    pub fn visible(&self, i: usize, j: usize) -> bool {
        let pos = self.pos_offset + i;
        let causal_ok = !self.causal || j <= pos;
        let window_ok = self.window.is_none_or(|w| j > pos || pos - j < w);
        causal_ok && window_ok
    }
}

fn invalid(name: &'static str, reason: String) -> Error {
    Error::InvalidParameter { name, reason }
}

/// Query rows (`[rows, d]`, each a head's rotated query; `d` a multiple of 32) through the
/// q8_0 encoder and back: the queries of attention with quantized queries (module docs).
///
/// ```
/// use rotq_reference::attention::quantized_query;
/// let q: Vec<f32> = (0..64).map(|i| (i as f32 * 0.3).sin()).collect();
/// let back = quantized_query(&q, 32).unwrap();
/// // Within half a step (max |x| / 127, here at most 1/127) plus the f16 rounding of the
/// // stored scale (up to 127 steps of 2^-11 of it).
/// assert!(q.iter().zip(&back).all(|(a, b)| (a - b).abs() <= (0.5 + 127.0 / 2048.0) / 127.0));
/// ```
pub fn quantized_query(q: &[f32], d: usize) -> Result<Vec<f32>> {
    crate::KvFormat::Q8_0.check_row_len(d)?;
    if !q.len().is_multiple_of(d) {
        return Err(Error::LengthMismatch {
            what: "query rows (a multiple of d)",
            expected: q.len().div_ceil(d) * d,
            actual: q.len(),
        });
    }
    let mut out = q.to_vec();
    quantize_query_in_place(&mut out)?;
    Ok(out)
}

/// [`quantized_query`] in place, on whole 32-value blocks (q8_0 blocks stand alone, so the
/// rows' length does not matter here), with no allocation: what a kernel's plan runs on its
/// workspace.
///
/// ```
/// use rotq_reference::attention::{quantize_query_in_place, quantized_query};
/// let q: Vec<f32> = (0..64).map(|i| (i as f32 * 0.7).cos()).collect();
/// let mut in_place = q.clone();
/// quantize_query_in_place(&mut in_place).unwrap();
/// assert_eq!(in_place, quantized_query(&q, 64).unwrap());
/// ```
pub fn quantize_query_in_place(q: &mut [f32]) -> Result<()> {
    let format = crate::KvFormat::Q8_0;
    if !q.len().is_multiple_of(32) {
        return Err(Error::RowNotMultipleOfBlock {
            format: format.name(),
            row_len: q.len(),
            block: 32,
        });
    }
    let mut bytes = [0u8; 34];
    for block in q.chunks_exact_mut(32) {
        format.quantize_into(block, &mut bytes)?;
        format.dequantize_into(&bytes, block)?;
    }
    Ok(())
}

/// The result of dense attention.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq)]
pub struct Attention {
    /// `[n_q, h_q, d_v]`.
    pub output: Array3<f64>,
    /// Attention probabilities `[h_q, n_q, n_kv]` (zero at masked keys).
    pub probs: Array3<f64>,
    /// Log-sum-exp of each row's scores `[n_q, h_q]` (natural log; −∞ for a row with no
    /// visible key; see the module docs).
    pub lse: Array2<f64>,
}

/// The sizes of one attention problem.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query rows.
    pub n_q: usize,
    /// Cached tokens.
    pub n_kv: usize,
    /// Query heads.
    pub h_q: usize,
    /// KV heads.
    pub h_kv: usize,
    /// Q/K head dimension.
    pub d: usize,
    /// V head dimension.
    pub d_v: usize,
}

impl AttentionShape {
    /// Reads and checks the shape of Q, K, V.
    ///
    /// ```
    /// use ndarray::Array3;
    /// use rotq_reference::AttentionShape;
    /// let q = Array3::<f32>::zeros((2, 8, 64));
    /// let kv = Array3::<f32>::zeros((5, 2, 64));
    /// let s = AttentionShape::of(&q.view(), &kv.view(), &kv.view()).unwrap();
    /// assert_eq!((s.n_q, s.n_kv, s.h_q, s.h_kv), (2, 5, 8, 2));
    /// let bad = Array3::<f32>::zeros((5, 3, 64));
    /// assert!(AttentionShape::of(&q.view(), &bad.view(), &bad.view()).is_err());
    /// ```
    pub fn of<A, B, C>(q: &ArrayView3<A>, k: &ArrayView3<B>, v: &ArrayView3<C>) -> Result<Self> {
        let (n_q, h_q, d) = q.dim();
        let (n_kv, h_kv, dk) = k.dim();
        let (n_v, h_v, d_v) = v.dim();
        let fail = |m: String| Err(Error::Shape(m));
        if h_kv == 0 || h_q == 0 || d == 0 || d_v == 0 {
            return fail(format!(
                "head counts and dims must be positive (h_q {h_q}, h_kv {h_kv}, d {d}, d_v {d_v})"
            ));
        }
        if h_q % h_kv != 0 {
            return fail(format!("h_q {h_q} is not a multiple of h_kv {h_kv}"));
        }
        if dk != d {
            return fail(format!("K head dim {dk} differs from Q head dim {d}"));
        }
        if (n_v, h_v) != (n_kv, h_kv) {
            return fail(format!(
                "V is [{n_v}, {h_v}, _] but K is [{n_kv}, {h_kv}, _]"
            ));
        }
        Ok(Self {
            n_q,
            n_kv,
            h_q,
            h_kv,
            d,
            d_v,
        })
    }
}

/// Dense attention in f64 (the unquantized reference): [`attention_f64_masked`] without a mask.
///
/// ```
/// use ndarray::Array3;
/// use rotq_reference::{attention_f64, AttentionParams};
/// let q = Array3::from_shape_fn((1, 1, 4), |(_, _, c)| c as f64);
/// let k = Array3::from_shape_fn((3, 1, 4), |(t, _, c)| (t + c) as f64);
/// let v = Array3::from_shape_fn((3, 1, 2), |(t, _, c)| (t * 2 + c) as f64);
/// let a = attention_f64(q.view(), k.view(), v.view(), &AttentionParams::default()).unwrap();
/// let p = a.probs.index_axis(ndarray::Axis(0), 0);
/// assert!((p.sum() - 1.0).abs() < 1e-12);
/// ```
pub fn attention_f64(
    q: ArrayView3<f64>,
    k: ArrayView3<f64>,
    v: ArrayView3<f64>,
    params: &AttentionParams,
) -> Result<Attention> {
    attention_f64_masked(q, k, v, params, None)
}

/// Dense attention in f64 with an optional additive mask `[n_q, n_kv]` (added to each visible
/// key's score after the soft-cap; −∞ hides a key), and the log-sum-exp of every row. A mask of
/// another shape is [`Error::Shape`]. See the module docs for the edge cases.
///
/// ```
/// use ndarray::{array, Array3};
/// use rotq_reference::{attention::attention_f64_masked, AttentionParams};
/// let q = Array3::from_shape_fn((2, 1, 4), |(i, _, c)| (i + c) as f64 * 0.1);
/// let k = Array3::from_shape_fn((3, 1, 4), |(t, _, c)| (t * c) as f64 * 0.2);
/// let v = Array3::from_shape_fn((3, 1, 2), |(t, _, c)| (t * 2 + c) as f64);
/// let inf = f64::NEG_INFINITY;
/// // Row 0: key 1 hidden, key 2 biased by −1. Row 1: every key hidden.
/// let mask = array![[0.0, inf, -1.0], [inf, inf, inf]];
/// let p = AttentionParams::default();
/// let a = attention_f64_masked(q.view(), k.view(), v.view(), &p, Some(mask.view())).unwrap();
/// assert_eq!(a.probs[[0, 0, 1]], 0.0);
/// assert!((a.probs[[0, 0, 0]] + a.probs[[0, 0, 2]] - 1.0).abs() < 1e-12);
/// // LSE is the log of the softmax's denominator: ln(e^s0 + e^(s2 − 1)).
/// let s = |j: usize| (0..4).map(|c| q[[0, 0, c]] * k[[j, 0, c]]).sum::<f64>() / 2.0;
/// assert!((a.lse[[0, 0]] - (s(0).exp() + (s(2) - 1.0).exp()).ln()).abs() < 1e-12);
/// // Every key hidden: no visible key, a zero row and LSE −∞.
/// assert_eq!(a.lse[[1, 0]], f64::NEG_INFINITY);
/// assert!(a.output.slice(ndarray::s![1, .., ..]).iter().all(|x| *x == 0.0));
/// assert!(attention_f64_masked(q.view(), k.view(), v.view(), &p, Some(mask.t())).is_err());
/// ```
pub fn attention_f64_masked(
    q: ArrayView3<f64>,
    k: ArrayView3<f64>,
    v: ArrayView3<f64>,
    params: &AttentionParams,
    mask: Option<ArrayView2<f64>>,
) -> Result<Attention> {
    params.validate()?;
    let s = AttentionShape::of(&q, &k, &v)?;
    if let Some(m) = &mask {
        if m.dim() != (s.n_q, s.n_kv) {
            return Err(Error::Shape(format!(
                "mask is {:?} but [n_q, n_kv] is [{}, {}]",
                m.shape(),
                s.n_q,
                s.n_kv
            )));
        }
    }
    params
        .pos_offset
        .checked_add(s.n_q)
        .ok_or(Error::Overflow("query positions"))?;
    let scale = params.scale.unwrap_or(1.0 / (s.d as f64).sqrt());
    let group = s.h_q / s.h_kv;
    let mut output = Array3::zeros((s.n_q, s.h_q, s.d_v));
    let mut probs = Array3::zeros((s.h_q, s.n_q, s.n_kv));
    let mut lse = Array2::from_elem((s.n_q, s.h_q), f64::NEG_INFINITY);
    let mut scores = vec![0.0f64; s.n_kv];
    for i in 0..s.n_q {
        let visible: Vec<usize> = (0..s.n_kv).filter(|&j| params.visible(i, j)).collect();
        let bias = |j: usize| mask.as_ref().map_or(0.0, |m| m[[i, j]]);
        // A row whose every visible key the mask hides has no visible key (llama.cpp skips
        // −∞ mask entries): zeros and LSE −∞, whatever K and V hold.
        if visible.iter().all(|&j| bias(j) == f64::NEG_INFINITY) {
            continue;
        }
        for h in 0..s.h_q {
            let hk = h / group;
            let qv = q.slice(ndarray::s![i, h, ..]);
            for &j in &visible {
                let raw = scale * qv.dot(&k.slice(ndarray::s![j, hk, ..]));
                scores[j] = params.softcap.map_or(raw, |c| c * (raw / c).tanh()) + bias(j);
            }
            let max = visible
                .iter()
                .fold(f64::NEG_INFINITY, |m, &j| m.max(scores[j]));
            let total: f64 = visible.iter().map(|&j| (scores[j] - max).exp()).sum();
            lse[[i, h]] = max + total.ln();
            for &j in &visible {
                let p = (scores[j] - max).exp() / total;
                probs[[h, i, j]] = p;
                output
                    .slice_mut(ndarray::s![i, h, ..])
                    .scaled_add(p, &v.slice(ndarray::s![j, hk, ..]));
            }
        }
    }
    Ok(Attention { output, probs, lse })
}

/// Dense attention on f32 inputs, in f64: [`attention_masked`] without a mask.
///
/// ```
/// use ndarray::Array3;
/// use rotq_reference::{attention, AttentionParams};
/// let x = Array3::from_shape_fn((2, 1, 8), |(t, _, c)| (t + c) as f32 * 0.1);
/// let a = attention(x.view(), x.view(), x.view(), &AttentionParams::default()).unwrap();
/// assert_eq!(a.lse.dim(), (2, 1));
/// ```
pub fn attention(
    q: ArrayView3<f32>,
    k: ArrayView3<f32>,
    v: ArrayView3<f32>,
    params: &AttentionParams,
) -> Result<Attention> {
    attention_masked(q, k, v, params, None)
}

/// Dense attention on f32 inputs and an optional f32 mask `[n_q, n_kv]`, in f64 (the inputs
/// widened exactly; see [`attention_f64_masked`]).
///
/// ```
/// use ndarray::{Array2, Array3};
/// use rotq_reference::{attention::attention_masked, AttentionParams};
/// let x = Array3::from_shape_fn((2, 1, 8), |(t, _, c)| (t + c) as f32 * 0.1);
/// // A causal mask written out: the same as `causal: true`.
/// let mask = Array2::from_shape_fn((2, 2), |(i, j)| if j > i { f32::NEG_INFINITY } else { 0.0 });
/// let p = AttentionParams::default();
/// let masked = attention_masked(x.view(), x.view(), x.view(), &p, Some(mask.view())).unwrap();
/// let causal = AttentionParams { causal: true, ..p };
/// let want = attention_masked(x.view(), x.view(), x.view(), &causal, None).unwrap();
/// assert_eq!(masked, want);
/// ```
pub fn attention_masked(
    q: ArrayView3<f32>,
    k: ArrayView3<f32>,
    v: ArrayView3<f32>,
    params: &AttentionParams,
    mask: Option<ArrayView2<f32>>,
) -> Result<Attention> {
    let up = |a: ArrayView3<f32>| a.mapv(f64::from);
    let mask = mask.map(|m| m.mapv(f64::from));
    attention_f64_masked(
        up(q).view(),
        up(k).view(),
        up(v).view(),
        params,
        mask.as_ref().map(|m| m.view()),
    )
}

/// What is rotated before K and V are cached: Q and K by `qk`, V by `v` (the output is then
/// rotated back by `vᵀ`).
///
/// ```
/// use rotq_reference::{Rotation, RotationPlan};
/// let plan = RotationPlan {
///     qk: Some(Rotation::hadamard(128).unwrap()),
///     v: Some(Rotation::block_hadamard(128, 64).unwrap()),
/// };
/// assert!(plan.check_dims(128, 128).is_ok());
/// assert!(plan.check_dims(64, 128).is_err());
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RotationPlan {
    /// Rotation of Q and K (`None`: not rotated).
    pub qk: Option<Rotation>,
    /// Rotation of V, undone on the output (`None`: not rotated).
    pub v: Option<Rotation>,
}

impl RotationPlan {
    /// No rotation at all. A plan an engine builds is used as built; where the engine leaves
    /// the choice to rotq (`rotq::defaults::plan`, the C ABI's default rotation), the
    /// environment variable `ROTQ_DISABLE_ROTATION=1` makes the default this plan, as
    /// llama.cpp's `LLAMA_ATTN_ROT_DISABLE` does there.
    ///
    /// ```
    /// let plan = rotq_reference::RotationPlan::none();
    /// assert!(plan.qk.is_none() && plan.v.is_none());
    /// ```
    pub fn none() -> Self {
        Self::default()
    }

    /// Checks that the rotations fit head dims `d` (Q/K) and `d_v` (V).
    pub fn check_dims(&self, d: usize, d_v: usize) -> Result<()> {
        for (r, want, what) in [(&self.qk, d, "Q/K rotation"), (&self.v, d_v, "V rotation")] {
            if let Some(r) = r {
                if r.dim() != want {
                    return Err(Error::LengthMismatch {
                        what,
                        expected: want,
                        actual: r.dim(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Cache formats of K and V and the rotation plan: everything that decides what the cache holds.
#[derive(Clone, Debug, PartialEq)]
pub struct KvCacheSpec {
    /// Format of the K cache.
    pub k_format: KvFormat,
    /// Format of the V cache.
    pub v_format: KvFormat,
    /// What is rotated.
    pub plan: RotationPlan,
}

/// Rotates every `(token, head)` row of `x` (in f64), rounds to f32, quantizes each row into
/// `format` and dequantizes it: what a rotated cache holds, as f64.
///
/// ```
/// use ndarray::Array3;
/// use rotq_reference::{attention::cache_roundtrip, KvFormat, Rotation};
/// let k = Array3::from_shape_fn((3, 2, 32), |(t, h, c)| (t + h) as f32 - c as f32 * 0.1);
/// let r = Rotation::hadamard(32).unwrap();
/// let cached = cache_roundtrip(k.view(), Some(&r), KvFormat::F32).unwrap();
/// let mut back = cached.slice(ndarray::s![1, 1, ..]).to_vec();
/// r.inverse_in_place(&mut back).unwrap();
/// assert!((back[5] - f64::from(k[[1, 1, 5]])).abs() < 1e-5);
/// ```
pub fn cache_roundtrip(
    x: ArrayView3<f32>,
    rotation: Option<&Rotation>,
    format: KvFormat,
) -> Result<Array3<f64>> {
    let (n, h, d) = x.dim();
    format.check_row_len(d)?;
    let mut out = Array3::zeros((n, h, d));
    let mut row = vec![0.0f64; d];
    let mut row32 = vec![0.0f32; d];
    for t in 0..n {
        for hh in 0..h {
            for (r, v) in row.iter_mut().zip(x.slice(ndarray::s![t, hh, ..])) {
                *r = f64::from(*v);
            }
            if let Some(r) = rotation {
                r.forward_in_place(&mut row)?;
            }
            for (a, b) in row32.iter_mut().zip(&row) {
                *a = *b as f32;
            }
            let decoded = format.dequantize_row(&format.quantize_row(&row32)?)?;
            for (o, v) in out
                .slice_mut(ndarray::s![t, hh, ..])
                .iter_mut()
                .zip(decoded)
            {
                *o = f64::from(v);
            }
        }
    }
    Ok(out)
}

/// Attention on a rotated, quantized KV cache (see the module docs for the pipeline). Its
/// [`Attention::lse`] is that of the cached scores (a rotation leaves `q·k` unchanged).
///
/// ```
/// use ndarray::Array3;
/// use rotq_reference::*;
/// let f = |n, h, d, s: f32| Array3::from_shape_fn((n, h, d), |(a, b, c)| ((a * 31 + b * 7 + c) as f32 * s).sin());
/// let (q, k, v) = (f(2, 4, 64, 0.3), f(9, 2, 64, 0.7), f(9, 2, 64, 1.1));
/// let params = AttentionParams { causal: true, pos_offset: 7, ..Default::default() };
/// let exact = attention(q.view(), k.view(), v.view(), &params).unwrap();
/// let error = |format| {
///     let spec = KvCacheSpec {
///         k_format: format,
///         v_format: format,
///         plan: RotationPlan { qk: Some(Rotation::hadamard(64).unwrap()), v: None },
///     };
///     let approx = rotated_quantized_attention(q.view(), k.view(), v.view(), &params, &spec).unwrap();
///     metrics::rel_l2(approx.output.as_slice().unwrap(), exact.output.as_slice().unwrap())
/// };
/// assert!(error(KvFormat::Q8_0) < 0.05);
/// assert!(error(KvFormat::Q8_0) * 10.0 < error(KvFormat::Q4_0));
/// ```
pub fn rotated_quantized_attention(
    q: ArrayView3<f32>,
    k: ArrayView3<f32>,
    v: ArrayView3<f32>,
    params: &AttentionParams,
    spec: &KvCacheSpec,
) -> Result<Attention> {
    params.validate()?;
    let shape = AttentionShape::of(&q, &k, &v)?;
    spec.plan.check_dims(shape.d, shape.d_v)?;
    let plan = &spec.plan;
    let mut q_rot = q.mapv(f64::from);
    if let Some(r) = &plan.qk {
        for mut row in q_rot.lanes_mut(Axis(2)) {
            let mut buf = row.to_vec();
            r.forward_in_place(&mut buf)?;
            row.assign(&ndarray::ArrayView1::from(&buf[..]));
        }
    }
    let k_cache = cache_roundtrip(k, plan.qk.as_ref(), spec.k_format)?;
    let v_cache = cache_roundtrip(v, plan.v.as_ref(), spec.v_format)?;
    let mut result = attention_f64(q_rot.view(), k_cache.view(), v_cache.view(), params)?;
    if let Some(r) = &plan.v {
        for mut row in result.output.lanes_mut(Axis(2)) {
            let mut buf = row.to_vec();
            r.inverse_in_place(&mut buf)?;
            row.assign(&ndarray::ArrayView1::from(&buf[..]));
        }
    }
    Ok(result)
}
