//! RoPE position shifts of cached keys, and the context shift of a rotated, quantized K cache.
//!
//! An engine that drops or moves tokens (llama.cpp's context shift) re-applies RoPE to the
//! cached keys: K at position `p` becomes K at `p + δ` by rotating each RoPE pair by `δ·θ_i`,
//! because RoPE's rotations compose. That is only true of the *unrotated* K: a Hadamard-rotated
//! key mixes every pair, so its cache is shifted by undoing the Hadamard rotation, shifting,
//! rotating again and re-quantizing ([`shift_cache`], the specification the kernels follow).
//!
//! ```
//! use rotq_reference::rope::{Rope, RopeVariant};
//! // Shifting by 3 then by -3 gives the row back.
//! let rope = Rope::new(RopeVariant::Neox, 64);
//! let x: Vec<f64> = (0..64).map(|i| (i as f64 * 0.7).sin()).collect();
//! let mut y = x.clone();
//! rope.shift_rows(&mut y, 3).unwrap();
//! rope.shift_rows(&mut y, -3).unwrap();
//! assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 1e-12));
//! ```

use crate::error::{Error, Result};
use crate::format::KvFormat;
use crate::rotation::Rotation;

/// Which dimensions RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeVariant {
    /// Adjacent pairs `(2i, 2i + 1)` (llama.cpp's default, GPT-J style).
    Normal,
    /// Halves `(i, i + dims / 2)` (GPT-NeoX style: Llama in Hugging Face layout, Qwen, …).
    Neox,
}

/// A RoPE definition: `θ_i = freq_scale · freq_base^(-2i / dims)` for the pairs `i < dims / 2`
/// of the first `dims` values of a head (llama.cpp's `n_rot`); values past `dims` are not
/// rotated.
///
/// ```
/// use rotq_reference::rope::{Rope, RopeVariant};
/// let rope = Rope { freq_base: 500_000.0, ..Rope::new(RopeVariant::Normal, 128) };
/// assert_eq!(rope.dims, 128);
/// assert!(rope.check(128).is_ok());
/// assert!(rope.check(64).is_err()); // more rotated dims than the head has
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    /// Pairing of the dimensions.
    pub variant: RopeVariant,
    /// Rotated dimensions (even, at most the head dimension).
    pub dims: usize,
    /// Base of the frequencies (10,000 in the original RoPE).
    pub freq_base: f64,
    /// Linear position scale (1 without position interpolation).
    pub freq_scale: f64,
}

impl Rope {
    /// `variant` over all `dims` values of a head, base 10,000, scale 1.
    pub fn new(variant: RopeVariant, dims: usize) -> Self {
        Self {
            variant,
            dims,
            freq_base: 10_000.0,
            freq_scale: 1.0,
        }
    }

    /// Checks that this RoPE applies to rows of `dim` values.
    pub fn check(&self, dim: usize) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::InvalidParameter {
                name: "rope",
                reason,
            })
        };
        if self.dims == 0 || !self.dims.is_multiple_of(2) || self.dims > dim {
            return bad(format!(
                "rotated dims {} must be even, positive and at most the head dimension {dim}",
                self.dims
            ));
        }
        if !(self.freq_base.is_finite() && self.freq_base > 0.0) {
            return bad(format!(
                "freq_base {} must be finite and positive",
                self.freq_base
            ));
        }
        if !(self.freq_scale.is_finite() && self.freq_scale > 0.0) {
            return bad(format!(
                "freq_scale {} must be finite and positive",
                self.freq_scale
            ));
        }
        Ok(())
    }

    /// `(cos, sin)` of the angle `delta · θ_i` of each pair `i < dims / 2`.
    pub fn angles(&self, delta: i64) -> Vec<(f64, f64)> {
        (0..self.dims / 2)
            .map(|i| {
                let theta =
                    self.freq_scale * self.freq_base.powf(-2.0 * i as f64 / self.dims as f64);
                let a = delta as f64 * theta;
                (a.cos(), a.sin())
            })
            .collect()
    }

    /// The two dimensions of pair `i`.
    pub fn pair(&self, i: usize) -> (usize, usize) {
        match self.variant {
            RopeVariant::Normal => (2 * i, 2 * i + 1),
            RopeVariant::Neox => (i, i + self.dims / 2),
        }
    }

    /// Moves unrotated keys (rows of `dims`' head dimension, consecutive) by `delta`
    /// positions: each pair `(x, y)` becomes `(x cos − y sin, x sin + y cos)`. The head
    /// dimension is taken as `rows.len()` when it holds one row; use
    /// [`Self::shift_rows_of`] for several.
    pub fn shift_rows(&self, rows: &mut [f64], delta: i64) -> Result<()> {
        self.shift_rows_of(rows, rows.len(), delta)
    }

    /// [`Self::shift_rows`] for rows of `dim` values.
    pub fn shift_rows_of(&self, rows: &mut [f64], dim: usize, delta: i64) -> Result<()> {
        self.check(dim)?;
        if !rows.len().is_multiple_of(dim) {
            return Err(Error::LengthMismatch {
                what: "rows (a multiple of the head dimension)",
                expected: rows.len().div_ceil(dim) * dim,
                actual: rows.len(),
            });
        }
        let angles = self.angles(delta);
        for row in rows.chunks_exact_mut(dim) {
            self.turn(row, &angles);
        }
        Ok(())
    }

    /// Turns each pair of one row by its angle (`angles` from [`Self::angles`]).
    fn turn(&self, row: &mut [f64], angles: &[(f64, f64)]) {
        for (i, &(c, s)) in angles.iter().enumerate() {
            let (a, b) = self.pair(i);
            let (x, y) = (row[a], row[b]);
            row[a] = x * c - y * s;
            row[b] = x * s + y * c;
        }
    }
}

/// The context shift of one K cache in `format` (whole rows of `dim` values, rotated by
/// `rotation` before they were quantized): every row moves by `delta` positions. Each row is
/// dequantized, rotated back (in f64), shifted by `rope`, rotated again, rounded to f32 and
/// quantized in place, so the result equals the rotation of the shifted keys within one
/// re-quantization.
///
/// ```
/// use rotq_reference::rope::{shift_cache, Rope, RopeVariant};
/// use rotq_reference::{KvFormat, Rotation};
/// let r = Rotation::hadamard(64).unwrap();
/// let mut x: Vec<f64> = (0..128).map(|i| (i as f64 * 0.37).cos()).collect();
/// r.rotate_rows(&mut x, false).unwrap();
/// let x32: Vec<f32> = x.iter().map(|v| *v as f32).collect();
/// let mut cache = vec![0u8; 2 * KvFormat::Q8_0.row_bytes(64).unwrap()];
/// KvFormat::Q8_0.quantize_into(&x32, &mut cache).unwrap();
/// shift_cache(KvFormat::Q8_0, &mut cache, 64, Some(&r), &Rope::new(RopeVariant::Neox, 64), 5).unwrap();
/// ```
pub fn shift_cache(
    format: KvFormat,
    cache: &mut [u8],
    dim: usize,
    rotation: Option<&Rotation>,
    rope: &Rope,
    delta: i64,
) -> Result<()> {
    rope.check(dim)?;
    if let Some(r) = rotation {
        if r.dim() != dim {
            return Err(Error::InvalidParameter {
                name: "rotation",
                reason: format!("a rotation of {} values for rows of {dim}", r.dim()),
            });
        }
    }
    let row_bytes = format.row_bytes(dim)?;
    if !cache.len().is_multiple_of(row_bytes) {
        return Err(Error::TruncatedBuffer {
            format: format.name(),
            row_bytes,
            actual: cache.len(),
        });
    }
    let angles = rope.angles(delta);
    for row in cache.chunks_exact_mut(row_bytes) {
        let mut x: Vec<f64> = format
            .dequantize_row(row)?
            .into_iter()
            .map(f64::from)
            .collect();
        if let Some(r) = rotation {
            r.rotate_rows(&mut x, true)?;
        }
        rope.turn(&mut x, &angles);
        if let Some(r) = rotation {
            r.rotate_rows(&mut x, false)?;
        }
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        format.quantize_into(&x32, row)?;
    }
    Ok(())
}
