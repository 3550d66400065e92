//! Differential tests: the CPU attention kernel against the oracle, on every format, rotation
//! plan, instruction set and tuning, over proptest-drawn shapes.
//!
//! The kernel's own cache bytes are what both sides read: the oracle dequantizes them
//! (`rotq_reference`), rotates Q in f64, runs dense f64 attention and rotates the output back,
//! so the comparison isolates the attention arithmetic (quantization is checked by
//! tests/cpu_quant.rs). Every check also reads the same rows from scattered pages of a block
//! table (`KvCacheView::paged`) and wants the contiguous result's bits.

use ndarray::Array3;
use proptest::prelude::*;
use rotq::reference::attention_f64;
use rotq::reference::tolerance::{Op, Precision};
use rotq::reference::turboquant::formats::RowFormat;
use rotq::{AttentionParams, KvFormat, Rotation, RotationPlan};
use rotq_cpu::{AttentionConfig, CacheCodec, CpuAttention, DecodeRequest, Isa, KvCacheView};
use rotq_testkit::data::Rows;
use rotq_testkit::layout::scatter;
use rotq_testkit::oracle::assert_matches_f32;
use rotq_testkit::rotations::RotationKind;

#[derive(Clone, Debug)]
struct Case {
    n_q: usize,
    n_kv: usize,
    h_kv: usize,
    group: usize,
    d: usize,
    d_v: usize,
    k_format: KvFormat,
    v_format: KvFormat,
    params: AttentionParams,
    /// The rotations of Q and K, and of V.
    plan_kind: (RotationKind, RotationKind),
    config: AttentionConfig,
    seed: u64,
}

impl Case {
    fn plan(&self) -> RotationPlan {
        let (qk, v) = self.plan_kind;
        RotationKind::plan(qk, v, self.d, self.d_v, self.seed)
    }
}

/// Caches written by the kernel codec; returns (K bytes, V bytes).
fn caches(c: &Case, plan: &RotationPlan, isa: Isa) -> (Vec<u8>, Vec<u8>) {
    let kc = CacheCodec::new(c.k_format, c.d, plan.qk.as_ref(), isa).unwrap();
    let vc = CacheCodec::new(c.v_format, c.d_v, plan.v.as_ref(), isa).unwrap();
    let rows = c.n_kv * c.h_kv;
    let (mut kb, mut vb) = (
        vec![0u8; rows * kc.row_bytes()],
        vec![0u8; rows * vc.row_bytes()],
    );
    kc.quantize(&Rows::uniform(2.0).f32s(rows * c.d, c.seed ^ 2), &mut kb, 0)
        .unwrap();
    vc.quantize(
        &Rows::uniform(1.0).f32s(rows * c.d_v, c.seed ^ 3),
        &mut vb,
        0,
    )
    .unwrap();
    (kb, vb)
}

/// The oracle on the same cache bytes.
fn oracle(c: &Case, plan: &RotationPlan, q: &[f32], kb: &[u8], vb: &[u8]) -> Vec<f64> {
    let h_q = c.h_kv * c.group;
    let decode = |f: KvFormat, b: &[u8], dim: usize| -> Array3<f64> {
        let vals = f.dequantize_rows(b, dim).unwrap();
        Array3::from_shape_vec(
            (c.n_kv, c.h_kv, dim),
            vals.into_iter().map(f64::from).collect(),
        )
        .unwrap()
    };
    let mut qr: Vec<f64> = q.iter().map(|v| f64::from(*v)).collect();
    if let Some(r) = &plan.qk {
        r.rotate_rows(&mut qr, false).unwrap();
    }
    let qa = Array3::from_shape_vec((c.n_q, h_q, c.d), qr).unwrap();
    let (k, v) = (decode(c.k_format, kb, c.d), decode(c.v_format, vb, c.d_v));
    let out = attention_f64(qa.view(), k.view(), v.view(), &c.params).unwrap();
    let mut o: Vec<f64> = out.output.iter().copied().collect();
    if let Some(r) = &plan.v {
        r.rotate_rows(&mut o, true).unwrap();
    }
    o
}

fn check(c: &Case) {
    check_edited(c, |_, _| {});
}

/// [`check`] on caches that `edit` may change (to plant special values) before both run.
fn check_edited(c: &Case, edit: impl Fn(&mut [u8], &mut [u8])) {
    let plan = c.plan();
    let h_q = c.h_kv * c.group;
    let q = Rows::uniform(1.5).f32s(c.n_q * h_q * c.d, c.seed ^ 4);
    for isa in Isa::all_available() {
        let (mut kb, mut vb) = caches(c, &plan, isa);
        edit(&mut kb, &mut vb);
        let k = KvCacheView::new(c.k_format, &kb, c.n_kv, c.h_kv, c.d).unwrap();
        let v = KvCacheView::new(c.v_format, &vb, c.n_kv, c.h_kv, c.d_v).unwrap();
        let kernel = CpuAttention::new(&plan, isa).with_config(c.config);
        let got = kernel.run(&q, c.n_q, h_q, &k, &v, &c.params).unwrap();
        // The same rows in scattered pages (of a size that rarely divides the cache) read
        // in place give the same bits.
        let page_tokens = 1 + (c.seed % 23) as usize;
        let page = |f: KvFormat, b: &[u8], dim: usize| {
            scatter(b, f.row_bytes(dim).unwrap() * c.h_kv, page_tokens)
        };
        let ((kp, kt), (vp, vt)) = (page(c.k_format, &kb, c.d), page(c.v_format, &vb, c.d_v));
        let view = |f, pool, table, dim| {
            KvCacheView::paged(f, pool, table, page_tokens, c.n_kv, c.h_kv, dim).unwrap()
        };
        let (kv, vv) = (
            view(c.k_format, &kp, &kt, c.d),
            view(c.v_format, &vp, &vt, c.d_v),
        );
        let from_pages = kernel.run(&q, c.n_q, h_q, &kv, &vv, &c.params).unwrap();
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&from_pages),
            bits(&got),
            "{isa} {c:?}: paged (pages of {page_tokens})"
        );
        let want = oracle(c, &plan, &q, &kb, &vb);
        assert_matches_f32(
            &got,
            &want,
            Op::Attention,
            Precision::F32,
            &format!("{isa} {c:?}"),
        );
    }
}

/// The formats that take rows of `d` values.
fn formats_for(d: usize) -> Vec<KvFormat> {
    KvFormat::ALL
        .into_iter()
        .filter(|f| f.check_row_len(d).is_ok())
        .collect()
}

fn cases() -> impl Strategy<Value = Case> {
    // The required head dims, plus dims that are not a multiple of the SIMD width (element
    // formats only, as no block format divides them and the row formats take multiples of 8).
    let dims = vec![64usize, 80, 96, 128, 192, 256, 12, 20, 28];
    (
        (
            0usize..20,
            0usize..150,
            1usize..3,
            proptest::sample::select(vec![1usize, 2, 4, 8]),
        ),
        (
            proptest::sample::select(dims.clone()),
            proptest::sample::select(dims),
        ),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>()),
        (
            any::<bool>(),
            0usize..200,
            proptest::option::of(1usize..40),
            proptest::option::of(1.0f64..30.0),
        ),
        (0usize..4, 0usize..4).prop_map(|(qk, v)| (RotationKind::nth(qk), RotationKind::nth(v))),
        (
            proptest::sample::select(vec![1usize, 7, 16, 64, 128]),
            proptest::sample::select(vec![1usize, 3, 16, 64]),
            0usize..6,
            0usize..4,
        ),
        any::<u64>(),
    )
        .prop_map(
            |(
                (n_q, n_kv, h_kv, group),
                (d, d_v),
                (fk, fv),
                (causal, pos_offset, window, softcap),
                plan_kind,
                (block_n, block_m, kv_splits, heads_per_task),
                seed,
            )| Case {
                n_q,
                n_kv,
                h_kv,
                group,
                d,
                d_v,
                k_format: *fk.get(&formats_for(d)),
                v_format: *fv.get(&formats_for(d_v)),
                params: AttentionParams {
                    scale: None,
                    causal,
                    pos_offset,
                    window,
                    softcap,
                },
                plan_kind,
                config: AttentionConfig {
                    block_n,
                    block_m,
                    kv_splits,
                    heads_per_task,
                },
                seed,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(160))]

    #[test]
    fn kernel_matches_the_oracle(c in cases()) {
        check(&c);
    }
}

#[test]
fn every_format_pair_and_plan() {
    for (i, k_format) in KvFormat::ALL.into_iter().enumerate() {
        for (j, v_format) in KvFormat::ALL.into_iter().enumerate() {
            check(&Case {
                n_q: 5,
                n_kv: 77,
                h_kv: 2,
                group: 4,
                d: 128,
                d_v: 128,
                k_format,
                v_format,
                params: AttentionParams {
                    causal: true,
                    pos_offset: 72,
                    ..Default::default()
                },
                plan_kind: (RotationKind::nth(i % 4), RotationKind::nth(j % 4)),
                config: AttentionConfig::default(),
                seed: (i * 12 + j) as u64,
            });
        }
    }
}

/// Decode with groups of four query heads reads q4_0, q8_0 and f16 rows in registers (on
/// AVX2) instead of through a dequantized tile: every pair of those formats (and one that takes
/// the tile), with masks, soft-cap and split slices, agrees with the oracle.
#[test]
fn decode_in_registers_matches_the_oracle() {
    let formats = [
        KvFormat::Q4_0,
        KvFormat::Q8_0,
        KvFormat::F16,
        KvFormat::Q5_1,
    ];
    let mut seed = 0u64;
    for k_format in formats {
        for v_format in formats {
            for (group, d) in [(4usize, 64usize), (8, 128), (4, 256)] {
                seed += 1;
                check(&Case {
                    n_q: 1,
                    n_kv: 203,
                    h_kv: 2,
                    group,
                    d,
                    d_v: d,
                    k_format,
                    v_format,
                    params: AttentionParams {
                        causal: true,
                        pos_offset: 202,
                        window: seed.is_multiple_of(3).then_some(150),
                        softcap: seed.is_multiple_of(2).then_some(20.0),
                        scale: None,
                    },
                    plan_kind: (
                        RotationKind::Hadamard,
                        RotationKind::nth((seed % 3) as usize),
                    ),
                    config: AttentionConfig {
                        kv_splits: (seed % 4) as usize,
                        ..AttentionConfig::default()
                    },
                    seed,
                });
            }
        }
    }
}

/// A poisoned block (NaN scale) or an Inf value read in registers spreads as in the oracle.
#[test]
fn decode_in_registers_keeps_special_values() {
    let (n_kv, h_kv, d) = (150usize, 2usize, 128usize);
    for format in [KvFormat::Q4_0, KvFormat::Q8_0, KvFormat::F16] {
        let row = format.row_bytes(d).unwrap();
        // (cache, token, byte in the row, value): NaN or Inf bit patterns of an f16 scale or
        // value, at the start of a row or of its last block.
        let plants = [
            (1u8, 40usize, 0usize, 0x7E00u16),           // V: NaN
            (1, 90, row - format.block_bytes(), 0x7C00), // V: +Inf
            (0, 60, 0, 0x7C00),                          // K: +Inf
            (0, 149, 0, 0xFC00),                         // K: −Inf at the newest token
        ];
        for (cache, token, at, bits) in plants {
            let case = decode_case(format, n_kv, h_kv, d, RotationKind::None, token as u64);
            check_edited(&case, |kb, vb| {
                let bytes = if cache == 0 { kb } else { vb };
                let start = (token * h_kv + 1) * row + at;
                bytes[start..start + 2].copy_from_slice(&bits.to_le_bytes());
            });
        }
    }
}

/// One causal decode row over `n_kv` tokens of `h_kv` heads of `d` values, K and V in `format`,
/// four query heads per KV head, Q and K rotated by `qk`.
fn decode_case(
    format: KvFormat,
    n_kv: usize,
    h_kv: usize,
    d: usize,
    qk: RotationKind,
    seed: u64,
) -> Case {
    Case {
        n_q: 1,
        n_kv,
        h_kv,
        group: 4,
        d,
        d_v: d,
        k_format: format,
        v_format: format,
        params: AttentionParams {
            causal: true,
            pos_offset: n_kv - 1,
            ..Default::default()
        },
        plan_kind: (qk, RotationKind::None),
        config: AttentionConfig::default(),
        seed,
    }
}

/// A row format's row whose stored norm (or scale) is NaN or ±Inf decodes to a row of NaN or
/// ±Inf values, in the kernel as in the oracle: planted in K and V (the first norm field, and
/// with QJL the residual's), at the newest token too, it spreads as in the oracle.
#[test]
fn row_formats_keep_special_values() {
    let (n_kv, h_kv, d) = (40usize, 2usize, 64usize);
    for format in [KvFormat::Tq4, KvFormat::Tq2, KvFormat::Tq3Qjl] {
        let row = format.row_bytes(d).unwrap();
        // The last two bytes: MSE's scale, QJL's residual norm; QJL's norm before its signs.
        let norm = match format.row_format() {
            Some(RowFormat::Prod { .. }) => row - 4 - d / 8,
            _ => row - 2,
        };
        // (cache, token, byte in the row, value): f16 NaN or ±Inf.
        let plants = [
            (1u8, 20usize, norm, 0x7E00u16), // V: NaN
            (1, 30, row - 2, 0x7C00),        // V: +Inf
            (0, 10, norm, 0x7C00),           // K: +Inf
            (0, 39, row - 2, 0xFC00),        // K: −Inf at the newest token
        ];
        for (cache, token, at, bits) in plants {
            let case = decode_case(format, n_kv, h_kv, d, RotationKind::Hadamard, token as u64);
            check_edited(&case, |kb, vb| {
                let bytes = if cache == 0 { kb } else { vb };
                let start = (token * h_kv + 1) * row + at;
                bytes[start..start + 2].copy_from_slice(&bits.to_le_bytes());
                // The planted row decodes to no finite value.
                let decoded = format.dequantize_row(&bytes[start - at..start - at + row]);
                assert!(
                    decoded.unwrap().iter().all(|x| !x.is_finite()),
                    "{format}: a non-finite norm at byte {at} left finite values"
                );
            });
        }
    }
}

#[test]
fn decode_batch_equals_one_run_per_sequence() {
    let plan = RotationPlan {
        qk: Some(Rotation::hadamard(128).unwrap()),
        v: Some(Rotation::hadamard(128).unwrap()),
    };
    let kernel = CpuAttention::new(&plan, Isa::best());
    let seqs: Vec<Case> = [1usize, 300, 17, 0, 1000]
        .iter()
        .enumerate()
        .map(|(s, &n_kv)| Case {
            n_q: 1,
            n_kv,
            h_kv: 2,
            group: 4,
            d: 128,
            d_v: 128,
            k_format: KvFormat::Q4_0,
            v_format: KvFormat::Q8_0,
            params: AttentionParams {
                causal: true,
                pos_offset: n_kv.saturating_sub(1),
                ..Default::default()
            },
            plan_kind: (RotationKind::Hadamard, RotationKind::Hadamard),
            config: AttentionConfig::default(),
            seed: s as u64,
        })
        .collect();
    let data: Vec<(Vec<f32>, Vec<u8>, Vec<u8>)> = seqs
        .iter()
        .map(|c| {
            let (kb, vb) = caches(c, &plan, Isa::best());
            (Rows::uniform(1.0).f32s(8 * 128, c.seed), kb, vb)
        })
        .collect();
    let requests: Vec<DecodeRequest> = seqs
        .iter()
        .zip(&data)
        .map(|(c, (q, kb, vb))| DecodeRequest {
            q,
            h_q: 8,
            k: KvCacheView::new(c.k_format, kb, c.n_kv, 2, 128).unwrap(),
            v: KvCacheView::new(c.v_format, vb, c.n_kv, 2, 128).unwrap(),
            params: c.params.clone(),
        })
        .collect();
    let batch = kernel.decode_batch(&requests).unwrap();
    for ((c, (q, kb, vb)), got) in seqs.iter().zip(&data).zip(&batch) {
        let want = oracle(c, &plan, q, kb, vb);
        assert_matches_f32(got, &want, Op::Attention, Precision::F32, &format!("{c:?}"));
    }
}

#[test]
fn non_finite_inputs_follow_the_oracle() {
    // NaN in a masked key, NaN in a visible key, −Inf scores: same results as the oracle.
    let (n_kv, d) = (50usize, 64usize);
    let plan = RotationPlan::none();
    let base = Case {
        n_q: 3,
        n_kv,
        h_kv: 1,
        group: 2,
        d,
        d_v: d,
        k_format: KvFormat::F32,
        v_format: KvFormat::F32,
        params: AttentionParams {
            causal: true,
            pos_offset: 40,
            ..Default::default()
        },
        plan_kind: (RotationKind::None, RotationKind::None),
        config: AttentionConfig {
            block_n: 16,
            block_m: 1,
            kv_splits: 3,
            heads_per_task: 0,
        },
        seed: 1,
    };
    let cases = [
        (45usize, f32::NAN, None),
        (10, f32::NAN, None),
        (20, f32::NEG_INFINITY, None),
        (30, f32::INFINITY, None),
        // Query 0 (position 40) sees only key 40, whose score is −Inf: the oracle's 0/0 = NaN.
        (40, f32::NEG_INFINITY, Some(1)),
    ];
    for (token, value, window) in cases {
        let base = Case {
            params: AttentionParams {
                window,
                ..base.params.clone()
            },
            ..base.clone()
        };
        let mut k = Rows::uniform(1.0).f32s(n_kv * d, 5);
        k[token * d..(token + 1) * d].fill(value);
        let v = Rows::uniform(1.0).f32s(n_kv * d, 6);
        let q: Vec<f32> = Rows::uniform(1.0)
            .f32s(3 * 2 * d, 7)
            .iter()
            .map(|x| x.abs())
            .collect();
        let to_bytes = |x: &[f32]| x.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
        let (kb, vb) = (to_bytes(&k), to_bytes(&v));
        let want = oracle(&base, &plan, &q, &kb, &vb);
        for isa in Isa::all_available() {
            let kv = KvCacheView::new(KvFormat::F32, &kb, n_kv, 1, d).unwrap();
            let vv = KvCacheView::new(KvFormat::F32, &vb, n_kv, 1, d).unwrap();
            let got = CpuAttention::new(&plan, isa)
                .with_config(base.config)
                .run(&q, 3, 2, &kv, &vv, &base.params)
                .unwrap();
            let what = format!("token {token} value {value} on {isa}");
            assert_matches_f32(&got, &want, Op::Attention, Precision::F32, &what);
        }
    }
}

/// Shapes that do not fit, and paged views whose table does not fit the pool.
#[test]
fn bad_shapes_are_errors() {
    let plan = RotationPlan {
        qk: Some(Rotation::hadamard(64).unwrap()),
        v: None,
    };
    let kernel = CpuAttention::new(&plan, Isa::best());
    let kb = vec![0u8; 4 * 2 * 64 * 4];
    let k = KvCacheView::new(KvFormat::F32, &kb, 4, 2, 64).unwrap();
    let k3 = KvCacheView::new(KvFormat::F32, &kb[..3 * 2 * 64 * 4], 3, 2, 64).unwrap();
    let p = AttentionParams::default();
    assert!(kernel.run(&vec![0.0; 3 * 64], 1, 3, &k, &k, &p).is_err()); // 3 % 2
    assert!(kernel
        .run(&vec![0.0; 4 * 64 - 1], 1, 4, &k, &k, &p)
        .is_err());
    assert!(kernel.run(&vec![0.0; 4 * 64], 1, 4, &k, &k3, &p).is_err());
    assert!(kernel
        .run(
            &vec![0.0; 4 * 64],
            1,
            4,
            &k,
            &k,
            &AttentionParams {
                window: Some(0),
                ..p.clone()
            }
        )
        .is_err());
    let wrong = CpuAttention::new(
        &RotationPlan {
            qk: Some(Rotation::hadamard(32).unwrap()),
            v: None,
        },
        Isa::best(),
    );
    assert!(wrong.run(&vec![0.0; 4 * 64], 1, 4, &k, &k, &p).is_err());
    assert!(kernel.run(&[], 0, 4, &k, &k, &p).unwrap().is_empty());
    // Paged views: pages of no tokens, a table short of the tokens' pages, a page outside
    // the pool (of 2 pages of 2 tokens).
    let paged = |table: &[u32], page_tokens, n| {
        KvCacheView::paged(KvFormat::F32, &kb, table, page_tokens, n, 2, 64).map(|_| ())
    };
    assert!(paged(&[1, 0], 2, 4).is_ok());
    for (table, page_tokens, n) in [(&[1u32, 0][..], 0, 4), (&[1], 2, 3), (&[1, 2], 2, 4)] {
        assert!(
            paged(table, page_tokens, n).is_err(),
            "{table:?} {page_tokens} {n}"
        );
    }
}

#[test]
fn non_finite_values_in_v_reach_the_output_from_any_slice() {
    // Keys 0..16 score −Inf and V row 0 holds NaN (then +Inf): the oracle's 0 · NaN is NaN
    // whatever the split, so every split count must give NaN.
    let (n_kv, d) = (32usize, 16usize);
    let plan = RotationPlan::none();
    for bad_v in [f32::NAN, f32::INFINITY] {
        let mut k = Rows::uniform(1.0).f32s(n_kv * d, 1);
        k[..16 * d].fill(f32::NEG_INFINITY);
        let mut v = Rows::uniform(1.0).f32s(n_kv * d, 2);
        v[0] = bad_v;
        let q = vec![0.5f32; d];
        let to_bytes = |x: &[f32]| x.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
        let (kb, vb) = (to_bytes(&k), to_bytes(&v));
        let case = Case {
            n_q: 1,
            n_kv,
            h_kv: 1,
            group: 1,
            d,
            d_v: d,
            k_format: KvFormat::F32,
            v_format: KvFormat::F32,
            params: AttentionParams::default(),
            plan_kind: (RotationKind::None, RotationKind::None),
            config: AttentionConfig::default(),
            seed: 0,
        };
        let want = oracle(&case, &plan, &q, &kb, &vb);
        assert!(want.iter().any(|x| x.is_nan()));
        for isa in Isa::all_available() {
            for kv_splits in [1, 2, 3, 4] {
                let config = AttentionConfig {
                    block_n: 8,
                    block_m: 1,
                    kv_splits,
                    heads_per_task: 0,
                };
                let kv = KvCacheView::new(KvFormat::F32, &kb, n_kv, 1, d).unwrap();
                let vv = KvCacheView::new(KvFormat::F32, &vb, n_kv, 1, d).unwrap();
                let got = CpuAttention::new(&plan, isa)
                    .with_config(config)
                    .run(&q, 1, 1, &kv, &vv, &case.params)
                    .unwrap();
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!(
                        g.is_nan(),
                        w.is_nan(),
                        "{bad_v} splits {kv_splits} on {isa}"
                    );
                }
            }
        }
    }
}

#[test]
fn parameters_the_f32_kernel_cannot_represent_are_errors() {
    let plan = RotationPlan::none();
    let kernel = CpuAttention::new(&plan, Isa::best());
    let kb = Rows::uniform(1.0)
        .f32s(8 * 16, 1)
        .iter()
        .flat_map(|f| f.to_le_bytes())
        .collect::<Vec<u8>>();
    let k = KvCacheView::new(KvFormat::F32, &kb, 8, 1, 16).unwrap();
    let q = vec![1.0f32; 16];
    for params in [
        AttentionParams {
            scale: Some(1e39),
            ..Default::default()
        },
        AttentionParams {
            softcap: Some(1e39),
            ..Default::default()
        },
        AttentionParams {
            softcap: Some(1e-50),
            ..Default::default()
        },
    ] {
        assert!(matches!(
            kernel.run(&q, 1, 1, &k, &k, &params),
            Err(rotq::reference::Error::InvalidParameter { .. })
        ));
    }
    // Query positions past usize::MAX: an error for the oracle and the kernel alike.
    let far = AttentionParams {
        pos_offset: usize::MAX,
        window: Some(4),
        causal: true,
        ..Default::default()
    };
    assert!(matches!(
        kernel.run(&q, 1, 1, &k, &k, &far),
        Err(rotq::reference::Error::Overflow(_))
    ));
    let qa = ndarray::Array3::from_elem((1, 1, 16), 1.0f32);
    let ka = ndarray::Array3::from_elem((8, 1, 16), 1.0f32);
    assert!(matches!(
        rotq::attention(qa.view(), ka.view(), ka.view(), &far),
        Err(rotq::reference::Error::Overflow(_))
    ));
    // A window at the largest position that still fits sees nothing: zeros, as the oracle.
    let edge = AttentionParams {
        pos_offset: usize::MAX - 1,
        window: Some(4),
        ..Default::default()
    };
    let got = kernel.run(&q, 1, 1, &k, &k, &edge).unwrap();
    let want = rotq::attention(qa.view(), ka.view(), ka.view(), &edge).unwrap();
    assert!(got.iter().all(|x| *x == 0.0) && want.output.iter().all(|x| *x == 0.0));
    // Absurd head dims are refused when the view is made (an empty cache included).
    assert!(KvCacheView::new(KvFormat::F32, &[], 0, 1, 1 << 60).is_err());
}

/// The kernel handles are `Send + Sync`: one `CpuAttention` serves eight threads at once,
/// each with its own problem (decode and prefill, different formats), and every thread gets
/// the oracle's answer.
#[test]
fn attention_from_eight_threads_at_once() {
    fn shareable<T: Send + Sync>() {}
    shareable::<CpuAttention>();
    shareable::<CacheCodec>();
    shareable::<rotq_cpu::CpuRotation>();
    let plan_kind = (RotationKind::Hadamard, RotationKind::Randomized);
    let cases: Vec<Case> = (0..8u64)
        .map(|t| Case {
            n_q: if t % 2 == 0 { 1 } else { 6 },
            n_kv: 90 + 7 * t as usize,
            h_kv: 2,
            group: 4,
            d: 64,
            d_v: 64,
            k_format: KvFormat::ALL[(3 + t as usize) % KvFormat::ALL.len()],
            v_format: KvFormat::ALL[(5 + 2 * t as usize) % KvFormat::ALL.len()],
            params: AttentionParams {
                causal: true,
                pos_offset: 84,
                ..Default::default()
            },
            plan_kind,
            config: AttentionConfig::default(),
            seed: 500 + t,
        })
        .collect();
    let plan = cases[0].plan(); // the plan depends on the kind and seed 500 only
    let kernel = CpuAttention::new(&plan, Isa::best());
    std::thread::scope(|s| {
        for c in &cases {
            let (kernel, plan) = (&kernel, &plan);
            s.spawn(move || {
                let h_q = c.h_kv * c.group;
                let q = Rows::uniform(1.5).f32s(c.n_q * h_q * c.d, c.seed ^ 4);
                let (kb, vb) = caches(c, plan, Isa::best());
                let k = KvCacheView::new(c.k_format, &kb, c.n_kv, c.h_kv, c.d).unwrap();
                let v = KvCacheView::new(c.v_format, &vb, c.n_kv, c.h_kv, c.d_v).unwrap();
                let got = kernel.run(&q, c.n_q, h_q, &k, &v, &c.params).unwrap();
                let want = oracle(c, plan, &q, &kb, &vb);
                assert_matches_f32(
                    &got,
                    &want,
                    Op::Attention,
                    Precision::F32,
                    &format!("{c:?}"),
                );
            });
        }
    });
}

/// Quantized queries (`QueryMode::Q8_0`): every path (the integer decode loop over q4_0 and q8_0
/// rows on AVX2, the f32 loops elsewhere: other formats, groups not of four, prefill rows, heads
/// over 512 values) agrees with the oracle on the round-tripped queries: the kernel's own f32
/// rotation of Q (whose bits decide the q8_0 codes), through q8_0 and back, against the same
/// cache bytes.
#[test]
fn quantized_queries_match_the_oracle_on_round_tripped_queries() {
    use rotq::reference::attention::quantized_query;
    use rotq_cpu::{CpuRotation, QueryMode};
    let formats = [
        KvFormat::Q4_0,
        KvFormat::Q8_0,
        KvFormat::F16,
        KvFormat::Q5_0,
    ];
    let mut seed = 100u64;
    for k_format in formats {
        for (n_q, group, d) in [
            (1usize, 4usize, 128usize),
            (1, 8, 64),
            (1, 1, 32),
            (3, 4, 128),
            (1, 4, 640),
        ] {
            for qk in [
                RotationKind::Hadamard,
                RotationKind::nth(0),
                RotationKind::Randomized,
            ] {
                seed += 1;
                let c = Case {
                    n_q,
                    n_kv: 131,
                    h_kv: 2,
                    group,
                    d,
                    d_v: 64,
                    k_format,
                    v_format: KvFormat::Q8_0,
                    params: AttentionParams {
                        causal: true,
                        pos_offset: 131 - n_q,
                        softcap: seed.is_multiple_of(2).then_some(20.0),
                        ..Default::default()
                    },
                    plan_kind: (qk, RotationKind::nth((seed % 2) as usize)),
                    config: AttentionConfig {
                        kv_splits: (seed % 3) as usize,
                        ..AttentionConfig::default()
                    },
                    seed,
                };
                let plan = c.plan();
                let h_q = c.h_kv * c.group;
                let q = Rows::uniform(1.5).f32s(c.n_q * h_q * c.d, c.seed ^ 4);
                for isa in Isa::all_available() {
                    let (kb, vb) = caches(&c, &plan, isa);
                    let k = KvCacheView::new(c.k_format, &kb, c.n_kv, c.h_kv, c.d).unwrap();
                    let v = KvCacheView::new(c.v_format, &vb, c.n_kv, c.h_kv, c.d_v).unwrap();
                    let kernel = CpuAttention::new(&plan, isa)
                        .with_config(c.config)
                        .with_query_mode(QueryMode::Q8_0);
                    let got = kernel.run(&q, c.n_q, h_q, &k, &v, &c.params).unwrap();
                    let mut q_rot = q.clone();
                    if let Some(r) = &plan.qk {
                        CpuRotation::new(r, isa).forward_rows(&mut q_rot).unwrap();
                    }
                    let q_hat = quantized_query(&q_rot, c.d).unwrap();
                    let rotated = RotationPlan {
                        qk: None,
                        v: plan.v.clone(),
                    };
                    let want = oracle(&c, &rotated, &q_hat, &kb, &vb);
                    assert_matches_f32(
                        &got,
                        &want,
                        Op::Attention,
                        Precision::F32,
                        &format!("{isa} {c:?}"),
                    );
                    // And it is not the exact-query result (the mode did something).
                    let exact = CpuAttention::new(&plan, isa).with_config(c.config);
                    let exact = exact.run(&q, c.n_q, h_q, &k, &v, &c.params).unwrap();
                    assert_ne!(exact, got, "{isa} {c:?}: q8_0 queries changed nothing");
                }
            }
        }
    }
}

/// Quantized queries need whole q8_0 blocks: a head of 48 values is refused, not truncated.
#[test]
fn quantized_queries_of_heads_not_a_multiple_of_32_are_refused() {
    use rotq_cpu::QueryMode;
    let (n_kv, h_kv, d) = (4, 1, 48);
    let kb = vec![0u8; n_kv * h_kv * KvFormat::F16.row_bytes(d).unwrap()];
    let k = KvCacheView::new(KvFormat::F16, &kb, n_kv, h_kv, d).unwrap();
    let kernel =
        CpuAttention::new(&RotationPlan::none(), Isa::best()).with_query_mode(QueryMode::Q8_0);
    let q = Rows::uniform(1.0).f32s(d, 1);
    let err = kernel
        .run(&q, 1, 1, &k, &k, &AttentionParams::default())
        .unwrap_err();
    assert!(err.to_string().contains("multiple of 32"), "{err}");
}

/// `Auto` keeps f32 queries for a call whose rotated queries q8_0 cannot hold (a block's f16
/// scale would overflow past `127 · 65504`): the output is the exact mode's, finite; an explicit
/// `Q8_0` follows the spec (NaN there), and ordinary queries under `Auto` are quantized.
#[test]
fn auto_keeps_f32_queries_too_large_for_q8_0() {
    use rotq_cpu::QueryMode;
    let (n_kv, h_kv, g, d) = (40, 2, 4, 128);
    let r = Rotation::hadamard(d).unwrap();
    let plan = RotationPlan {
        qk: Some(r.clone()),
        v: None,
    };
    let codec = CacheCodec::new(KvFormat::Q8_0, d, Some(&r), Isa::best()).unwrap();
    let mut kb = vec![0u8; n_kv * h_kv * codec.row_bytes()];
    codec
        .quantize(&Rows::uniform(1.0).f32s(n_kv * h_kv * d, 3), &mut kb, 0)
        .unwrap();
    let k = KvCacheView::new(KvFormat::Q8_0, &kb, n_kv, h_kv, d).unwrap();
    let p = AttentionParams {
        causal: true,
        pos_offset: n_kv - 1,
        ..Default::default()
    };
    let run = |mode: QueryMode, scale: f32| {
        let q: Vec<f32> = Rows::uniform(1.0)
            .f32s(h_kv * g * d, 4)
            .into_iter()
            .map(|x| x * scale)
            .collect();
        CpuAttention::new(&plan, Isa::best())
            .with_query_mode(mode)
            .run(&q, 1, h_kv * g, &k, &k, &p)
            .unwrap()
    };
    let huge = run(QueryMode::Auto, 2e7);
    assert!(huge.iter().all(|x| x.is_finite()));
    assert_eq!(huge, run(QueryMode::Exact, 2e7));
    assert!(run(QueryMode::Q8_0, 2e7).iter().any(|x| x.is_nan()));
    assert_eq!(run(QueryMode::Auto, 1.0), run(QueryMode::Q8_0, 1.0));
    assert_ne!(run(QueryMode::Auto, 1.0), run(QueryMode::Exact, 1.0));
}
