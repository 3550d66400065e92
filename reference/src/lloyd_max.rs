//! Lloyd–Max codebooks for one coordinate of a uniformly random unit vector: the scalar
//! quantizers of TurboQuant (Zandieh et al., "TurboQuant: Online Vector Quantization with
//! Near-optimal Distortion Rate", ICLR 2026, Algorithm 1).
//!
//! After a random rotation, each coordinate `x` of a unit vector of `R^d` follows the density
//! `f_d(x) ∝ (1 − x²)^((d − 3)/2)` on `[−1, 1]` (for `d ≥ 3`); TurboQuant quantizes each
//! coordinate with the `2^b`-level quantizer of least mean squared error for that density.
//! This module computes it by a documented, deterministic procedure:
//!
//! * **Exact cell integrals.** With `x = sin θ`, `∫ f_d = ∫ cos^(d−2) θ dθ`, which the
//!   reduction `J_n = cos^(n−1) θ sin θ / n + (n − 1)/n · J_(n−2)` (from `J_0 = θ`,
//!   `J_1 = sin θ`) gives in closed form; and `∫ x f_d = (1 − (1 − x²)^((d−1)/2)) / (d − 1)`
//!   (computed as `−expm1(ln1p(−x²) (d−1)/2)`, which keeps its digits near 0).
//!   No quadrature, no sampling: a cell's mass and first moment are a few f64 operations.
//! * **Symmetry.** The density is even, so the quantizer is: the `2^(b−1)` positive levels are
//!   computed on `[0, 1]` with 0 as a fixed boundary, and mirrored.
//! * **Lloyd's iterations.** Start from boundaries at `k / 2^(b−1) · 3/√d` (the first levels
//!   of a uniform quantizer over ±3 standard deviations, the last cell reaching 1); then
//!   alternately put each level at its cell's centroid (first moment / mass) and each inner
//!   boundary at the midpoint of its two levels, until a round moves nothing or 50 rounds in a
//!   row fail to move less than the least move so far (rounding noise); that least move must
//!   then be at most `1e−12` of the largest level, far below what an f16 level can hold (convergence is linear: thousands of rounds
//!   at 4 bits).
//!
//! The codebooks of the head dimensions the registry's TurboQuant formats take are checked in
//! as constants ([`codebook`]); a test recomputes every one of them.
//!
//! ```
//! use rotq_reference::lloyd_max;
//! // One bit: the levels ±E|x|, which tend to ±√(2/π)/√d for large d.
//! let c = lloyd_max::compute(128, 1).unwrap();
//! assert_eq!(c.len(), 2);
//! assert!((c[1] * 128f64.sqrt() - (2.0 / std::f64::consts::PI).sqrt()).abs() < 0.01);
//! assert_eq!(c[0], -c[1]);
//! ```

use crate::{Error, Result};

/// The largest bit width computed (16 levels).
pub const MAX_BITS: u32 = 4;

/// The largest dimension computed: beyond it the rounding of the cell integrals (which grows
/// with d) would stall Lloyd's iterations above the convergence rule.
pub const MAX_DIM: usize = 8192;

/// `∫_0^θ cos^n φ dφ` by the reduction formula (exact up to rounding).
fn cos_power_integral(n: usize, theta: f64) -> f64 {
    let (s, c) = theta.sin_cos();
    // J_0 = θ or J_1 = sin θ, then up by two.
    let (mut j, mut k) = if n.is_multiple_of(2) {
        (theta, 0)
    } else {
        (s, 1)
    };
    // cos^(k−1) of the step, kept as a running power.
    let mut cos_pow = 1.0;
    while k < n {
        k += 2;
        // cos^(k−1) = cos^(k−3) · cos².
        cos_pow = if k == 2 { c } else { cos_pow * c * c };
        j = cos_pow * s / k as f64 + (k - 1) as f64 / k as f64 * j;
    }
    j
}

/// Mass `F(x) = ∫_0^x (1 − t²)^((d−3)/2) dt` of the (unnormalized) density on `[0, x]`.
fn mass(d: usize, x: f64) -> f64 {
    cos_power_integral(d - 2, x.clamp(-1.0, 1.0).asin())
}

/// First moment `G(x) = ∫_0^x t (1 − t²)^((d−3)/2) dt`.
fn moment(d: usize, x: f64) -> f64 {
    let x = x.clamp(-1.0, 1.0);
    // 1 − (1 − x²)^p without the cancellation near 0: −expm1(p · ln1p(−x²)).
    -(((d as f64 - 1.0) / 2.0) * (-x * x).ln_1p()).exp_m1() / (d as f64 - 1.0)
}

/// The `2^bits` Lloyd–Max levels, ascending, for one coordinate of a random unit vector of
/// `R^d` (`d ≥ 3`, `1 ≤ bits ≤ 4`), computed as the module docs say.
///
/// ```
/// let c = rotq_reference::lloyd_max::compute(64, 2).unwrap();
/// assert!(c.windows(2).all(|w| w[0] < w[1]));
/// assert!(rotq_reference::lloyd_max::compute(2, 2).is_err());
/// ```
pub fn compute(d: usize, bits: u32) -> Result<Vec<f64>> {
    if !(3..=MAX_DIM).contains(&d) {
        return Err(Error::InvalidParameter {
            name: "head dimension",
            reason: format!("a Lloyd–Max codebook needs 3 <= d <= {MAX_DIM}, not {d}"),
        });
    }
    if !(1..=MAX_BITS).contains(&bits) {
        return Err(Error::InvalidParameter {
            name: "bits",
            reason: format!("codebooks have 1 to {MAX_BITS} bits, not {bits}"),
        });
    }
    let half = 1usize << (bits - 1);
    // Boundaries b[0] = 0 < b[1] < … < b[half] = 1; levels c[i] in (b[i], b[i+1]).
    let spread = 3.0 / (d as f64).sqrt();
    let mut bounds: Vec<f64> = (0..=half)
        .map(|k| {
            if k == half {
                1.0
            } else {
                (k as f64 / half as f64 * spread).min(1.0)
            }
        })
        .collect();
    let mut levels = vec![0.0; half];
    // Linear convergence can crawl: go on until a round moves nothing (or stops shrinking its
    // moves for 50 rounds: rounding noise), then require the last move to be tiny.
    let (mut last, mut stalled) = (f64::INFINITY, 0);
    let mut converged = false;
    for _ in 0..200_000 {
        let mut moved = 0f64;
        for i in 0..half {
            let (a, b) = (bounds[i], bounds[i + 1]);
            let m = mass(d, b) - mass(d, a);
            let c = if m > 0.0 {
                (moment(d, b) - moment(d, a)) / m
            } else {
                (a + b) / 2.0
            };
            moved = moved.max((c - levels[i]).abs());
            levels[i] = c;
        }
        for i in 1..half {
            bounds[i] = (levels[i - 1] + levels[i]) / 2.0;
        }
        let scale = levels[half - 1].abs();
        stalled = if moved < last { 0 } else { stalled + 1 };
        last = last.min(moved);
        if moved == 0.0 || stalled >= 50 {
            converged = last <= 1e-12 * scale;
            break;
        }
    }
    if !converged {
        return Err(Error::InvalidParameter {
            name: "head dimension",
            reason: format!("Lloyd's iterations did not converge for d = {d}, {bits} bits"),
        });
    }
    let mut out: Vec<f64> = levels.iter().rev().map(|c| -c).collect();
    out.extend_from_slice(&levels);
    Ok(out)
}

/// TurboQuant's distortion of `levels` for unit vectors of `R^d`: `d · E[(x − Q(x))²]` for
/// one coordinate `x` (density `f_d`) and `Q` the nearest level, i.e. the expected squared
/// error `E‖u − Q(u)‖²` of a random unit vector `u` quantized coordinate by coordinate
/// (the paper's `D_mse`; about 0.36, 0.117, 0.03 and 0.009 at 1 to 4 bits). Exact cell
/// integrals, as [`compute`] uses (`∫ x² f_d = F_d − F_(d+2)`).
///
/// ```
/// use rotq_reference::lloyd_max::{codebook, distortion};
/// let one = distortion(128, &codebook(128, 1).unwrap()).unwrap();
/// assert!((one - (1.0 - 2.0 / std::f64::consts::PI)).abs() < 0.01);
/// ```
pub fn distortion(d: usize, levels: &[f64]) -> Result<f64> {
    if d < 3 || levels.is_empty() || !levels.windows(2).all(|w| w[0] < w[1]) {
        return Err(Error::InvalidParameter {
            name: "codebook",
            reason: format!("need d >= 3 (got {d}) and ascending levels"),
        });
    }
    let cell = |a: f64, b: f64, c: f64| {
        let m = mass(d, b) - mass(d, a);
        let g = moment(d, b) - moment(d, a);
        let x2 = m - (mass(d + 2, b) - mass(d + 2, a));
        x2 - 2.0 * c * g + c * c * m
    };
    let mut total = 0.0;
    for (i, &c) in levels.iter().enumerate() {
        let a = if i == 0 {
            -1.0
        } else {
            (levels[i - 1] + c) / 2.0
        };
        let b = levels.get(i + 1).map_or(1.0, |n| (c + n) / 2.0);
        total += cell(a, b, c);
    }
    Ok(d as f64 * total / (mass(d, 1.0) - mass(d, -1.0)))
}

/// The checked-in codebooks, `√d ·` level (ascending, positive half), by head dimension and
/// bits: what [`compute`] gives, to the printed digits.
const TABLE: &[(usize, u32, &[f64])] = &[
    (64, 1, &[8.01007265399210e-01]),
    (64, 2, &[4.52118950112880e-01, 1.49997479536282e+00]),
    (
        64,
        3,
        &[
            2.43753431449526e-01,
            7.50658105747385e-01,
            1.32934287140223e+00,
            2.11131144675724e+00,
        ],
    ),
    (
        64,
        4,
        &[
            1.27352180431922e-01,
            3.84718265675760e-01,
            6.50494148160121e-01,
            9.31894018585801e-01,
            1.23940422233475e+00,
            1.59084912895833e+00,
            2.02330982580294e+00,
            2.64637049102319e+00,
        ],
    ),
    (128, 1, &[7.99444436038607e-01]),
    (128, 2, &[4.52453250474835e-01, 1.50519297836518e+00]),
    (
        128,
        3,
        &[
            2.44424872926833e-01,
            7.53330159676187e-01,
            1.33659888593957e+00,
            2.13147084409502e+00,
        ],
    ),
    (
        128,
        4,
        &[
            1.27873151737818e-01,
            3.86380915730466e-01,
            6.53618947679300e-01,
            9.37097021393510e-01,
            1.24777045825556e+00,
            1.60434266004807e+00,
            2.04592538003527e+00,
            2.68885925677431e+00,
        ],
    ),
    (256, 1, &[7.98664123545691e-01]),
    (256, 2, &[4.52617583050769e-01, 1.50780451437600e+00]),
    (
        256,
        3,
        &[
            2.44759802637723e-01,
            7.54667365418835e-01,
            1.34024731002852e+00,
            2.14166864119945e+00,
        ],
    ),
    (
        256,
        4,
        &[
            1.28133986914544e-01,
            3.87214043122892e-01,
            6.55187151855274e-01,
            9.39713724698957e-01,
            1.25198901910943e+00,
            1.61116812089631e+00,
            2.05741120983586e+00,
            2.71056699516294e+00,
        ],
    ),
];

/// The `2^bits` levels for head dimension `d`: the checked-in constants where there are some,
/// else [`compute`]'s.
///
/// ```
/// let c = rotq_reference::lloyd_max::codebook(128, 4).unwrap();
/// assert_eq!(c.len(), 16);
/// ```
pub fn codebook(d: usize, bits: u32) -> Result<Vec<f64>> {
    match TABLE.iter().find(|(td, tb, _)| *td == d && *tb == bits) {
        Some((_, _, half)) => {
            let s = (d as f64).sqrt();
            let mut out: Vec<f64> = half.iter().rev().map(|c| -c / s).collect();
            out.extend(half.iter().map(|c| c / s));
            Ok(out)
        }
        None => {
            static CACHE: Codebooks<f64> = std::sync::OnceLock::new();
            cached(&CACHE, d, bits, compute)
        }
    }
}

/// Codebooks computed in this process, by `(d, bits)`.
pub(crate) type Codebooks<T> = std::sync::OnceLock<std::sync::Mutex<Vec<((usize, u32), Vec<T>)>>>;

/// The codebook of `(d, bits)` from `cache`, computed by `make` the first time.
pub(crate) fn cached<T: Clone>(
    cache: &Codebooks<T>,
    d: usize,
    bits: u32,
    make: impl FnOnce(usize, u32) -> Result<Vec<T>>,
) -> Result<Vec<T>> {
    let lock = || {
        cache
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    if let Some((_, c)) = lock().iter().find(|(k, _)| *k == (d, bits)) {
        return Ok(c.clone());
    }
    let c = make(d, bits)?;
    lock().push(((d, bits), c.clone()));
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The closed-form cell integrals agree with a fine midpoint rule.
    #[test]
    fn cell_integrals_match_quadrature() {
        for d in [3usize, 4, 17, 64, 128, 256] {
            for (a, b) in [(0.0, 0.05), (0.1, 0.3), (0.2, 1.0), (0.0, 1.0), (-0.4, 0.1)] {
                let n = 200_000;
                let h = (b - a) / n as f64;
                let (mut m, mut g) = (0.0, 0.0);
                for i in 0..n {
                    let x = a + (i as f64 + 0.5) * h;
                    let f = (1.0 - x * x).powf((d as f64 - 3.0) / 2.0);
                    m += f * h;
                    g += x * f * h;
                }
                let em = mass(d, b) - mass(d, a);
                let eg = moment(d, b) - moment(d, a);
                assert!(
                    (em - m).abs() <= 1e-6 * m.abs(),
                    "d {d} [{a},{b}] mass {em} vs {m}"
                );
                assert!(
                    (eg - g).abs() <= 1e-6 * g.abs().max(1e-12),
                    "d {d} [{a},{b}] moment {eg} vs {g}"
                );
            }
        }
    }

    /// Every checked-in codebook is what the procedure computes.
    #[test]
    fn the_checked_in_codebooks_are_recomputed() {
        assert_eq!(TABLE.len(), 12);
        for &(d, bits, half) in TABLE {
            let c = compute(d, bits).unwrap();
            assert_eq!(c.len(), 2 * half.len());
            let s = (d as f64).sqrt();
            for (got, want) in c[half.len()..].iter().zip(half) {
                assert!(
                    (got * s - want).abs() <= 1e-11 * want,
                    "d {d} b {bits}: {} vs {want}",
                    got * s
                );
            }
        }
    }

    /// The levels are a fixed point of Lloyd's map (each its cell's centroid), symmetric and
    /// ascending; the distortion falls with each bit and matches the paper's figures; large
    /// d approaches the Gaussian Lloyd–Max quantizer.
    #[test]
    fn codebooks_are_lloyd_fixed_points_with_the_papers_distortion() {
        let paper = [0.36, 0.117, 0.03, 0.009];
        let gaussian: [&[f64]; 4] = [
            &[0.7979],
            &[0.4528, 1.5104],
            &[0.2451, 0.7560, 1.3440, 2.1520],
            &[
                0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6180, 2.0690, 2.7326,
            ],
        ];
        for d in [3usize, 5, 64, 96, 128, 256] {
            let mut last = f64::INFINITY;
            for bits in 1..=MAX_BITS {
                let c = codebook(d, bits).unwrap();
                assert!(c.windows(2).all(|w| w[0] < w[1]));
                for (a, b) in c.iter().zip(c.iter().rev()) {
                    assert_eq!(*a, -*b);
                }
                for (i, &level) in c.iter().enumerate() {
                    let a = if i == 0 {
                        -1.0
                    } else {
                        (c[i - 1] + level) / 2.0
                    };
                    let b = c.get(i + 1).map_or(1.0, |n| (level + n) / 2.0);
                    let centroid = (moment(d, b) - moment(d, a)) / (mass(d, b) - mass(d, a));
                    assert!(
                        (centroid - level).abs() <= 1e-11 * c[c.len() - 1],
                        "d {d} b {bits} level {i}"
                    );
                }
                let dist = distortion(d, &c).unwrap();
                assert!(dist < last, "d {d}: {bits} bits distort {dist} >= {last}");
                last = dist;
                if d >= 64 {
                    let p = paper[bits as usize - 1];
                    assert!(
                        (dist - p).abs() <= 0.15 * p,
                        "d {d} b {bits}: {dist} vs the paper's {p}"
                    );
                }
                if d == 256 {
                    let half = &c[c.len() / 2..];
                    for (got, want) in half.iter().zip(gaussian[bits as usize - 1]) {
                        assert!(
                            (got * 16.0 - want).abs() <= 0.01 * want,
                            "d 256 b {bits}: {}",
                            got * 16.0
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(compute(2, 1).is_err());
        assert!(compute(64, 0).is_err());
        assert!(compute(64, 5).is_err());
        assert!(distortion(64, &[0.5, 0.1]).is_err());
        assert!(distortion(2, &[0.1]).is_err());
    }
}
