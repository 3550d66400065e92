//! Comparing a kernel's output with the oracle's, under the one tolerance table.

use rotq_reference::tolerance::{tolerance, Op, Precision};

/// Asserts that `got` matches the oracle's `want` for `op` at `precision`: NaN in the same
/// places, and the rest within the tolerance table (relative L2 and max-abs). `what` names
/// the case in the failure message.
///
/// ```
/// use rotq_reference::tolerance::{Op, Precision};
/// use rotq_testkit::oracle::assert_matches;
/// assert_matches(&[1.0, f64::NAN], &[1.0, f64::NAN], Op::Attention, Precision::F32, "ok");
/// let caught = std::panic::catch_unwind(|| {
///     assert_matches(&[1.5], &[1.0], Op::Attention, Precision::F32, "off by half")
/// });
/// assert!(caught.is_err());
/// ```
///
/// # Panics
/// When they do not match (it is an assertion).
pub fn assert_matches(got: &[f64], want: &[f64], op: Op, precision: Precision, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g.is_nan(),
            w.is_nan(),
            "{what}: NaN at {i}: got {g}, want {w}"
        );
    }
    if let Err(m) = tolerance(op, precision).check(got, want) {
        panic!("{what}: {m}");
    }
}

/// [`assert_matches`] for f32 outputs.
///
/// ```
/// use rotq_reference::tolerance::{Op, Precision};
/// rotq_testkit::oracle::assert_matches_f32(&[0.5f32], &[0.5], Op::Attention, Precision::F32, "ok");
/// ```
pub fn assert_matches_f32(got: &[f32], want: &[f64], op: Op, precision: Precision, what: &str) {
    let got: Vec<f64> = got.iter().map(|&v| f64::from(v)).collect();
    assert_matches(&got, want, op, precision, what);
}

/// Queries as the oracle takes them for a kernel whose `K·Q` runs in `mode` (resolved, see
/// `rotq_cpu::QueryMode::resolve`), rotated by `qk`: for q8_0 queries, rotated by the CPU
/// kernels' own f32 rotation and then through q8_0 blocks (`quantize_query_in_place`, the
/// mode's spec), since a q8_0 code may flip where an f64 and an f32 rotation differ in the
/// last bit; otherwise rotated in f64. The oracle then runs without a Q rotation.
///
/// ```
/// use rotq_cpu::QueryMode;
/// use rotq_reference::Rotation;
/// let q: Vec<f32> = (0..64).map(|i| (i as f32 * 0.7).sin()).collect();
/// let r = Rotation::hadamard(64).unwrap();
/// let exact = rotq_testkit::oracle::oracle_queries(&q, Some(&r), QueryMode::Exact);
/// let q8 = rotq_testkit::oracle::oracle_queries(&q, Some(&r), QueryMode::Q8_0);
/// assert_ne!(exact, q8);
/// assert!(exact.iter().zip(&q8).all(|(a, b)| (a - b).abs() < 0.02));
/// ```
///
/// # Panics
/// On rows that are not whole rotations or (q8_0) whole blocks of 32 (it is an assertion).
#[cfg(feature = "fuzzing")]
pub fn oracle_queries(
    q: &[f32],
    qk: Option<&rotq_reference::Rotation>,
    mode: rotq_cpu::QueryMode,
) -> Vec<f64> {
    if mode == rotq_cpu::QueryMode::Q8_0 {
        let mut q32 = q.to_vec();
        if let Some(r) = qk {
            let rotation = rotq_cpu::CpuRotation::new(r, rotq_cpu::Isa::best());
            rotation.forward_rows(&mut q32).expect("whole rows");
            // The kernels' rotation is still held to the oracle's (the rotation tolerance).
            let mut exact: Vec<f64> = q.iter().map(|&v| f64::from(v)).collect();
            r.rotate_rows(&mut exact, false).expect("whole rows");
            assert_matches_f32(
                &q32,
                &exact,
                Op::Rotation,
                Precision::F32,
                "queries' rotation",
            );
        }
        rotq_reference::attention::quantize_query_in_place(&mut q32).expect("whole blocks");
        return q32.into_iter().map(f64::from).collect();
    }
    let mut qr: Vec<f64> = q.iter().map(|&v| f64::from(v)).collect();
    if let Some(r) = qk {
        r.rotate_rows(&mut qr, false).expect("whole rows");
    }
    qr
}
