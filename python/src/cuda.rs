//! The package on CUDA: what the torch ops (`rotq.ops`) run for CUDA tensors.
//!
//! Tensors come in through DLPack with the caller's stream (torch's current stream) as the
//! consumer's stream, so the producer orders its pending work before it and, on that same
//! stream, nothing is waited for. Every call then only queues kernels on that stream: nothing
//! is allocated, uploaded or awaited, so a step can be captured in a CUDA graph and replayed.
//! The Python layer allocates outputs, workspaces and slot lists with torch (its caching
//! allocator, and a graph's private pool under capture). What is made once per device and
//! shape (the kernels, rotations, codecs and plans) is kept here, keyed by what made it.

use crate::arrays::{import_any, with_float, Array, DType};
use crate::errors::{invalid, reference, DeviceError, RotqMemoryError};
use crate::FLOATS;
use dlpark::ffi::{DLDevice, DLDeviceType};
use dlpark::python::{DlpackStream, StreamArg};
use lru::LruCache;
use pyo3::prelude::*;
use rotq::{KvFormat, Rotation, RotationSpec};
use rotq_cuda::batch::{
    BatchPlan, BatchShape, DeviceBatch, DeviceBuf, DeviceStream, DeviceTables, PoolGeometry,
    TablesKind,
};
use rotq_cuda::{CudaAttention, CudaCodec, CudaError, CudaRotation, Device, GpuElement};
use std::collections::HashMap;
use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, OnceLock};

/// A CUDA error as the package's exception: bad input is `InvalidInputError`, the rest
/// `DeviceError`.
fn to_py(e: CudaError) -> PyErr {
    match e {
        CudaError::Input(r) => reference(r),
        e @ CudaError::WrongDevice { .. } => invalid(e.to_string()),
        e @ CudaError::OutOfMemory { .. } => RotqMemoryError::new_err(e.to_string()),
        e => DeviceError::new_err(e.to_string()),
    }
}

/// Whether a CUDA device can be used (a driver and at least one device).
#[pyfunction]
fn cuda_available() -> bool {
    rotq_cuda::cuda_available()
}

/// The devices opened so far, by ordinal (each compiles and keeps its kernels).
fn device(ordinal: usize) -> PyResult<Arc<Device>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<Device>>>> = OnceLock::new();
    cached(DEVICES.get_or_init(Default::default), ordinal, || {
        Ok(Arc::new(Device::new(ordinal).map_err(to_py)?))
    })
}

/// A lock, even if a thread panicked holding it (the maps hold only finished values).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The value of `key` in `map`, made by `make` the first time. The lock is not held while
/// making (it may compile or upload); if another thread made one meanwhile, the first one
/// stays (work may already use it) and this one is dropped.
fn cached<K: Eq + std::hash::Hash, V: Clone>(
    map: &Mutex<HashMap<K, V>>,
    key: K,
    make: impl FnOnce() -> PyResult<V>,
) -> PyResult<V> {
    if let Some(v) = lock(map).get(&key) {
        return Ok(v.clone());
    }
    let v = make()?;
    Ok(lock(map).entry(key).or_insert(v).clone())
}

/// The caller's stream, as DLPack's consumer stream and as the kernels' stream.
struct Stream(usize);

// SAFETY: the handle is the caller's live CUDA stream (torch's current stream), passed as
// CUDA's DLPack convention says (0: the legacy default stream, as `stream::cuda` encodes it),
// for the duration of the import.
unsafe impl DlpackStream for Stream {
    fn as_python_arg(&self, _py: Python<'_>, _device: DLDevice) -> PyResult<StreamArg> {
        Ok(dlpark::python::consumer::stream::cuda(
            self.0 as *mut c_void,
        ))
    }

    unsafe fn wait_for_producer(&self, _device: DLDevice, producer: *mut c_void) -> PyResult<bool> {
        // The producer's work stream is this one: its work is already ordered before ours.
        // Otherwise fall back to the Python protocol, where the producer orders it.
        Ok(producer as usize == self.0)
    }
}

/// A CUDA tensor argument: its device memory, checked for device, dtype and layout.
struct Tensor {
    array: Array,
    ordinal: usize,
}

impl Tensor {
    fn import(
        obj: &Bound<'_, PyAny>,
        what: &'static str,
        dtypes: &[DType],
        stream: &Stream,
    ) -> PyResult<Self> {
        let i = import_any(obj, what, dtypes, Some(stream))?;
        let dev = i.device();
        if dev.device_type != DLDeviceType::CUDA {
            return Err(invalid(format!(
                "{what}: expected a CUDA tensor (DLPack device type {}), like the other \
                 arguments",
                dev.device_type.0
            )));
        }
        let ordinal = usize::try_from(dev.device_id)
            .map_err(|_| invalid(format!("{what}: device id {}", dev.device_id)))?;
        Ok(Self {
            array: Array::of(i, what),
            ordinal,
        })
    }

    /// The tensor as a typed device buffer of `dev` (the driver checks the allocation), the
    /// tensor's dtype being `T`'s.
    ///
    /// # Safety
    /// The tensor must stay allocated while queued work uses the buffer.
    unsafe fn buf<T>(&self, dev: &Device, dtype: DType) -> PyResult<DeviceBuf<'static, T>> {
        let a = &self.array;
        if a.dtype() != dtype {
            return Err(invalid(format!(
                "{}: expected {}, got {}",
                a.what(),
                dtype.name(),
                a.dtype().name()
            )));
        }
        // SAFETY: the caller's promise.
        unsafe { DeviceBuf::<T>::from_raw(dev, a.address(), a.len()) }.map_err(|e| match e {
            CudaError::Input(_) | CudaError::WrongDevice { .. } => {
                invalid(format!("{}: {e}", a.what()))
            }
            e => to_py(e),
        })
    }

    /// As [`Self::buf`], for a tensor the call writes.
    ///
    /// # Safety
    /// As [`Self::buf`].
    unsafe fn buf_mut<T>(&self, dev: &Device, dtype: DType) -> PyResult<DeviceBuf<'static, T>> {
        if self.array.read_only() {
            return Err(invalid(format!(
                "{}: the tensor is read-only; pass a writable one",
                self.array.what()
            )));
        }
        // SAFETY: the caller's promise.
        unsafe { self.buf(dev, dtype) }
    }
}

/// The device of the first tensor (every other on it too).
fn device_of(tensors: &[&Tensor]) -> PyResult<Arc<Device>> {
    let ordinal = tensors[0].ordinal;
    if let Some(t) = tensors.iter().find(|t| t.ordinal != ordinal) {
        return Err(invalid(format!(
            "{}: on cuda:{}, the others on cuda:{ordinal}",
            t.array.what(),
            t.ordinal
        )));
    }
    device(ordinal)
}

impl Stream {
    /// The stream as the kernels take it, checked to be of `dev`'s context.
    fn on(&self, dev: &Device) -> Result<DeviceStream<'static>, CudaError> {
        // SAFETY: the caller's stream stays alive while the work queued on it runs (torch's
        // streams live as long as the process).
        unsafe { DeviceStream::from_raw(dev, self.0 as cudarc::driver::sys::CUstream) }
    }
}

/// A rotation by its string (`hadamard`, `block:B`, `randomized:SEED`) for rows of `dim`.
fn rotation(spec: &str, dim: usize) -> PyResult<Option<Rotation>> {
    let s: RotationSpec = spec.parse().map_err(reference)?;
    s.build(dim).map_err(reference)
}

/// Rotations made so far, by (device, string, row length).
fn cuda_rotation(dev: &Device, spec: &str, dim: usize) -> PyResult<Option<Arc<CudaRotation>>> {
    type Key = (usize, String, usize);
    static ROTATIONS: OnceLock<Mutex<HashMap<Key, Option<Arc<CudaRotation>>>>> = OnceLock::new();
    let key = (dev.context().ordinal(), spec.to_string(), dim);
    cached(ROTATIONS.get_or_init(Default::default), key, || {
        let made = match rotation(spec, dim)? {
            Some(r) => Some(Arc::new(CudaRotation::new(dev, &r).map_err(to_py)?)),
            None => None,
        };
        synchronize(dev)?;
        Ok(made)
    })
}

/// Codecs made so far, by (device, format, row length, rotation string).
fn cuda_codec(dev: &Device, format: KvFormat, dim: usize, spec: &str) -> PyResult<Arc<CudaCodec>> {
    type Key = (usize, KvFormat, usize, String);
    static CODECS: OnceLock<Mutex<HashMap<Key, Arc<CudaCodec>>>> = OnceLock::new();
    let key = (dev.context().ordinal(), format, dim, spec.to_string());
    cached(CODECS.get_or_init(Default::default), key, || {
        let r = rotation(spec, dim)?;
        let codec = Arc::new(CudaCodec::new(dev, format, dim, r.as_ref()).map_err(to_py)?);
        synchronize(dev)?;
        Ok(codec)
    })
}

/// Waits for what a constructor uploaded on the device's own stream (the caller's stream,
/// if non-blocking, would not wait for it).
fn synchronize(dev: &Device) -> PyResult<()> {
    dev.stream()
        .synchronize()
        .map_err(|e| DeviceError::new_err(format!("waiting for an upload: {e}")))
}

/// `x ← R x` (or `Rᵀ x`) in place over the last axis of the CUDA tensor `x` (f32, f16 or
/// bf16), queued on `stream`; `output_scale` replaces the normalization (the unnormalized
/// transform times it, Dao-AILab's `scale`).
#[pyfunction]
#[pyo3(signature = (x, rotation, inverse, stream, output_scale=None))]
fn cuda_rotate_(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    rotation: &str,
    inverse: bool,
    stream: usize,
    output_scale: Option<f32>,
) -> PyResult<()> {
    let stream = Stream(stream);
    let x = Tensor::import(x, "x", &FLOATS, &stream)?;
    let dev = device_of(&[&x])?;
    let dim = x.array.last_dim();
    let Some(r) = cuda_rotation(&dev, rotation, dim)? else {
        return Ok(());
    };
    with_float!(x.array.dtype(), T => {
        // SAFETY: the Python layer keeps `x` alive past the queued work (torch's allocator
        // reuses its memory only in stream order).
        let buf = unsafe { x.buf_mut::<T>(&dev, x.array.dtype())? };
        // SAFETY: as above.
        py.detach(|| unsafe { r.rotate_on(&dev, &stream.on(&dev)?, &buf, inverse, output_scale) })
            .map_err(to_py)
    })
}

/// The rows of the CUDA tensor `x` (last axis: values) rotated and quantized into `out`
/// (uint8, `rows · row_bytes`): row `i` goes to row `slots[i]` (int64, the Python layer's
/// `arange`: the slot-mapping kernel with one head a token).
#[pyfunction]
fn cuda_quantize(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    format_name: &str,
    rotation: &str,
    slots: &Bound<'_, PyAny>,
    stream: usize,
) -> PyResult<()> {
    let f = crate::format(format_name)?;
    let stream = Stream(stream);
    let x = Tensor::import(x, "x", &FLOATS, &stream)?;
    let out = Tensor::import(out, "out", &[DType::U8], &stream)?;
    let slots = Tensor::import(slots, "slots", &[DType::I64], &stream)?;
    let dev = device_of(&[&x, &out, &slots])?;
    let dim = x.array.last_dim();
    let codec = cuda_codec(&dev, f, dim, rotation)?;
    let rows = x.array.len().checked_div(dim).unwrap_or(0);
    out.array
        .expect_len(rows * codec.row_bytes(), "rows x row_bytes")?;
    slots.array.expect_len(rows, "one slot a row")?;
    with_float!(x.array.dtype(), T => {
        // SAFETY: the Python layer keeps the tensors alive past the queued work.
        let (xb, ob, sb) = unsafe {
            (
                x.buf::<T>(&dev, x.array.dtype())?,
                out.buf_mut::<u8>(&dev, DType::U8)?,
                slots.buf::<i64>(&dev, DType::I64)?,
            )
        };
        // SAFETY: as above.
        py.detach(|| unsafe { codec.quantize_slots_on(&dev, &stream.on(&dev)?, &xb, &ob, 1, &sb, None) })
            .map_err(to_py)
    })
}

/// Cache bytes (uint8 CUDA tensor, `rows · row_bytes`) dequantized, and rotated back, into
/// `out` (a float CUDA tensor; its last axis is the row length).
#[pyfunction]
fn cuda_dequantize(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    format_name: &str,
    rotation: &str,
    stream: usize,
) -> PyResult<()> {
    let f = crate::format(format_name)?;
    let stream = Stream(stream);
    let data = Tensor::import(data, "data", &[DType::U8], &stream)?;
    let out = Tensor::import(out, "out", &FLOATS, &stream)?;
    let dev = device_of(&[&data, &out])?;
    let codec = cuda_codec(&dev, f, out.array.last_dim(), rotation)?;
    with_float!(out.array.dtype(), T => {
        // SAFETY: the Python layer keeps the tensors alive past the queued work.
        let (db, ob) = unsafe {
            (data.buf::<u8>(&dev, DType::U8)?, out.buf_mut::<T>(&dev, out.array.dtype())?)
        };
        // SAFETY: as above.
        py.detach(|| unsafe { codec.dequantize_on(&dev, &stream.on(&dev)?, &db, &ob) }).map_err(to_py)
    })
}

/// What a plan is made for, besides the pool: the element type, sequences, rows, the longest
/// sequence, query heads, the block table's width and the mask's row stride (0: none).
type PlanKey = (u32, usize, usize, usize, usize, usize, usize);

/// How many step shapes a pool keeps plans for. An engine that does not pad its batches plans a
/// new shape on most steps (the sequences and rows change); the least recently used plans go,
/// so a long run's host memory stays bounded. Dropping a plan frees no device memory that a run
/// or a captured graph reads: a plan holds only shared handles to the pool's rotations and
/// kernels (the workspace is the caller's).
const PLANS_KEPT: NonZeroUsize = NonZeroUsize::new(256).unwrap();

/// A paged pool in torch CUDA tensors: its geometry, rotations, codecs and the plans of the
/// last [`PLANS_KEPT`] step shapes. The pool bytes themselves stay the caller's (passed to each
/// call). Runs and captured graphs use its rotations' device memory by address, so the Python
/// layer keeps every pool it made for the life of the process.
#[pyclass(module = "rotq._rotq", name = "CudaPool", frozen)]
struct CudaPool {
    dev: Arc<Device>,
    geometry: PoolGeometry,
    attention: CudaAttention,
    k_codec: Arc<CudaCodec>,
    v_codec: Arc<CudaCodec>,
    plans: Mutex<LruCache<PlanKey, Arc<BatchPlan>>>,
}

#[pymethods]
impl CudaPool {
    /// A pool's kernels on `cuda:device` (the geometry of `rotq.pool_bytes`, rotations as
    /// strings, `"none"` for none).
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        k_format: &str,
        v_format: &str,
        n_kv_heads: usize,
        head_dim: usize,
        v_dim: usize,
        n_pages: usize,
        page_tokens: usize,
        qk_rotation: &str,
        v_rotation: &str,
        device: usize,
    ) -> PyResult<Self> {
        let dev = self::device(device)?;
        let geometry = PoolGeometry {
            k_format: crate::format(k_format)?,
            v_format: crate::format(v_format)?,
            n_kv_heads,
            head_dim,
            v_dim,
            n_pages,
            page_tokens,
        };
        let plan = rotq::RotationPlan {
            qk: rotation(qk_rotation, head_dim)?,
            v: rotation(v_rotation, v_dim)?,
        };
        let attention = CudaAttention::new(&dev, &plan).map_err(to_py)?;
        let k_codec = cuda_codec(&dev, geometry.k_format, head_dim, qk_rotation)?;
        let v_codec = cuda_codec(&dev, geometry.v_format, v_dim, v_rotation)?;
        Ok(Self {
            dev,
            geometry,
            attention,
            k_codec,
            v_codec,
            plans: Mutex::new(LruCache::new(PLANS_KEPT)),
        })
    }

    /// A step's K and V rows (`[n, n_kv_heads, dim]` float CUDA tensors) into the pools at
    /// `slot_mapping` (int64, `n`; a negative slot skips its token), in one launch each.
    #[allow(clippy::too_many_arguments)]
    fn append(
        &self,
        py: Python<'_>,
        k_pool: &Bound<'_, PyAny>,
        v_pool: &Bound<'_, PyAny>,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
        slot_mapping: &Bound<'_, PyAny>,
        stream: usize,
    ) -> PyResult<()> {
        let stream = Stream(stream);
        let kp = Tensor::import(k_pool, "k_pool", &[DType::U8], &stream)?;
        let vp = Tensor::import(v_pool, "v_pool", &[DType::U8], &stream)?;
        let k = Tensor::import(k, "k", &FLOATS, &stream)?;
        let v = Tensor::import(v, "v", &FLOATS, &stream)?;
        let slots = Tensor::import(slot_mapping, "slot_mapping", &[DType::I64], &stream)?;
        let dev = device_of(&[&kp, &vp, &k, &v, &slots])?;
        self.check_device(&dev)?;
        let h = self.geometry.n_kv_heads;
        for (t, codec, pool) in [(&k, &self.k_codec, &kp), (&v, &self.v_codec, &vp)] {
            with_float!(t.array.dtype(), T => {
                // SAFETY: the Python layer keeps the tensors alive past the queued work.
                let (tb, pb, sb) = unsafe {
                    (
                        t.buf::<T>(&dev, t.array.dtype())?,
                        pool.buf_mut::<u8>(&dev, DType::U8)?,
                        slots.buf::<i64>(&dev, DType::I64)?,
                    )
                };
                // SAFETY: as above.
                py.detach(|| unsafe { codec.quantize_slots_on(&dev, &stream.on(&dev)?, &tb, &pb, h, &sb, None) })
                    .map_err(to_py)?;
            });
        }
        Ok(())
    }

    /// How many step shapes the pool holds plans for (at most 256: the least recently used
    /// go first).
    #[getter]
    fn cached_plans(&self) -> usize {
        lock(&self.plans).len()
    }

    /// The workspace bytes of a step (planning it, once per shape): `dtype` of the queries
    /// (`"float32"`, `"float16"`, `"bfloat16"`), `seqs` sequences, `max_rows` query rows,
    /// sequences up to `max_seq_len` tokens, `h_q` query heads, a block table of
    /// `max_blocks` entries a sequence, an additive mask of `mask_stride` values a row (0:
    /// none).
    #[pyo3(signature = (dtype, seqs, max_rows, max_seq_len, h_q, max_blocks, mask_stride=0))]
    #[allow(clippy::too_many_arguments)]
    fn workspace_bytes(
        &self,
        dtype: &str,
        seqs: usize,
        max_rows: usize,
        max_seq_len: usize,
        h_q: usize,
        max_blocks: usize,
        mask_stride: usize,
    ) -> PyResult<usize> {
        let elem = elem_of(dtype)?;
        let key = (
            elem,
            seqs,
            max_rows,
            max_seq_len,
            h_q,
            max_blocks,
            mask_stride,
        );
        Ok(self.plan(key)?.workspace_bytes())
    }

    /// Causal paged attention of a mixed batch (vLLM's arguments, int32 on the device):
    /// `q` `[max_rows, h_q, head_dim]`, `query_start_loc` `[B + 1]`, `block_table` `[B,
    /// max_blocks]`, `seq_lens` `[B]`; writes `out` `[max_rows, h_q, v_dim]` (q's dtype).
    /// `workspace` holds [`Self::workspace_bytes`] bytes. Sequences are checked on the device
    /// (a broken one gets no key, nothing is read out of place). `mask`: float32 `[max_rows,
    /// stride]`, added to the scores after the soft-cap.
    #[pyo3(signature = (q, k_pool, v_pool, query_start_loc, block_table, seq_lens, workspace,
                        out, max_seq_len, stream, mask=None))]
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        py: Python<'_>,
        q: &Bound<'_, PyAny>,
        k_pool: &Bound<'_, PyAny>,
        v_pool: &Bound<'_, PyAny>,
        query_start_loc: &Bound<'_, PyAny>,
        block_table: &Bound<'_, PyAny>,
        seq_lens: &Bound<'_, PyAny>,
        workspace: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        max_seq_len: usize,
        stream: usize,
        mask: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let stream = Stream(stream);
        let q = Tensor::import(q, "q", &FLOATS, &stream)?;
        let mask = mask
            .filter(|m| !m.is_none())
            .map(|m| Tensor::import(m, "mask", &[DType::F32], &stream))
            .transpose()?;
        let kp = Tensor::import(k_pool, "k_pool", &[DType::U8], &stream)?;
        let vp = Tensor::import(v_pool, "v_pool", &[DType::U8], &stream)?;
        let int = &[DType::I32];
        let qsl = Tensor::import(query_start_loc, "query_start_loc", int, &stream)?;
        let table = Tensor::import(block_table, "block_table", int, &stream)?;
        let lens = Tensor::import(seq_lens, "seq_lens", int, &stream)?;
        let ws = Tensor::import(workspace, "workspace", &[DType::U8], &stream)?;
        let out = Tensor::import(out, "out", &FLOATS, &stream)?;
        let mut all = vec![&q, &kp, &vp, &qsl, &table, &lens, &ws, &out];
        all.extend(mask.as_ref());
        let dev = device_of(&all)?;
        self.check_device(&dev)?;
        let (qs, ts) = (q.array.shape(), table.array.shape());
        let (Some(&max_rows), Some(&h_q), [seqs, max_blocks]) = (qs.first(), qs.get(1), ts) else {
            return Err(invalid(format!(
                "q {qs:?} must be [rows, h_q, head_dim] and block_table {ts:?} [B, max_blocks]"
            )));
        };
        let elem = elem_of(q.array.dtype().name())?;
        let stride = match &mask {
            Some(m) => match m.array.shape() {
                [rows, stride] if *rows == max_rows => *stride,
                s => {
                    return Err(invalid(format!(
                        "mask: shape {s:?}, expected [{max_rows}, stride]"
                    )))
                }
            },
            None => 0,
        };
        let plan = self.plan((elem, *seqs, max_rows, max_seq_len, h_q, *max_blocks, stride))?;
        let dtype = q.array.dtype();
        if out.array.dtype() != dtype {
            return Err(invalid(format!(
                "out: expected q's dtype {}, got {}",
                dtype.name(),
                out.array.dtype().name()
            )));
        }
        with_float!(dtype, T => {
            // SAFETY: the Python layer keeps the tensors alive past the queued work.
            unsafe {
                let batch = DeviceBatch {
                    query_start_loc: qsl.buf::<u32>(&dev, DType::I32)?,
                    seq_lens: lens.buf::<u32>(&dev, DType::I32)?,
                    q_positions: None,
                    tables: DeviceTables::Block {
                        table: table.buf::<u32>(&dev, DType::I32)?,
                        max_blocks: *max_blocks,
                    },
                    mask: match &mask {
                        Some(m) => Some(m.buf::<f32>(&dev, DType::F32)?),
                        None => None,
                    },
                };
                let (qb, kb, vb) = (
                    q.buf::<T>(&dev, dtype)?,
                    kp.buf::<u8>(&dev, DType::U8)?,
                    vp.buf::<u8>(&dev, DType::U8)?,
                );
                let (wb, ob) = (ws.buf_mut::<u8>(&dev, DType::U8)?, out.buf_mut::<T>(&dev, dtype)?);
                py.detach(|| {
                    let s = stream.on(&dev)?;
                    self.attention
                        .run_batch(&plan, &s, &qb, &kb, &vb, &batch, &wb, &ob, None)
                })
                .map_err(to_py)
            }
        })
    }
}

impl CudaPool {
    /// The plan of `key`, made on first use and kept while it is among the last
    /// [`PLANS_KEPT`] used. The lock is not held while planning (it may compile kernels).
    fn plan(&self, key: PlanKey) -> PyResult<Arc<BatchPlan>> {
        if let Some(p) = lock(&self.plans).get(&key) {
            return Ok(p.clone());
        }
        let p = self.make_plan(key)?;
        Ok(lock(&self.plans).get_or_insert(key, || p).clone())
    }

    /// Plans a step of `key` (may compile kernels).
    fn make_plan(&self, key: PlanKey) -> PyResult<Arc<BatchPlan>> {
        let (elem, seqs, max_rows, max_seq_len, h_q, max_blocks, stride) = key;
        let shape = BatchShape {
            max_rows,
            mask: (stride > 0).then_some(stride),
            // A bad table from Python must not read outside the pool: every page is checked
            // (a pass over the tables; a broken sequence gets no key).
            checked: true,
            ..BatchShape::decode(seqs, h_q, max_seq_len, TablesKind::Block { max_blocks })
        };
        let (a, d, g) = (&self.attention, &*self.dev, &self.geometry);
        let plan = match elem {
            0 => a.plan_batch::<f32>(d, g, &shape),
            1 => a.plan_batch::<half::f16>(d, g, &shape),
            _ => a.plan_batch::<half::bf16>(d, g, &shape),
        }
        .map_err(to_py)?;
        Ok(Arc::new(plan))
    }

    fn check_device(&self, dev: &Device) -> PyResult<()> {
        let (ours, theirs) = (self.dev.context().ordinal(), dev.context().ordinal());
        if ours != theirs {
            return Err(invalid(format!(
                "the tensors are on cuda:{theirs}, the pool's kernels on cuda:{ours}"
            )));
        }
        Ok(())
    }
}

/// The kernels' element code of a dtype name.
fn elem_of(dtype: &str) -> PyResult<u32> {
    Ok(match dtype {
        "float32" => f32::ELEM,
        "float16" => half::f16::ELEM,
        "bfloat16" => half::bf16::ELEM,
        other => {
            return Err(invalid(format!(
                "dtype {other} is not one of float32, float16, bfloat16"
            )))
        }
    })
}

/// Adds the CUDA functions and class to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_rotate_, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_dequantize, m)?)?;
    m.add_class::<CudaPool>()?;
    Ok(())
}
