//! Rotations: what may be applied to Q, K and V before K and V are quantized.
//!
//! Every rotation is an orthonormal `n × n` matrix `R` acting on column vectors (`y = R x`) along
//! the last (head) dimension; its inverse is `Rᵀ`.
//!
//! | kind | forward `y = R x` | inverse |
//! |---|---|---|
//! | Hadamard | `H x` (see [`crate::hadamard`]) | `Hᵀ y` |
//! | block-diagonal, block `b` | `H_b` on each contiguous block of `b` | the same |
//! | randomized, seed `s` | `H (s ⊙ x)` | `s ⊙ (Hᵀ y)` |
//! | explicit matrix `R` | `R x` | `Rᵀ y` |
//!
//! ## The sign generator (reproducible in any engine)
//! The signs of a randomized Hadamard of length `n` and seed `seed` are drawn from
//! **SplitMix64** seeded with `seed` (a `u64`):
//!
//! ```text
//! state = seed
//! for i in 0..n:
//!     state = state + 0x9E3779B97F4A7C15            (wrapping, mod 2^64)
//!     z = state
//!     z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9      (wrapping)
//!     z = (z ^ (z >> 27)) * 0x94D049BB133111EB      (wrapping)
//!     z = z ^ (z >> 31)
//!     s[i] = +1 if (z >> 63) == 0 else -1           (the top bit of the i-th output)
//! ```
//!
//! For seed 0 the first outputs are `0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, …`, so
//! `s = [−1, +1, …]` (tested).

use crate::error::{Error, Result};
use crate::hadamard::{self, HadamardSize, MAX_POW2};
use crate::tolerance::ORTHOGONALITY_TOLERANCE;
use ndarray::{Array2, ArrayView1};
use std::fmt;
use std::str::FromStr;

/// The SplitMix64 generator documented in the module docs.
///
/// ```
/// let mut g = rotq_reference::rotation::SplitMix64::new(0);
/// assert_eq!(g.next_u64(), 0xE220A8397B1DCDAF);
/// ```
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose state starts at `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64-bit output.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform f64 in `[0, 1)` from the top 53 bits of the next output.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The ±1 signs of a randomized Hadamard of length `n` (see the module docs).
///
/// ```
/// let s = rotq_reference::rotation::random_signs(4, 0);
/// assert_eq!(s[0], -1.0);
/// assert!(s.iter().all(|v| *v == 1.0 || *v == -1.0));
/// ```
pub fn random_signs(n: usize, seed: u64) -> Vec<f64> {
    let mut g = SplitMix64::new(seed);
    (0..n)
        .map(|_| if g.next_u64() >> 63 == 0 { 1.0 } else { -1.0 })
        .collect()
}

#[derive(Clone, Debug, PartialEq)]
enum Kind {
    Hadamard,
    Block(usize),
    Randomized { seed: u64, signs: Vec<f64> },
    Matrix(Array2<f64>),
}

/// A read-only view of what a [`Rotation`] is (see [`Rotation::kind`]).
#[derive(Clone, Copy, Debug)]
pub enum RotationKind<'a> {
    /// `H x` of this size.
    Hadamard {
        /// The factored size.
        size: HadamardSize,
    },
    /// `H_block` on each block.
    Block {
        /// The block length.
        block: usize,
    },
    /// `H (s ⊙ x)`.
    Randomized {
        /// The factored size.
        size: HadamardSize,
        /// The seed the signs came from.
        seed: u64,
        /// The signs `s` (±1).
        signs: &'a [f64],
    },
    /// `R x` with an explicit matrix (rows are outputs).
    Matrix {
        /// The matrix.
        r: &'a Array2<f64>,
    },
}

/// An orthonormal rotation of length-`n` vectors, validated when built.
///
/// ```
/// use rotq_reference::Rotation;
/// let r = Rotation::randomized(128, 7).unwrap();
/// let x: Vec<f64> = (0..128).map(|i| (i as f64).sin()).collect();
/// let mut y = x.clone();
/// r.forward_in_place(&mut y).unwrap();
/// r.inverse_in_place(&mut y).unwrap();
/// assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 1e-12));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Rotation {
    n: usize,
    kind: Kind,
}

impl Rotation {
    /// The normalized Hadamard `H_n` (n a power of two up to 2^15, or 12, 20, 28, 40 times one).
    pub fn hadamard(n: usize) -> Result<Self> {
        HadamardSize::new(n)?;
        Ok(Self {
            n,
            kind: Kind::Hadamard,
        })
    }

    /// Block-diagonal `diag(H_b, …, H_b)`; `b` a power of two (≤ 2^15) dividing `n`.
    pub fn block_hadamard(n: usize, block: usize) -> Result<Self> {
        if n == 0
            || block == 0
            || !block.is_power_of_two()
            || block > MAX_POW2
            || !n.is_multiple_of(block)
        {
            return Err(Error::InvalidBlock { n, block });
        }
        Ok(Self {
            n,
            kind: Kind::Block(block),
        })
    }

    /// `H (s ⊙ x)` with the SplitMix64 signs of `seed` (module docs).
    pub fn randomized(n: usize, seed: u64) -> Result<Self> {
        HadamardSize::new(n)?;
        Ok(Self {
            n,
            kind: Kind::Randomized {
                seed,
                signs: random_signs(n, seed),
            },
        })
    }

    /// An explicit orthogonal matrix (e.g. a checkpoint's R3), accepted when
    /// `max |R·Rᵀ − I| ≤` [`ORTHOGONALITY_TOLERANCE`].
    ///
    /// ```
    /// use ndarray::array;
    /// use rotq_reference::Rotation;
    /// assert!(Rotation::matrix(array![[0.0, 1.0], [1.0, 0.0]]).is_ok());
    /// assert!(Rotation::matrix(array![[1.0, 1.0], [0.0, 1.0]]).is_err());
    /// ```
    pub fn matrix(r: Array2<f64>) -> Result<Self> {
        Self::matrix_with_tolerance(r, ORTHOGONALITY_TOLERANCE)
    }

    /// [`Rotation::matrix`] with a caller-chosen tolerance (e.g. looser for a bf16-stored R).
    pub fn matrix_with_tolerance(r: Array2<f64>, tolerance: f64) -> Result<Self> {
        let (rows, cols) = r.dim();
        if rows != cols || rows == 0 {
            return Err(Error::NotSquare { rows, cols });
        }
        let deviation = orthogonality_deviation(&r);
        // A NaN deviation (R holds NaN/Inf) is refused too.
        if deviation.is_nan() || deviation > tolerance {
            return Err(Error::NotOrthogonal {
                deviation,
                tolerance,
            });
        }
        Ok(Self {
            n: rows,
            kind: Kind::Matrix(r),
        })
    }

    /// The vector length this rotation acts on.
    pub fn dim(&self) -> usize {
        self.n
    }

    /// What the rotation is, for kernels that implement it.
    ///
    /// ```
    /// use rotq_reference::rotation::{Rotation, RotationKind};
    /// let r = Rotation::block_hadamard(128, 64).unwrap();
    /// assert!(matches!(r.kind(), RotationKind::Block { block: 64 }));
    /// ```
    pub fn kind(&self) -> RotationKind<'_> {
        match &self.kind {
            Kind::Hadamard => RotationKind::Hadamard {
                size: HadamardSize::new(self.n).expect("validated when built"),
            },
            Kind::Block(b) => RotationKind::Block { block: *b },
            Kind::Randomized { seed, signs } => RotationKind::Randomized {
                size: HadamardSize::new(self.n).expect("validated when built"),
                seed: *seed,
                signs,
            },
            Kind::Matrix(r) => RotationKind::Matrix { r },
        }
    }

    /// The seed of a randomized rotation.
    pub fn seed(&self) -> Option<u64> {
        match &self.kind {
            Kind::Randomized { seed, .. } => Some(*seed),
            _ => None,
        }
    }

    fn check_len(&self, len: usize) -> Result<()> {
        if len == self.n {
            Ok(())
        } else {
            Err(Error::LengthMismatch {
                what: "rotated vector",
                expected: self.n,
                actual: len,
            })
        }
    }

    /// `x ← R x` in place.
    pub fn forward_in_place(&self, x: &mut [f64]) -> Result<()> {
        self.check_len(x.len())?;
        match &self.kind {
            Kind::Hadamard => hadamard::forward_in_place(x),
            Kind::Block(b) => x
                .chunks_exact_mut(*b)
                .try_for_each(hadamard::forward_in_place),
            Kind::Randomized { signs, .. } => {
                x.iter_mut().zip(signs).for_each(|(v, s)| *v *= s);
                hadamard::forward_in_place(x)
            }
            Kind::Matrix(r) => {
                let y = r.dot(&ArrayView1::from(&*x));
                x.copy_from_slice(y.as_slice().expect("a fresh 1-D array is contiguous"));
                Ok(())
            }
        }
    }

    /// `x ← R⁻¹ x = Rᵀ x` in place.
    pub fn inverse_in_place(&self, x: &mut [f64]) -> Result<()> {
        self.check_len(x.len())?;
        match &self.kind {
            Kind::Hadamard => hadamard::inverse_in_place(x),
            Kind::Block(b) => x
                .chunks_exact_mut(*b)
                .try_for_each(hadamard::inverse_in_place),
            Kind::Randomized { signs, .. } => {
                hadamard::inverse_in_place(x)?;
                x.iter_mut().zip(signs).for_each(|(v, s)| *v *= s);
                Ok(())
            }
            Kind::Matrix(r) => {
                let y = r.t().dot(&ArrayView1::from(&*x));
                x.copy_from_slice(y.as_slice().expect("a fresh 1-D array is contiguous"));
                Ok(())
            }
        }
    }

    /// Rotates every length-`n` row of `data` in place (`inverse` applies `Rᵀ`).
    ///
    /// ```
    /// use rotq_reference::Rotation;
    /// let r = Rotation::block_hadamard(4, 2).unwrap();
    /// let mut rows = vec![1.0, 1.0, 0.0, 2.0, /* second row */ 1.0, 0.0, 0.0, 0.0];
    /// r.rotate_rows(&mut rows, false).unwrap();
    /// let s = 1.0 / 2f64.sqrt();
    /// assert!((rows[0] - 2.0 * s).abs() < 1e-15 && (rows[3] + 2.0 * s).abs() < 1e-15);
    /// ```
    pub fn rotate_rows(&self, data: &mut [f64], inverse: bool) -> Result<()> {
        if !data.len().is_multiple_of(self.n) {
            return Err(Error::LengthMismatch {
                what: "rows (a multiple of the rotation's dimension)",
                expected: data.len().div_ceil(self.n) * self.n,
                actual: data.len(),
            });
        }
        data.chunks_exact_mut(self.n).try_for_each(|row| {
            if inverse {
                self.inverse_in_place(row)
            } else {
                self.forward_in_place(row)
            }
        })
    }

    /// The dense matrix `R` (rows are outputs), built by rotating the unit vectors.
    ///
    /// ```
    /// let r = rotq_reference::Rotation::hadamard(2).unwrap().to_matrix();
    /// assert!((r[[1, 1]] + 0.5f64.sqrt()).abs() < 1e-15);
    /// ```
    pub fn to_matrix(&self) -> Array2<f64> {
        if let Kind::Matrix(r) = &self.kind {
            return r.clone();
        }
        let mut m = Array2::zeros((self.n, self.n));
        let mut e = vec![0.0; self.n];
        for j in 0..self.n {
            e.iter_mut().for_each(|v| *v = 0.0);
            e[j] = 1.0;
            self.forward_in_place(&mut e)
                .expect("the unit vector has the rotation's length");
            m.column_mut(j).assign(&ArrayView1::from(&e[..]));
        }
        m
    }
}

/// `max |R·Rᵀ − I|` (NaN if `R` holds NaN).
pub fn orthogonality_deviation(r: &Array2<f64>) -> f64 {
    let g = r.dot(&r.t());
    g.indexed_iter().fold(0.0f64, |acc, ((i, j), v)| {
        let d = (v - if i == j { 1.0 } else { 0.0 }).abs();
        if d.is_nan() || acc.is_nan() {
            f64::NAN
        } else {
            acc.max(d)
        }
    })
}

impl fmt::Display for Rotation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Hadamard => write!(f, "hadamard({})", self.n),
            Kind::Block(b) => write!(f, "block-hadamard({}, block {b})", self.n),
            Kind::Randomized { seed, .. } => {
                write!(f, "randomized-hadamard({}, seed {seed})", self.n)
            }
            Kind::Matrix(_) => write!(f, "matrix({}x{})", self.n, self.n),
        }
    }
}

/// A rotation named without its dimension, as on the command line:
/// `none`, `hadamard`, `randomized:SEED`, `block:B`.
///
/// ```
/// use rotq_reference::RotationSpec;
/// let spec: RotationSpec = "block:64".parse().unwrap();
/// assert_eq!(spec, RotationSpec::Block(64));
/// assert_eq!(spec.build(128).unwrap().unwrap().dim(), 128);
/// assert!("block:x".parse::<RotationSpec>().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotationSpec {
    /// No rotation.
    None,
    /// [`Rotation::hadamard`].
    Hadamard,
    /// [`Rotation::randomized`] with this seed.
    Randomized(u64),
    /// [`Rotation::block_hadamard`] with this block.
    Block(usize),
}

impl RotationSpec {
    /// The rotation of dimension `n` (`None` for [`RotationSpec::None`]).
    pub fn build(self, n: usize) -> Result<Option<Rotation>> {
        Ok(match self {
            RotationSpec::None => None,
            RotationSpec::Hadamard => Some(Rotation::hadamard(n)?),
            RotationSpec::Randomized(seed) => Some(Rotation::randomized(n, seed)?),
            RotationSpec::Block(b) => Some(Rotation::block_hadamard(n, b)?),
        })
    }
}

impl FromStr for RotationSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::UnknownRotation(s.to_string());
        match s.split_once(':') {
            None if s == "none" => Ok(Self::None),
            None if s == "hadamard" => Ok(Self::Hadamard),
            Some(("randomized", seed)) => seed.parse().map(Self::Randomized).map_err(|_| bad()),
            Some(("block", b)) => b.parse().map(Self::Block).map_err(|_| bad()),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for RotationSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => write!(f, "none"),
            Self::Hadamard => write!(f, "hadamard"),
            Self::Randomized(seed) => write!(f, "randomized:{seed}"),
            Self::Block(b) => write!(f, "block:{b}"),
        }
    }
}
