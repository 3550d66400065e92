//! The properties the fuzz targets (`fuzz/`) check, one function per target, so that the
//! targets and the corpus replay test (`tests/fuzz_corpus.rs`) run the same code.
//!
//! Each function takes arbitrary bytes, decodes a problem from them, and panics when a
//! property fails: a kernel that panics, reads out of bounds or disagrees with the oracle, or
//! a bad input that is not refused with an error. Inputs the library rightly refuses (an
//! unsupported size, a truncated buffer) are fine; the point is that they are refused, not
//! that they succeed.
//!
//! ```
//! rotq::fuzzing::dequantize(&[3, 1, 2, 3]); // a too-short q4_0 block: refused, no panic
//! ```

use crate::reference::tolerance::{tolerance, Op, Precision};
use crate::reference::tuned::{DeviceIdentity, Loaded, TuneFile};
use crate::{AttentionParams, KvFormat, Rotation, RotationPlan};
use ndarray::{Array3, ArrayView1, Axis};
use rotq_cpu::{AttentionConfig, CacheCodec, CpuAttention, CpuRotation, Isa, KvCacheView};

/// Reads a problem's fields from the fuzzer's bytes; past the end it reads zeros.
struct Input<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, at: 0 }
    }

    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from(self.byte()) | (u16::from(self.byte()) << 8)
    }

    /// One of `items`.
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.byte() as usize % items.len()]
    }

    /// A value in [-512, 512) in steps of 1/64, or, when `special`, sometimes NaN or ±Inf.
    fn value(&mut self, special: bool) -> f32 {
        let raw = self.u16();
        if special && raw.is_multiple_of(97) {
            return [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][(raw as usize / 97) % 3];
        }
        f32::from(raw as i16) / 64.0
    }

    fn values(&mut self, n: usize, special: bool) -> Vec<f32> {
        (0..n).map(|_| self.value(special)).collect()
    }

    /// The bytes not read yet.
    fn rest(&self) -> &'a [u8] {
        self.data.get(self.at..).unwrap_or(&[])
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

/// Arbitrary bytes decoded as a format (the first byte picks it): the oracle refuses a length
/// that is not whole blocks; otherwise the CPU kernels on every instruction set give the
/// oracle's values exactly.
pub fn dequantize(data: &[u8]) {
    let mut inp = Input::new(data);
    let format = inp.pick(&KvFormat::ALL);
    let bytes = inp.rest();
    let oracle = format.dequantize_row(bytes);
    let Ok(n) = format.values_in(bytes.len()) else {
        assert!(oracle.is_err(), "{format}: {} bytes decoded", bytes.len());
        return;
    };
    let want = oracle.expect("whole blocks decode");
    assert_eq!(want.len(), n);
    for isa in Isa::all_available() {
        let codec = CacheCodec::new(format, n, None, isa).expect("a whole number of blocks");
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
    let mut inp = Input::new(data);
    let kind = inp.byte() % 3;
    let n = usize::from(inp.u16() % 1100);
    let block = 1usize << (inp.byte() % 11);
    let rotation = match kind {
        0 => Rotation::hadamard(n),
        1 => Rotation::block_hadamard(n, block),
        _ => Rotation::randomized(n, u64::from(inp.byte())),
    };
    let Ok(r) = rotation else { return };
    let rows = 1 + usize::from(inp.byte() % 3);
    let x = inp.values(rows * n, false);
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
        let tol2 = crate::reference::tolerance::Tolerance {
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

/// Rows (with NaN and ±Inf now and then) rotated and quantized by the CPU kernels: the bytes
/// equal the oracle's quantizer applied to the kernel's own rotated rows.
pub fn rotate_quantize(data: &[u8]) {
    let mut inp = Input::new(data);
    let format = inp.pick(&KvFormat::ALL);
    let dim = inp.pick(&[32usize, 64, 96, 128, 160, 256]);
    let rotate = inp.byte() % 2 == 1;
    let rows = 1 + usize::from(inp.byte() % 4);
    let start = usize::from(inp.byte() % 3);
    let x = inp.values(rows * dim, true);
    let r = rotate.then(|| Rotation::hadamard(dim).expect("a supported size"));
    for isa in Isa::all_available() {
        let codec = CacheCodec::new(format, dim, r.as_ref(), isa).expect("whole blocks");
        let rb = codec.row_bytes();
        let mut got = vec![0u8; (start + rows) * rb];
        codec.quantize(&x, &mut got, start).expect("sizes match");
        let mut rotated = x.clone();
        if let Some(r) = &r {
            CpuRotation::new(r, isa)
                .forward_rows(&mut rotated)
                .expect("whole rows");
        }
        let want = format.quantize_row(&rotated).expect("whole blocks");
        assert!(
            got[start * rb..] == want[..],
            "{format} dim {dim} {isa}: bytes differ from the oracle's"
        );
        // Rows that do not fit the cache, or a partial row, are refused.
        let mut small = vec![0u8; rows * rb - 1];
        assert!(codec.quantize(&x, &mut small, 0).is_err());
        assert!(codec.quantize(&x[..dim - 1], &mut got, 0).is_err());
    }
}

/// A small attention problem (formats, rotation plan, masks, soft-cap, tuning all drawn from
/// the bytes) on caches the CPU codec wrote: the CPU kernel against the oracle on the same
/// bytes, within the tolerance table and with NaN in the same places.
pub fn attention(data: &[u8]) {
    let mut inp = Input::new(data);
    let (k_format, v_format) = (inp.pick(&KvFormat::ALL), inp.pick(&KvFormat::ALL));
    let d = inp.pick(&[32usize, 64]);
    let n_q = 1 + usize::from(inp.byte() % 3);
    let n_kv = usize::from(inp.byte() % 40);
    let h_kv = 1 + usize::from(inp.byte() % 2);
    let group = 1 + usize::from(inp.byte() % 4);
    let h_q = h_kv * group;
    let flags = inp.byte();
    let params = AttentionParams {
        causal: flags & 1 == 1,
        pos_offset: usize::from(inp.byte() % 48),
        window: (flags & 2 == 2).then(|| 1 + usize::from(inp.byte() % 20)),
        softcap: (flags & 4 == 4).then_some(30.0),
        scale: None,
    };
    let plan = RotationPlan {
        qk: (flags & 8 == 8).then(|| Rotation::hadamard(d).expect("a supported size")),
        v: (flags & 16 == 16).then(|| Rotation::randomized(d, 5).expect("a supported size")),
    };
    let config = AttentionConfig {
        block_n: inp.pick(&[1usize, 7, 16, 64]),
        block_m: inp.pick(&[1usize, 2, 16]),
        kv_splits: inp.pick(&[0usize, 1, 3]),
        heads_per_task: inp.pick(&[0usize, 1]),
    };
    let q = inp.values(n_q * h_q * d, false);
    let k = inp.values(n_kv * h_kv * d, flags & 32 == 32);
    let v = inp.values(n_kv * h_kv * d, flags & 64 == 64);
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
        let vals = if b.is_empty() {
            Vec::new()
        } else {
            f.dequantize_row(b).expect("whole blocks")
        };
        Array3::from_shape_vec((n_kv, h_kv, d), vals.into_iter().map(f64::from).collect())
            .expect("sizes match")
    };
    let mut qr: Vec<f64> = q.iter().map(|&x| f64::from(x)).collect();
    if let Some(r) = &plan.qk {
        r.rotate_rows(&mut qr, false).expect("whole rows");
    }
    let qa = Array3::from_shape_vec((n_q, h_q, d), qr).expect("sizes match");
    let (ka, va) = (decode(k_format, &kb), decode(v_format, &vb));
    let out = crate::reference::attention_f64(qa.view(), ka.view(), va.view(), &params)
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
        let pv = crate::reference::attention_f64(qa.view(), ka.view(), abs_v.view(), &params)
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
            &crate::reference::attention_f64(qa.view(), ka.view(), abs_v.view(), &params)
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
/// not parse, and a usable section survives a save and a second read unchanged.
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
            f.save(&path)
                .expect("a cache of this schema is written over");
            match TuneFile::load(&path, &device) {
                Loaded::Usable(g) => assert_eq!(f, g),
                other => panic!("saved and read back: {other:?}"),
            }
        }
        Loaded::Corrupt { kept_at, .. } => assert!(kept_at.is_none(), "peek moves nothing"),
        _ => {}
    }
    // Loading moves a corrupt file aside, never deletes it.
    if let Loaded::Corrupt {
        kept_at: Some(aside),
        ..
    } = TuneFile::load(&path, &device)
    {
        assert_eq!(std::fs::read(&aside).expect("kept"), data);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Arbitrary bytes as a model's `config.json`, through [`crate::checkpoint::TransformConfig`]:
/// parsing answers (a config, none, or a typed error) and never panics; plans built without
/// weights (Hadamard schemes) are one per layer and fit the model's head dimension, and a
/// config that parsed once parses again from its own text the same way.
pub fn transform_config(data: &[u8]) {
    use crate::checkpoint::TransformConfig;
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
    if let Ok(plans) = config.plans(n_layers, head_dim, None) {
        assert_eq!(plans.len(), n_layers);
        for plan in &plans {
            assert!(plan.check_dims(head_dim, head_dim).is_ok());
        }
    }
}
