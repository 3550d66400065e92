//! Where `rotq eval` runs the rotate-quantize and the quantized attention: the CPU kernels (the
//! default), a CUDA device, or the oracle itself.
//!
//! Each backend writes the K and V caches of a layer with its own rotate-quantize kernel and
//! runs its own attention on those bytes; `rotq eval` then scores the output against exact f64
//! attention, computes the attention probabilities those cache bytes imply (in f64, as the
//! oracle does: the kernels do not return probabilities) and checks a sample of the kernel's
//! output rows against the oracle on the same bytes ([`crate::oracle_check`]).
//!
//! ```
//! use rotq_cli::eval_backend::Backend;
//! assert_eq!("cpu".parse::<Backend>().unwrap(), Backend::Cpu);
//! assert_eq!("cuda:1".parse::<Backend>().unwrap(), Backend::Cuda(1));
//! assert!("tpu".parse::<Backend>().is_err());
//! ```

use crate::eval::Activations;
use crate::Error;
use ndarray::{Array3, ArrayView3, Axis};
use rotq_cpu::{CacheCodec, CpuAttention, Isa, KvCacheView, QueryMode};
use rotq_cuda::{CacheLayout, CacheTarget, CudaAttention, CudaCodec, CudaError, CudaKvCache};
use rotq_reference::tolerance::Precision;
use rotq_reference::{KvFormat, Rotation, RotationPlan};
use std::fmt;
use std::str::FromStr;

/// Which kernels `rotq eval` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The CPU kernels (`rotq-cpu`), on the best instruction set of this machine.
    Cpu,
    /// The CUDA kernels (`rotq-cuda`) on device `cuda:N`, with f32 queries.
    Cuda(usize),
    /// The oracle (`rotq-reference`): quantization and attention as the spec defines them.
    Oracle,
}

impl FromStr for Backend {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "cpu" => Ok(Backend::Cpu),
            "oracle" => Ok(Backend::Oracle),
            "cuda" => Ok(Backend::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Backend::Cuda)
                .ok_or_else(|| {
                    Error::Input(format!(
                        "device `{s}`: expected `cpu`, `cuda:N` (e.g. cuda:0) or `oracle`"
                    ))
                }),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Cpu => f.write_str("cpu"),
            Backend::Cuda(n) => write!(f, "cuda:{n}"),
            Backend::Oracle => f.write_str("oracle"),
        }
    }
}

/// A backend made ready: for CUDA, the opened device.
///
/// ```
/// use rotq_cli::eval_backend::{Backend, Runner};
/// use rotq::KvFormat;
/// let runner = Runner::open(Backend::Cpu).unwrap();
/// let k = ndarray::Array3::from_shape_fn((4, 2, 32), |(t, h, c)| (t + h + c) as f32 * 0.1);
/// let bytes = runner.quantize(k.view(), KvFormat::Q8_0, None).unwrap();
/// assert_eq!(bytes.len(), 4 * 2 * 34);
/// ```
pub struct Runner {
    backend: Backend,
    cuda: Option<rotq_cuda::Device>,
}

impl fmt::Debug for Runner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runner")
            .field("backend", &self.backend)
            .finish()
    }
}

impl Runner {
    /// Opens `backend`. A CUDA device that cannot be used here (no driver, no such device, a
    /// driver too old) is [`Error::NoCudaDevice`].
    ///
    /// ```
    /// use rotq_cli::eval_backend::{Backend, Runner};
    /// if !rotq_cuda::cuda_available() {
    ///     let e = Runner::open(Backend::Cuda(0)).unwrap_err();
    ///     assert!(matches!(e, rotq_cli::Error::NoCudaDevice { .. }));
    /// }
    /// ```
    pub fn open(backend: Backend) -> Result<Self, Error> {
        let cuda = match backend {
            Backend::Cuda(n) => {
                Some(
                    rotq_cuda::Device::new(n).map_err(|source| Error::NoCudaDevice {
                        device: backend.to_string(),
                        source,
                    })?,
                )
            }
            _ => None,
        };
        Ok(Self { backend, cuda })
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The precision whose tolerance its attention output is held to: f32 for the kernels
    /// (f32 queries and arithmetic), f64 for the oracle.
    pub fn precision(&self) -> Precision {
        match self.backend {
            Backend::Oracle => Precision::F64,
            Backend::Cpu | Backend::Cuda(_) => Precision::F32,
        }
    }

    /// Rotates every `(token, head)` row of `x` by `rotation` and quantizes it into `format`:
    /// the cache bytes, row `(token, head)` at `(token · heads + head) · row_bytes`.
    pub fn quantize(
        &self,
        x: ArrayView3<f32>,
        format: KvFormat,
        rotation: Option<&Rotation>,
    ) -> Result<Vec<u8>, Error> {
        let (n, h, d) = x.dim();
        let rows: Vec<f32> = x.iter().copied().collect();
        let row_bytes = format.row_bytes(d)?;
        let mut cache = vec![0u8; n * h * row_bytes];
        match (self.backend, &self.cuda) {
            (Backend::Cpu, _) => {
                let codec = CacheCodec::new(format, d, rotation, Isa::best())?;
                codec.quantize(&rows, &mut cache, 0)?;
            }
            (Backend::Cuda(_), Some(dev)) => {
                if n * h == 0 {
                    return Ok(cache);
                }
                let codec = CudaCodec::new(dev, format, d, rotation)?;
                let stream = dev.stream();
                let input = stream.clone_htod(&rows).map_err(driver("uploading rows"))?;
                let mut out = stream
                    .alloc_zeros::<u8>(cache.len())
                    .map_err(driver("allocating a cache"))?;
                codec.quantize(dev, &input, &mut out, CacheTarget::contiguous(h, 0))?;
                cache = stream
                    .clone_dtoh(&out)
                    .map_err(driver("downloading a cache"))?;
            }
            _ => {
                // The oracle: rotate in f64, round to f32, quantize each row.
                let mut row = vec![0f64; d];
                let mut row32 = vec![0f32; d];
                for (i, chunk) in rows.chunks_exact(d.max(1)).enumerate() {
                    for (r, v) in row.iter_mut().zip(chunk) {
                        *r = f64::from(*v);
                    }
                    if let Some(r) = rotation {
                        r.forward_in_place(&mut row)?;
                    }
                    for (a, b) in row32.iter_mut().zip(&row) {
                        *a = *b as f32;
                    }
                    format.quantize_into(&row32, &mut cache[i * row_bytes..][..row_bytes])?;
                }
            }
        }
        Ok(cache)
    }

    /// The attention output `[n_q, h_q, d_v]` (flattened) of `layer`'s queries on the caches
    /// `k` and `v` (bytes from [`Self::quantize`] with `plan`'s rotations): the queries are
    /// rotated by `plan.qk` (then, with [`QueryMode::Q8_0`], quantized) and the output rotated
    /// back by `plan.v`, as the kernels do. The CUDA kernels take f32 queries only.
    pub fn attention(
        &self,
        layer: &Activations,
        plan: &RotationPlan,
        k: (KvFormat, &[u8]),
        v: (KvFormat, &[u8]),
        query: QueryMode,
    ) -> Result<Vec<f64>, Error> {
        let (n_q, h_q, d) = layer.q.dim();
        let (n_kv, h_kv, d_v) = layer.v.dim();
        let q: Vec<f32> = layer.q.iter().copied().collect();
        if query != QueryMode::Exact && matches!(self.backend, Backend::Cuda(_)) {
            return Err(Error::Input(format!(
                "{}: the CUDA kernels take f32 queries; --query {query} runs on cpu or oracle",
                self.backend
            )));
        }
        match (self.backend, &self.cuda) {
            (Backend::Cpu, _) => {
                let kv = KvCacheView::new(k.0, k.1, n_kv, h_kv, d)?;
                let vv = KvCacheView::new(v.0, v.1, n_kv, h_kv, d_v)?;
                let kernel = CpuAttention::new(plan, Isa::best()).with_query_mode(query);
                let out = kernel.run(&q, n_q, h_q, &kv, &vv, &layer.params)?;
                Ok(out.into_iter().map(f64::from).collect())
            }
            (Backend::Cuda(_), Some(dev)) => {
                if n_q * h_q * d_v == 0 {
                    return Ok(Vec::new());
                }
                let stream = dev.stream();
                let up = |b: &[u8]| stream.clone_htod(b).map_err(driver("uploading a cache"));
                let (kb, vb) = (up(k.1)?, up(v.1)?);
                let layout = CacheLayout::Contiguous {
                    tokens_per_seq: n_kv,
                };
                let kc = CudaKvCache {
                    format: k.0,
                    bytes: &kb,
                    n_heads: h_kv,
                    dim: d,
                    layout,
                };
                let vc = CudaKvCache {
                    format: v.0,
                    bytes: &vb,
                    n_heads: h_kv,
                    dim: d_v,
                    layout,
                };
                let qd = stream.clone_htod(&q).map_err(driver("uploading queries"))?;
                let mut out = stream
                    .alloc_zeros::<f32>(n_q * h_q * d_v)
                    .map_err(driver("allocating the output"))?;
                CudaAttention::new(dev, plan)?.prefill(
                    dev,
                    &qd,
                    n_q,
                    h_q,
                    &kc,
                    &vc,
                    n_kv,
                    &layer.params,
                    &mut out,
                )?;
                let out = stream
                    .clone_dtoh(&out)
                    .map_err(driver("downloading the output"))?;
                Ok(out.into_iter().map(f64::from).collect())
            }
            _ => {
                let mode = query.resolve(k.0, plan.qk.is_some(), d);
                let q_rot = queries_for(layer.q.view(), plan.qk.as_ref(), mode, Backend::Oracle)?;
                let kd = dequantize(k.0, k.1, (n_kv, h_kv, d))?;
                let vd = dequantize(v.0, v.1, (n_kv, h_kv, d_v))?;
                let rows: Vec<usize> = (0..n_q).collect();
                crate::oracle_check::oracle_rows(
                    &q_rot,
                    &kd,
                    &vd,
                    plan.v.as_ref(),
                    &layer.params,
                    &rows,
                )
            }
        }
    }
}

/// Maps a driver error of a buffer operation to the CUDA error type.
fn driver(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |source| {
        Error::from(CudaError::Driver {
            what: what.into(),
            source,
        })
    }
}

/// Q rotated by `rotation` (in f64), as the oracle rotates it.
///
/// ```
/// let q = ndarray::Array3::from_elem((1, 1, 4), 1.0f32);
/// let r = rotq::Rotation::hadamard(4).unwrap();
/// let q_rot = rotq_cli::eval_backend::rotate_queries(q.view(), Some(&r)).unwrap();
/// assert!((q_rot[[0, 0, 0]] - 2.0).abs() < 1e-12); // (1+1+1+1)/2
/// ```
pub fn rotate_queries(
    q: ArrayView3<f32>,
    rotation: Option<&Rotation>,
) -> Result<Array3<f64>, Error> {
    let mut out = q.mapv(f64::from);
    if let Some(r) = rotation {
        let d = out.dim().2;
        let mut buf = vec![0f64; d];
        for mut row in out.lanes_mut(Axis(2)) {
            for (b, v) in buf.iter_mut().zip(row.iter()) {
                *b = *v;
            }
            r.forward_in_place(&mut buf)?;
            for (v, b) in row.iter_mut().zip(&buf) {
                *v = *b;
            }
        }
    }
    Ok(out)
}

/// Queries `[n_q, h_q, d]` as the attention in `mode` (resolved) on `backend` takes them, in
/// f64: rotated by `rotation` in f64 for exact queries; for q8_0 queries, rotated as that
/// backend rotates them (the CPU kernels' f32 rotation, or the oracle's f64 one rounded to f32)
/// and each row through q8_0 blocks (`rotq_reference::attention::quantize_query_in_place`,
/// the mode's spec). Using the backend's own rotation keeps a q8_0 code from flipping between
/// the kernel and its oracle check where two roundings of a value straddle a code boundary.
///
/// ```
/// use rotq_cli::eval_backend::{queries_for, Backend};
/// use rotq_cpu::QueryMode;
/// let q = ndarray::Array3::from_shape_fn((1, 1, 32), |(_, _, c)| c as f32 * 0.01);
/// let exact = queries_for(q.view(), None, QueryMode::Exact, Backend::Cpu).unwrap();
/// let q8 = queries_for(q.view(), None, QueryMode::Q8_0, Backend::Cpu).unwrap();
/// assert!((q8[[0, 0, 31]] - 0.31).abs() < 0.31 / 200.0);
/// assert_ne!(q8, exact);
/// ```
pub fn queries_for(
    q: ArrayView3<f32>,
    rotation: Option<&Rotation>,
    mode: QueryMode,
    backend: Backend,
) -> Result<Array3<f64>, Error> {
    if mode == QueryMode::Exact {
        return rotate_queries(q, rotation);
    }
    let dim = q.dim();
    let mut rows: Vec<f32> = match (backend, rotation) {
        (Backend::Cpu, Some(r)) => {
            let mut rows: Vec<f32> = q.iter().copied().collect();
            rotq_cpu::CpuRotation::new(r, Isa::best()).forward_rows(&mut rows)?;
            rows
        }
        _ => rotate_queries(q, rotation)?
            .iter()
            .map(|&v| v as f32)
            .collect(),
    };
    rotq_reference::attention::quantize_query_in_place(&mut rows)?;
    Array3::from_shape_vec(dim, rows.into_iter().map(f64::from).collect())
        .map_err(|e| Error::Input(format!("queries: {e}")))
}

/// The values a cache of `shape` (`[tokens, heads, dim]`) in `format` holds, as f64 (the
/// oracle's dequantizer).
///
/// ```
/// use rotq::KvFormat;
/// let bytes = KvFormat::Q8_0.quantize_row(&[0.5f32; 32]).unwrap();
/// let x = rotq_cli::eval_backend::dequantize(KvFormat::Q8_0, &bytes, (1, 1, 32)).unwrap();
/// assert!((x[[0, 0, 3]] - 0.5).abs() < 1e-2);
/// ```
pub fn dequantize(
    format: KvFormat,
    bytes: &[u8],
    shape: (usize, usize, usize),
) -> Result<Array3<f64>, Error> {
    let values = if bytes.is_empty() {
        Vec::new()
    } else {
        format.dequantize_rows(bytes, shape.2)?
    };
    Array3::from_shape_vec(shape, values.into_iter().map(f64::from).collect())
        .map_err(|e| Error::Input(format!("a {format} cache of shape {shape:?}: {e}")))
}

/// Exact attention probabilities are compared with those of the cache through this: the
/// per-row KL divergences `KL(exact ‖ cache)` of every `(head, query)` row, where the cache's
/// probabilities are the softmax of `scale · q_rot · k_cache` over the visible keys (f64).
///
/// ```
/// use rotq_cli::eval_backend::{cache_klds, rotate_queries};
/// use rotq::{attention, AttentionParams};
/// let f = |n, h, s: f32| ndarray::Array3::from_shape_fn((n, h, 32), |(a, b, c)| ((a * 7 + b * 3 + c) as f32 * s).sin());
/// let (q, k, v) = (f(2, 2, 0.3), f(6, 1, 0.7), f(6, 1, 1.1));
/// let params = AttentionParams { causal: true, pos_offset: 4, ..Default::default() };
/// let exact = attention(q.view(), k.view(), v.view(), &params).unwrap();
/// let same = cache_klds(&exact.probs, &rotate_queries(q.view(), None).unwrap(), &k.mapv(f64::from), &params);
/// assert!(same.iter().all(|x| x.abs() < 1e-12));
/// ```
pub fn cache_klds(
    exact_probs: &Array3<f64>,
    q_rot: &Array3<f64>,
    k_cache: &Array3<f64>,
    params: &rotq_reference::AttentionParams,
) -> Vec<f64> {
    use rayon::prelude::*;
    let (n_q, h_q, d) = q_rot.dim();
    let (n_kv, h_kv, _) = k_cache.dim();
    let group = h_q / h_kv.max(1);
    let scale = params.scale.unwrap_or(1.0 / (d as f64).sqrt());
    (0..h_q)
        .into_par_iter()
        .flat_map_iter(|h| {
            let hk = h / group.max(1);
            let mut scores = vec![0f64; n_kv];
            let mut approx = vec![0f64; n_kv];
            (0..n_q)
                .map(|i| {
                    let visible: Vec<usize> = (0..n_kv).filter(|&j| params.visible(i, j)).collect();
                    if visible.is_empty() {
                        return 0.0;
                    }
                    let qv = q_rot.index_axis(Axis(0), i);
                    let qv = qv.index_axis(Axis(0), h);
                    for &j in &visible {
                        let kj = k_cache.index_axis(Axis(0), j);
                        let raw = scale * qv.dot(&kj.index_axis(Axis(0), hk));
                        scores[j] = params.softcap.map_or(raw, |c| c * (raw / c).tanh());
                    }
                    let max = visible
                        .iter()
                        .fold(f64::NEG_INFINITY, |m, &j| m.max(scores[j]));
                    let total: f64 = visible.iter().map(|&j| (scores[j] - max).exp()).sum();
                    approx.iter_mut().for_each(|a| *a = 0.0);
                    for &j in &visible {
                        approx[j] = (scores[j] - max).exp() / total;
                    }
                    let ph = exact_probs.index_axis(Axis(0), h);
                    let p = ph.index_axis(Axis(0), i).to_vec();
                    rotq_reference::metrics::kl_divergence(&p, &approx)
                })
                .collect::<Vec<_>>()
        })
        .collect()
}
