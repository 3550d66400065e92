//! Explicit rotation matrices on the GPU (`cuda/matrix.cu`): compressed-tensors' `random-matrix`
//! transforms, and any orthogonal matrix a plan carries. They have no fast transform: `y = M x`
//! costs `d` multiply-adds a value in f32. The codec kernels do it in place of the transform
//! (hadamard.cu's `matrix_values`, on this module's `Rᵀ`); attention runs it as a pass of its
//! own (this module's kernel), rotating the queries into a buffer before the kernels that
//! would fuse a Hadamard and their output back in place after them.

use crate::device::Device;
use crate::error::{Context, CudaError, Result};
use crate::rotation::GpuElement;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};
use rotq_reference::rotation::RotationKind;
use rotq_reference::{Error, Rotation};
use std::sync::Arc;

const MATRIX: &str = include_str!("cuda/matrix.cu");

/// Threads per block: a row's outputs are spread over them.
const THREADS: usize = 128;

/// The cache key and source of the module for rows of `n` values read as element type
/// `in_elem` and written as `out_elem` (0 f32, 1 f16, 2 bf16).
pub(crate) fn source(n: usize, in_elem: u32, out_elem: u32) -> (String, String) {
    (
        format!("matrix rows n {n}, in {in_elem} out {out_elem}"),
        format!(
            "#define N {n}\n#define IN_ELEM {in_elem}\n#define OUT_ELEM {out_elem}\n{}\n{MATRIX}",
            crate::kernel::FORMATS
        ),
    )
}

/// A rotation's explicit matrix on one device, as the kernel reads it: `M` and `Mᵀ`, each
/// transposed (so forward reads `Rᵀ`, inverse reads `R`), in f32.
#[derive(Clone, Debug)]
pub(crate) struct DeviceMatrix {
    n: usize,
    /// `Rᵀ` row-major: the forward pass's `mt`.
    forward: Arc<CudaSlice<f32>>,
    /// `R` row-major: the inverse pass's `mt` (`Rᵀ` transposed), read by its address.
    _inverse: Arc<CudaSlice<f32>>,
    /// Their device addresses (forward, inverse), taken once after the upload, so that a pass
    /// made later (maybe while a graph capture is under way) touches no cudarc buffer.
    ptrs: (u64, u64),
}

impl DeviceMatrix {
    /// The matrix of `rotation` uploaded, if it is an explicit one (`None` for the Hadamards).
    pub(crate) fn of(dev: &Device, rotation: &Rotation) -> Result<Option<Self>> {
        let RotationKind::Matrix { r } = rotation.kind() else {
            return Ok(None);
        };
        // `r.iter()` is row-major: R[i][j] at i·n + j.
        let rows: Vec<f64> = r.iter().copied().collect();
        Self::from_rows(dev, rotation.dim(), &rows).map(Some)
    }

    /// The `n × n` matrix `rows` (row-major: `M[i][j]` at `i·n + j`) uploaded.
    pub(crate) fn from_rows(dev: &Device, n: usize, rows: &[f64]) -> Result<Self> {
        let rows: Vec<f32> = rows.iter().map(|&v| v as f32).collect();
        let mut cols = vec![0f32; n * n];
        for i in 0..n {
            for j in 0..n {
                cols[j * n + i] = rows[i * n + j];
            }
        }
        let up = |v: &[f32]| -> Result<Arc<CudaSlice<f32>>> {
            Ok(Arc::new(
                dev.stream()
                    .clone_htod(v)
                    .context(|| "uploading a rotation matrix".into())?,
            ))
        };
        let (forward, inverse) = (up(&cols)?, up(&rows)?);
        let ptrs = (
            forward.device_ptr(forward.stream()).0,
            inverse.device_ptr(inverse.stream()).0,
        );
        Ok(Self {
            n,
            forward,
            _inverse: inverse,
            ptrs,
        })
    }

    /// `y ← M x` (`Mᵀ x` when `inverse`) for the first `n_rows` rows of `x` into `y`.
    pub(crate) fn apply<I: GpuElement, O: GpuElement>(
        &self,
        dev: &Device,
        x: &CudaSlice<I>,
        y: &mut CudaSlice<O>,
        n_rows: usize,
        inverse: bool,
    ) -> Result<()> {
        self.launch(dev, Some(x), y, n_rows, inverse)
    }

    /// `x ← M x` (`Mᵀ x` when `inverse`) for the first `n_rows` rows of `x`, in place.
    pub(crate) fn apply_in_place<T: GpuElement>(
        &self,
        dev: &Device,
        x: &mut CudaSlice<T>,
        n_rows: usize,
        inverse: bool,
    ) -> Result<()> {
        self.launch::<T, T>(dev, None, x, n_rows, inverse)
    }

    fn launch<I: GpuElement, O: GpuElement>(
        &self,
        dev: &Device,
        x: Option<&CudaSlice<I>>,
        y: &mut CudaSlice<O>,
        n_rows: usize,
        inverse: bool,
    ) -> Result<()> {
        let n = self.n;
        let values = n_rows
            .checked_mul(n)
            .ok_or(CudaError::Input(Error::Overflow("matrix rows")))?;
        for (what, len) in [
            ("matrix input rows", x.map_or(values, |x| x.len())),
            ("matrix output rows", y.len()),
        ] {
            if len < values {
                return Err(Error::LengthMismatch {
                    what,
                    expected: values,
                    actual: len,
                }
                .into());
            }
        }
        if n_rows == 0 {
            return Ok(());
        }
        let stream = dev.stream();
        let pass = self.raw_pass::<I, O>(dev, n_rows, inverse)?;
        // The guards record the buffers' use on the stream when dropped, after the launch.
        let xg = x.map(|x| x.device_ptr(stream));
        let (yp, _yg) = y.device_ptr_mut(stream);
        let xp = xg.as_ref().map_or(0, |(p, _)| *p);
        // SAFETY: `x` (when given) holds `n_rows` rows of `n` values of `I` and `y` of `O`
        // (checked above; `I` = `O` in place), both alive past the launch, queued on their
        // own stream.
        unsafe { pass.launch(stream.cu_stream(), xp, yp) }
    }
}

/// A matrix pass made ready to launch on any stream (the batch API's, a caller's): the kernel
/// for its element types, its launch shape for a fixed row count, and the matrix's raw
/// address, taken once, so that a launch touches no cudarc buffer (a graph capture may be under
/// way). It keeps the matrix alive.
#[derive(Debug)]
pub(crate) struct RawMatrixPass {
    ctx: Arc<cudarc::driver::CudaContext>,
    function: cudarc::driver::CudaFunction,
    key: String,
    cfg: LaunchConfig,
    n_rows: i64,
    mt: u64,
    _matrix: DeviceMatrix,
}

impl RawMatrixPass {
    /// Queues `y ← M x` (`x` 0: in place on `y`) over the pass's rows on `stream`.
    ///
    /// # Safety
    /// `x` (when not 0) must hold the pass's rows of `n` values of `I`, `y` of `O` (`I` = `O`
    /// in place), both alive until the work has run.
    pub(crate) unsafe fn launch(
        &self,
        stream: cudarc::driver::sys::CUstream,
        x: u64,
        y: u64,
    ) -> Result<()> {
        // A raw launch, unlike cudarc's, does not make the context current.
        self.ctx
            .bind_to_thread()
            .context(|| "binding the device's context".into())?;
        let params = [x, y, self.n_rows as u64, self.mt];
        // SAFETY: the parameters are `matrix_rows`' (x, y, n_rows, mt); the caller's promise
        // covers `x` and `y`; `mt` holds n × n floats alive with `_matrix`; the shared memory
        // is one row of n floats, as compiled.
        unsafe {
            crate::kernel::launch_raw(
                &self.function,
                self.cfg.grid_dim,
                self.cfg.block_dim.0,
                self.cfg.shared_mem_bytes,
                stream,
                &params,
            )
        }
        .context(|| format!("launching matrix_rows ({}, {} rows)", self.key, self.n_rows))
    }
}

impl DeviceMatrix {
    /// `Rᵀ` row-major on the device: what the codec kernels take in place of a transform's
    /// signs (hadamard.cu's `matrix_values`, which reads it transposed for `Rᵀ x`).
    pub(crate) fn transposed(&self) -> &Arc<CudaSlice<f32>> {
        &self.forward
    }

    /// The pass `y ← M x` (`inverse`: `Mᵀ x`) over `n_rows` rows of `I` into rows of `O`,
    /// compiled, for launches on the device's stream ([`Self::apply`]) or a caller's.
    pub(crate) fn raw_pass<I: GpuElement, O: GpuElement>(
        &self,
        dev: &Device,
        n_rows: usize,
        inverse: bool,
    ) -> Result<RawMatrixPass> {
        let n = self.n;
        let (key, src) = source(n, I::ELEM, O::ELEM);
        let smem = 4 * n;
        let function = crate::kernel::function(dev, &key, &src, "matrix_rows", smem)?;
        let cfg = LaunchConfig {
            grid_dim: (n_rows.clamp(1, 65_535 * 16) as u32, 1, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mt = if inverse { self.ptrs.1 } else { self.ptrs.0 };
        Ok(RawMatrixPass {
            ctx: dev.context().clone(),
            function,
            key,
            cfg,
            n_rows: n_rows as i64,
            mt,
            _matrix: self.clone(),
        })
    }
}
