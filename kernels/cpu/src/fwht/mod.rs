//! Batched in-place rotation of rows: the fast Walsh–Hadamard transform for every rotation of
//! the spec (`rotq_reference::hadamard`), and a matrix product for explicit matrices.
//!
//! * `2^k`: `log2 n` butterfly stages, normalization fused into the last one.
//! * `m·2^k`: the Sylvester stages on each of the `m` chunks, then the `m × m` ±1 mix across
//!   chunks (normalization fused); the inverse mixes with `Mᵀ`.
//! * randomized: the signs fused into the first pass (forward) or the last (inverse).
//! * block-diagonal: the power-of-two transform on each block.
//! * explicit `R`: `Y = X Rᵀ` with a blocked GEMM (`matrixmultiply`).
//!
//! Arithmetic is f32; f16 and bf16 rows are widened to f32 for the transform and rounded back
//! (nearest even) through [`Element`]. Rows are spread over rayon's threads in tasks of
//! [`FwhtConfig::rows_per_task`] rows.

mod avx2;
mod neon;
mod portable;

pub(crate) use portable::Post;

use crate::isa::Isa;
use crate::quant::Element;
use rayon::prelude::*;
use rotq_reference::hadamard;
use rotq_reference::rotation::{Rotation, RotationKind};
use rotq_reference::{Error, Result};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

/// Tuning knobs of the batched rotation.
///
/// ```
/// use rotq_cpu::FwhtConfig;
/// let c = FwhtConfig::for_dim(128);
/// assert_eq!(c.rows_per_task, 128); // 64 KiB of f32 per task
/// assert!(FwhtConfig::search_space(128).contains(&c));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FwhtConfig {
    /// Rows handed to a thread at a time.
    pub rows_per_task: usize,
}

impl FwhtConfig {
    /// The default: tasks of about 64 KiB of f32, so each stays in L2.
    pub fn for_dim(n: usize) -> Self {
        Self {
            rows_per_task: (16 * 1024 / n.max(1)).max(1),
        }
    }

    /// Candidates for the autotuner: tasks of 4 KiB to 1 MiB.
    pub fn search_space(n: usize) -> Vec<Self> {
        let mut v: Vec<Self> = (10..=18)
            .map(|log| Self {
                rows_per_task: ((1usize << log) / 4 / n.max(1)).max(1),
            })
            .collect();
        v.dedup();
        v
    }
}

/// How the rotation is carried out.
#[derive(Clone, Debug)]
enum Plan {
    /// `m·2^k` Hadamard (m = 1 for powers of two), randomized when `signs` is set.
    Hadamard {
        base: usize,
        pow2: usize,
        /// `M_m` and `M_mᵀ` as ±1 (empty for m = 1).
        mix: Vec<f32>,
        mix_t: Vec<f32>,
        signs: Option<Vec<f32>>,
        /// `signs / √n` (inverse of a randomized rotation).
        post_signs: Option<Vec<f32>>,
    },
    Block {
        block: usize,
    },
    Matrix {
        /// `R` row-major (rows are outputs).
        r: Vec<f32>,
    },
}

/// A rotation ready to run on rows of f32, f16 or bf16.
///
/// `Send` and `Sync`: threads may share one rotation and rotate their own rows at once (each
/// thread has its own scratch space).
///
/// ```
/// use rotq_cpu::{CpuRotation, Isa};
/// use rotq_reference::Rotation;
/// let r = CpuRotation::new(&Rotation::hadamard(4).unwrap(), Isa::best());
/// let mut rows = vec![1.0f32, 0.0, 0.0, 0.0, /* row 2 */ 0.0, 0.0, 0.0, 2.0];
/// r.forward_rows(&mut rows).unwrap();
/// assert_eq!(&rows[..4], &[0.5, 0.5, 0.5, 0.5]);
/// assert_eq!(&rows[4..], &[1.0, -1.0, -1.0, 1.0]);
/// ```
#[derive(Clone, Debug)]
pub struct CpuRotation {
    n: usize,
    plan: Plan,
    isa: Isa,
    config: FwhtConfig,
    /// The factor in place of the normalization (see [`CpuRotation::with_output_scale`]).
    output_scale: Option<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a thread-local f32 scratch buffer of at least `len` elements.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

impl CpuRotation {
    /// Prepares `rotation` for instruction set `isa` (which must be available; use
    /// [`Isa::best`]).
    pub fn new(rotation: &Rotation, isa: Isa) -> Self {
        let n = rotation.dim();
        let plan = match rotation.kind() {
            RotationKind::Hadamard { size } => hadamard_plan(size, None),
            RotationKind::Randomized { size, signs, .. } => hadamard_plan(size, Some(signs)),
            RotationKind::Block { block } => Plan::Block { block },
            RotationKind::Matrix { r } => Plan::Matrix {
                r: r.iter().map(|v| *v as f32).collect(),
            },
        };
        let isa = if isa.available() { isa } else { Isa::Portable };
        let bucket = crate::tuned::fwht_bucket(n);
        let config = crate::tuned::lookup("fwht_f32", &bucket, &FwhtConfig::search_space(n))
            .unwrap_or_else(|| FwhtConfig::for_dim(n));
        Self {
            n,
            plan,
            isa,
            config: FwhtConfig::for_dim(n),
            output_scale: None,
        }
        .with_config(config)
    }

    /// The same transform multiplied by `scale` in place of its normalization (`1/√n`, or
    /// `1/√block` for block rotations): the unnormalized Hadamard times `scale`, as Dao-AILab's
    /// `hadamard_transform(x, scale)` computes it. Sums of small integers stay exact with
    /// `scale = 1`, which a normalization undone afterwards would round. Forward Hadamard and
    /// block transforms only: a randomized inverse and a matrix keep their own factors.
    ///
    /// ```
    /// use rotq_cpu::{CpuRotation, Isa};
    /// use rotq_reference::Rotation;
    /// let r = CpuRotation::new(&Rotation::hadamard(8).unwrap(), Isa::best()).with_output_scale(1.0);
    /// let mut row = [1.0f32; 8];
    /// r.forward_rows(&mut row).unwrap();
    /// assert_eq!(row, [8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    /// ```
    pub fn with_output_scale(mut self, scale: f32) -> Self {
        self.output_scale = Some(scale);
        self
    }

    /// The tuning in force: the tuning cache's for this length, the default, or the last
    /// [`Self::with_config`].
    pub fn config(&self) -> FwhtConfig {
        self.config
    }

    /// The same rotation with another tuning.
    pub fn with_config(mut self, config: FwhtConfig) -> Self {
        // Clamped so that a stray (deserialized) value cannot overflow the task size.
        self.config = FwhtConfig {
            rows_per_task: config.rows_per_task.clamp(1, 1 << 20),
        };
        self
    }

    /// The vector length.
    pub fn dim(&self) -> usize {
        self.n
    }

    /// The instruction set in use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    fn check_rows(&self, len: usize) -> Result<()> {
        if !len.is_multiple_of(self.n) {
            return Err(Error::LengthMismatch {
                what: "rows (a multiple of the rotation's dimension)",
                expected: len.div_ceil(self.n) * self.n,
                actual: len,
            });
        }
        Ok(())
    }

    /// Rotates one row in place (`inverse` applies `Rᵀ`); `row.len()` must be `dim()`.
    pub(crate) fn apply_row(&self, row: &mut [f32], inverse: bool) {
        debug_assert_eq!(row.len(), self.n);
        let n = self.n;
        let scale = self.output_scale.unwrap_or_else(|| 1.0 / (n as f32).sqrt());
        match &self.plan {
            Plan::Hadamard {
                base,
                pow2,
                mix,
                mix_t,
                signs,
                post_signs,
            } => {
                let pre = if inverse { None } else { signs.as_deref() };
                let post = match (inverse, post_signs) {
                    (true, Some(ps)) => Post::Vector(ps),
                    _ => Post::Scale(scale),
                };
                if *base == 1 {
                    self.pow2(row, pre, post);
                } else {
                    if let Some(s) = pre {
                        row.iter_mut().zip(s).for_each(|(v, s)| *v *= s);
                    }
                    for chunk in row.chunks_exact_mut(*pow2) {
                        self.pow2(chunk, None, Post::Scale(1.0));
                    }
                    let signs = if inverse { mix_t } else { mix };
                    with_scratch(n, |y| {
                        self.mix(row, y, signs, *base, post);
                        row.copy_from_slice(y);
                    });
                }
            }
            Plan::Block { block } => {
                let s = self
                    .output_scale
                    .unwrap_or_else(|| 1.0 / (*block as f32).sqrt());
                for chunk in row.chunks_exact_mut(*block) {
                    self.pow2(chunk, None, Post::Scale(s));
                }
            }
            Plan::Matrix { r } => with_scratch(n, |y| {
                matrix_rows(r, n, row, y, 1, inverse);
                row.copy_from_slice(y);
            }),
        }
    }

    fn pow2(&self, x: &mut [f32], pre: Option<&[f32]>, post: Post<'_>) {
        match self.isa {
            // SAFETY: `CpuRotation::new` only keeps Avx2 when the CPU has it; `x` is a power of
            // two long and `pre`/`post` vectors have its length (built from the same size).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::fwht(x, pre, post) },
            // SAFETY: as above, for NEON.
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => unsafe { neon::fwht(x, pre, post) },
            _ => portable::fwht(x, pre, post),
        }
    }

    fn mix(&self, x: &[f32], y: &mut [f32], signs: &[f32], m: usize, post: Post<'_>) {
        match self.isa {
            // SAFETY: Avx2 is only kept when the CPU has it.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::mix(x, y, signs, m, post) },
            _ => portable::mix(x, y, signs, m, post),
        }
    }

    fn rows_f32(&self, data: &mut [f32], inverse: bool) -> Result<()> {
        self.check_rows(data.len())?;
        let task = self.config.rows_per_task * self.n;
        if let Plan::Matrix { r } = &self.plan {
            data.par_chunks_mut(task).for_each(|chunk| {
                let rows = chunk.len() / self.n;
                with_scratch(chunk.len(), |y| {
                    matrix_rows(r, self.n, chunk, y, rows, inverse);
                    chunk.copy_from_slice(y);
                })
            });
            return Ok(());
        }
        data.par_chunks_mut(task).for_each(|chunk| {
            for row in chunk.chunks_exact_mut(self.n) {
                self.apply_row(row, inverse);
            }
        });
        Ok(())
    }

    /// `x ← R x` for every row of `dim()` values.
    pub fn forward_rows(&self, data: &mut [f32]) -> Result<()> {
        self.rows_f32(data, false)
    }

    /// `x ← Rᵀ x` for every row.
    pub fn inverse_rows(&self, data: &mut [f32]) -> Result<()> {
        self.rows_f32(data, true)
    }

    /// Rotates rows stored as f16 or bf16 (any [`Element`]): widened to f32, rotated, rounded
    /// back to nearest even.
    ///
    /// ```
    /// use half::f16;
    /// use rotq_cpu::{CpuRotation, Isa};
    /// let r = CpuRotation::new(&rotq_reference::Rotation::hadamard(2).unwrap(), Isa::best());
    /// let mut x = [f16::from_f32(1.0), f16::from_f32(1.0)];
    /// r.rows(&mut x, false).unwrap();
    /// assert_eq!(x[1], f16::from_f32(0.0));
    /// ```
    pub fn rows<T: Element>(&self, data: &mut [T], inverse: bool) -> Result<()> {
        self.check_rows(data.len())?;
        let data = match T::as_f32_mut(data) {
            Some(f32s) => return self.rows_f32(f32s, inverse),
            None => data,
        };
        let n = self.n;
        data.par_chunks_mut(self.config.rows_per_task * n)
            .for_each(|chunk| {
                let mut row = vec![0.0f32; n];
                for h in chunk.chunks_exact_mut(n) {
                    T::widen(h, &mut row);
                    self.apply_row(&mut row, inverse);
                    T::narrow(&row, h);
                }
            });
        Ok(())
    }
}

fn hadamard_plan(size: hadamard::HadamardSize, signs: Option<&[f64]>) -> Plan {
    let m = size.base;
    let signs_of = |t: bool| -> Vec<f32> {
        if m == 1 {
            return Vec::new();
        }
        (0..m * m)
            .map(|i| {
                let (a, b) = (i / m, i % m);
                let (a, b) = if t { (b, a) } else { (a, b) };
                hadamard::base_sign(m, a, b) as f32
            })
            .collect()
    };
    let scale = 1.0 / (size.n as f64).sqrt();
    Plan::Hadamard {
        base: m,
        pow2: size.pow2,
        mix: signs_of(false),
        mix_t: signs_of(true),
        signs: signs.map(|s| s.iter().map(|v| *v as f32).collect()),
        post_signs: signs.map(|s| s.iter().map(|v| (v * scale) as f32).collect()),
    }
}

/// `Y = X Rᵀ` (or `X R` when `inverse`) for `rows` rows of `n`.
fn matrix_rows(r: &[f32], n: usize, x: &[f32], y: &mut [f32], rows: usize, inverse: bool) {
    // Y[i][a] = Σ_b X[i][b] R[a][b]: B = Rᵀ has strides (1, n); for the inverse B = R, (n, 1).
    let (rsb, csb) = if inverse {
        (n as isize, 1)
    } else {
        (1, n as isize)
    };
    // SAFETY: the pointers cover rows×n (x, y) and n×n (r) f32 values with the given strides,
    // and y does not alias x or r.
    unsafe {
        matrixmultiply::sgemm(
            rows,
            n,
            n,
            1.0,
            x.as_ptr(),
            n as isize,
            1,
            r.as_ptr(),
            rsb,
            csb,
            0.0,
            y.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}
