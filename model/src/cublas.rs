//! The runner's matrix products on a CUDA device (`rotq eval --model --device cuda:N`): each
//! weight matrix uploaded once, each product one cuBLAS SGEMM in full f32 (cuBLAS's default
//! math mode, no TF32), so a GPU run scores what a CPU run scores, to f32 rounding.
//!
//! Why only the products: they are nearly all of a small model's work (the CPU backend spends
//! 78–95% of a grid in them on two cores), while norms, RoPE and SwiGLU are a few passes over
//! the activations. Activations go up and come back per product, a few MB a layer at
//! `--ctx 512`, small beside what the device saves; the caches live where the grid's backend
//! puts them, as an engine's would.
//!
//! ```
//! use rotq::cache::Backend;
//! use rotq_model::llama::{Config, Llama};
//! let config = Config { n_layers: 1, dim: 64, ffn_dim: 64, n_heads: 2, n_kv_heads: 1,
//!     head_dim: 32, vocab: 50, ..Config::default() };
//! let mut model = Llama::random(config, 7)?;
//! model.products_on(&Backend::Cpu)?; // a no-op: the products stay on the CPU
//! assert_eq!(model.products_device(), "cpu");
//! # Ok::<(), rotq_model::Error>(())
//! ```

use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaStream};

use crate::Error;

/// One device's stream and cuBLAS handle, shared by every matrix uploaded to it.
pub(crate) struct Blas {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    name: String,
}

impl Blas {
    /// cuBLAS on `device`'s own stream (so products and the caches' kernels run in order).
    pub(crate) fn new(device: &rotq::cuda::Device) -> Result<Arc<Self>, Error> {
        // SAFETY: only probes whether the shared library can be loaded; no cuBLAS call is made.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Gpu(
                "libcublas could not be loaded (add the CUDA toolkit's lib64 to LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        let stream = device.stream().clone();
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| Error::Gpu(format!("creating a cuBLAS handle: {e}")))?;
        Ok(Arc::new(Self {
            stream,
            blas,
            name: device.info().id.clone(),
        }))
    }

    /// The device's name (`cuda:N`).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn driver(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
        move |e| Error::Gpu(format!("{what}: {e}"))
    }
}

/// A `[rows, cols]` weight matrix in device memory.
#[derive(Debug)]
pub(crate) struct DeviceMatrix {
    blas: Arc<Blas>,
    w: CudaSlice<f32>,
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blas").field("device", &self.name).finish()
    }
}

impl DeviceMatrix {
    /// Uploads `data`.
    pub(crate) fn upload(blas: &Arc<Blas>, data: &[f32]) -> Result<Self, Error> {
        let w = blas
            .stream
            .clone_htod(data)
            .map_err(Blas::driver("uploading weights"))?;
        Ok(Self {
            blas: blas.clone(),
            w,
        })
    }

    /// `x · Wᵀ` for `n` rows of `x` (`[n, cols]`), as `[n, rows]`; shapes checked by the caller.
    pub(crate) fn apply(
        &self,
        x: &[f32],
        n: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<f32>, Error> {
        let s = &self.blas.stream;
        let int = |v: usize| {
            i32::try_from(v).map_err(|_| Error::Shape(format!("{v} is too large for cuBLAS")))
        };
        let (m, nn, k) = (int(rows)?, int(n)?, int(cols)?);
        let x = s
            .clone_htod(x)
            .map_err(Blas::driver("uploading activations"))?;
        let mut y = s
            .alloc_zeros::<f32>(n * rows)
            .map_err(Blas::driver("allocating a product"))?;
        // Column-major, as cuBLAS sees row-major buffers: W is [cols, rows], x is [cols, n],
        // and y = x · Wᵀ row-major is the [rows, n] column-major Wᵀ·x.
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m,
            n: nn,
            k,
            alpha: 1.0f32,
            lda: k,
            ldb: k,
            beta: 0.0f32,
            ldc: m,
        };
        // SAFETY: w holds rows·cols values (checked when the matrix was made), x holds n·cols
        // (checked by Matrix::apply) and y n·rows; the leading dimensions match those shapes.
        unsafe { self.blas.blas.gemm(cfg, &self.w, &x, &mut y) }
            .map_err(|e| Error::Gpu(format!("cuBLAS SGEMM of {rows} x {cols} by {n}: {e}")))?;
        s.clone_dtoh(&y)
            .map_err(Blas::driver("reading a product back"))
    }
}
