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
