//! Seeded test data: one generator, with named rules for the outliers that make rotation
//! worth testing. Never all zero (a test on zeros proves nothing); the same seed gives the
//! same values on every machine (SplitMix64, the generator the spec documents).

use rotq_reference::rotation::SplitMix64;

/// How the values are drawn: uniform in `[-scale, scale)`, then shaped by [`Dist`].
///
/// ```
/// use rotq_testkit::data::{Dist, Rows};
/// let x = Rows::outliers().f32s(64, 1);
/// assert_eq!(x, Rows::outliers().f32s(64, 1)); // deterministic
/// assert!(x.iter().any(|v| v.abs() > 1.0)); // the outliers
/// let y = Rows::uniform(0.5).f64s(1000, 2);
/// assert!(y.iter().all(|v| (-0.5..0.5).contains(v)));
/// assert_eq!(Rows { scale: 1.0, dist: Dist::Uniform }, Rows::uniform(1.0));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rows {
    /// Half-width of the uniform draw.
    pub scale: f32,
    /// The shape added to it.
    pub dist: Dist,
}

/// The named shapes of test data.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dist {
    /// Uniform values, nothing else.
    Uniform,
    /// The value at every index `i` with `i % period == at` multiplied by `factor`: a few
    /// channels far larger than the rest, as in LLM keys (what rotation is for).
    Every {
        /// Distance between outliers.
        period: usize,
        /// Index of the first one.
        at: usize,
        /// How much larger they are.
        factor: f32,
    },
    /// What stresses a quantizer: magnitudes spread over 2⁻¹²..2¹² value by value, exact
    /// zeros, outliers 40 times the local scale, and values on rounding ties (k + ½).
    Stress,
}

impl Rows {
    /// Uniform in `[-scale, scale)`.
    pub const fn uniform(scale: f32) -> Self {
        Self {
            scale,
            dist: Dist::Uniform,
        }
    }

    /// Uniform in `[-1, 1)` with an outlier 20 times larger every 31 values: the cache tests'
    /// default.
    pub const fn outliers() -> Self {
        Self::uniform(1.0).every(31, 7, 20.0)
    }

    /// These values with every `period`-th one (from `at`) multiplied by `factor`.
    pub const fn every(self, period: usize, at: usize, factor: f32) -> Self {
        Self {
            dist: Dist::Every { period, at, factor },
            ..self
        }
    }

    /// The quantizer stress rule ([`Dist::Stress`]).
    pub const fn stress() -> Self {
        Self {
            scale: 1.0,
            dist: Dist::Stress,
        }
    }

    /// `len` values as f32, from `seed`.
    pub fn f32s(&self, len: usize, seed: u64) -> Vec<f32> {
        let mut g = SplitMix64::new(seed);
        (0..len)
            .map(|i| match self.dist {
                Dist::Uniform => unit(&mut g) as f32 * self.scale,
                Dist::Every { period, at, factor } => {
                    let v = unit(&mut g) as f32 * self.scale;
                    if i % period == at {
                        v * factor
                    } else {
                        v
                    }
                }
                Dist::Stress => {
                    let scale = self.scale * 2f32.powi((g.next_u64() % 24) as i32 - 12);
                    let v = unit(&mut g) as f32 * scale;
                    match g.next_u64() % 64 {
                        0 => 0.0,
                        1 => 40.0 * scale,
                        2 => (i % 17) as f32 + 0.5,
                        _ => v,
                    }
                }
            })
            .collect()
    }

    /// `len` values as f64, from `seed` (drawn in f64: not the f32 values widened).
    pub fn f64s(&self, len: usize, seed: u64) -> Vec<f64> {
        let mut g = SplitMix64::new(seed);
        let scale = f64::from(self.scale);
        (0..len)
            .map(|i| {
                let v = unit(&mut g) * scale;
                match self.dist {
                    Dist::Every { period, at, factor } if i % period == at => v * f64::from(factor),
                    Dist::Stress => panic!("the stress rule is for f32 quantizer inputs"),
                    _ => v,
                }
            })
            .collect()
    }
}

/// Uniform in [-1, 1).
fn unit(g: &mut SplitMix64) -> f64 {
    g.next_f64() * 2.0 - 1.0
}
