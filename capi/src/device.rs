//! ABI 2.3: the batch calls on the device (`rotq_cuda::batch` from C). A GPU engine keeps its
//! pools, queries, outputs, workspace, tables and lengths in device memory it allocated
//! (`cudaMalloc`, a torch tensor's `data_ptr()`) and runs on its own `cudaStream_t`:
//!
//! * [`rotq_device_plan_new`] plans once per batch shape, on a CUDA backend
//!   (`rotq_backend_open("cuda:N")`) and a codec (the pool's spec and rotations, as for the host
//!   calls): the sequence count, bounds on rows and lengths, the parameters, the tables' kind
//!   and the query element type are fixed there; [`rotq_device_plan_sizes`] gives the buffers'
//!   sizes.
//! * [`rotq_device_attention_run`] runs one layer: every pointer is checked with the driver
//!   (its device, and that the length fits its allocation), then three kernels (five with
//!   explicit-matrix rotations) are queued on the stream; nothing is allocated, copied or
//!   waited for, so the call can be captured in a CUDA graph and the graph replayed with new
//!   tables, lengths and queries in the same buffers.
//! * [`rotq_device_plan_status`] (it synchronises the stream) reports whether the last run kept
//!   the contract on device data that the host cannot check: offsets from 0 that never
//!   decrease, lengths within their tables and the plan's bound, pages inside the pool (with
//!   `checked`). A run that broke it wrote zeros for the offending rows and nothing out of place.
//!
//! The pool bytes are those of the host calls (`rotq_pool_append` on host memory, then a copy,
//! gives a device pool the device calls read). `capi/examples/device.c` captures a step in a
//! graph, replays it and checks it against the host calls.
//!
//! A library built without the `cuda` feature has these functions; they return
//! `ROTQ_STATUS_ERROR` saying so.

use super::v2::{RotqCodec, ROTQ_TABLES_BLOCK};
use super::{guard, invalid, RotqAttentionParams, RotqBackend, RotqStatus};
use std::ffi::{c_char, c_void};

/// [`RotqDeviceShape::tables`]: no table; sequence `b`'s tokens are page `b` (a contiguous
/// cache of `page_tokens` tokens per sequence).
pub const ROTQ_TABLES_CONTIGUOUS: u32 = 3;

/// What the host knows of a step on the device (fixed by the plan).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RotqDeviceShape {
    /// `sizeof(struct RotqDeviceShape)`.
    pub struct_size: usize,
    /// Sequences `B` of every run (pad with empty sequences).
    pub n_seqs: usize,
    /// Query rows the buffers hold; a run's `query_start_loc[B]` may be fewer.
    pub max_rows: usize,
    /// The longest sequence any run may see.
    pub max_seq_len: usize,
    /// Query heads (a multiple of the pool's KV heads).
    pub h_q: usize,
    /// Scale, causality, window and soft-cap (`pos_offset` must be 0).
    pub params: RotqAttentionParams,
    /// [`ROTQ_TABLES_BLOCK`], [`ROTQ_TABLES_CSR`] or [`ROTQ_TABLES_CONTIGUOUS`].
    pub tables: u32,
    /// Block tables: entries per sequence.
    pub max_blocks: usize,
    /// Whether runs give `q_positions`.
    pub q_positions: bool,
    /// Check every page entry a run uses against the pool (a pass over the tables).
    pub checked: bool,
    /// The queries' and output's element type: "f16" (null), "bf16" or "f32".
    pub elem: *const c_char,
    /// (ABI 2.4) Values a row of the additive mask holds (at least `max_seq_len`); 0: runs
    /// take no mask. A masked plan runs the f32 decode kernel.
    pub mask_stride: usize,
}

impl Default for RotqDeviceShape {
    /// No sequences yet, causal, block tables, f16, the struct's size set.
    fn default() -> Self {
        Self {
            struct_size: size_of::<Self>(),
            n_seqs: 0,
            max_rows: 0,
            max_seq_len: 0,
            h_q: 0,
            params: super::causal_params(),
            tables: ROTQ_TABLES_BLOCK,
            max_blocks: 0,
            q_positions: false,
            checked: false,
            elem: std::ptr::null(),
            mask_stride: 0,
        }
    }
}

/// A step's device arrays (`uint32_t`, or `int32_t` of non-negative values: the same bits).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RotqDeviceBatch {
    /// `sizeof(struct RotqDeviceBatch)`.
    pub struct_size: usize,
    /// `B + 1` offsets of the sequences' query rows.
    pub query_start_loc: *const u32,
    /// `B` lengths.
    pub seq_lens: *const u32,
    /// `B` positions of each sequence's first query row (null: `len − n_q`), if planned so.
    pub q_positions: *const u32,
    /// Block tables: `[B, max_blocks]` page numbers.
    pub block_table: *const u32,
    /// CSR: `B + 1` offsets into `indices`.
    pub indptr: *const u32,
    /// CSR: page numbers.
    pub indices: *const u32,
    /// CSR: length of `indices`.
    pub n_indices: usize,
    /// (ABI 2.4) The additive mask, `float [max_rows, mask_stride]` (query row `r`, key `j` of
    /// its sequence at `r · mask_stride + j`), added to the scores after the soft-cap, −∞
    /// hiding a key (llama.cpp's KQ mask); given exactly when the plan has a `mask_stride`.
    pub mask: *const f32,
    /// (ABI 2.4) Floats at `mask`.
    pub mask_len: usize,
}

impl Default for RotqDeviceBatch {
    /// Null arrays, the struct's size set.
    fn default() -> Self {
        Self {
            struct_size: size_of::<Self>(),
            query_start_loc: std::ptr::null(),
            seq_lens: std::ptr::null(),
            q_positions: std::ptr::null(),
            block_table: std::ptr::null(),
            indptr: std::ptr::null(),
            indices: std::ptr::null(),
            n_indices: 0,
            mask: std::ptr::null(),
            mask_len: 0,
        }
    }
}

/// An opaque plan of a step on the device ([`rotq_device_plan_new`]); free it with
/// [`rotq_device_plan_free`]. Shared freely between threads.
pub struct RotqDevicePlan {
    #[cfg(feature = "cuda")]
    inner: on_cuda::Planned,
}

/// Plans a step of `shape` on the backend's device for the codec's pools and rotations; stores
/// the handle in `*plan` (null on failure). Everything the host can check is checked here.
///
/// Threads: any thread, at once with any call on these handles.
///
/// # Safety
/// `backend` and `codec` are live handles, `shape` a valid struct (its `elem` null or a
/// NUL-terminated name), `plan` a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn rotq_device_plan_new(
    backend: *const RotqBackend,
    codec: *const RotqCodec,
    shape: *const RotqDeviceShape,
    plan: *mut *mut RotqDevicePlan,
) -> RotqStatus {
    guard(|| {
        if plan.is_null() {
            return Err(invalid("plan is null"));
        }
        // SAFETY: non-null, and the caller guarantees it is writable.
        unsafe { *plan = std::ptr::null_mut() };
        #[cfg(feature = "cuda")]
        {
            // SAFETY: the caller's guarantees, passed on.
            let inner = unsafe { on_cuda::plan(backend, codec, shape)? };
            // SAFETY: non-null, and the caller guarantees it is writable.
            unsafe { *plan = Box::into_raw(Box::new(RotqDevicePlan { inner })) };
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (backend, codec, shape);
            Err(no_cuda())
        }
    })
}

/// The sizes of a plan's buffers: the workspace in bytes, the queries and the output in
/// elements of the plan's type (`max_rows × h_q × head_dim`, `max_rows × h_q × v_dim`), the
/// log-sum-exp in floats (`max_rows × h_q`). Each out pointer may be null.
///
/// Threads: any thread.
///
/// # Safety
/// `plan` is a live handle; each out pointer is null or valid.
#[no_mangle]
pub unsafe extern "C" fn rotq_device_plan_sizes(
    plan: *const RotqDevicePlan,
    workspace_bytes: *mut usize,
    q_elems: *mut usize,
    out_elems: *mut usize,
    lse_floats: *mut usize,
) -> RotqStatus {
    guard(|| {
        // SAFETY: null or a live handle (the caller's guarantee).
        let p = unsafe { plan.as_ref() }.ok_or_else(|| invalid("plan is null"))?;
        #[cfg(feature = "cuda")]
        {
            let sizes = p.inner.sizes();
            for (ptr, value) in [workspace_bytes, q_elems, out_elems, lse_floats]
                .into_iter()
                .zip(sizes)
            {
                if !ptr.is_null() {
                    // SAFETY: non-null, and the caller guarantees it is writable.
                    unsafe { *ptr = value };
                }
            }
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (p, workspace_bytes, q_elems, out_elems, lse_floats);
            Err(no_cuda())
        }
    })
}

/// Runs a planned step on one layer's device pools, on `stream` (a `cudaStream_t` of the
/// backend's device; null: the legacy default stream): `q` holds `q_len` elements, at least
/// the plan's (unrotated queries), `out` receives the output (V's rotation undone; `out_len`
/// elements, at least the plan's) and `lse`, if not null, the log-sum-exp (`lse_len` floats,
/// at least the plan's; null with 0); rows past the step's last get zeros and −∞. `workspace`
/// holds `workspace_len` bytes, at least the plan's. The pools and the workspace are 16-byte
/// aligned. Pointers of another device, lengths below the plan's or past their allocations,
/// misaligned pools, another tables kind than planned: an error before anything is queued.
///
/// Threads: any thread; several at once with their own workspace, output and stream.
///
/// # Safety
/// Every pointer is device memory of the backend's device holding what the plan says (and
/// `k_len`, `v_len`, `workspace_len` bytes), alive until the queued work (or a graph that
/// captured it) has run; `batch` a valid struct; `stream` null or a live stream.
#[no_mangle]
pub unsafe extern "C" fn rotq_device_attention_run(
    plan: *const RotqDevicePlan,
    stream: *mut c_void,
    q: *const c_void,
    q_len: usize,
    k_pool: *const u8,
    k_len: usize,
    v_pool: *const u8,
    v_len: usize,
    batch: *const RotqDeviceBatch,
    workspace: *mut c_void,
    workspace_len: usize,
    out: *mut c_void,
    out_len: usize,
    lse: *mut f32,
    lse_len: usize,
) -> RotqStatus {
    guard(|| {
        // SAFETY: null or a live handle (the caller's guarantee).
        let p = unsafe { plan.as_ref() }.ok_or_else(|| invalid("plan is null"))?;
        #[cfg(feature = "cuda")]
        {
            let bufs = on_cuda::Raw {
                q: (q as u64, q_len),
                k: (k_pool as u64, k_len),
                v: (v_pool as u64, v_len),
                workspace: (workspace as u64, workspace_len),
                out: (out as u64, out_len),
                lse: (lse as u64, lse_len),
            };
            // SAFETY: the caller's guarantees, passed on.
            unsafe { p.inner.run(stream, bufs, batch) }
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (
                p, stream, q, q_len, k_pool, k_len, v_pool, v_len, batch, workspace,
            );
            let _ = (workspace_len, out, out_len, lse, lse_len);
            Err(no_cuda())
        }
    })
}

/// Waits for `stream` and reports the device-side checks of the last run queued with
/// `workspace`: `ROTQ_STATUS_OK`, or `ROTQ_STATUS_ERROR` with a message naming what a sequence
/// broke (its rows saw no key).
///
/// Threads: any thread.
///
/// # Safety
/// As [`rotq_device_attention_run`]'s for `plan`, `stream` and `workspace`.
#[no_mangle]
pub unsafe extern "C" fn rotq_device_plan_status(
    plan: *const RotqDevicePlan,
    stream: *mut c_void,
    workspace: *const c_void,
    workspace_len: usize,
) -> RotqStatus {
    guard(|| {
        // SAFETY: null or a live handle (the caller's guarantee).
        let p = unsafe { plan.as_ref() }.ok_or_else(|| invalid("plan is null"))?;
        #[cfg(feature = "cuda")]
        {
            // SAFETY: the caller's guarantees, passed on.
            unsafe { p.inner.status(stream, workspace as u64, workspace_len) }
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (p, stream, workspace, workspace_len);
            Err(no_cuda())
        }
    })
}

/// Frees a device plan (null is ignored).
///
/// Threads: any thread, once no other call on this plan runs or will start.
///
/// # Safety
/// `plan` is null or a handle from [`rotq_device_plan_new`] not yet freed.
#[no_mangle]
pub unsafe extern "C" fn rotq_device_plan_free(plan: *mut RotqDevicePlan) {
    if !plan.is_null() {
        // SAFETY: a live handle (the caller's guarantee), freed once.
        drop(unsafe { Box::from_raw(plan) });
    }
}

/// An opaque device codec ([`rotq_device_codec_new`]): a pool's K and V codecs on a CUDA
/// backend, their rotations uploaded once, for [`rotq_device_pool_append`]. Free it with
/// [`rotq_device_codec_free`]; shared freely between threads.
pub struct RotqDeviceCodec {
    #[cfg(feature = "cuda")]
    inner: on_cuda::Codecs,
}

/// Makes the device codecs of a v2 codec's spec on the backend's device; stores the handle in
/// `*out` (null on failure).
///
/// Threads: any thread.
///
/// # Safety
/// `backend` and `codec` are live handles; `out` a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn rotq_device_codec_new(
    backend: *const RotqBackend,
    codec: *const RotqCodec,
    out: *mut *mut RotqDeviceCodec,
) -> RotqStatus {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is null"));
        }
        // SAFETY: non-null, and the caller guarantees it is writable.
        unsafe { *out = std::ptr::null_mut() };
        #[cfg(feature = "cuda")]
        {
            // SAFETY: the caller's guarantees, passed on.
            let inner = unsafe { on_cuda::codecs(backend, codec)? };
            // SAFETY: non-null, and the caller guarantees it is writable.
            unsafe { *out = Box::into_raw(Box::new(RotqDeviceCodec { inner })) };
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (backend, codec);
            Err(no_cuda())
        }
    })
}

/// The batch append on the device (vLLM's `reshape_and_cache`): `n_tokens` tokens' K rows
/// (`[n_tokens, n_kv_heads, head_dim]`) and V rows (`[n_tokens, n_kv_heads, v_dim]`) of type
/// `elem` ("f16" when null, "bf16", "f32"), rotated and quantized into slot
/// `slot_mapping[i]` of the pools (`int64_t`, −1 skips the token), one launch per pool on
/// `stream`; nothing allocated, copied or waited for (the first call for an element type may
/// compile the kernels: make one before capturing a graph). A slot outside the pool is not
/// written and sets bit 0 of `*status` when `status` is not null (the caller clears and reads
/// it). Every rotation runs here, explicit matrices included.
///
/// Threads: any thread; calls that write the same pools must not overlap.
///
/// # Safety
/// Every pointer is device memory of the codec's device holding what is said above (the
/// pools `k_len` and `v_len` bytes), alive until the queued work has run; `stream` null or a
/// live stream of that device.
#[no_mangle]
pub unsafe extern "C" fn rotq_device_pool_append(
    codec: *const RotqDeviceCodec,
    stream: *mut c_void,
    elem: *const c_char,
    k_rows: *const c_void,
    v_rows: *const c_void,
    n_tokens: usize,
    slot_mapping: *const i64,
    k_pool: *mut u8,
    k_len: usize,
    v_pool: *mut u8,
    v_len: usize,
    status: *mut u32,
) -> RotqStatus {
    guard(|| {
        // SAFETY: null or a live handle (the caller's guarantee).
        let c = unsafe { codec.as_ref() }.ok_or_else(|| invalid("codec is null"))?;
        #[cfg(feature = "cuda")]
        {
            let raw = on_cuda::Append {
                rows: (k_rows as u64, v_rows as u64),
                n_tokens,
                slots: slot_mapping as u64,
                k: (k_pool as u64, k_len),
                v: (v_pool as u64, v_len),
                status: status as u64,
            };
            // SAFETY: the caller's guarantees, passed on.
            unsafe { c.inner.append(stream, elem, raw) }
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (c, stream, elem, k_rows, v_rows, n_tokens, slot_mapping);
            let _ = (k_pool, k_len, v_pool, v_len, status);
            Err(no_cuda())
        }
    })
}

/// Frees a device codec (null is ignored).
///
/// Threads: any thread, once no other call on it runs or will start.
///
/// # Safety
/// `codec` is null or a handle from [`rotq_device_codec_new`] not yet freed.
#[no_mangle]
pub unsafe extern "C" fn rotq_device_codec_free(codec: *mut RotqDeviceCodec) {
    if !codec.is_null() {
        // SAFETY: a live handle (the caller's guarantee), freed once.
        drop(unsafe { Box::from_raw(codec) });
    }
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> (RotqStatus, String) {
    super::refused("this rotq library was built without CUDA (the `cuda` feature)")
}

#[cfg(feature = "cuda")]
mod on_cuda {
    use super::super::v2::{read_sized_from, RotqCodec, ROTQ_TABLES_CSR};
    use super::super::{invalid, params_of, refused, text, RotqBackend, RotqStatus};
    use super::*;
    use half::{bf16, f16};
    use rotq::cache::Backend;
    use rotq::cuda::batch::{
        BatchPlan, BatchShape, DeviceBatch, DeviceBuf, DeviceStream, DeviceTables, TablesKind,
    };
    use rotq::cuda::{CudaAttention, CudaCodec, Device};
    use std::sync::Arc;

    type Failure = (RotqStatus, String);

    /// The plan with its device and kernels, for one element type.
    pub(super) struct Planned {
        dev: Arc<Device>,
        attn: CudaAttention,
        plan: BatchPlan,
        elem: Elem,
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Elem {
        F16,
        Bf16,
        F32,
    }

    /// A run's raw buffers (addresses, and the lengths the caller gave).
    pub(super) struct Raw {
        pub q: (u64, usize),
        pub k: (u64, usize),
        pub v: (u64, usize),
        pub workspace: (u64, usize),
        pub out: (u64, usize),
        pub lse: (u64, usize),
    }

    /// A pool's K and V codecs on one device.
    pub(super) struct Codecs {
        dev: Arc<Device>,
        k: CudaCodec,
        v: CudaCodec,
        heads: usize,
        dims: (usize, usize),
    }

    /// An append's raw buffers (addresses, and the lengths the caller gave).
    pub(super) struct Append {
        pub rows: (u64, u64),
        pub n_tokens: usize,
        pub slots: u64,
        pub k: (u64, usize),
        pub v: (u64, usize),
        pub status: u64,
    }

    /// The CUDA device of a backend (or a message saying it is not one).
    fn cuda_of(b: &RotqBackend) -> Result<&Arc<Device>, Failure> {
        match &b.0 {
            Backend::Cuda(dev) => Ok(dev),
            _ => Err(invalid(
                "backend is not a CUDA device (rotq_backend_open(\"cuda:N\"))",
            )),
        }
    }

    /// The element type named by `elem` (null: f16).
    ///
    /// # Safety
    /// `elem` is null or a NUL-terminated string.
    unsafe fn elem_of(elem: *const c_char, what: &str) -> Result<Elem, Failure> {
        if elem.is_null() {
            return Ok(Elem::F16);
        }
        // SAFETY: a NUL-terminated name (the caller's guarantee).
        match unsafe { text(elem, what)? } {
            "f16" => Ok(Elem::F16),
            "bf16" => Ok(Elem::Bf16),
            "f32" => Ok(Elem::F32),
            other => Err(invalid(format!(
                "{what} {other:?} is not \"f16\", \"bf16\" or \"f32\""
            ))),
        }
    }

    /// # Safety
    /// As [`rotq_device_codec_new`]'s.
    pub(super) unsafe fn codecs(
        backend: *const RotqBackend,
        codec: *const RotqCodec,
    ) -> Result<Codecs, Failure> {
        // SAFETY: null or live handles (the caller's guarantee).
        let (b, c) = unsafe { (backend.as_ref(), codec.as_ref()) };
        let dev = cuda_of(b.ok_or_else(|| invalid("backend is null"))?)?;
        let spec = c.ok_or_else(|| invalid("codec is null"))?.spec();
        let k = CudaCodec::new(dev, spec.k_format, spec.head_dim, spec.plan.qk.as_ref())
            .map_err(refused)?;
        let v = CudaCodec::new(dev, spec.v_format, spec.v_dim, spec.plan.v.as_ref())
            .map_err(refused)?;
        // The rotations were uploaded on the device's stream; the engine's stream may not
        // wait for it.
        dev.stream()
            .synchronize()
            .map_err(|e| refused(format!("waiting for the rotations' upload: {e}")))?;
        Ok(Codecs {
            dev: dev.clone(),
            k,
            v,
            heads: spec.n_kv_heads,
            dims: (spec.head_dim, spec.v_dim),
        })
    }

    impl Codecs {
        /// # Safety
        /// As [`rotq_device_pool_append`]'s.
        pub(super) unsafe fn append(
            &self,
            stream: *mut c_void,
            elem: *const c_char,
            raw: Append,
        ) -> Result<(), Failure> {
            // SAFETY: the caller's guarantees, passed on.
            match unsafe { elem_of(elem, "elem")? } {
                // SAFETY: as above.
                Elem::F16 => unsafe { self.append_as::<f16>(stream, raw) },
                // SAFETY: as above.
                Elem::Bf16 => unsafe { self.append_as::<bf16>(stream, raw) },
                // SAFETY: as above.
                Elem::F32 => unsafe { self.append_as::<f32>(stream, raw) },
            }
        }

        /// # Safety
        /// As [`rotq_device_pool_append`]'s, with rows of type `T`.
        unsafe fn append_as<T: rotq::cuda::GpuElement>(
            &self,
            stream: *mut c_void,
            raw: Append,
        ) -> Result<(), Failure> {
            let dev = &self.dev;
            let n = raw.n_tokens;
            let rows = |dim: usize| {
                n.checked_mul(self.heads)
                    .and_then(|r| r.checked_mul(dim))
                    .ok_or_else(|| invalid("n_tokens × heads × dim overflows"))
            };
            for (ptr, what) in [
                (raw.rows.0, "k_rows"),
                (raw.rows.1, "v_rows"),
                (raw.slots, "slot_mapping"),
                (raw.k.0, "k_pool"),
                (raw.v.0, "v_pool"),
            ] {
                if ptr == 0 {
                    return Err(invalid(format!("{what} is null")));
                }
            }
            // (Every `from_raw` below: the caller guarantees device memory alive until the
            // queued work has run; the driver checks device and range.)
            // SAFETY: as said above.
            let kr = unsafe { DeviceBuf::<T>::from_raw(dev, raw.rows.0, rows(self.dims.0)?) };
            // SAFETY: as said above.
            let vr = unsafe { DeviceBuf::<T>::from_raw(dev, raw.rows.1, rows(self.dims.1)?) };
            // SAFETY: as said above.
            let slots = unsafe { DeviceBuf::<i64>::from_raw(dev, raw.slots, n) };
            // SAFETY: as said above.
            let kp = unsafe { DeviceBuf::<u8>::from_raw(dev, raw.k.0, raw.k.1) };
            // SAFETY: as said above.
            let vp = unsafe { DeviceBuf::<u8>::from_raw(dev, raw.v.0, raw.v.1) };
            let (kr, vr) = (kr.map_err(refused)?, vr.map_err(refused)?);
            let (slots, kp, vp) = (
                slots.map_err(refused)?,
                kp.map_err(refused)?,
                vp.map_err(refused)?,
            );
            let status = match raw.status {
                0 => None,
                // SAFETY: as said above.
                p => Some(unsafe { DeviceBuf::<u32>::from_raw(dev, p, 1) }.map_err(refused)?),
            };
            // SAFETY: null (the legacy default stream) or a live stream (the caller's
            // guarantee); its context is checked.
            let s = unsafe { DeviceStream::from_raw(dev, stream.cast()) }.map_err(refused)?;
            // SAFETY: the caller guarantees the buffers outlive the queued work.
            unsafe {
                self.k
                    .quantize_slots_on(dev, &s, &kr, &kp, self.heads, &slots, status.as_ref())
                    .map_err(refused)?;
                self.v
                    .quantize_slots_on(dev, &s, &vr, &vp, self.heads, &slots, status.as_ref())
                    .map_err(refused)
            }
        }
    }

    /// # Safety
    /// As [`rotq_device_plan_new`]'s.
    pub(super) unsafe fn plan(
        backend: *const RotqBackend,
        codec: *const RotqCodec,
        shape: *const RotqDeviceShape,
    ) -> Result<Planned, Failure> {
        // SAFETY: null or live handles (the caller's guarantee).
        let (b, c) = unsafe { (backend.as_ref(), codec.as_ref()) };
        let b = b.ok_or_else(|| invalid("backend is null"))?;
        let c = c.ok_or_else(|| invalid("codec is null"))?;
        // The struct before the device: its size errors come first, on any backend.
        // SAFETY: non-null checked inside; a valid struct (the caller's guarantee);
        // `mask_stride` is the first field ABI 2.4 appended.
        let s = unsafe {
            read_sized_from(
                shape,
                ("2.3", std::mem::offset_of!(RotqDeviceShape, mask_stride)),
                "shape",
                "RotqDeviceShape",
            )?
        };
        let dev = cuda_of(b)?;
        // SAFETY: null or a NUL-terminated name (the caller's guarantee).
        let elem = unsafe { elem_of(s.elem, "shape->elem")? };
        if s.params.pos_offset != 0 {
            return Err(invalid(
                "shape->params.pos_offset must be 0 (positions are per row)",
            ));
        }
        let tables = match s.tables {
            ROTQ_TABLES_BLOCK => TablesKind::Block {
                max_blocks: s.max_blocks,
            },
            ROTQ_TABLES_CSR => TablesKind::Csr,
            ROTQ_TABLES_CONTIGUOUS => TablesKind::Contiguous,
            other => {
                return Err(invalid(format!(
                    "shape->tables {other} is not ROTQ_TABLES_BLOCK, _CSR or _CONTIGUOUS"
                )))
            }
        };
        let spec = c.spec();
        let attn = CudaAttention::new(dev, &spec.plan).map_err(refused)?;
        let shape = BatchShape {
            seqs: s.n_seqs,
            max_rows: s.max_rows,
            max_seq_len: s.max_seq_len,
            h_q: s.h_q,
            params: params_of(&s.params),
            q_positions: s.q_positions,
            tables,
            checked: s.checked,
            mask: (s.mask_stride > 0).then_some(s.mask_stride),
        };
        let g = spec.cuda_geometry();
        let plan = match elem {
            Elem::F16 => attn.plan_batch::<f16>(dev, &g, &shape),
            Elem::Bf16 => attn.plan_batch::<bf16>(dev, &g, &shape),
            Elem::F32 => attn.plan_batch::<f32>(dev, &g, &shape),
        }
        .map_err(refused)?;
        Ok(Planned {
            dev: dev.clone(),
            attn,
            plan,
            elem,
        })
    }

    impl Planned {
        pub(super) fn sizes(&self) -> [usize; 4] {
            let p = &self.plan;
            [p.workspace_bytes(), p.q_len(), p.out_len(), p.lse_len()]
        }

        /// # Safety
        /// As [`rotq_device_attention_run`]'s.
        pub(super) unsafe fn run(
            &self,
            stream: *mut c_void,
            raw: Raw,
            batch: *const RotqDeviceBatch,
        ) -> Result<(), Failure> {
            match self.elem {
                // SAFETY: the caller's guarantees, passed on.
                Elem::F16 => unsafe { self.run_as::<f16>(stream, raw, batch) },
                // SAFETY: as above.
                Elem::Bf16 => unsafe { self.run_as::<bf16>(stream, raw, batch) },
                // SAFETY: as above.
                Elem::F32 => unsafe { self.run_as::<f32>(stream, raw, batch) },
            }
        }

        /// # Safety
        /// As [`rotq_device_attention_run`]'s, with queries and output of type `T`.
        unsafe fn run_as<T: rotq::cuda::GpuElement>(
            &self,
            stream: *mut c_void,
            raw: Raw,
            batch: *const RotqDeviceBatch,
        ) -> Result<(), Failure> {
            // SAFETY: non-null checked inside; a valid struct (the caller's guarantee); `mask`
            // is the first field ABI 2.4 appended.
            let b = unsafe {
                read_sized_from(
                    batch,
                    ("2.3", std::mem::offset_of!(RotqDeviceBatch, mask)),
                    "batch",
                    "RotqDeviceBatch",
                )?
            };
            let dev = &self.dev;
            let p = &self.plan;
            let shape = p.shape();
            // (Every `from_raw` below: the caller guarantees device memory alive until the
            // queued work has run; the driver checks device and range.)
            let buf = |ptr: u64, len: usize| {
                // SAFETY: as said above.
                unsafe { DeviceBuf::<u8>::from_raw(dev, ptr, len) }
            };
            let words = |ptr: *const u32,
                         len: usize,
                         what: &str|
             -> Result<DeviceBuf<'static, u32>, Failure> {
                if ptr.is_null() {
                    return Err(invalid(format!("batch->{what} is null")));
                }
                // SAFETY: as above.
                unsafe { DeviceBuf::<u32>::from_raw(dev, ptr as u64, len) }.map_err(refused)
            };
            let tables = match shape.tables {
                TablesKind::Contiguous => DeviceTables::Contiguous,
                TablesKind::Block { max_blocks } => DeviceTables::Block {
                    table: words(b.block_table, shape.seqs * max_blocks, "block_table")?,
                    max_blocks,
                },
                TablesKind::Csr => DeviceTables::Csr {
                    indptr: words(b.indptr, shape.seqs + 1, "indptr")?,
                    indices: words(b.indices, b.n_indices, "indices")?,
                },
            };
            let dbatch = DeviceBatch {
                query_start_loc: words(b.query_start_loc, shape.seqs + 1, "query_start_loc")?,
                seq_lens: words(b.seq_lens, shape.seqs, "seq_lens")?,
                q_positions: match b.q_positions.is_null() {
                    true => None,
                    false => Some(words(b.q_positions, shape.seqs, "q_positions")?),
                },
                tables,
                mask: match (shape.mask, b.mask.is_null()) {
                    (None, true) => None,
                    (Some(stride), false) => {
                        let need = shape.max_rows * stride;
                        if b.mask_len < need {
                            return Err(invalid(format!(
                                "batch->mask_len is {}, the plan's max_rows x mask_stride {need}",
                                b.mask_len
                            )));
                        }
                        // SAFETY: as above.
                        let m = unsafe { DeviceBuf::<f32>::from_raw(dev, b.mask as u64, need) };
                        Some(m.map_err(refused)?)
                    }
                    (None, false) => {
                        return Err(invalid(
                            "batch->mask given, but the plan has no mask_stride",
                        ))
                    }
                    (Some(_), true) => {
                        return Err(invalid(
                            "batch->mask is null, but the plan has a mask_stride",
                        ))
                    }
                },
            };
            // A length the caller gave, at least the plan's (the driver's allocation range
            // alone would not catch a buffer carved out of a larger one).
            let typed = |(ptr, len): (u64, usize), need: usize, what: &str| {
                if ptr == 0 {
                    return Err(invalid(format!("{what} is null")));
                }
                if len < need {
                    return Err(invalid(format!(
                        "{what}_len is {len}, the plan needs {need}"
                    )));
                }
                // SAFETY: as above.
                unsafe { DeviceBuf::<T>::from_raw(dev, ptr, len) }.map_err(refused)
            };
            let q = typed(raw.q, p.q_len(), "q")?;
            let out = typed(raw.out, p.out_len(), "out")?;
            let lse = match raw.lse {
                (0, 0) => None,
                (0, _) => return Err(invalid("lse is null but lse_len is not 0")),
                (_, len) if len < p.lse_len() => {
                    return Err(invalid(format!(
                        "lse_len is {len}, the plan needs {}",
                        p.lse_len()
                    )))
                }
                (ptr, len) => {
                    // SAFETY: as above.
                    let l = unsafe { DeviceBuf::<f32>::from_raw(dev, ptr, len) };
                    Some(l.map_err(refused)?)
                }
            };
            let (k, v) = (
                buf(raw.k.0, raw.k.1).map_err(refused)?,
                buf(raw.v.0, raw.v.1).map_err(refused)?,
            );
            let ws = buf(raw.workspace.0, raw.workspace.1).map_err(refused)?;
            // SAFETY: null (the legacy default stream) or a live stream (the caller's guarantee);
            // its context is checked.
            let s = unsafe { DeviceStream::from_raw(dev, stream.cast()) }.map_err(refused)?;
            // SAFETY: the caller guarantees the buffers outlive the queued work and keep the
            // device arrays' contract.
            unsafe {
                self.attn
                    .run_batch(p, &s, &q, &k, &v, &dbatch, &ws, &out, lse.as_ref())
            }
            .map_err(refused)
        }

        /// # Safety
        /// As [`rotq_device_plan_status`]'s.
        pub(super) unsafe fn status(
            &self,
            stream: *mut c_void,
            workspace: u64,
            len: usize,
        ) -> Result<(), Failure> {
            // SAFETY: the caller's guarantees; the driver checks device and range.
            let ws =
                unsafe { DeviceBuf::<u8>::from_raw(&self.dev, workspace, len) }.map_err(refused)?;
            // SAFETY: as above.
            let s = unsafe { DeviceStream::from_raw(&self.dev, stream.cast()) }.map_err(refused)?;
            self.plan.status(&s, &ws).map_err(refused)
        }
    }
}
