//! Opening a CUDA device, and compiling and caching kernel modules for it.

use crate::error::{Context, CudaError, Result};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};
use rotq_reference::tuned::{default_path, Loaded, TuneFile};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A line in a kernel's source that asks for sm_90's architecture-specific target (sm_90a) on
/// devices of compute capability 9.0.
pub(crate) const SM90A: &str = "#define RQ_SM90A 1\n";

/// NVRTC's options for `source` on a device of compute capability `(major, minor)`.
pub(crate) fn nvrtc_options((major, minor): (u32, u32), source: &str) -> Vec<String> {
    // Sources that use sm_90's architecture-specific instructions (`setmaxnreg`) say so.
    let specific = if source.contains(SM90A) && (major, minor) == (9, 0) {
        "a"
    } else {
        ""
    };
    vec![
        // Exact f32 rounding: no fused multiply-adds, so quantized bytes match the oracle.
        "--fmad=false".into(),
        format!("--gpu-architecture=sm_{major}{minor}{specific}"),
        "--std=c++17".into(),
    ]
}

/// What a device is, read once when it is opened.
///
/// ```no_run
/// let dev = rotq_cuda::Device::open("cuda:0")?;
/// println!("{} sm_{}{}", dev.info().name, dev.info().compute_capability.0, dev.info().compute_capability.1);
/// # Ok::<(), rotq_cuda::CudaError>(())
/// ```
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    /// `cuda:N`.
    pub id: String,
    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// (major, minor), e.g. (9, 0).
    pub compute_capability: (u32, u32),
    /// Device memory in bytes.
    pub total_memory: usize,
    /// The driver's CUDA version as the driver reports it (13000 for 13.0).
    pub driver_version: i32,
    /// Streaming multiprocessors.
    pub multiprocessors: u32,
    /// The most dynamic shared memory one block may opt in to, in bytes.
    pub max_shared_per_block: usize,
}

/// One CUDA device with its stream and its compiled kernel modules.
///
/// Kernels are compiled by NVRTC for the device's own architecture the first time a
/// (kernel, configuration) pair is used, then reused for the life of the `Device`.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
    /// NVRTC's logs of the sources it rejected, by key: asked again, the same source fails at
    /// once instead of being compiled again (a caller that falls back on failure, like the
    /// prefill's sm_90a kernel on an older toolkit, would otherwise pay NVRTC at every call).
    rejected: Mutex<HashMap<String, String>>,
    tuning: Tuning,
}

/// The tuning cache as a device sees it: where it is, and what was found there.
#[non_exhaustive]
#[derive(Debug)]
pub struct Tuning {
    /// The file looked at (`None`: no path could be formed).
    pub path: Option<std::path::PathBuf>,
    /// What was found.
    pub loaded: Loaded,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("info", &self.info).finish()
    }
}

/// Whether libcuda can be loaded and sees at least one device (never panics).
///
/// ```
/// // On a machine without a GPU this is simply false.
/// let _ = rotq_cuda::cuda_available();
/// ```
pub fn cuda_available() -> bool {
    device_count().is_ok_and(|n| n > 0)
}

fn device_count() -> Result<usize> {
    // SAFETY: only probes whether the shared library can be loaded; no CUDA call is made.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    match cudarc::driver::result::init() {
        // A driver with no device visible (none installed, or hidden by CUDA_VISIBLE_DEVICES).
        Err(e) if e.0 == cudarc::driver::sys::cudaError_enum::CUDA_ERROR_NO_DEVICE => return Ok(0),
        other => other.context(|| "initialising the driver".into())?,
    }
    let n = CudaContext::device_count().context(|| "counting devices".into())?;
    Ok(usize::try_from(n).unwrap_or(0))
}

impl Device {
    /// Opens `cuda:N` (`cuda` alone means `cuda:0`).
    pub fn open(name: &str) -> Result<Self> {
        let ordinal = match name {
            "cuda" => 0,
            _ => name
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| CudaError::BadDeviceName(name.into()))?,
        };
        Self::new(ordinal)
    }

    /// Opens the device with this ordinal.
    pub fn new(ordinal: usize) -> Result<Self> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).context(|| format!("opening cuda:{ordinal}"))?;
        let attr = |a| -> Result<i32> {
            ctx.attribute(a)
                .context(|| format!("reading {a:?} of cuda:{ordinal}"))
        };
        let cc = (
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? as u32,
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)? as u32,
        );
        let mut driver_version = 0i32;
        // SAFETY: the driver is loaded and initialised (device_count); the pointer is valid.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) }
            .result()
            .context(|| "reading the driver version".into())?;
        // The kernels are compiled by NVRTC 13 and run through CUDA 13 driver entry points.
        const NEEDED: i32 = 13000;
        if driver_version < NEEDED {
            return Err(CudaError::DriverTooOld {
                found: driver_version,
                needed: NEEDED,
            });
        }
        let info = DeviceInfo {
            id: format!("cuda:{ordinal}"),
            name: ctx.name().context(|| "reading the device name".into())?,
            compute_capability: cc,
            total_memory: ctx
                .total_mem()
                .context(|| "reading the memory size".into())?,
            driver_version,
            multiprocessors: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
                as u32,
            max_shared_per_block: attr(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )? as usize,
        };
        let stream = ctx.default_stream();
        let path = default_path();
        let loaded = match &path {
            Some(p) => TuneFile::peek(p, &crate::tuned::device_identity(&info)),
            None => Loaded::Missing,
        };
        Ok(Self {
            ctx,
            stream,
            info,
            modules: Mutex::new(HashMap::new()),
            rejected: Mutex::new(HashMap::new()),
            tuning: Tuning { path, loaded },
        })
    }

    /// The tuning cache read when the device was opened.
    pub fn tuning(&self) -> &Tuning {
        &self.tuning
    }

    /// The tuned configuration of `kernel` at `bucket`, if the cache has one in force (see
    /// [`crate::tuned::source_hash`]; a value outside `candidates` is not trusted).
    pub(crate) fn tuned<C: serde::de::DeserializeOwned + PartialEq>(
        &self,
        kernel: &str,
        bucket: &str,
        candidates: &[C],
    ) -> Option<C> {
        match &self.tuning.loaded {
            Loaded::Usable(f) => {
                crate::tuned::in_force(f.entry(kernel, bucket)?, kernel, candidates).ok()
            }
            _ => None,
        }
    }

    /// What the device is.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The stream every kernel of this device runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device's context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Kernel `function` of the module compiled from `source`, compiling it on first use.
    /// `key` names the module and its defines (it is the cache key and appears in errors).
    pub(crate) fn function(&self, key: &str, source: &str, function: &str) -> Result<CudaFunction> {
        let cached = self
            .modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned();
        let module = match cached {
            Some(m) => m,
            None => {
                let rejected = self.rejected.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(log) = rejected.get(key) {
                    return Err(CudaError::Compile {
                        kernel: key.to_string(),
                        log: log.clone(),
                    });
                }
                drop(rejected);
                // Compiled outside the lock, so threads compile different modules at once;
                // when two compile the same one, the first stored wins.
                let m = match self.compile(key, source) {
                    Err(CudaError::Compile { kernel, log }) => {
                        self.rejected
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(key.to_string(), log.clone());
                        return Err(CudaError::Compile { kernel, log });
                    }
                    other => other?,
                };
                self.modules
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(key.to_string())
                    .or_insert(m)
                    .clone()
            }
        };
        module
            .load_function(function)
            .context(|| format!("loading {function} from {key}"))
    }

    /// How many modules have been compiled so far (each (kernel, configuration) once).
    pub fn compiled_modules(&self) -> usize {
        self.modules.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn compile(&self, key: &str, source: &str) -> Result<Arc<CudaModule>> {
        // SAFETY: only probes whether the shared library can be loaded.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(CudaError::NoNvrtc);
        }
        let opts = CompileOptions {
            options: nvrtc_options(self.info.compute_capability, source),
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let ptx = compile_ptx_with_opts(source, opts).map_err(|e| CudaError::Compile {
            kernel: key.to_string(),
            log: match e {
                CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
                other => format!("{other:?}"),
            },
        })?;
        let compiled = started.elapsed();
        let module = self
            .ctx
            .load_module(ptx)
            .context(|| format!("loading the module {key}"))?;
        crate::turbo::fill_sketches(&module, source, &self.stream)?;
        if std::env::var_os("ROTQ_CUDA_LOG").is_some() {
            eprintln!(
                "rotq-cuda: compiled [{key}] in {:.0} ms (NVRTC {:.0} ms)",
                started.elapsed().as_secs_f64() * 1e3,
                compiled.as_secs_f64() * 1e3
            );
        }
        Ok(module)
    }
}
