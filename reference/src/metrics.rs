//! Error metrics between an output and its reference, in f64.
//!
//! Relative measures divide by the reference's size; where the reference is all zeros they
//! fall back to the absolute measure, so comparing zeros with zeros gives 0, never NaN.

/// `‖out − ref‖₂ / ‖ref‖₂` (or `‖out − ref‖₂` when `ref` is zero).
///
/// ```
/// let e = rotq_reference::metrics::rel_l2(&[3.0, 4.0], &[3.0, 4.5]);
/// assert!((e - 0.5 / (9.0f64 + 20.25).sqrt()).abs() < 1e-15);
/// ```
pub fn rel_l2(out: &[f64], reference: &[f64]) -> f64 {
    let diff = out
        .iter()
        .zip(reference)
        .map(|(o, r)| (o - r) * (o - r))
        .sum::<f64>()
        .sqrt();
    let norm = reference.iter().map(|r| r * r).sum::<f64>().sqrt();
    if norm > 0.0 {
        diff / norm
    } else {
        diff
    }
}

/// `max |out − ref|` (NaN if any pair holds a NaN).
///
/// ```
/// assert_eq!(rotq_reference::metrics::max_abs(&[1.0, -2.0], &[1.5, -2.0]), 0.5);
/// ```
pub fn max_abs(out: &[f64], reference: &[f64]) -> f64 {
    out.iter().zip(reference).fold(0.0, |m: f64, (o, r)| {
        let d = (o - r).abs();
        if d.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(d)
        }
    })
}

/// `max |out − ref| / max |ref|` (or the absolute measure when `ref` is zero).
///
/// ```
/// assert_eq!(rotq_reference::metrics::max_abs_rel(&[1.0, -2.0], &[1.5, -2.0]), 0.25);
/// ```
pub fn max_abs_rel(out: &[f64], reference: &[f64]) -> f64 {
    let scale = reference.iter().fold(0.0f64, |m, r| m.max(r.abs()));
    let m = max_abs(out, reference);
    if scale > 0.0 {
        m / scale
    } else {
        m
    }
}

/// Cosine similarity `a·b / (‖a‖‖b‖)`; 1 for two zero vectors, 0 when only one is zero.
///
/// ```
/// let c = rotq_reference::metrics::cosine(&[1.0, 0.0], &[1.0, 1.0]);
/// assert!((c - 0.5f64.sqrt()).abs() < 1e-15);
/// ```
pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    match (na > 0.0, nb > 0.0) {
        (true, true) => dot / (na * nb),
        (false, false) => 1.0,
        _ => 0.0,
    }
}

/// `KL(p ‖ q) = Σ p ln(p / q)` between two probability rows, `p` the reference. Terms with
/// `p = 0` contribute 0; a `q = 0` where `p > 0` gives +∞. Two all-zero rows (a fully masked
/// query) give 0.
///
/// ```
/// use rotq_reference::metrics::kl_divergence;
/// assert_eq!(kl_divergence(&[0.5, 0.5], &[0.5, 0.5]), 0.0);
/// assert!(kl_divergence(&[0.9, 0.1], &[0.5, 0.5]) > 0.0);
/// ```
pub fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    p.iter()
        .zip(q)
        .map(|(&pi, &qi)| if pi > 0.0 { pi * (pi / qi).ln() } else { 0.0 })
        .sum()
}
