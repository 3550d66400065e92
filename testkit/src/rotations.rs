//! The rotations tests run for: each kind the spec defines, built for a head dimension.

use rotq_reference::{Rotation, RotationPlan};

/// A kind of rotation (see the spec in `rotq_reference::rotation`).
///
/// ```
/// use rotq_testkit::rotations::RotationKind;
/// assert!(RotationKind::None.build(64, 0).is_none());
/// for kind in RotationKind::ALL {
///     if let Some(r) = kind.build(96, 3) {
///         assert_eq!(r.dim(), 96);
///     }
/// }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotationKind {
    /// No rotation.
    None,
    /// The normalized Hadamard transform of the whole row.
    Hadamard,
    /// The randomized Hadamard transform (sign flips from the seed).
    Randomized,
    /// A block-diagonal Hadamard of blocks of 16 (or the largest power of two dividing the
    /// dimension, if smaller), as llama.cpp rotates V in blocks.
    Block,
    /// An explicit orthogonal matrix (the randomized Hadamard of `seed ^ 7`, as a matrix), as a
    /// checkpoint stores one.
    Matrix,
}

impl RotationKind {
    /// Every kind, [`RotationKind::None`] first.
    pub const ALL: [RotationKind; 5] = [
        Self::None,
        Self::Hadamard,
        Self::Randomized,
        Self::Block,
        Self::Matrix,
    ];

    /// The kinds that rotate.
    pub const ROTATING: [RotationKind; 4] =
        [Self::Hadamard, Self::Randomized, Self::Block, Self::Matrix];

    /// The `i`-th of [`Self::ALL`], modulo its length (for tests that draw a number).
    pub fn nth(i: usize) -> Self {
        Self::ALL[i % Self::ALL.len()]
    }

    /// This rotation of dimension `d` (seeded by `seed` where it is random); `None` for
    /// [`RotationKind::None`].
    ///
    /// # Panics
    /// Where the spec has no such rotation of `d` (a test's own mistake).
    pub fn build(self, d: usize, seed: u64) -> Option<Rotation> {
        let built = match self {
            Self::None => return None,
            Self::Hadamard => Rotation::hadamard(d),
            Self::Randomized => Rotation::randomized(d, seed),
            Self::Block => Rotation::block_hadamard(d, 16.min(d & d.wrapping_neg())),
            Self::Matrix => {
                Rotation::randomized(d, seed ^ 7).and_then(|r| Rotation::matrix(r.to_matrix()))
            }
        };
        Some(built.unwrap_or_else(|e| panic!("{self:?} of {d}: {e}")))
    }

    /// A plan rotating Q and K by `qk` and V by `v` (seeds `seed` and `seed ^ 1`).
    ///
    /// ```
    /// use rotq_testkit::rotations::RotationKind;
    /// let plan = RotationKind::plan(RotationKind::Hadamard, RotationKind::None, 64, 64, 0);
    /// assert!(plan.qk.is_some() && plan.v.is_none());
    /// ```
    pub fn plan(qk: Self, v: Self, d: usize, d_v: usize, seed: u64) -> RotationPlan {
        RotationPlan {
            qk: qk.build(d, seed),
            v: v.build(d_v, seed ^ 1),
        }
    }
}
