//! One layer's rotated, quantized KV cache, as an engine drives it: append keys and values
//! (rotated and quantized in one pass) at their positions, run attention over the cache
//! (prefill or decode), move tokens' positions (context shift) and drop tokens.
//!
//! The calls are the same on every [`Backend`]: on the CPU the bytes live in host memory and
//! the SIMD kernels of `rotq-cpu` run; on a CUDA device they stay in device memory and the
//! kernels of `rotq-cuda` run (rotate-quantize in one kernel per append, decode attention for
//! one query row, prefill for several, the context shift in place). Keys, values, queries and
//! outputs are host `f32` slices on both; a CUDA cache also takes device buffers
//! ([`RotatedKvCache::append_device`], [`RotatedKvCache::attention_device`]). The kernels pick
//! their tuned configurations from the tuning cache on their own.
//!
//! **Layout.** [`CacheSpec::paging`] chooses how the tokens lie in memory. A contiguous cache
//! ([`Paging::Contiguous`]) puts row `(token, head)` at `(token · n_heads + head) · row_bytes`.
//! A paged cache ([`Paging::Paged`]) holds a pool of pages of `page_tokens` tokens (the
//! capacity rounded up to whole pages) and a block table ([`RotatedKvCache::block_table`]):
//! token `t` lives in page `table[t / page_tokens]`, slot `t % page_tokens`, row `(page ·
//! page_tokens + slot) · n_heads + head` — the layout `rotq_cuda::CacheLayout::Paged` and
//! `rotq_cpu::KvCacheView::paged` read in place, so [`RotatedKvCache::pool`] (or
//! [`RotatedKvCache::device_pool`]) and the table can go straight to the kernels. On both
//! backends the kernels read and write the pages in place (a CUDA append or shift is one kernel
//! through the table; the CPU runs its codec once per page touched, and its attention looks
//! every row up through the table). Removing a whole number of pages' worth of tokens gives
//! the pages back (taken again by later appends) and moves at most one page's kept tokens;
//! any other removal moves every later token down, as in a contiguous cache.
//!
//! **Positions.** The cache records each token's position ([`RotatedKvCache::positions`]):
//! [`RotatedKvCache::append_at`] takes them from the engine, [`RotatedKvCache::append`]
//! continues from the newest token's; [`RotatedKvCache::shift`] adds its delta to the shifted
//! tokens' and [`RotatedKvCache::remove`] drops the removed ones'. The kernels mask by the
//! order of the tokens held, so appended tokens must continue the newest one's position one by
//! one (any start for an empty cache), and `attention` reads `params.pos_offset` as the first
//! query's *position*: with a causal mask or a window it maps it to the kernels' token index by
//! subtracting the first token's position, which needs the tokens at consecutive positions
//! (a removal from the middle leaves a gap until the later tokens are shifted down to close
//! it). An engine that drops and shifts as llama.cpp does (or never drops) keeps the positions
//! `0..len`, where the position is the index.
//!
//! [`RotatedKvCache::bytes`] gives the tokens' rows in token order (gathered from the pages of
//! a paged cache; a copy from a CUDA device), for other kernels or a file. Without a rotation
//! a CPU and a CUDA cache fed the same rows hold the same bytes; with one, a code may differ
//! where a rotated value sits within f32 rounding of a code boundary (each backend rotates
//! with its own f32 kernel).
//!
//! ```
//! use rotq::cache::{Backend, CacheSpec, Paging, RotatedKvCache};
//! use rotq::{AttentionParams, KvFormat, Rotation, RotationPlan};
//! // "cpu", "cuda" or "cuda:N" (e.g. an engine's --device option); nothing else changes.
//! let backend = Backend::open("cpu")?;
//! let spec = CacheSpec {
//!     k_format: KvFormat::Q4_0,
//!     v_format: KvFormat::Q8_0,
//!     plan: RotationPlan { qk: Some(Rotation::hadamard(64)?), v: None },
//!     n_heads: 2,
//!     head_dim: 64,
//!     v_dim: 64,
//!     capacity: 100,
//!     paging: Paging::Paged { page_tokens: 16 }, // or Paging::Contiguous
//!     query: rotq::QueryMode::Auto, // q8_0 queries over this rotated q4_0 K cache
//! };
//! let mut cache = RotatedKvCache::on(spec, &backend)?;
//! let rows = |n: usize, s: f32| (0..n * 2 * 64).map(|i| ((i as f32) * s).sin()).collect::<Vec<_>>();
//! let positions: Vec<usize> = (0..10).collect();
//! cache.append_at(&rows(10, 0.1), &rows(10, 0.2), &positions)?; // a 10-token prompt
//! assert_eq!(cache.block_table(), Some(&[0u32][..])); // 10 tokens: one page
//! let q = rows(1, 0.3); // one decode query of 2 heads (MHA here)
//! let params = AttentionParams { causal: true, pos_offset: 9, ..Default::default() };
//! let out = cache.attention(&q, 1, 2, &params)?;
//! assert_eq!(out.len(), 2 * 64);
//! # Ok::<(), rotq::Error>(())
//! ```

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod pages;

use crate::reference::rope::Rope;
use crate::reference::{AttentionParams, Error as InputError, KvFormat, RotationPlan};
use crate::{Error, QueryMode};
#[cfg(feature = "cuda")]
use cudarc::driver::CudaSlice;
use pages::Pages;
#[cfg(feature = "cuda")]
use rotq_cuda::{Device, GpuElement};
use std::borrow::Cow;
use std::ops::Range;
#[cfg(feature = "cuda")]
use std::sync::Arc;

/// Where a cache's bytes live and which kernels run on them.
///
/// Open a CUDA device once and give the same `Backend` to every layer's cache: the device
/// compiles each kernel once and shares it.
///
/// ```
/// use rotq::cache::Backend;
/// assert_eq!(Backend::open("cpu")?.name(), "cpu");
/// assert!(Backend::open("tpu:0").is_err());
/// // Where no CUDA driver or device is, opening one is an error that says so.
/// // Where no CUDA driver or device is (or the build has no `cuda` feature), it says so.
/// # #[cfg(feature = "cuda")]
/// if !rotq::cuda::cuda_available() {
///     assert!(Backend::open("cuda:0").is_err());
/// }
/// # Ok::<(), rotq::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub enum Backend {
    /// Host memory and the CPU kernels (SIMD, the best instruction set present).
    #[default]
    Cpu,
    /// Device memory and the CUDA kernels of this device.
    #[cfg(feature = "cuda")]
    Cuda(Arc<Device>),
}

impl Backend {
    /// `"cpu"`, or a CUDA device: `"cuda"` (`cuda:0`) or `"cuda:N"`. A CUDA device that is not
    /// there (no driver, no such ordinal) is an [`Error::Cuda`] saying so.
    pub fn open(name: &str) -> Result<Self, Error> {
        match name {
            "cpu" => Ok(Self::Cpu),
            #[cfg(feature = "cuda")]
            _ if name == "cuda" || name.starts_with("cuda:") => {
                Ok(Self::Cuda(Arc::new(Device::open(name)?)))
            }
            #[cfg(not(feature = "cuda"))]
            _ if name == "cuda" || name.starts_with("cuda:") => Err(InputError::InvalidParameter {
                name: "device",
                reason: format!(
                    "{name:?}: this build of rotq has no CUDA backend (feature `cuda`)"
                ),
            }
            .into()),
            _ => Err(InputError::InvalidParameter {
                name: "device",
                reason: format!("{name:?} is not cpu, cuda or cuda:N"),
            }
            .into()),
        }
    }

    /// `"cpu"` or the device's `"cuda:N"`.
    ///
    /// ```
    /// assert_eq!(rotq::cache::Backend::Cpu.name(), "cpu");
    /// ```
    pub fn name(&self) -> String {
        match self {
            Self::Cpu => "cpu".into(),
            #[cfg(feature = "cuda")]
            Self::Cuda(dev) => dev.info().id.clone(),
        }
    }
}

/// The K and V bytes of a cache: borrowed from a CPU cache, copied from a CUDA one.
///
/// ```
/// use std::borrow::Cow;
/// let bytes: rotq::cache::KvBytes = (Cow::Borrowed(&[1u8, 2][..]), Cow::Owned(vec![3u8]));
/// assert_eq!(bytes.0.len() + bytes.1.len(), 3);
/// ```
pub type KvBytes<'a> = (Cow<'a, [u8]>, Cow<'a, [u8]>);

/// What a layer's cache holds and how much. [`Default`] is an f16, unrotated, contiguous
/// cache of one head of 128 values and no capacity: set at least what the model needs, as
/// below, and the fields added later keep their defaults.
///
/// ```
/// use rotq::cache::{CacheSpec, Paging};
/// use rotq::{KvFormat, RotationPlan};
/// let spec = CacheSpec { k_format: KvFormat::Q8_0, v_format: KvFormat::Q8_0,
///     plan: RotationPlan::none(), n_heads: 8, head_dim: 128, v_dim: 128, capacity: 4096,
///     paging: Paging::Contiguous, query: rotq::QueryMode::Auto };
/// let same = CacheSpec { k_format: KvFormat::Q8_0, v_format: KvFormat::Q8_0, n_heads: 8,
///     capacity: 4096, ..Default::default() };
/// assert_eq!(spec, same);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct CacheSpec {
    /// Format of the K rows.
    pub k_format: KvFormat,
    /// Format of the V rows.
    pub v_format: KvFormat,
    /// Rotations: `qk` of Q and K, `v` of V (undone on the output by the attention).
    pub plan: RotationPlan,
    /// KV heads per token.
    pub n_heads: usize,
    /// Values per K row.
    pub head_dim: usize,
    /// Values per V row.
    pub v_dim: usize,
    /// Tokens the cache can hold (its buffers are allocated once, up front; a paged cache
    /// rounds this up to whole pages).
    pub capacity: usize,
    /// How the tokens lie in the buffers (see the module docs).
    pub paging: Paging,
    /// The arithmetic of the CPU attention's `K·Q` (see [`crate::pool::PoolSpec::query`]). The
    /// CUDA kernels take f32 queries: `Auto` runs exact there and `Q8_0` is refused.
    pub query: QueryMode,
}

impl Default for CacheSpec {
    fn default() -> Self {
        Self {
            k_format: KvFormat::F16,
            v_format: KvFormat::F16,
            plan: RotationPlan::none(),
            n_heads: 1,
            head_dim: 128,
            v_dim: 128,
            capacity: 0,
            paging: Paging::Contiguous,
            query: QueryMode::Auto,
        }
    }
}

/// How a cache's tokens lie in its buffers (not to be confused with `rotq_cuda::CacheLayout`,
/// the kernels' view of a batch of sequences, which a cache builds from this).
///
/// ```
/// use rotq::cache::{CacheSpec, Paging, RotatedKvCache};
/// let spec = CacheSpec { capacity: 100, paging: Paging::Paged { page_tokens: 16 }, ..Default::default() };
/// let cache = RotatedKvCache::new(spec)?;
/// assert_eq!(cache.capacity(), 112); // 7 pages of 16 tokens
/// assert!(RotatedKvCache::new(CacheSpec { paging: Paging::Paged { page_tokens: 0 }, ..Default::default() }).is_err());
/// # Ok::<(), rotq::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Paging {
    /// Token `t` in row block `t` of one buffer of `capacity` tokens.
    #[default]
    Contiguous,
    /// Pages of `page_tokens` tokens (at least 1) in a pool, and a block table of the
    /// sequence's pages: token `t` in page `table[t / page_tokens]`, slot `t % page_tokens`.
    Paged {
        /// Tokens per page.
        page_tokens: usize,
    },
}

/// One layer's K and V caches on one [`Backend`] (see the module docs).
///
/// **Threads.** A cache is `Send` and `Sync`: it may move to another thread, and threads may
/// share `&cache` to read it at once (`attention`, `bytes`, `positions`, …). The calls that
/// change it (`append`, `shift`, `remove`) take `&mut self`: to share one cache between
/// threads that change it, put it behind a `RwLock`, as the C API's handles do.
///
/// ```
/// use rotq::cache::{CacheSpec, RotatedKvCache};
/// use rotq::KvFormat;
/// let spec = CacheSpec { k_format: KvFormat::Q8_0, v_format: KvFormat::Q8_0,
///     n_heads: 1, head_dim: 32, v_dim: 32, capacity: 4, ..Default::default() };
/// let mut cache = RotatedKvCache::new(spec)?; // on the CPU
/// cache.append(&[0.5; 2 * 32], &[0.25; 2 * 32])?;
/// assert_eq!(cache.len(), 2);
/// # Ok::<(), rotq::Error>(())
/// ```
#[derive(Debug)]
pub struct RotatedKvCache {
    spec: CacheSpec,
    backend: Backend,
    /// Where each token's rows are.
    pages: Pages,
    /// Each token's position (its length is the cache's).
    positions: Vec<usize>,
    /// The first token whose position is not the one after its predecessor's, if any.
    gap: Option<usize>,
    store: Store,
}

/// The bytes and kernels of one backend.
#[derive(Debug)]
enum Store {
    // Boxed, both: each backend's handles are hundreds of bytes, and of different sizes.
    Cpu(Box<cpu::CpuStore>),
    #[cfg(feature = "cuda")]
    Cuda(Box<cuda::CudaStore>),
}

impl RotatedKvCache {
    /// An empty cache on the CPU; an unsupported format, dimension or plan is an error.
    ///
    /// ```
    /// use rotq::cache::{CacheSpec, RotatedKvCache};
    /// use rotq::KvFormat;
    /// let spec = CacheSpec { k_format: KvFormat::Q4_0, v_format: KvFormat::Q4_0,
    ///     n_heads: 1, head_dim: 30, v_dim: 32, capacity: 4, ..Default::default() };
    /// assert!(RotatedKvCache::new(spec).is_err()); // q4_0 rows are whole blocks of 32
    /// ```
    pub fn new(spec: CacheSpec) -> Result<Self, Error> {
        Self::on(spec, &Backend::Cpu)
    }

    /// An empty cache on `backend`, its buffers allocated for `spec.capacity` tokens (on a
    /// CUDA device, in device memory). What the backend's kernels cannot do (a format or plan,
    /// a head dimension the attention kernels do not take: over 65536 on the CPU, not a
    /// multiple of 32 or over 4096 on CUDA), a page of no tokens, sizes that overflow `usize`
    /// (`Error::Overflow`: a token's values or bytes, a page's, the buffers'), or memory that
    /// cannot be had, is an error; the calls on a cache made never overflow.
    ///
    /// ```
    /// use rotq::cache::{Backend, CacheSpec, RotatedKvCache};
    /// use rotq::KvFormat;
    /// let spec = CacheSpec { k_format: KvFormat::Q8_0, v_format: KvFormat::F16,
    ///     n_heads: 2, head_dim: 64, v_dim: 64, capacity: 16, ..Default::default() };
    /// let cache = RotatedKvCache::on(spec.clone(), &Backend::Cpu)?;
    /// assert_eq!(cache.backend().name(), "cpu");
    /// // 2^59 heads of 64 values: a token's size overflows.
    /// let huge = CacheSpec { n_heads: 1 << 59, capacity: 0, ..spec.clone() };
    /// assert!(RotatedKvCache::on(huge, &Backend::Cpu).is_err());
    /// // No attention kernel takes rows of 100,000 values.
    /// let wide = CacheSpec { head_dim: 100_000, v_dim: 100_000, k_format: KvFormat::F16, ..spec };
    /// assert!(RotatedKvCache::on(wide, &Backend::Cpu).is_err());
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn on(spec: CacheSpec, backend: &Backend) -> Result<Self, Error> {
        spec.plan.check_dims(spec.head_dim, spec.v_dim)?;
        for (name, value) in [
            ("n_heads", spec.n_heads),
            ("head_dim", spec.head_dim),
            ("v_dim", spec.v_dim),
        ] {
            if value == 0 {
                return Err(InputError::InvalidParameter {
                    name,
                    reason: "a cache needs at least one KV head of at least one value".into(),
                }
                .into());
            }
        }
        let pages = Pages::new(spec.paging, spec.capacity)?;
        check_sizes(&spec, &pages)?;
        #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
        let rows = pages
            .slots()
            .checked_mul(spec.n_heads)
            .ok_or(InputError::Overflow("cache rows"))?;
        let store = match backend {
            Backend::Cpu => Store::Cpu(Box::new(cpu::CpuStore::new(&spec, &pages)?)),
            #[cfg(feature = "cuda")]
            Backend::Cuda(dev) => {
                // The CUDA kernels take f32 queries: `Auto` is exact there, `Q8_0` refused.
                if spec.query == QueryMode::Q8_0 {
                    return Err(InputError::InvalidParameter {
                        name: "query",
                        reason: "q8_0 queries run on the CPU; the CUDA kernels take f32 \
                                 queries (use QueryMode::Auto or Exact)"
                            .into(),
                    }
                    .into());
                }
                Store::Cuda(Box::new(cuda::CudaStore::new(dev.clone(), &spec, rows)?))
            }
        };
        Ok(Self {
            spec,
            backend: backend.clone(),
            pages,
            positions: Vec::new(),
            gap: None,
            store,
        })
    }

    /// What the cache holds.
    ///
    /// ```
    /// # use rotq::cache::{CacheSpec, RotatedKvCache};
    /// # let spec = CacheSpec { head_dim: 32, v_dim: 32, capacity: 4, ..Default::default() };
    /// let cache = RotatedKvCache::new(spec.clone())?;
    /// assert_eq!(cache.spec(), &spec);
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn spec(&self) -> &CacheSpec {
        &self.spec
    }

    /// The arithmetic its attention's `K·Q` runs in: the spec's [`QueryMode`] resolved for its
    /// formats and rotation on the CPU ([`QueryMode::resolve`]); [`QueryMode::Exact`] on a CUDA
    /// device, whose kernels take f32 queries.
    ///
    /// ```
    /// # use rotq::cache::{CacheSpec, RotatedKvCache};
    /// use rotq::{KvFormat, QueryMode, RotationPlan, Rotation};
    /// let spec = CacheSpec { k_format: KvFormat::Q4_0, head_dim: 32, v_dim: 32, capacity: 4,
    ///     plan: RotationPlan { qk: Some(Rotation::hadamard(32)?), v: None }, ..Default::default() };
    /// assert_eq!(RotatedKvCache::new(spec)?.query_mode(), QueryMode::Q8_0);
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn query_mode(&self) -> QueryMode {
        match self.store {
            Store::Cpu(_) => self.spec.query.resolve(
                self.spec.k_format,
                self.spec.plan.qk.is_some(),
                self.spec.head_dim,
            ),
            #[cfg(feature = "cuda")]
            Store::Cuda(_) => QueryMode::Exact,
        }
    }

    /// Where the bytes live.
    ///
    /// ```
    /// # use rotq::cache::{CacheSpec, RotatedKvCache};
    /// # let spec = CacheSpec { head_dim: 32, v_dim: 32, capacity: 4, ..Default::default() };
    /// let cache = RotatedKvCache::new(spec)?;
    /// assert!(matches!(cache.backend(), rotq::cache::Backend::Cpu));
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Tokens in the cache.
    ///
    /// ```
    /// # use rotq::cache::{CacheSpec, RotatedKvCache};
    /// # let spec = CacheSpec { head_dim: 32, v_dim: 32, capacity: 4, ..Default::default() };
    /// let mut cache = RotatedKvCache::new(spec)?;
    /// cache.append(&[1.0; 3 * 32], &[1.0; 3 * 32])?;
    /// assert_eq!(cache.len(), 3);
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether the cache holds no token.
    ///
    /// ```
    /// # use rotq::cache::{CacheSpec, RotatedKvCache};
    /// # let spec = CacheSpec { head_dim: 32, v_dim: 32, capacity: 4, ..Default::default() };
    /// assert!(RotatedKvCache::new(spec)?.is_empty());
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Tokens the cache can hold: `spec.capacity`, rounded up to whole pages when paged.
    ///
    /// ```
    /// # use rotq::cache::{CacheSpec, Paging, RotatedKvCache};
    /// let spec = CacheSpec { capacity: 37, paging: Paging::Paged { page_tokens: 16 }, ..Default::default() };
    /// assert_eq!(RotatedKvCache::new(spec)?.capacity(), 48);
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn capacity(&self) -> usize {
        self.pages.slots()
    }

    /// Each token's position, in the order of the tokens held (see the module docs).
    ///
    /// ```
    /// # use rotq::cache::{CacheSpec, RotatedKvCache};
    /// # use rotq::reference::rope::{Rope, RopeVariant};
    /// # let spec = CacheSpec { head_dim: 32, v_dim: 32, capacity: 8, ..Default::default() };
    /// let mut cache = RotatedKvCache::new(spec)?;
    /// cache.append_at(&[1.0; 4 * 32], &[1.0; 4 * 32], &[100, 101, 102, 103])?;
    /// cache.remove(0..1)?;
    /// cache.shift(0..3, -101, &Rope::new(RopeVariant::Neox, 32))?;
    /// assert_eq!(cache.positions(), [0, 1, 2]);
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn positions(&self) -> &[usize] {
        &self.positions
    }

    /// The block table of a paged cache: page `i` of the sequence (tokens `i · page_tokens
    /// ..`) is page `table[i]` of [`Self::pool`], one entry per page in use. `None` for a
    /// contiguous cache.
    ///
    /// ```
    /// # use rotq::cache::{CacheSpec, Paging, RotatedKvCache};
    /// let spec = CacheSpec { head_dim: 32, v_dim: 32, capacity: 64,
    ///     paging: Paging::Paged { page_tokens: 16 }, ..Default::default() };
    /// let mut cache = RotatedKvCache::new(spec)?;
    /// cache.append(&[1.0; 40 * 32], &[1.0; 40 * 32])?;
    /// assert_eq!(cache.block_table(), Some(&[0u32, 1, 2][..]));
    /// cache.remove(0..16)?; // a whole page: given back, no token moves
    /// assert_eq!(cache.block_table(), Some(&[1u32, 2][..]));
    /// cache.append(&[1.0; 30 * 32], &[1.0; 30 * 32])?; // takes page 0 again, then page 3
    /// assert_eq!(cache.block_table(), Some(&[1u32, 2, 0, 3][..]));
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn block_table(&self) -> Option<&[u32]> {
        self.pages.paged().map(|(table, _)| table)
    }

    /// The K and V bytes of the tokens held (rows `(token, head)` in token order): borrowed
    /// from a contiguous CPU cache, gathered from the pages of a paged one, copied from the
    /// device on CUDA (where the copy can fail).
    ///
    /// ```
    /// # use rotq::cache::{CacheSpec, RotatedKvCache};
    /// # use rotq::KvFormat;
    /// # let spec = CacheSpec { k_format: KvFormat::Q8_0, v_format: KvFormat::Q8_0,
    /// #     head_dim: 32, v_dim: 32, capacity: 4, ..Default::default() };
    /// let mut cache = RotatedKvCache::new(spec)?;
    /// cache.append(&[1.0; 2 * 32], &[1.0; 2 * 32])?;
    /// let (k, v) = cache.bytes()?;
    /// assert_eq!((k.len(), v.len()), (2 * 34, 2 * 34)); // q8_0: 34 bytes per 32 values
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn bytes(&self) -> Result<KvBytes<'_>, Error> {
        let runs: Vec<_> = self.pages.runs(0..self.len()).collect();
        if let [run] = runs[..] {
            return self.read(run.slot..run.slot + run.len);
        }
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for run in runs {
            let (rk, rv) = self.read(run.slot..run.slot + run.len)?;
            k.extend_from_slice(&rk);
            v.extend_from_slice(&rv);
        }
        Ok((Cow::Owned(k), Cow::Owned(v)))
    }

    /// The whole K and V buffers ([`Self::capacity`] tokens' rows, held or not): a paged
    /// cache's pools of pages, which with [`Self::block_table`] an engine can hand to the
    /// kernels (`rotq_cpu::KvCacheView::paged`). Borrowed on the CPU, copied on CUDA (see
    /// [`Self::device_pool`]).
    ///
    /// ```
    /// # use rotq::cache::{CacheSpec, Paging, RotatedKvCache};
    /// # use rotq::KvFormat;
    /// let spec = CacheSpec { k_format: KvFormat::Q8_0, v_format: KvFormat::Q8_0, head_dim: 32,
    ///     v_dim: 32, capacity: 20, paging: Paging::Paged { page_tokens: 16 }, ..Default::default() };
    /// let mut cache = RotatedKvCache::new(spec)?;
    /// cache.append(&[1.0; 3 * 32], &[1.0; 3 * 32])?;
    /// let (k, _) = cache.pool()?;
    /// assert_eq!(k.len(), 32 * 34); // 2 pages of 16 tokens of one q8_0 row
    /// let view = rotq_cpu::KvCacheView::paged(KvFormat::Q8_0, &k, cache.block_table().unwrap(),
    ///     16, cache.len(), 1, 32)?;
    /// assert_eq!(view.n_tokens(), 3);
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn pool(&self) -> Result<KvBytes<'_>, Error> {
        self.read(0..self.capacity())
    }

    #[cfg(feature = "cuda")]
    /// The K and V buffers of a CUDA cache in device memory, for the `rotq-cuda` kernels with
    /// a `CacheLayout` built from [`Self::block_table`] (at least one byte each, even for no
    /// capacity). A cache on the CPU refuses it.
    ///
    /// ```no_run
    /// use rotq::cache::{Backend, CacheSpec, Paging, RotatedKvCache};
    /// use rotq::cuda::{CacheLayout, CudaKvCache};
    /// use rotq::KvFormat;
    /// let dev = std::sync::Arc::new(rotq::cuda::Device::open("cuda:0")?);
    /// let spec = CacheSpec { k_format: KvFormat::Q8_0, n_heads: 8, capacity: 1024,
    ///     paging: Paging::Paged { page_tokens: 16 }, ..Default::default() };
    /// let mut cache = RotatedKvCache::on(spec, &Backend::Cuda(dev))?;
    /// cache.append(&vec![0.5; 100 * 8 * 128], &vec![0.5; 100 * 8 * 128])?;
    /// let (k_pool, _) = cache.device_pool()?;
    /// let table = cache.block_table().unwrap();
    /// let layout = CacheLayout::Paged { table, pages_per_seq: table.len(), page_tokens: 16 };
    /// let k = CudaKvCache { format: KvFormat::Q8_0, bytes: k_pool, n_heads: 8, dim: 128, layout };
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn device_pool(&self) -> Result<(&CudaSlice<u8>, &CudaSlice<u8>), Error> {
        match &self.store {
            Store::Cuda(s) => Ok(s.pool()),
            Store::Cpu(_) => Err(needs_cuda("device_pool")),
        }
    }

    /// The bytes of token slots `slots` of the buffers.
    fn read(&self, slots: Range<usize>) -> Result<KvBytes<'_>, Error> {
        match &self.store {
            Store::Cpu(s) => {
                let (k, v) = s.read(slots);
                Ok((Cow::Borrowed(k), Cow::Borrowed(v)))
            }
            #[cfg(feature = "cuda")]
            Store::Cuda(s) => {
                let (k, v) = s.read(slots)?;
                Ok((Cow::Owned(k), Cow::Owned(v)))
            }
        }
    }

    /// Appends the keys `k` (`[n, n_heads, head_dim]`, unrotated) and values `v`
    /// (`[n, n_heads, v_dim]`) of `n` tokens at the end, at the positions after the newest
    /// token's (from 0 in an empty cache), rotating and quantizing each row in one pass (on
    /// CUDA, one kernel for K and one for V). Shapes that disagree or a full cache are errors,
    /// and nothing is written.
    ///
    /// ```
    /// # use rotq::cache::{CacheSpec, RotatedKvCache};
    /// # let spec = CacheSpec { head_dim: 32, v_dim: 32, capacity: 4, ..Default::default() };
    /// let mut cache = RotatedKvCache::new(spec)?;
    /// cache.append(&[1.0; 4 * 32], &[1.0; 4 * 32])?;
    /// assert!(cache.append(&[1.0; 32], &[1.0; 32]).is_err()); // full
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn append(&mut self, k: &[f32], v: &[f32]) -> Result<(), Error> {
        self.append_host(k, v, None)
    }

    /// [`Self::append`] at the engine's `positions`, one per token. They must continue the
    /// newest token's position one by one (an empty cache takes any first position): the
    /// kernels mask by the tokens' order. Anything else is an error, and nothing is written.
    ///
    /// ```
    /// # use rotq::cache::{CacheSpec, RotatedKvCache};
    /// # let spec = CacheSpec { head_dim: 32, v_dim: 32, capacity: 8, ..Default::default() };
    /// let mut cache = RotatedKvCache::new(spec)?;
    /// cache.append_at(&[1.0; 2 * 32], &[1.0; 2 * 32], &[7, 8])?;
    /// assert!(cache.append_at(&[1.0; 32], &[1.0; 32], &[10]).is_err()); // 9 comes next
    /// assert!(cache.append_at(&[1.0; 32], &[1.0; 32], &[9, 10]).is_err()); // one token
    /// cache.append_at(&[1.0; 32], &[1.0; 32], &[9])?;
    /// assert_eq!(cache.positions(), [7, 8, 9]);
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn append_at(&mut self, k: &[f32], v: &[f32], positions: &[usize]) -> Result<(), Error> {
        self.append_host(k, v, Some(positions))
    }

    fn append_host(
        &mut self,
        k: &[f32],
        v: &[f32],
        positions: Option<&[usize]>,
    ) -> Result<(), Error> {
        self.append_rows(k.len(), v.len(), positions, |s, pages, tokens| match s {
            Store::Cpu(s) => s.append(k, v, pages, tokens),
            #[cfg(feature = "cuda")]
            Store::Cuda(s) => s.append_host(k, v, pages, tokens),
        })
    }

    #[cfg(feature = "cuda")]
    /// [`Self::append`] from rows already on the cache's CUDA device (f32, f16 or bf16; the
    /// kernels rotate in f32). A cache on the CPU refuses it.
    ///
    /// ```no_run
    /// use rotq::cache::{Backend, CacheSpec, RotatedKvCache};
    /// use rotq::KvFormat;
    /// let dev = std::sync::Arc::new(rotq::cuda::Device::open("cuda:0")?);
    /// let spec = CacheSpec { k_format: KvFormat::Q4_0, v_format: KvFormat::Q8_0,
    ///     n_heads: 8, head_dim: 128, v_dim: 128, capacity: 1024, ..Default::default() };
    /// let mut cache = RotatedKvCache::on(spec, &Backend::Cuda(dev.clone()))?;
    /// let rows = dev.stream().clone_htod(&vec![half::f16::from_f32(0.5); 16 * 8 * 128]).unwrap();
    /// cache.append_device(&rows, &rows)?; // 16 tokens
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn append_device<T: GpuElement>(
        &mut self,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
    ) -> Result<(), Error> {
        self.append_device_rows(k, v, None)
    }

    #[cfg(feature = "cuda")]
    /// [`Self::append_at`] from rows already on the cache's CUDA device, as
    /// [`Self::append_device`].
    ///
    /// ```no_run
    /// use rotq::cache::{Backend, CacheSpec, RotatedKvCache};
    /// use rotq::KvFormat;
    /// let dev = std::sync::Arc::new(rotq::cuda::Device::open("cuda:0")?);
    /// let spec = CacheSpec { k_format: KvFormat::Q4_0, n_heads: 8, capacity: 1024, ..Default::default() };
    /// let mut cache = RotatedKvCache::on(spec, &Backend::Cuda(dev.clone()))?;
    /// let rows = dev.stream().clone_htod(&vec![0.5f32; 2 * 8 * 128]).unwrap();
    /// cache.append_device_at(&rows, &rows, &[0, 1])?;
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn append_device_at<T: GpuElement>(
        &mut self,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        positions: &[usize],
    ) -> Result<(), Error> {
        self.append_device_rows(k, v, Some(positions))
    }

    #[cfg(feature = "cuda")]
    fn append_device_rows<T: GpuElement>(
        &mut self,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        positions: Option<&[usize]>,
    ) -> Result<(), Error> {
        self.append_rows(k.len(), v.len(), positions, |s, pages, tokens| match s {
            Store::Cuda(s) => s.append(k, v, pages, tokens),
            Store::Cpu(_) => Err(needs_cuda("append_device")),
        })
    }

    /// Checks an append of keys of `k_len` values and values of `v_len` at `positions` (or the
    /// next ones), takes the pages it needs and has `write` put the tokens there (at least
    /// one; given the store, the pages and the tokens' range); gives the pages back if it
    /// fails.
    fn append_rows(
        &mut self,
        k_len: usize,
        v_len: usize,
        positions: Option<&[usize]>,
        write: impl FnOnce(&mut Store, &Pages, Range<usize>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let n = self.tokens_to_append(k_len, v_len)?;
        let new = self.new_positions(n, positions)?;
        let len = self.len();
        if n > 0 {
            self.pages.grow(len + n)?;
            if let Err(e) = write(&mut self.store, &self.pages, len..len + n) {
                self.pages.shrink(len);
                return Err(e);
            }
        }
        self.positions.extend(new);
        Ok(())
    }

    /// The positions of `n` tokens appended now: the engine's (checked: one per token, each
    /// the one after the last) or the ones after the newest token's.
    fn new_positions(&self, n: usize, given: Option<&[usize]>) -> Result<Range<usize>, Error> {
        let overflow = || InputError::Overflow("token positions");
        let start = match (self.positions.last(), given) {
            (Some(&last), _) => last.checked_add(1).ok_or_else(overflow)?,
            (None, Some(given)) => given.first().copied().unwrap_or(0),
            (None, None) => 0,
        };
        let next = start..start.checked_add(n).ok_or_else(overflow)?;
        let Some(given) = given else {
            return Ok(next);
        };
        if given.len() != n {
            return Err(InputError::LengthMismatch {
                what: "positions (one per token)",
                expected: n,
                actual: given.len(),
            }
            .into());
        }
        match given
            .iter()
            .zip(next.clone())
            .position(|(&p, want)| p != want)
        {
            None => Ok(next),
            Some(i) => Err(InputError::InvalidParameter {
                name: "positions",
                reason: format!(
                    "token {i} is at position {}, not {}: appended tokens continue the newest \
                     one's position one by one (the kernels mask by the tokens' order)",
                    given[i],
                    start + i
                ),
            }
            .into()),
        }
    }

    /// Attention of `n_q` query rows (`q` is `[n_q, h_q, head_dim]`, unrotated; `h_q` a
    /// multiple of the KV heads: GQA/MQA) against every token held; the first query sits at
    /// position `params.pos_offset` (prefill: the chunk's first position; decode: the newest
    /// token's). With a causal mask or a window the tokens must sit at consecutive positions,
    /// and the first query not before the first token (else an error; see the module docs).
    /// Returns `[n_q, h_q, v_dim]`; a row that sees no token is zeros. On CUDA one row runs
    /// the decode kernel and several the prefill kernels, with the CUDA kernels' limits (at
    /// most 16 query heads per KV head; their head dimensions were checked when the cache was
    /// made).
    ///
    /// ```
    /// # use rotq::cache::{CacheSpec, RotatedKvCache};
    /// # use rotq::{AttentionParams, KvFormat};
    /// # let spec = CacheSpec { k_format: KvFormat::Q8_0, v_format: KvFormat::Q8_0,
    /// #     head_dim: 32, v_dim: 32, capacity: 4, ..Default::default() };
    /// let mut cache = RotatedKvCache::new(spec)?;
    /// cache.append(&[0.5; 3 * 32], &[2.0; 3 * 32])?;
    /// // Prefill of 3 rows of 4 query heads (one KV head: MQA), causal.
    /// let params = rotq::AttentionParams { causal: true, ..Default::default() };
    /// let out = cache.attention(&[0.1; 3 * 4 * 32], 3, 4, &params)?;
    /// assert!(out.iter().all(|&x| (x - 2.0).abs() < 1e-3));
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn attention(
        &self,
        q: &[f32],
        n_q: usize,
        h_q: usize,
        params: &AttentionParams,
    ) -> Result<Vec<f32>, Error> {
        #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
        let out_len = self.check_query(q.len(), n_q, h_q, params)?;
        let params = self.kernel_params(params)?;
        let (spec, pages, len) = (&self.spec, &self.pages, self.len());
        match &self.store {
            Store::Cpu(s) => s.attention(q, n_q, h_q, &params, spec, pages, len),
            #[cfg(feature = "cuda")]
            Store::Cuda(_) if out_len == 0 || len == 0 => Ok(vec![0.0; out_len]),
            #[cfg(feature = "cuda")]
            Store::Cuda(s) => s.attention_host(q, n_q, h_q, &params, spec, pages, len),
        }
    }

    #[cfg(feature = "cuda")]
    /// [`Self::attention`] with the queries and the output on the cache's CUDA device (f32,
    /// f16 or bf16: f16/bf16 queries may run on the tensor cores). `out` must hold
    /// `[n_q, h_q, v_dim]`. A cache on the CPU refuses it.
    ///
    /// ```no_run
    /// use rotq::cache::{Backend, CacheSpec, RotatedKvCache};
    /// use rotq::{AttentionParams, KvFormat};
    /// let dev = std::sync::Arc::new(rotq::cuda::Device::open("cuda:0")?);
    /// let spec = CacheSpec { k_format: KvFormat::Q4_0, v_format: KvFormat::Q8_0,
    ///     n_heads: 8, head_dim: 128, v_dim: 128, capacity: 1024, ..Default::default() };
    /// let mut cache = RotatedKvCache::on(spec, &Backend::Cuda(dev.clone()))?;
    /// cache.append(&vec![0.5; 16 * 8 * 128], &vec![0.5; 16 * 8 * 128])?;
    /// let s = dev.stream();
    /// let q = s.clone_htod(&vec![half::f16::from_f32(0.1); 32 * 128]).unwrap();
    /// let mut out = s.alloc_zeros::<half::f16>(32 * 128).unwrap();
    /// let params = AttentionParams { causal: true, pos_offset: 15, ..Default::default() };
    /// cache.attention_device(&q, 1, 32, &params, &mut out)?;
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn attention_device<T: GpuElement>(
        &self,
        q: &CudaSlice<T>,
        n_q: usize,
        h_q: usize,
        params: &AttentionParams,
        out: &mut CudaSlice<T>,
    ) -> Result<(), Error> {
        let out_len = self.check_query(q.len(), n_q, h_q, params)?;
        let Store::Cuda(store) = &self.store else {
            return Err(needs_cuda("attention_device"));
        };
        if out.len() != out_len {
            return Err(InputError::LengthMismatch {
                what: "output [n_q, h_q, v_dim]",
                expected: out_len,
                actual: out.len(),
            }
            .into());
        }
        let params = self.kernel_params(params)?;
        store.attention(
            q,
            n_q,
            h_q,
            &params,
            out,
            &self.spec,
            &self.pages,
            self.len(),
        )
    }

    /// Context shift: the keys of `tokens` move by `delta` positions under `rope` (the cache's
    /// K rotation undone and redone around the RoPE turn, then re-quantized; see
    /// [`crate::reference::rope::shift_cache`]), and so do their recorded positions. V does
    /// not depend on the position. A position that would fall below 0 is an error, and nothing
    /// changes.
    ///
    /// ```
    /// # use rotq::cache::{CacheSpec, RotatedKvCache};
    /// use rotq::reference::rope::{Rope, RopeVariant};
    /// # let spec = CacheSpec { head_dim: 32, v_dim: 32, capacity: 4, ..Default::default() };
    /// let mut cache = RotatedKvCache::new(spec)?;
    /// cache.append(&[1.0; 4 * 32], &[1.0; 4 * 32])?;
    /// let rope = Rope::new(RopeVariant::Neox, 32);
    /// cache.shift(1..4, -1, &rope)?;
    /// assert_eq!(cache.positions(), [0, 0, 1, 2]);
    /// assert!(cache.shift(0..2, -1, &rope).is_err()); // position -1
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn shift(&mut self, tokens: Range<usize>, delta: i64, rope: &Rope) -> Result<(), Error> {
        self.check_range(&tokens)?;
        rope.check(self.spec.head_dim)?;
        let moved = |(i, &p): (usize, &usize)| {
            isize::try_from(delta)
                .ok()
                .and_then(|d| p.checked_add_signed(d))
                .ok_or_else(|| InputError::InvalidParameter {
                    name: "delta",
                    reason: format!(
                        "token {i} at position {p} would move to {}, outside 0..=usize::MAX",
                        i128::from(delta) + p as i128
                    ),
                })
        };
        let positions = self.positions[tokens.clone()]
            .iter()
            .enumerate()
            .map(|(i, p)| moved((tokens.start + i, p)))
            .collect::<Result<Vec<_>, _>>()?;
        match &mut self.store {
            Store::Cpu(s) => s.shift(&self.pages, tokens.clone(), delta, rope)?,
            #[cfg(feature = "cuda")]
            Store::Cuda(s) => s.shift(&self.pages, tokens.clone(), delta, rope)?,
        }
        self.positions[tokens].copy_from_slice(&positions);
        self.gap = first_gap(&self.positions);
        Ok(())
    }

    /// Drops `tokens` and their positions, moving the later ones down (their bytes,
    /// unchanged; on CUDA copies on the device). In a paged cache a whole number of pages'
    /// worth of tokens gives its pages back and moves at most one page's tokens. An engine
    /// that keeps positions contiguous then shifts the later tokens by `-(tokens.len())`.
    ///
    /// ```
    /// # use rotq::cache::{CacheSpec, RotatedKvCache};
    /// # let spec = CacheSpec { head_dim: 32, v_dim: 32, capacity: 4, ..Default::default() };
    /// let mut cache = RotatedKvCache::new(spec)?;
    /// cache.append(&[1.0; 4 * 32], &[1.0; 4 * 32])?;
    /// cache.remove(0..3)?;
    /// assert_eq!((cache.len(), cache.positions()), (1, &[3][..]));
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn remove(&mut self, tokens: Range<usize>) -> Result<(), Error> {
        self.check_range(&tokens)?;
        let mut pages = self.pages.clone();
        let moves = pages.remove(tokens.clone(), self.len());
        match &mut self.store {
            Store::Cpu(s) => s.remove(&moves),
            #[cfg(feature = "cuda")]
            Store::Cuda(s) => s.remove(&moves)?,
        }
        self.pages = pages;
        self.positions.drain(tokens);
        self.gap = first_gap(&self.positions);
        Ok(())
    }

    /// The tokens that keys of `k_len` and values of `v_len` values hold, if they are whole
    /// tokens of the same count that fit the cache.
    fn tokens_to_append(&self, k_len: usize, v_len: usize) -> Result<usize, Error> {
        let (h, d, dv) = (self.spec.n_heads, self.spec.head_dim, self.spec.v_dim);
        // Neither product overflows nor is 0: `check_sizes` and `on` saw to it.
        let (kt, vt) = (h * d, h * dv);
        if !k_len.is_multiple_of(kt) {
            return Err(InputError::Shape(format!(
                "keys of {k_len} values are not whole tokens of {h} heads x {d}"
            ))
            .into());
        }
        let n = k_len / kt;
        let want = n
            .checked_mul(vt)
            .ok_or(InputError::Overflow("values to append"))?;
        if v_len != want {
            return Err(InputError::Shape(format!(
                "{n} tokens of keys but {v_len} values of V (want {want})"
            ))
            .into());
        }
        if n > self.capacity() - self.len() {
            return Err(InputError::InvalidParameter {
                name: "append",
                reason: format!(
                    "{n} tokens do not fit: {} held of a capacity of {}",
                    self.len(),
                    self.capacity()
                ),
            }
            .into());
        }
        Ok(n)
    }

    /// Checks a query of `q_len` values as `[n_q, h_q, head_dim]` and `params`; returns the
    /// output's length. The same checks on both backends, before any work.
    fn check_query(
        &self,
        q_len: usize,
        n_q: usize,
        h_q: usize,
        params: &AttentionParams,
    ) -> Result<usize, Error> {
        params.validate()?;
        let h = self.spec.n_heads;
        if h_q == 0 || !h_q.is_multiple_of(h) {
            return Err(InputError::Shape(format!(
                "h_q {h_q} must be a positive multiple of h_kv {h}"
            ))
            .into());
        }
        params
            .pos_offset
            .checked_add(n_q)
            .ok_or(InputError::Overflow("query positions"))?;
        let size = |dim: usize| n_q.checked_mul(h_q).and_then(|x| x.checked_mul(dim));
        let expected = size(self.spec.head_dim).ok_or(InputError::Overflow("query size"))?;
        if q_len != expected {
            return Err(InputError::LengthMismatch {
                what: "queries [n_q, h_q, d]",
                expected,
                actual: q_len,
            }
            .into());
        }
        size(self.spec.v_dim).ok_or_else(|| InputError::Overflow("output size").into())
    }

    /// `params` as the kernels take them: the first query's position as a token index (its
    /// position less the first token's). A mask that reads positions (causal, a window) needs
    /// the tokens at consecutive positions and the first query not before the first token.
    fn kernel_params<'p>(
        &self,
        params: &'p AttentionParams,
    ) -> Result<Cow<'p, AttentionParams>, Error> {
        let first = match self.positions.first() {
            Some(&first) if params.causal || params.window.is_some() => first,
            _ => return Ok(Cow::Borrowed(params)),
        };
        if let Some(i) = self.gap {
            return Err(InputError::InvalidParameter {
                name: "positions",
                reason: format!(
                    "token {i} is at position {} after one at {}: a causal or windowed mask \
                     needs the tokens at consecutive positions (shift the later tokens to close \
                     the gap)",
                    self.positions[i],
                    self.positions[i - 1]
                ),
            }
            .into());
        }
        if first == 0 {
            return Ok(Cow::Borrowed(params));
        }
        let pos_offset =
            params
                .pos_offset
                .checked_sub(first)
                .ok_or_else(|| InputError::InvalidParameter {
                    name: "pos_offset",
                    reason: format!(
                    "the first query's position {} is before the first cached token's ({first})",
                    params.pos_offset
                ),
                })?;
        Ok(Cow::Owned(AttentionParams {
            pos_offset,
            ..params.clone()
        }))
    }

    fn check_range(&self, tokens: &Range<usize>) -> Result<(), Error> {
        if tokens.start > tokens.end || tokens.end > self.len() {
            return Err(InputError::InvalidParameter {
                name: "tokens",
                reason: format!(
                    "{tokens:?} is not a range of the {} tokens held",
                    self.len()
                ),
            }
            .into());
        }
        Ok(())
    }
}

/// Checks every size the cache computes from `spec` laid out in `pages`: a token's keys and
/// values (`n_heads × head_dim`, `n_heads × v_dim`), its bytes (`n_heads × row_bytes`), a
/// page's and the buffers' (tokens per page and token slots `×` those). Once these fit a
/// `usize`, so does every size a call computes from them.
fn check_sizes(spec: &CacheSpec, pages: &Pages) -> Result<(), Error> {
    let product =
        |what: &'static str, a: usize, b: usize| a.checked_mul(b).ok_or(InputError::Overflow(what));
    let h = spec.n_heads;
    product("a token's keys (n_heads x head_dim)", h, spec.head_dim)?;
    product("a token's values (n_heads x v_dim)", h, spec.v_dim)?;
    let k_bytes = product(
        "a token's key bytes",
        h,
        spec.k_format.row_bytes(spec.head_dim)?,
    )?;
    let v_bytes = product(
        "a token's value bytes",
        h,
        spec.v_format.row_bytes(spec.v_dim)?,
    )?;
    // The pool holds at least one page: its bytes bound a page's.
    let slots = pages.slots().max(pages.page_tokens());
    product(
        "the cache's key bytes (tokens x token bytes)",
        slots,
        k_bytes,
    )?;
    product(
        "the cache's value bytes (tokens x token bytes)",
        slots,
        v_bytes,
    )?;
    Ok(())
}

/// The first of `positions` that is not the one after its predecessor, if any.
fn first_gap(positions: &[usize]) -> Option<usize> {
    positions
        .windows(2)
        .position(|w| w[0].checked_add(1) != Some(w[1]))
        .map(|i| i + 1)
}

/// The error of a device-buffer `call` on a cache on the CPU.
#[cfg(feature = "cuda")]
fn needs_cuda(call: &'static str) -> Error {
    InputError::InvalidParameter {
        name: call,
        reason: "device buffers need a cache on a CUDA backend; this one is on the CPU".into(),
    }
    .into()
}
