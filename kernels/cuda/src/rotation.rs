//! Rotating rows in place on the GPU: every rotation the oracle knows (the Hadamards by their
//! fast transform, explicit matrices by `matrix.rs`).

use crate::device::Device;
use crate::error::{Context, CudaError, Result};
use crate::kernel::{self, Geometry, RowConfig, Transform};
use crate::matrix::DeviceMatrix;
use cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg, ValidAsZeroBits};
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
        Ok(Self {
            transform,
            matrix,
            signs,
            config: RowConfig::default(),
            tuned: true,
            ordinal: dev.context().ordinal(),
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
        for ordinal in [dev.context().ordinal(), data.ordinal()] {
            if ordinal != self.ordinal {
                return Err(CudaError::WrongDevice {
                    expected: self.ordinal,
                    actual: ordinal,
                });
            }
        }
        let n = self.dim();
        if !data.len().is_multiple_of(n) {
            return Err(Error::RowNotMultipleOfBlock {
                format: "rotation rows",
                row_len: data.len(),
                block: n,
            }
            .into());
        }
        let n_rows = data.len() / n;
        if n_rows == 0 {
            return Ok(());
        }
        if let Some(m) = &self.matrix {
            return m.apply_in_place(dev, data, n_rows, inverse);
        }
        let config = self.config_for::<T>(dev);
        let g: Geometry = kernel::geometry(
            &self.transform,
            config,
            false,
            0,
            dev.info().max_shared_per_block,
        )?;
        let (key, src) = kernel::source(&self.transform, g, T::ELEM, true, None);
        let f = kernel::function(dev, &key, &src, "rotate_rows", g.smem)?;
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
