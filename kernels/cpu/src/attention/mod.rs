//! Flash attention over rotated, quantized K/V caches (prefill and decode).
//!
//! The semantics are the oracle's (`rotq_reference::attention`): GQA, causal with a position
//! offset, sliding window, soft-cap, the same NaN/Inf rules. The work is split into tasks of
//! (KV head, block of query rows, slice of the cache): a task dequantizes each K row of its
//! slice once, into a buffer in L1, and scores it against every query head of the group and
//! every query row of its block (GQA shares each load); it keeps an online softmax (running
//! max `m`, sum `l`, unnormalized output) per query row, tile by tile of
//! [`AttentionConfig::block_n`] tokens, and dequantizes each V row once for the whole group.
//! Slices of one query block are merged afterwards (flash-decoding); the output is then
//! divided by `l` and, when V was rotated, rotated back by `R_vᵀ` row by row.
//!
//! A cache is a [`KvCacheView`]: contiguous, or paged (a pool of pages and a block table, the
//! CUDA kernels' paged layout), read in place either way; a paged row costs one table lookup.
//!
//! Decode (one query row per task) with groups of four query heads skips the L1 tile for
//! q4_0, q8_0 and f16 rows on AVX2: each 16-value chunk is dequantized in registers and used
//! at once by the four heads, for the scores and for the weighted sum of V. With a single query
//! row, the tile's stores and reloads cost as much as the arithmetic.
//!
//! Q is rotated by `R` and multiplied by the score scale before the loop. Arithmetic is f32,
//! so the scale and soft-cap must be normal f32 numbers (else `InvalidParameter`), and a weight
//! that underflows f32 (a score more than about 87 below the row's maximum) is 0: a NaN or
//! ±Inf in V at such a key gives NaN where the oracle's f64 may still give ±Inf. With
//! `kv_splits = 0` the number of slices follows the thread count, so the last bits of a result
//! can differ between machines; a fixed `kv_splits` makes them reproducible.

use crate::fwht::CpuRotation;
use crate::isa::Isa;
use crate::quant::dequantize_row;
use rayon::prelude::*;
use rotq_reference::{AttentionParams, Error, KvFormat, Result, RotationPlan};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// The largest head dimension a cache view accepts (a bound on every per-task buffer).
pub const MAX_HEAD_DIM: usize = 1 << 16;

/// One layer's K or V cache of one sequence: row `(token, head)` of `dim` values in `format`
/// at byte `(slot · n_heads + head) · row_bytes`, where a contiguous view ([`Self::new`]) puts
/// token `t` at slot `t` and a paged view ([`Self::paged`]) at slot
/// `table[t / page_tokens] · page_tokens + t % page_tokens` of a pool of pages.
///
/// ```
/// use rotq_cpu::KvCacheView;
/// use rotq_reference::KvFormat;
/// let bytes = vec![0u8; 10 * 2 * 72]; // 10 tokens, 2 heads, 128 values of q4_0 (72 bytes)
/// let k = KvCacheView::new(KvFormat::Q4_0, &bytes, 10, 2, 128).unwrap();
/// assert_eq!(k.n_tokens(), 10);
/// assert!(KvCacheView::new(KvFormat::Q4_0, &bytes[1..], 10, 2, 128).is_err());
/// ```
#[derive(Clone, Copy, Debug)]
pub struct KvCacheView<'a> {
    format: KvFormat,
    bytes: &'a [u8],
    n_tokens: usize,
    n_heads: usize,
    dim: usize,
    row_bytes: usize,
    /// `Some((table, page_tokens))` for a paged view, its table checked to cover `n_tokens`
    /// with pages inside `bytes`.
    pages: Option<(&'a [u32], usize)>,
}

impl<'a> KvCacheView<'a> {
    /// Checks that `bytes` holds exactly `n_tokens × n_heads` rows of `dim` values.
    pub fn new(
        format: KvFormat,
        bytes: &'a [u8],
        n_tokens: usize,
        n_heads: usize,
        dim: usize,
    ) -> Result<Self> {
        let row_bytes = Self::row_bytes_of(format, dim)?;
        let expected = n_tokens
            .checked_mul(n_heads)
            .and_then(|r| r.checked_mul(row_bytes))
            .ok_or(Error::Overflow("cache size"))?;
        if bytes.len() != expected {
            return Err(Error::LengthMismatch {
                what: "KV cache bytes",
                expected,
                actual: bytes.len(),
            });
        }
        Ok(Self {
            format,
            bytes,
            n_tokens,
            n_heads,
            dim,
            row_bytes,
            pages: None,
        })
    }

    /// A sequence of `n_tokens` tokens in a pool of pages: `pool` holds pages of
    /// `page_tokens × n_heads` rows (page `p` from byte `p · page_tokens · n_heads ·
    /// row_bytes`), and the sequence's token `t` is in page `table[t / page_tokens]`, slot
    /// `t % page_tokens` (the layout of `rotq_cuda::CacheLayout::Paged`). A zero
    /// `page_tokens`, a table shorter than the tokens' pages, or a page outside the pool is an
    /// error. The kernels read the pages in place: each row costs one table lookup more than
    /// in a contiguous view.
    ///
    /// ```
    /// use rotq_cpu::KvCacheView;
    /// use rotq_reference::KvFormat;
    /// // 3 pages of 4 tokens x 2 heads of 32 q8_0 values (34 bytes); 6 tokens in pages 2, 0.
    /// let pool = vec![0u8; 3 * 4 * 2 * 34];
    /// let k = KvCacheView::paged(KvFormat::Q8_0, &pool, &[2, 0], 4, 6, 2, 32).unwrap();
    /// assert_eq!(k.n_tokens(), 6);
    /// assert!(KvCacheView::paged(KvFormat::Q8_0, &pool, &[2, 3], 4, 6, 2, 32).is_err());
    /// assert!(KvCacheView::paged(KvFormat::Q8_0, &pool, &[2], 4, 6, 2, 32).is_err());
    /// assert!(KvCacheView::paged(KvFormat::Q8_0, &pool, &[2, 0], 0, 6, 2, 32).is_err());
    /// ```
    pub fn paged(
        format: KvFormat,
        pool: &'a [u8],
        table: &'a [u32],
        page_tokens: usize,
        n_tokens: usize,
        n_heads: usize,
        dim: usize,
    ) -> Result<Self> {
        let row_bytes = Self::row_bytes_of(format, dim)?;
        if page_tokens == 0 {
            return Err(Error::InvalidParameter {
                name: "page_tokens",
                reason: "a page holds at least one token".into(),
            });
        }
        let page_bytes = page_tokens
            .checked_mul(n_heads)
            .and_then(|r| r.checked_mul(row_bytes))
            .ok_or(Error::Overflow("page size"))?;
        let used = n_tokens.div_ceil(page_tokens);
        let Some(table) = table.get(..used) else {
            return Err(Error::LengthMismatch {
                what: "block table entries (at least) for the tokens",
                expected: used,
                actual: table.len(),
            });
        };
        // Pages of no bytes (no heads) all fit.
        let n_pages = pool.len().checked_div(page_bytes).unwrap_or(usize::MAX);
        if let Some(bad) = table.iter().find(|&&p| p as usize >= n_pages) {
            return Err(Error::InvalidParameter {
                name: "block table",
                reason: format!("page {bad} is outside the pool's {n_pages} pages"),
            });
        }
        Ok(Self {
            format,
            bytes: pool,
            n_tokens,
            n_heads,
            dim,
            row_bytes,
            pages: Some((table, page_tokens)),
        })
    }

    fn row_bytes_of(format: KvFormat, dim: usize) -> Result<usize> {
        if dim > MAX_HEAD_DIM {
            return Err(Error::UnsupportedDim {
                n: dim,
                what: "KV cache head",
                hint: "head dimensions up to 65536 are supported",
            });
        }
        format.row_bytes(dim)
    }

    /// Cached tokens.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Byte offset of row `(token, head)`, for `token < n_tokens` (a paged view's table
    /// covers those tokens).
    #[inline(always)]
    fn offset(&self, token: usize, head: usize) -> usize {
        let slot = match self.pages {
            None => token,
            Some((table, page_tokens)) => {
                table[token / page_tokens] as usize * page_tokens + token % page_tokens
            }
        };
        (slot * self.n_heads + head) * self.row_bytes
    }

    /// Tokens from `token` on that lie one after the other (a stride of `n_heads` rows): the
    /// rest of its page (unbounded in a contiguous view).
    #[cfg(target_arch = "x86_64")]
    fn run_from(&self, token: usize) -> usize {
        self.pages.map_or(usize::MAX, |(_, page_tokens)| {
            page_tokens - token % page_tokens
        })
    }

    fn row(&self, token: usize, head: usize) -> &'a [u8] {
        let at = self.offset(token, head);
        &self.bytes[at..at + self.row_bytes]
    }

    /// Start of row `(token, head)`; it is inside the view when `token < n_tokens` and
    /// `head < n_heads` (the SIMD loops check that once per slice, not once per row).
    #[cfg(target_arch = "x86_64")]
    fn row_ptr(&self, token: usize, head: usize) -> *const u8 {
        self.bytes.as_ptr().wrapping_add(self.offset(token, head))
    }

    /// Asks the CPU to start loading row `(token, head)` (if it exists) into cache.
    #[inline(always)]
    fn prefetch(&self, token: usize, head: usize) {
        if token < self.n_tokens {
            let row = self.row(token, head);
            for line in (0..row.len()).step_by(64) {
                prefetch(&row[line]);
            }
            // The row's last line, when the row straddles one more line than its length needs.
            if let Some(last) = row.last() {
                prefetch(last);
            }
        }
    }
}

/// How many tokens ahead the K/V rows of a head are prefetched: each task walks a head's rows
/// with a stride of `n_heads` rows, which hardware prefetchers follow poorly.
const PREFETCH_TOKENS: usize = 16;

/// Starts loading the cache line of `byte` (a hint; no effect on results).
#[inline(always)]
fn prefetch(byte: &u8) {
    // SAFETY: prefetching never faults and `byte` is a valid reference.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            (byte as *const u8).cast(),
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = byte;
}

/// Cache formats whose rows the decode loops dequantize in registers, without the L1 tile:
/// with one query row per task the tile's store and reload cost as much as the arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RegFormat {
    Q4_0,
    Q8_0,
    F16,
}

impl RegFormat {
    /// The register format for rows of `dim` values in `format`, if there is one.
    fn of(format: KvFormat, dim: usize) -> Option<Self> {
        if !dim.is_multiple_of(32) {
            return None;
        }
        match format {
            KvFormat::Q4_0 => Some(Self::Q4_0),
            KvFormat::Q8_0 => Some(Self::Q8_0),
            KvFormat::F16 => Some(Self::F16),
            _ => None,
        }
    }
}

/// Tuning knobs of the attention kernel.
///
/// ```
/// let c = rotq_cpu::AttentionConfig::default();
/// assert!(rotq_cpu::AttentionConfig::search_space().contains(&c));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AttentionConfig {
    /// Tokens per tile of the online softmax.
    pub block_n: usize,
    /// Query rows per task (each K/V row a task loads serves all of them).
    pub block_m: usize,
    /// Slices of the cache per query block; 0 picks enough to keep every thread busy.
    pub kv_splits: usize,
    /// KV heads per task; 0 means all of them for decode-sized query blocks (so a task
    /// streams the cache in address order) and one otherwise.
    pub heads_per_task: usize,
}

impl Default for AttentionConfig {
    fn default() -> Self {
        Self {
            block_n: 64,
            block_m: 16,
            kv_splits: 0,
            heads_per_task: 0,
        }
    }
}

impl AttentionConfig {
    /// Clamped so that a stray (deserialized) value cannot ask for absurd buffers or task
    /// counts.
    fn clamped(self) -> Self {
        Self {
            block_n: self.block_n.clamp(1, 4096),
            block_m: self.block_m.clamp(1, 4096),
            kv_splits: self.kv_splits.min(4096),
            heads_per_task: self.heads_per_task,
        }
    }

    /// Candidates for the autotuner.
    pub fn search_space() -> Vec<Self> {
        let mut v = Vec::new();
        for block_n in [16, 32, 64, 128, 256] {
            for block_m in [1, 4, 16, 64] {
                for kv_splits in [0, 1, 2, 4, 8, 16] {
                    for heads_per_task in [0, 1, 2, 8] {
                        v.push(Self {
                            block_n,
                            block_m,
                            kv_splits,
                            heads_per_task,
                        });
                    }
                }
            }
        }
        v
    }
}

/// Attention kernels for one rotation plan.
///
/// ```
/// use rotq_cpu::{CacheCodec, CpuAttention, Isa, KvCacheView};
/// use rotq_reference::{AttentionParams, KvFormat, Rotation, RotationPlan};
/// let (n_kv, h_kv, h_q, d) = (40, 2, 4, 64);
/// let plan = RotationPlan { qk: Some(Rotation::hadamard(d).unwrap()), v: None };
/// let wave = |n: usize, s: f32| (0..n).map(|i| (i as f32 * s).sin()).collect::<Vec<f32>>();
/// let k_codec = CacheCodec::new(KvFormat::Q8_0, d, plan.qk.as_ref(), Isa::best()).unwrap();
/// let v_codec = CacheCodec::new(KvFormat::Q8_0, d, None, Isa::best()).unwrap();
/// let mut k_cache = vec![0u8; n_kv * h_kv * k_codec.row_bytes()];
/// let mut v_cache = k_cache.clone();
/// k_codec.quantize(&wave(n_kv * h_kv * d, 0.37), &mut k_cache, 0).unwrap();
/// v_codec.quantize(&wave(n_kv * h_kv * d, 0.91), &mut v_cache, 0).unwrap();
/// let k = KvCacheView::new(KvFormat::Q8_0, &k_cache, n_kv, h_kv, d).unwrap();
/// let v = KvCacheView::new(KvFormat::Q8_0, &v_cache, n_kv, h_kv, d).unwrap();
/// let attn = CpuAttention::new(&plan, Isa::best());
/// let params = AttentionParams { causal: true, pos_offset: n_kv - 1, ..Default::default() };
/// let out = attn.run(&wave(h_q * d, 0.5), 1, h_q, &k, &v, &params).unwrap();
/// assert_eq!(out.len(), h_q * d);
/// ```
#[derive(Clone, Debug)]
pub struct CpuAttention {
    plan: RotationPlan,
    qk: Option<CpuRotation>,
    v: Option<CpuRotation>,
    isa: Isa,
    config: AttentionConfig,
    /// Whether to look up the tuning cache (no explicit `with_config`).
    tuned: bool,
}

/// One attention problem: a sequence's queries against its caches.
struct Problem<'a> {
    /// Rotated, scaled queries `[n_q, h_q, d]`.
    q: Vec<f32>,
    n_q: usize,
    h_q: usize,
    k: KvCacheView<'a>,
    v: KvCacheView<'a>,
    params: &'a AttentionParams,
}

impl Problem<'_> {
    fn group(&self) -> usize {
        self.h_q / self.k.n_heads
    }

    /// Visible keys of query row `i`: a contiguous range.
    fn visible(&self, i: usize) -> Range<usize> {
        let n = self.k.n_tokens;
        let pos = self.params.pos_offset + i;
        let hi = if self.params.causal {
            n.min(pos.saturating_add(1))
        } else {
            n
        };
        let lo = match self.params.window {
            Some(w) => pos.saturating_add(1).saturating_sub(w).min(hi),
            None => 0,
        };
        lo..hi
    }
}

/// What one task leaves: per (query row, head of the group), the running max, the sum of
/// weights and the unnormalized output.
struct Partial {
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
    /// Visible keys were seen, all with a −Inf score.
    seen: Vec<bool>,
}

/// A unit of work: problem, KV heads, query rows, key slice.
#[derive(Clone, Debug)]
struct Task {
    problem: usize,
    heads: Range<usize>,
    rows: Range<usize>,
    keys: Range<usize>,
}

impl CpuAttention {
    /// Kernels for `plan`; `isa` falls back to the portable path if unavailable.
    pub fn new(plan: &RotationPlan, isa: Isa) -> Self {
        let isa = if isa.available() { isa } else { Isa::Portable };
        Self {
            plan: plan.clone(),
            qk: plan.qk.as_ref().map(|r| CpuRotation::new(r, isa)),
            v: plan.v.as_ref().map(|r| CpuRotation::new(r, isa)),
            isa,
            config: AttentionConfig::default(),
            tuned: true,
        }
    }

    /// The same kernels with another tuning.
    pub fn with_config(mut self, config: AttentionConfig) -> Self {
        self.config = config.clamped();
        self.tuned = false;
        self
    }

    /// The tuning for a decode problem: the tuning cache's entry for its shape and format
    /// unless [`Self::with_config`] set one, else the default.
    pub fn config_for(&self, h_q: usize, k: &KvCacheView<'_>) -> AttentionConfig {
        let tuned = || {
            let group = h_q / k.n_heads.max(1);
            let bucket = crate::tuned::decode_bucket(k.dim, k.n_heads, group, k.n_tokens);
            crate::tuned::lookup(
                &format!("decode_attention_{}", k.format),
                &bucket,
                &AttentionConfig::search_space(),
            )
        };
        match self.tuned.then(tuned).flatten() {
            Some(c) => c.clamped(),
            None => self.config,
        }
    }

    /// Attention of `n_q` query rows of `h_q` heads (`q` is `[n_q, h_q, d]`, unrotated)
    /// against one sequence's caches; returns `[n_q, h_q, d_v]`.
    pub fn run(
        &self,
        q: &[f32],
        n_q: usize,
        h_q: usize,
        k: &KvCacheView<'_>,
        v: &KvCacheView<'_>,
        params: &AttentionParams,
    ) -> Result<Vec<f32>> {
        let problem = self.prepare(q, n_q, h_q, k, v, params)?;
        let cfg = if n_q == 1 {
            self.config_for(h_q, k)
        } else {
            self.config
        };
        Ok(self
            .solve(&[problem], cfg)
            .pop()
            .expect("one problem, one output"))
    }

    /// Decode for many sequences at once: one query row each (`q` is `[h_q, d]`), every
    /// sequence with its own caches and parameters. Returns one `[h_q, d_v]` output each.
    pub fn decode_batch(&self, requests: &[DecodeRequest<'_>]) -> Result<Vec<Vec<f32>>> {
        let problems = requests
            .iter()
            .map(|r| self.prepare(r.q, 1, r.h_q, &r.k, &r.v, &r.params))
            .collect::<Result<Vec<_>>>()?;
        let cfg = match requests.first() {
            Some(r) => self.config_for(r.h_q, &r.k),
            None => self.config,
        };
        Ok(self.solve(&problems, cfg))
    }

    fn prepare<'a>(
        &self,
        q: &[f32],
        n_q: usize,
        h_q: usize,
        k: &KvCacheView<'a>,
        v: &KvCacheView<'a>,
        params: &'a AttentionParams,
    ) -> Result<Problem<'a>> {
        params.validate()?;
        let (d, d_v, h_kv) = (k.dim, v.dim, k.n_heads);
        let shape = |m: String| Err(Error::Shape(m));
        if h_kv == 0 || h_q == 0 || !h_q.is_multiple_of(h_kv) {
            return shape(format!(
                "h_q {h_q} must be a positive multiple of h_kv {h_kv}"
            ));
        }
        if (v.n_tokens, v.n_heads) != (k.n_tokens, h_kv) {
            return shape(format!(
                "V cache is {} tokens x {} heads but K is {} x {h_kv}",
                v.n_tokens, v.n_heads, k.n_tokens
            ));
        }
        params
            .pos_offset
            .checked_add(n_q)
            .ok_or(Error::Overflow("query positions"))?;
        n_q.checked_mul(h_q)
            .and_then(|x| x.checked_mul(d_v))
            .ok_or(Error::Overflow("output size"))?;
        let expected = n_q
            .checked_mul(h_q)
            .and_then(|x| x.checked_mul(d))
            .ok_or(Error::Overflow("query size"))?;
        if q.len() != expected {
            return Err(Error::LengthMismatch {
                what: "queries [n_q, h_q, d]",
                expected,
                actual: q.len(),
            });
        }
        self.plan.check_dims(d, d_v)?;
        let mut q = q.to_vec();
        if let Some(r) = &self.qk {
            r.forward_rows(&mut q)?;
        }
        let (scale, _) = params.f32_factors(d)?;
        q.iter_mut().for_each(|x| *x *= scale);
        Ok(Problem {
            q,
            n_q,
            h_q,
            k: *k,
            v: *v,
            params,
        })
    }

    /// Splits every problem into tasks, runs them in parallel, merges and finishes.
    fn solve(&self, problems: &[Problem<'_>], cfg: AttentionConfig) -> Vec<Vec<f32>> {
        let threads = rayon::current_num_threads().max(1);
        // Query blocks of one KV head each, over all problems (to size the splits).
        let blocks: usize = problems
            .iter()
            .map(|p| p.k.n_heads * p.n_q.div_ceil(cfg.block_m))
            .sum::<usize>()
            / problems.len().max(1);
        let mut tasks = Vec::new();
        for (pi, p) in problems.iter().enumerate() {
            let h_kv = p.k.n_heads;
            let per_task = match cfg.heads_per_task {
                0 if cfg.block_m.min(p.n_q) <= 4 => h_kv,
                0 => 1,
                h => h.min(h_kv),
            };
            for h0 in (0..h_kv).step_by(per_task) {
                let heads = h0..(h0 + per_task).min(h_kv);
                for r0 in (0..p.n_q).step_by(cfg.block_m) {
                    let rows = r0..(r0 + cfg.block_m).min(p.n_q);
                    let keys = p.visible(rows.start).start..p.visible(rows.end - 1).end;
                    let keys = keys.start.min(keys.end)..keys.end;
                    let splits = if cfg.kv_splits > 0 {
                        cfg.kv_splits
                    } else {
                        // Enough tasks for every thread, slices of at least 4 tiles.
                        let blocks = (blocks / per_task.max(1)).max(1);
                        (4 * threads)
                            .div_ceil(blocks.max(1))
                            .min(keys.len().div_ceil(4 * cfg.block_n))
                            .max(1)
                    };
                    let per = keys.len().div_ceil(splits).max(1);
                    let mut s = keys.start;
                    loop {
                        let e = (s + per).min(keys.end);
                        tasks.push(Task {
                            problem: pi,
                            heads: heads.clone(),
                            rows: rows.clone(),
                            keys: s..e,
                        });
                        s = e;
                        if s >= keys.end {
                            break;
                        }
                    }
                }
            }
        }
        let partials: Vec<Partial> = tasks
            .par_iter()
            .map(|t| self.partial(&problems[t.problem], t, cfg.block_n))
            .collect();
        // Merge the slices of each (problem, head, rows) and write the outputs.
        let mut outputs: Vec<Vec<f32>> = problems
            .iter()
            .map(|p| vec![0.0f32; p.n_q * p.h_q * p.v.dim])
            .collect();
        let mut i = 0;
        while i < tasks.len() {
            let mut j = i + 1;
            while j < tasks.len()
                && tasks[j].problem == tasks[i].problem
                && tasks[j].heads == tasks[i].heads
                && tasks[j].rows == tasks[i].rows
            {
                j += 1;
            }
            let p = &problems[tasks[i].problem];
            finish(
                p,
                &tasks[i],
                &partials[i..j],
                &mut outputs[tasks[i].problem],
            );
            i = j;
        }
        if let Some(r) = &self.v {
            outputs
                .par_iter_mut()
                .for_each(|o| r.inverse_rows(o).expect("output rows have the V dimension"));
        }
        outputs
    }

    /// Online softmax over one task's key slice, compiled for the task's instruction set.
    fn partial(&self, p: &Problem<'_>, task: &Task, bn: usize) -> Partial {
        match self.isa {
            // SAFETY: Isa::Avx2 is only used when the CPU has it.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { self.partial_avx2(p, task, bn) },
            _ => self.partial_impl(p, task, bn),
        }
    }

    /// [`Self::partial_impl`] compiled with AVX2 enabled, so the SIMD helpers inline into it.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn partial_avx2(&self, p: &Problem<'_>, task: &Task, bn: usize) -> Partial {
        self.partial_impl(p, task, bn)
    }

    #[inline(always)]
    fn partial_impl(&self, p: &Problem<'_>, task: &Task, bn: usize) -> Partial {
        let (d, d_v, g) = (p.k.dim, p.v.dim, p.group());
        let n_rows = task.rows.len();
        let width = task.heads.len() * g; // query heads of the task
        let lanes = n_rows * width; // lane = row · width + (head − first head) · g + j
        let mut m = vec![f32::NEG_INFINITY; lanes];
        let mut l = vec![0.0f32; lanes];
        let mut seen = vec![false; lanes];
        let mut acc = vec![0.0f32; lanes * d_v];
        // Dequantized K and V rows of one head for one tile (they stay in L1/L2).
        let mut ktile = vec![0.0f32; bn * d];
        let mut vtile = vec![0.0f32; bn * d_v];
        let mut scores = vec![f32::NEG_INFINITY; lanes * bn];
        let ranges: Vec<Range<usize>> = task.rows.clone().map(|i| p.visible(i)).collect();
        let softcap = p.params.softcap.map(|c| c as f32);
        // Decode (one query row, groups of four heads) reads K and V in registers on AVX2.
        let fused = |view: &KvCacheView<'_>| {
            (self.isa == Isa::Avx2 && n_rows == 1 && g % 4 == 0)
                .then(|| RegFormat::of(view.format, view.dim))
                .flatten()
        };
        let (fused_k, fused_v) = (fused(&p.k), fused(&p.v));
        let mut t0 = task.keys.start;
        while t0 < task.keys.end {
            let t1 = (t0 + bn).min(task.keys.end);
            // Tokens of the tile that some row sees (a contiguous range).
            let lo = ranges.iter().map(|r| r.start.max(t0)).min().unwrap_or(t1);
            let hi = ranges.iter().map(|r| r.end.min(t1)).max().unwrap_or(t0);
            // Scores: each K row dequantized once for all rows and heads of its group.
            for (hh, head) in task.heads.clone().enumerate() {
                if let Some(f) = fused_k {
                    let vis = ranges[0].start.max(t0)..ranges[0].end.min(t1);
                    for j in (0..g).step_by(4) {
                        let q = &p.q[(task.rows.start * p.h_q + head * g + j) * d..][..4 * d];
                        let out = &mut scores[(hh * g + j) * bn + (vis.start - t0)..];
                        // SAFETY: fused_k is only Some on AVX2 machines, for a K format with
                        // d % 32 == 0, one query row and g % 4 == 0; `vis` lies in the cache and
                        // `out` holds 4 lanes of `bn` scores from `vis.start`.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            avx2::fused_scores(f, q, &p.k, &p.v, head, vis.clone(), out, bn)
                        };
                        #[cfg(not(target_arch = "x86_64"))]
                        let _ = (f, q, out);
                    }
                    if let Some(c) = softcap {
                        for s in (0..g).flat_map(|j| {
                            let at = (hh * g + j) * bn;
                            at + vis.start - t0..at + vis.end - t0
                        }) {
                            scores[s] = c * (scores[s] / c).tanh();
                        }
                    }
                    continue;
                }
                for t in lo..hi {
                    p.k.prefetch(t + PREFETCH_TOKENS, head);
                    let row = &mut ktile[(t - t0) * d..][..d];
                    dequantize_row(p.k.format, p.k.row(t, head), row, self.isa);
                }
                for (ri, i) in task.rows.clone().enumerate() {
                    let q = &p.q[(i * p.h_q + head * g) * d..][..g * d];
                    let lane0 = ri * width + hh * g;
                    let vis = ranges[ri].start.max(t0)..ranges[ri].end.min(t1);
                    if vis.is_empty() {
                        continue;
                    }
                    let keys = &ktile[(vis.start - t0) * d..(vis.end - t0) * d];
                    let out = &mut scores[lane0 * bn + (vis.start - t0)..];
                    score_tile(q, keys, d, out, bn, self.isa);
                    if let Some(c) = softcap {
                        for j in 0..g {
                            for s in &mut out[j * bn..][..vis.len()] {
                                *s = c * (*s / c).tanh();
                            }
                        }
                    }
                }
            }
            // Softmax bookkeeping, per lane over its visible keys of the tile.
            for (ri, r) in ranges.iter().enumerate() {
                let vis = r.start.max(t0)..r.end.min(t1);
                if vis.is_empty() {
                    continue;
                }
                for lane in ri * width..(ri + 1) * width {
                    let row = &mut scores[lane * bn..][vis.start - t0..vis.end - t0];
                    let tile_max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let m_new = m[lane].max(tile_max);
                    if m_new == f32::NEG_INFINITY && !row.iter().any(|s| s.is_nan()) {
                        // Every visible score so far is −Inf: weight 0 unless the whole row
                        // is (then the oracle's softmax is 0/0 = NaN; `finish` decides).
                        seen[lane] = true;
                        row.fill(0.0);
                        continue;
                    }
                    let corr = (m[lane] - m_new).exp();
                    let sum = exp_shifted(row, m_new, self.isa);
                    if corr != 1.0 {
                        l[lane] *= corr;
                        acc[lane * d_v..][..d_v].iter_mut().for_each(|a| *a *= corr);
                    }
                    l[lane] += sum;
                    m[lane] = m_new;
                }
            }
            // Weighted sums of V rows, each dequantized once for all rows and heads.
            for (hh, head) in task.heads.clone().enumerate() {
                if let Some(f) = fused_v {
                    let vis = ranges[0].start.max(t0)..ranges[0].end.min(t1);
                    for j in (0..g).step_by(4) {
                        let lane = hh * g + j;
                        let acc = &mut acc[lane * d_v..][..4 * d_v];
                        let w = &scores[lane * bn + (vis.start - t0)..];
                        // SAFETY: as for fused_k, with the V cache and `acc` holding 4 lanes.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            avx2::fused_weighted_sum(f, acc, w, bn, &p.v, head, vis.clone())
                        };
                        #[cfg(not(target_arch = "x86_64"))]
                        let _ = (f, acc, w);
                    }
                    continue;
                }
                for t in lo..hi {
                    p.v.prefetch(t + PREFETCH_TOKENS, head);
                    let row = &mut vtile[(t - t0) * d_v..][..d_v];
                    dequantize_row(p.v.format, p.v.row(t, head), row, self.isa);
                }
                for (ri, r) in ranges.iter().enumerate() {
                    let vis = r.start.max(t0)..r.end.min(t1);
                    if vis.is_empty() {
                        continue;
                    }
                    let rows = &vtile[(vis.start - t0) * d_v..(vis.end - t0) * d_v];
                    for lane in ri * width + hh * g..ri * width + (hh + 1) * g {
                        let w = &scores[lane * bn..][vis.start - t0..vis.end - t0];
                        weighted_sum(&mut acc[lane * d_v..][..d_v], w, rows, self.isa);
                    }
                }
            }
            t0 = t1;
        }
        Partial { m, l, acc, seen }
    }
}

/// Merges the partials of one (heads, rows) block and writes `acc / l` into `out`.
///
/// A slice that saw no visible key contributes nothing; if no slice did, the row is zeros.
/// When visible keys all scored −Inf the row is NaN (the oracle's 0/0), and NaN anywhere in a
/// slice's sums carries through to the row.
fn finish(p: &Problem<'_>, task: &Task, parts: &[Partial], out: &mut [f32]) {
    let d_v = p.v.dim;
    let width = task.heads.len() * p.group();
    let first = task.heads.start * p.group();
    for (ri, i) in task.rows.clone().enumerate() {
        for j in 0..width {
            let lane = ri * width + j;
            let o = &mut out[(i * p.h_q + first + j) * d_v..][..d_v];
            // Slices that saw a visible key (even one scored −Inf: its weight 0 times a NaN or
            // Inf in V is NaN, as in the oracle).
            let live = || {
                parts.iter().filter(|part| {
                    part.m[lane] != f32::NEG_INFINITY || part.l[lane].is_nan() || part.seen[lane]
                })
            };
            if live().next().is_none() {
                o.fill(0.0); // no visible key
                continue;
            }
            // All visible scores −Inf gives m = −Inf and exp(−Inf + Inf) = NaN: the oracle's 0/0.
            let m = live().fold(f32::NEG_INFINITY, |a, part| a.max(part.m[lane]));
            let mut l = 0.0f32;
            for part in live() {
                let w = (part.m[lane] - m).exp();
                l += part.l[lane] * w;
                for (a, b) in o.iter_mut().zip(&part.acc[lane * d_v..][..d_v]) {
                    *a += b * w;
                }
            }
            o.iter_mut().for_each(|a| *a /= l);
        }
    }
}

/// A decode query of one sequence (see [`CpuAttention::decode_batch`]).
#[derive(Clone, Debug)]
pub struct DecodeRequest<'a> {
    /// `[h_q, d]`, unrotated.
    pub q: &'a [f32],
    /// Query heads.
    pub h_q: usize,
    /// The sequence's K cache.
    pub k: KvCacheView<'a>,
    /// The sequence's V cache.
    pub v: KvCacheView<'a>,
    /// Its parameters (`pos_offset` is the query's position).
    pub params: AttentionParams,
}

/// `out[j · stride + t] = q_j · k_t` for every row `q_j` of `q` and `k_t` of `keys` (rows of
/// `d` values).
#[inline(always)]
fn score_tile(q: &[f32], keys: &[f32], d: usize, out: &mut [f32], stride: usize, isa: Isa) {
    match isa {
        // SAFETY: Isa::Avx2 is only used when the CPU has it; the shapes are as documented and
        // `out` holds (rows − 1) · stride + keys.len() / d values.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::score_tile(q, keys, d, out, stride) },
        _ => {
            let mut dot = [0.0f32; 1];
            for (t, k) in keys.chunks_exact(d).enumerate() {
                for (j, qj) in q.chunks_exact(d).enumerate() {
                    dots(qj, k, &mut dot, isa);
                    out[j * stride + t] = dot[0];
                }
            }
        }
    }
}

/// `out[j] = q_j · k` for the `out.len()` consecutive rows `q_j` of `q` (each `k.len()` long).
#[inline(always)]
fn dots(q: &[f32], k: &[f32], out: &mut [f32], isa: Isa) {
    match isa {
        // SAFETY: Isa::Neon is only used when the CPU has it; q holds out.len() rows of k.len().
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::dots(q, k, out) },
        _ => {
            for (o, row) in out.iter_mut().zip(q.chunks_exact(k.len())) {
                *o = row.iter().zip(k).map(|(x, y)| x * y).sum();
            }
        }
    }
}

/// `row[i] ← exp(row[i] − m)`; returns the sum.
#[inline(always)]
fn exp_shifted(row: &mut [f32], m: f32, isa: Isa) -> f32 {
    match isa {
        // SAFETY: Isa::Avx2 is only used when the CPU has it.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::exp_shifted(row, m) },
        // SAFETY: Isa::Neon is only used when the CPU has it.
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::exp_shifted(row, m) },
        _ => row
            .iter_mut()
            .map(|s| {
                *s = (*s - m).exp();
                *s
            })
            .sum(),
    }
}

/// `acc += Σ_t w[t] · rows[t]` (rows of `acc.len()` values).
#[inline(always)]
fn weighted_sum(acc: &mut [f32], w: &[f32], rows: &[f32], isa: Isa) {
    match isa {
        // SAFETY: Isa::Avx2 is only used when the CPU has it; rows holds w.len() rows.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::weighted_sum(acc, w, rows) },
        // SAFETY: Isa::Neon is only used when the CPU has it; same lengths as above.
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::weighted_sum(acc, w, rows) },
        _ => {
            for (wt, row) in w.iter().zip(rows.chunks_exact(acc.len())) {
                acc.iter_mut().zip(row).for_each(|(a, v)| *a += wt * v);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "aarch64")]
mod neon;
