//! `rotq.oracle`: the f64 reference of the spec (rotations, formats, attention), so that users
//! check their own kernels against what rotq's kernels are checked against.

use crate::arrays::{Array, DType};
use crate::errors::{invalid, reference};
use crate::{format, rotations};
use ndarray::{ArrayView2, ArrayView3};
use pyo3::prelude::*;
use rotq::reference::{attention_f64_masked, KvCacheSpec};
use rotq::{AttentionParams, Rotation, RotationPlan};

/// The 3-D shape of `a`, or an error naming `what`.
fn dims3(a: &Array, what: &str) -> PyResult<(usize, usize, usize)> {
    match a.shape() {
        [x, y, z] => Ok((*x, *y, *z)),
        s => Err(invalid(format!("{what}: shape {s:?}, expected 3 axes"))),
    }
}

/// `a` as a 3-D view of `T`.
fn view<'a, T: crate::arrays::Elem>(a: &'a Array, what: &str) -> PyResult<ArrayView3<'a, T>> {
    ArrayView3::from_shape(dims3(a, what)?, a.slice::<T>()?)
        .map_err(|e| invalid(format!("{what}: {e}")))
}

/// The normalized Hadamard matrix of size `n` (the spec's `H_n`), written into `out`
/// (`[n, n]` f64).
#[pyfunction]
fn oracle_hadamard(out: &Bound<'_, PyAny>, n: usize) -> PyResult<()> {
    let mut out = Array::import(out, "out", &[DType::F64])?;
    out.expect_shape(&[n, n], "[n, n]")?;
    let m = Rotation::hadamard(n).map_err(reference)?.to_matrix();
    out.fill_f64(m.iter())
}

/// `x` (f64, rows over the last axis) rotated in f64 into `out` (f64, same shape).
#[pyfunction]
#[pyo3(signature = (x, out, rotation, inverse=false))]
fn oracle_rotate(
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    rotation: &Bound<'_, PyAny>,
    inverse: bool,
) -> PyResult<()> {
    let x = Array::import(x, "x", &[DType::F64])?;
    let mut out = Array::import(out, "out", &[DType::F64])?;
    out.expect_shape(x.shape(), "the shape of x")?;
    crate::arrays::copy_into(&x, &mut out)?;
    if let Some(r) = rotations::parse(Some(rotation), x.last_dim())? {
        r.rotate_rows(out.slice_mut::<f64>()?, inverse)
            .map_err(reference)?;
    }
    Ok(())
}

/// Rows of `x` (f32) encoded by the format's reference codec into `out` (uint8).
#[pyfunction]
fn oracle_quantize(
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    format_name: &str,
) -> PyResult<()> {
    let f = format(format_name)?;
    let x = Array::import(x, "x", &[DType::F32])?;
    let mut out = Array::import(out, "out", &[DType::U8])?;
    let (dim, rb) = crate::check_row_bytes(f, &x, &out, "rows x row_bytes")?;
    let xs = x.slice::<f32>()?;
    for (row, o) in xs
        .chunks_exact(dim)
        .zip(out.slice_mut::<u8>()?.chunks_exact_mut(rb))
    {
        f.quantize_into(row, o).map_err(reference)?;
    }
    Ok(())
}

/// Cache bytes decoded by the format's reference codec into `out` (f32; last axis: values).
#[pyfunction]
fn oracle_dequantize(
    data: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    format_name: &str,
) -> PyResult<()> {
    let f = format(format_name)?;
    let data = Array::import(data, "data", &[DType::U8])?;
    let mut out = Array::import(out, "out", &[DType::F32])?;
    let (dim, rb) = crate::check_row_bytes(f, &out, &data, "rows x row_bytes")?;
    let bytes = data.slice::<u8>()?;
    for (b, o) in bytes
        .chunks_exact(rb)
        .zip(out.slice_mut::<f32>()?.chunks_exact_mut(dim))
    {
        f.dequantize_into(b, o).map_err(reference)?;
    }
    Ok(())
}

/// Exact attention in f64: `q` [n_q, h_q, d], `k` [n_kv, h_kv, d], `v` [n_kv, h_kv, d_v]
/// (f64) into `out` [n_q, h_q, d_v] and `lse` [n_q, h_q] (f64), with an optional additive
/// `mask` [n_q, n_kv] (f64).
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, causal=false, pos_offset=0, scale=None, window=None,
    softcap=None, mask=None))]
#[allow(clippy::too_many_arguments)]
fn oracle_attention(
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    causal: bool,
    pos_offset: usize,
    scale: Option<f64>,
    window: Option<usize>,
    softcap: Option<f64>,
    mask: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let f64s = [DType::F64];
    let (q, k, v) = (
        Array::import(q, "q", &f64s)?,
        Array::import(k, "k", &f64s)?,
        Array::import(v, "v", &f64s)?,
    );
    let mask = crate::arrays::import_opt(mask, "mask", &f64s)?;
    let (mut out, mut lse) = (
        Array::import(out, "out", &f64s)?,
        Array::import(lse, "lse", &f64s)?,
    );
    let (qv, kv, vv) = (
        view::<f64>(&q, "q")?,
        view::<f64>(&k, "k")?,
        view::<f64>(&v, "v")?,
    );
    let mv = match &mask {
        Some(m) => {
            let (r, c) = match m.shape() {
                [r, c] => (*r, *c),
                s => return Err(invalid(format!("mask: shape {s:?}, expected [n_q, n_kv]"))),
            };
            Some(
                ArrayView2::from_shape((r, c), m.slice::<f64>()?)
                    .map_err(|e| invalid(e.to_string()))?,
            )
        }
        None => None,
    };
    let params = AttentionParams {
        scale,
        causal,
        pos_offset,
        window,
        softcap,
    };
    let a = attention_f64_masked(qv, kv, vv, &params, mv).map_err(reference)?;
    out.expect_len(a.output.len(), "[n_q, h_q, d_v]")?;
    lse.expect_len(a.lse.len(), "[n_q, h_q]")?;
    out.fill_f64(a.output.iter())?;
    lse.fill_f64(a.lse.iter())
}

/// The spec's rotated, quantized attention (the cache's reference): `q`, `k`, `v` (f32) as in
/// `oracle_attention`, K and V rotated and quantized in the formats, into `out` (f64).
#[pyfunction]
#[pyo3(signature = (q, k, v, out, k_format, v_format, qk_rotation=None, v_rotation=None,
    causal=false, pos_offset=0, scale=None, window=None, softcap=None))]
#[allow(clippy::too_many_arguments)]
fn oracle_rotated_quantized_attention(
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    k_format: &str,
    v_format: &str,
    qk_rotation: Option<&Bound<'_, PyAny>>,
    v_rotation: Option<&Bound<'_, PyAny>>,
    causal: bool,
    pos_offset: usize,
    scale: Option<f64>,
    window: Option<usize>,
    softcap: Option<f64>,
) -> PyResult<()> {
    let f32s = [DType::F32];
    let (q, k, v) = (
        Array::import(q, "q", &f32s)?,
        Array::import(k, "k", &f32s)?,
        Array::import(v, "v", &f32s)?,
    );
    let mut out = Array::import(out, "out", &[DType::F64])?;
    let spec = KvCacheSpec {
        k_format: format(k_format)?,
        v_format: format(v_format)?,
        plan: RotationPlan {
            qk: rotations::parse(qk_rotation, k.last_dim())?,
            v: rotations::parse(v_rotation, v.last_dim())?,
        },
    };
    let params = AttentionParams {
        scale,
        causal,
        pos_offset,
        window,
        softcap,
    };
    let a = rotq::rotated_quantized_attention(
        view::<f32>(&q, "q")?,
        view::<f32>(&k, "k")?,
        view::<f32>(&v, "v")?,
        &params,
        &spec,
    )
    .map_err(reference)?;
    out.expect_len(a.output.len(), "[n_q, h_q, d_v]")?;
    out.fill_f64(a.output.iter())
}

/// Adds the oracle's functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(oracle_hadamard, m)?)?;
    m.add_function(wrap_pyfunction!(oracle_rotate, m)?)?;
    m.add_function(wrap_pyfunction!(oracle_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(oracle_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(oracle_attention, m)?)?;
    m.add_function(wrap_pyfunction!(oracle_rotated_quantized_attention, m)?)?;
    Ok(())
}
