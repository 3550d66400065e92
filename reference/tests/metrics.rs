//! Metrics and the tolerance table: each measure catches what the other does not.

use rotq_reference::metrics::{cosine, kl_divergence, max_abs, max_abs_rel, rel_l2};
use rotq_reference::tolerance::{tolerance, Op, Precision};

#[test]
fn rel_l2_catches_many_small_errors_that_max_abs_allows() {
    let reference = vec![1.0; 1000];
    let out: Vec<f64> = reference.iter().map(|r| r + 5e-5).collect();
    let t = tolerance(Op::Attention, Precision::F32);
    assert!(max_abs_rel(&out, &reference) <= t.max_abs);
    let err = t.check(&out, &reference).unwrap_err();
    assert!(err.rel_l2 > t.rel_l2);
}

#[test]
fn max_abs_catches_one_large_error_that_rel_l2_allows() {
    let reference = vec![1.0; 100_000];
    let mut out = reference.clone();
    out[7] += 2e-3;
    let t = tolerance(Op::Attention, Precision::F32);
    assert!(rel_l2(&out, &reference) <= t.rel_l2);
    assert!(t.check(&out, &reference).unwrap_err().max_abs > t.max_abs);
}

#[test]
fn nan_handling_in_checks() {
    let t = tolerance(Op::Rotation, Precision::F32);
    // The same documented NaN on both sides passes; NaN on one side only fails.
    assert!(t.check(&[f64::NAN, 1.0], &[f64::NAN, 1.0]).is_ok());
    assert!(t.check(&[f64::NAN, 1.0], &[0.5, 1.0]).is_err());
    assert!(t.check(&[0.5, 1.0], &[f64::NAN, 1.0]).is_err());
    assert!(t.check(&[1.0], &[1.0, 2.0]).is_err());
    assert!(max_abs(&[f64::NAN], &[1.0]).is_nan());
    // The same infinity on both sides passes; a different one, or one side only, fails.
    let inf = f64::INFINITY;
    assert!(t.check(&[inf, -inf, 1.0], &[inf, -inf, 1.0]).is_ok());
    assert!(t.check(&[inf, 1.0], &[-inf, 1.0]).is_err());
    assert!(t.check(&[inf, 1.0], &[1e300, 1.0]).is_err());
    assert!(t.check(&[1.0, 1.0], &[inf, 1.0]).is_err());
}

#[test]
fn tolerances_grow_as_precision_drops() {
    for op in [Op::Rotation, Op::Attention] {
        let ts: Vec<_> = [
            Precision::F64,
            Precision::F32,
            Precision::F16,
            Precision::Bf16,
        ]
        .into_iter()
        .map(|p| tolerance(op, p))
        .collect();
        for w in ts.windows(2) {
            assert!(w[0].rel_l2 < w[1].rel_l2 && w[0].max_abs < w[1].max_abs);
        }
    }
}

#[test]
fn zero_references_fall_back_to_absolute_measures() {
    assert_eq!(rel_l2(&[0.0, 0.0], &[0.0, 0.0]), 0.0);
    assert_eq!(rel_l2(&[3.0, 4.0], &[0.0, 0.0]), 5.0);
    assert_eq!(max_abs_rel(&[0.5], &[0.0]), 0.5);
    assert_eq!(cosine(&[0.0], &[0.0]), 1.0);
    assert_eq!(cosine(&[1.0], &[0.0]), 0.0);
    assert!((cosine(&[1.0, 2.0], &[-1.0, -2.0]) + 1.0).abs() < 1e-15);
}

#[test]
fn kl_divergence_properties() {
    let p = [0.7, 0.2, 0.1];
    let q = [0.5, 0.3, 0.2];
    let kl = kl_divergence(&p, &q);
    let expected: f64 = p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum();
    assert!((kl - expected).abs() < 1e-15 && kl > 0.0);
    assert_eq!(kl_divergence(&p, &p), 0.0);
    assert_eq!(kl_divergence(&[0.0, 0.0], &[0.0, 0.0]), 0.0);
    assert_eq!(kl_divergence(&[1.0, 0.0], &[0.0, 1.0]), f64::INFINITY);
    assert_eq!(kl_divergence(&[0.0, 1.0], &[0.5, 0.5]), 2f64.ln());
}
