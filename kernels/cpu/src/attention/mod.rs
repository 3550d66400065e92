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
//! divided by `l` and, when V was rotated, rotated back by `R_vᵀ` row by row. The log-sum-exp
//! of a row, `m + ln l` after the merge, comes out too where asked for (what merging with
//! attention over other keys needs).
//!
//! A batch is planned once per step ([`CpuAttention::plan`], FlashInfer's `plan()`): the
//! checks and the partition into tasks, over sequences that each have their own caches,
//! query rows (decode rows and prefill chunks mix), parameters and optional additive
//! [`AttentionMask`] (added to a visible key's score after the soft-cap, as llama.cpp does;
//! −∞ hides a key, and a row whose mask hides every visible key is the zero row with LSE −∞).
//! [`CpuAttention::run_planned`] then runs it in a workspace the caller owns: rotated queries,
//! tiles and the tasks' states live there, and nothing is allocated per task.
//! [`CpuAttention::run`] and [`CpuAttention::decode_batch`] are a plan and a run in a
//! workspace that each thread keeps for its next call.
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
use rotq_reference::attention::quantize_query_in_place;
use rotq_reference::{AttentionParams, Error, KvFormat, Result, RotationPlan};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::ops::Range;
use std::sync::{Mutex, PoisonError};

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
    Tq4,
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
            KvFormat::Tq4 => Some(Self::Tq4),
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
    query: QueryMode,
}

/// The arithmetic of `K·Q`: with exact f32 queries, or with the (rotated) queries quantized to
/// q8_0 blocks, as ggml's CPU kernels do, so that over q4_0 and q8_0 caches the decode loop
/// multiplies 8-bit integers (`rotq_reference::attention::quantized_query` is the spec: the
/// oracle on round-tripped queries). Every path honours the mode (the integer loop where it
/// exists, the f32 loops on the round-tripped queries elsewhere), so results do not depend on
/// which loop ran.
///
/// [`QueryMode::Auto`] is the rule measured on real attention layers (docs/eval.md, "Quantized
/// queries"): q8_0 queries add 1.5–4.6·10⁻⁵ of mean attention KLD where Q and K are rotated
/// (the rotation spreads a query's outlier channels, so one block scale fits all 32 values),
/// but 1.3–2.0·10⁻⁴ on an unrotated SmolLM2 layer set; so `Auto` quantizes queries only over
/// integer K formats with a Q/K rotation. The kernels' own default stays [`QueryMode::Exact`]
/// (what the oracle computes); the engine API defaults to `Auto`.
///
/// ```
/// use rotq_cpu::{CpuAttention, Isa, QueryMode};
/// use rotq_reference::{KvFormat, RotationPlan};
/// let attn = CpuAttention::new(&RotationPlan::none(), Isa::best()).with_query_mode(QueryMode::Q8_0);
/// assert_eq!(attn.query_mode(), QueryMode::Q8_0);
/// assert_eq!(QueryMode::Auto.resolve(KvFormat::Q4_0, true, 128), QueryMode::Q8_0);
/// assert_eq!(QueryMode::Auto.resolve(KvFormat::Q4_0, false, 128), QueryMode::Exact);
/// assert_eq!(QueryMode::Auto.resolve(KvFormat::F16, true, 128), QueryMode::Exact);
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum QueryMode {
    /// f32 queries: attention as the oracle computes it on the cache.
    #[default]
    Exact,
    /// Queries through q8_0 (rows of a multiple of 32 values).
    Q8_0,
    /// [`QueryMode::Q8_0`] over q4_0 and q8_0 K caches whose Q and K are rotated (head
    /// dimensions a multiple of 32), [`QueryMode::Exact`] elsewhere: see [`QueryMode::resolve`].
    /// Every query row over such a cache is quantized, prefill rows too (the integer loop only
    /// runs for decode rows of groups of four heads on AVX2; elsewhere the f32 loops take the
    /// quantized rows). A call whose rotated queries exceed `127 · 65504` in magnitude (where
    /// q8_0's f16 scale overflows) keeps f32 queries.
    Auto,
}

impl QueryMode {
    /// Every mode, in the order the docs list them.
    pub const ALL: [QueryMode; 3] = [QueryMode::Exact, QueryMode::Q8_0, QueryMode::Auto];

    /// The mode that runs over a K cache in `k_format` with rows of `d` values, Q and K rotated
    /// (`qk_rotated`) or not: [`QueryMode::Auto`] becomes [`QueryMode::Q8_0`] for q4_0 and q8_0
    /// (the formats the integer loop reads) with a rotation and `d % 32 == 0`, else
    /// [`QueryMode::Exact`]; the other modes stay as they are.
    ///
    /// ```
    /// use rotq_cpu::QueryMode;
    /// use rotq_reference::KvFormat;
    /// assert_eq!(QueryMode::Auto.resolve(KvFormat::Q8_0, true, 96), QueryMode::Q8_0);
    /// assert_eq!(QueryMode::Auto.resolve(KvFormat::Q8_0, true, 80), QueryMode::Exact);
    /// assert_eq!(QueryMode::Q8_0.resolve(KvFormat::F16, false, 64), QueryMode::Q8_0);
    /// ```
    pub fn resolve(self, k_format: KvFormat, qk_rotated: bool, d: usize) -> QueryMode {
        match self {
            QueryMode::Auto
                if qk_rotated
                    && d.is_multiple_of(32)
                    && matches!(k_format, KvFormat::Q4_0 | KvFormat::Q8_0) =>
            {
                QueryMode::Q8_0
            }
            QueryMode::Auto => QueryMode::Exact,
            mode => mode,
        }
    }

    /// The name the CLI and the C ABI use (`exact`, `q8_0`, `auto`).
    ///
    /// ```
    /// use rotq_cpu::QueryMode;
    /// assert_eq!(QueryMode::Q8_0.name(), "q8_0");
    /// assert_eq!("exact".parse::<QueryMode>().unwrap(), QueryMode::Exact);
    /// assert!("q4_0".parse::<QueryMode>().is_err());
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            QueryMode::Exact => "exact",
            QueryMode::Q8_0 => "q8_0",
            QueryMode::Auto => "auto",
        }
    }
}

impl std::fmt::Display for QueryMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for QueryMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        QueryMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| Error::InvalidParameter {
                name: "query mode",
                reason: format!("`{s}`: expected `exact`, `q8_0` or `auto`"),
            })
    }
}

/// The largest rotated query magnitude [`QueryMode::Auto`] quantizes: `127 · 65504`, above
/// which a q8_0 block's f16 scale overflows.
const AUTO_QUERY_LIMIT: f32 = 127.0 * 65504.0;

/// An additive mask over one sequence's query rows and its keys: the value for (query row `i`,
/// key `j`) is `values[i · row_stride + j]`, added to a visible key's score after the soft-cap
/// (ALiBi biases; −∞ hides a key), with the oracle's semantics
/// (`rotq_reference::attention::attention_f64_masked`). `row_stride ≥ n_tokens` and
/// `values.len() ≥ (n_q − 1) · row_stride + n_tokens`, so one buffer can serve a cache that
/// grows (a stride of its capacity) or hold a whole batch's mask.
///
/// ```
/// use rotq_cpu::AttentionMask;
/// // Two query rows over 3 keys, in rows of 4: row 1 does not see key 0.
/// let values = [0.0, -0.5, 0.0, 9.9, f32::NEG_INFINITY, 0.0, 0.0, 9.9];
/// let mask = AttentionMask { values: &values, row_stride: 4 };
/// assert_eq!(mask.values[mask.row_stride], f32::NEG_INFINITY);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct AttentionMask<'a> {
    /// The values, row `i` from `i · row_stride`.
    pub values: &'a [f32],
    /// Distance between the rows of two consecutive query rows.
    pub row_stride: usize,
}

/// One sequence of a batch: `n_q` query rows (`q` is `[n_q, h_q, d]`, unrotated) against its
/// caches, with its own parameters (causal offset, window, soft-cap) and optional mask. Decode
/// rows (`n_q = 1`) and prefill chunks mix freely in one batch.
///
/// ```
/// use rotq_cpu::{KvCacheView, SeqAttention};
/// use rotq_reference::{AttentionParams, KvFormat};
/// let bytes = vec![0u8; 5 * 2 * 64 * 4]; // 5 tokens, 2 heads of 64 f32 values
/// let cache = KvCacheView::new(KvFormat::F32, &bytes, 5, 2, 64).unwrap();
/// let q = vec![0.5f32; 3 * 4 * 64];
/// // The last 3 tokens' queries (positions 2, 3, 4), 4 query heads.
/// let params = AttentionParams { causal: true, pos_offset: 2, ..Default::default() };
/// let seq = SeqAttention { q: &q, n_q: 3, h_q: 4, k: cache, v: cache, params: &params, mask: None };
/// assert_eq!(seq.q.len(), seq.n_q * seq.h_q * 64);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct SeqAttention<'a> {
    /// Queries `[n_q, h_q, d]`, unrotated.
    pub q: &'a [f32],
    /// Query rows.
    pub n_q: usize,
    /// Query heads (a multiple of the caches' heads).
    pub h_q: usize,
    /// The sequence's K cache.
    pub k: KvCacheView<'a>,
    /// The sequence's V cache.
    pub v: KvCacheView<'a>,
    /// Its parameters (`pos_offset` is the position of query row 0).
    pub params: &'a AttentionParams,
    /// An additive mask `[n_q, n_tokens]` (see [`AttentionMask`]).
    pub mask: Option<AttentionMask<'a>>,
}

/// What a plan depends on in one sequence: its sizes and formats, and the visibility rule that
/// shaped its tasks' key slices. A sequence given to [`CpuAttention::run_planned`] must have
/// the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SeqShape {
    n_q: usize,
    h_q: usize,
    n_tokens: usize,
    h_kv: usize,
    d: usize,
    d_v: usize,
    k_format: KvFormat,
    v_format: KvFormat,
    causal: bool,
    pos_offset: usize,
    window: Option<usize>,
}

impl SeqShape {
    /// Visible keys of query row `i`: a contiguous range.
    fn visible(&self, i: usize) -> Range<usize> {
        let n = self.n_tokens;
        let pos = self.pos_offset + i;
        let hi = if self.causal {
            n.min(pos.saturating_add(1))
        } else {
            n
        };
        let lo = match self.window {
            Some(w) => pos.saturating_add(1).saturating_sub(w).min(hi),
            None => 0,
        };
        lo..hi
    }
}

/// Where one sequence's values lie: its rotated queries in the workspace, its rows of the
/// output and of the LSE.
#[derive(Clone, Debug)]
struct SeqPlan {
    shape: SeqShape,
    q_at: usize,
    out_at: usize,
    lse_at: usize,
}

/// The partition of a batch into tasks and the workspace it needs, computed once per step
/// (FlashInfer's `plan()`): [`CpuAttention::plan`] makes it, [`CpuAttention::run_planned`]
/// runs it as often as the batch keeps its shapes, in a workspace the caller owns.
///
/// The workspace holds, in order: the rotated, scaled queries of every sequence; one scratch
/// slot per worker (the K and V tiles and the score tile of the task it runs); and every task's
/// online-softmax state (`m`, `l`, which keys it saw, the unnormalized output), merged once all
/// tasks are done. Workers claim tasks one at a time, so a slow thread holds back no other.
///
/// ```
/// use rotq_cpu::{AttentionConfig, CpuAttention, Isa, KvCacheView, SeqAttention};
/// use rotq_reference::{AttentionParams, KvFormat, RotationPlan};
/// let wave = |n: usize, s: f32| (0..n).map(|i| (i as f32 * s).sin()).collect::<Vec<f32>>();
/// let (h_kv, h_q, d) = (2, 4, 32);
/// let bytes: Vec<u8> = wave(10 * h_kv * d, 0.3).iter().flat_map(|x| x.to_le_bytes()).collect();
/// let k = KvCacheView::new(KvFormat::F32, &bytes, 10, h_kv, d).unwrap();
/// let short = KvCacheView::new(KvFormat::F32, &bytes[..6 * h_kv * d * 4], 6, h_kv, d).unwrap();
/// let (q1, q3) = (wave(h_q * d, 0.5), wave(3 * h_q * d, 0.7));
/// let decode = AttentionParams { causal: true, pos_offset: 9, ..Default::default() };
/// let chunk = AttentionParams { causal: true, pos_offset: 3, ..Default::default() };
/// let seqs = [
///     SeqAttention { q: &q1, n_q: 1, h_q, k, v: k, params: &decode, mask: None },
///     SeqAttention { q: &q3, n_q: 3, h_q, k: short, v: short, params: &chunk, mask: None },
/// ];
/// // (A fixed slice count: a sequence's tasks then do not depend on the rest of the batch.)
/// let config = AttentionConfig { kv_splits: 1, ..AttentionConfig::default() };
/// let attn = CpuAttention::new(&RotationPlan::none(), Isa::best()).with_config(config);
/// let plan = attn.plan(&seqs).unwrap();
/// assert_eq!((plan.out_len(), plan.lse_len()), (4 * h_q * d, 4 * h_q));
/// let mut workspace = vec![0.0; plan.workspace_len()];
/// let (mut out, mut lse) = (vec![0.0; plan.out_len()], vec![0.0; plan.lse_len()]);
/// attn.run_planned(&plan, &seqs, &mut workspace, &mut out, Some(&mut lse)).unwrap();
/// // The first sequence's rows are those of a run of its own.
/// let alone = attn.run(&q1, 1, h_q, &k, &k, &decode).unwrap();
/// assert_eq!(out[..h_q * d], alone[..]);
/// ```
#[derive(Clone, Debug)]
pub struct BatchPlan {
    /// The tuning the tasks were cut with (its `block_n` sizes the tiles).
    config: AttentionConfig,
    seqs: Vec<SeqPlan>,
    /// In order of their state in the workspace; the slices of one (sequence, heads, rows)
    /// block are consecutive.
    tasks: Vec<Task>,
    /// Rotated queries: `[0, q_len)` of the workspace.
    q_len: usize,
    /// Scratch slots of `slot_len` values after the queries.
    slots: usize,
    slot_len: usize,
    /// The tasks' states after the slots.
    parts_len: usize,
    out_len: usize,
    lse_len: usize,
}

impl BatchPlan {
    /// The f32 values of workspace that [`CpuAttention::run_planned`] needs (at least).
    ///
    /// ```
    /// # use rotq_cpu::{CpuAttention, Isa, KvCacheView, SeqAttention};
    /// # use rotq_reference::{AttentionParams, KvFormat, RotationPlan};
    /// # let bytes = vec![0u8; 7 * 64 * 4];
    /// # let k = KvCacheView::new(KvFormat::F32, &bytes, 7, 1, 64).unwrap();
    /// # let (q, params) = (vec![1.0f32; 2 * 64], AttentionParams::default());
    /// # let seq = SeqAttention { q: &q, n_q: 1, h_q: 2, k, v: k, params: &params, mask: None };
    /// let plan = CpuAttention::new(&RotationPlan::none(), Isa::best()).plan(&[seq]).unwrap();
    /// // At least the rotated queries and one task's output.
    /// assert!(plan.workspace_len() >= 2 * 64 + 2 * 64);
    /// ```
    pub fn workspace_len(&self) -> usize {
        self.q_len + self.slots * self.slot_len + self.parts_len
    }

    /// The output's length: `Σ n_q · h_q · d_v` over the sequences.
    ///
    /// ```
    /// # use rotq_cpu::{CpuAttention, Isa, KvCacheView, SeqAttention};
    /// # use rotq_reference::{AttentionParams, KvFormat, RotationPlan};
    /// # let bytes = vec![0u8; 7 * 64 * 4];
    /// # let k = KvCacheView::new(KvFormat::F32, &bytes, 7, 1, 64).unwrap();
    /// # let (q, params) = (vec![1.0f32; 3 * 2 * 64], AttentionParams::default());
    /// # let seq = SeqAttention { q: &q, n_q: 3, h_q: 2, k, v: k, params: &params, mask: None };
    /// let plan = CpuAttention::new(&RotationPlan::none(), Isa::best()).plan(&[seq, seq]).unwrap();
    /// assert_eq!(plan.out_len(), 2 * 3 * 2 * 64);
    /// ```
    pub fn out_len(&self) -> usize {
        self.out_len
    }

    /// The LSE's length: `Σ n_q · h_q` over the sequences.
    ///
    /// ```
    /// # use rotq_cpu::{CpuAttention, Isa, KvCacheView, SeqAttention};
    /// # use rotq_reference::{AttentionParams, KvFormat, RotationPlan};
    /// # let bytes = vec![0u8; 7 * 64 * 4];
    /// # let k = KvCacheView::new(KvFormat::F32, &bytes, 7, 1, 64).unwrap();
    /// # let (q, params) = (vec![1.0f32; 3 * 2 * 64], AttentionParams::default());
    /// # let seq = SeqAttention { q: &q, n_q: 3, h_q: 2, k, v: k, params: &params, mask: None };
    /// let plan = CpuAttention::new(&RotationPlan::none(), Isa::best()).plan(&[seq, seq]).unwrap();
    /// assert_eq!(plan.lse_len(), 2 * 3 * 2);
    /// ```
    pub fn lse_len(&self) -> usize {
        self.lse_len
    }
}

thread_local! {
    /// The workspace of [`CpuAttention::run`] and [`CpuAttention::decode_batch`] on this
    /// thread, kept for its next call: a fresh one each call is zeroed, and above the
    /// allocator's mmap threshold also faulted in page by page and unmapped again, which made
    /// a 32k-token decode on 16 threads 7–19 % slower than the per-task buffers it replaces
    /// (those came from the threads' malloc arenas, warm). Its contents never matter.
    static WORKSPACE: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// The largest workspace (f32 values, 16 MiB) [`WORKSPACE`] keeps between calls: decode's
/// fits; a long prefill's is freed, its allocation small beside its arithmetic.
const KEPT_WORKSPACE: usize = 1 << 22;

/// One attention problem: a sequence's queries (rotated and scaled, in the workspace) against
/// its caches.
struct Problem<'a> {
    /// Rotated, scaled queries `[n_q, h_q, d]`.
    q: &'a [f32],
    h_q: usize,
    k: KvCacheView<'a>,
    v: KvCacheView<'a>,
    params: &'a AttentionParams,
    mask: Option<AttentionMask<'a>>,
    shape: SeqShape,
    /// Whether `q` went through q8_0 (the integer loops may take it).
    int_q: bool,
}

impl Problem<'_> {
    fn group(&self) -> usize {
        self.h_q / self.k.n_heads
    }

    /// Visible keys of query row `i`: a contiguous range.
    fn visible(&self, i: usize) -> Range<usize> {
        self.shape.visible(i)
    }
}

/// What a task saw of a query row's keys, kept in the workspace as an f32 and merged by `max`:
/// no visible key; visible keys, all hidden by a −∞ mask value; a key the mask does not hide.
/// A row is the zero row (LSE −∞) unless some slice saw a live key, and a slice that saw any
/// visible key takes part in the merge (its weights may be 0, but 0 · NaN in V is NaN).
const SAW_NOTHING: f32 = 0.0;
const SAW_HIDDEN: f32 = 1.0;
const SAW_LIVE: f32 = 2.0;

/// One task's online-softmax state: per lane (query row × query head of the task) the running
/// max `m`, the sum of weights `l` and the unnormalized output `acc` (`d_v` values); per query
/// row what it saw (`SAW_*`).
struct Partial<T> {
    m: T,
    l: T,
    saw: T,
    acc: T,
}

/// The length of the state of a task with `lanes` lanes of `rows` query rows (`None` on
/// overflow): `m`, `l`, `saw` and `acc`, one after the other.
fn partial_len(lanes: usize, rows: usize, d_v: usize) -> Option<usize> {
    lanes.checked_mul(d_v.checked_add(2)?)?.checked_add(rows)
}

fn partial_ref(buf: &[f32], lanes: usize, rows: usize) -> Partial<&[f32]> {
    let (m, rest) = buf.split_at(lanes);
    let (l, rest) = rest.split_at(lanes);
    let (saw, acc) = rest.split_at(rows);
    Partial { m, l, saw, acc }
}

fn partial_mut(buf: &mut [f32], lanes: usize, rows: usize) -> Partial<&mut [f32]> {
    let (m, rest) = buf.split_at_mut(lanes);
    let (l, rest) = rest.split_at_mut(lanes);
    let (saw, acc) = rest.split_at_mut(rows);
    Partial { m, l, saw, acc }
}

/// A unit of work: problem, KV heads, query rows, key slice, and the length of its state.
#[derive(Clone, Debug)]
struct Task {
    problem: usize,
    heads: Range<usize>,
    rows: Range<usize>,
    keys: Range<usize>,
    part_len: usize,
}

impl Task {
    /// Lanes (query rows × query heads) of this task.
    fn lanes(&self, group: usize) -> usize {
        self.rows.len() * self.heads.len() * group
    }
}

/// Hands out the tasks in order, each with its own state: the workers' queue. The states are
/// consecutive in the workspace, so each is cut off the front of what is left (borrowed for the
/// whole run, not for the queue's lock).
struct Claims<'a, 't> {
    rest: &'a mut [f32],
    tasks: std::slice::Iter<'t, Task>,
}

impl<'a, 't> Iterator for Claims<'a, 't> {
    type Item = (&'t Task, &'a mut [f32]);

    fn next(&mut self) -> Option<Self::Item> {
        let task = self.tasks.next()?;
        let (part, rest) = std::mem::take(&mut self.rest).split_at_mut(task.part_len);
        self.rest = rest;
        Some((task, part))
    }
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
            query: QueryMode::default(),
        }
    }

    /// The same kernels with queries in `mode` (see [`QueryMode`]).
    pub fn with_query_mode(mut self, mode: QueryMode) -> Self {
        self.query = mode;
        self
    }

    /// The queries' arithmetic.
    pub fn query_mode(&self) -> QueryMode {
        self.query
    }

    /// The same kernels with another tuning.
    pub fn with_config(mut self, config: AttentionConfig) -> Self {
        self.config = config.clamped();
        self.tuned = false;
        self
    }

    /// The mode this kernel's queries take over the K cache `k` (its [`QueryMode`] resolved).
    fn query_for(&self, k: &KvCacheView<'_>) -> QueryMode {
        self.query.resolve(k.format, self.qk.is_some(), k.dim)
    }

    /// The tuning for a decode problem: the tuning cache's entry for its shape and format
    /// unless [`Self::with_config`] set one, else the default.
    pub fn config_for(&self, h_q: usize, k: &KvCacheView<'_>) -> AttentionConfig {
        let tuned = || {
            let group = h_q / k.n_heads.max(1);
            let bucket = crate::tuned::decode_bucket(k.dim, k.n_heads, group, k.n_tokens);
            crate::tuned::lookup(
                &crate::tuned::decode_kernel(k.format, self.query_for(k)),
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
    /// against one sequence's caches; returns `[n_q, h_q, d_v]`. (A batch of one sequence:
    /// [`Self::plan`] and [`Self::run_planned`] in the workspace this thread keeps.)
    pub fn run(
        &self,
        q: &[f32],
        n_q: usize,
        h_q: usize,
        k: &KvCacheView<'_>,
        v: &KvCacheView<'_>,
        params: &AttentionParams,
    ) -> Result<Vec<f32>> {
        self.run_batch(&[SeqAttention {
            q,
            n_q,
            h_q,
            k: *k,
            v: *v,
            params,
            mask: None,
        }])
    }

    /// Decode for many sequences at once: one query row each (`q` is `[h_q, d]`), every
    /// sequence with its own caches and parameters. Returns one `[h_q, d_v]` output each.
    pub fn decode_batch(&self, requests: &[DecodeRequest<'_>]) -> Result<Vec<Vec<f32>>> {
        let seqs: Vec<SeqAttention<'_>> = requests
            .iter()
            .map(|r| SeqAttention {
                q: r.q,
                n_q: 1,
                h_q: r.h_q,
                k: r.k,
                v: r.v,
                params: &r.params,
                mask: None,
            })
            .collect();
        let out = self.run_batch(&seqs)?;
        let mut rest = &out[..];
        Ok(requests
            .iter()
            .map(|r| {
                let (one, tail) = rest.split_at(r.h_q * r.v.dim);
                rest = tail;
                one.to_vec()
            })
            .collect())
    }

    /// Plans and runs `seqs` in this thread's workspace ([`WORKSPACE`]); returns the output.
    fn run_batch(&self, seqs: &[SeqAttention<'_>]) -> Result<Vec<f32>> {
        let plan = self.plan(seqs)?;
        let mut out = vec![0.0f32; plan.out_len()];
        // Taken out of the cell for the call: a call nested on this thread (rayon may run
        // another job here while this one waits for its workers) finds it empty and makes its
        // own.
        let mut workspace = WORKSPACE.take();
        if workspace.len() < plan.workspace_len() {
            workspace = vec![0.0f32; plan.workspace_len()];
        }
        let done = self.run_planned(&plan, seqs, &mut workspace, &mut out, None);
        if workspace.len() <= KEPT_WORKSPACE {
            let nested = WORKSPACE.take();
            WORKSPACE.set(if nested.len() > workspace.len() {
                nested
            } else {
                workspace
            });
        }
        done.map(|()| out)
    }

    /// Checks one sequence (parameters, shapes, query length, rotation dims, mask size) and
    /// returns what a plan depends on in it.
    fn check(&self, s: &SeqAttention<'_>) -> Result<SeqShape> {
        let (k, v, n_q, h_q, params) = (&s.k, &s.v, s.n_q, s.h_q, s.params);
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
        if s.q.len() != expected {
            return Err(Error::LengthMismatch {
                what: "queries [n_q, h_q, d]",
                expected,
                actual: s.q.len(),
            });
        }
        self.plan.check_dims(d, d_v)?;
        params.f32_factors(d)?;
        if let (Some(mask), Some(last)) = (&s.mask, n_q.checked_sub(1)) {
            if mask.row_stride < k.n_tokens {
                return shape(format!(
                    "mask rows are {} apart, fewer than the {} keys",
                    mask.row_stride, k.n_tokens
                ));
            }
            let needed = last
                .checked_mul(mask.row_stride)
                .and_then(|x| x.checked_add(k.n_tokens))
                .ok_or(Error::Overflow("mask size"))?;
            if mask.values.len() < needed {
                return Err(Error::LengthMismatch {
                    what: "mask values (at least) for [n_q, row_stride]",
                    expected: needed,
                    actual: mask.values.len(),
                });
            }
        }
        Ok(SeqShape {
            n_q,
            h_q,
            n_tokens: k.n_tokens,
            h_kv,
            d,
            d_v,
            k_format: k.format,
            v_format: v.format,
            causal: params.causal,
            pos_offset: params.pos_offset,
            window: params.window,
        })
    }

    /// Checks every sequence (shapes, parameters, mask size) and partitions the work into
    /// tasks of (KV heads, block of query rows, slice of the cache), sized for the threads of
    /// the current rayon pool. A batch of decode rows (every `n_q` 1) takes the tuning of its
    /// first sequence's shape ([`Self::config_for`]), anything else this kernel's own.
    ///
    /// ```
    /// use rotq_cpu::{CpuAttention, Isa, KvCacheView, SeqAttention};
    /// use rotq_reference::{AttentionParams, Error, KvFormat, RotationPlan};
    /// let bytes = vec![0u8; 8 * 2 * 32 * 4];
    /// let k = KvCacheView::new(KvFormat::F32, &bytes, 8, 2, 32).unwrap();
    /// let (q, params) = (vec![0.25f32; 4 * 32], AttentionParams::default());
    /// let seq = SeqAttention { q: &q, n_q: 1, h_q: 4, k, v: k, params: &params, mask: None };
    /// let attn = CpuAttention::new(&RotationPlan::none(), Isa::best());
    /// assert!(attn.plan(&[seq, seq]).is_ok());
    /// let odd = SeqAttention { h_q: 3, q: &q[..3 * 32], ..seq }; // 3 heads over 2 KV heads
    /// assert!(matches!(attn.plan(&[seq, odd]), Err(Error::Shape(_))));
    /// ```
    pub fn plan(&self, seqs: &[SeqAttention<'_>]) -> Result<BatchPlan> {
        let shapes = seqs
            .iter()
            .map(|s| self.check(s))
            .collect::<Result<Vec<_>>>()?;
        let cfg = match seqs.first() {
            Some(s) if seqs.iter().all(|s| s.n_q == 1) => self.config_for(s.h_q, &s.k),
            _ => self.config,
        };
        let threads = rayon::current_num_threads().max(1);
        // Query blocks of one KV head each, over all sequences (to size the splits).
        let blocks: usize = shapes
            .iter()
            .map(|p| p.h_kv * p.n_q.div_ceil(cfg.block_m))
            .sum::<usize>()
            / shapes.len().max(1);
        let overflow = Error::Overflow("attention workspace");
        let mut tasks = Vec::new();
        let (mut parts_len, mut slot_len) = (0usize, 0usize);
        for (pi, p) in shapes.iter().enumerate() {
            let h_kv = p.h_kv;
            let group = p.h_q / h_kv;
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
                    let lanes = rows.len() * heads.len() * group;
                    let part_len = partial_len(lanes, rows.len(), p.d_v).ok_or(overflow.clone())?;
                    // A slot holds a K tile, a V tile and a score tile of any task.
                    let slot = lanes
                        .checked_add(p.d)
                        .and_then(|x| x.checked_add(p.d_v))
                        .and_then(|x| x.checked_mul(cfg.block_n))
                        .ok_or(overflow.clone())?;
                    slot_len = slot_len.max(slot);
                    let per = keys.len().div_ceil(splits).max(1);
                    let mut s = keys.start;
                    loop {
                        let e = (s + per).min(keys.end);
                        tasks.push(Task {
                            problem: pi,
                            heads: heads.clone(),
                            rows: rows.clone(),
                            keys: s..e,
                            part_len,
                        });
                        parts_len = parts_len.checked_add(part_len).ok_or(overflow.clone())?;
                        s = e;
                        if s >= keys.end {
                            break;
                        }
                    }
                }
            }
        }
        let mut plan = BatchPlan {
            config: cfg,
            seqs: Vec::with_capacity(shapes.len()),
            slots: threads.min(tasks.len()),
            tasks,
            q_len: 0,
            slot_len,
            parts_len,
            out_len: 0,
            lse_len: 0,
        };
        for shape in shapes {
            let rows = shape.n_q * shape.h_q;
            plan.seqs.push(SeqPlan {
                shape,
                q_at: plan.q_len,
                out_at: plan.out_len,
                lse_at: plan.lse_len,
            });
            // Each term fits (checked above); their sums might not.
            let add = |a: usize, b: usize| a.checked_add(b).ok_or(overflow.clone());
            plan.q_len = add(plan.q_len, rows * shape.d)?;
            plan.out_len = add(plan.out_len, rows * shape.d_v)?;
            plan.lse_len = add(plan.lse_len, rows)?;
        }
        plan.slots
            .checked_mul(plan.slot_len)
            .and_then(|x| x.checked_add(plan.q_len))
            .and_then(|x| x.checked_add(plan.parts_len))
            .ok_or(overflow)?;
        Ok(plan)
    }

    /// Runs a planned batch: the outputs `[n_q, h_q, d_v]` of the sequences, concatenated in
    /// their order, into `out` (`plan.out_len()` values), and if asked the log-sum-exp of every
    /// (query row, head) into `lse` (`[Σ n_q, h_q]`, `plan.lse_len()` values; natural log of
    /// the softmax's denominator in units of the scores after scale, soft-cap and mask, as
    /// the oracle defines it: −∞ for a row with no visible key).
    ///
    /// Nothing is allocated on the heap for the attention (rayon's own bookkeeping aside):
    /// rotated queries, tiles and the tasks' states live in `workspace` (at least
    /// `plan.workspace_len()` values, of any contents). `seqs` must have the shapes the plan
    /// was made for (rows, heads, tokens, dims, formats, causal offset and window per
    /// sequence) else [`Error::Shape`]; a wrong length of `workspace`, `out` or `lse` is
    /// [`Error::LengthMismatch`]. Every check comes before any work, so on an error `out` and
    /// `lse` are unchanged.
    ///
    /// ```
    /// use rotq_cpu::{AttentionMask, CpuAttention, Isa, KvCacheView, SeqAttention};
    /// use rotq_reference::{AttentionParams, KvFormat, RotationPlan};
    /// let wave = |n: usize, s: f32| (0..n).map(|i| (i as f32 * s).sin()).collect::<Vec<f32>>();
    /// let bytes: Vec<u8> = wave(6 * 32, 0.3).iter().flat_map(|x| x.to_le_bytes()).collect();
    /// let k = KvCacheView::new(KvFormat::F32, &bytes, 6, 1, 32).unwrap();
    /// let q = wave(2 * 32, 0.9);
    /// // Row 0 sees keys 0..3, row 1 sees no key at all.
    /// let inf = f32::NEG_INFINITY;
    /// let values = [[0.0, 0.0, 0.0, inf, inf, inf], [inf; 6]].concat();
    /// let mask = Some(AttentionMask { values: &values, row_stride: 6 });
    /// let params = AttentionParams::default();
    /// let seqs = [SeqAttention { q: &q, n_q: 2, h_q: 1, k, v: k, params: &params, mask }];
    /// let attn = CpuAttention::new(&RotationPlan::none(), Isa::best());
    /// let plan = attn.plan(&seqs).unwrap();
    /// let mut workspace = vec![0.0; plan.workspace_len()];
    /// let (mut out, mut lse) = (vec![0.0; 2 * 32], vec![0.0; 2]);
    /// attn.run_planned(&plan, &seqs, &mut workspace, &mut out, Some(&mut lse)).unwrap();
    /// assert!(lse[0].is_finite() && lse[1] == inf);
    /// assert!(out[32..].iter().all(|x| *x == 0.0));
    /// // A workspace too short is an error, and `out` is left as it was.
    /// let before = out.clone();
    /// assert!(attn.run_planned(&plan, &seqs, &mut workspace[1..], &mut out, None).is_err());
    /// assert_eq!(out, before);
    /// ```
    pub fn run_planned(
        &self,
        plan: &BatchPlan,
        seqs: &[SeqAttention<'_>],
        workspace: &mut [f32],
        out: &mut [f32],
        mut lse: Option<&mut [f32]>,
    ) -> Result<()> {
        let lengths = [
            ("sequences (as planned)", plan.seqs.len(), seqs.len()),
            ("output [Σ n_q, h_q, d_v]", plan.out_len, out.len()),
            (
                "LSE [Σ n_q, h_q]",
                plan.lse_len,
                lse.as_deref().map_or(plan.lse_len, <[f32]>::len),
            ),
        ];
        for (what, expected, actual) in lengths {
            if expected != actual {
                return Err(Error::LengthMismatch {
                    what,
                    expected,
                    actual,
                });
            }
        }
        if workspace.len() < plan.workspace_len() {
            return Err(Error::LengthMismatch {
                what: "workspace (at least BatchPlan::workspace_len)",
                expected: plan.workspace_len(),
                actual: workspace.len(),
            });
        }
        for (i, (s, planned)) in seqs.iter().zip(&plan.seqs).enumerate() {
            let shape = self.check(s)?;
            if shape != planned.shape {
                return Err(Error::Shape(format!(
                    "sequence {i} is {shape:?} but the plan was made for {:?}",
                    planned.shape
                )));
            }
        }
        let (queries, rest) = workspace.split_at_mut(plan.q_len);
        let (scratch, rest) = rest.split_at_mut(plan.slots * plan.slot_len);
        let parts = &mut rest[..plan.parts_len];
        for (s, planned) in seqs.iter().zip(&plan.seqs) {
            queries[planned.q_at..][..s.q.len()].copy_from_slice(s.q);
        }
        // Every sequence's d is the rotation's (checked): one call rotates them all.
        if let Some(r) = &self.qk {
            r.forward_rows(queries)?;
        }
        // `Auto` keeps f32 queries for a call whose rotated queries q8_0 cannot hold (a block's
        // f16 scale would overflow and the scores turn NaN); an explicit `Q8_0` is the spec's.
        let int_ok =
            self.query != QueryMode::Auto || queries.iter().all(|x| x.abs() <= AUTO_QUERY_LIMIT);
        for (s, planned) in seqs.iter().zip(&plan.seqs) {
            if self.query_for(&s.k) == QueryMode::Q8_0 && int_ok {
                if !planned.shape.d.is_multiple_of(32) {
                    return Err(Error::InvalidParameter {
                        name: "query mode",
                        reason: format!(
                            "q8_0 queries need a head dimension that is a multiple of 32, not {}",
                            planned.shape.d
                        ),
                    });
                }
                quantize_query_in_place(&mut queries[planned.q_at..][..s.q.len()])?;
            }
        }
        for (s, planned) in seqs.iter().zip(&plan.seqs) {
            let (scale, _) = s.params.f32_factors(planned.shape.d)?;
            queries[planned.q_at..][..s.q.len()]
                .iter_mut()
                .for_each(|x| *x *= scale);
        }
        let queries = &*queries;
        let problem = |i: usize| {
            let (s, planned) = (&seqs[i], &plan.seqs[i]);
            Problem {
                q: &queries[planned.q_at..][..s.q.len()],
                h_q: s.h_q,
                k: s.k,
                v: s.v,
                params: s.params,
                mask: s.mask,
                shape: planned.shape,
                int_q: self.query_for(&s.k) == QueryMode::Q8_0 && int_ok,
            }
        };
        // Each worker takes the next task from the queue until none is left, into its own
        // scratch slot; a task's state is its own part of the workspace.
        let queue = Mutex::new(Claims {
            rest: &mut *parts,
            tasks: plan.tasks.iter(),
        });
        let bn = plan.config.block_n;
        scratch
            .par_chunks_mut(plan.slot_len.max(1))
            .for_each(|slot| loop {
                let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
                let Some((task, part)) = next else { break };
                self.partial(&problem(task.problem), task, bn, slot, part);
            });
        // (The queue's borrow of the states ended with the workers.)
        let parts = &*parts;
        // Merge the slices of each (sequence, heads, rows) block and write the outputs.
        let (mut i, mut at) = (0, 0);
        let tasks = &plan.tasks;
        while i < tasks.len() {
            let (mut j, mut end) = (i + 1, at + tasks[i].part_len);
            while j < tasks.len()
                && tasks[j].problem == tasks[i].problem
                && tasks[j].heads == tasks[i].heads
                && tasks[j].rows == tasks[i].rows
            {
                end += tasks[j].part_len;
                j += 1;
            }
            let (p, planned) = (problem(tasks[i].problem), &plan.seqs[tasks[i].problem]);
            let rows = planned.shape.n_q * planned.shape.h_q;
            finish(
                &p,
                &tasks[i],
                &parts[at..end],
                j - i,
                &mut out[planned.out_at..][..rows * planned.shape.d_v],
                lse.as_deref_mut().map(|l| &mut l[planned.lse_at..][..rows]),
            );
            (i, at) = (j, end);
        }
        // Every sequence's d_v is the rotation's (checked): one call rotates them all back.
        if let Some(r) = &self.v {
            r.inverse_rows(out)?;
        }
        Ok(())
    }

    /// Online softmax over one task's key slice, compiled for the task's instruction set.
    fn partial(
        &self,
        p: &Problem<'_>,
        task: &Task,
        bn: usize,
        scratch: &mut [f32],
        part: &mut [f32],
    ) {
        match self.isa {
            // SAFETY: Isa::Avx2 is only used when the CPU has it.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { self.partial_avx2(p, task, bn, scratch, part) },
            _ => self.partial_impl(p, task, bn, scratch, part),
        }
    }

    /// [`Self::partial_impl`] compiled with AVX2 enabled, so the SIMD helpers inline into it.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn partial_avx2(
        &self,
        p: &Problem<'_>,
        task: &Task,
        bn: usize,
        scratch: &mut [f32],
        part: &mut [f32],
    ) {
        self.partial_impl(p, task, bn, scratch, part)
    }

    /// The online softmax of `task`, its state written into `part` (laid out by
    /// [`partial_mut`]), its tiles in `scratch` (a K tile, a V tile, a score tile).
    #[inline(always)]
    fn partial_impl(
        &self,
        p: &Problem<'_>,
        task: &Task,
        bn: usize,
        scratch: &mut [f32],
        part: &mut [f32],
    ) {
        let (d, d_v, g) = (p.k.dim, p.v.dim, p.group());
        let n_rows = task.rows.len();
        let width = task.heads.len() * g; // query heads of the task
        let lanes = n_rows * width; // lane = row · width + (head − first head) · g + j
        let Partial { m, l, saw, acc } = partial_mut(part, lanes, n_rows);
        m.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        saw.fill(SAW_NOTHING);
        acc.fill(0.0);
        // Dequantized K and V rows of one head for one tile (they stay in L1/L2).
        let (ktile, rest) = scratch.split_at_mut(bn * d);
        let (vtile, rest) = rest.split_at_mut(bn * d_v);
        let scores = &mut rest[..lanes * bn];
        scores.fill(f32::NEG_INFINITY);
        let range = |ri: usize| p.visible(task.rows.start + ri);
        let softcap = p.params.softcap.map(|c| c as f32);
        // Decode (one query row, groups of four heads) reads K and V in registers on AVX2.
        let fused = |view: &KvCacheView<'_>| {
            (self.isa == Isa::Avx2 && n_rows == 1 && g % 4 == 0)
                .then(|| RegFormat::of(view.format, view.dim))
                .flatten()
        };
        let (fused_k, fused_v) = (fused(&p.k), fused(&p.v));
        // Quantized queries over an integer K format: each group of four heads' queries as
        // integers, once per task (`None` where the f32 loop takes the group).
        #[cfg(target_arch = "x86_64")]
        let int_queries = {
            let mut iqs = INT_QUERIES.with(|c| std::mem::take(&mut *c.borrow_mut()));
            iqs.clear();
            if let Some(f) =
                fused_k.filter(|&f| p.int_q && matches!(f, RegFormat::Q4_0 | RegFormat::Q8_0))
            {
                for head in task.heads.clone() {
                    for j in (0..g).step_by(4) {
                        let q = &p.q[(task.rows.start * p.h_q + head * g + j) * d..][..4 * d];
                        iqs.push(avx2::int_query(q, d, f));
                    }
                }
            }
            iqs
        };
        // The same on NEON with dot products: every (row, head) of the task's query rows as
        // codes `[rows][heads][g · d]` and block scales, in buffers this worker keeps (`None`:
        // the f32 loops take them).
        #[cfg(target_arch = "aarch64")]
        let neon_int = (self.isa == Isa::Neon
            && p.int_q
            && matches!(p.k.format, KvFormat::Q4_0 | KvFormat::Q8_0)
            && d.is_multiple_of(32)
            && neon::has_dotprod())
        .then(|| {
            let (mut codes, mut scales) =
                NEON_QUERIES.with(|c| std::mem::take(&mut *c.borrow_mut()));
            let n = n_rows * task.heads.len() * g * d;
            codes.clear();
            codes.resize(n, 0);
            scales.clear();
            scales.resize(n / 32, 0.0);
            let mut at = 0;
            for i in task.rows.clone() {
                for head in task.heads.clone() {
                    let q = &p.q[(i * p.h_q + head * g) * d..][..g * d];
                    if !q.iter().all(|x| x.is_finite()) {
                        NEON_QUERIES.with(|c| *c.borrow_mut() = (codes, scales));
                        return None;
                    }
                    int_codes(
                        q,
                        &mut codes[at..at + g * d],
                        &mut scales[at / 32..(at + g * d) / 32],
                    );
                    at += g * d;
                }
            }
            Some((codes, scales))
        })
        .flatten();
        let mut t0 = task.keys.start;
        while t0 < task.keys.end {
            let t1 = (t0 + bn).min(task.keys.end);
            // Tokens of the tile that some row sees (a contiguous range).
            let lo = (0..n_rows)
                .map(|ri| range(ri).start.max(t0))
                .min()
                .unwrap_or(t1);
            let hi = (0..n_rows)
                .map(|ri| range(ri).end.min(t1))
                .max()
                .unwrap_or(t0);
            // Scores: each K row dequantized once for all rows and heads of its group.
            for (hh, head) in task.heads.clone().enumerate() {
                if let Some(f) = fused_k {
                    let vis = range(0).start.max(t0)..range(0).end.min(t1);
                    for j in (0..g).step_by(4) {
                        let q = &p.q[(task.rows.start * p.h_q + head * g + j) * d..][..4 * d];
                        let out = &mut scores[(hh * g + j) * bn + (vis.start - t0)..];
                        // Quantized queries over an integer K format: integer products.
                        #[cfg(target_arch = "x86_64")]
                        if let Some(Some(iq)) = int_queries.get(hh * g.div_ceil(4) + j / 4) {
                            // SAFETY: as below; `int_query` only gives rows of d ≤ MAX_INT_DIM
                            // (a multiple of 32), and f is q4_0 or q8_0.
                            unsafe {
                                avx2::fused_int_scores(
                                    f,
                                    iq,
                                    &p.k,
                                    &p.v,
                                    head,
                                    vis.clone(),
                                    out,
                                    bn,
                                )
                            };
                            continue;
                        }
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
                #[cfg(target_arch = "aarch64")]
                if let Some((codes, scales)) = &neon_int {
                    let nh = task.heads.len();
                    for (ri, _) in task.rows.clone().enumerate() {
                        let lane0 = ri * width + hh * g;
                        let vis = range(ri).start.max(t0)..range(ri).end.min(t1);
                        if vis.is_empty() {
                            continue;
                        }
                        let at = (ri * nh + hh) * g;
                        let out = &mut scores[lane0 * bn + (vis.start - t0)..];
                        // SAFETY: NEON and dot products were detected; K is q4_0 or q8_0 with
                        // d % 32 == 0; the codes and scales of these g rows lie at `at`; `vis`
                        // lies in the cache and `out` holds g lanes of `bn` scores from it.
                        unsafe {
                            neon::int_scores(
                                p.k.format == KvFormat::Q4_0,
                                &codes[at * d..][..g * d],
                                &scales[at * d / 32..][..g * d / 32],
                                g,
                                &p.k,
                                head,
                                vis.clone(),
                                out,
                                bn,
                            )
                        };
                        if let Some(c) = softcap {
                            for j in 0..g {
                                for s in &mut out[j * bn..][..vis.len()] {
                                    *s = c * (*s / c).tanh();
                                }
                            }
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
                    let vis = range(ri).start.max(t0)..range(ri).end.min(t1);
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
            // The mask, then the softmax bookkeeping, per lane over its visible keys of the
            // tile (one place for the tiled and the in-register scores).
            for (ri, saw) in saw.iter_mut().enumerate() {
                let vis = range(ri).start.max(t0)..range(ri).end.min(t1);
                if vis.is_empty() {
                    continue;
                }
                let bias = p
                    .mask
                    .map(|mk| &mk.values[(task.rows.start + ri) * mk.row_stride..][vis.clone()]);
                let live = bias.is_none_or(|b| b.iter().any(|&x| x != f32::NEG_INFINITY));
                *saw = saw.max(if live { SAW_LIVE } else { SAW_HIDDEN });
                for lane in ri * width..(ri + 1) * width {
                    let row = &mut scores[lane * bn..][vis.start - t0..vis.end - t0];
                    if let Some(b) = bias {
                        row.iter_mut().zip(b).for_each(|(s, b)| *s += b);
                    }
                    let tile_max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let m_new = m[lane].max(tile_max);
                    if m_new == f32::NEG_INFINITY && !row.iter().any(|s| s.is_nan()) {
                        // Every visible score so far is −Inf: weight 0 (the V rows are still
                        // read: 0 · NaN is NaN), and `finish` decides whether the row is the
                        // oracle's 0/0 (NaN) or, the mask hiding every key, the zero row.
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
                    let vis = range(0).start.max(t0)..range(0).end.min(t1);
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
                for ri in 0..n_rows {
                    let vis = range(ri).start.max(t0)..range(ri).end.min(t1);
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
        #[cfg(target_arch = "x86_64")]
        INT_QUERIES.with(|c| *c.borrow_mut() = int_queries);
        #[cfg(target_arch = "aarch64")]
        if let Some(buffers) = neon_int {
            NEON_QUERIES.with(|c| *c.borrow_mut() = buffers);
        }
    }
}

#[cfg(target_arch = "aarch64")]
thread_local! {
    /// Each worker's integer query codes and scales of its current task on NEON (kept, so
    /// tasks allocate nothing once a worker has seen its largest one).
    static NEON_QUERIES: std::cell::RefCell<(Vec<i8>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// The integer form of query rows that went through q8_0 (finite values, whole blocks of 32):
/// each block's largest magnitude is its scale times 127, so `scale = max |x| / 127` and
/// `code = round(x / scale)` give back the q8_0 codes exactly (the division's rounding moves
/// `x / scale` far less than half a unit); an all-zero block has scale 0.
fn int_codes(q: &[f32], codes: &mut [i8], scales: &mut [f32]) {
    for ((block, codes), scale) in q
        .chunks_exact(32)
        .zip(codes.chunks_exact_mut(32))
        .zip(scales.iter_mut())
    {
        let amax = block.iter().fold(0f32, |a, x| a.max(x.abs()));
        *scale = amax / 127.0;
        for (c, x) in codes.iter_mut().zip(block) {
            *c = if amax == 0.0 {
                0
            } else {
                (x / *scale).round() as i8
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Each worker's integer queries of its current task (kept, so tasks allocate nothing
    /// once a worker has seen its largest one).
    static INT_QUERIES: std::cell::RefCell<Vec<Option<avx2::IntQuery>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Merges the states of the `n_parts` slices of one (heads, rows) block (laid out one after
/// the other in `parts`) and writes `acc / l` into `out` (the sequence's output) and
/// `m + ln l` into `lse` (the sequence's LSE).
///
/// A slice that saw no visible key contributes nothing; if none saw a key the mask leaves
/// (none saw any key, or the mask hides every one), the row is zeros with LSE −Inf. When the
/// visible scores are all −Inf the row is NaN (the oracle's 0/0), and NaN anywhere in a
/// slice's sums carries through to the row.
fn finish(
    p: &Problem<'_>,
    task: &Task,
    parts: &[f32],
    n_parts: usize,
    out: &mut [f32],
    mut lse: Option<&mut [f32]>,
) {
    let d_v = p.v.dim;
    let width = task.heads.len() * p.group();
    let (lanes, n_rows) = (task.lanes(p.group()), task.rows.len());
    let first = task.heads.start * p.group();
    // Every slice of the block has the same lanes, so the same length.
    let part = |s: usize| partial_ref(&parts[s * task.part_len..][..task.part_len], lanes, n_rows);
    for (ri, i) in task.rows.clone().enumerate() {
        let saw = (0..n_parts).fold(SAW_NOTHING, |a, s| a.max(part(s).saw[ri]));
        for j in 0..width {
            let lane = ri * width + j;
            let at = i * p.h_q + first + j;
            let o = &mut out[at * d_v..][..d_v];
            o.fill(0.0);
            if saw != SAW_LIVE {
                // No visible key, or the mask hides every one.
                if let Some(lse) = lse.as_deref_mut() {
                    lse[at] = f32::NEG_INFINITY;
                }
                continue;
            }
            // Slices that saw a visible key (even one scored −Inf: its weight 0 times a NaN or
            // Inf in V is NaN, as in the oracle).
            let live = || {
                (0..n_parts)
                    .map(part)
                    .filter(|part| part.saw[ri] != SAW_NOTHING)
            };
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
            if let Some(lse) = lse.as_deref_mut() {
                lse[at] = m + l.ln();
            }
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
