//! Many sequences in one paged pool, in memory the engine owns: the batch engine API.
//!
//! A server keeps, per layer, one pool of K pages and one of V pages shared by every
//! sequence, and a page table per sequence (vLLM's `block_table` + `seq_lens`, FlashInfer's
//! CSR `indptr / indices / last_page_len`: [`PageTables`]). Each step it writes the new keys
//! and values of the whole batch in one call through a slot mapping (vLLM's
//! `reshape_and_cache_flash`: [`KvPool::append`]), then, once per step, plans the batch's
//! attention ([`KvPool::plan`]: the work partition and the workspace size, FlashInfer's
//! `plan()`), and per layer runs it ([`KvPool::run`]) into the engine's output buffer, with the
//! log-sum-exp of each row if asked (to merge partial attention, as cascade attention does).
//!
//! On a GPU the same layout lives in the engine's device memory and a step runs on its stream
//! through [`crate::cuda::batch`] (feature `cuda`; [`PoolSpec::cuda_geometry`] gives its pool
//! geometry): planned on the host, run with no allocation or synchronisation, graph-capturable.
//!
//! **Layout** (what the kernels read, and what [`crate::cache::RotatedKvCache`] holds for one
//! sequence): a pool of `n_pages` pages of `page_tokens` tokens; slot `s = page · page_tokens
//! + offset`; row `(s, head)` of K at byte `(s · n_kv_heads + head) · k_row_bytes` of the K
//! pool, each row `head_dim` values in the K format's blocks (docs/formats.md gives every
//! format's bytes); V likewise. A row is stored rotated (by the plan's `qk` rotation for K,
//! `v` for V) and quantized.
//!
//! ```
//! use rotq::pool::{Batch, KvPool, PageTables, PoolSpec};
//! use rotq::{KvFormat, Rotation, RotationPlan};
//! let spec = PoolSpec {
//!     k_format: KvFormat::Q4_0, v_format: KvFormat::Q8_0,
//!     plan: RotationPlan { qk: Some(Rotation::hadamard(64)?), v: None },
//!     n_kv_heads: 2, head_dim: 64, v_dim: 64, n_pages: 8, page_tokens: 16,
//!     query: rotq::QueryMode::Auto,
//! };
//! // The engine's memory (here a Vec; any &mut [u8] of the right length).
//! let (mut k_mem, mut v_mem) = (vec![0u8; spec.k_bytes()?], vec![0u8; spec.v_bytes()?]);
//! let mut pool = KvPool::over(spec, &mut k_mem[..], &mut v_mem[..])?;
//! // Two sequences: 3 tokens in page 5 and 1 token in page 2; one call writes all four.
//! let rows = |n: usize| (0..n * 2 * 64).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>();
//! let slots = [5 * 16, 5 * 16 + 1, 5 * 16 + 2, 2 * 16];
//! pool.append(&rows(4), &rows(4), &slots, &[0, 1, 2, 0])?;
//! // Attention of one decode row each (4 query heads: GQA 2), planned once, run per layer.
//! let tables = PageTables::Block { table: &[5, 2], max_blocks: 1, seq_lens: &[3, 1] };
//! let batch = Batch::new(&[0, 1, 2], tables, 4);
//! let plan = pool.plan(&batch)?;
//! let mut workspace = vec![0f32; plan.workspace_len()];
//! let mut out = vec![0f32; plan.out_len()];
//! let q = rows(2 * 2); // 2 rows of 4 heads of 64
//! pool.run(&plan, &batch, &q, &mut workspace, &mut out, None)?;
//! # Ok::<(), rotq::Error>(())
//! ```

mod batch;
mod tables;

pub use batch::{AttentionPlan, Batch, Mask};
pub use tables::{PageTables, SeqPages};

use crate::reference::rope::Rope;
use crate::reference::{Error as InputError, KvFormat, RotationPlan};
use crate::Error;
use rotq_cpu::{CacheCodec, CpuAttention, Isa, QueryMode};

/// What a pool holds and how much (one layer's K and V pages).
///
/// ```
/// use rotq::pool::PoolSpec;
/// use rotq::{KvFormat, RotationPlan};
/// let spec = PoolSpec { k_format: KvFormat::Q8_0, v_format: KvFormat::Q4_0,
///     plan: RotationPlan::none(), n_kv_heads: 8, head_dim: 128, v_dim: 128,
///     n_pages: 1024, page_tokens: 16, query: rotq::QueryMode::Auto };
/// // q8_0: 34 bytes per 32 values; q4_0: 18.
/// assert_eq!(spec.k_bytes()?, 1024 * 16 * 8 * 4 * 34);
/// assert_eq!(spec.v_bytes()?, 1024 * 16 * 8 * 4 * 18);
/// # Ok::<(), rotq::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct PoolSpec {
    /// Format of the K rows.
    pub k_format: KvFormat,
    /// Format of the V rows.
    pub v_format: KvFormat,
    /// Rotations: `qk` of Q and K, `v` of V (undone on the output by the attention).
    pub plan: RotationPlan,
    /// KV heads per token.
    pub n_kv_heads: usize,
    /// Values per K row.
    pub head_dim: usize,
    /// Values per V row.
    pub v_dim: usize,
    /// Pages in the pool.
    pub n_pages: usize,
    /// Tokens per page (at least 1).
    pub page_tokens: usize,
    /// The arithmetic of the attention's `K·Q` ([`QueryMode::Auto`]: q8_0 queries over
    /// rotated q4_0 and q8_0 K caches, where they add under 10⁻⁴ of attention KLD; exact f32
    /// queries elsewhere). [`QueryMode::Exact`] gives what the oracle computes on the cache.
    pub query: QueryMode,
}

impl PoolSpec {
    /// The same pool's geometry for the device side of the batch API ([`crate::cuda::batch`]):
    /// a pool of this spec in device memory holds the same bytes, and a
    /// [`crate::cuda::CudaAttention`] of [`Self::plan`] runs steps over it.
    ///
    /// ```
    /// use rotq::pool::PoolSpec;
    /// use rotq::{KvFormat, RotationPlan};
    /// let spec = PoolSpec { k_format: KvFormat::Q4_0, v_format: KvFormat::Q8_0,
    ///     plan: RotationPlan::none(), n_kv_heads: 8, head_dim: 128, v_dim: 128,
    ///     n_pages: 1024, page_tokens: 16, query: rotq::QueryMode::Auto };
    /// assert_eq!(spec.cuda_geometry().k_bytes()?, spec.k_bytes()?);
    /// # Ok::<(), rotq::Error>(())
    /// ```
    #[cfg(feature = "cuda")]
    pub fn cuda_geometry(&self) -> crate::cuda::batch::PoolGeometry {
        crate::cuda::batch::PoolGeometry {
            k_format: self.k_format,
            v_format: self.v_format,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            v_dim: self.v_dim,
            n_pages: self.n_pages,
            page_tokens: self.page_tokens,
        }
    }

    /// Token slots in the pool (`n_pages · page_tokens`).
    pub fn slots(&self) -> Result<usize, Error> {
        self.n_pages
            .checked_mul(self.page_tokens)
            .ok_or_else(|| InputError::Overflow("pool slots").into())
    }

    /// Bytes of the K pool.
    pub fn k_bytes(&self) -> Result<usize, Error> {
        self.bytes(self.k_format, self.head_dim)
    }

    /// Bytes of the V pool.
    pub fn v_bytes(&self) -> Result<usize, Error> {
        self.bytes(self.v_format, self.v_dim)
    }

    fn bytes(&self, format: KvFormat, dim: usize) -> Result<usize, Error> {
        let row = format.row_bytes(dim)?;
        self.slots()?
            .checked_mul(self.n_kv_heads)
            .and_then(|r| r.checked_mul(row))
            .ok_or_else(|| InputError::Overflow("pool bytes").into())
    }

    /// Checks what the kernels need: positive sizes, rows the formats can hold, a plan that
    /// fits the dimensions.
    fn check(&self) -> Result<(), Error> {
        for (name, value) in [
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("v_dim", self.v_dim),
            ("page_tokens", self.page_tokens),
        ] {
            if value == 0 {
                return Err(InputError::InvalidParameter {
                    name,
                    reason: "must be at least 1".into(),
                }
                .into());
            }
        }
        self.plan.check_dims(self.head_dim, self.v_dim)?;
        if self.query == QueryMode::Q8_0 && !self.head_dim.is_multiple_of(32) {
            return Err(InputError::InvalidParameter {
                name: "query",
                reason: format!(
                    "q8_0 queries need a head dimension that is a multiple of 32, not {}",
                    self.head_dim
                ),
            }
            .into());
        }
        self.k_bytes()?;
        self.v_bytes()?;
        Ok(())
    }
}

/// One layer's K and V pages over buffers `B`: the engine's memory (`&mut [u8]`) through
/// [`KvPool::over`], or rotq's (`Vec<u8>`) through [`KvPool::new`]. See the module docs.
///
/// **Threads.** `&KvPool` is shared freely (`plan`, `run` read it); `append` and `shift`
/// take `&mut self`.
#[derive(Debug)]
pub struct KvPool<B = Vec<u8>> {
    spec: PoolSpec,
    k: B,
    v: B,
    k_codec: CacheCodec,
    v_codec: CacheCodec,
    attention: CpuAttention,
    /// Each slot's position (`u64::MAX`: never written), recorded by `append`.
    positions: Vec<u64>,
    /// `append`'s rows, quantized before they go to their slots (kept between calls, at most
    /// [`STAGING_BYTES`]).
    staging: Vec<u8>,
}

impl KvPool<Vec<u8>> {
    /// A pool in memory rotq allocates (zeroed); memory that cannot be had is an error.
    ///
    /// ```
    /// use rotq::pool::{KvPool, PoolSpec};
    /// use rotq::{KvFormat, RotationPlan};
    /// let spec = PoolSpec { k_format: KvFormat::Q8_0, v_format: KvFormat::Q8_0,
    ///     plan: RotationPlan::none(), n_kv_heads: 1, head_dim: 32, v_dim: 32,
    ///     n_pages: 4, page_tokens: 8, query: rotq::QueryMode::Auto };
    /// let pool = KvPool::new(spec)?;
    /// assert_eq!(pool.k().len(), 4 * 8 * 34);
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn new(spec: PoolSpec) -> Result<Self, Error> {
        spec.check()?;
        let alloc = |bytes: usize| -> Result<Vec<u8>, Error> {
            let mut buf = Vec::new();
            buf.try_reserve_exact(bytes)
                .map_err(|e| InputError::InvalidParameter {
                    name: "n_pages",
                    reason: format!("{bytes} bytes of pool cannot be allocated: {e}"),
                })?;
            buf.resize(bytes, 0);
            Ok(buf)
        };
        let (k, v) = (alloc(spec.k_bytes()?)?, alloc(spec.v_bytes()?)?);
        Self::over(spec, k, v)
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> KvPool<B> {
    /// A pool over the engine's buffers, of exactly [`PoolSpec::k_bytes`] and
    /// [`PoolSpec::v_bytes`] bytes (else an error). Their bytes are taken as they are: a pool
    /// given back by [`Self::into_parts`] and wrapped again reads the same tokens.
    ///
    /// ```
    /// use rotq::pool::{KvPool, PoolSpec};
    /// use rotq::{KvFormat, RotationPlan};
    /// let spec = PoolSpec { k_format: KvFormat::F16, v_format: KvFormat::F16,
    ///     plan: RotationPlan::none(), n_kv_heads: 1, head_dim: 32, v_dim: 32,
    ///     n_pages: 2, page_tokens: 4, query: rotq::QueryMode::Auto };
    /// let (mut k, mut v) = (vec![0u8; 2 * 4 * 64], vec![0u8; 2 * 4 * 64]);
    /// assert!(KvPool::over(spec.clone(), &mut k[..], &mut v[..]).is_ok());
    /// assert!(KvPool::over(spec, &mut k[1..], &mut v[..]).is_err());
    /// ```
    pub fn over(spec: PoolSpec, k: B, v: B) -> Result<Self, Error> {
        spec.check()?;
        check_buffers(&spec, k.as_ref(), v.as_ref())?;
        let isa = Isa::best();
        let k_codec = CacheCodec::new(spec.k_format, spec.head_dim, spec.plan.qk.as_ref(), isa)?;
        let v_codec = CacheCodec::new(spec.v_format, spec.v_dim, spec.plan.v.as_ref(), isa)?;
        let mut positions = Vec::new();
        positions
            .try_reserve_exact(spec.slots()?)
            .map_err(|_| InputError::Overflow("pool slots"))?;
        positions.resize(spec.slots()?, u64::MAX);
        Ok(Self {
            attention: CpuAttention::new(&spec.plan, isa).with_query_mode(spec.query),
            spec,
            k,
            v,
            k_codec,
            v_codec,
            positions,
            staging: Vec::new(),
        })
    }

    /// What the pool holds.
    pub fn spec(&self) -> &PoolSpec {
        &self.spec
    }

    /// The K pool's bytes.
    pub fn k(&self) -> &[u8] {
        self.k.as_ref()
    }

    /// The V pool's bytes.
    pub fn v(&self) -> &[u8] {
        self.v.as_ref()
    }

    /// The buffers back.
    pub fn into_parts(self) -> (B, B) {
        (self.k, self.v)
    }

    /// The position `append` recorded for each slot (`None`: never written).
    ///
    /// ```
    /// # use rotq::pool::{KvPool, PoolSpec};
    /// # use rotq::{KvFormat, RotationPlan};
    /// # let spec = PoolSpec { k_format: KvFormat::F16, v_format: KvFormat::F16,
    /// #     plan: RotationPlan::none(), n_kv_heads: 1, head_dim: 32, v_dim: 32,
    /// #     n_pages: 2, page_tokens: 4, query: rotq::QueryMode::Auto };
    /// let mut pool = KvPool::new(spec)?;
    /// pool.append(&[0.5; 32], &[0.5; 32], &[6], &[41])?;
    /// assert_eq!(pool.position(6), Some(41));
    /// assert_eq!(pool.position(5), None);
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn position(&self, slot: usize) -> Option<u64> {
        self.positions.get(slot).copied().filter(|&p| p != u64::MAX)
    }

    /// Rotates and quantizes the keys `k` (`[n, n_kv_heads, head_dim]`) and values `v`
    /// (`[n, n_kv_heads, v_dim]`) of `n` tokens into their slots, `slots[i]` for token `i`
    /// (`page · page_tokens + offset`; `-1` skips the token, as vLLM pads), recording
    /// `positions[i]`. The tokens may belong to any sequences. Shapes that disagree, a slot
    /// outside the pool or named twice are errors found before any byte is written.
    ///
    /// ```
    /// # use rotq::pool::{KvPool, PoolSpec};
    /// # use rotq::{KvFormat, RotationPlan};
    /// # let spec = PoolSpec { k_format: KvFormat::Q8_0, v_format: KvFormat::Q8_0,
    /// #     plan: RotationPlan::none(), n_kv_heads: 1, head_dim: 32, v_dim: 32,
    /// #     n_pages: 2, page_tokens: 4, query: rotq::QueryMode::Auto };
    /// let mut pool = KvPool::new(spec)?;
    /// let rows = vec![0.25f32; 3 * 32];
    /// pool.append(&rows, &rows, &[7, -1, 0], &[3, 0, 0])?; // the middle token is padding
    /// assert!(pool.append(&rows, &rows, &[1, 2, 8], &[0, 1, 2]).is_err()); // slot 8 is outside
    /// assert!(pool.append(&rows, &rows, &[1, 1, 2], &[0, 1, 2]).is_err()); // slot 1 twice
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn append(
        &mut self,
        k: &[f32],
        v: &[f32],
        slots: &[i64],
        positions: &[u64],
    ) -> Result<(), Error> {
        let n = slots.len();
        let h = self.spec.n_kv_heads;
        let (kt, vt) = (h * self.spec.head_dim, h * self.spec.v_dim);
        for (what, len, per) in [
            ("keys [n, n_kv_heads, head_dim]", k.len(), kt),
            ("values [n, n_kv_heads, v_dim]", v.len(), vt),
            ("positions (one per slot)", positions.len(), 1),
        ] {
            let expected = n.checked_mul(per).ok_or(InputError::Overflow("rows"))?;
            if len != expected {
                return Err(InputError::LengthMismatch {
                    what,
                    expected,
                    actual: len,
                }
                .into());
            }
        }
        let slots_in_pool = self.positions.len();
        for (i, &s) in slots.iter().enumerate() {
            if s < -1 || s >= slots_in_pool as i64 {
                return Err(InputError::InvalidParameter {
                    name: "slot_mapping",
                    reason: format!(
                        "token {i}'s slot {s} is outside the pool's {slots_in_pool} slots (-1 skips a token)"
                    ),
                }
                .into());
            }
        }
        check_distinct(slots, "slot_mapping")?;
        // The step's rows go through the codec in few calls (rotated and quantized in
        // parallel tasks of whole rows), into a staging buffer of at most STAGING_BYTES kept
        // between calls; then each token's bytes go to its slot. A decode step's tokens lie in
        // as many pages: per-token codec calls would cost more in dispatch than in arithmetic.
        let (kb, vb) = self.token_bytes();
        let per_call = (STAGING_BYTES / (kb + vb).max(1)).max(1);
        let staged = n.min(per_call) * (kb + vb);
        if self.staging.len() < staged {
            self.staging
                .try_reserve_exact(staged - self.staging.len())
                .map_err(|_| InputError::Overflow("staging bytes"))?;
            self.staging.resize(staged, 0);
        }
        for first in (0..n).step_by(per_call) {
            let tokens = first..(first + per_call).min(n);
            let (ks, vs) = self.staging.split_at_mut(tokens.len() * kb);
            let vs = &mut vs[..tokens.len() * vb];
            self.k_codec
                .quantize(&k[tokens.start * kt..tokens.end * kt], ks, 0)?;
            self.v_codec
                .quantize(&v[tokens.start * vt..tokens.end * vt], vs, 0)?;
            let (kp, vp) = (self.k.as_mut(), self.v.as_mut());
            for (i, t) in tokens.enumerate() {
                if let Ok(s) = usize::try_from(slots[t]) {
                    kp[s * kb..(s + 1) * kb].copy_from_slice(&ks[i * kb..(i + 1) * kb]);
                    vp[s * vb..(s + 1) * vb].copy_from_slice(&vs[i * vb..(i + 1) * vb]);
                    self.positions[s] = positions[t];
                }
            }
        }
        Ok(())
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> KvPool<B> {
    /// The context shift of the keys in `slots` (`-1` skips): each K row is turned by the
    /// RoPE angle of `delta` positions inside its rotation and quantized again, and its
    /// recorded position moves by `delta`, as llama.cpp's `llama_kv_cache_seq_add` does to
    /// its cells. A slot outside the pool or never written, a slot named twice, a position
    /// that would leave `0..u64::MAX`, or a RoPE that does not fit the heads is an error
    /// before any row changes.
    ///
    /// ```
    /// # use rotq::pool::{KvPool, PoolSpec};
    /// # use rotq::{KvFormat, RotationPlan};
    /// use rotq::reference::rope::{Rope, RopeVariant};
    /// # let spec = PoolSpec { k_format: KvFormat::Q8_0, v_format: KvFormat::Q8_0,
    /// #     plan: RotationPlan::none(), n_kv_heads: 1, head_dim: 32, v_dim: 32,
    /// #     n_pages: 2, page_tokens: 4, query: rotq::QueryMode::Auto };
    /// let mut pool = KvPool::new(spec)?;
    /// pool.append(&[0.5; 2 * 32], &[0.5; 2 * 32], &[2, 3], &[10, 11])?;
    /// let rope = Rope::new(RopeVariant::Normal, 32);
    /// pool.shift(&[2, 3], -4, &rope)?;
    /// assert_eq!((pool.position(2), pool.position(3)), (Some(6), Some(7)));
    /// assert!(pool.shift(&[2], -7, &rope).is_err()); // position -1
    /// assert!(pool.shift(&[5], 1, &rope).is_err()); // never written
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn shift(&mut self, slots: &[i64], delta: i64, rope: &Rope) -> Result<(), Error> {
        rope.check(self.spec.head_dim)?;
        check_distinct(slots, "slots")?;
        let mut moved = Vec::with_capacity(slots.len());
        for (i, &s) in slots.iter().enumerate() {
            if s < 0 {
                continue;
            }
            let p = self
                .position(s as usize)
                .ok_or_else(|| InputError::InvalidParameter {
                    name: "slots",
                    reason: format!("entry {i}: slot {s} is outside the pool or was never written"),
                })?;
            let to = p
                .checked_add_signed(delta)
                .filter(|&t| t != u64::MAX)
                .ok_or_else(|| InputError::InvalidParameter {
                    name: "delta",
                    reason: format!(
                        "slot {s} at position {p} would move to {}",
                        i128::from(p) + i128::from(delta)
                    ),
                })?;
            moved.push((s as usize, to));
        }
        for &(s, to) in &moved {
            self.shift_run(s, 1, delta, rope)?;
            self.positions[s] = to;
        }
        Ok(())
    }

    /// Copies whole slots, `to[i] ← from[i]` (K and V bytes and the recorded position), as
    /// an engine moves tokens when it compacts or forks a sequence (vLLM's `copy_blocks`,
    /// token by token). `-1` in `from` skips the pair. Sources are read before any target is
    /// written, so the two lists may overlap. A slot outside the pool, a target named twice,
    /// or lists of other lengths are errors before anything moves.
    ///
    /// ```
    /// # use rotq::pool::{KvPool, PoolSpec};
    /// # use rotq::{KvFormat, RotationPlan};
    /// # let spec = PoolSpec { k_format: KvFormat::Q8_0, v_format: KvFormat::Q8_0,
    /// #     plan: RotationPlan::none(), n_kv_heads: 1, head_dim: 32, v_dim: 32,
    /// #     n_pages: 2, page_tokens: 4, query: rotq::QueryMode::Auto };
    /// let mut pool = KvPool::new(spec)?;
    /// pool.append(&[0.5; 32], &[0.5; 32], &[6], &[3])?;
    /// pool.copy_slots(&[6], &[1])?;
    /// assert_eq!(pool.position(1), Some(3));
    /// assert_eq!(pool.k()[34..68], pool.k()[6 * 34..7 * 34]);
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn copy_slots(&mut self, from: &[i64], to: &[i64]) -> Result<(), Error> {
        if from.len() != to.len() {
            return Err(InputError::LengthMismatch {
                what: "target slots (one per source)",
                expected: from.len(),
                actual: to.len(),
            }
            .into());
        }
        let n = self.positions.len() as i64;
        let pairs: Vec<(usize, usize)> = from
            .iter()
            .zip(to)
            .filter(|(&f, _)| f != -1)
            .map(|(&f, &t)| {
                if (0..n).contains(&f) && (0..n).contains(&t) {
                    Ok((f as usize, t as usize))
                } else {
                    Err(Error::from(InputError::InvalidParameter {
                        name: "slots",
                        reason: format!("{f} -> {t}: a slot outside the pool's {n} slots"),
                    }))
                }
            })
            .collect::<Result<_, _>>()?;
        let targets: Vec<i64> = pairs.iter().map(|&(_, t)| t as i64).collect();
        check_distinct(&targets, "target slots")?;
        let (kb, vb) = self.token_bytes();
        for (buf, tb) in [(self.k.as_mut(), kb), (self.v.as_mut(), vb)] {
            let saved: Vec<u8> = pairs
                .iter()
                .flat_map(|&(f, _)| buf[f * tb..(f + 1) * tb].iter().copied())
                .collect();
            for (i, &(_, t)) in pairs.iter().enumerate() {
                buf[t * tb..(t + 1) * tb].copy_from_slice(&saved[i * tb..(i + 1) * tb]);
            }
        }
        let saved: Vec<u64> = pairs.iter().map(|&(f, _)| self.positions[f]).collect();
        for (&(_, t), p) in pairs.iter().zip(saved) {
            self.positions[t] = p;
        }
        Ok(())
    }
}

/// Runs of consecutive slots: what [`crate::cache::RotatedKvCache`] uses of a pool on the CPU
/// (the cache checks its calls and keeps its own positions), so the one-sequence cache and the
/// batch API share the bytes, the codecs and the kernels; `shift` uses them too.
impl<B: AsRef<[u8]> + AsMut<[u8]>> KvPool<B> {
    /// Bytes of one token's K rows and of its V rows (a slot's share of each pool).
    pub(crate) fn token_bytes(&self) -> (usize, usize) {
        let h = self.spec.n_kv_heads;
        (h * self.k_codec.row_bytes(), h * self.v_codec.row_bytes())
    }

    /// Rotates and quantizes whole tokens into the slots from `slot` on (in the pool).
    pub(crate) fn write_run(&mut self, slot: usize, k: &[f32], v: &[f32]) -> Result<(), Error> {
        let row = slot * self.spec.n_kv_heads;
        self.k_codec.quantize(k, self.k.as_mut(), row)?;
        self.v_codec.quantize(v, self.v.as_mut(), row)?;
        Ok(())
    }

    /// The RoPE shift of the keys of `len` slots from `slot` (in the pool).
    pub(crate) fn shift_run(
        &mut self,
        slot: usize,
        len: usize,
        delta: i64,
        rope: &Rope,
    ) -> Result<(), Error> {
        let (kb, _) = self.token_bytes();
        self.k_codec.shift(
            &mut self.k.as_mut()[slot * kb..(slot + len) * kb],
            rope,
            delta,
        )?;
        Ok(())
    }

    /// Copies `len` slots' bytes from slot `from` to slot `to` (a copy from the front is
    /// right when the spans overlap).
    pub(crate) fn move_run(&mut self, from: usize, to: usize, len: usize) {
        let (kb, vb) = self.token_bytes();
        for (buf, tb) in [(self.k.as_mut(), kb), (self.v.as_mut(), vb)] {
            buf.copy_within(from * tb..(from + len) * tb, to * tb);
        }
    }

    /// The attention kernels of the pool's plan.
    pub(crate) fn kernels(&self) -> &CpuAttention {
        &self.attention
    }
}

/// The most bytes `append` stages at once: a long prefill goes to the codec in several calls,
/// so the pool's own memory stays bounded whatever an engine's step holds.
const STAGING_BYTES: usize = 4 << 20;

/// A slot named twice by one list (`name`: which) is an error (a token would be lost); `-1`
/// repeats.
fn check_distinct(slots: &[i64], name: &'static str) -> Result<(), Error> {
    let mut named: Vec<i64> = slots.iter().copied().filter(|&s| s >= 0).collect();
    match first_repeat(&mut named) {
        Some(s) => Err(InputError::InvalidParameter {
            name,
            reason: format!("slot {s} is named twice"),
        }
        .into()),
        None => Ok(()),
    }
}

/// The smallest value `values` holds more than once, if any (`values` ends sorted): n log n in
/// the values given, with no memory proportional to the pool.
pub(crate) fn first_repeat<T: Ord + Copy>(values: &mut [T]) -> Option<T> {
    values.sort_unstable();
    values.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

/// Refuses pool buffers of other lengths than `spec`'s.
fn check_buffers(spec: &PoolSpec, k: &[u8], v: &[u8]) -> Result<(), Error> {
    for (what, actual, expected) in [
        ("K pool bytes", k.len(), spec.k_bytes()?),
        ("V pool bytes", v.len(), spec.v_bytes()?),
    ] {
        if actual != expected {
            return Err(InputError::LengthMismatch {
                what,
                expected,
                actual,
            }
            .into());
        }
    }
    Ok(())
}

/// Lending: one pool's spec, codecs, kernels and positions over other buffers. An engine that
/// keeps every layer's pages in its own memory, with one spec for all layers (or a caller that
/// lends its memory one call at a time, as the C ABI's `rotq_pool_*` calls do), builds a pool
/// once and moves it from buffer to buffer, instead of building the codecs (and the positions,
/// 8 bytes a slot) again with [`KvPool::over`] for each.
impl<B: AsRef<[u8]> + AsMut<[u8]>> KvPool<B> {
    /// Puts `k` and `v` in place of the pool's buffers and gives those back. Nothing is rebuilt
    /// or copied: the spec, the codecs, the kernels and the recorded positions stay (positions
    /// describe slots, which an engine assigns alike in every layer). The new buffers must be
    /// exactly [`PoolSpec::k_bytes`] and [`PoolSpec::v_bytes`] long, else an error and the pool
    /// is unchanged; their bytes are taken as they are.
    ///
    /// ```
    /// use rotq::pool::{KvPool, PoolSpec};
    /// use rotq::{KvFormat, RotationPlan};
    /// let spec = PoolSpec { k_format: KvFormat::F16, v_format: KvFormat::F16,
    ///     plan: RotationPlan::none(), n_kv_heads: 1, head_dim: 32, v_dim: 32,
    ///     n_pages: 2, page_tokens: 4, query: rotq::QueryMode::Auto };
    /// let (kb, vb) = (spec.k_bytes()?, spec.v_bytes()?);
    /// // Two layers' memory, the engine's.
    /// let (mut k0, mut v0) = (vec![0u8; kb], vec![0u8; vb]);
    /// let (mut k1, mut v1) = (vec![0u8; kb], vec![0u8; vb]);
    /// let mut pool = KvPool::over(spec, &mut k0[..], &mut v0[..])?;
    /// pool.append(&[0.5; 32], &[0.5; 32], &[3], &[0])?; // layer 0's token
    /// let (k0, _v0) = pool.rebind(&mut k1[..], &mut v1[..])?; // now layer 1's pages
    /// pool.append(&[0.25; 32], &[0.25; 32], &[3], &[0])?; // layer 1's token, same slot
    /// assert_eq!(pool.position(3), Some(0));
    /// assert_ne!(k0[3 * 64..4 * 64], pool.k()[3 * 64..4 * 64]);
    /// let mut short = vec![0u8; kb - 1];
    /// let mut other_v = vec![0u8; vb];
    /// assert!(pool.rebind(&mut short[..], &mut other_v[..]).is_err()); // still layer 1's
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn rebind(&mut self, k: B, v: B) -> Result<(B, B), Error> {
        check_buffers(&self.spec, k.as_ref(), v.as_ref())?;
        Ok((
            std::mem::replace(&mut self.k, k),
            std::mem::replace(&mut self.v, v),
        ))
    }
}
