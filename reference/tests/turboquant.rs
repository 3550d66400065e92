//! TurboQuant's spec: the MSE quantizer's distortion is the codebook's, its codes are the
//! nearest levels, norm correction keeps the norm, and the QJL estimator of TurboQuant-prod is
//! unbiased with the paper's variance bound; edge cases and bad input.

use proptest::prelude::*;
use rotq_reference::lloyd_max;
use rotq_reference::turboquant::{sketch_matrix, Mse, MseCode, Prod};
use rotq_reference::Rotation;
use rotq_testkit::data::Rows;

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// A row with outlier channels, rotated by a randomized Hadamard (what a cache format sees).
fn rotated_row(d: usize, seed: u64) -> Vec<f64> {
    let mut y: Vec<f64> = Rows::uniform(1.0)
        .f32s(d, seed)
        .into_iter()
        .map(f64::from)
        .collect();
    y[seed as usize % d] *= 12.0;
    Rotation::randomized(d, seed ^ 0x5eed)
        .unwrap()
        .forward_in_place(&mut y)
        .unwrap();
    y
}

/// Over many uniformly random unit vectors (normalized Gaussian rows: the law the codebook is
/// made for), the MSE quantizer's mean squared error is the codebook's exact distortion (the
/// paper's D_mse), within the sampling error.
#[test]
fn mse_distortion_is_the_codebooks() {
    let d = 128;
    let gaussian = sketch_matrix(d, 99).unwrap(); // d rows of d independent normals
    for bits in 1..=4 {
        let q = Mse::new(d, bits, false).unwrap();
        let want = lloyd_max::distortion(d, q.levels()).unwrap();
        let n = d as u64;
        let errs: Vec<f64> = (0..n)
            .map(|s| {
                let y = &gaussian[s as usize * d..][..d];
                let u: Vec<f64> = y.iter().map(|v| v / norm(y)).collect();
                let back = q.decode(&q.encode(&u).unwrap()).unwrap();
                u.iter().zip(&back).map(|(a, b)| (a - b) * (a - b)).sum()
            })
            .collect();
        let mean = errs.iter().sum::<f64>() / n as f64;
        let sd = (errs.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        assert!(
            (mean - want).abs() <= 4.0 * sd / (n as f64).sqrt() + 0.02 * want,
            "{bits} bits: {mean} vs {want}"
        );
    }
}

proptest! {
    /// Codes are the nearest levels of the unit row (the upper one on a midpoint); the
    /// reconstruction is the stored norm times the levels, or, with norm correction, has
    /// exactly the row's norm.
    #[test]
    fn codes_are_the_nearest_levels(seed in any::<u64>(), bits in 1u32..=4, d in prop::sample::select(vec![3usize, 64, 96, 128, 256])) {
        let y = rotated_row(d.next_power_of_two().max(4), seed)[..d].to_vec();
        let plain = Mse::new(d, bits, false).unwrap();
        let code = plain.encode(&y).unwrap();
        prop_assert!((code.norm - norm(&y)).abs() <= 1e-12 * norm(&y));
        let levels = plain.levels();
        for (&c, &v) in code.codes.iter().zip(&y) {
            let u = v / code.norm;
            let best = (u - levels[c as usize]).abs();
            for l in levels {
                prop_assert!(best <= (u - l).abs() + 1e-15);
            }
        }
        let back = plain.decode(&code).unwrap();
        for (b, &c) in back.iter().zip(&code.codes) {
            prop_assert!((b - code.norm * levels[c as usize]).abs() <= 1e-12 * code.norm);
        }
        let nc = Mse::new(d, bits, true).unwrap();
        let back = nc.decode(&nc.encode(&y).unwrap()).unwrap();
        prop_assert!((norm(&back) - norm(&y)).abs() <= 1e-12 * norm(&y));
    }
}

/// A unit coordinate exactly on the midpoint of two levels takes the upper one.
#[test]
fn midpoints_take_the_upper_level() {
    let q = Mse::new(64, 2, false).unwrap();
    let l = q.levels().to_vec();
    // A row whose first coordinate, once divided by the norm, is the midpoint of levels 2, 3:
    // scale a row of norm 1 that holds it (the rest fill the norm).
    let mid = (l[2] + l[3]) / 2.0;
    let mut y = vec![0.0; 64];
    y[0] = mid;
    y[1] = (1.0 - mid * mid).sqrt();
    let code = q.encode(&y).unwrap();
    assert_eq!(code.norm, 1.0);
    assert_eq!(code.codes[0], 3);
    let below = mid - 1e-12;
    y[0] = below;
    y[1] = (1.0 - below * below).sqrt();
    assert_eq!(q.encode(&y).unwrap().codes[0], 2);
}

/// The QJL estimator is unbiased: averaged over sketch seeds it converges on `⟨q, y⟩`, and
/// its variance stays under the paper's bound `π / (2d) · ‖r‖² ‖q‖²`.
#[test]
fn the_prod_estimator_is_unbiased_with_the_papers_variance() {
    let d = 64;
    let y = rotated_row(d, 3);
    let q = rotated_row(d, 4);
    let exact = dot(&q, &y);
    for bits in 1..=4 {
        let n = 400;
        let (mut sum, mut sq, mut bound) = (0.0, 0.0, 0.0);
        for seed in 0..n {
            let p = Prod::new(d, bits, seed).unwrap();
            let code = p.encode(&y).unwrap();
            let est = p.inner(&q, &code).unwrap();
            // The estimator is the inner product with the reconstruction.
            let back = p.decode(&code).unwrap();
            assert!((dot(&q, &back) - est).abs() <= 1e-9 * norm(&q) * norm(&y));
            sum += est;
            sq += (est - exact).powi(2);
            bound +=
                std::f64::consts::PI / (2.0 * d as f64) * code.residual_norm.powi(2) * dot(&q, &q);
        }
        let (mean, var, bound) = (sum / n as f64, sq / n as f64, bound / n as f64);
        assert!(
            (mean - exact).abs() <= 4.0 * (bound / n as f64).sqrt(),
            "{bits} bits: mean {mean} vs {exact}"
        );
        assert!(
            var <= 1.2 * bound,
            "{bits} bits: variance {var} over the bound {bound}"
        );
    }
}

/// The sketch is standard normal: mean near 0, variance near 1; and one seed, one matrix.
#[test]
fn the_sketch_is_standard_normal_and_seeded() {
    let s = sketch_matrix(256, 11).unwrap();
    let n = s.len() as f64;
    let mean = s.iter().sum::<f64>() / n;
    let var = s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    assert!(
        mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
        "{mean} {var}"
    );
    assert_eq!(s, sketch_matrix(256, 11).unwrap());
    assert_ne!(s, sketch_matrix(256, 12).unwrap());
    assert!(s.iter().all(|x| x.is_finite()));
}

/// Edge cases: a zero row comes back as zeros (norm 0), with or without norm correction; a
/// NaN or an infinity makes the norm non-finite and the row NaN; huge and tiny rows keep their
/// scale.
#[test]
fn zeros_nan_and_extreme_scales() {
    for nc in [false, true] {
        let q = Mse::new(64, 3, nc).unwrap();
        let code = q.encode(&[0.0; 64]).unwrap();
        assert_eq!(code.norm, 0.0);
        assert!(q.decode(&code).unwrap().iter().all(|&v| v == 0.0));
        let mut y = rotated_row(64, 9);
        y[5] = f64::NAN;
        assert!(q.encode(&y).unwrap().norm.is_nan());
        assert!(q
            .decode(&q.encode(&y).unwrap())
            .unwrap()
            .iter()
            .all(|v| v.is_nan()));
        y[5] = f64::INFINITY;
        assert!(!q.encode(&y).unwrap().norm.is_finite());
        for scale in [1e-150, 1e150] {
            let y: Vec<f64> = rotated_row(64, 10).iter().map(|v| v * scale).collect();
            let back = q.decode(&q.encode(&y).unwrap()).unwrap();
            let rel = norm(&y.iter().zip(&back).map(|(a, b)| a - b).collect::<Vec<_>>()) / norm(&y);
            assert!(rel < 0.35, "scale {scale}: relative error {rel}");
        }
    }
    let p = Prod::new(64, 2, 1).unwrap();
    let code = p.encode(&[0.0; 64]).unwrap();
    assert_eq!(code.residual_norm, 0.0);
    assert!(p.decode(&code).unwrap().iter().all(|&v| v == 0.0));
}

/// Wrong lengths, bits and codes are typed errors.
#[test]
fn bad_input_is_refused() {
    let q = Mse::new(64, 2, false).unwrap();
    assert!(q.encode(&[1.0; 63]).is_err());
    assert!(q
        .decode(&MseCode {
            codes: vec![0; 63],
            norm: 1.0
        })
        .is_err());
    assert!(q
        .decode(&MseCode {
            codes: vec![4; 64],
            norm: 1.0
        })
        .is_err());
    assert!(Mse::new(2, 2, false).is_err());
    assert!(Mse::new(64, 0, false).is_err());
    assert!(Prod::new(64, 5, 0).is_err());
    assert!(Prod::new(1 << 20, 2, 0).is_err()); // a d² sketch: refused past MAX_DIM
    assert!(Mse::new(usize::MAX, 2, false).is_err());
    let p = Prod::new(64, 2, 0).unwrap();
    let mut code = p.encode(&[1.0; 64]).unwrap();
    assert!(p.inner(&[1.0; 63], &code).is_err());
    code.signs.pop();
    assert!(p.decode(&code).is_err());
    let one_bit = Prod::new(64, 1, 0).unwrap();
    assert!(one_bit.decode(&p.encode(&[1.0; 64]).unwrap()).is_err());
}

/// A QJL code read with another sketch (the query side's seed differing from the cache's) is a
/// typed error from both the reconstruction and the estimator, never a score against the wrong
/// matrix; a code with its signs cut short likewise.
#[test]
fn a_code_of_another_seed_or_length_is_refused() {
    let d = 32;
    let y = rotated_row(d, 5);
    let q = rotated_row(d, 6);
    let code = Prod::new(d, 3, 11).unwrap().encode(&y).unwrap();
    assert_eq!(code.seed, 11);
    let other = Prod::new(d, 3, 12).unwrap();
    assert!(other.decode(&code).is_err());
    assert!(other.inner(&q, &code).is_err());
    let same = Prod::new(d, 3, 11).unwrap();
    assert!(same.inner(&q, &code).is_ok());
    let mut short = code.clone();
    short.signs.pop();
    assert!(same.decode(&short).is_err());
    assert!(same.inner(&q, &short).is_err());
}

/// vLLM's value part keeps the first of equal extremes: a row whose minimum is a zero of both
/// signs stores the sign that comes first (so a kernel scanning the row writes the same bytes).
#[test]
fn vllm_values_store_the_first_of_equal_minima() {
    use rotq_reference::turboquant::vllm::Part;
    let mut row = vec![1.0f32; 8];
    let part = Part::Value { bits: 4 };
    let mut out = vec![0u8; part.row_bytes(8).unwrap()];
    for (first, second, bits) in [(-0.0f32, 0.0f32, 0x8000u16), (0.0, -0.0, 0x0000)] {
        row[2] = first;
        row[5] = second;
        part.encode(&row, &mut out).unwrap();
        let n = out.len();
        assert_eq!(u16::from_le_bytes([out[n - 2], out[n - 1]]), bits);
    }
}
