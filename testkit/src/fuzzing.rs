//! The properties the fuzz targets (`fuzz/`) check, one function per target, so that the
//! targets and the corpus replay test (`tests/fuzz_corpus.rs`) run the same code.
//!
//! Each function takes arbitrary bytes, decodes a problem from them, and panics when a
//! property fails: a kernel that panics, reads out of bounds or disagrees with the oracle, or
//! a bad input that is not refused with an error. Inputs the library rightly refuses (an
//! unsupported size, a truncated buffer) are fine; the point is that they are refused, not
//! that they succeed.
//!
//! The bytes are decoded with [`arbitrary::Unstructured`] into one problem type per target
//! (`DequantizeProblem`, …): a `u8` or `u16` (little-endian) per field, `choose` for one of a
//! list, `int_in_range` for a small count, and zeros once the bytes run out. The committed
//! corpora (`fuzz/corpus/<target>/`), whose named inputs are fuzzer finds, were written for
//! that layout; this module's tests check that every corpus file still decodes to the problem
//! it did when it was found, so a change to the decoding (or to `arbitrary`'s encoding, which
//! is no stability promise) cannot quietly turn the finds into other problems.
//!
//! The corpora were found when the registry held the block formats only
//! ([`KvFormat::BLOCKS`]), so a problem's format is still drawn from those (a list of the
//! registry's, which grows, would give the same bytes another format). The TurboQuant row
//! formats, which came later, are reached through each problem instead: the `dequantize`,
//! `rotate_quantize` and `attention` checks run once with the drawn block formats and once with
//! their row companions ([`row_companion`]), so every corpus file and every fuzzer input
//! exercises a row format too.
//!
//! ```
//! rotq_testkit::fuzzing::dequantize(&[3, 1, 2, 3]); // a too-short q8_0 block: refused, no panic
//! ```

use arbitrary::{Arbitrary, Unstructured};
use ndarray::{Array3, ArrayView1, Axis};
use rotq_cpu::{AttentionConfig, CacheCodec, CpuAttention, CpuRotation, Isa, KvCacheView};
use rotq_reference::tolerance::{tolerance, Op, Precision};
use rotq_reference::tuned::{read, Contents, DeviceIdentity, Loaded, TuneFile};
use rotq_reference::{AttentionParams, KvFormat, Rotation, RotationPlan};

/// A value in [-512, 512) in steps of 1/64 from two bytes, or, when `special`, NaN or ±Inf
/// for one two-byte pattern in 97.
fn value(u: &mut Unstructured<'_>, special: bool) -> arbitrary::Result<f32> {
    let raw = u16::arbitrary(u)?;
    if special && raw.is_multiple_of(97) {
        return Ok([f32::NAN, f32::INFINITY, f32::NEG_INFINITY][(raw as usize / 97) % 3]);
    }
    Ok(f32::from(raw as i16) / 64.0)
}

fn values(u: &mut Unstructured<'_>, n: usize, special: bool) -> arbitrary::Result<Vec<f32>> {
    (0..n).map(|_| value(u, special)).collect()
}

/// Decodes `data` as a `T`. Decoding cannot fail (every choice list is non-empty and missing
/// bytes read as zeros), so an error here is a bug in a decoder.
fn decode<'a, T: Arbitrary<'a>>(data: &'a [u8]) -> T {
    T::arbitrary_take_rest(Unstructured::new(data)).expect("decoding never fails")
}

/// The row format that the problems drawn with block format `format` also run with: the six
/// row formats in registry order, each the companion of two block formats.
///
/// ```
/// use rotq_reference::KvFormat;
/// use rotq_testkit::fuzzing::row_companion;
/// assert_eq!(row_companion(KvFormat::F32), KvFormat::Tq2);
/// assert_eq!(row_companion(KvFormat::Q8_0), KvFormat::Tq2Qjl);
/// ```
///
/// # Panics
/// When `format` is not a block format.
pub fn row_companion(format: KvFormat) -> KvFormat {
    let rows: Vec<KvFormat> = KvFormat::ALL
        .into_iter()
        .filter(|f| f.row_format().is_some())
        .collect();
    let i = KvFormat::BLOCKS
        .iter()
        .position(|&f| f == format)
        .expect("a block format");
    rows[i % rows.len()]
}

/// The `dequantize` target's problem: a format, then the rest of the bytes as its cache.
#[derive(Debug, PartialEq)]
struct DequantizeProblem<'a> {
    format: KvFormat,
    bytes: &'a [u8],
}

impl<'a> Arbitrary<'a> for DequantizeProblem<'a> {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Self {
            format: *u.choose(&KvFormat::BLOCKS)?,
            bytes: u.bytes(u.len())?,
        })
    }
}

/// The `rotation` target's problem: a rotation's kind (Hadamard, block Hadamard, randomized),
/// size, block and seed, and rows to rotate.
#[derive(Debug, PartialEq)]
struct RotationProblem {
    kind: u8,
    n: usize,
    block: usize,
    seed: u64,
    rows: usize,
    x: Vec<f32>,
}

impl<'a> Arbitrary<'a> for RotationProblem {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let kind = u.int_in_range(0..=2u8)?;
        let n = usize::from(u16::arbitrary(u)? % 1100);
        let block = 1usize << u.int_in_range(0..=10u8)?;
        let seed = if kind == 2 {
            u8::arbitrary(u)?.into()
        } else {
            0
        };
        let rows = u.int_in_range(1..=3usize)?;
        let x = values(u, rows * n, false)?;
        Ok(Self {
            kind,
            n,
            block,
            seed,
            rows,
            x,
        })
    }
}

/// The `rotate_quantize` target's problem: a format, a head dimension, whether to rotate,
/// rows (with NaN and ±Inf now and then) and the cache row they go to.
#[derive(Debug, PartialEq)]
struct RotateQuantizeProblem {
    format: KvFormat,
    dim: usize,
    rotate: bool,
    rows: usize,
    start: usize,
    x: Vec<f32>,
}

impl<'a> Arbitrary<'a> for RotateQuantizeProblem {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let format = *u.choose(&KvFormat::BLOCKS)?;
        let dim = *u.choose(&[32usize, 64, 96, 128, 160, 256])?;
        let rotate = bool::arbitrary(u)?;
        let rows = u.int_in_range(1..=4usize)?;
        let start = u.int_in_range(0..=2usize)?;
        let x = values(u, rows * dim, true)?;
        Ok(Self {
            format,
            dim,
            rotate,
            rows,
            start,
            x,
        })
    }
}

/// The `attention` target's problem. `flags` bits: 1 causal, 2 a window, 4 a soft-cap of 30,
/// 8 Q and K rotated (Hadamard), 16 V rotated (randomized), 32 and 64 NaN and ±Inf now and
/// then in K and in V.
#[derive(Clone, Debug, PartialEq)]
struct AttentionProblem {
    k_format: KvFormat,
    v_format: KvFormat,
    d: usize,
    n_q: usize,
    n_kv: usize,
    h_kv: usize,
    group: usize,
    flags: u8,
    params: AttentionParams,
    config: AttentionConfig,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl<'a> Arbitrary<'a> for AttentionProblem {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let (k_format, v_format) = (*u.choose(&KvFormat::BLOCKS)?, *u.choose(&KvFormat::BLOCKS)?);
        let d = *u.choose(&[32usize, 64])?;
        let n_q = u.int_in_range(1..=3usize)?;
        let n_kv = u.int_in_range(0..=39usize)?;
        let h_kv = u.int_in_range(1..=2usize)?;
        let group = u.int_in_range(1..=4usize)?;
        let flags = u8::arbitrary(u)?;
        let params = AttentionParams {
            causal: flags & 1 == 1,
            pos_offset: u.int_in_range(0..=47usize)?,
            window: match flags & 2 == 2 {
                true => Some(u.int_in_range(1..=20usize)?),
                false => None,
            },
            softcap: (flags & 4 == 4).then_some(30.0),
            scale: None,
        };
        let config = AttentionConfig {
            block_n: *u.choose(&[1usize, 7, 16, 64])?,
            block_m: *u.choose(&[1usize, 2, 16])?,
            kv_splits: *u.choose(&[0usize, 1, 3])?,
            heads_per_task: *u.choose(&[0usize, 1])?,
        };
        let q = values(u, n_q * h_kv * group * d, false)?;
        let k = values(u, n_kv * h_kv * d, flags & 32 == 32)?;
        let v = values(u, n_kv * h_kv * d, flags & 64 == 64)?;
        Ok(Self {
            k_format,
            v_format,
            d,
            n_q,
            n_kv,
            h_kv,
            group,
            flags,
            params,
            config,
            q,
            k,
            v,
        })
    }
}

/// The largest finite magnitude among `values` (0 when there is none).
fn max_abs<'a>(values: impl IntoIterator<Item = &'a f64>) -> f64 {
    values
        .into_iter()
        .filter(|x| x.is_finite())
        .fold(0.0, |m, x| m.max(x.abs()))
}

/// `a[i, j, ..]`.
fn lane(a: &Array3<f64>, i: usize, j: usize) -> ArrayView1<'_, f64> {
    a.index_axis(Axis(0), i).index_axis_move(Axis(0), j)
}

/// Same value, or both NaN.
fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Arbitrary bytes decoded as a format (the first byte picks a block format; its row companion
/// reads the same bytes too): the oracle refuses a length that is not whole blocks (for the
/// row format: not one row of a length it takes); otherwise the CPU kernels on every
/// instruction set give the oracle's values exactly.
pub fn dequantize(data: &[u8]) {
    let DequantizeProblem { format, bytes } = decode(data);
    dequantize_as(format, bytes);
    dequantize_as(row_companion(format), bytes);
}

fn dequantize_as(format: KvFormat, bytes: &[u8]) {
    // All the bytes as one row (of whole blocks, or of a row format).
    let oracle = format.dequantize_row(bytes);
    let Ok(n) = format.values_in(bytes.len()) else {
        assert!(oracle.is_err(), "{format}: {} bytes decoded", bytes.len());
        return;
    };
    let want = oracle.expect("whole blocks decode");
    assert_eq!(want.len(), n);
    for isa in Isa::all_available() {
        let codec = CacheCodec::new(format, n, None, isa).expect("a row of a length it takes");
        let mut got = vec![0.0f32; n];
        codec.dequantize(bytes, &mut got).expect("sizes match");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(same(*g, *w), "{format} {isa}: value {i}: {g} vs {w}");
        }
        // A cache one byte short of the rows asked for is refused.
        if let Some(short) = bytes.len().checked_sub(1) {
            assert!(codec.dequantize(&bytes[..short], &mut got).is_err());
        }
    }
}

/// A rotation of an arbitrary kind and size (most sizes are refused with an error) applied
/// to arbitrary rows by the CPU kernels: forward and inverse within the tolerance of the
/// oracle.
pub fn rotation(data: &[u8]) {
    let RotationProblem {
        kind,
        n,
        block,
        seed,
        x,
        ..
    } = decode(data);
    let rotation = match kind {
        0 => Rotation::hadamard(n),
        1 => Rotation::block_hadamard(n, block),
        _ => Rotation::randomized(n, seed),
    };
    let Ok(r) = rotation else { return };
    let mut want: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    r.rotate_rows(&mut want, false).expect("whole rows");
    let tol = tolerance(Op::Rotation, Precision::F32);
    for isa in Isa::all_available() {
        let kernel = CpuRotation::new(&r, isa);
        let mut got = x.clone();
        kernel.forward_rows(&mut got).expect("whole rows");
        let g: Vec<f64> = got.iter().map(|&v| f64::from(v)).collect();
        if let Err(m) = tol.check(&g, &want) {
            panic!("{r:?} {isa} forward: {m}");
        }
        kernel.inverse_rows(&mut got).expect("whole rows");
        let back: Vec<f64> = got.iter().map(|&v| f64::from(v)).collect();
        let held: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let tol2 = rotq_reference::tolerance::Tolerance {
            rel_l2: 2.0 * tol.rel_l2,
            max_abs: 2.0 * tol.max_abs,
        };
        if let Err(m) = tol2.check(&back, &held) {
            panic!("{r:?} {isa} inverse: {m}");
        }
        // A length that is not whole rows is refused.
        if n > 1 {
            let mut odd = vec![1.0f32; n + 1];
            assert!(kernel.forward_rows(&mut odd).is_err());
        }
    }
}

/// Rows (with NaN and ±Inf now and then) rotated and quantized by the CPU kernels, in the drawn
/// block format and in its row companion: the bytes equal the oracle's quantizer applied to
/// the kernel's own rotated rows.
pub fn rotate_quantize(data: &[u8]) {
    let problem: RotateQuantizeProblem = decode(data);
    rotate_quantize_as(problem.format, &problem);
    rotate_quantize_as(row_companion(problem.format), &problem);
}

fn rotate_quantize_as(format: KvFormat, problem: &RotateQuantizeProblem) {
    let RotateQuantizeProblem {
        dim,
        rotate,
        rows,
        start,
        ref x,
        ..
    } = *problem;
    let r = rotate.then(|| Rotation::hadamard(dim).expect("a supported size"));
    for isa in Isa::all_available() {
        let codec = CacheCodec::new(format, dim, r.as_ref(), isa).expect("whole blocks");
        let rb = codec.row_bytes();
        let mut got = vec![0u8; (start + rows) * rb];
        codec.quantize(x, &mut got, start).expect("sizes match");
        let mut rotated = x.clone();
        if let Some(r) = &r {
            CpuRotation::new(r, isa)
                .forward_rows(&mut rotated)
                .expect("whole rows");
        }
        let want = format.quantize_rows(&rotated, dim).expect("whole rows");
        assert!(
            got[start * rb..] == want[..],
            "{format} dim {dim} {isa}: bytes differ from the oracle's"
        );
        // Rows that do not fit the cache, or a partial row, are refused.
        let mut small = vec![0u8; rows * rb - 1];
        assert!(codec.quantize(x, &mut small, 0).is_err());
        assert!(codec.quantize(&x[..dim - 1], &mut got, 0).is_err());
    }
}

/// A small attention problem (formats, rotation plan, masks, soft-cap, tuning all drawn from
/// the bytes) on caches the CPU codec wrote, in the drawn block formats and in their row
/// companions: the CPU kernel against the oracle on the same bytes, within the tolerance table
/// and with NaN in the same places.
pub fn attention(data: &[u8]) {
    let problem: AttentionProblem = decode(data);
    let rows = AttentionProblem {
        k_format: row_companion(problem.k_format),
        v_format: row_companion(problem.v_format),
        ..problem.clone()
    };
    attention_of(problem);
    attention_of(rows);
}

fn attention_of(problem: AttentionProblem) {
    let AttentionProblem {
        k_format,
        v_format,
        d,
        n_q,
        n_kv,
        h_kv,
        group,
        flags,
        params,
        config,
        q,
        k,
        v,
    } = problem;
    let h_q = h_kv * group;
    let plan = RotationPlan {
        qk: (flags & 8 == 8).then(|| Rotation::hadamard(d).expect("a supported size")),
        v: (flags & 16 == 16).then(|| Rotation::randomized(d, 5).expect("a supported size")),
    };
    let isa = Isa::best();
    let kc = CacheCodec::new(k_format, d, plan.qk.as_ref(), isa).expect("whole blocks");
    let vc = CacheCodec::new(v_format, d, plan.v.as_ref(), isa).expect("whole blocks");
    let (mut kb, mut vb) = (
        vec![0u8; n_kv * h_kv * kc.row_bytes()],
        vec![0u8; n_kv * h_kv * vc.row_bytes()],
    );
    kc.quantize(&k, &mut kb, 0).expect("sizes match");
    vc.quantize(&v, &mut vb, 0).expect("sizes match");
    let kv = KvCacheView::new(k_format, &kb, n_kv, h_kv, d).expect("sizes match");
    let vv = KvCacheView::new(v_format, &vb, n_kv, h_kv, d).expect("sizes match");
    let got = CpuAttention::new(&plan, isa)
        .with_config(config)
        .run(&q, n_q, h_q, &kv, &vv, &params)
        .expect("a valid problem");
    // The oracle on the same bytes.
    let decode = |f: KvFormat, b: &[u8]| -> Array3<f64> {
        let vals = f.dequantize_rows(b, d).expect("whole rows");
        Array3::from_shape_vec((n_kv, h_kv, d), vals.into_iter().map(f64::from).collect())
            .expect("sizes match")
    };
    let mut qr: Vec<f64> = q.iter().map(|&x| f64::from(x)).collect();
    if let Some(r) = &plan.qk {
        r.rotate_rows(&mut qr, false).expect("whole rows");
    }
    let qa = Array3::from_shape_vec((n_q, h_q, d), qr).expect("sizes match");
    let (ka, va) = (decode(k_format, &kb), decode(v_format, &vb));
    let out = rotq_reference::attention_f64(qa.view(), ka.view(), va.view(), &params)
        .expect("a valid problem");
    let mut want: Vec<f64> = out.output.iter().copied().collect();
    if let Some(r) = &plan.v {
        r.rotate_rows(&mut want, true).expect("whole rows");
    }
    let mut got: Vec<f64> = got.iter().map(|&x| f64::from(x)).collect();
    // The same rule for infinite V: a key whose f32 weight underflowed to 0 turns an infinite
    // V value into NaN where the f64 oracle keeps ±Inf (the fuzzer's second find, kept as
    // `underflowing-weight-times-inf`). Only possible when V holds an infinity.
    let v_infinite = va.iter().any(|x| x.is_infinite());
    for (i, (g, w)) in got.iter_mut().zip(want.iter_mut()).enumerate() {
        if g.is_nan() && w.is_infinite() && v_infinite {
            (*g, *w) = (0.0, 0.0);
        }
        assert_eq!(g.is_nan(), w.is_nan(), "NaN at {i}: {g} vs {w}");
    }
    // The f32 kernel's documented rule: a weight below f32's range (a score about 87 below
    // the row's maximum) is 0. Those weights move an output by at most `floor`, which only
    // matters when the output itself is that small (the keys that dominate have V = 0): the
    // fuzzer's first find, kept in the corpus as `underflowing-weights`.
    let vmax = max_abs(&va);
    // (× √d: the output is rotated back, which can gather a row's magnitude into one value.)
    let floor = n_kv as f64 * 1e-37 * vmax * (d as f64).sqrt();
    let wmax = max_abs(&want);
    if wmax <= 1e6 * floor {
        // Such an output is made of keys far below the row's maximum (weights ~e^-70 times
        // V), and their weights carry the f32 rounding of the scores: with scores ~2e4, an
        // ulp is 2e-3 and a weight e^-71 moves by 1e-3 relative, far above 1e-4 of the
        // output (the fuzzer's fourth find, kept as `huge-scores-tiny-output`). Each row may
        // then be off by (e^(2Δ) − 1) · Σ p·|v| (`score_slack`), plus f32 sums of the weights
        // and V.
        let slack = score_slack(&q, &qa, &ka, &params, plan.qk.is_some());
        let u = f64::from(f32::EPSILON) / 2.0;
        let sums = (2.0 * n_kv as f64 + 32.0) * u;
        let abs_v = va.mapv(f64::abs);
        let pv = rotq_reference::attention_f64(qa.view(), ka.view(), abs_v.view(), &params)
            .expect("a valid problem")
            .output;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let (row, c) = (i / d, i % d);
            let pv_row = lane(&pv, row / h_q, row % h_q);
            // Rotated back by R_vᵀ, an error bounded by e_c per value is at most ‖e‖₂ anywhere.
            let pv_c = if plan.v.is_some() {
                pv_row.iter().map(|x| x * x).sum::<f64>().sqrt()
            } else {
                pv_row[c]
            };
            let rounding = ((2.0 * slack[row]).exp_m1() + sums) * pv_c;
            assert!(
                g.is_nan() || (g - w).abs() <= 2.0 * floor.max(1e-4 * wmax) + rounding || g == w,
                "{k_format}/{v_format} {params:?}: value {i}: {g} vs {w} (underflow bound {floor:e}, score rounding {rounding:e})"
            );
        }
        return;
    }
    let tol = tolerance(Op::Attention, Precision::F32);
    if let Err(m) = tol.check(&got, &want) {
        // An output that cancels (Σ p·v small beside Σ p·|v|) carries f32 rounding of the
        // larger sum: measure the error against Σ p·|v| then (the fuzzer's third find, kept
        // as `cancelling-output`).
        let abs_v = va.mapv(f64::abs);
        let scale = max_abs(
            &rotq_reference::attention_f64(qa.view(), ka.view(), abs_v.view(), &params)
                .expect("a valid problem")
                .output,
        ) * (d as f64).sqrt();
        let worst = got
            .iter()
            .zip(&want)
            .filter(|(g, w)| g.is_finite() && w.is_finite())
            .fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
        // And scores of huge magnitude carry f32 rounding of up to `ds` (dot products of d
        // terms, Q rotated in f32), which scales every weight by up to e^(2 ds).
        let (qmax, kmax) = (max_abs(&qa), max_abs(&ka));
        let ds = (2.0 * d as f64 + 8.0) * f64::from(f32::EPSILON) * d as f64 * qmax * kmax
            / (d as f64).sqrt();
        let allowed = (tol.max_abs + (4.0 * ds).exp_m1()) * scale;
        assert!(
            worst <= allowed,
            "{k_format}/{v_format} {params:?} {config:?}: {m}; largest error {worst:e} against Σ p|v| {scale:e}"
        );
    }
}

/// Per query row `(i, h)`, a bound Δ on how far the f32 kernel's softmax exponents stray from
/// the f64 oracle's, so that each weight is off by a factor within e^(±2Δ) after
/// normalization (softmax ignores a common shift, so only each score's own error counts).
///
/// A score is `q̂ · k` with `q̂` = Q rotated (by `R` in f32: an error of (log₂ d + 3) u ‖q‖₁ / √d
/// per value) and scaled in f32 (2u), then a dot product of d terms (γ_d Σ |q k|); the soft-cap
/// (1-Lipschitz) adds a few ulps of the cap; subtracting the maximum, `exp` and the online
/// rescaling add u per unit of exponent (at most about 110 for a key that keeps any weight),
/// a few ulps per tile. Keys whose scores sit so far below the maximum that their f32 weight is
/// exactly 0 are left out (the underflow bound covers them), and so are keys with a non-finite
/// score (their weight is exactly 0 or the row is NaN in both).
fn score_slack(
    q: &[f32],
    qa: &Array3<f64>,
    ka: &Array3<f64>,
    params: &AttentionParams,
    rotated: bool,
) -> Vec<f64> {
    let u = f64::from(f32::EPSILON) / 2.0;
    let (n_q, h_q, d) = qa.dim();
    let (n_kv, h_kv, _) = ka.dim();
    let df = d as f64;
    let scale = 1.0 / df.sqrt();
    let mut slack = Vec::with_capacity(n_q * h_q);
    for i in 0..n_q {
        for h in 0..h_q {
            let qi = lane(qa, i, h);
            let q1: f64 = q[(i * h_q + h) * d..][..d]
                .iter()
                .map(|x| f64::from(x.abs()))
                .sum();
            // (score, its error bound) of each visible key with a finite score.
            let keys: Vec<(f64, f64)> = (0..n_kv)
                .filter(|&j| params.visible(i, j))
                .filter_map(|j| {
                    let kj = lane(ka, j, h / (h_q / h_kv));
                    let raw = scale * qi.dot(&kj);
                    let score = params.softcap.map_or(raw, |c| c * (raw / c).tanh());
                    let sum_qk: f64 = qi.iter().zip(&kj).map(|(a, b)| (a * b).abs()).sum();
                    // An infinite raw score is infinite in f32 too: only the cap's rounding.
                    let mut e = params.softcap.map_or(0.0, |c| 8.0 * u * c);
                    if sum_qk.is_finite() {
                        e += u * ((df + 6.0) * scale * sum_qk + 256.0 + 4.0 * n_kv as f64);
                        if rotated {
                            let k1: f64 = kj.iter().map(|x| x.abs()).sum();
                            e += u * (df.log2() + 3.0) * scale * q1 * k1 / df.sqrt();
                        }
                    }
                    score.is_finite().then_some((score, e))
                })
                .collect();
            let (top, top_e) =
                keys.iter().fold(
                    (f64::NEG_INFINITY, 0.0),
                    |m, &k| if k.0 > m.0 { k } else { m },
                );
            // A key more than 110 below the f32 maximum weighs exactly 0 in f32.
            let delta = keys
                .iter()
                .filter(|(score, e)| score + e >= top - top_e - 110.0)
                .fold(0.0f64, |m, (_, e)| m.max(*e));
            slack.push(delta);
        }
    }
    slack
}

/// Arbitrary bytes as a tuning cache file: reading it never panics, never trusts what does
/// not parse, and never changes the file; a file read as usable is one the writer accepts
/// (the autotuner merges into what `read` gives it), and written back as the schema writes it,
/// reads the same. (The writer itself, `rotq_autotune::cache`, which moves a corrupt file
/// aside, replays this corpus in its tests: this crate cannot depend on it, which depends on
/// this crate.)
pub fn tune_cache(data: &[u8]) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "rotq-fuzz-{}-{}",
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("a temporary folder");
    let path = dir.join("tuned.json");
    std::fs::write(&path, data).expect("a temporary file");
    // The identity the bytes most likely name (a fuzzer finds it in the seed corpus).
    let device = DeviceIdentity {
        name: "fuzz".into(),
        compute_capability: None,
        driver_version: None,
    };
    match TuneFile::peek(&path, &device) {
        Loaded::Usable(f) => {
            for entry in f.entries.values() {
                let _ = entry.in_force::<serde_json::Value>("h", |_| true);
            }
            let file = match read(&path) {
                Ok(Contents::Ours(file)) => file,
                other => panic!("usable to a reader, refused by the writer: {other:?}"),
            };
            std::fs::write(&path, file.to_json()).expect("a temporary file");
            match TuneFile::peek(&path, &device) {
                Loaded::Usable(g) => assert_eq!(f, g),
                other => panic!("written back and read again: {other:?}"),
            }
        }
        Loaded::Corrupt { kept_at, .. } => {
            assert!(kept_at.is_none(), "peek moves nothing");
            assert_eq!(std::fs::read(&path).expect("left in place"), data);
        }
        _ => {}
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Arbitrary bytes as a model's `config.json`, through [`rotq::checkpoint::TransformConfig`]:
/// parsing answers (a config, none, or a typed error) and never panics; plans built without
/// weights (Hadamard schemes; targets, ignore lists, `re:` patterns and class names matched
/// against a Llama-style model's modules; `head_dim` blocks), strict or with rotq's wider
/// Hadamard sizes, are one per layer and fit the model's head dimension, the strict plans a
/// subset of the wider ones; and a config that parsed once parses again from its own text the
/// same way.
pub fn transform_config(data: &[u8]) {
    use rotq::checkpoint::TransformConfig;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(Some(config)) = TransformConfig::from_config_json(text) else {
        return;
    };
    let again = TransformConfig::from_config_json(text);
    assert!(
        matches!(&again, Ok(Some(c)) if *c == config),
        "a second parse differs: {again:?}"
    );
    let (n_layers, head_dim) = (3, 8);
    let wide = rotq::checkpoint::CheckpointOptions {
        extended_hadamard: true,
    };
    let strict = config.plans(n_layers, head_dim, None);
    if let Ok(plans) = &strict {
        assert_eq!(plans.len(), n_layers);
        for plan in plans {
            assert!(plan.check_dims(head_dim, head_dim).is_ok());
        }
        // What compressed-tensors builds, rotq's wider option builds the same way.
        assert!(
            matches!(config.plans_with(n_layers, head_dim, None, &wide), Ok(w) if w == *plans),
            "the wider option changed a strict plan"
        );
    }
}

/// The `batch` target's problem: a small pool, a slot mapping for one batch append, and a
/// batch description (tables in either form, query offsets, positions, a mask) built from raw
/// values, most of them malformed.
#[derive(Debug)]
struct BatchProblem {
    k_format: KvFormat,
    v_format: KvFormat,
    d: usize,
    h_kv: usize,
    group: usize,
    n_pages: usize,
    page_tokens: usize,
    csr: bool,
    /// Table cells (block) or indices (CSR), as raw signed values.
    cells: Vec<i32>,
    /// seq_lens (block) or last_page_len (CSR).
    lens: Vec<u32>,
    /// Columns (block) or the raw indptr (CSR).
    max_blocks: usize,
    indptr: Vec<u32>,
    loc: Vec<u32>,
    q_positions: Option<Vec<u32>>,
    mask_stride: Option<usize>,
    params: AttentionParams,
    slots: Vec<i64>,
    values: Vec<f32>,
}

impl<'a> Arbitrary<'a> for BatchProblem {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let small = |u: &mut Unstructured<'a>, hi: usize| u.int_in_range(0..=hi);
        let k_format = *u.choose(&[KvFormat::F16, KvFormat::Q8_0, KvFormat::Q4_0])?;
        let v_format = *u.choose(&[KvFormat::F32, KvFormat::Q8_0, KvFormat::Iq4Nl])?;
        let d = *u.choose(&[32usize, 64])?;
        let (h_kv, group) = (small(u, 1)? + 1, small(u, 2)? + 1);
        let (n_pages, page_tokens) = (small(u, 10)?, small(u, 6)?);
        let csr = bool::arbitrary(u)?;
        let seqs = small(u, 4)?;
        let cells = (0..small(u, 12)?)
            .map(|_| Ok(i32::from(i8::arbitrary(u)?) % 14))
            .collect::<arbitrary::Result<_>>()?;
        let lens = (0..seqs)
            .map(|_| Ok(u32::from(u8::arbitrary(u)? % 40)))
            .collect::<arbitrary::Result<_>>()?;
        let max_blocks = small(u, 4)?;
        let indptr = (0..=seqs)
            .map(|_| Ok(u32::from(u8::arbitrary(u)? % 14)))
            .collect::<arbitrary::Result<_>>()?;
        let loc = (0..=seqs + small(u, 1)?)
            .map(|_| Ok(u32::from(u8::arbitrary(u)? % 12)))
            .collect::<arbitrary::Result<_>>()?;
        let q_positions = if bool::arbitrary(u)? {
            Some(
                (0..seqs)
                    .map(|_| Ok(u32::from(u8::arbitrary(u)?)))
                    .collect::<arbitrary::Result<_>>()?,
            )
        } else {
            None
        };
        let mask_stride =
            bool::arbitrary(u)?.then(|| usize::from(u8::arbitrary(u).unwrap_or(0) % 48));
        let params = AttentionParams {
            causal: bool::arbitrary(u)?,
            window: bool::arbitrary(u)?.then(|| small(u, 9).unwrap_or(0)),
            softcap: bool::arbitrary(u)?.then_some(30.0),
            ..Default::default()
        };
        let slots = (0..small(u, 8)?)
            .map(|_| Ok(i64::from(i8::arbitrary(u)?)))
            .collect::<arbitrary::Result<Vec<_>>>()?;
        let values = values(u, slots.len() * h_kv * d, true)?;
        Ok(Self {
            k_format,
            v_format,
            d,
            h_kv,
            group,
            n_pages,
            page_tokens,
            csr,
            cells,
            lens,
            max_blocks,
            indptr,
            loc,
            q_positions,
            mask_stride,
            params,
            slots,
            values,
        })
    }
}

/// The batch engine API (`rotq::pool`) on a decoded problem: a batch append either writes
/// exactly the named slots or fails with the pool unchanged; tables that check convert to the
/// other form and back; a batch that plans runs, with every buffer of the planned size, and a
/// buffer one value short is refused; a malformed batch is an error, never a panic.
///
/// ```
/// rotq_testkit::fuzzing::batch(&[1, 0, 0, 0, 4, 3, 1, 2, 1, 2]);
/// ```
pub fn batch(data: &[u8]) {
    use rotq::pool::{Batch, KvPool, Mask, PageTables, PoolSpec};
    let p: BatchProblem = decode(data);
    let spec = PoolSpec {
        k_format: p.k_format,
        v_format: p.v_format,
        plan: RotationPlan {
            qk: Some(Rotation::hadamard(p.d).expect("a supported size")),
            v: None,
        },
        n_kv_heads: p.h_kv,
        head_dim: p.d,
        v_dim: p.d,
        n_pages: p.n_pages,
        page_tokens: p.page_tokens,
        query: rotq::QueryMode::Auto,
    };
    let Ok(mut pool) = KvPool::new(spec) else {
        assert_eq!(p.page_tokens, 0, "only a page of no tokens is refused here");
        return;
    };
    // One batch append: all or nothing.
    let (k0, v0) = (pool.k().to_vec(), pool.v().to_vec());
    let positions: Vec<u64> = (0..p.slots.len() as u64).collect();
    let slots = p.n_pages * p.page_tokens;
    match pool.append(&p.values, &p.values, &p.slots, &positions) {
        Ok(()) => {
            for (i, &s) in p.slots.iter().enumerate() {
                if s >= 0 {
                    assert_eq!(pool.position(s as usize), Some(i as u64), "slot {s}");
                }
            }
        }
        Err(_) => {
            assert_eq!(
                (pool.k(), pool.v()),
                (&k0[..], &v0[..]),
                "a failed append wrote"
            );
            let mut sorted: Vec<i64> = p.slots.iter().copied().filter(|&s| s >= 0).collect();
            sorted.sort_unstable();
            let bad = p.slots.iter().any(|&s| s < -1 || s >= slots as i64)
                || sorted.windows(2).any(|w| w[0] == w[1]);
            assert!(bad, "a valid slot mapping was refused: {:?}", p.slots);
        }
    }
    // Raw signed cells as CSR indices: negative ones become huge, outside the pool.
    let indices: Vec<u32> = p.cells.iter().map(|&c| c as u32).collect();
    let tables = if p.csr {
        PageTables::Csr {
            indptr: &p.indptr,
            indices: &indices,
            last_page_len: &p.lens,
        }
    } else {
        PageTables::Block {
            table: &p.cells,
            max_blocks: p.max_blocks,
            seq_lens: &p.lens,
        }
    };
    if let Ok(seqs) = tables.check(p.n_pages, p.page_tokens) {
        for s in &seqs {
            assert!(s.len <= s.pages.len() * p.page_tokens);
            assert!(s.pages.iter().all(|&pg| (pg as usize) < p.n_pages));
        }
        let (indptr, indices, last) = tables.to_csr(p.n_pages, p.page_tokens).expect("checked");
        let csr = PageTables::Csr {
            indptr: &indptr,
            indices: &indices,
            last_page_len: &last,
        };
        assert_eq!(
            csr.check(p.n_pages, p.page_tokens).expect("converted"),
            seqs
        );
    }
    let rows = p.loc.last().copied().unwrap_or(0) as usize;
    let mask_values = vec![0.5f32; rows * p.mask_stride.unwrap_or(0)];
    let h_q = p.h_kv * p.group;
    let batch = Batch {
        params: p.params.clone(),
        q_positions: p.q_positions.as_deref(),
        mask: p.mask_stride.map(|row_stride| Mask {
            values: &mask_values,
            row_stride,
        }),
        ..Batch::new(&p.loc, tables, h_q)
    };
    let Ok(plan) = pool.plan(&batch) else {
        return;
    };
    let q: Vec<f32> = (0..rows * h_q * p.d)
        .map(|i| (i as f32 * 0.37).sin())
        .collect();
    let mut ws = vec![0f32; plan.workspace_len()];
    let mut out = vec![0f32; plan.out_len()];
    let mut lse = vec![0f32; plan.lse_len()];
    assert_eq!(out.len(), rows * h_q * p.d);
    pool.run(&plan, &batch, &q, &mut ws, &mut out, Some(&mut lse))
        .expect("a planned batch runs");
    if let Some(short) = out.len().checked_sub(1) {
        assert!(pool
            .run(&plan, &batch, &q, &mut ws, &mut out[..short], None)
            .is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The reader the corpora were written with, before `arbitrary`: a byte, a little-endian
    /// `u16`, `byte % len` for a choice or a count, zeros past the end. Kept as the reference
    /// the decoders must agree with on every corpus file.
    struct Legacy<'a> {
        data: &'a [u8],
        at: usize,
    }

    impl<'a> Legacy<'a> {
        fn byte(&mut self) -> u8 {
            let b = self.data.get(self.at).copied().unwrap_or(0);
            self.at += 1;
            b
        }
        fn u16(&mut self) -> u16 {
            u16::from(self.byte()) | (u16::from(self.byte()) << 8)
        }
        fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.byte() as usize % items.len()]
        }
        fn values(&mut self, n: usize, special: bool) -> Vec<f32> {
            let one = |raw: u16| match special && raw.is_multiple_of(97) {
                true => [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][(raw as usize / 97) % 3],
                false => f32::from(raw as i16) / 64.0,
            };
            (0..n).map(|_| one(self.u16())).collect()
        }
        fn rest(&self) -> &'a [u8] {
            self.data.get(self.at..).unwrap_or(&[])
        }
    }

    /// The formats the corpora were written with (the registry's before the row formats).
    const LEGACY_FORMATS: [KvFormat; 12] = [
        KvFormat::F32,
        KvFormat::F16,
        KvFormat::Bf16,
        KvFormat::Q8_0,
        KvFormat::Q4_0,
        KvFormat::Q4_1,
        KvFormat::Q5_0,
        KvFormat::Q5_1,
        KvFormat::Iq4Nl,
        KvFormat::Q6_0,
        KvFormat::Int4,
        KvFormat::Fp8E4m3,
    ];

    fn legacy_dequantize(data: &[u8]) -> DequantizeProblem<'_> {
        let mut l = Legacy { data, at: 0 };
        let format = l.pick(&LEGACY_FORMATS);
        DequantizeProblem {
            format,
            bytes: l.rest(),
        }
    }

    fn legacy_rotation(data: &[u8]) -> RotationProblem {
        let mut l = Legacy { data, at: 0 };
        let kind = l.byte() % 3;
        let n = usize::from(l.u16() % 1100);
        let block = 1usize << (l.byte() % 11);
        let seed = if kind == 2 { u64::from(l.byte()) } else { 0 };
        let rows = 1 + usize::from(l.byte() % 3);
        let x = l.values(rows * n, false);
        RotationProblem {
            kind,
            n,
            block,
            seed,
            rows,
            x,
        }
    }

    fn legacy_rotate_quantize(data: &[u8]) -> RotateQuantizeProblem {
        let mut l = Legacy { data, at: 0 };
        let format = l.pick(&LEGACY_FORMATS);
        let dim = l.pick(&[32usize, 64, 96, 128, 160, 256]);
        let rotate = l.byte() % 2 == 1;
        let rows = 1 + usize::from(l.byte() % 4);
        let start = usize::from(l.byte() % 3);
        let x = l.values(rows * dim, true);
        RotateQuantizeProblem {
            format,
            dim,
            rotate,
            rows,
            start,
            x,
        }
    }

    fn legacy_attention(data: &[u8]) -> AttentionProblem {
        let mut l = Legacy { data, at: 0 };
        let (k_format, v_format) = (l.pick(&LEGACY_FORMATS), l.pick(&LEGACY_FORMATS));
        let d = l.pick(&[32usize, 64]);
        let n_q = 1 + usize::from(l.byte() % 3);
        let n_kv = usize::from(l.byte() % 40);
        let h_kv = 1 + usize::from(l.byte() % 2);
        let group = 1 + usize::from(l.byte() % 4);
        let flags = l.byte();
        let params = AttentionParams {
            causal: flags & 1 == 1,
            pos_offset: usize::from(l.byte() % 48),
            window: (flags & 2 == 2).then(|| 1 + usize::from(l.byte() % 20)),
            softcap: (flags & 4 == 4).then_some(30.0),
            scale: None,
        };
        let config = AttentionConfig {
            block_n: l.pick(&[1usize, 7, 16, 64]),
            block_m: l.pick(&[1usize, 2, 16]),
            kv_splits: l.pick(&[0usize, 1, 3]),
            heads_per_task: l.pick(&[0usize, 1]),
        };
        let q = l.values(n_q * h_kv * group * d, false);
        let k = l.values(n_kv * h_kv * d, flags & 32 == 32);
        let v = l.values(n_kv * h_kv * d, flags & 64 == 64);
        AttentionProblem {
            k_format,
            v_format,
            d,
            n_q,
            n_kv,
            h_kv,
            group,
            flags,
            params,
            config,
            q,
            k,
            v,
        }
    }

    /// Every file of `fuzz/corpus/<target>/`, by name.
    fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| {
                let path = e.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&path).unwrap())
            })
            .collect();
        files.sort();
        // (Guards against a wrong path or an emptied corpus passing vacuously; the minimized
        // corpora hold 73 to 634 files.)
        assert!(files.len() >= 50, "{target}: {} files", files.len());
        files
    }

    /// Bits-exact equality of decoded values (NaN included), through their `Debug` text.
    fn same_problem<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    #[test]
    fn every_corpus_file_decodes_as_it_did_before_arbitrary() {
        // Short and empty inputs too: past the end both read zeros.
        let tiny: Vec<(String, Vec<u8>)> = [&[][..], &[7], &[200, 1], &[3; 35]]
            .iter()
            .map(|d| (format!("{d:?}"), d.to_vec()))
            .collect();
        for (name, data) in corpus("dequantize").iter().chain(&tiny) {
            let new: DequantizeProblem = decode(data);
            assert_eq!(new, legacy_dequantize(data), "dequantize/{name}");
        }
        for (name, data) in corpus("rotation").iter().chain(&tiny) {
            let new: RotationProblem = decode(data);
            assert!(
                same_problem(&new, &legacy_rotation(data)),
                "rotation/{name}"
            );
        }
        for (name, data) in corpus("rotate_quantize").iter().chain(&tiny) {
            let new: RotateQuantizeProblem = decode(data);
            let old = legacy_rotate_quantize(data);
            assert!(same_problem(&new, &old), "rotate_quantize/{name}");
        }
        for (name, data) in corpus("attention").iter().chain(&tiny) {
            let new: AttentionProblem = decode(data);
            assert!(
                same_problem(&new, &legacy_attention(data)),
                "attention/{name}"
            );
        }
    }
}
