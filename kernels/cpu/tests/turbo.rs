//! The TurboQuant row formats on the CPU: rotate-quantize gives the oracle's bytes and
//! dequantize its values, bit for bit, on every instruction set, for random rows of every
//! length the formats take and for the edge cases (zeros, ties on thresholds, NaN, ±∞, values
//! whose norm passes f16's range, tiny values).

use proptest::prelude::*;
use rotq_cpu::{CacheCodec, Isa};
use rotq_reference::turboquant::formats::RowFormat;
use rotq_reference::{KvFormat, Rotation};
use rotq_testkit::data::Rows;

const ROW_FORMATS: [KvFormat; 6] = KvFormat::TURBOQUANT;

/// Quantizes `rows` (of `d`) with the kernel on every instruction set, unrotated, and checks
/// the bytes and the decoded values against the oracle's, row by row.
fn check(format: KvFormat, d: usize, rows: &[f32]) {
    let row = format.row_format().expect("a row format");
    let want: Vec<u8> = rows
        .chunks_exact(d)
        .flat_map(|r| row.quantize_row(r).unwrap())
        .collect();
    for isa in Isa::all_available() {
        let codec = CacheCodec::new(format, d, None, isa).unwrap();
        let mut got = vec![0u8; want.len()];
        codec.quantize(rows, &mut got, 0).unwrap();
        let rb = codec.row_bytes();
        for (i, (g, w)) in got.chunks_exact(rb).zip(want.chunks_exact(rb)).enumerate() {
            assert_eq!(
                g,
                w,
                "{format} d {d} {isa}: row {i} ({:?})",
                &rows[i * d..][..d]
            );
        }
        let mut back = vec![0f32; rows.len()];
        codec.dequantize(&got, &mut back).unwrap();
        let oracle = format.dequantize_rows(&want, d).unwrap();
        for (i, (a, b)) in back.iter().zip(&oracle).enumerate() {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{format} d {d} {isa}: value {i}: {a} vs the oracle's {b}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn kernels_give_the_oracles_bytes_and_values(
        fi in 0usize..6,
        d8 in 1usize..40,
        n in 1usize..6,
        scale in prop_oneof![Just(1.0f32), Just(1e-6), Just(300.0)],
        stress in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let d = 8 * d8;
        let rows = if stress { Rows::stress() } else { Rows::uniform(scale) };
        check(ROW_FORMATS[fi], d, &rows.f32s(n * d, seed));
    }
}

/// Edge cases, each a row of its own: zeros, one value, NaN, ±∞, a norm past f16, values
/// sitting exactly on a threshold (a row whose values are its own threshold's products), tiny
/// values whose scale is subnormal in f16.
#[test]
fn edge_rows_match_the_oracle() {
    for format in ROW_FORMATS {
        for d in [8usize, 64, 128] {
            let base = Rows::uniform(1.0).f32s(d, d as u64);
            let mut cases: Vec<Vec<f32>> = vec![vec![0.0; d], base.clone()];
            let mut one = vec![0.0; d];
            one[d / 2] = 3.5;
            cases.push(one);
            for special in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e6, 3e38] {
                let mut r = base.clone();
                r[1] = special;
                cases.push(r);
            }
            cases.push(base.iter().map(|v| v * 1e-9).collect());
            cases.push(vec![-0.25; d]);
            // Values on a midpoint: with every value equal, u_i = 1/√d exactly in f64 for
            // d = 64 (a power of 4), so a midpoint at 1/8 would be hit; all-equal rows of
            // several magnitudes probe the threshold comparison.
            for v in [1.0f32, 0.125, 7.0] {
                cases.push(vec![v; d]);
            }
            let rows: Vec<f32> = cases.concat();
            check(format, d, &rows);
        }
    }
}

/// Rotated rows: the fused codec (Hadamard, then the format) is the oracle's format on the
/// kernel's rotated row.
#[test]
fn fused_rotation_then_format() {
    let d = 128;
    let r = Rotation::hadamard(d).unwrap();
    let rows = Rows::outliers().f32s(16 * d, 5);
    for format in ROW_FORMATS {
        for isa in Isa::all_available() {
            let codec = CacheCodec::new(format, d, Some(&r), isa).unwrap();
            let mut got = vec![0u8; 16 * codec.row_bytes()];
            codec.quantize(&rows, &mut got, 0).unwrap();
            let mut rotated = rows.clone();
            rotq_cpu::CpuRotation::new(&r, isa)
                .forward_rows(&mut rotated)
                .unwrap();
            assert_eq!(
                got,
                format.quantize_rows(&rotated, d).unwrap(),
                "{format} {isa}"
            );
            // And back: about the format's distortion (the spec's, for a rotated row: the
            // MSE codebooks' 0.117, 0.034, 0.0095; π/2 times the (b−1)-bit one with QJL).
            let expected = match format {
                KvFormat::Tq2 => 0.117,
                KvFormat::Tq3 => 0.034,
                KvFormat::Tq4 => 0.0095,
                KvFormat::Tq2Qjl => 0.57,
                KvFormat::Tq3Qjl => 0.18,
                _ => 0.054,
            };
            let mut back = vec![0f32; rows.len()];
            codec.dequantize(&got, &mut back).unwrap();
            let err: f32 = rows.iter().zip(&back).map(|(a, b)| (a - b) * (a - b)).sum();
            let norm: f32 = rows.iter().map(|a| a * a).sum();
            let rel = err / norm;
            assert!(
                rel < 1.5 * expected && rel > expected / 3.0,
                "{format} {isa}: {rel}"
            );
        }
    }
}

/// Lengths the formats do not take are typed errors when a codec is made.
#[test]
fn bad_lengths_are_refused() {
    for format in ROW_FORMATS {
        for d in [0usize, 4, 12, 100] {
            assert!(
                CacheCodec::new(format, d, None, Isa::best()).is_err(),
                "{format} {d}"
            );
        }
        let qjl = matches!(format.row_format(), Some(RowFormat::Prod { .. }));
        assert_eq!(
            CacheCodec::new(format, 2048, None, Isa::best()).is_err(),
            qjl
        );
    }
}

/// Decode (one query row: tq4's register path on AVX2 for groups of four heads) and prefill
/// (the tile path) over TurboQuant caches, K and V in any row format, against the oracle's
/// attention on the oracle's decoding of the same bytes.
#[test]
fn attention_over_turboquant_caches_matches_the_oracle() {
    use ndarray::Array3;
    use rotq_cpu::{CpuAttention, KvCacheView};
    use rotq_reference::attention::attention_f64;
    use rotq_reference::tolerance::{Op, Precision};
    use rotq_reference::{AttentionParams, RotationPlan};
    use rotq_testkit::oracle::assert_matches_f32;
    let (n_kv, h_kv, d) = (70, 2, 64);
    let plan = RotationPlan {
        qk: Some(Rotation::hadamard(d).unwrap()),
        v: None,
    };
    let pairs = [
        (KvFormat::Tq4, KvFormat::Tq4),
        (KvFormat::Tq4, KvFormat::Q8_0),
        (KvFormat::Q4_0, KvFormat::Tq4),
        (KvFormat::Tq3, KvFormat::Tq2),
        (KvFormat::Tq4Qjl, KvFormat::Tq3Qjl),
        (KvFormat::Tq2Qjl, KvFormat::Tq4),
    ];
    for (i, (kf, vf)) in pairs.into_iter().enumerate() {
        for (n_q, group) in [(1usize, 4usize), (1, 8), (5, 4), (1, 3)] {
            let h_q = h_kv * group;
            let q = Rows::uniform(1.5).f32s(n_q * h_q * d, i as u64);
            for isa in Isa::all_available() {
                let kc = CacheCodec::new(kf, d, plan.qk.as_ref(), isa).unwrap();
                let vc = CacheCodec::new(vf, d, None, isa).unwrap();
                let mut kb = vec![0u8; n_kv * h_kv * kc.row_bytes()];
                let mut vb = vec![0u8; n_kv * h_kv * vc.row_bytes()];
                kc.quantize(&Rows::outliers().f32s(n_kv * h_kv * d, 7), &mut kb, 0)
                    .unwrap();
                vc.quantize(&Rows::uniform(1.0).f32s(n_kv * h_kv * d, 8), &mut vb, 0)
                    .unwrap();
                let params = AttentionParams {
                    causal: true,
                    pos_offset: n_kv - n_q,
                    ..Default::default()
                };
                let k = KvCacheView::new(kf, &kb, n_kv, h_kv, d).unwrap();
                let v = KvCacheView::new(vf, &vb, n_kv, h_kv, d).unwrap();
                let got = CpuAttention::new(&plan, isa)
                    .run(&q, n_q, h_q, &k, &v, &params)
                    .unwrap();
                let decode = |f: KvFormat, b: &[u8]| {
                    let vals = f.dequantize_rows(b, d).unwrap();
                    Array3::from_shape_vec(
                        (n_kv, h_kv, d),
                        vals.iter().map(|&x| f64::from(x)).collect(),
                    )
                    .unwrap()
                };
                let mut qr: Vec<f64> = q.iter().map(|&x| f64::from(x)).collect();
                plan.qk
                    .as_ref()
                    .unwrap()
                    .rotate_rows(&mut qr, false)
                    .unwrap();
                let qa = Array3::from_shape_vec((n_q, h_q, d), qr).unwrap();
                let want = attention_f64(
                    qa.view(),
                    decode(kf, &kb).view(),
                    decode(vf, &vb).view(),
                    &params,
                )
                .unwrap();
                let want: Vec<f64> = want.output.iter().copied().collect();
                assert_matches_f32(
                    &got,
                    &want,
                    Op::Attention,
                    Precision::F32,
                    &format!("{kf}/{vf} n_q {n_q} group {group} {isa}"),
                );
            }
        }
    }
}
