//! Rotating rows in place on the GPU: every rotation the oracle knows (the Hadamards by their
//! fast transform, explicit matrices by `matrix.rs`).

use crate::batch::{DeviceBuf, DeviceStream};
use crate::device::Device;
use crate::error::{Context, CudaError, Result};
use crate::kernel::{self, Geometry, RowConfig, Transform};
use crate::matrix::DeviceMatrix;
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, PushKernelArg, ValidAsZeroBits};
use rotq_reference::{Error, Rotation};
use std::sync::Arc;

/// Element types stored in rows on the GPU: arithmetic is always f32.
pub trait GpuElement: DeviceRepr + ValidAsZeroBits + Copy + Unpin + 'static {
    /// The kernels' `ELEM` code.
    const ELEM: u32;
}
impl GpuElement for f32 {
    const ELEM: u32 = 0;
}
impl GpuElement for half::f16 {
    const ELEM: u32 = 1;
}
impl GpuElement for half::bf16 {
    const ELEM: u32 = 2;
}

/// A rotation compiled for one device: Sylvester and m·2^k Hadamards (m ∈ {12, 20, 28, 40}),
/// block-diagonal and randomized ones, and explicit orthogonal matrices (`d` multiply-adds a
/// value: a pass of their own), over rows of f32, f16 or bf16.
///
/// ```no_run
/// use rotq_cuda::{CudaRotation, Device};
/// use rotq_reference::Rotation;
/// let dev = Device::open("cuda:0")?;
/// let rot = CudaRotation::new(&dev, &Rotation::hadamard(128)?)?;
/// let mut rows = dev.stream().clone_htod(&vec![1.0f32; 4 * 128]).unwrap();
/// rot.forward(&dev, &mut rows)?;
/// # Ok::<(), rotq_cuda::CudaError>(())
/// ```
#[derive(Clone, Debug)]
pub struct CudaRotation {
    /// The fast transform (the identity for an explicit matrix).
    transform: Transform,
    /// An explicit matrix, applied by its own kernel.
    matrix: Option<DeviceMatrix>,
    // Shared, so that clones (one per configuration, say) don't copy them on the device.
    signs: Option<Arc<CudaSlice<f32>>>,
    config: RowConfig,
    /// Whether to look up the tuning cache (no explicit `with_config`).
    tuned: bool,
    ordinal: usize,
    /// The signs' device address (0: none), taken once, so that a launch on a caller's stream
    /// touches no cudarc buffer (a graph capture may be under way).
    signs_ptr: u64,
}

impl CudaRotation {
    /// Prepares `rotation` (uploads its signs, or its matrix).
    pub fn new(dev: &Device, rotation: &Rotation) -> Result<Self> {
        let matrix = DeviceMatrix::of(dev, rotation)?;
        let transform = match matrix {
            Some(_) => Transform::identity(rotation.dim())?,
            None => Transform::of(rotation)?,
        };
        let signs = match &transform.signs {
            Some(s) => Some(Arc::new(
                dev.stream()
                    .clone_htod(s)
                    .context(|| "uploading the signs".into())?,
            )),
            None => None,
        };
        let signs_ptr = signs.as_ref().map_or(0, |s| s.device_ptr(s.stream()).0);
        Ok(Self {
            transform,
            matrix,
            signs,
            config: RowConfig::default(),
            tuned: true,
            ordinal: dev.context().ordinal(),
            signs_ptr,
        })
    }

    /// The same rotation with other tuning knobs (instead of the tuning cache's).
    pub fn with_config(mut self, config: RowConfig) -> Self {
        self.config = config;
        self.tuned = false;
        self
    }

    /// The knobs for rows of `T` on `dev`: the tuning cache's, unless [`Self::with_config`]
    /// set them, else the default.
    pub fn config_for<T: GpuElement>(&self, dev: &Device) -> RowConfig {
        let tuned = || {
            dev.tuned(
                &crate::tuned::fwht_kernel(T::ELEM),
                &crate::tuned::fwht_bucket(self.dim()),
                &RowConfig::search_space(),
            )
        };
        self.tuned.then(tuned).flatten().unwrap_or(self.config)
    }

    /// The row length.
    pub fn dim(&self) -> usize {
        self.transform.n()
    }

    /// `x ← R x` for every row of `data` (its length a multiple of [`Self::dim`]).
    pub fn forward<T: GpuElement>(&self, dev: &Device, data: &mut CudaSlice<T>) -> Result<()> {
        self.run(dev, data, false)
    }

    /// `x ← Rᵀ x` for every row of `data`.
    pub fn inverse<T: GpuElement>(&self, dev: &Device, data: &mut CudaSlice<T>) -> Result<()> {
        self.run(dev, data, true)
    }

    /// `x ← R x` (`inverse`: `Rᵀ x`) for every row of a caller's buffer, queued on the
    /// caller's stream with nothing allocated, uploaded or awaited (so it can be captured in a
    /// CUDA graph). `output_scale` replaces the normalization `1/√n` by a factor of the
    /// caller's: the unnormalized transform times it (Dao-AILab's `hadamard_transform(x,
    /// scale)`; the butterflies add and subtract, so integer rows stay exact). An explicit
    /// matrix runs its own pass, in place; it has no normalization for `output_scale` to
    /// replace, so one is refused.
    ///
    /// # Safety
    /// The work is queued, not done: `data` must stay allocated, and no other work may touch
    /// it, until it has run on `stream` (and, captured in a graph, until the last replay has
    /// run). The signs were uploaded on the device's stream when the rotation was made: a
    /// non-blocking stream must not run this before that upload completed.
    ///
    /// ```no_run
    /// use rotq_cuda::batch::{DeviceBuf, DeviceStream};
    /// use rotq_cuda::{CudaRotation, Device};
    /// use rotq_reference::Rotation;
    /// let dev = Device::open("cuda:0")?;
    /// let rot = CudaRotation::new(&dev, &Rotation::hadamard(128)?)?;
    /// let s = dev.stream();
    /// let rows = s.clone_htod(&vec![1.0f32; 4 * 128]).unwrap();
    /// // SAFETY: `rows` outlives the queued work (synchronised below).
    /// unsafe { rot.rotate_on(&dev, &DeviceStream::of(s), &DeviceBuf::of(&rows), false, None)? };
    /// s.synchronize().unwrap();
    /// # Ok::<(), rotq_cuda::CudaError>(())
    /// ```
    pub unsafe fn rotate_on<T: GpuElement>(
        &self,
        dev: &Device,
        stream: &DeviceStream<'_>,
        data: &DeviceBuf<'_, T>,
        inverse: bool,
        output_scale: Option<f32>,
    ) -> Result<()> {
        self.check_devices(&[dev.context().ordinal(), data.ordinal(), stream.ordinal()])?;
        if self.matrix.is_some() && output_scale.is_some() {
            return Err(Error::InvalidParameter {
                name: "output_scale",
                reason: "an explicit matrix has no normalization to replace".into(),
            }
            .into());
        }
        let n_rows = self.rows_of(data.len())?;
        if n_rows == 0 {
            return Ok(());
        }
        if let Some(m) = &self.matrix {
            let pass = m.raw_pass::<T, T>(dev, n_rows, inverse)?;
            // SAFETY: in place (x null) on `data`, which holds `n_rows` rows of `T` (checked)
            // and, by the caller's promise, lives until the work has run.
            return unsafe { pass.launch(stream.raw(), 0, data.ptr()) };
        }
        let (f, g, key) = self.kernel::<T>(dev)?;
        let cfg = kernel::launch_config(g, n_rows)?;
        let scale = output_scale.unwrap_or_else(|| self.scale());
        let params = [
            data.ptr(),
            n_rows as u64,
            self.signs_ptr,
            u64::from(scale.to_bits()),
            u64::from(inverse as u32),
        ];
        // SAFETY: the parameters are `rotate_rows`' (data, n_rows, signs, scale, inverse); it
        // reads and writes `n_rows` whole rows of `data` (its length a multiple of the row,
        // checked), reads `n` signs when the pointer is not null (this rotation's, alive with
        // it); the launch shape is the one the geometry was compiled for.
        unsafe {
            kernel::queue(
                dev,
                "rotate_rows",
                (&f, g, &key, &cfg),
                stream.raw(),
                &params,
            )
        }
    }

    /// Refuses a device, or a buffer or stream of a device, other than the rotation's.
    fn check_devices(&self, ordinals: &[usize]) -> Result<()> {
        match ordinals.iter().find(|&&o| o != self.ordinal) {
            Some(&actual) => Err(CudaError::WrongDevice {
                expected: self.ordinal,
                actual,
            }),
            None => Ok(()),
        }
    }

    /// Rows of [`Self::dim`] values in `len` values.
    fn rows_of(&self, len: usize) -> Result<usize> {
        let n = self.dim();
        if !len.is_multiple_of(n) {
            return Err(Error::RowNotMultipleOfBlock {
                format: "rotation rows",
                row_len: len,
                block: n,
            }
            .into());
        }
        Ok(len / n)
    }

    /// The `rotate_rows` kernel for rows of `T` on `dev`, its geometry and module key.
    fn kernel<T: GpuElement>(
        &self,
        dev: &Device,
    ) -> Result<(cudarc::driver::CudaFunction, Geometry, String)> {
        let g: Geometry = kernel::geometry(
            &self.transform,
            self.config_for::<T>(dev),
            false,
            0,
            dev.info().max_shared_per_block,
        )?;
        let (key, src) =
            kernel::source(&self.transform, g, T::ELEM, kernel::Rotate::Transform, None);
        let f = kernel::function(dev, &key, &src, "rotate_rows", g.smem)?;
        Ok((f, g, key))
    }

    pub(crate) fn transform(&self) -> &Transform {
        &self.transform
    }

    /// The explicit matrix, if this rotation is one (its kernels take it as a pass of its own).
    pub(crate) fn matrix(&self) -> Option<&DeviceMatrix> {
        self.matrix.as_ref()
    }

    pub(crate) fn signs(&self) -> Option<&Arc<CudaSlice<f32>>> {
        self.signs.as_ref()
    }

    /// The 1/√(unit) normalization, in f32.
    pub(crate) fn scale(&self) -> f32 {
        (1.0 / (self.transform.size.n as f64).sqrt()) as f32
    }

    fn run<T: GpuElement>(
        &self,
        dev: &Device,
        data: &mut CudaSlice<T>,
        inverse: bool,
    ) -> Result<()> {
        self.check_devices(&[dev.context().ordinal(), data.ordinal()])?;
        let n_rows = self.rows_of(data.len())?;
        if n_rows == 0 {
            return Ok(());
        }
        if let Some(m) = &self.matrix {
            return m.apply_in_place(dev, data, n_rows, inverse);
        }
        let (f, g, key) = self.kernel::<T>(dev)?;
        let cfg = kernel::launch_config(g, n_rows)?;
        let stream = dev.stream();
        let no_signs;
        let signs = match &self.signs {
            Some(s) => s.as_ref(),
            None => {
                no_signs = stream.null::<f32>().context(|| "a null pointer".into())?;
                &no_signs
            }
        };
        let (rows, scale, inverse) = (n_rows as i64, self.scale(), inverse as i32);
        let mut launch = stream.launch_builder(&f);
        launch
            .arg(data)
            .arg(&rows)
            .arg(signs)
            .arg(&scale)
            .arg(&inverse);
        // SAFETY: the kernel reads and writes `n_rows` rows of `n` values of `data`, reads `n`
        // signs when `signs` is not null (the buffer holds exactly `n`), and the launch shape is the
        // one its geometry was compiled for.
        unsafe { launch.launch(cfg) }.context(|| kernel::describe("rotate_rows", &f, g, &key))?;
        Ok(())
    }
}
