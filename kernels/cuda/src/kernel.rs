//! The shared machinery of the row kernels (`cuda/hadamard.cu`): how a rotation maps onto
//! threads, the defines and traits each module is compiled with, and launching.

use crate::device::Device;
use crate::error::{Context, CudaError, Result};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, LaunchConfig};
use rotq_reference::hadamard::{base_sign, HadamardSize};
use rotq_reference::rotation::RotationKind;
use rotq_reference::{Error, KvFormat, Rotation};
use serde::{Deserialize, Serialize};

pub(crate) const FORMATS: &str = include_str!("cuda/formats.cuh");
pub(crate) const ELEM: &str = include_str!("cuda/elem.cuh");
const HADAMARD: &str = include_str!("cuda/hadamard.cu");

/// A traits struct of constants for a module's source: the numbers the host computed once
/// (shapes, shared-memory offsets, launch bounds), which the CUDA C reads and checks with
/// `static_assert`s instead of deriving them again.
pub(crate) struct Traits {
    text: String,
}

impl Traits {
    /// An empty struct `name`, introduced by a comment saying where it comes from. Its
    /// constants are enumerators: NVRTC gives `static constexpr` variables storage in the
    /// module (a global each), enumerators none.
    pub fn new(name: &str, from: &str) -> Self {
        Self {
            text: format!(
                "// Emitted by rotq-cuda ({from}).\nstruct {name} {{\n    enum : int {{\n"
            ),
        }
    }

    /// An integer constant.
    pub fn int(&mut self, name: &str, value: usize, doc: &str) -> &mut Self {
        self.text += &format!("        {name} = {value}, // {doc}\n");
        self
    }

    /// A yes/no constant (1 or 0).
    pub fn flag(&mut self, name: &str, value: bool, doc: &str) -> &mut Self {
        self.int(name, value as usize, doc)
    }

    /// The struct's source.
    pub fn finish(&self) -> String {
        format!("{}    }};\n}};\n", self.text)
    }
}

/// Tuning knobs of the row kernels (rotate, rotate-quantize, dequantize).
///
/// ```
/// let c = rotq_cuda::RowConfig::default();
/// assert!(rotq_cuda::RowConfig::search_space().contains(&c));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RowConfig {
    /// Values each thread holds in registers (a power of two; raised where the transform
    /// needs more to fit a row in one thread block).
    pub elems_per_thread: usize,
    /// Rows per thread block; 0 picks about 256 threads per block.
    pub rows_per_block: usize,
}

impl Default for RowConfig {
    fn default() -> Self {
        Self {
            elems_per_thread: 8,
            rows_per_block: 0,
        }
    }
}

impl RowConfig {
    /// The default of the quantize and dequantize kernels: a thread holds a whole 32-value
    /// block, so every thread encodes one (measured 3x the rotation's default on an H100).
    pub fn codec_default() -> Self {
        Self {
            elems_per_thread: 32,
            rows_per_block: 16,
        }
    }

    /// Every configuration the autotuner tries.
    pub fn search_space() -> Vec<Self> {
        let mut out = Vec::new();
        for elems_per_thread in [4, 8, 16, 32] {
            for rows_per_block in [0, 1, 2, 4, 8, 16] {
                out.push(Self {
                    elems_per_thread,
                    rows_per_block,
                });
            }
        }
        out
    }
}

/// What the kernels compute per row: UNITS independent units of M·P values, each rotated by
/// `(B_M ⊗ H_P)/√(M·P)`, with optional signs.
#[derive(Clone, Debug)]
pub(crate) struct Transform {
    pub size: HadamardSize,
    pub units: usize,
    pub signs: Option<Vec<f32>>,
}

impl Transform {
    /// The transform of `rotation`; explicit matrices are not supported on the GPU.
    pub fn of(rotation: &Rotation) -> Result<Self> {
        let n = rotation.dim();
        Ok(match rotation.kind() {
            RotationKind::Hadamard { size } => Self {
                size,
                units: 1,
                signs: None,
            },
            RotationKind::Block { block } => Self {
                size: HadamardSize::new(block)?,
                units: n / block,
                signs: None,
            },
            RotationKind::Randomized { size, signs, .. } => Self {
                size,
                units: 1,
                signs: Some(signs.iter().map(|s| *s as f32).collect()),
            },
            _ => {
                return Err(Error::UnsupportedDim {
                    n,
                    what: "CUDA rotation",
                    hint: "explicit matrices are not supported on CUDA; use a Hadamard, block or randomized rotation",
                }
                .into())
            }
        })
    }

    /// No rotation over rows of `n` values (dequantize or quantize only): units of the largest
    /// power of two dividing `n`, up to 1024.
    pub fn identity(n: usize) -> Result<Self> {
        let p = (1usize << n.trailing_zeros()).min(1024);
        Ok(Self {
            size: HadamardSize::with_base(p, 1)?,
            units: n / p,
            signs: None,
        })
    }

    pub fn n(&self) -> usize {
        self.units * self.size.n
    }
}

/// How a transform is laid over threads, and with what resources. A row is `units · m`
/// segments of `p` values (see [`Transform`]); each of a segment's `segment_threads` threads
/// holds `ept` consecutive values of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Values per thread (a power of two dividing `p`).
    pub ept: usize,
    /// Rows per block.
    pub rows: usize,
    /// Threads per block (whole warps).
    pub threads: usize,
    /// Threads per segment (`p / ept`), and per row (`units · m · segment_threads`).
    pub segment_threads: usize,
    pub row_threads: usize,
    /// Lanes of a warp that a segment's butterflies cross with shuffles (`segment_threads`,
    /// at most 32), and the warps they then cross through shared memory.
    pub lanes: usize,
    pub segment_warps: usize,
    /// A row in shared memory, in floats: 4 floats of padding per 32 values (see PAD in
    /// hadamard.cu), rounded up to whole float4s.
    pub row_stride: usize,
    /// An encoded row, in bytes (0 when none), and how far apart such rows are staged after
    /// the float rows (16-byte aligned).
    pub row_bytes: usize,
    pub out_stride: usize,
    pub smem: usize,
}

/// Lays `t` over threads for `cfg`; `smem_always` when the kernel stages rows in shared memory
/// whatever the transform (quantize, dequantize), with `staged_bytes` of encoded row each, in
/// at most `max_smem` bytes of shared memory per block.
pub(crate) fn geometry(
    t: &Transform,
    cfg: RowConfig,
    smem_always: bool,
    staged_bytes: usize,
    max_smem: usize,
) -> Result<Geometry> {
    let (m, p, units) = (t.size.base, t.size.pow2, t.units);
    let too_big = || -> CudaError {
        Error::UnsupportedDim {
            n: t.n(),
            what: "CUDA row kernel",
            hint: "a row must fit one thread block (at most 1024 threads and the shared memory)",
        }
        .into()
    };
    let mut ept = cfg.elems_per_thread.clamp(1, 64).next_power_of_two().min(p);
    // Each thread takes ept / warps groups of values that differ in the warp bits: at least one.
    let (lanes, warps) = loop {
        let ts = p / ept;
        let lanes = ts.min(32);
        let warps = ts / lanes;
        let fits = units * m * ts <= 1024 && warps <= ept;
        if fits {
            break (lanes, warps);
        }
        if ept >= p || ept >= 64 {
            return Err(too_big());
        }
        ept *= 2;
    };
    let tpr = units * m * (p / ept);
    let step = 32 / gcd(tpr, 32); // rows · tpr must fill whole warps
    let wanted = match cfg.rows_per_block {
        0 => (256 / tpr).max(1),
        r => r,
    };
    // At most 1024 threads, in whole warps (clamped first: the field is public and serde'd).
    let most = 1024 / tpr / step * step;
    if most == 0 {
        return Err(too_big());
    }
    let mut rows = wanted.min(most).div_ceil(step) * step;
    // The base matrix and the warp bits of the butterflies go through shared memory.
    let needs_smem = smem_always || m > 1 || warps > 1;
    let row_stride = (t.n() + 4 * (t.n() / 32)).div_ceil(4) * 4;
    let out_stride = staged_bytes.div_ceil(16) * 16;
    let row_smem = if needs_smem {
        4 * row_stride + out_stride
    } else {
        0
    };
    if let Some(fit) = max_smem.checked_div(row_smem) {
        let fit = fit / step * step;
        if fit == 0 {
            return Err(too_big());
        }
        rows = rows.min(fit);
    }
    Ok(Geometry {
        ept,
        rows,
        threads: rows * tpr,
        segment_threads: p / ept,
        row_threads: tpr,
        lanes,
        segment_warps: warps,
        row_stride,
        row_bytes: staged_bytes,
        out_stride,
        smem: rows * row_smem,
    })
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// What a row module rotates by: its `ROTATE` define.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rotate {
    /// Nothing (a codec without a rotation).
    None = 0,
    /// The fast transform (Hadamard, randomized or not; the signs are an argument).
    Transform = 1,
    /// An explicit matrix, whose `Rᵀ` the kernels take in place of the signs (codec modules
    /// only: hadamard.cu's `matrix_values`).
    Matrix = 2,
}

/// The cache key and source of one module: the element type, the base of the transform, what
/// the codec kernels rotate by and the format as defines (the preprocessor picks types, code
/// and functions by them), the sizes and layout as `RowTraits`.
pub(crate) fn source(
    t: &Transform,
    g: Geometry,
    elem: u32,
    rotate: Rotate,
    format: Option<KvFormat>,
) -> (String, String) {
    let (m, p) = (t.size.base, t.size.pow2);
    let mut defines = format!(
        "#define ELEM {elem}\n#define M {m}\n#define ROTATE {}\n",
        rotate as u32
    );
    if let Some(f) = format {
        defines += &format!("#define FMT {}\n", f.name());
        if f.is_row() {
            defines += "#define RQ_TQ_ROW 1\n";
        }
    }
    let key = format!(
        "rows elem {elem}, {} x {m} x {p} values, {} per thread, {} rows per block, rotate {}, \
         format {}",
        t.units,
        g.ept,
        g.rows,
        rotate as u32,
        format.map_or("none", |f| f.name()),
    );
    // The thread's values as stored: 16-byte loads and stores when they and every row start
    // are 16-byte aligned.
    let elem_bytes = if elem == 0 { 4 } else { 2 };
    let mut traits = Traits::new("RowTraits", "kernel.rs: this module's layout");
    traits
        .int("kBlockRows", g.rows, "rows per block")
        .int("kUnits", t.units, "transform units per row")
        .int(
            "kSegmentValues",
            p,
            "values per segment (M segments a unit)",
        )
        .int("kUnitValues", m * p, "values per transform unit")
        .int("kRowValues", t.n(), "values per row")
        .int("kValuesPerThread", g.ept, "a thread's consecutive values")
        .int("kSegmentThreads", g.segment_threads, "threads per segment")
        .int("kRowThreads", g.row_threads, "threads per row")
        .int("kLanes", g.lanes, "a segment's lanes in a warp")
        .int("kSegmentWarps", g.segment_warps, "a segment's warps")
        .int("kThreads", g.threads, "threads per block")
        .flag(
            "kVectorized",
            (g.ept * elem_bytes).is_multiple_of(16) && (t.n() * elem_bytes).is_multiple_of(16),
            "16-byte loads and stores of the values",
        )
        .int(
            "kPackWords",
            (g.ept * elem_bytes).div_ceil(16),
            "a thread's values, in 16-byte words",
        )
        .int(
            "kRowStride",
            g.row_stride,
            "rows in shared memory apart, in floats",
        )
        .int("kRowBytes", g.row_bytes, "an encoded row (0: none)")
        .flag(
            "kWordCopies",
            g.row_bytes.is_multiple_of(4),
            "encoded rows copied in 4-byte words",
        )
        .int("kOutStride", g.out_stride, "encoded rows apart, in bytes")
        .int(
            "kMinBlocks",
            (1024 / g.threads).max(1),
            "launch bounds' blocks per SM: at least 1024 threads",
        );
    let mut src = defines + &traits.finish();
    if m > 1 {
        let rows: Vec<String> = (0..m)
            .map(|a| {
                let bits = (0..m)
                    .filter(|&b| base_sign(m, a, b) < 0.0)
                    .fold(0u64, |acc, b| acc | (1 << b));
                format!("{bits:#x}ull")
            })
            .collect();
        src += &format!(
            "__constant__ unsigned long long HAD_ROWS[{m}] = {{{}}};\n",
            rows.join(", ")
        );
    }
    src += FORMATS;
    src += "\n";
    if let Some(f) = format.filter(|f| f.is_row()) {
        src += crate::turbo::TURBO;
        src += &crate::turbo::tables(f, t.n());
    }
    src += ELEM;
    src += HADAMARD;
    (key, src)
}

/// The compiled kernel `name` for `key`/`src`, with `smem` bytes of dynamic shared memory
/// opted in.
pub(crate) fn function(
    dev: &Device,
    key: &str,
    src: &str,
    name: &str,
    smem: usize,
) -> Result<CudaFunction> {
    let f = dev.function(key, src, name)?;
    if smem > 48 * 1024 {
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .context(|| format!("allowing {smem} bytes of shared memory for {name}"))?;
    }
    Ok(f)
}

/// The launch shape for `n_rows` rows.
pub(crate) fn launch_config(g: Geometry, n_rows: usize) -> Result<LaunchConfig> {
    let blocks = u32::try_from(n_rows.div_ceil(g.rows))
        .map_err(|_| CudaError::Input(Error::Overflow("grid size")))?;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (g.threads as u32, 1, 1),
        shared_mem_bytes: g.smem as u32,
    })
}

/// What a failed launch was: the kernel, its shape and resources, its module.
pub(crate) fn describe(name: &str, f: &CudaFunction, g: Geometry, key: &str) -> String {
    format!(
        "launching {name} ({} threads, {} registers each, {} bytes of shared memory; {key})",
        g.threads,
        f.num_regs().unwrap_or(-1),
        g.smem
    )
}

/// Queues `f` on a raw stream with its parameters in 8-byte slots (pointers and 64-bit
/// integers whole, 32-bit values in the low half: the driver copies each parameter's own size
/// from its slot, little-endian).
///
/// # Safety
/// The parameters must be the kernel's, in order, with every pointer valid for what the
/// kernel does with it.
pub(crate) unsafe fn launch_raw(
    f: &CudaFunction,
    grid: (u32, u32, u32),
    threads: u32,
    smem: u32,
    stream: cudarc::driver::sys::CUstream,
    params: &[u64],
) -> std::result::Result<(), cudarc::driver::DriverError> {
    let mut slots = params.to_vec();
    let mut ptrs: Vec<*mut std::ffi::c_void> = slots
        .iter_mut()
        .map(|s| (s as *mut u64).cast::<std::ffi::c_void>())
        .collect();
    // SAFETY: the caller's promise; the slots outlive the call, which copies them.
    unsafe {
        cudarc::driver::result::launch_kernel(
            f.cu_function(),
            grid,
            (threads, 1, 1),
            smem,
            stream,
            &mut ptrs,
        )
    }
}

/// Queues the row kernel `name` (its function, geometry, module key and launch shape) with raw
/// `params` on a caller's stream of `dev`, a failure described as [`describe`] does. The
/// device's context is made current first: a raw launch, unlike cudarc's, does not, and the
/// caller's thread may have none.
///
/// # Safety
/// As [`launch_raw`].
pub(crate) unsafe fn queue(
    dev: &crate::Device,
    name: &str,
    (function, geometry, key, l): (&CudaFunction, Geometry, &str, &LaunchConfig),
    stream: cudarc::driver::sys::CUstream,
    params: &[u64],
) -> Result<()> {
    dev.context()
        .bind_to_thread()
        .context(|| "binding the device's context".into())?;
    // SAFETY: the caller's promise.
    unsafe {
        launch_raw(
            function,
            l.grid_dim,
            l.block_dim.0,
            l.shared_mem_bytes,
            stream,
            params,
        )
    }
    .context(|| describe(name, function, geometry, key))?;
    Ok(())
}
