//! The one Hadamard spec of rotq.
//!
//! * `H_1 = [1]`, `H_2m = [[H_m, H_m], [H_m, −H_m]]` (Sylvester, natural order), normalized by
//!   `1/√n`: orthonormal, symmetric, its own inverse. Entry `(i, j)` is
//!   `(−1)^popcount(i & j) / √n`.
//! * `n = m·2^k`, `m ∈ {12, 20, 28, 40}` (the larger base where two fit: 40 over 20 for
//!   multiples of 40): `H = (M_m ⊗ H_{2^k}) / √n` with the base matrices of
//!   Dao-AILab fast-hadamard-transform ([`bases`]). Index `j = a·2^k + b`: `a` (the m-index) is
//!   the slow one. Equivalently `Y = M · X · H_{2^k}` with `X = x.reshape(m, 2^k)`.
//!   Orthonormal; symmetric (hence involutive) only for `m = 12`: for 20, 28 and 40 the inverse
//!   is the transpose `(M_mᵀ ⊗ H_{2^k}) / √n`.
//!
//! Vectors are columns: `y = H x` acts on the last (head) dimension of a row-major tensor.
//!
//! The transforms here are written straight from those definitions (the recursive Sylvester
//! step and a dense `m × m` product), accumulate in f64, and are checked against the explicit
//! entry formulas by the tests.

mod bases;

use crate::error::{Error, Result};
use ndarray::Array2;

/// The largest power-of-two Hadamard size (and the largest power-of-two factor of an m·2^k size).
pub const MAX_POW2: usize = 1 << 15;

/// The non-power-of-two base sizes `m` of the supported `m·2^k` sizes.
pub const SPECIAL_BASES: [usize; 4] = [12, 20, 28, 40];

/// A supported Hadamard size, factored as `n = base · 2^log2` (`base` is 1 for powers of two).
///
/// ```
/// use rotq_reference::hadamard::HadamardSize;
/// let s = HadamardSize::new(96).unwrap();
/// assert_eq!((s.base, s.pow2), (12, 8));
/// assert!(HadamardSize::new(100).is_err());
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HadamardSize {
    /// `n`, the transform length.
    pub n: usize,
    /// 1, 12, 20, 28 or 40.
    pub base: usize,
    /// The power-of-two factor `2^k`, at most [`MAX_POW2`].
    pub pow2: usize,
}

impl HadamardSize {
    /// Factors `n`, or says why no Hadamard transform of that size is supported. Where two
    /// bases fit (multiples of 40 are also 20·2^k) the larger base is taken: `40 = 40·2^0`.
    pub fn new(n: usize) -> Result<Self> {
        [40, 28, 20, 12, 1]
            .into_iter()
            .find_map(|base| Self::with_base(n, base).ok())
            .ok_or(Error::UnsupportedDim {
                n,
                what: "Hadamard",
                hint: "need 2^k (1 <= 2^k <= 32768) or 12, 20, 28 or 40 times 2^k",
            })
    }

    /// `n` factored over a chosen base (1, 12, 20, 28 or 40), e.g. to use the `20·2^k` family
    /// at a multiple of 40.
    ///
    /// ```
    /// use rotq_reference::hadamard::HadamardSize;
    /// assert_eq!(HadamardSize::new(80).unwrap().base, 40);
    /// assert_eq!(HadamardSize::with_base(80, 20).unwrap().pow2, 4);
    /// assert!(HadamardSize::with_base(80, 12).is_err());
    /// ```
    pub fn with_base(n: usize, base: usize) -> Result<Self> {
        let fits = (base == 1 || SPECIAL_BASES.contains(&base))
            && n > 0
            && n.is_multiple_of(base)
            && (n / base).is_power_of_two()
            && n / base <= MAX_POW2;
        if fits {
            Ok(Self {
                n,
                base,
                pow2: n / base,
            })
        } else {
            Err(Error::UnsupportedDim {
                n,
                what: "Hadamard with the requested base",
                hint: "need base in {1, 12, 20, 28, 40} and n = base * 2^k, 2^k <= 32768",
            })
        }
    }
}

/// Applies the unnormalized Sylvester `H_n` to `x` in place, straight from the recursion
/// `H_2m [a; b] = [H_m (a + b); H_m (a − b)]`. `x.len()` must be a power of two.
fn sylvester_unnormalized(x: &mut [f64]) {
    let n = x.len();
    if n <= 1 {
        return;
    }
    let (a, b) = x.split_at_mut(n / 2);
    for (u, v) in a.iter_mut().zip(b.iter_mut()) {
        let (s, d) = (*u + *v, *u - *v);
        *u = s;
        *v = d;
    }
    sylvester_unnormalized(a);
    sylvester_unnormalized(b);
}

/// Sign `M_m[a][b]` (±1) of a base matrix (`m = 1` is the 1×1 matrix `[1]`); `a, b < m`.
///
/// ```
/// assert_eq!(rotq_reference::hadamard::base_sign(12, 0, 1), -1.0); // had_12_paley row 0: "+-++…"
/// ```
pub fn base_sign(m: usize, a: usize, b: usize) -> f64 {
    let rows: &[&str] = match m {
        12 => &bases::HAD_12,
        20 => &bases::HAD_20,
        28 => &bases::HAD_28,
        40 => &bases::HAD_40,
        _ => return 1.0,
    };
    if rows[a].as_bytes()[b] == b'+' {
        1.0
    } else {
        -1.0
    }
}

/// `y = H x` (or `y = Hᵀ x` when `transpose`), normalized, for the size `size`.
fn apply(size: HadamardSize, x: &mut [f64], transpose: bool) -> Result<()> {
    if x.len() != size.n {
        return Err(Error::LengthMismatch {
            what: "Hadamard input",
            expected: size.n,
            actual: x.len(),
        });
    }
    let (m, p) = (size.base, size.pow2);
    for row in x.chunks_exact_mut(p) {
        sylvester_unnormalized(row);
    }
    if m > 1 {
        // Y[a][q] = Σ_b M[a][b] · X'[b][q], where X' already holds X · H_p.
        let mut y = vec![0.0f64; x.len()];
        for a in 0..m {
            for b in 0..m {
                let s = if transpose {
                    base_sign(m, b, a)
                } else {
                    base_sign(m, a, b)
                };
                for q in 0..p {
                    y[a * p + q] += s * x[b * p + q];
                }
            }
        }
        x.copy_from_slice(&y);
    }
    let scale = 1.0 / (x.len() as f64).sqrt();
    x.iter_mut().for_each(|v| *v *= scale);
    Ok(())
}

/// `x ← H x` for an explicitly factored size (see [`HadamardSize::with_base`]).
pub fn forward_sized_in_place(size: HadamardSize, x: &mut [f64]) -> Result<()> {
    apply(size, x, false)
}

/// `x ← H x`, the normalized Hadamard transform of a supported length, in place.
///
/// ```
/// let mut x = [1.0, 0.0, 0.0, 0.0];
/// rotq_reference::hadamard::forward_in_place(&mut x).unwrap();
/// assert_eq!(x, [0.5, 0.5, 0.5, 0.5]);
/// ```
pub fn forward_in_place(x: &mut [f64]) -> Result<()> {
    apply(HadamardSize::new(x.len())?, x, false)
}

/// `x ← H⁻¹ x = Hᵀ x` in place (the same as [`forward_in_place`] except for m = 20, 28, 40).
///
/// ```
/// use rotq_reference::hadamard::{forward_in_place, inverse_in_place};
/// let mut x: Vec<f64> = (0..40).map(|i| i as f64).collect();
/// forward_in_place(&mut x).unwrap();
/// inverse_in_place(&mut x).unwrap();
/// assert!((x[7] - 7.0).abs() < 1e-12);
/// ```
pub fn inverse_in_place(x: &mut [f64]) -> Result<()> {
    apply(HadamardSize::new(x.len())?, x, true)
}

/// Entry `(i, j)` of the normalized `n × n` Hadamard matrix, from the closed form
/// `M_m[i / 2^k][j / 2^k] · (−1)^popcount((i mod 2^k) & (j mod 2^k)) / √n`.
///
/// Independent of the transform above, so the tests can check one against the other.
///
/// ```
/// let h = rotq_reference::hadamard::entry(4, 3, 3).unwrap();
/// assert_eq!(h, 0.5); // popcount(3 & 3) = 2
/// ```
pub fn entry(n: usize, i: usize, j: usize) -> Result<f64> {
    let size = HadamardSize::new(n)?;
    if i >= n || j >= n {
        return Err(Error::InvalidParameter {
            name: "index",
            reason: format!("({i}, {j}) is outside a {n}x{n} matrix"),
        });
    }
    let p = size.pow2;
    let parity = ((i % p) & (j % p)).count_ones() % 2;
    let sign = if parity == 0 { 1.0 } else { -1.0 };
    Ok(base_sign(size.base, i / p, j / p) * sign / (n as f64).sqrt())
}

/// The dense normalized `n × n` Hadamard matrix, from [`entry`] (rows are outputs).
///
/// ```
/// let h = rotq_reference::hadamard::matrix(12).unwrap();
/// let eye = h.dot(&h.t());
/// assert!((eye[[3, 3]] - 1.0).abs() < 1e-12 && eye[[3, 4]].abs() < 1e-12);
/// ```
pub fn matrix(n: usize) -> Result<Array2<f64>> {
    HadamardSize::new(n)?;
    let mut h = Array2::zeros((n, n));
    for ((i, j), v) in h.indexed_iter_mut() {
        *v = entry(n, i, j)?;
    }
    Ok(h)
}
