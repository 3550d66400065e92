//! Differential tests: the CPU rotation kernels against the oracle, on every instruction set
//! this machine has (the portable path always runs too).

use half::{bf16, f16};
use proptest::prelude::*;
use rotq::reference::hadamard::{HadamardSize, MAX_POW2};
use rotq::reference::tolerance::{Op, Precision};
use rotq::Rotation;
use rotq_cpu::{CpuRotation, FwhtConfig, Isa};
use rotq_testkit::{data::Rows, oracle::assert_matches, rotations::RotationKind};

/// The oracle's rotation of each row (f64), inverse when asked.
fn oracle(r: &Rotation, rows: &[f32], inverse: bool) -> Vec<f64> {
    let mut x: Vec<f64> = rows.iter().map(|v| f64::from(*v)).collect();
    r.rotate_rows(&mut x, inverse).unwrap();
    x
}

fn check(r: &Rotation, rows: &[f32], isa: Isa, config: FwhtConfig) {
    let kernel = CpuRotation::new(r, isa).with_config(config);
    assert_eq!(kernel.isa(), isa);
    for inverse in [false, true] {
        let mut got = rows.to_vec();
        if inverse {
            kernel.inverse_rows(&mut got).unwrap();
        } else {
            kernel.forward_rows(&mut got).unwrap();
        }
        let want = oracle(r, rows, inverse);
        let got: Vec<f64> = got.iter().map(|v| f64::from(*v)).collect();
        // Row by row, so a wrong row cannot hide among many right ones.
        let what = format!("{r} on {isa} (inverse {inverse})");
        for (g, w) in got.chunks(r.dim()).zip(want.chunks(r.dim())) {
            assert_matches(g, w, Op::Rotation, Precision::F32, &what);
        }
    }
}

/// The rotations of `n` the kernels run: Hadamard and randomized first, then blocks of 1, 8
/// and 64 where they divide `n`, and an explicit matrix while `n` ≤ 256 (it costs n² a row).
fn rotations(n: usize, seed: u64) -> Vec<Rotation> {
    let mut v: Vec<Rotation> = [RotationKind::Hadamard, RotationKind::Randomized]
        .into_iter()
        .flat_map(|kind| kind.build(n, seed))
        .collect();
    let low = n & n.wrapping_neg();
    for b in [1usize, 8, 64] {
        if b <= low {
            v.push(Rotation::block_hadamard(n, b).unwrap());
        }
    }
    if n <= 256 {
        v.extend(RotationKind::Matrix.build(n, seed));
    }
    v
}

#[test]
fn every_size_up_to_4096_matches_the_oracle() {
    let sizes: Vec<usize> = (1..=4096)
        .filter(|&n| HadamardSize::new(n).is_ok())
        .collect();
    for isa in Isa::all_available() {
        for &n in &sizes {
            let rows = Rows::uniform(3.0).f32s(3 * n, n as u64);
            for r in rotations(n, n as u64) {
                check(&r, &rows, isa, FwhtConfig::for_dim(n));
            }
        }
    }
}

#[test]
fn the_largest_sizes_match_the_oracle() {
    for isa in Isa::all_available() {
        for n in [MAX_POW2, 12 * 2048, 40 * 512, 28 * 1024] {
            let rows = Rows::uniform(1.0).f32s(n, 7);
            for r in rotations(n, 3).into_iter().take(2) {
                check(&r, &rows, isa, FwhtConfig::for_dim(n));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_batch_and_task_size_matches_the_oracle(
        n in proptest::sample::select(vec![2usize, 4, 8, 16, 64, 80, 96, 128, 192, 256, 1024]),
        rows in 0usize..40,
        rows_per_task in 1usize..20,
        seed in any::<u64>(),
        log_scale in -20i32..20,
    ) {
        let data = Rows::uniform(2f32.powi(log_scale)).f32s(rows * n, seed);
        for isa in Isa::all_available() {
            for r in rotations(n, seed) {
                check(&r, &data, isa, FwhtConfig { rows_per_task });
            }
        }
    }
}

#[test]
fn half_precision_storage_matches_the_oracle() {
    for isa in Isa::all_available() {
        for n in [64usize, 96, 128, 4096] {
            let rows = Rows::uniform(4.0).f32s(4 * n, n as u64);
            let rotations = [
                Rotation::randomized(n, 1).unwrap(),
                Rotation::block_hadamard(n, 32).unwrap(),
            ];
            for (r, inverse) in rotations.iter().flat_map(|r| [(r, false), (r, true)]) {
                let kernel = CpuRotation::new(r, isa);
                let mut h: Vec<f16> = rows.iter().map(|v| f16::from_f32(*v)).collect();
                let mut b: Vec<bf16> = rows.iter().map(|v| bf16::from_f32(*v)).collect();
                let widen_h: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
                let widen_b: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
                let (want_h, want_b) = (oracle(r, &widen_h, inverse), oracle(r, &widen_b, inverse));
                kernel.rows(&mut h, inverse).unwrap();
                kernel.rows(&mut b, inverse).unwrap();
                let got_h: Vec<f64> = h.iter().map(|v| f64::from(v.to_f32())).collect();
                let got_b: Vec<f64> = b.iter().map(|v| f64::from(v.to_f32())).collect();
                let what = format!("{r} on {isa} (inverse {inverse})");
                assert_matches(&got_h, &want_h, Op::Rotation, Precision::F16, &what);
                assert_matches(&got_b, &want_b, Op::Rotation, Precision::Bf16, &what);
            }
        }
    }
}

#[test]
fn wrong_lengths_are_errors() {
    let kernel = CpuRotation::new(&Rotation::hadamard(64).unwrap(), Isa::best());
    assert!(kernel.forward_rows(&mut vec![0.0; 100]).is_err());
    assert!(kernel.rows(&mut [f16::ZERO; 65], false).is_err());
    assert!(kernel.forward_rows(&mut []).is_ok());
}

/// `with_output_scale(s)` is `s · √n` times the normalized transform (the oracle's), on every
/// instruction set, for Hadamard sizes of both families and for blocks (`√block` there); and
/// the unnormalized transform of small integers is exact.
#[test]
fn an_output_scale_replaces_the_normalization() {
    for isa in Isa::all_available() {
        for (r, norm) in [
            (Rotation::hadamard(256).unwrap(), 256f64),
            (Rotation::hadamard(12 * 16).unwrap(), 192.0),
            (Rotation::hadamard(40).unwrap(), 40.0),
            (Rotation::block_hadamard(256, 32).unwrap(), 32.0),
        ] {
            let rows = Rows::uniform(2.0).f32s(4 * r.dim(), r.dim() as u64);
            let scale = 0.3f32;
            let mut got = rows.clone();
            let kernel = CpuRotation::new(&r, isa).with_output_scale(scale);
            kernel.forward_rows(&mut got).unwrap();
            let want: Vec<f64> = oracle(&r, &rows, false)
                .iter()
                .map(|v| v * f64::from(scale) * norm.sqrt())
                .collect();
            let got: Vec<f64> = got.iter().map(|v| f64::from(*v)).collect();
            for (g, w) in got.chunks(r.dim()).zip(want.chunks(r.dim())) {
                assert_matches(g, w, Op::Rotation, Precision::F32, &format!("{r} on {isa}"));
            }
            let ints: Vec<f32> = (0..r.dim()).map(|i| (i % 7) as f32 - 3.0).collect();
            let mut exact = ints.clone();
            CpuRotation::new(&r, isa)
                .with_output_scale(1.0)
                .forward_rows(&mut exact)
                .unwrap();
            let want: Vec<f32> = oracle(&r, &ints, false)
                .iter()
                .map(|v| (v * norm.sqrt()).round() as f32)
                .collect();
            assert_eq!(exact, want, "{r} on {isa}: integer sums are exact");
        }
    }
}
