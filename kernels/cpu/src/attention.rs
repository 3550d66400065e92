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

/// One layer's K or V cache: row `(token, head)` of `dim` values in `format` at byte
/// `(token · n_heads + head) · row_bytes`.
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
        if dim > MAX_HEAD_DIM {
            return Err(Error::UnsupportedDim {
                n: dim,
                what: "KV cache head",
                hint: "head dimensions up to 65536 are supported",
            });
        }
        let row_bytes = format.row_bytes(dim)?;
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
        })
    }

    /// Cached tokens.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    fn row(&self, token: usize, head: usize) -> &'a [u8] {
        let at = (token * self.n_heads + head) * self.row_bytes;
        &self.bytes[at..at + self.row_bytes]
    }

    /// Asks the CPU to start loading row `(token, head)` (if it exists) into cache.
    #[inline(always)]
    fn prefetch(&self, token: usize, head: usize) {
        if token < self.n_tokens {
            let row = self.row(token, head);
            for line in (0..row.len()).step_by(64) {
                prefetch(&row[line]);
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
        }
    }

    /// The same kernels with another tuning.
    pub fn with_config(mut self, config: AttentionConfig) -> Self {
        // Clamped so that a stray value cannot ask for absurd buffers or task counts.
        self.config = AttentionConfig {
            block_n: config.block_n.clamp(1, 4096),
            block_m: config.block_m.clamp(1, 4096),
            kv_splits: config.kv_splits.min(4096),
            heads_per_task: config.heads_per_task,
        };
        self
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
        Ok(self
            .solve(&[problem])
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
        Ok(self.solve(&problems))
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
        if h_kv == 0 || h_q == 0 || h_q % h_kv != 0 {
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
        // The kernels compute in f32: the scale and soft-cap must be normal f32 numbers.
        let scale = params.scale.unwrap_or(1.0 / (d as f64).sqrt());
        for (name, v) in [("scale", Some(scale)), ("softcap", params.softcap)] {
            if let Some(v) = v {
                let f = v as f32;
                if !(f.is_finite() && (f.is_normal() || (name == "scale" && v == 0.0))) {
                    return Err(Error::InvalidParameter {
                        name,
                        reason: format!(
                            "{v} is not a normal f32 number, which the CPU kernels need"
                        ),
                    });
                }
            }
        }
        let scale = scale as f32;
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
    fn solve(&self, problems: &[Problem<'_>]) -> Vec<Vec<f32>> {
        let cfg = self.config;
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
            .map(|t| self.partial(&problems[t.problem], t))
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
    fn partial(&self, p: &Problem<'_>, task: &Task) -> Partial {
        match self.isa {
            // SAFETY: Isa::Avx2 is only used when the CPU has it.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { self.partial_avx2(p, task) },
            _ => self.partial_impl(p, task),
        }
    }

    /// [`Self::partial_impl`] compiled with AVX2 enabled, so the SIMD helpers inline into it.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn partial_avx2(&self, p: &Problem<'_>, task: &Task) -> Partial {
        self.partial_impl(p, task)
    }

    #[inline(always)]
    fn partial_impl(&self, p: &Problem<'_>, task: &Task) -> Partial {
        let (d, d_v, g) = (p.k.dim, p.v.dim, p.group());
        let n_rows = task.rows.len();
        let width = task.heads.len() * g; // query heads of the task
        let lanes = n_rows * width; // lane = row · width + (head − first head) · g + j
        let bn = self.config.block_n;
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
        let mut t0 = task.keys.start;
        while t0 < task.keys.end {
            let t1 = (t0 + bn).min(task.keys.end);
            // Tokens of the tile that some row sees (a contiguous range).
            let lo = ranges.iter().map(|r| r.start.max(t0)).min().unwrap_or(t1);
            let hi = ranges.iter().map(|r| r.end.min(t1)).max().unwrap_or(t0);
            // Scores: each K row dequantized once for all rows and heads of its group.
            for (hh, head) in task.heads.clone().enumerate() {
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
mod avx2 {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)))
    }

    /// `out[j · stride + t] = q_j · k_t`: blocks of four query rows × two keys keep eight
    /// accumulators in registers (each key load serves four rows, each query load two keys),
    /// reduced together at the end.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `q` and `keys` hold whole rows of `d`, and `out` holds
    /// `(q rows − 1) · stride + keys rows` values.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn score_tile(
        q: &[f32],
        keys: &[f32],
        d: usize,
        out: &mut [f32],
        stride: usize,
    ) {
        let (rows, n_t) = (q.len() / d, keys.len() / d);
        let d8 = d / 8 * 8;
        let (pq, pk) = (q.as_ptr(), keys.as_ptr());
        // SAFETY (whole body): rows j < rows, keys t < n_t and columns i < d, so every access
        // is inside `q`, `keys` or `out` (of the documented sizes).
        let scalar_tail =
            |j: usize, t: usize| -> f32 { (d8..d).map(|i| q[j * d + i] * keys[t * d + i]).sum() };
        let mut j = 0;
        while j + 4 <= rows {
            let mut t = 0;
            while t + 2 <= n_t {
                let mut a = [_mm256_setzero_ps(); 8];
                for i in (0..d8).step_by(8) {
                    let k0 = _mm256_loadu_ps(pk.add(t * d + i));
                    let k1 = _mm256_loadu_ps(pk.add((t + 1) * d + i));
                    for r in 0..4 {
                        let qv = _mm256_loadu_ps(pq.add((j + r) * d + i));
                        a[2 * r] = _mm256_fmadd_ps(qv, k0, a[2 * r]);
                        a[2 * r + 1] = _mm256_fmadd_ps(qv, k1, a[2 * r + 1]);
                    }
                }
                // Horizontal sums of the eight accumulators at once: lane r of `sums` is a[r].
                let h01 = _mm256_hadd_ps(a[0], a[1]);
                let h23 = _mm256_hadd_ps(a[2], a[3]);
                let h45 = _mm256_hadd_ps(a[4], a[5]);
                let h67 = _mm256_hadd_ps(a[6], a[7]);
                let h0123 = _mm256_hadd_ps(h01, h23);
                let h4567 = _mm256_hadd_ps(h45, h67);
                let sums = _mm256_add_ps(
                    _mm256_permute2f128_ps::<0x20>(h0123, h4567),
                    _mm256_permute2f128_ps::<0x31>(h0123, h4567),
                );
                let mut lanes = [0.0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), sums);
                for r in 0..4 {
                    out[(j + r) * stride + t] = lanes[2 * r] + scalar_tail(j + r, t);
                    out[(j + r) * stride + t + 1] = lanes[2 * r + 1] + scalar_tail(j + r, t + 1);
                }
                t += 2;
            }
            if t < n_t {
                for r in 0..4 {
                    out[(j + r) * stride + t] = dot(&q[(j + r) * d..][..d], &keys[t * d..][..d]);
                }
            }
            j += 4;
        }
        for r in j..rows {
            for t in 0..n_t {
                out[r * stride + t] = dot(&q[r * d..][..d], &keys[t * d..][..d]);
            }
        }
    }

    /// `Σ a·b` with one 8-lane accumulator.
    #[inline(always)]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let d8 = a.len() / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        for i in (0..d8).step_by(8) {
            // SAFETY: i + 8 <= d8 <= a.len() == b.len().
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                acc,
            );
        }
        hsum(acc) + (d8..a.len()).map(|i| a[i] * b[i]).sum::<f32>()
    }

    /// `exp(x)` for 8 lanes (Cephes' single-precision polynomial, ~1 ulp): 0 below the
    /// smallest normal result (and for −Inf), +Inf above the largest, NaN kept.
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        let hi = _mm256_set1_ps(88.376_26);
        let lo = _mm256_set1_ps(-87.336_55);
        let xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
        let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693_359_4), xc);
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(k),
            _mm256_set1_epi32(127),
        ));
        let v = _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
        let v = _mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo));
        let v = _mm256_blendv_ps(
            v,
            _mm256_set1_ps(f32::INFINITY),
            _mm256_cmp_ps::<_CMP_GT_OQ>(x, hi),
        );
        _mm256_blendv_ps(v, x, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x))
    }

    /// `row[i] ← exp(row[i] − m)`, returning the sum.
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn exp_shifted(row: &mut [f32], m: f32) -> f32 {
        let n8 = row.len() / 8 * 8;
        let mv = _mm256_set1_ps(m);
        let mut sum = _mm256_setzero_ps();
        let p = row.as_mut_ptr();
        // SAFETY: i + 8 <= n8 <= row.len().
        for i in (0..n8).step_by(8) {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv));
            _mm256_storeu_ps(p.add(i), e);
            sum = _mm256_add_ps(sum, e);
        }
        let mut total = hsum(sum);
        for v in &mut row[n8..] {
            *v = (*v - m).exp();
            total += *v;
        }
        total
    }

    /// `acc += Σ_t w[t] · rows[t]`, 64 columns at a time held in registers across the rows.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `rows.len() == w.len() * acc.len()`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn weighted_sum(acc: &mut [f32], w: &[f32], rows: &[f32]) {
        let d = acc.len();
        let pa = acc.as_mut_ptr();
        let pr = rows.as_ptr();
        let mut c = 0;
        // SAFETY (all loops): column c + 8·j + 8 <= d and row t < w.len(), so every access is
        // inside `acc` or `rows`.
        while c + 64 <= d {
            let mut r = [_mm256_setzero_ps(); 8];
            for (j, rj) in r.iter_mut().enumerate() {
                *rj = _mm256_loadu_ps(pa.add(c + 8 * j));
            }
            for (t, wt) in w.iter().enumerate() {
                let wv = _mm256_set1_ps(*wt);
                let row = pr.add(t * d + c);
                for (j, rj) in r.iter_mut().enumerate() {
                    *rj = _mm256_fmadd_ps(wv, _mm256_loadu_ps(row.add(8 * j)), *rj);
                }
            }
            for (j, rj) in r.iter().enumerate() {
                _mm256_storeu_ps(pa.add(c + 8 * j), *rj);
            }
            c += 64;
        }
        while c + 8 <= d {
            let mut r = _mm256_loadu_ps(pa.add(c));
            for (t, wt) in w.iter().enumerate() {
                r = _mm256_fmadd_ps(_mm256_set1_ps(*wt), _mm256_loadu_ps(pr.add(t * d + c)), r);
            }
            _mm256_storeu_ps(pa.add(c), r);
            c += 8;
        }
        for col in c..d {
            for (t, wt) in w.iter().enumerate() {
                acc[col] += wt * rows[t * d + col];
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    /// Dot products of the `out.len()` rows of `q` with `k`, two accumulators per row.
    ///
    /// # Safety
    /// NEON must be available; `q.len() == out.len() * k.len()`.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn dots(q: &[f32], k: &[f32], out: &mut [f32]) {
        let d = k.len();
        let d4 = d / 4 * 4;
        let pk = k.as_ptr();
        for (r, o) in out.iter_mut().enumerate() {
            let pq = q.as_ptr().add(r * d);
            let (mut a0, mut a1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
            let mut i = 0;
            // SAFETY: every load reads 4 values below d4 <= d in `q`'s row r or in `k`.
            while i + 8 <= d4 {
                a0 = vfmaq_f32(a0, vld1q_f32(pq.add(i)), vld1q_f32(pk.add(i)));
                a1 = vfmaq_f32(a1, vld1q_f32(pq.add(i + 4)), vld1q_f32(pk.add(i + 4)));
                i += 8;
            }
            if i < d4 {
                a0 = vfmaq_f32(a0, vld1q_f32(pq.add(i)), vld1q_f32(pk.add(i)));
            }
            let mut total = vaddvq_f32(vaddq_f32(a0, a1));
            for j in d4..d {
                total += q[r * d + j] * k[j];
            }
            *o = total;
        }
    }

    /// `exp(x)` for 4 lanes (the same polynomial and special cases as the AVX2 path).
    #[inline(always)]
    unsafe fn exp4(x: float32x4_t) -> float32x4_t {
        let hi = vdupq_n_f32(88.376_26);
        let lo = vdupq_n_f32(-87.336_55);
        let xc = vminq_f32(vmaxq_f32(x, lo), hi);
        let k = vrndnq_f32(vmulq_n_f32(xc, std::f32::consts::LOG2_E));
        let r = vfmsq_f32(xc, k, vdupq_n_f32(0.693_359_4));
        let r = vfmsq_f32(r, k, vdupq_n_f32(-2.121_944_4e-4));
        let mut p = vdupq_n_f32(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = vfmaq_f32(vdupq_n_f32(c), p, r);
        }
        let y = vaddq_f32(vfmaq_f32(r, p, vmulq_f32(r, r)), vdupq_n_f32(1.0));
        let pow2 = vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(k), vdupq_n_s32(127)));
        let v = vmulq_f32(y, vreinterpretq_f32_s32(pow2));
        let v = vbslq_f32(vcltq_f32(x, lo), vdupq_n_f32(0.0), v);
        let v = vbslq_f32(vcgtq_f32(x, hi), vdupq_n_f32(f32::INFINITY), v);
        // NaN lanes compare unequal to themselves: keep them.
        vbslq_f32(vceqq_f32(x, x), v, x)
    }

    /// `row[i] ← exp(row[i] − m)`, returning the sum.
    ///
    /// # Safety
    /// NEON must be available.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn exp_shifted(row: &mut [f32], m: f32) -> f32 {
        let n4 = row.len() / 4 * 4;
        let mv = vdupq_n_f32(m);
        let mut sum = vdupq_n_f32(0.0);
        let p = row.as_mut_ptr();
        // SAFETY: i + 4 <= n4 <= row.len().
        for i in (0..n4).step_by(4) {
            let e = exp4(vsubq_f32(vld1q_f32(p.add(i)), mv));
            vst1q_f32(p.add(i), e);
            sum = vaddq_f32(sum, e);
        }
        let mut total = vaddvq_f32(sum);
        for v in &mut row[n4..] {
            *v = (*v - m).exp();
            total += *v;
        }
        total
    }

    /// `acc += Σ_t w[t] · rows[t]`, 32 columns at a time held in registers across the rows.
    ///
    /// # Safety
    /// NEON must be available; `rows.len() == w.len() * acc.len()`.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn weighted_sum(acc: &mut [f32], w: &[f32], rows: &[f32]) {
        let d = acc.len();
        let pa = acc.as_mut_ptr();
        let pr = rows.as_ptr();
        let mut c = 0;
        // SAFETY (all loops): column c + 4·j + 4 <= d and row t < w.len().
        while c + 32 <= d {
            let mut r = [vdupq_n_f32(0.0); 8];
            for (j, rj) in r.iter_mut().enumerate() {
                *rj = vld1q_f32(pa.add(c + 4 * j));
            }
            for (t, wt) in w.iter().enumerate() {
                let row = pr.add(t * d + c);
                for (j, rj) in r.iter_mut().enumerate() {
                    *rj = vfmaq_n_f32(*rj, vld1q_f32(row.add(4 * j)), *wt);
                }
            }
            for (j, rj) in r.iter().enumerate() {
                vst1q_f32(pa.add(c + 4 * j), *rj);
            }
            c += 32;
        }
        while c + 4 <= d {
            let mut r = vld1q_f32(pa.add(c));
            for (t, wt) in w.iter().enumerate() {
                r = vfmaq_n_f32(r, vld1q_f32(pr.add(t * d + c)), *wt);
            }
            vst1q_f32(pa.add(c), r);
            c += 4;
        }
        for col in c..d {
            for (t, wt) in w.iter().enumerate() {
                acc[col] += wt * rows[t * d + col];
            }
        }
    }
}
