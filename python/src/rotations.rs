//! Rotations from Python: the CLI's strings (`none`, `hadamard`, `block:B`, `randomized:SEED`)
//! or an explicit orthogonal matrix, and back; and Dao-AILab's `hadamard_transform` semantics
//! over rotq's normalized transforms.

use crate::arrays::{Array, DType, Elem};
use crate::errors::{invalid, reference};
use ndarray::Array2;
use pyo3::prelude::*;
use pyo3::types::PyString;
use rotq::{Rotation, RotationSpec};
use rotq_cpu::{CpuRotation, Element, Isa};
use rotq_reference::hadamard::base_sign;
use rotq_reference::rotation::RotationKind;

/// The rotation `obj` names for rows of `dim` values: `None` (or `"none"`) for none, a string
/// as on the command line, or a `[dim, dim]` float array (an orthogonal matrix, rows are
/// outputs).
pub fn parse(obj: Option<&Bound<'_, PyAny>>, dim: usize) -> PyResult<Option<Rotation>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    if obj.is_instance_of::<PyString>() {
        let spec: RotationSpec = obj.extract::<String>()?.parse().map_err(reference)?;
        return spec.build(dim).map_err(reference);
    }
    let m = Array::import(obj, "rotation", &[DType::F64, DType::F32])?;
    m.expect_shape(&[dim, dim], "a square matrix over the rows' length")?;
    let values: Vec<f64> = match m.dtype() {
        DType::F64 => m.slice::<f64>()?.to_vec(),
        _ => m.slice::<f32>()?.iter().map(|&v| f64::from(v)).collect(),
    };
    let r = Array2::from_shape_vec((dim, dim), values).map_err(|e| invalid(e.to_string()))?;
    Rotation::matrix(r).map(Some).map_err(reference)
}

/// A rotation as [`parse`] reads it back: None, a string, or an f64 NumPy matrix.
pub fn describe<'py>(py: Python<'py>, r: Option<&Rotation>) -> PyResult<Bound<'py, PyAny>> {
    let Some(r) = r else {
        return Ok(py.None().into_bound(py));
    };
    let text = match r.kind() {
        RotationKind::Hadamard { .. } => "hadamard".to_string(),
        RotationKind::Block { block } => format!("block:{block}"),
        RotationKind::Randomized { seed, .. } => format!("randomized:{seed}"),
        RotationKind::Matrix { r } => {
            let n = r.nrows();
            let (obj, mut arr) = crate::pool::numpy_empty(py, &[n, n], "float64")?;
            arr.fill_f64(r.iter())?;
            return Ok(obj);
        }
    };
    Ok(PyString::new(py, &text).into_any())
}

/// Rows processed at once by [`DaoTransform::apply`] where rows are padded (to the
/// transform's size): bounds the scratch memory whatever the input's size.
const CHUNK_VALUES: usize = 1 << 20;

/// Dao-AILab's `hadamard_transform{,_12N,_20N,_28N,_40N}(x, scale)` for rows of `dim` values:
/// `scale · (M_base ⊗ H_p) · pad(x)`, unnormalized, cut back to `dim` values; `p` is the
/// smallest power of two with `base · p ≥ dim`. The kernel computes the unnormalized
/// transform itself ([`CpuRotation::with_output_scale`]), so integer results are exact, as
/// Dao's are.
pub struct DaoTransform {
    dim: usize,
    n: usize,
    /// rotq's transform of size `n` (blocks of `p` where [`Self::mix`] is set), scaled by
    /// `scale` (by 1 where the mixing follows) instead of normalized.
    kernel: CpuRotation,
    /// `(m, p)`: the `M_m` mixing across blocks that rotq's own `m·2^k` size does not pick
    /// (Dao's `20N` at a multiple of 40, where rotq takes the base 40).
    mix: Option<(usize, usize)>,
    scale: f32,
}

impl DaoTransform {
    /// The transform for rows of `dim` values over `base` (1, 12, 20, 28 or 40).
    pub fn new(dim: usize, base: usize, scale: f64) -> PyResult<Self> {
        if ![1, 12, 20, 28, 40].contains(&base) {
            return Err(invalid(format!(
                "base: {base} is not one of 1, 12, 20, 28, 40"
            )));
        }
        if !scale.is_finite() {
            return Err(invalid(format!("scale: {scale} is not finite")));
        }
        let p = dim.max(1).div_ceil(base).next_power_of_two();
        let n = base * p;
        let scale = scale as f32;
        let (rotation, mix, kernel_scale) = if base == 20 && p >= 2 {
            (Rotation::block_hadamard(n, p), Some((20, p)), 1.0)
        } else {
            (Rotation::hadamard(n), None, scale)
        };
        let rotation = rotation.map_err(reference)?;
        Ok(Self {
            dim,
            n,
            kernel: CpuRotation::new(&rotation, Isa::best()).with_output_scale(kernel_scale),
            mix,
            scale,
        })
    }

    /// Transforms every row of `data` (rows of `dim` values) in place.
    pub fn apply<T: Element + Elem>(&self, data: &mut [T]) -> PyResult<()> {
        let (dim, n) = (self.dim, self.n);
        if dim == 0 || data.is_empty() {
            return Ok(());
        }
        if dim == n && self.mix.is_none() {
            // Rows of the transform's own length: in place.
            return self.kernel.rows(data, false).map_err(reference);
        }
        let rows_per_chunk = (CHUNK_VALUES / n).max(1);
        let mut buf = vec![0f32; rows_per_chunk.min(data.len() / dim) * n];
        let mut mixed = vec![0f32; if self.mix.is_some() { n } else { 0 }];
        for chunk in data.chunks_mut(rows_per_chunk * dim) {
            let rows = chunk.len() / dim;
            let buf = &mut buf[..rows * n];
            for (src, dst) in chunk.chunks_exact(dim).zip(buf.chunks_exact_mut(n)) {
                T::widen(src, &mut dst[..dim]);
                dst[dim..].fill(0.0);
            }
            self.kernel.forward_rows(buf).map_err(reference)?;
            for (dst, row) in chunk.chunks_exact_mut(dim).zip(buf.chunks_exact_mut(n)) {
                if let Some((m, p)) = self.mix {
                    mix_blocks(row, &mut mixed, m, p);
                    for (r, v) in row.iter_mut().zip(&mixed) {
                        *r = v * self.scale;
                    }
                }
                T::narrow(&row[..dim], dst);
            }
        }
        Ok(())
    }
}

/// `out = (M_m ⊗ I_p) z`: the (unnormalized) base matrix across the `m` blocks of `p` values.
fn mix_blocks(z: &[f32], out: &mut [f32], m: usize, p: usize) {
    for a in 0..m {
        let o = &mut out[a * p..(a + 1) * p];
        o.fill(0.0);
        for c in 0..m {
            let s = base_sign(m, a, c) as f32;
            for (d, v) in o.iter_mut().zip(&z[c * p..(c + 1) * p]) {
                *d += s * v;
            }
        }
    }
}
