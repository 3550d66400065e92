//! The Hadamard spec and every rotation kind: definitions, identities, interoperability.

use ndarray::Array2;
use proptest::prelude::*;
use rotq_reference::hadamard::{self, HadamardSize, MAX_POW2, SPECIAL_BASES};
use rotq_reference::rotation::{random_signs, SplitMix64};
use rotq_reference::{Error, Rotation, RotationSpec};
use rotq_testkit::data::Rows;

/// Every supported size up to `limit`.
fn sizes_up_to(limit: usize) -> Vec<usize> {
    (1..=limit)
        .filter(|&n| HadamardSize::new(n).is_ok())
        .collect()
}

fn max_dev(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn supported_sizes_are_exactly_the_spec() {
    for n in 1..=2048usize {
        let pow2 = n.is_power_of_two();
        let special = SPECIAL_BASES
            .iter()
            .any(|&m| n % m == 0 && (n / m).is_power_of_two());
        assert_eq!(HadamardSize::new(n).is_ok(), pow2 || special, "n = {n}");
    }
    assert!(HadamardSize::new(MAX_POW2).is_ok());
    assert!(HadamardSize::new(2 * MAX_POW2).is_err());
    assert!(HadamardSize::new(40 * MAX_POW2).is_ok());
    assert!(matches!(
        HadamardSize::new(0),
        Err(Error::UnsupportedDim { n: 0, .. })
    ));
    assert!(Rotation::hadamard(100).is_err());
}

#[test]
fn transform_equals_the_closed_form_matrix() {
    // The recursive transform (and the dense m×m step) against the entry formula, for every
    // supported n up to 640; columns are the images of the unit vectors.
    for n in sizes_up_to(640) {
        let explicit = hadamard::matrix(n).unwrap();
        let transform = Rotation::hadamard(n).unwrap().to_matrix();
        assert!(max_dev(&explicit, &transform) < 1e-13, "n = {n}");
    }
}

#[test]
fn orthonormal_for_every_size_up_to_2048_and_involutive_where_symmetric() {
    for n in sizes_up_to(2048) {
        let h = hadamard::matrix(n).unwrap();
        let eye = Array2::<f64>::eye(n);
        assert!(
            max_dev(&h.dot(&h.t()), &eye) < 1e-12,
            "H Hᵀ = I fails for n = {n}"
        );
        let symmetric = max_dev(&h, &h.t().to_owned()) == 0.0;
        // Sylvester and the 12·2^k family are symmetric (so involutive); 20, 28, 40 are not.
        let expect_symmetric = n.is_power_of_two() || (n % 12 == 0 && (n / 12).is_power_of_two());
        assert_eq!(symmetric, expect_symmetric, "n = {n}");
        if symmetric {
            assert!(
                max_dev(&h.dot(&h), &eye) < 1e-12,
                "H H = I fails for n = {n}"
            );
        }
    }
}

#[test]
fn large_powers_of_two_match_sampled_entries() {
    // Beyond what a dense matrix allows: row i of H is H e_i (H symmetric); compare sampled
    // entries of a few rows with the closed form, for every power of two up to 2^15.
    for log in 11..=15 {
        let n = 1usize << log;
        for i in [0, 1, n / 3, n - 1] {
            let mut e = vec![0.0; n];
            e[i] = 1.0;
            hadamard::forward_in_place(&mut e).unwrap();
            for j in (0..n).step_by(n / 64 + 1).chain([n - 1]) {
                assert_eq!(e[j], hadamard::entry(n, j, i).unwrap(), "n {n} ({j}, {i})");
            }
        }
    }
}

/// Expected outputs of Dao-AILab fast-hadamard-transform's definition
/// `y = (M ⊗ H_{2^k}) x` (unscaled; our transform times √n), computed independently in numpy
/// from the `had_*` matrices of its `csrc/code_gen.py`: (n, base, input, expected).
#[test]
fn special_sizes_match_fast_hadamard_transform_definition() {
    type Case = (usize, usize, fn(i64) -> i64, &'static [i64]);
    let cases: [Case; 8] = [
        (
            24,
            12,
            |i| i + 1,
            &[
                286, -10, -30, 2, 6, -2, -30, 2, -74, -2, -46, 2, 6, -2, -62, 2, 86, -2, -78, 2, 6,
                -2, -94, 2,
            ],
        ),
        (
            48,
            12,
            |i| ((i * 7) % 11) - 5,
            &[
                -4, -30, 6, 0, -34, 28, 12, -66, -22, -28, -12, -22, 10, -16, 12, 22, 4, -6, 10,
                -44, 2, -60, 12, -22, 0, -6, 10, 0, -6, -16, -32, -22, -4, -6, -34, 0, 8, 6, -10,
                0, 0, 38, -34, 0, -22, -16, 12, 22,
            ],
        ),
        (
            20,
            20,
            |i| i - 10,
            &[
                30, 36, 42, 48, 54, -10, -20, -10, 0, -10, 20, 30, 20, 10, 20, -20, -18, -16, -14,
                -12,
            ],
        ),
        (
            40,
            20,
            |i| (i * 3 % 7) - 3,
            &[
                -3, -9, 13, -9, 1, -9, 3, 5, -9, 5, 13, 7, -9, 21, -1, -7, 7, -7, -1, 21, -5, 21,
                17, 7, 9, -21, 1, 7, -5, 21, 7, 17, 3, 17, -1, 17, 9, -25, -23, -25,
            ],
        ),
        (
            28,
            28,
            |i| i + 1,
            &[
                -92, -86, -80, -74, -68, -62, -56, -60, -50, -68, -58, -48, -66, -56, -74, -64,
                -54, -72, -90, -80, -70, -130, -148, -138, -128, -118, -108, -126,
            ],
        ),
        (
            56,
            28,
            |i| (i % 5) - 2,
            &[
                8, -12, -8, 8, 6, -2, 10, -2, -6, -2, 8, 8, -8, 8, -2, -6, 8, 4, -4, -16, -4, -16,
                -4, 4, 4, 4, 4, 4, 12, -16, -8, 4, 2, -6, 0, 24, -12, 4, 28, 4, -22, -6, -12, -16,
                6, 14, -14, -6, 16, 4, -14, 14, 6, -26, 4, 4,
            ],
        ),
        (
            40,
            40,
            |i| i + 1,
            &[
                -776, 84, 48, 88, 128, 92, 56, 20, -16, 24, -12, 28, -8, 32, 72, 112, 152, 116, 80,
                120, 360, -40, -40, -40, -40, -40, -40, -40, -40, -40, -40, -40, -40, -40, -40,
                -40, -40, -40, -40, -40,
            ],
        ),
        (
            80,
            40,
            |i| (i % 9) - 4,
            &[
                -8, 0, -14, 14, 4, -4, 2, 14, -18, -22, 0, -4, -18, -22, 18, -22, -18, 14, -2, 14,
                -20, -4, -4, 32, 14, -22, -6, 14, -26, -22, 8, -4, -30, -22, 24, -4, -30, 14, 4,
                -4, 0, 0, -34, 18, -16, 0, 2, -18, 38, 18, -16, 36, -70, -18, -34, -18, 38, -18,
                38, -18, -52, 36, -52, 0, 2, -18, 38, 18, 38, 18, -52, 0, -34, -18, 20, 0, 2, -18,
                -16, 0,
            ],
        ),
    ];
    for (n, base, f, expected) in cases {
        let x: Vec<f64> = (0..n as i64).map(|i| f(i) as f64).collect();
        let size = HadamardSize::with_base(n, base).unwrap();
        let mut y = x.clone();
        hadamard::forward_sized_in_place(size, &mut y).unwrap();
        let root = (n as f64).sqrt();
        for (i, (g, e)) in y.iter().zip(expected).enumerate() {
            assert!(
                (g * root - *e as f64).abs() < 1e-9,
                "n {n} base {base} [{i}]: {} vs {e}",
                g * root
            );
        }
        if HadamardSize::new(n).unwrap().base == base {
            let mut z = x.clone();
            hadamard::forward_in_place(&mut z).unwrap();
            assert_eq!(z, y);
        }
    }
}

#[test]
fn splitmix64_matches_its_published_outputs() {
    let mut g = SplitMix64::new(0);
    assert_eq!(g.next_u64(), 0xE220_A839_7B1D_CDAF);
    assert_eq!(g.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    assert_eq!(g.next_u64(), 0x06C4_5D18_8009_454F);
    let s = random_signs(3, 0);
    assert_eq!(s, vec![-1.0, 1.0, 1.0]);
    // Roughly balanced, and different seeds differ.
    let a = random_signs(4096, 42);
    let plus = a.iter().filter(|v| **v > 0.0).count();
    assert!((1900..2200).contains(&plus), "{plus}");
    assert_ne!(a, random_signs(4096, 43));
}

#[test]
fn randomized_is_hadamard_of_sign_flipped_input() {
    let n = 96;
    let r = Rotation::randomized(n, 9).unwrap();
    let s = random_signs(n, 9);
    let x: Vec<f64> = (0..n).map(|i| (i as f64 * 0.7).cos()).collect();
    let mut flipped: Vec<f64> = x.iter().zip(&s).map(|(a, b)| a * b).collect();
    hadamard::forward_in_place(&mut flipped).unwrap();
    let mut y = x.clone();
    r.forward_in_place(&mut y).unwrap();
    assert_eq!(y, flipped);
    assert_eq!(r.seed(), Some(9));
}

#[test]
fn block_diagonal_applies_h_b_to_each_block() {
    let r = Rotation::block_hadamard(256, 64).unwrap();
    let m = r.to_matrix();
    let h64 = hadamard::matrix(64).unwrap();
    for i in 0..256 {
        for j in 0..256 {
            let expected = if i / 64 == j / 64 {
                h64[[i % 64, j % 64]]
            } else {
                0.0
            };
            assert_eq!(m[[i, j]], expected);
        }
    }
    for (n, b) in [(256, 48), (256, 512), (96, 64), (0, 1), (64, 0)] {
        assert!(
            matches!(
                Rotation::block_hadamard(n, b),
                Err(Error::InvalidBlock { .. })
            ),
            "{n} {b}"
        );
    }
}

#[test]
fn explicit_matrices_are_validated() {
    let h = hadamard::matrix(20).unwrap();
    let r = Rotation::matrix(h.clone()).unwrap();
    assert_eq!(r.to_matrix(), h);
    let mut skewed = h.clone();
    skewed[[3, 4]] += 1e-3;
    assert!(matches!(
        Rotation::matrix(skewed.clone()),
        Err(Error::NotOrthogonal { .. })
    ));
    assert!(Rotation::matrix_with_tolerance(skewed, 1e-2).is_ok());
    let mut nan = h.clone();
    nan[[0, 0]] = f64::NAN;
    assert!(matches!(
        Rotation::matrix(nan),
        Err(Error::NotOrthogonal { .. })
    ));
    assert!(matches!(
        Rotation::matrix(Array2::zeros((3, 4))),
        Err(Error::NotSquare { rows: 3, cols: 4 })
    ));
    assert!(matches!(
        Rotation::matrix(Array2::zeros((0, 0))),
        Err(Error::NotSquare { .. })
    ));
}

#[test]
fn wrong_lengths_are_errors() {
    let r = Rotation::hadamard(64).unwrap();
    let mut short = vec![1.0; 63];
    assert!(matches!(
        r.forward_in_place(&mut short),
        Err(Error::LengthMismatch {
            expected: 64,
            actual: 63,
            ..
        })
    ));
    assert!(r.inverse_in_place(&mut short).is_err());
    let mut rows = vec![1.0; 130];
    assert!(r.rotate_rows(&mut rows, false).is_err());
    let mut three = vec![0.0; 3];
    assert!(hadamard::forward_in_place(&mut three).is_err());
    assert!(hadamard::entry(4, 4, 0).is_err());
}

#[test]
fn non_finite_values_spread_to_the_whole_row_and_nowhere_else() {
    // Documented: every output of H depends on every input, so one NaN makes the row NaN;
    // an Inf gives ±Inf or NaN (Inf − Inf) everywhere. Other rows are untouched.
    let r = Rotation::hadamard(8).unwrap();
    let mut rows = vec![1.0; 16];
    rows[3] = f64::NAN;
    r.rotate_rows(&mut rows, false).unwrap();
    assert!(rows[..8].iter().all(|v| v.is_nan()));
    assert!(rows[8..].iter().all(|v| v.is_finite()));
    let mut inf = vec![0.0; 8];
    inf[0] = f64::INFINITY;
    r.forward_in_place(&mut inf).unwrap();
    assert!(inf.iter().all(|v| v.is_infinite()));
}

#[test]
fn rotation_specs_parse_and_build() {
    assert_eq!("none".parse::<RotationSpec>().unwrap(), RotationSpec::None);
    assert_eq!(
        "hadamard".parse::<RotationSpec>().unwrap(),
        RotationSpec::Hadamard
    );
    assert_eq!(
        "randomized:17".parse::<RotationSpec>().unwrap(),
        RotationSpec::Randomized(17)
    );
    for bad in [
        "",
        "Hadamard",
        "randomized",
        "randomized:-1",
        "block:",
        "rot:3",
    ] {
        assert!(
            matches!(bad.parse::<RotationSpec>(), Err(Error::UnknownRotation(_))),
            "{bad:?}"
        );
    }
    assert!(RotationSpec::None.build(7).unwrap().is_none());
    assert!(RotationSpec::Hadamard.build(7).is_err());
    for spec in [
        RotationSpec::Hadamard,
        RotationSpec::Randomized(3),
        RotationSpec::Block(32),
    ] {
        assert_eq!(spec.to_string().parse::<RotationSpec>().unwrap(), spec);
    }
}

fn any_rotation() -> impl Strategy<Value = Rotation> {
    let sizes: Vec<usize> = sizes_up_to(MAX_POW2)
        .into_iter()
        .filter(|&n| n <= 4096)
        .collect();
    let n = proptest::sample::select(sizes);
    (n, any::<u64>(), 0u32..13, 0u8..4).prop_map(|(n, seed, log_b, kind)| match kind {
        0 => Rotation::hadamard(n).unwrap(),
        1 => Rotation::randomized(n, seed).unwrap(),
        2 => {
            let b = (1usize << log_b).min(n & n.wrapping_neg()); // a power of two dividing n
            Rotation::block_hadamard(n, b).unwrap()
        }
        _ => {
            let m = n.min(48);
            let m = if HadamardSize::new(m).is_ok() { m } else { 16 };
            Rotation::matrix(Rotation::randomized(m, seed).unwrap().to_matrix()).unwrap()
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn inverse_undoes_forward_and_norms_and_dots_are_kept(
        r in any_rotation(), seed in any::<u64>(), log_scale in -30i32..30,
    ) {
        let n = r.dim();
        // x of half-width 2^(log_scale - 1), z of half-width 1/2.
        let x = Rows::uniform(2f32.powi(log_scale - 1)).f64s(n, seed);
        let z = Rows::uniform(0.5).f64s(n, seed ^ 1);
        let (mut y, mut w) = (x.clone(), z.clone());
        r.forward_in_place(&mut y).unwrap();
        r.forward_in_place(&mut w).unwrap();
        let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>();
        prop_assert!((norm(&y) - norm(&x)).abs() <= 1e-12 * norm(&x));
        // ⟨Rx, Rz⟩ = ⟨x, z⟩: rotating Q and K alike leaves every score unchanged.
        prop_assert!((dot(&y, &w) - dot(&x, &z)).abs() <= 1e-12 * norm(&x) * norm(&z));
        r.inverse_in_place(&mut y).unwrap();
        for (a, b) in x.iter().zip(&y) {
            prop_assert!((a - b).abs() <= 1e-12 * norm(&x));
        }
    }

    #[test]
    fn forward_is_linear(r in any_rotation(), seed in any::<u64>(), a in -4.0f64..4.0) {
        let n = r.dim();
        let (x, z) = (Rows::uniform(0.5).f64s(n, seed), Rows::uniform(0.5).f64s(n, seed ^ 7));
        let mut combo: Vec<f64> = x.iter().zip(&z).map(|(p, q)| a * p + q).collect();
        let (mut rx, mut rz) = (x, z);
        r.forward_in_place(&mut rx).unwrap();
        r.forward_in_place(&mut rz).unwrap();
        r.forward_in_place(&mut combo).unwrap();
        for ((c, p), q) in combo.iter().zip(&rx).zip(&rz) {
            prop_assert!((c - (a * p + q)).abs() < 1e-11);
        }
    }
}

#[test]
fn the_largest_sizes_invert() {
    for n in [MAX_POW2, 12 * 4096, 40 * 1024] {
        for r in [
            Rotation::hadamard(n).unwrap(),
            Rotation::randomized(n, 5).unwrap(),
        ] {
            let x = Rows::uniform(1.0).f64s(n, 3);
            let mut y = x.clone();
            r.forward_in_place(&mut y).unwrap();
            r.inverse_in_place(&mut y).unwrap();
            assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 1e-12), "{r}");
        }
    }
}
