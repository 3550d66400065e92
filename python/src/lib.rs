//! `rotq._rotq`: the Python bindings of rotq's engine library (the package `rotq` wraps them;
//! see `python/rotq/__init__.py` and docs/python.md).
//!
//! Thin over the Rust API: arrays come in through DLPack ([`arrays`]) and every result is
//! written into an array the caller (or the Python layer) passes, so no call copies more than
//! its output. Kernels run with the GIL released.

mod arrays;
#[cfg(feature = "cuda")]
mod cuda;
mod errors;
mod oracle;
mod pool;
mod rotations;

use arrays::{copy_into, with_float, Array, DType};
use errors::{invalid, reference, to_py};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use rayon::prelude::*;
use rotq::KvFormat;
use rotq_cpu::{CacheCodec, CpuRotation, Isa};

/// The float dtypes the kernels take.
pub(crate) const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::Bf16];

/// A registry format by name (`q4_0`, …), or the library's error.
pub(crate) fn format(name: &str) -> PyResult<KvFormat> {
    name.parse::<KvFormat>().map_err(reference)
}

/// Checks that `bytes` holds `values`' rows (their last axis) in format `f`, `what` naming the
/// expected length in the error; gives the row length and its bytes. The one check of every
/// quantize and dequantize binding, the kernels' and the oracle's.
pub(crate) fn check_row_bytes(
    f: KvFormat,
    values: &Array,
    bytes: &Array,
    what: &str,
) -> PyResult<(usize, usize)> {
    let dim = values.last_dim();
    let rb = f.row_bytes(dim).map_err(reference)?;
    let rows = values.len().checked_div(dim).unwrap_or(0);
    bytes.expect_len(rows * rb, what)?;
    Ok((dim, rb))
}

/// The format registry: one dict per format (name, block_size, block_bytes, bits_per_value,
/// origin, scaled, row_format: a TurboQuant format whose unit is a whole row).
#[pyfunction]
fn formats(py: Python<'_>) -> PyResult<Vec<Bound<'_, PyDict>>> {
    KvFormat::ALL
        .iter()
        .map(|&f| {
            let info = f.info();
            let d = PyDict::new(py);
            d.set_item("name", info.name)?;
            d.set_item("block_size", info.block_size)?;
            d.set_item("block_bytes", info.block_bytes)?;
            // TurboQuant row formats: a whole row is the unit (`block_size` 8, `block_bytes` 0).
            d.set_item("row_format", info.row.is_some())?;
            d.set_item("bits_per_value", f.bits_per_value())?;
            d.set_item("origin", info.origin)?;
            d.set_item("scaled", info.scaled)?;
            Ok(d)
        })
        .collect()
}

/// Bytes of one row of `dim` values in `format`.
#[pyfunction]
fn row_bytes(format_name: &str, dim: usize) -> PyResult<usize> {
    format(format_name)?.row_bytes(dim).map_err(reference)
}

/// Values a row-wise call copies and transforms at once (256 KiB of f32): each piece is
/// copied from `x` into `out` and transformed while it is in the cache, instead of a whole-array
/// copy followed by a second pass.
const PIECE_VALUES: usize = 1 << 16;

/// Runs the row-wise transform `f` (rows of `dim` values) over `x`'s elements as `T` into `out`:
/// in place when they are the same array, else piece by piece in parallel, each piece copied
/// and then transformed. An `out` that partly overlaps `x` is refused.
fn rowwise<T: arrays::Elem + rotq_cpu::Element>(
    py: Python<'_>,
    x: &Array,
    out: &mut Array,
    dim: usize,
    f: impl Fn(&mut [T]) -> PyResult<()> + Send + Sync,
) -> PyResult<()> {
    if x.same_memory(out) {
        let data = out.slice_mut::<T>()?;
        return py.detach(|| f(data));
    }
    if x.overlaps(out) {
        return Err(invalid("out: overlaps x without being x".into()));
    }
    let src = x.slice::<T>()?;
    let dst = out.slice_mut::<T>()?;
    let piece = (PIECE_VALUES / dim.max(1)).max(1) * dim.max(1);
    py.detach(|| {
        dst.par_chunks_mut(piece)
            .zip(src.par_chunks(piece))
            .try_for_each(|(o, i)| {
                o.copy_from_slice(i);
                f(o)
            })
    })
}

/// `out = R x` (or `Rᵀ x`) over the last axis of `x` (f32, f16 or bf16; `out` of the same
/// dtype and shape, or `x` itself).
#[pyfunction]
#[pyo3(signature = (x, out, rotation, inverse=false))]
fn rotate(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    rotation: &Bound<'_, PyAny>,
    inverse: bool,
) -> PyResult<()> {
    let x = Array::import(x, "x", &FLOATS)?;
    let mut out = Array::import(out, "out", &FLOATS)?;
    out.expect_shape(x.shape(), "the shape of x")?;
    let Some(r) = rotations::parse(Some(rotation), x.last_dim())? else {
        return copy_into(&x, &mut out);
    };
    let kernel = CpuRotation::new(&r, Isa::best());
    let dim = x.last_dim();
    with_float!(x.dtype(), T => rowwise::<T>(py, &x, &mut out, dim, |d| {
        kernel.rows(d, inverse).map_err(reference)
    }))
}

/// Dao-AILab's `hadamard_transform(x, scale)` family: `out = scale · (M_base ⊗ H_2^k) x` over
/// the last axis, unnormalized, `x` zero-padded to the transform's size and the output cut
/// back to `x`'s length.
#[pyfunction]
#[pyo3(signature = (x, out, scale=1.0, base=1))]
fn hadamard_transform(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    scale: f64,
    base: usize,
) -> PyResult<()> {
    let x = Array::import(x, "x", &FLOATS)?;
    let mut out = Array::import(out, "out", &FLOATS)?;
    out.expect_shape(x.shape(), "the shape of x")?;
    let dim = x.last_dim();
    let t = rotations::DaoTransform::new(dim, base, scale)?;
    with_float!(x.dtype(), T => rowwise::<T>(py, &x, &mut out, dim, |d| t.apply(d)))
}

/// The rows of `x` (last axis: values) rotated and quantized into `out` (uint8,
/// `rows · row_bytes`).
#[pyfunction]
#[pyo3(signature = (x, out, format_name, rotation=None))]
fn quantize(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    format_name: &str,
    rotation: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let f = format(format_name)?;
    let x = Array::import(x, "x", &FLOATS)?;
    let mut out = Array::import(out, "out", &[DType::U8])?;
    if x.overlaps(&out) {
        return Err(invalid("out: shares memory with x".into()));
    }
    let (dim, _) = check_row_bytes(f, &x, &out, "rows x row_bytes")?;
    let r = rotations::parse(rotation, dim)?;
    let codec = CacheCodec::new(f, dim, r.as_ref(), Isa::best()).map_err(reference)?;
    let bytes = out.slice_mut::<u8>()?;
    with_float!(x.dtype(), T => {
        let x = x.slice::<T>()?;
        py.detach(|| codec.quantize(x, bytes, 0).map_err(reference))
    })
}

/// Cache bytes (uint8, `rows · row_bytes`) dequantized, and rotated back, into `out` (f32;
/// its last axis is the row length).
#[pyfunction]
#[pyo3(signature = (data, out, format_name, rotation=None))]
fn dequantize(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    format_name: &str,
    rotation: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let f = format(format_name)?;
    let data = Array::import(data, "data", &[DType::U8])?;
    let mut out = Array::import(out, "out", &[DType::F32])?;
    if data.overlaps(&out) {
        return Err(invalid("out: shares memory with data".into()));
    }
    let (dim, _) = check_row_bytes(
        f,
        &out,
        &data,
        "rows x row_bytes for out's rows of its last axis",
    )?;
    let r = rotations::parse(rotation, dim)?;
    let codec = CacheCodec::new(f, dim, r.as_ref(), Isa::best()).map_err(reference)?;
    let (bytes, values) = (data.slice::<u8>()?, out.slice_mut::<f32>()?);
    py.detach(|| codec.dequantize(bytes, values).map_err(reference))
}

/// The rotation plans a compressed-tensors checkpoint asks for, one per layer, as dicts
/// `{"qk": desc, "v": desc}` (desc: None, a rotation string, or an f64 matrix).
#[pyfunction]
#[pyo3(signature = (config_json, n_layers, head_dim, checkpoint_dir=None))]
fn checkpoint_plans<'py>(
    py: Python<'py>,
    config_json: &str,
    n_layers: usize,
    head_dim: usize,
    checkpoint_dir: Option<std::path::PathBuf>,
) -> PyResult<Vec<Bound<'py, PyDict>>> {
    use rotq::checkpoint::TransformConfig;
    let path = std::path::Path::new(config_json);
    let config = if !config_json.trim_start().starts_with('{') && path.is_file() {
        TransformConfig::from_config_file(path)
    } else {
        TransformConfig::from_config_json(config_json)
    }
    .map_err(|e| to_py(e.into()))?;
    let plans = match config {
        Some(c) => c
            .plans(n_layers, head_dim, checkpoint_dir.as_deref())
            .map_err(|e| to_py(e.into()))?,
        None => vec![rotq::RotationPlan::none(); n_layers],
    };
    plans
        .iter()
        .map(|p| {
            let d = PyDict::new(py);
            d.set_item("qk", rotations::describe(py, p.qk.as_ref())?)?;
            d.set_item("v", rotations::describe(py, p.v.as_ref())?)?;
            Ok(d)
        })
        .collect()
}

/// Whether `ROTQ_DISABLE_ROTATION` asks for no rotation where the caller does not choose.
#[pyfunction]
fn rotation_disabled() -> bool {
    rotq::defaults::rotation_disabled()
}

/// The instruction set the CPU kernels use on this machine.
#[pyfunction]
fn cpu_isa() -> String {
    format!("{:?}", Isa::best())
}

/// The module.
#[pymodule]
fn _rotq(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    m.add_function(wrap_pyfunction!(formats, m)?)?;
    m.add_function(wrap_pyfunction!(row_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(rotate, m)?)?;
    m.add_function(wrap_pyfunction!(hadamard_transform, m)?)?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint_plans, m)?)?;
    m.add_function(wrap_pyfunction!(rotation_disabled, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_isa, m)?)?;
    pool::register(m)?;
    oracle::register(m)?;
    #[cfg(feature = "cuda")]
    cuda::register(m)?;
    Ok(())
}
