//! The engine API from Python: `KvPool` (one layer's paged K/V pool over caller arrays, batch
//! append through a slot mapping), `AttentionPlan` (`KvPool.plan`, once per step) and
//! `KvPool.run` (per layer, no allocation), and `RotatedKvCache` for one sequence.

use crate::arrays::{import_opt, Array, DType};
use crate::errors::{invalid, to_py};
use crate::{format, rotations};
use pyo3::prelude::*;
use rotq::cache::{Backend, CacheSpec, Paging};
use rotq::pool::{AttentionPlan, Batch, Mask, PageTables, PoolSpec};
use rotq::reference::rope::{Rope, RopeVariant};
use rotq::{AttentionParams, RotationPlan};

/// A new NumPy array of `shape` and `dtype` (uninitialized), and its import for writing.
pub fn numpy_empty<'py>(
    py: Python<'py>,
    shape: &[usize],
    dtype: &str,
) -> PyResult<(Bound<'py, PyAny>, Array)> {
    let np = py.import("numpy")?;
    let obj = np.call_method1("empty", (shape.to_vec(), dtype))?;
    let arr = Array::import(&obj, "out", &[DType::F32, DType::F64, DType::U8])?;
    Ok((obj, arr))
}

/// A caller's uint8 array as the pool's memory.
struct Bytes(Array);

impl Bytes {
    fn new(a: Array) -> PyResult<Self> {
        let mut a = a;
        a.slice_mut::<u8>()?; // uint8, writable
        Ok(Self(a))
    }
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        let (ptr, len) = self.0.raw();
        if len == 0 {
            return &[];
        }
        // SAFETY: checked uint8 at construction; `ptr` holds `len` bytes kept alive by the
        // import inside `self.0`, and the slice borrows `self`.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

impl AsMut<[u8]> for Bytes {
    fn as_mut(&mut self) -> &mut [u8] {
        let (ptr, len) = self.0.raw();
        if len == 0 {
            return &mut [];
        }
        // SAFETY: as in `as_ref`, writable (checked at construction); `&mut self` makes this
        // the only slice of the pool's memory.
        unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) }
    }
}

fn plan_of(
    qk: Option<&Bound<'_, PyAny>>,
    v: Option<&Bound<'_, PyAny>>,
    head_dim: usize,
    v_dim: usize,
) -> PyResult<RotationPlan> {
    Ok(RotationPlan {
        qk: rotations::parse(qk, head_dim)?,
        v: rotations::parse(v, v_dim)?,
    })
}

/// Bytes of the K and V pools of a spec: `(k_bytes, v_bytes)`.
#[pyfunction]
#[pyo3(signature = (k_format, v_format, n_kv_heads, head_dim, v_dim, n_pages, page_tokens))]
fn pool_bytes(
    k_format: &str,
    v_format: &str,
    n_kv_heads: usize,
    head_dim: usize,
    v_dim: usize,
    n_pages: usize,
    page_tokens: usize,
) -> PyResult<(usize, usize)> {
    let spec = PoolSpec {
        k_format: format(k_format)?,
        v_format: format(v_format)?,
        plan: RotationPlan::none(),
        n_kv_heads,
        head_dim,
        v_dim,
        n_pages,
        page_tokens,
        query: rotq::QueryMode::Auto,
    };
    Ok((
        spec.k_bytes().map_err(to_py)?,
        spec.v_bytes().map_err(to_py)?,
    ))
}

/// One layer's K and V pages over two uint8 arrays.
#[pyclass(module = "rotq._rotq", name = "KvPool")]
pub struct KvPool {
    inner: rotq::pool::KvPool<Bytes>,
    k_obj: Py<PyAny>,
    v_obj: Py<PyAny>,
}

/// Converts an integer array to `Vec<T>` (int32 or int64 in; out of range is an error).
fn ints<T: TryFrom<i64>>(a: &Array, what: &str) -> PyResult<Vec<T>> {
    let wide: Vec<i64> = match a.dtype() {
        DType::I32 => a.slice::<i32>()?.iter().map(|&v| i64::from(v)).collect(),
        _ => a.slice::<i64>()?.to_vec(),
    };
    wide.into_iter()
        .enumerate()
        .map(|(i, v)| {
            T::try_from(v).map_err(|_| invalid(format!("{what}[{i}] = {v} is out of range")))
        })
        .collect()
}

/// A query mode by name ("auto", "exact", "q8_0"; see `rotq::QueryMode`).
fn query_mode(name: &str) -> PyResult<rotq::QueryMode> {
    name.parse().map_err(crate::errors::reference)
}

const INTS: [DType; 2] = [DType::I32, DType::I64];

fn int_array(obj: &Bound<'_, PyAny>, what: &'static str) -> PyResult<Array> {
    Array::import(obj, what, &INTS)
}

fn params(
    causal: bool,
    scale: Option<f64>,
    window: Option<usize>,
    softcap: Option<f64>,
    pos_offset: usize,
) -> AttentionParams {
    AttentionParams {
        scale,
        causal,
        pos_offset,
        window,
        softcap,
    }
}

#[pymethods]
impl KvPool {
    /// A pool over `k` and `v` (uint8, C-contiguous, writable, `pool_bytes(...)` long), or
    /// over new zeroed NumPy arrays where they are None.
    #[new]
    #[pyo3(signature = (k_format, v_format, n_kv_heads, head_dim, v_dim, n_pages, page_tokens,
        k=None, v=None, qk_rotation=None, v_rotation=None, query="auto"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        k_format: &str,
        v_format: &str,
        n_kv_heads: usize,
        head_dim: usize,
        v_dim: usize,
        n_pages: usize,
        page_tokens: usize,
        k: Option<Bound<'_, PyAny>>,
        v: Option<Bound<'_, PyAny>>,
        qk_rotation: Option<Bound<'_, PyAny>>,
        v_rotation: Option<Bound<'_, PyAny>>,
        query: &str,
    ) -> PyResult<Self> {
        let spec = PoolSpec {
            k_format: format(k_format)?,
            v_format: format(v_format)?,
            plan: plan_of(qk_rotation.as_ref(), v_rotation.as_ref(), head_dim, v_dim)?,
            n_kv_heads,
            head_dim,
            v_dim,
            n_pages,
            page_tokens,
            query: query_mode(query)?,
        };
        let np = py.import("numpy")?;
        let buffer = |obj: Option<Bound<'_, PyAny>>, bytes: Result<usize, rotq::Error>| match obj
            .filter(|o| !o.is_none())
        {
            Some(o) => Ok::<_, PyErr>(o.unbind()),
            None => {
                let n = bytes.map_err(to_py)?;
                Ok(np.call_method1("zeros", (n, "uint8"))?.unbind())
            }
        };
        let k_obj = buffer(k, spec.k_bytes())?;
        let v_obj = buffer(v, spec.v_bytes())?;
        let kb = Bytes::new(Array::import(k_obj.bind(py), "k", &[DType::U8])?)?;
        let vb = Bytes::new(Array::import(v_obj.bind(py), "v", &[DType::U8])?)?;
        let inner = rotq::pool::KvPool::over(spec, kb, vb).map_err(to_py)?;
        Ok(Self {
            inner,
            k_obj,
            v_obj,
        })
    }

    /// The K pool's array.
    #[getter]
    fn k(&self, py: Python<'_>) -> Py<PyAny> {
        self.k_obj.clone_ref(py)
    }

    /// The V pool's array.
    #[getter]
    fn v(&self, py: Python<'_>) -> Py<PyAny> {
        self.v_obj.clone_ref(py)
    }

    /// Token slots (`n_pages · page_tokens`).
    #[getter]
    fn slots(&self) -> PyResult<usize> {
        self.inner.spec().slots().map_err(to_py)
    }

    /// The position recorded for `slot` by `append`, or None if never written.
    fn position(&self, slot: usize) -> Option<u64> {
        self.inner.position(slot)
    }

    /// Writes a step's new K and V rows (`[n, n_kv_heads, dim]` f32) into their slots
    /// (`slot_mapping`: int64, one per token, -1 skips), rotated and quantized, recording
    /// each token's position (int64, one per token).
    fn append(
        &mut self,
        py: Python<'_>,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
        slot_mapping: &Bound<'_, PyAny>,
        positions: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let k = Array::import(k, "k", &[DType::F32])?;
        let v = Array::import(v, "v", &[DType::F32])?;
        let slots: Vec<i64> = ints(&int_array(slot_mapping, "slot_mapping")?, "slot_mapping")?;
        let pos: Vec<u64> = ints(&int_array(positions, "positions")?, "positions")?;
        let (k, v) = (k.slice::<f32>()?, v.slice::<f32>()?);
        let pool = &mut self.inner;
        py.detach(|| pool.append(k, v, &slots, &pos)).map_err(to_py)
    }

    /// Moves the keys of `slots` by `delta` positions (a RoPE rotation of the cached keys;
    /// llama.cpp's context shift): `rope_dims` rotated values (default: all), frequency base,
    /// linear scale, NeoX pairing.
    #[pyo3(signature = (slots, delta, rope_dims=None, freq_base=10000.0, freq_scale=1.0, neox=false))]
    #[allow(clippy::too_many_arguments)]
    fn shift(
        &mut self,
        py: Python<'_>,
        slots: &Bound<'_, PyAny>,
        delta: i64,
        rope_dims: Option<usize>,
        freq_base: f64,
        freq_scale: f64,
        neox: bool,
    ) -> PyResult<()> {
        let slots: Vec<i64> = ints(&int_array(slots, "slots")?, "slots")?;
        let variant = if neox {
            RopeVariant::Neox
        } else {
            RopeVariant::Normal
        };
        let rope = Rope {
            freq_base,
            freq_scale,
            ..Rope::new(variant, rope_dims.unwrap_or(self.inner.spec().head_dim))
        };
        let pool = &mut self.inner;
        py.detach(|| pool.shift(&slots, delta, &rope))
            .map_err(to_py)
    }

    /// Copies the bytes and positions of slots `src[i]` to `dst[i]` (int64 arrays).
    fn copy_slots(&mut self, src: &Bound<'_, PyAny>, dst: &Bound<'_, PyAny>) -> PyResult<()> {
        let src: Vec<i64> = ints(&int_array(src, "src")?, "src")?;
        let dst: Vec<i64> = ints(&int_array(dst, "dst")?, "dst")?;
        self.inner.copy_slots(&src, &dst).map_err(to_py)
    }

    /// Plans a batch's attention (once per step, for every layer's pool of this spec). Page
    /// tables: `block_table` ([B, max_blocks] int32) with `seq_lens`, or CSR `indptr`,
    /// `indices`, `last_page_len`.
    #[pyo3(signature = (query_start_loc, h_q, block_table=None, seq_lens=None, indptr=None,
        indices=None, last_page_len=None, causal=true, scale=None, window=None, softcap=None,
        q_positions=None, mask=None))]
    #[allow(clippy::too_many_arguments)]
    fn plan(
        &self,
        query_start_loc: &Bound<'_, PyAny>,
        h_q: usize,
        block_table: Option<&Bound<'_, PyAny>>,
        seq_lens: Option<&Bound<'_, PyAny>>,
        indptr: Option<&Bound<'_, PyAny>>,
        indices: Option<&Bound<'_, PyAny>>,
        last_page_len: Option<&Bound<'_, PyAny>>,
        causal: bool,
        scale: Option<f64>,
        window: Option<usize>,
        softcap: Option<f64>,
        q_positions: Option<&Bound<'_, PyAny>>,
        mask: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Plan> {
        let loc: Vec<u32> = ints(
            &int_array(query_start_loc, "query_start_loc")?,
            "query_start_loc",
        )?;
        let tables = match (
            import_opt(block_table, "block_table", &INTS)?,
            import_opt(seq_lens, "seq_lens", &INTS)?,
            import_opt(indptr, "indptr", &INTS)?,
            import_opt(indices, "indices", &INTS)?,
            import_opt(last_page_len, "last_page_len", &INTS)?,
        ) {
            (Some(t), Some(l), None, None, None) => {
                if t.shape().len() != 2 {
                    return Err(invalid(format!(
                        "block_table: shape {:?}, expected [B, max_blocks]",
                        t.shape()
                    )));
                }
                Tables::Block {
                    max_blocks: t.shape()[1],
                    table: ints(&t, "block_table")?,
                    seq_lens: ints(&l, "seq_lens")?,
                }
            }
            (None, None, Some(p), Some(i), Some(l)) => Tables::Csr {
                indptr: ints(&p, "indptr")?,
                indices: ints(&i, "indices")?,
                last_page_len: ints(&l, "last_page_len")?,
            },
            _ => return Err(invalid(
                "page tables: give block_table and seq_lens, or indptr, indices and last_page_len"
                    .into(),
            )),
        };
        let q_positions = match import_opt(q_positions, "q_positions", &INTS)? {
            Some(a) => Some(ints::<u32>(&a, "q_positions")?),
            None => None,
        };
        let mask = match import_opt(mask, "mask", &[DType::F32])? {
            Some(m) => {
                if m.shape().len() != 2 {
                    return Err(invalid(format!(
                        "mask: shape {:?}, expected [rows, row_stride]",
                        m.shape()
                    )));
                }
                Some((m.slice::<f32>()?.to_vec(), m.shape()[1]))
            }
            None => None,
        };
        let params = params(causal, scale, window, softcap, 0);
        let batch = batch_of(&loc, &tables, h_q, &params, &q_positions, &mask);
        let rows = batch.rows();
        let plan = self.inner.plan(&batch).map_err(to_py)?;
        Ok(Plan {
            workspace: vec![0f32; plan.workspace_len()],
            out_shape: (rows, h_q, self.inner.spec().v_dim),
            plan,
            loc,
            tables,
            h_q,
            params,
            q_positions,
            mask,
        })
    }

    /// Runs a planned batch's attention: `q` [rows, h_q, head_dim] f32 (the plan's batch) into
    /// `out` [rows, h_q, v_dim] f32, and each row's log-sum-exp into `lse` [rows, h_q] if
    /// given. Allocates nothing; the GIL is released.
    #[pyo3(signature = (plan, q, out, lse=None))]
    fn run(
        &self,
        py: Python<'_>,
        mut plan: PyRefMut<'_, Plan>,
        q: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        lse: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let q = Array::import(q, "q", &[DType::F32])?;
        let mut out = Array::import(out, "out", &[DType::F32])?;
        let mut lse = import_opt(lse, "lse", &[DType::F32])?;
        let p = &plan.plan;
        out.expect_len(p.out_len(), "rows x h_q x v_dim")?;
        if let Some(l) = &lse {
            l.expect_len(p.lse_len(), "rows x h_q")?;
        }
        if q.overlaps(&out)
            || lse
                .as_ref()
                .is_some_and(|l| l.overlaps(&out) || l.overlaps(&q))
        {
            return Err(invalid(
                "out / lse: share memory with another argument".into(),
            ));
        }
        let plan = &mut *plan;
        let (batch, p, workspace) = plan.parts();
        let q = q.slice::<f32>()?;
        let out = out.slice_mut::<f32>()?;
        let lse = match lse.as_mut() {
            Some(l) => Some(l.slice_mut::<f32>()?),
            None => None,
        };
        let pool = &self.inner;
        py.detach(|| pool.run(p, &batch, q, workspace, out, lse))
            .map_err(to_py)
    }
}

/// The page tables a plan keeps (copied: they are small, and the plan outlives the call).
enum Tables {
    Block {
        table: Vec<i32>,
        max_blocks: usize,
        seq_lens: Vec<u32>,
    },
    Csr {
        indptr: Vec<u32>,
        indices: Vec<u32>,
        last_page_len: Vec<u32>,
    },
}

/// A batch's attention, planned by `KvPool.plan`: the partition, the batch it was planned for
/// and the workspace `run` uses.
#[pyclass(module = "rotq._rotq", name = "AttentionPlan")]
pub struct Plan {
    plan: AttentionPlan,
    loc: Vec<u32>,
    tables: Tables,
    h_q: usize,
    params: AttentionParams,
    q_positions: Option<Vec<u32>>,
    mask: Option<(Vec<f32>, usize)>,
    workspace: Vec<f32>,
    out_shape: (usize, usize, usize),
}

/// The batch a plan's copies describe.
fn batch_of<'a>(
    loc: &'a [u32],
    tables: &'a Tables,
    h_q: usize,
    params: &AttentionParams,
    q_positions: &'a Option<Vec<u32>>,
    mask: &'a Option<(Vec<f32>, usize)>,
) -> Batch<'a> {
    let tables = match tables {
        Tables::Block {
            table,
            max_blocks,
            seq_lens,
        } => PageTables::Block {
            table,
            max_blocks: *max_blocks,
            seq_lens,
        },
        Tables::Csr {
            indptr,
            indices,
            last_page_len,
        } => PageTables::Csr {
            indptr,
            indices,
            last_page_len,
        },
    };
    Batch {
        params: params.clone(),
        q_positions: q_positions.as_deref(),
        mask: mask.as_ref().map(|(values, row_stride)| Mask {
            values,
            row_stride: *row_stride,
        }),
        ..Batch::new(loc, tables, h_q)
    }
}

impl Plan {
    /// The batch, the kernels' plan and the workspace, borrowed apart.
    fn parts(&mut self) -> (Batch<'_>, &AttentionPlan, &mut [f32]) {
        let batch = batch_of(
            &self.loc,
            &self.tables,
            self.h_q,
            &self.params,
            &self.q_positions,
            &self.mask,
        );
        (batch, &self.plan, &mut self.workspace)
    }
}

#[pymethods]
impl Plan {
    /// The shape of `run`'s output: `(rows, h_q, v_dim)`.
    #[getter]
    fn out_shape(&self) -> (usize, usize, usize) {
        self.out_shape
    }

    /// The shape of `run`'s log-sum-exp: `(rows, h_q)`.
    #[getter]
    fn lse_shape(&self) -> (usize, usize) {
        (self.out_shape.0, self.out_shape.1)
    }

    /// Floats of the workspace the plan holds for `run`.
    #[getter]
    fn workspace_len(&self) -> usize {
        self.workspace.len()
    }
}

/// One sequence's rotated, quantized cache (one layer), on the CPU.
#[pyclass(module = "rotq._rotq", name = "RotatedKvCache")]
pub struct Cache {
    inner: rotq::cache::RotatedKvCache,
}

#[pymethods]
impl Cache {
    /// A cache of `capacity` tokens of `n_heads` KV heads (contiguous, or paged in pages of
    /// `page_tokens`).
    #[new]
    #[pyo3(signature = (k_format, v_format, n_heads, head_dim, v_dim, capacity,
        qk_rotation=None, v_rotation=None, page_tokens=None, query="auto"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        k_format: &str,
        v_format: &str,
        n_heads: usize,
        head_dim: usize,
        v_dim: usize,
        capacity: usize,
        qk_rotation: Option<Bound<'_, PyAny>>,
        v_rotation: Option<Bound<'_, PyAny>>,
        page_tokens: Option<usize>,
        query: &str,
    ) -> PyResult<Self> {
        let spec = CacheSpec {
            k_format: format(k_format)?,
            v_format: format(v_format)?,
            plan: plan_of(qk_rotation.as_ref(), v_rotation.as_ref(), head_dim, v_dim)?,
            n_heads,
            head_dim,
            v_dim,
            capacity,
            paging: match page_tokens {
                Some(page_tokens) => Paging::Paged { page_tokens },
                None => Paging::Contiguous,
            },
            query: query_mode(query)?,
        };
        let backend = Backend::open("cpu").map_err(to_py)?;
        Ok(Self {
            inner: rotq::cache::RotatedKvCache::on(spec, &backend).map_err(to_py)?,
        })
    }

    /// Tokens in the cache.
    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// Appends tokens' K and V rows (`[n, n_heads, dim]` f32) at the next positions.
    fn append(
        &mut self,
        py: Python<'_>,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let k = Array::import(k, "k", &[DType::F32])?;
        let v = Array::import(v, "v", &[DType::F32])?;
        let (k, v) = (k.slice::<f32>()?, v.slice::<f32>()?);
        let cache = &mut self.inner;
        py.detach(|| cache.append(k, v)).map_err(to_py)
    }

    /// Attention of `q` (`[n_q, h_q, head_dim]` f32) over the cache: a new f32 array
    /// `[n_q, h_q, v_dim]`. The queries sit at the last `n_q` positions unless `pos_offset`.
    #[pyo3(signature = (q, causal=true, pos_offset=None, scale=None, window=None, softcap=None))]
    #[allow(clippy::too_many_arguments)]
    fn attention<'py>(
        &self,
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        causal: bool,
        pos_offset: Option<usize>,
        scale: Option<f64>,
        window: Option<usize>,
        softcap: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let q = Array::import(q, "q", &[DType::F32])?;
        let spec = self.inner.spec();
        if q.shape().len() != 3 || q.shape()[2] != spec.head_dim {
            return Err(invalid(format!(
                "q: shape {:?}, expected [n_q, h_q, {}]",
                q.shape(),
                spec.head_dim
            )));
        }
        let (n_q, h_q) = (q.shape()[0], q.shape()[1]);
        let offset = pos_offset.unwrap_or(self.inner.len().saturating_sub(n_q));
        let p = params(causal, scale, window, softcap, offset);
        let qs = q.slice::<f32>()?;
        let cache = &self.inner;
        let values = py
            .detach(|| cache.attention(qs, n_q, h_q, &p))
            .map_err(to_py)?;
        let (obj, mut out) = numpy_empty(py, &[n_q, h_q, spec.v_dim], "float32")?;
        out.slice_mut::<f32>()?.copy_from_slice(&values);
        Ok(obj)
    }
}

/// Adds the classes and functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<KvPool>()?;
    m.add_class::<Plan>()?;
    m.add_class::<Cache>()?;
    m.add_function(wrap_pyfunction!(pool_bytes, m)?)?;
    Ok(())
}
