//! Dense attention and rotated quantized attention: the identities of the spec, the masks
//! (causality, window, additive), the log-sum-exp, GQA, edge cases and errors.

use ndarray::{s, Array2, Array3, Axis};
use proptest::prelude::*;
use rotq_reference::metrics::{kl_divergence, rel_l2};
use rotq_reference::tolerance::{Op, Precision};
use rotq_reference::*;
use rotq_testkit::{data::Rows, oracle::assert_matches, rotations::RotationKind};

/// Uniform values in `[-scale, scale)` of this shape (the test kit's seeded rows).
fn random(shape: (usize, usize, usize), seed: u64, scale: f32) -> Array3<f32> {
    let (a, b, c) = shape;
    Array3::from_shape_vec(shape, Rows::uniform(scale).f32s(a * b * c, seed)).unwrap()
}

fn flat(a: &Array3<f64>) -> Vec<f64> {
    a.iter().copied().collect()
}

fn f32_cache(plan: RotationPlan) -> KvCacheSpec {
    KvCacheSpec {
        k_format: KvFormat::F32,
        v_format: KvFormat::F32,
        plan,
    }
}

/// Head dims with a Hadamard (so every rotation kind applies) and a block of 16.
const DIMS: [usize; 7] = [16, 32, 48, 64, 80, 96, 128];

#[derive(Debug, Clone)]
struct Case {
    n_q: usize,
    n_kv: usize,
    h_kv: usize,
    group: usize,
    d: usize,
    d_v: usize,
    params: AttentionParams,
    seed: u64,
}

fn cases() -> impl Strategy<Value = Case> {
    (
        0usize..5,
        0usize..24,
        1usize..3,
        proptest::sample::select(vec![1usize, 2, 4]),
        proptest::sample::select(DIMS.to_vec()),
        proptest::sample::select(DIMS.to_vec()),
        (
            any::<bool>(),
            0usize..20,
            proptest::option::of(1usize..8),
            proptest::option::of(1.0f64..50.0),
        ),
        any::<u64>(),
    )
        .prop_map(
            |(n_q, n_kv, h_kv, group, d, d_v, (causal, pos_offset, window, softcap), seed)| Case {
                n_q,
                n_kv,
                h_kv,
                group,
                d,
                d_v,
                params: AttentionParams {
                    scale: None,
                    causal,
                    pos_offset,
                    window,
                    softcap,
                },
                seed,
            },
        )
}

impl Case {
    fn qkv(&self) -> (Array3<f32>, Array3<f32>, Array3<f32>) {
        (
            random((self.n_q, self.h_kv * self.group, self.d), self.seed, 2.0),
            random((self.n_kv, self.h_kv, self.d), self.seed ^ 1, 2.0),
            random((self.n_kv, self.h_kv, self.d_v), self.seed ^ 2, 1.0),
        )
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// (R q)·(R k) = q·k: Q+K rotation with an f32 cache leaves attention unchanged, for every
    /// rotation kind; and V rotation with the output rotated back equals no V rotation.
    #[test]
    fn rotation_leaves_attention_unchanged(
        case in cases(),
        kind_qk in proptest::sample::select(RotationKind::ROTATING.to_vec()),
        kind_v in proptest::sample::select(RotationKind::ROTATING.to_vec()),
    ) {
        let (q, k, v) = case.qkv();
        let exact = attention(q.view(), k.view(), v.view(), &case.params).unwrap();
        let plans = [
            RotationPlan { qk: kind_qk.build(case.d, case.seed), v: None },
            RotationPlan { qk: None, v: kind_v.build(case.d_v, case.seed) },
            RotationPlan {
                qk: kind_qk.build(case.d, case.seed),
                v: kind_v.build(case.d_v, case.seed ^ 3),
            },
        ];
        for (i, plan) in plans.into_iter().enumerate() {
            let rotated = rotated_quantized_attention(q.view(), k.view(), v.view(), &case.params, &f32_cache(plan)).unwrap();
            let what = format!("plan {i} (QK {kind_qk:?}, V {kind_v:?})");
            assert_matches(&flat(&rotated.output), &flat(&exact.output), Op::Attention, Precision::F32, &what);
            assert_matches(&flat(&rotated.probs), &flat(&exact.probs), Op::Attention, Precision::F32, &what);
        }
        // No rotation and an f32 cache is bit-for-bit plain attention.
        let none = rotated_quantized_attention(q.view(), k.view(), v.view(), &case.params, &f32_cache(RotationPlan::none())).unwrap();
        prop_assert_eq!(none, exact);
    }

    /// Query head h reads KV head h / group: GQA equals MHA on K/V with each head repeated.
    #[test]
    fn gqa_equals_mha_on_repeated_heads(case in cases()) {
        let (q, k, v) = case.qkv();
        let gqa = attention(q.view(), k.view(), v.view(), &case.params).unwrap();
        let h_q = case.h_kv * case.group;
        let rep = |x: &Array3<f32>| Array3::from_shape_fn((x.dim().0, h_q, x.dim().2), |(t, h, c)| x[[t, h / case.group, c]]);
        let mha = attention(q.view(), rep(&k).view(), rep(&v).view(), &case.params).unwrap();
        prop_assert_eq!(gqa, mha);
    }

    /// A query sees exactly its visible keys: attention equals non-causal, unwindowed attention
    /// over the slice of keys the mask leaves, and probabilities sum to 1 (0 if none visible).
    #[test]
    fn masks_select_exactly_the_visible_keys(case in cases()) {
        let (q, k, v) = case.qkv();
        let full = attention(q.view(), k.view(), v.view(), &case.params).unwrap();
        let open = AttentionParams { causal: false, window: None, pos_offset: 0, ..case.params.clone() };
        for i in 0..case.n_q {
            let visible: Vec<usize> = (0..case.n_kv).filter(|&j| case.params.visible(i, j)).collect();
            let probs = full.probs.slice(s![.., i, ..]);
            for h in 0..q.dim().1 {
                let total: f64 = probs.row(h).sum();
                let expected = if visible.is_empty() { 0.0 } else { 1.0 };
                prop_assert!((total - expected).abs() < 1e-12);
            }
            for j in 0..case.n_kv {
                if !visible.contains(&j) {
                    prop_assert!(probs.column(j).iter().all(|p| *p == 0.0));
                }
            }
            // Visible keys are contiguous: a causal prefix cut by the window.
            if let (Some(&lo), Some(&hi)) = (visible.first(), visible.last()) {
                prop_assert_eq!(visible.len(), hi - lo + 1);
                let qi = q.slice(s![i..i + 1, .., ..]);
                let sub = attention(qi, k.slice(s![lo..=hi, .., ..]), v.slice(s![lo..=hi, .., ..]), &open).unwrap();
                let got = full.output.slice(s![i..i + 1, .., ..]).to_owned();
                prop_assert!(rel_l2(&flat(&got), &flat(&sub.output)) < 1e-13);
            } else {
                prop_assert!(full.output.slice(s![i, .., ..]).iter().all(|x| *x == 0.0));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Causality and the window written out as an additive mask of 0 and −∞ (on a non-causal,
    /// unwindowed problem) give the same bits as the parameters: a hidden key's weight is an
    /// exact 0, and a row with every key hidden is the zero row with LSE −∞, as a row with no
    /// visible key. An all-zero mask is no mask.
    #[test]
    fn a_mask_of_zeros_and_minus_infinity_is_the_visibility_rule(case in cases()) {
        let (q, k, v) = case.qkv();
        let want = attention(q.view(), k.view(), v.view(), &case.params).unwrap();
        let open = AttentionParams { causal: false, window: None, pos_offset: 0, ..case.params.clone() };
        let rule = Array2::from_shape_fn((case.n_q, case.n_kv), |(i, j)| {
            if case.params.visible(i, j) { 0.0 } else { f32::NEG_INFINITY }
        });
        let got = attention_masked(q.view(), k.view(), v.view(), &open, Some(rule.view())).unwrap();
        prop_assert_eq!(&got, &want);
        let zeros = Array2::zeros((case.n_q, case.n_kv));
        let plain = attention_masked(q.view(), k.view(), v.view(), &case.params, Some(zeros.view())).unwrap();
        prop_assert_eq!(&plain, &want);
        for i in 0..case.n_q {
            let none = (0..case.n_kv).all(|j| !case.params.visible(i, j));
            for h in 0..q.dim().1 {
                prop_assert_eq!(want.lse[[i, h]] == f64::NEG_INFINITY, none);
            }
        }
    }

    /// A finite bias `b` reweights the probabilities by `exp(b)`: `p'_j = p_j e^{b_j} / Z` and
    /// `LSE' = LSE + ln Z` with `Z = Σ_j p_j e^{b_j}` (`p` the unbiased probabilities), and the
    /// LSE of the unbiased scores is `ln Σ_j e^{s_j}` computed directly.
    #[test]
    fn a_finite_bias_reweights_by_its_exponential(case in cases(), bias_seed in any::<u64>()) {
        let (q, k, v) = case.qkv();
        let plain = attention(q.view(), k.view(), v.view(), &case.params).unwrap();
        let bias = Array2::from_shape_vec(
            (case.n_q, case.n_kv),
            Rows::uniform(3.0).f32s(case.n_q * case.n_kv, bias_seed),
        )
        .unwrap();
        let biased = attention_masked(q.view(), k.view(), v.view(), &case.params, Some(bias.view())).unwrap();
        let scale = 1.0 / (case.d as f64).sqrt();
        for h in 0..q.dim().1 {
            for i in 0..case.n_q {
                let visible: Vec<usize> = (0..case.n_kv).filter(|&j| case.params.visible(i, j)).collect();
                if visible.is_empty() {
                    prop_assert_eq!(biased.lse[[i, h]], f64::NEG_INFINITY);
                    continue;
                }
                let score = |j: usize| {
                    let dot: f64 = (0..case.d)
                        .map(|c| f64::from(q[[i, h, c]]) * f64::from(k[[j, h / case.group, c]]))
                        .sum();
                    let s = scale * dot;
                    case.params.softcap.map_or(s, |cap| cap * (s / cap).tanh())
                };
                let direct = visible.iter().map(|&j| score(j).exp()).sum::<f64>().ln();
                prop_assert!((plain.lse[[i, h]] - direct).abs() < 1e-12 * direct.abs().max(1.0));
                let weight = |j: usize| plain.probs[[h, i, j]] * f64::from(bias[[i, j]]).exp();
                let z: f64 = visible.iter().map(|&j| weight(j)).sum();
                let lse = plain.lse[[i, h]] + z.ln();
                prop_assert!((biased.lse[[i, h]] - lse).abs() < 1e-12 * lse.abs().max(1.0));
                for &j in &visible {
                    prop_assert!((biased.probs[[h, i, j]] - weight(j) / z).abs() < 1e-12);
                }
            }
        }
    }
}

/// The edge cases of the module docs, one by one.
#[test]
fn mask_and_lse_edge_cases_follow_the_documented_rules() {
    let inf = f32::NEG_INFINITY;
    let q = random((3, 2, 32), 1, 1.0);
    let mut k = random((4, 1, 32), 2, 1.0);
    let mut v = random((4, 1, 32), 3, 1.0);
    let p = AttentionParams::default();
    let run = |k: &Array3<f32>, v: &Array3<f32>, mask: &Array2<f32>| {
        attention_masked(q.view(), k.view(), v.view(), &p, Some(mask.view())).unwrap()
    };
    let row = |a: &Attention, i: usize| a.output.slice(s![i, .., ..]).to_owned();
    // Row 0: key 1 hidden; row 1: every key hidden; row 2: a NaN bias on key 3.
    let mut mask = Array2::from_shape_fn((3, 4), |(i, j)| (i + j) as f32 * 0.25);
    mask[[0, 1]] = inf;
    mask.row_mut(1).fill(inf);
    mask[[2, 3]] = f32::NAN;
    let a = run(&k, &v, &mask);
    assert!(row(&a, 0).iter().all(|x| x.is_finite()));
    assert_eq!(a.probs[[0, 0, 1]], 0.0);
    assert!(a.lse.row(0).iter().all(|x| x.is_finite()));
    assert!(row(&a, 1).iter().all(|x| *x == 0.0));
    assert!(a.lse.row(1).iter().all(|x| *x == f64::NEG_INFINITY));
    assert!(row(&a, 2).iter().all(|x| x.is_nan()));
    assert!(a.lse.row(2).iter().all(|x| x.is_nan()));
    // A NaN in the hidden key's V row reaches row 0 (0 · NaN), in that column only.
    v[[1, 0, 5]] = f32::NAN;
    let b = run(&k, &v, &mask);
    assert!(b.output[[0, 0, 5]].is_nan() && b.output[[0, 0, 4]].is_finite());
    assert!(b.lse.row(0).iter().all(|x| x.is_finite()));
    // A NaN in its K row makes its score NaN (NaN + −∞): row 0 is NaN, LSE too. Row 1, whose
    // mask hides every key, sees none of it.
    k[[1, 0, 0]] = f32::NAN;
    let c = run(&k, &v, &mask);
    assert!(row(&c, 0).iter().all(|x| x.is_nan()) && c.lse.row(0).iter().all(|x| x.is_nan()));
    assert_eq!(row(&c, 1), row(&a, 1));
    assert!(c.lse.row(1).iter().all(|x| *x == f64::NEG_INFINITY));
    // A NaN bias at a key outside causality is never read.
    let (k0, v0) = (random((4, 1, 32), 2, 1.0), random((4, 1, 32), 3, 1.0));
    let causal = AttentionParams {
        causal: true,
        ..p.clone()
    };
    let clean = attention_masked(q.view(), k0.view(), v0.view(), &causal, None).unwrap();
    let mut far = Array2::zeros((3, 4));
    far[[0, 3]] = f32::NAN;
    let with_far = attention_masked(q.view(), k0.view(), v0.view(), &causal, Some(far.view()));
    assert_eq!(with_far.unwrap(), clean);
    // Visible scores all −∞ from the data (not the mask): 0/0, NaN output and LSE.
    let mut kinf = random((4, 1, 32), 2, 1.0);
    kinf[[0, 0, 0]] = inf;
    let qpos = Array3::from_elem((1, 1, 32), 1.0f32);
    let one = Array2::from_shape_vec((1, 4), vec![0.0, inf, inf, inf]).unwrap();
    let d = attention_masked(qpos.view(), kinf.view(), v0.view(), &p, Some(one.view())).unwrap();
    assert!(d.output.iter().all(|x| x.is_nan()) && d.lse[[0, 0]].is_nan());
    // No key at all: zero row, LSE −∞; a mask of the wrong shape is a shape error.
    let none = Array3::<f32>::zeros((0, 1, 32));
    let e = attention(q.view(), none.view(), none.view(), &p).unwrap();
    assert!(e.lse.iter().all(|x| *x == f64::NEG_INFINITY));
    let wrong = Array2::zeros((3, 5));
    assert!(matches!(
        attention_masked(q.view(), k0.view(), v0.view(), &p, Some(wrong.view())),
        Err(Error::Shape(_))
    ));
}

#[test]
fn soft_cap_bounds_the_scores() {
    let (q, k, v) = (
        random((3, 2, 64), 1, 30.0),
        random((40, 2, 64), 2, 30.0),
        random((40, 2, 64), 3, 1.0),
    );
    let cap = 2.0;
    let params = AttentionParams {
        softcap: Some(cap),
        ..Default::default()
    };
    let capped = attention(q.view(), k.view(), v.view(), &params).unwrap();
    for row in capped.probs.lanes(Axis(2)) {
        let (lo, hi) = row
            .iter()
            .fold((f64::MAX, 0.0f64), |(l, h), p| (l.min(*p), h.max(*p)));
        assert!(hi / lo <= (2.0 * cap).exp() * (1.0 + 1e-12));
    }
    // A cap far above every score changes nothing measurable.
    let loose = AttentionParams {
        softcap: Some(1e9),
        ..Default::default()
    };
    let a = attention(q.view(), k.view(), v.view(), &loose).unwrap();
    let b = attention(q.view(), k.view(), v.view(), &AttentionParams::default()).unwrap();
    assert!(rel_l2(&flat(&a.output), &flat(&b.output)) < 1e-9);
    // The explicit scale is used: scale 0 gives uniform probabilities.
    let zero = AttentionParams {
        scale: Some(0.0),
        ..Default::default()
    };
    let u = attention(q.view(), k.view(), v.view(), &zero).unwrap();
    assert!(u.probs.iter().all(|p| (p - 1.0 / 40.0).abs() < 1e-15));
}

#[test]
fn empty_inputs() {
    let q = random((2, 4, 32), 1, 1.0);
    let none = Array3::<f32>::zeros((0, 2, 32));
    let a = attention(
        q.view(),
        none.view(),
        none.view(),
        &AttentionParams::default(),
    )
    .unwrap();
    assert_eq!(a.output.dim(), (2, 4, 32));
    assert!(a.output.iter().all(|x| *x == 0.0));
    let no_q = Array3::<f32>::zeros((0, 4, 32));
    let k = random((5, 2, 32), 2, 1.0);
    let b = attention(no_q.view(), k.view(), k.view(), &AttentionParams::default()).unwrap();
    assert_eq!(b.output.dim(), (0, 4, 32));
    // A causal query before every key (offset 0, key 0 is visible; use a window to hide all).
    let c = attention(
        q.view(),
        k.view(),
        k.view(),
        &AttentionParams {
            causal: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(c.probs.slice(s![.., 0, 1..]).iter().all(|p| *p == 0.0));
}

#[test]
fn non_finite_values_follow_the_documented_rules() {
    let q = random((2, 2, 32), 1, 1.0);
    let mut k = random((6, 1, 32), 2, 1.0);
    let v = random((6, 1, 32), 3, 1.0);
    let causal = AttentionParams {
        causal: true,
        pos_offset: 2,
        ..Default::default()
    };
    // NaN in a key no query can see (position 5 > 3): no effect.
    let clean = attention(q.view(), k.view(), v.view(), &causal).unwrap();
    k[[5, 0, 7]] = f32::NAN;
    let masked = attention(q.view(), k.view(), v.view(), &causal).unwrap();
    assert_eq!(clean, masked);
    // NaN in key 3: query 0 (position 2) cannot see it, query 1 (position 3) can.
    k[[3, 0, 0]] = f32::NAN;
    let hit = attention(q.view(), k.view(), v.view(), &causal).unwrap();
    assert!(hit
        .output
        .slice(s![0, .., ..])
        .iter()
        .all(|x| x.is_finite()));
    assert!(hit.output.slice(s![1, .., ..]).iter().all(|x| x.is_nan()));
    // −Inf score acts as a mask; +Inf without soft-cap makes the row NaN, with soft-cap it is
    // capped to a finite score.
    let q1 = Array3::from_elem((1, 1, 4), 1.0f32);
    let mut k1 = Array3::from_elem((3, 1, 4), 0.5f32);
    let v1 = Array3::from_shape_fn((3, 1, 4), |(t, _, _)| t as f32);
    k1[[0, 0, 0]] = f32::NEG_INFINITY;
    let a = attention(q1.view(), k1.view(), v1.view(), &AttentionParams::default()).unwrap();
    assert_eq!(a.probs[[0, 0, 0]], 0.0);
    assert!((a.output[[0, 0, 0]] - 1.5).abs() < 1e-12);
    k1[[0, 0, 0]] = f32::INFINITY;
    let b = attention(q1.view(), k1.view(), v1.view(), &AttentionParams::default()).unwrap();
    assert!(b.output.iter().all(|x| x.is_nan()));
    let c = attention(
        q1.view(),
        k1.view(),
        v1.view(),
        &AttentionParams {
            softcap: Some(5.0),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(c.output.iter().all(|x| x.is_finite()));
}

#[test]
fn bad_shapes_and_parameters_are_typed_errors() {
    let q = random((2, 4, 64), 1, 1.0);
    let k = random((5, 2, 64), 2, 1.0);
    let d = AttentionParams::default();
    let err = |r: Result<Attention>| r.unwrap_err();
    assert!(matches!(
        err(attention(
            q.view(),
            k.view(),
            random((5, 3, 64), 3, 1.0).view(),
            &d
        )),
        Error::Shape(_)
    ));
    assert!(matches!(
        err(attention(
            q.view(),
            random((5, 3, 64), 3, 1.0).view(),
            random((5, 3, 64), 3, 1.0).view(),
            &d
        )),
        Error::Shape(_)
    ));
    assert!(matches!(
        err(attention(
            q.view(),
            random((5, 2, 32), 3, 1.0).view(),
            k.view(),
            &d
        )),
        Error::Shape(_)
    ));
    assert!(matches!(
        err(attention(
            q.view(),
            k.view(),
            random((4, 2, 64), 3, 1.0).view(),
            &d
        )),
        Error::Shape(_)
    ));
    assert!(matches!(
        err(attention(
            random((2, 0, 64), 1, 1.0).view(),
            k.view(),
            k.view(),
            &d
        )),
        Error::Shape(_)
    ));
    for params in [
        AttentionParams {
            window: Some(0),
            ..Default::default()
        },
        AttentionParams {
            softcap: Some(0.0),
            ..Default::default()
        },
        AttentionParams {
            softcap: Some(f64::INFINITY),
            ..Default::default()
        },
        AttentionParams {
            scale: Some(f64::NAN),
            ..Default::default()
        },
    ] {
        assert!(matches!(
            err(attention(q.view(), k.view(), k.view(), &params)),
            Error::InvalidParameter { .. }
        ));
    }
    let spec = |plan, f| KvCacheSpec {
        k_format: f,
        v_format: KvFormat::F16,
        plan,
    };
    let wrong_dim = RotationPlan {
        qk: Some(Rotation::hadamard(32).unwrap()),
        v: None,
    };
    assert!(matches!(
        rotated_quantized_attention(
            q.view(),
            k.view(),
            k.view(),
            &d,
            &spec(wrong_dim, KvFormat::F32)
        ),
        Err(Error::LengthMismatch { .. })
    ));
    // d = 80 is not a whole number of q4_0 blocks.
    let (q80, k80) = (random((1, 1, 80), 1, 1.0), random((3, 1, 80), 1, 1.0));
    assert!(matches!(
        rotated_quantized_attention(
            q80.view(),
            k80.view(),
            k80.view(),
            &d,
            &spec(RotationPlan::none(), KvFormat::Q4_0)
        ),
        Err(Error::RowNotMultipleOfBlock { .. })
    ));
}

#[test]
fn more_bits_mean_less_error() {
    let (q, k, v) = (
        random((8, 4, 128), 1, 2.0),
        random((64, 2, 128), 2, 2.0),
        random((64, 2, 128), 3, 1.0),
    );
    let params = AttentionParams {
        causal: true,
        pos_offset: 56,
        ..Default::default()
    };
    let exact = attention(q.view(), k.view(), v.view(), &params).unwrap();
    let err = |f: KvFormat| {
        let spec = KvCacheSpec {
            k_format: f,
            v_format: f,
            plan: RotationPlan::none(),
        };
        let a = rotated_quantized_attention(q.view(), k.view(), v.view(), &params, &spec).unwrap();
        let kl: f64 = a
            .probs
            .lanes(Axis(2))
            .into_iter()
            .zip(exact.probs.lanes(Axis(2)))
            .map(|(p, r)| kl_divergence(r.as_slice().unwrap(), p.to_vec().as_slice()))
            .sum();
        (rel_l2(&flat(&a.output), &flat(&exact.output)), kl)
    };
    let order = [
        KvFormat::Q4_0,
        KvFormat::Q5_0,
        KvFormat::Q6_0,
        KvFormat::Q8_0,
        KvFormat::F16,
        KvFormat::F32,
    ];
    let errs: Vec<(f64, f64)> = order.iter().map(|f| err(*f)).collect();
    for w in errs.windows(2) {
        assert!(w[1].0 < w[0].0 && w[1].1 < w[0].1, "{errs:?}");
    }
    assert_eq!(errs.last().unwrap().0, 0.0);
}

proptest! {
    /// The q8_0 round trip of a query row stays within the tolerance table's proven bound, for
    /// any row whose blocks' largest values lie where the f16 scale is normal: uniform rows
    /// over six decades of scale, with an outlier channel and values on rounding ties.
    #[test]
    fn quantized_queries_stay_within_the_proven_bound(
        blocks in 1usize..9,
        seed in any::<u64>(),
        log_scale in -2.0f64..6.5,
        outlier in 0usize..32,
        ties in any::<bool>(),
    ) {
        let d = 32 * blocks;
        let scale = 10f64.powf(log_scale) as f32;
        let mut q = Rows::uniform(scale).f32s(d, seed);
        q[outlier] = scale * 1.5;
        if ties {
            // Half-way between codes of the first block's step: the rounding's worst case.
            let step = q[..32].iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (i, v) in q[..32].iter_mut().enumerate().skip(1).step_by(3) {
                *v = (i as f32 % 50.0 + 0.5) * step;
            }
        }
        let back = attention::quantized_query(&q, d).unwrap();
        let (q64, back64): (Vec<f64>, Vec<f64>) = q
            .iter()
            .zip(&back)
            .map(|(&a, &b)| (f64::from(a), f64::from(b)))
            .unzip();
        let t = rotq_reference::tolerance::tolerance(Op::QueryQuantization, Precision::F32);
        prop_assert!(t.check(&back64, &q64).is_ok(), "{:?}", t.check(&back64, &q64));
    }
}

/// Outside the bound's precondition the scale is not a normal f16: a block whose largest
/// value is below `127 · 2^−25` comes back as zeros (as ggml's `quantize_row_q8_0` gives).
#[test]
fn quantized_queries_of_vanishing_blocks_are_zeros() {
    let mut q = vec![1e-7f32; 64];
    q[32..].iter_mut().for_each(|v| *v = 1.0);
    let back = attention::quantized_query(&q, 64).unwrap();
    assert!(back[..32].iter().all(|&v| v == 0.0));
    assert!(back[32..].iter().all(|&v| (v - 1.0).abs() < 1e-3));
}
