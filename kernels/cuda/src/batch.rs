//! The batch engine API on the device: a step's attention over one layer's paged pool that an
//! engine keeps in its own device memory, planned once on the host and run on the engine's
//! stream with no allocation, no upload and no host synchronisation, so a step can be captured
//! in a CUDA graph and replayed with other tables and lengths.
//!
//! **What stays on the device.** The engine's pools (K and V bytes, the layout of
//! [`crate::CacheLayout::Paged`]: row `(slot, head)` at byte `(slot · n_kv_heads + head) ·
//! row_bytes`, `slot = page · page_tokens + offset`), its queries and output, and the step's
//! `query_start_loc`, `seq_lens`, optional `q_positions` and page tables (vLLM's rectangular
//! `block_table`, FlashInfer's CSR `indptr / indices`, or none: sequence `b` owns page `b`).
//! The host never reads them: [`BatchPlan`] fixes what the host knows (the number of sequences,
//! bounds on rows and lengths, the parameters), and a first kernel turns the device arrays into
//! each query row's length, position and table offset in the caller's workspace.
//!
//! **Semantics** (the CPU pool's, `rotq::pool::Batch`): sequence `b`'s query rows are
//! `query_start_loc[b] .. query_start_loc[b + 1]` of `q` (`[max_rows, h_q, head_dim]`); its
//! keys are its `seq_lens[b]` tokens; its first row sits at `q_positions[b]` if given, else at
//! `seq_lens[b] − n_q` (the rows are its newest tokens, appended before the attention). The
//! output is `[max_rows, h_q, v_dim]` with V's rotation undone, the log-sum-exp `[max_rows,
//! h_q]`; rows past `query_start_loc[B]` get zeros and `−∞`. An optional additive mask
//! (`[max_rows, stride]`, [`BatchShape::mask`]) is added to the scores after the soft-cap. Rows of a prefill chunk run
//! through the decode kernel (each row reads its visible keys once): right for decode-heavy
//! steps with short chunks; a long prefill is [`CudaAttention::prefill`]'s.
//!
//! **Queued work outlives the call**, as everywhere on a stream: `run_batch` is `unsafe`
//! because the buffers (and the plan) must stay allocated until the work, or a graph that
//! captured it, has run; a `DeviceBuf` borrowed from a cudarc slice does not ensure that.
//!
//! **The contract on device data** (the host cannot see it without a synchronisation): offsets
//! that start at 0 and never decrease, lengths within their tables and the plan's
//! `max_seq_len`, pages inside the pool. A step that breaks it does not corrupt memory: the
//! first kernel gives the offending sequences' rows no key and sets a bit of a status word in
//! the workspace, which [`BatchPlan::status`] reads (checking every page entry costs a pass
//! over the tables: [`BatchShape::checked`], on by default in debug builds).
//!
//! ```no_run
//! use rotq_cuda::batch::{BatchShape, DeviceBatch, DeviceBuf, DeviceStream, DeviceTables, PoolGeometry, TablesKind};
//! use rotq_cuda::{CudaAttention, Device};
//! use rotq_reference::{KvFormat, Rotation, RotationPlan};
//! let dev = Device::open("cuda:0")?;
//! let attn = CudaAttention::new(&dev, &RotationPlan { qk: Some(Rotation::hadamard(128)?), v: None })?;
//! let pool = PoolGeometry { k_format: KvFormat::Q4_0, v_format: KvFormat::Q8_0, n_kv_heads: 8,
//!     head_dim: 128, v_dim: 128, n_pages: 4096, page_tokens: 16 };
//! // 16 sequences, one decode row each, up to 8192 tokens and 512 pages each.
//! let shape = BatchShape::decode(16, 32, 8192, TablesKind::Block { max_blocks: 512 });
//! let plan = attn.plan_batch::<half::f16>(&dev, &pool, &shape)?;
//! let s = dev.stream();
//! // The engine's buffers (here allocated through cudarc; raw pointers: DeviceBuf::from_raw).
//! let k = s.alloc_zeros::<u8>(pool.k_bytes()?).unwrap();
//! let v = s.alloc_zeros::<u8>(pool.v_bytes()?).unwrap();
//! let q = s.alloc_zeros::<half::f16>(plan.q_len()).unwrap();
//! let out = s.alloc_zeros::<half::f16>(plan.out_len()).unwrap();
//! let ws = s.alloc_zeros::<u8>(plan.workspace_bytes()).unwrap();
//! let qsl = s.clone_htod(&(0..=16u32).collect::<Vec<_>>()).unwrap();
//! let lens = s.clone_htod(&[100u32; 16]).unwrap();
//! let table = s.clone_htod(&(0..16 * 512u32).collect::<Vec<_>>()).unwrap();
//! let batch = DeviceBatch {
//!     query_start_loc: DeviceBuf::of(&qsl), seq_lens: DeviceBuf::of(&lens), q_positions: None,
//!     tables: DeviceTables::Block { table: DeviceBuf::of(&table), max_blocks: 512 },
//!     mask: None,
//! };
//! // SAFETY: the buffers outlive the queued work (the status call below waits for it).
//! unsafe {
//!     attn.run_batch(&plan, &DeviceStream::of(s), &DeviceBuf::of(&q), &DeviceBuf::of(&k),
//!         &DeviceBuf::of(&v), &batch, &DeviceBuf::of(&ws), &DeviceBuf::of(&out), None)?;
//! }
//! plan.status(&DeviceStream::of(s), &DeviceBuf::of(&ws))?; // the device-side checks
//! # Ok::<(), rotq_cuda::CudaError>(())
//! ```

use crate::attention::{describe, CudaAttention, RotArgs};
use crate::decode_module::{DecodeCall, Shape};
use crate::device::Device;
use crate::error::{Context, CudaError, Result};
use crate::matrix::RawMatrixPass;
use crate::rotation::GpuElement;
use cudarc::driver::sys::{self, CUpointer_attribute};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr};
use rotq_reference::{AttentionParams, Error, KvFormat};
use std::ffi::c_void;
use std::marker::PhantomData;

/// A caller's device buffer of `len` elements of `T`: an address and a length, checked once
/// against the driver's record of the allocation. The lifetime ties one made from a cudarc
/// slice to it; one made from a raw pointer carries the caller's promise instead.
///
/// ```no_run
/// use rotq_cuda::batch::DeviceBuf;
/// let dev = rotq_cuda::Device::open("cuda:0")?;
/// let x = dev.stream().alloc_zeros::<f32>(1024).unwrap();
/// let a = DeviceBuf::of(&x);
/// // The same memory through its raw address, as an engine holding a torch tensor has it.
/// // SAFETY: the allocation lives as long as `b` is used.
/// let b = unsafe { DeviceBuf::<f32>::from_raw(&dev, a.ptr(), 1024)? };
/// assert_eq!(b.len(), 1024);
/// # Ok::<(), rotq_cuda::CudaError>(())
/// ```
#[derive(Debug)]
pub struct DeviceBuf<'a, T> {
    ptr: u64,
    len: usize,
    ordinal: usize,
    _data: PhantomData<&'a [T]>,
}

impl<T> Clone for DeviceBuf<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DeviceBuf<'_, T> {}

impl<'a, T> DeviceBuf<'a, T> {
    /// The buffer of a cudarc slice (borrowed for as long as the `DeviceBuf` lives).
    pub fn of(slice: &'a CudaSlice<T>) -> Self {
        let (ptr, _record) = slice.device_ptr(slice.stream());
        Self {
            ptr,
            len: slice.len(),
            ordinal: slice.ordinal(),
            _data: PhantomData,
        }
    }

    /// A buffer at a raw device address (a torch tensor's `data_ptr()`, a `cudaMalloc`
    /// result). Refused with a typed error: an address the driver does not know as device
    /// memory, one of another device ([`CudaError::WrongDevice`]), one not aligned for `T`, and
    /// `len` elements that run past the end of the allocation.
    ///
    /// # Safety
    /// The memory must stay allocated, and hold valid `T`s where the kernels read it, for as
    /// long as any run (or captured graph) that uses this buffer may execute.
    pub unsafe fn from_raw(dev: &Device, ptr: u64, len: usize) -> Result<DeviceBuf<'static, T>> {
        let ordinal = dev.context().ordinal();
        let size = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or(CudaError::Input(Error::Overflow("device buffer size")))?;
        if size == 0 {
            return Ok(DeviceBuf {
                ptr,
                len,
                ordinal,
                _data: PhantomData,
            });
        }
        if !ptr.is_multiple_of(std::mem::align_of::<T>() as u64) {
            return Err(bad(
                "device pointer",
                format!(
                    "{ptr:#x} is not aligned to {} bytes",
                    std::mem::align_of::<T>()
                ),
            ));
        }
        dev.context()
            .bind_to_thread()
            .context(|| "binding the device's context".into())?;
        let attr = |a: CUpointer_attribute| -> Result<u64> {
            let mut v = 0u64;
            // SAFETY: the attribute's value (an int for the ordinal, a pointer or size_t for the
            // range) fits the 8 bytes given, which are zeroed first; `ptr` is only looked up.
            unsafe { sys::cuPointerGetAttribute((&mut v as *mut u64).cast::<c_void>(), a, ptr) }
                .result()
                .map_err(|e| {
                    bad(
                        "device pointer",
                        format!("{ptr:#x} is not device memory the driver knows ({e:?})"),
                    )
                })?;
            Ok(v)
        };
        let found = attr(CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL)? as u32 as usize;
        if found != ordinal {
            return Err(CudaError::WrongDevice {
                expected: ordinal,
                actual: found,
            });
        }
        let start = attr(CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR)?;
        let range = attr(CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE)?;
        let room = (start + range).saturating_sub(ptr) as usize;
        if size > room {
            return Err(Error::LengthMismatch {
                what: "device buffer bytes within its allocation",
                expected: size,
                actual: room,
            }
            .into());
        }
        Ok(DeviceBuf {
            ptr,
            len,
            ordinal,
            _data: PhantomData,
        })
    }

    /// The device's ordinal.
    pub(crate) fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Elements of `T`.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A stream the runs are queued on: the device's, a cudarc stream, or the engine's own
/// (`torch.cuda.current_stream().cuda_stream`, a `cudaStream_t`).
///
/// ```no_run
/// let dev = rotq_cuda::Device::open("cuda:0")?;
/// let s = rotq_cuda::batch::DeviceStream::of(dev.stream());
/// # let _ = s;
/// # Ok::<(), rotq_cuda::CudaError>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct DeviceStream<'a> {
    raw: sys::CUstream,
    ordinal: usize,
    _stream: PhantomData<&'a CudaStream>,
}

impl<'a> DeviceStream<'a> {
    /// The device's ordinal.
    pub(crate) fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The raw handle.
    pub(crate) fn raw(&self) -> sys::CUstream {
        self.raw
    }

    /// A cudarc stream.
    pub fn of(stream: &'a CudaStream) -> Self {
        Self {
            raw: stream.cu_stream(),
            ordinal: stream.context().ordinal(),
            _stream: PhantomData,
        }
    }

    /// A raw stream handle of `dev`'s context (null: the legacy default stream). A stream of
    /// another context is a typed error.
    ///
    /// # Safety
    /// The stream must stay alive while runs queued on it may execute.
    pub unsafe fn from_raw(dev: &Device, raw: sys::CUstream) -> Result<DeviceStream<'static>> {
        dev.context()
            .bind_to_thread()
            .context(|| "binding the device's context".into())?;
        if !raw.is_null() {
            let mut ctx: sys::CUcontext = std::ptr::null_mut();
            // SAFETY: the caller promises a live stream; the driver writes one handle.
            unsafe { sys::cuStreamGetCtx(raw, &mut ctx) }
                .result()
                .map_err(|e| bad("stream", format!("not a stream the driver knows ({e:?})")))?;
            if ctx != dev.context().cu_ctx() {
                return Err(bad(
                    "stream",
                    format!("it belongs to another context than {}'s", dev.info().id),
                ));
            }
        }
        Ok(DeviceStream {
            raw,
            ordinal: dev.context().ordinal(),
            _stream: PhantomData,
        })
    }
}

/// Where a pool is and what it holds: `n_pages` pages of `page_tokens` tokens, each token
/// `n_kv_heads` rows of K (`head_dim` values in `k_format`) and of V.
///
/// ```
/// use rotq_cuda::batch::PoolGeometry;
/// use rotq_reference::KvFormat;
/// let g = PoolGeometry { k_format: KvFormat::Q8_0, v_format: KvFormat::Q4_0, n_kv_heads: 8,
///     head_dim: 128, v_dim: 128, n_pages: 1024, page_tokens: 16 };
/// assert_eq!(g.k_bytes()?, 1024 * 16 * 8 * 4 * 34);
/// # Ok::<(), rotq_reference::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeometry {
    /// Format of the K rows.
    pub k_format: KvFormat,
    /// Format of the V rows.
    pub v_format: KvFormat,
    /// KV heads per token.
    pub n_kv_heads: usize,
    /// Values per K row.
    pub head_dim: usize,
    /// Values per V row.
    pub v_dim: usize,
    /// Pages in the pool.
    pub n_pages: usize,
    /// Tokens per page.
    pub page_tokens: usize,
}

impl PoolGeometry {
    /// Bytes of the K pool.
    pub fn k_bytes(&self) -> std::result::Result<usize, Error> {
        self.bytes(self.k_format, self.head_dim)
    }

    /// Bytes of the V pool.
    pub fn v_bytes(&self) -> std::result::Result<usize, Error> {
        self.bytes(self.v_format, self.v_dim)
    }

    fn bytes(&self, format: KvFormat, dim: usize) -> std::result::Result<usize, Error> {
        let row = format.row_bytes(dim)?;
        self.n_pages
            .checked_mul(self.page_tokens)
            .and_then(|x| x.checked_mul(self.n_kv_heads))
            .and_then(|x| x.checked_mul(row))
            .ok_or(Error::Overflow("pool bytes"))
    }
}

/// How the step's page tables are laid out (fixed by the plan; their contents may change).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TablesKind {
    /// No table: sequence `b`'s tokens are page `b` (a contiguous cache of `page_tokens`
    /// tokens per sequence).
    Contiguous,
    /// vLLM's `block_table`: `max_blocks` entries per sequence.
    Block {
        /// Entries per sequence.
        max_blocks: usize,
    },
    /// FlashInfer's CSR tables: sequence `b`'s pages are `indices[indptr[b] .. indptr[b + 1]]`.
    Csr,
}

/// The step's device arrays (u32; i32 arrays of non-negative values have the same bits).
#[derive(Clone, Copy, Debug)]
pub struct DeviceBatch<'a> {
    /// `B + 1` offsets of the sequences' query rows.
    pub query_start_loc: DeviceBuf<'a, u32>,
    /// `B` lengths (tokens in each sequence's pages, the new ones included).
    pub seq_lens: DeviceBuf<'a, u32>,
    /// `B` positions of each sequence's first query row (`None`: `len − n_q`); given only if
    /// the plan's [`BatchShape::q_positions`] says so.
    pub q_positions: Option<DeviceBuf<'a, u32>>,
    /// The page tables.
    pub tables: DeviceTables<'a>,
    /// The additive mask `[max_rows, stride]` (f32; query row `r`, key `j` of its sequence at
    /// `r · stride + j`), given only if the plan's [`BatchShape::mask`] says so.
    pub mask: Option<DeviceBuf<'a, f32>>,
}

/// The step's page tables on the device.
#[derive(Clone, Copy, Debug)]
pub enum DeviceTables<'a> {
    /// See [`TablesKind::Contiguous`].
    Contiguous,
    /// `[B, max_blocks]` page numbers.
    Block {
        /// The table.
        table: DeviceBuf<'a, u32>,
        /// Entries per sequence.
        max_blocks: usize,
    },
    /// CSR page lists.
    Csr {
        /// `B + 1` offsets into `indices`.
        indptr: DeviceBuf<'a, u32>,
        /// Page numbers.
        indices: DeviceBuf<'a, u32>,
    },
}

impl DeviceTables<'_> {
    fn kind(&self) -> TablesKind {
        match self {
            Self::Contiguous => TablesKind::Contiguous,
            Self::Block { max_blocks, .. } => TablesKind::Block {
                max_blocks: *max_blocks,
            },
            Self::Csr { .. } => TablesKind::Csr,
        }
    }
}

/// What the host knows of a step when it plans: sizes and bounds, not the device arrays.
///
/// ```
/// use rotq_cuda::batch::{BatchShape, TablesKind};
/// let s = BatchShape::decode(16, 32, 32768, TablesKind::Csr);
/// assert_eq!((s.seqs, s.max_rows), (16, 16));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct BatchShape {
    /// Sequences `B` (a graph captured at B replays with B; pad with empty sequences).
    pub seqs: usize,
    /// Query rows the buffers hold (`q`, `out`, `lse`); `query_start_loc[B]` may be less.
    pub max_rows: usize,
    /// The longest sequence any run of this plan may see (the work is split for it).
    pub max_seq_len: usize,
    /// Query heads (a multiple of the pool's KV heads).
    pub h_q: usize,
    /// Scale, causality, window and soft-cap (`pos_offset` unused: positions are per row).
    pub params: AttentionParams,
    /// Whether runs give `q_positions`.
    pub q_positions: bool,
    /// The tables' layout.
    pub tables: TablesKind,
    /// Check every page entry a run uses against the pool (a pass over the tables).
    pub checked: bool,
    /// `Some(stride)`: runs give an additive mask of `stride` values a query row (at least
    /// `max_seq_len`), added to each score after the soft-cap, as llama.cpp's KQ mask (ALiBi
    /// biases, tree or custom attention); a −∞ entry hides its key, and a row whose every
    /// visible key is hidden gets zeros. Masked steps run the f32 decode kernel.
    pub mask: Option<usize>,
}

impl BatchShape {
    /// A causal decode step: `seqs` sequences of one query row each.
    pub fn decode(seqs: usize, h_q: usize, max_seq_len: usize, tables: TablesKind) -> Self {
        Self {
            seqs,
            max_rows: seqs,
            max_seq_len,
            h_q,
            params: AttentionParams {
                causal: true,
                ..Default::default()
            },
            q_positions: false,
            tables,
            checked: cfg!(debug_assertions),
            mask: None,
        }
    }
}

/// A planned step: the kernels, their launch shapes and the workspace's layout, for one pool
/// geometry, element type and [`BatchShape`]. Made once (it may compile kernels); every
/// [`CudaAttention::run_batch`] with it only queues three kernels and a 4-byte memset (and
/// a matrix pass before and after them for an explicit-matrix rotation).
#[derive(Debug)]
pub struct BatchPlan {
    ctx: std::sync::Arc<cudarc::driver::CudaContext>,
    ordinal: usize,
    elem: u32,
    pool: PoolGeometry,
    shape: BatchShape,
    rows: Functions,
    /// The rotations' device buffers (kept alive) and their raw parameters, taken when
    /// planning so that a run (maybe under graph capture) touches no cudarc buffer.
    _rotations: (RotArgs, RotArgs),
    qrot: (i32, i32, u64, u64, f32),
    vrot: (i32, i32, u64, u64, f32),
    decode_grid: (u32, u32, u32),
    decode_threads: u32,
    decode_smem: u32,
    combine_smem: u32,
    split_tokens: i64,
    n_part: i64,
    scale: f32,
    /// Explicit-matrix rotations as passes of their own: the queries into the workspace at
    /// the offset given before the kernels, the output in place after them.
    q_matrix: Option<(RawMatrixPass, u64)>,
    v_matrix: Option<RawMatrixPass>,
    /// Workspace offsets in bytes: lens, pos, row tables (i64 each), status (u32), partials.
    lens: u64,
    pos: u64,
    row_table: u64,
    status: u64,
    part: u64,
    bytes: usize,
}

#[derive(Debug)]
struct Functions {
    prepare: CudaFunction,
    decode: CudaFunction,
    combine: CudaFunction,
    /// (kernel name, module key) for errors.
    names: (&'static str, String),
}

/// The workspace's status bits and what each says.
const STATUS: [(u32, &str); 5] = [
    (
        1,
        "query_start_loc (or CSR indptr) does not start at 0, decreases, or passes its bound",
    ),
    (2, "a sequence is longer than its page table"),
    (4, "a page entry lies outside the pool"),
    (
        8,
        "a sequence has more query rows than tokens and no q_positions",
    ),
    (16, "a sequence is longer than the plan's max_seq_len"),
];

impl BatchPlan {
    /// Bytes of workspace a run needs (the caller's device memory, reused step after step).
    pub fn workspace_bytes(&self) -> usize {
        self.bytes
    }

    /// Elements of the queries, `[max_rows, h_q, head_dim]`.
    pub fn q_len(&self) -> usize {
        self.shape.max_rows * self.shape.h_q * self.pool.head_dim
    }

    /// Elements of the output, `[max_rows, h_q, v_dim]`.
    pub fn out_len(&self) -> usize {
        self.shape.max_rows * self.shape.h_q * self.pool.v_dim
    }

    /// f32 values of log-sum-exp, `[max_rows, h_q]`.
    pub fn lse_len(&self) -> usize {
        self.shape.max_rows * self.shape.h_q
    }

    /// The shape it was planned for.
    pub fn shape(&self) -> &BatchShape {
        &self.shape
    }

    /// The device-side checks of the last run queued with `workspace` (this synchronises
    /// `stream`): `Ok` if every sequence kept the contract, else a typed error naming what
    /// broke it (those sequences' rows saw no key; nothing was read or written out of place).
    pub fn status(&self, stream: &DeviceStream<'_>, workspace: &DeviceBuf<'_, u8>) -> Result<()> {
        if workspace.len < self.bytes {
            return Err(Error::LengthMismatch {
                what: "workspace bytes",
                expected: self.bytes,
                actual: workspace.len,
            }
            .into());
        }
        let mut word = [0u32];
        // SAFETY: the workspace holds the plan's layout (checked length); the status word is 4
        // bytes at its offset; the copy completes before `word` is read (synchronised).
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                &mut word,
                workspace.ptr + self.status,
                stream.raw,
            )
            .context(|| "reading the batch status".into())?;
            cudarc::driver::result::stream::synchronize(stream.raw)
                .context(|| "waiting for the batch".into())?;
        }
        match word[0] {
            0 => Ok(()),
            w => Err(bad(
                "batch (device-side check)",
                STATUS
                    .iter()
                    .filter(|(bit, _)| w & bit != 0)
                    .map(|(_, what)| *what)
                    .collect::<Vec<_>>()
                    .join("; "),
            )),
        }
    }
}

impl CudaAttention {
    /// Plans a step of `shape` over pools of `pool` with queries and output of type `T`: checks
    /// everything the host knows (sizes, formats, the rotation plan's dimensions, parameters),
    /// picks the kernel configuration and splits for `shape.max_seq_len`, compiles the kernels
    /// if needed and lays out the workspace. An explicit-matrix rotation runs as passes of its
    /// own around the kernels (the queries rotated into the workspace, the output in place).
    pub fn plan_batch<T: GpuElement>(
        &self,
        dev: &Device,
        pool: &PoolGeometry,
        shape: &BatchShape,
    ) -> Result<BatchPlan> {
        let ordinal = dev.context().ordinal();
        if ordinal != self.ordinal() {
            return Err(CudaError::WrongDevice {
                expected: self.ordinal(),
                actual: ordinal,
            });
        }
        shape.params.validate()?;
        // Rows are grid dimensions y and z of the kernels (at most 65,535 each).
        if !(1..=65_535).contains(&shape.max_rows) || shape.seqs == 0 {
            return Err(bad(
                "batch shape",
                format!(
                    "{} sequences and {} rows: at least one of each, at most 65535 rows",
                    shape.seqs, shape.max_rows
                ),
            ));
        }
        let (d, d_v, h_kv, h_q) = (pool.head_dim, pool.v_dim, pool.n_kv_heads, shape.h_q);
        for (name, v) in [
            ("n_kv_heads", h_kv),
            ("page_tokens", pool.page_tokens),
            ("h_q", h_q),
        ] {
            if v == 0 {
                return Err(bad(name, "must be at least 1".into()));
            }
        }
        if !h_q.is_multiple_of(h_kv) || h_q / h_kv > crate::MAX_GROUP {
            return Err(Error::Shape(format!(
                "h_q {h_q} must be a multiple of h_kv {h_kv}, at most {} times it",
                crate::MAX_GROUP
            ))
            .into());
        }
        crate::check_head_dim(d, "CUDA decode K head")?;
        crate::check_head_dim(d_v, "CUDA decode V head")?;
        crate::check_format(pool.k_format, d)?;
        crate::check_format(pool.v_format, d_v)?;
        self.rotation_plan().check_dims(d, d_v)?;
        if let TablesKind::Contiguous = shape.tables {
            if shape.max_seq_len > pool.page_tokens {
                return Err(bad(
                    "max_seq_len",
                    format!(
                        "{} tokens, but a contiguous sequence holds page_tokens = {}",
                        shape.max_seq_len, pool.page_tokens
                    ),
                ));
            }
        }
        // Every index the kernels form fits an i64; sizes below fit u32 grids.
        let fits = |x: Option<usize>, what| {
            x.filter(|&v| i64::try_from(v).is_ok())
                .ok_or(CudaError::Input(Error::Overflow(what)))
        };
        fits(pool.k_bytes().ok(), "K pool bytes")?;
        fits(pool.v_bytes().ok(), "V pool bytes")?;
        fits(
            shape
                .max_rows
                .checked_mul(h_q)
                .and_then(|x| x.checked_mul(d.max(d_v))),
            "queries",
        )?;
        if let TablesKind::Block { max_blocks } = shape.tables {
            fits(shape.seqs.checked_mul(max_blocks), "block table")?;
        }

        if let Some(stride) = shape.mask {
            if stride < shape.max_seq_len {
                return Err(bad(
                    "mask",
                    format!(
                        "a row stride of {stride} is shorter than max_seq_len {}",
                        shape.max_seq_len
                    ),
                ));
            }
            fits(shape.max_rows.checked_mul(stride), "mask")?;
        }
        let group = h_q / h_kv;
        let longest = shape.max_seq_len;
        let mut config =
            self.config_for(dev, pool.k_format, d, h_kv, group, longest, shape.max_rows);
        // The mask is the f32 kernel's.
        config.tensor_cores &= shape.mask.is_none();
        let call = DecodeCall {
            elem: T::ELEM,
            k_format: pool.k_format,
            v_format: pool.v_format,
            d,
            d_v,
            group,
            h_kv,
            shared: false,
        };
        let kshape = Shape::fit(config, call, dev.info().max_shared_per_block)?;
        let layout = kshape.layout()?;
        // Splits for the longest visible range, as `decode` picks them for its longest.
        let (splits, split_tokens) = kshape.splits(
            config.splits,
            dev.info().multiprocessors as usize,
            (h_kv / kshape.heads()) * shape.max_rows,
            longest,
        );
        let n_part = splits * kshape.streams();

        let (key, src) = kshape.source_for(shape.mask.is_some())?;
        let name = if kshape.tensor_cores {
            "decode_attention_mma"
        } else {
            "decode_attention"
        };
        let functions = Functions {
            prepare: crate::kernel::function(dev, &key, &src, "batch_rows", 0)?,
            decode: crate::kernel::function(dev, &key, &src, name, layout.smem)?,
            combine: crate::kernel::function(
                dev,
                &key,
                &src,
                "decode_combine",
                layout.combine_smem,
            )?,
            names: (name, key),
        };
        let grid =
            |v: usize| u32::try_from(v).map_err(|_| CudaError::Input(Error::Overflow("grid size")));
        // (max_rows is at most 65,535, checked above.)
        let decode_grid = (
            grid(h_kv / kshape.heads())?,
            grid(splits)?,
            shape.max_rows as u32,
        );
        grid(h_q)?;

        // The workspace: three i64 per row, the status word, then the partials (256-byte
        // aligned).
        let rows = shape.max_rows as u64;
        let (lens, pos, row_table) = (0, 8 * rows, 16 * rows);
        let status = 24 * rows;
        let part = (status + 4).div_ceil(256) * 256;
        let part_floats = shape
            .max_rows
            .checked_mul(h_q)
            .and_then(|x| x.checked_mul(n_part))
            .and_then(|x| x.checked_mul(layout.part_floats))
            .ok_or(Error::Overflow("partial results"))?;
        let mut bytes = (part as usize)
            .checked_add(4 * part_floats)
            .ok_or(Error::Overflow("workspace"))?;
        // Explicit matrices: the queries' rows rotated into the workspace (after the
        // partials, 256-byte aligned), and the output's rotated back in place.
        let q_rotated = bytes.div_ceil(256) * 256;
        let rows_q = shape.max_rows * h_q;
        let q_matrix = match self.qk_rotation().and_then(|r| r.matrix()) {
            Some(m) => {
                bytes = q_rotated
                    .checked_add(rows_q * d * std::mem::size_of::<T>())
                    .ok_or(Error::Overflow("workspace"))?;
                Some((m.raw_pass::<T, T>(dev, rows_q, false)?, q_rotated as u64))
            }
            None => None,
        };
        let v_matrix = match self.v_rotation().and_then(|r| r.matrix()) {
            Some(m) => Some(m.raw_pass::<T, T>(dev, rows_q, true)?),
            None => None,
        };
        let (scale, _) = shape.params.f32_factors(d)?;
        let (qrot, vrot) = (
            RotArgs::of(dev, self.qk_rotation())?,
            RotArgs::of(dev, self.v_rotation())?,
        );
        // The rotations were uploaded on the device's stream; a caller's non-blocking stream
        // would not wait for them.
        dev.stream()
            .synchronize()
            .context(|| "waiting for the rotations' upload".into())?;
        Ok(BatchPlan {
            ctx: dev.context().clone(),
            ordinal,
            elem: T::ELEM,
            pool: *pool,
            shape: shape.clone(),
            rows: functions,
            qrot: qrot.raw(),
            vrot: vrot.raw(),
            _rotations: (qrot, vrot),
            decode_grid,
            decode_threads: 32 * kshape.warps as u32,
            decode_smem: layout.smem as u32,
            combine_smem: layout.combine_smem as u32,
            split_tokens: split_tokens as i64,
            n_part: n_part as i64,
            scale,
            q_matrix,
            v_matrix,
            lens,
            pos,
            row_table,
            status,
            part,
            bytes,
        })
    }

    /// Runs a planned step on `stream`: `q` `[max_rows, h_q, head_dim]` (unrotated), the pools
    /// `k` and `v` (the plan's geometry), the step's device arrays, the `workspace`
    /// ([`BatchPlan::workspace_bytes`]); writes `out` `[max_rows, h_q, v_dim]` and `lse`
    /// `[max_rows, h_q]` if given. Checks on the host only what it holds (every buffer's device
    /// and length, the pools' and workspace's 16-byte alignment, the tables' kind): a wrong one
    /// is a typed error before anything is queued. Queues a 4-byte memset and three kernels
    /// (five with explicit-matrix rotations); allocates, uploads and waits for nothing, so it
    /// can be captured in a CUDA graph.
    ///
    /// # Safety
    /// The work is queued, not done: every buffer, and the plan, must stay allocated until it
    /// has run on `stream` (and, captured in a graph, until the graph's last replay has run),
    /// and no other work may write the buffers it reads meanwhile. The device arrays must keep
    /// the module's contract; with [`BatchShape::checked`] off, a page entry outside the pool
    /// is read as if it were inside (with it on, the run reports it instead).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_batch<T: GpuElement>(
        &self,
        plan: &BatchPlan,
        stream: &DeviceStream<'_>,
        q: &DeviceBuf<'_, T>,
        k: &DeviceBuf<'_, u8>,
        v: &DeviceBuf<'_, u8>,
        batch: &DeviceBatch<'_>,
        workspace: &DeviceBuf<'_, u8>,
        out: &DeviceBuf<'_, T>,
        lse: Option<&DeviceBuf<'_, f32>>,
    ) -> Result<()> {
        if plan.elem != T::ELEM {
            return Err(bad("plan", "planned for another query element type".into()));
        }
        let mut ordinals = vec![
            self.ordinal(),
            stream.ordinal,
            q.ordinal,
            k.ordinal,
            v.ordinal,
            batch.query_start_loc.ordinal,
            batch.seq_lens.ordinal,
            workspace.ordinal,
            out.ordinal,
        ];
        ordinals.extend(batch.q_positions.map(|p| p.ordinal));
        ordinals.extend(batch.mask.map(|m| m.ordinal));
        ordinals.extend(lse.map(|l| l.ordinal));
        match batch.tables {
            DeviceTables::Contiguous => {}
            DeviceTables::Block { table, .. } => ordinals.push(table.ordinal),
            DeviceTables::Csr { indptr, indices } => {
                ordinals.extend([indptr.ordinal, indices.ordinal])
            }
        }
        if let Some(&actual) = ordinals.iter().find(|&&o| o != plan.ordinal) {
            return Err(CudaError::WrongDevice {
                expected: plan.ordinal,
                actual,
            });
        }
        let s = &plan.shape;
        if batch.tables.kind() != s.tables {
            return Err(bad(
                "tables",
                format!(
                    "planned for {:?}, given {:?}",
                    s.tables,
                    batch.tables.kind()
                ),
            ));
        }
        if batch.mask.is_some() != s.mask.is_some() {
            return Err(bad(
                "mask",
                format!(
                    "the plan says {}",
                    if s.mask.is_some() { "given" } else { "absent" }
                ),
            ));
        }
        if batch.q_positions.is_some() != s.q_positions {
            return Err(bad(
                "q_positions",
                format!(
                    "the plan says {}",
                    if s.q_positions { "given" } else { "absent" }
                ),
            ));
        }
        let need = |what: &'static str, expected: usize, actual: usize| -> Result<()> {
            if actual < expected {
                return Err(Error::LengthMismatch {
                    what,
                    expected,
                    actual,
                }
                .into());
            }
            Ok(())
        };
        need("queries [max_rows, h_q, head_dim]", plan.q_len(), q.len)?;
        need("output [max_rows, h_q, v_dim]", plan.out_len(), out.len)?;
        if let Some(l) = lse {
            need("log-sum-exp [max_rows, h_q]", plan.lse_len(), l.len)?;
        }
        need("K pool bytes", plan.pool.k_bytes()?, k.len)?;
        need("V pool bytes", plan.pool.v_bytes()?, v.len)?;
        need("workspace bytes", plan.bytes, workspace.len)?;
        // The kernels copy pool rows in 4- to 16-byte units and write 8-byte values into the
        // workspace.
        for (what, ptr) in [
            ("k pool", k.ptr),
            ("v pool", v.ptr),
            ("workspace", workspace.ptr),
        ] {
            if !ptr.is_multiple_of(16) {
                return Err(bad(
                    "device pointer",
                    format!("the {what} at {ptr:#x} is not 16-byte aligned"),
                ));
            }
        }
        need(
            "query_start_loc (B + 1)",
            s.seqs + 1,
            batch.query_start_loc.len,
        )?;
        need("seq_lens (B)", s.seqs, batch.seq_lens.len)?;
        if let Some(p) = &batch.q_positions {
            need("q_positions (B)", s.seqs, p.len)?;
        }
        if let (Some(m), Some(stride)) = (&batch.mask, s.mask) {
            need("mask [max_rows, stride]", s.max_rows * stride, m.len)?;
        }
        let (table, indptr, n_indices, kind, max_blocks) = match batch.tables {
            DeviceTables::Contiguous => (0, 0, 0i64, 0i32, 0i64),
            DeviceTables::Block { table, max_blocks } => {
                need(
                    "block table [B, max_blocks]",
                    s.seqs * max_blocks,
                    table.len,
                )?;
                (table.ptr, 0, 0, 1, max_blocks as i64)
            }
            DeviceTables::Csr { indptr, indices } => {
                need("indptr (B + 1)", s.seqs + 1, indptr.len)?;
                (indices.ptr, indptr.ptr, indices.len as i64, 2, 0)
            }
        };
        plan.ctx
            .bind_to_thread()
            .context(|| "binding the device's context".into())?;
        let (rows, ws) = (&plan.rows, workspace.ptr);
        let opt = |b: Option<DeviceBuf<'_, u32>>| b.map_or(0, |b| b.ptr);
        let checked = s.checked as i32;
        let prepare = [
            batch.query_start_loc.ptr,
            batch.seq_lens.ptr,
            opt(batch.q_positions),
            table,
            indptr,
            int(kind),
            max_blocks as u64,
            n_indices as u64,
            plan.pool.page_tokens as u64,
            plan.pool.n_pages as u64,
            s.seqs as u64,
            s.max_rows as u64,
            s.max_seq_len as u64,
            int(checked),
            ws + plan.lens,
            ws + plan.pos,
            ws + plan.row_table,
            ws + plan.status,
        ];
        let (q_log_p, q_m, q_base, q_signs, q_scale) = plan.qrot;
        // Under an explicit Q/K matrix the kernels read the queries rotated into the workspace.
        let q_ptr = match &plan.q_matrix {
            Some((_, rotated)) => ws + rotated,
            None => q.ptr,
        };
        let mut decode = vec![
            q_ptr,
            k.ptr,
            v.ptr,
            table,
            0,
            ws + plan.row_table,
            plan.pool.page_tokens as u64,
            ws + plan.lens,
            ws + plan.pos,
            plan.pool.n_kv_heads as u64,
            int(s.params.causal as i32),
            s.params.window.map_or(0, |w| w as u64),
            float(s.params.softcap.map_or(0.0, |c| c as f32)),
            float(plan.scale),
            int(q_log_p),
            int(q_m),
            q_base,
            q_signs,
            float(q_scale),
            plan.split_tokens as u64,
            s.max_rows as u64,
            ws + plan.part,
        ];
        if let (Some(m), Some(stride)) = (&batch.mask, s.mask) {
            decode.extend([m.ptr, stride as u64]);
        }
        let (v_log_p, v_m, v_base, v_signs, v_scale) = plan.vrot;
        let combine = [
            ws + plan.part,
            plan.n_part as u64,
            int(v_log_p),
            int(v_m),
            v_base,
            v_signs,
            float(v_scale),
            out.ptr,
            lse.map_or(0, |l| l.ptr),
        ];
        // A warp a row, four a block (max_rows is at most 65,535: the plan checked).
        let prepare_blocks = (32 * s.max_rows).div_ceil(128) as u32;
        let describe_all = |name: &str, f: &CudaFunction| describe(name, f, &rows.names.1);
        // SAFETY: the status word is 4 bytes inside the workspace (its length checked above).
        unsafe { cudarc::driver::result::memset_d8_async(ws + plan.status, 0, 4, stream.raw) }
            .context(|| "clearing the batch status".into())?;
        // SAFETY: every buffer is on the plan's device and at least as long as the plan needs
        // (checked above); `batch_rows` reads B + 1 offsets, B lengths and positions, and, for
        // rows it keeps, page entries inside their table's checked length (a CSR row's entries
        // are below indptr[B] ≤ n_indices, else the row is dropped); it writes three i64 per
        // row below max_rows and the status word. The decode kernel reads rows of q below
        // max_rows and, for kept rows, cache rows at pages the caller's contract (and, when
        // `checked`, the first kernel) keeps inside the pools, and, with a mask, the row's
        // values at its keys (below its length, at most max_seq_len, at most the stride; the
        // mask's length checked above); it writes the partials' layout,
        // which the workspace holds. The combine reads them and writes max_rows rows of `out`
        // and of `lse`. The three run in stream order.
        unsafe {
            if let Some((m, rotated)) = &plan.q_matrix {
                // Reads max_rows · h_q rows of q (its length checked), writes as many into the
                // workspace at `rotated` (laid out for them).
                m.launch(stream.raw, q.ptr, ws + rotated)?;
            }
            crate::kernel::launch_raw(
                &rows.prepare,
                (prepare_blocks, 1, 1),
                128,
                0,
                stream.raw,
                &prepare,
            )
            .context(|| describe_all("batch_rows", &rows.prepare))?;
            crate::kernel::launch_raw(
                &rows.decode,
                plan.decode_grid,
                plan.decode_threads,
                plan.decode_smem,
                stream.raw,
                &decode,
            )
            .context(|| describe_all(rows.names.0, &rows.decode))?;
            crate::kernel::launch_raw(
                &rows.combine,
                (s.h_q as u32, s.max_rows as u32, 1),
                128,
                plan.combine_smem,
                stream.raw,
                &combine,
            )
            .context(|| describe_all("decode_combine", &rows.combine))?;
            if let Some(m) = &plan.v_matrix {
                // The output's max_rows · h_q rows (its length checked), in place.
                m.launch(stream.raw, 0, out.ptr)?;
            }
        }
        Ok(())
    }
}

/// A 32-bit integer parameter in its 8-byte slot (the driver reads the first 4 bytes).
fn int(v: i32) -> u64 {
    u64::from(v as u32)
}

/// An f32 parameter in its 8-byte slot.
fn float(v: f32) -> u64 {
    u64::from(v.to_bits())
}

fn bad(name: &'static str, reason: String) -> CudaError {
    CudaError::Input(Error::InvalidParameter { name, reason })
}
