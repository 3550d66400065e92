//! CPU benchmarks, each timed side by side with its peer in the same run, with the measured
//! memory-copy bandwidth as the ceiling. Used by `rotq bench` and by the criterion benches.
//!
//! Bandwidth is always *bytes read plus bytes written* per second (GB/s = 10⁹ B/s):
//! an in-place rotation of `N` bytes moves `2N`, a copy of `N` bytes moves `2N`, and attention
//! reads its K and V caches (`N`) and writes a negligible output. The ceiling is the copy of a
//! buffer as large as the one under test. Times are the median of several runs after a
//! warm-up, on buffers larger than the last-level cache.

use crate::Error;
use rotq_autotune::timing::{self, WallClock};
use rotq_cpu::{CacheCodec, CpuAttention, CpuRotation, DecodeRequest, Isa, KvCacheView};
use rotq_reference::{AttentionParams, KvFormat, Rotation, RotationPlan};
use rotq_testkit::data::Rows;
use serde::Serialize;
use std::convert::Infallible;

/// One line of `rotq bench --json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchRecord {
    /// The kernel under test.
    pub kernel: String,
    /// Its problem, in words.
    pub shape: String,
    /// Our throughput (GB/s, bytes read + written).
    pub ours_gbps: f64,
    /// The peer it is compared with.
    pub peer: String,
    /// The peer's throughput on the same data (GB/s).
    pub peer_gbps: f64,
    /// `ours_gbps / peer_gbps`.
    pub ratio: f64,
    /// Copy bandwidth over a buffer of the same size (GB/s); NaN (`null` in JSON) where the
    /// work is bound by arithmetic, not memory (prefill attention).
    pub ceiling_gbps: f64,
    /// The unit of `ours_gbps`, `peer_gbps` and `ceiling_gbps`: `GB/s` (bytes read + written)
    /// or `TFLOP/s` (prefill attention: 4 · d flops per visible (query, key) pair and head, the
    /// count FlashAttention's benchmarks use, for ours and the peer alike).
    pub unit: String,
}

/// A group of benchmarks, for `rotq bench --only`.
///
/// ```
/// use rotq_cli::bench::Section;
/// assert!(Section::Decode.wanted(None) && Section::Decode.wanted(Some(Section::Decode)));
/// assert!(!Section::Fwht.wanted(Some(Section::Prefill)));
/// assert!(Section::Fwht.on_cpu() && !Section::Prefill.on_cpu());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// Hadamard transforms (FWHT).
    Fwht,
    /// Fused rotate-quantize into the cache.
    Quantize,
    /// Decode attention.
    Decode,
    /// Prefill attention (GPU only).
    Prefill,
}

impl Section {
    /// Whether a run limited to `only` (None: every section) includes this one.
    pub fn wanted(self, only: Option<Section>) -> bool {
        only.is_none_or(|o| o == self)
    }

    /// Whether the CPU benchmarks have this section (prefill is GPU-only).
    pub fn on_cpu(self) -> bool {
        self != Section::Prefill
    }
}

/// How long to measure.
#[derive(Clone, Copy, Debug)]
pub struct BenchOptions {
    /// Bytes of f32 rows for the rotation and quantization benches.
    pub bytes: usize,
    /// Cached tokens for the decode bench.
    pub tokens: usize,
    /// Timed runs per measurement (the median is kept).
    pub runs: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            bytes: 64 << 20,
            tokens: 32 * 1024,
            runs: 7,
        }
    }
}

/// Median seconds of `runs` calls of `f`, after one warm-up call, on the wall clock.
pub fn median_secs(runs: usize, mut f: impl FnMut()) -> Result<f64, Error> {
    let ms = timing::median_ms(&mut WallClock::new(), 1, runs, |_| {
        f();
        Ok::<(), Infallible>(())
    })?;
    Ok(ms / 1e3)
}

/// Median seconds of `a` and of `b`, timed alternately (a, b, a, b, …) after a warm-up of
/// each, so that a change in the machine's load during the run affects both alike.
pub fn median_pair(
    runs: usize,
    mut a: impl FnMut(),
    mut b: impl FnMut(),
) -> Result<(f64, f64), Error> {
    let infallible = |f: &mut dyn FnMut()| {
        f();
        Ok::<(), Infallible>(())
    };
    let (ta, tb) = timing::paired(
        &mut WallClock::new(),
        runs,
        |_| infallible(&mut a),
        |_| infallible(&mut b),
    )?;
    Ok((ta / 1e3, tb / 1e3))
}

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// `len` uniform values in [−1, 1) (deterministic).
pub fn random(len: usize, seed: u64) -> Vec<f32> {
    Rows::uniform(1.0).f32s(len, seed)
}

/// `dst ← src` split over rayon's threads, the way the kernels use the machine.
pub fn parallel_copy(dst: &mut [u8], src: &[u8]) {
    use rayon::prelude::*;
    let chunk = (src.len() / rayon::current_num_threads().max(1)).max(1 << 16);
    dst.par_chunks_mut(chunk)
        .zip(src.par_chunks(chunk))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// Copy bandwidth (read + written) over `bytes` bytes, with the threads the kernels use.
pub fn copy_bandwidth(bytes: usize, runs: usize) -> Result<f64, Error> {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let secs = median_secs(runs, || parallel_copy(&mut dst, &src))?;
    std::hint::black_box(&dst);
    Ok(gbps(2 * bytes, secs))
}

/// The dense rotation engines use today (`Y = X Hᵀ`, a blocked f32 GEMM): our explicit-matrix
/// kernel given the `n × n` Hadamard matrix.
pub fn dense_rotation(rotation: &Rotation) -> Result<CpuRotation, Error> {
    Ok(CpuRotation::new(
        &Rotation::matrix(rotation.to_matrix())?,
        Isa::best(),
    ))
}

/// FWHT f32 over `bytes` of rows of `n`: ours vs the dense matmul and vs the portable FWHT.
pub fn fwht(n: usize, opts: &BenchOptions, ceiling: f64) -> Result<Vec<BenchRecord>, Error> {
    let len = opts.bytes / 4 / n * n;
    let rotation = Rotation::hadamard(n)?;
    let ours = CpuRotation::new(&rotation, Isa::best());
    let portable = CpuRotation::new(&rotation, Isa::Portable);
    let mut x = random(len, 1);
    let mut x2 = x.clone();
    let traffic = 2 * 4 * len;
    let (ours_s, portable_s) = median_pair(
        opts.runs,
        || ours.forward_rows(&mut x).expect("whole rows"),
        || portable.forward_rows(&mut x2).expect("whole rows"),
    )?;
    let dense = dense_rotation(&rotation)?;
    // The dense product costs n² per row: at large n it runs on fewer rows (alternating with
    // ours on all of them) and its time is scaled to the full count (its cost per row does
    // not depend on the row count).
    let rows = (len / n).min(((1usize << 29) / (n * n)).max(8));
    let (_, dense_part_s) = median_pair(
        opts.runs.min(5),
        || ours.forward_rows(&mut x).expect("whole rows"),
        || dense.forward_rows(&mut x2[..rows * n]).expect("whole rows"),
    )?;
    let dense_s = dense_part_s * (len / n) as f64 / rows as f64;
    let shape = format!("{} rows x {n} f32 ({} MiB)", len / n, (4 * len) >> 20);
    let ours_gbps = gbps(traffic, ours_s);
    Ok([
        ("dense n x n matmul", dense_s),
        ("portable FWHT", portable_s),
    ]
    .into_iter()
    .map(|(peer, s)| BenchRecord {
        kernel: format!("fwht_f32_n{n}"),
        shape: shape.clone(),
        ours_gbps,
        peer: peer.into(),
        peer_gbps: gbps(traffic, s),
        ratio: s / ours_s,
        ceiling_gbps: ceiling,
        unit: "GB/s".into(),
    })
    .collect())
}

/// Fused rotate-quantize (f32 rows of 128 → `format`) vs rotating, writing f32, then
/// quantizing in a second pass.
pub fn rotate_quantize(
    format: KvFormat,
    opts: &BenchOptions,
    ceiling: f64,
) -> Result<BenchRecord, Error> {
    let n = 128;
    let len = opts.bytes / 4 / n * n;
    let rows = len / n;
    let rotation = Rotation::hadamard(n)?;
    let fused = CacheCodec::new(format, n, Some(&rotation), Isa::best())?;
    let plain = CacheCodec::new(format, n, None, Isa::best())?;
    let rotate = CpuRotation::new(&rotation, Isa::best());
    let x = random(len, 2);
    let mut tmp = vec![0f32; len];
    let mut cache = vec![0u8; rows * fused.row_bytes()];
    let traffic = 4 * len + cache.len();
    let mut cache2 = cache.clone();
    let (fused_s, two_pass_s) = median_pair(
        opts.runs,
        || fused.quantize(&x, &mut cache, 0).expect("whole rows"),
        || {
            tmp.copy_from_slice(&x);
            rotate.forward_rows(&mut tmp).expect("whole rows");
            plain.quantize(&tmp, &mut cache2, 0).expect("whole rows");
        },
    )?;
    Ok(BenchRecord {
        kernel: format!("rotate_quantize_{format}"),
        shape: format!("{rows} rows x {n} f32 -> {format}"),
        ours_gbps: gbps(traffic, fused_s),
        peer: "rotate, then quantize (two passes)".into(),
        peer_gbps: gbps(traffic, two_pass_s),
        ratio: two_pass_s / fused_s,
        ceiling_gbps: ceiling,
        unit: "GB/s".into(),
    })
}

/// Decode attention, one sequence of `opts.tokens`, 8 KV heads × 128, 32 query heads, K and V
/// in `format` with Hadamard-rotated K, vs the same kernel on an f16 cache.
pub fn decode(format: KvFormat, opts: &BenchOptions) -> Result<BenchRecord, Error> {
    let record = decode_vs(format, KvFormat::F16, 1, opts.tokens, opts)?;
    Ok(BenchRecord {
        kernel: format!("decode_attention_{format}"),
        ..record
    })
}

/// Rotate-quantize into `format` vs into `peer` (f32 rows of 128, Hadamard-rotated, the same
/// rows and the same fused kernel's plumbing): what choosing one format over the other costs
/// an append. GB/s over the f32 read and the format's bytes written.
pub fn rotate_quantize_vs(
    format: KvFormat,
    peer: KvFormat,
    opts: &BenchOptions,
    ceiling: f64,
) -> Result<BenchRecord, Error> {
    let n = 128;
    let len = opts.bytes / 4 / n * n;
    let rows = len / n;
    let rotation = Rotation::hadamard(n)?;
    let ours = CacheCodec::new(format, n, Some(&rotation), Isa::best())?;
    let theirs = CacheCodec::new(peer, n, Some(&rotation), Isa::best())?;
    let x = random(len, 2);
    let mut a = vec![0u8; rows * ours.row_bytes()];
    let mut b = vec![0u8; rows * theirs.row_bytes()];
    let (ours_s, peer_s) = median_pair(
        opts.runs,
        || ours.quantize(&x, &mut a, 0).expect("whole rows"),
        || theirs.quantize(&x, &mut b, 0).expect("whole rows"),
    )?;
    Ok(BenchRecord {
        kernel: format!("rotate_quantize_{format}"),
        shape: format!("{rows} rows x {n} f32 -> {format}"),
        ours_gbps: gbps(4 * len + a.len(), ours_s),
        peer: format!("rotate-quantize into {peer}"),
        peer_gbps: gbps(4 * len + b.len(), peer_s),
        ratio: peer_s / ours_s,
        ceiling_gbps: ceiling,
        unit: "GB/s".into(),
    })
}

/// Decode attention over `batch` sequences of `tokens` (8 KV heads × 128, 32 query heads,
/// Hadamard-rotated K) with K and V in `format`, vs the same kernel with both in `peer`; the
/// ratio is of time per step (tokens per second), GB/s over each one's cache bytes, the
/// ceiling the copy bandwidth of `format`'s bytes.
pub fn decode_vs(
    format: KvFormat,
    peer: KvFormat,
    batch: usize,
    tokens: usize,
    opts: &BenchOptions,
) -> Result<BenchRecord, Error> {
    let (h_kv, h_q, d) = (8, 32, 128);
    let rotation = Rotation::hadamard(d)?;
    let plan = RotationPlan {
        qk: Some(rotation.clone()),
        v: None,
    };
    let kernel = CpuAttention::new(&plan, Isa::best());
    let params = AttentionParams {
        causal: true,
        pos_offset: tokens - 1,
        ..Default::default()
    };
    let q = random(batch * h_q * d, 3);
    let rows = random(tokens * h_kv * d, 4);
    // One sequence's rows, quantized once and copied into every sequence of the batch.
    let caches = |f: KvFormat| -> Result<Vec<KvBytes>, Error> {
        let kc = CacheCodec::new(f, d, Some(&rotation), Isa::best())?;
        let vc = CacheCodec::new(f, d, None, Isa::best())?;
        let mut kb = vec![0u8; tokens * h_kv * kc.row_bytes()];
        let mut vb = vec![0u8; tokens * h_kv * vc.row_bytes()];
        kc.quantize(&rows, &mut kb, 0)?;
        vc.quantize(&rows, &mut vb, 0)?;
        Ok(vec![(kb, vb); batch])
    };
    let (ours, theirs) = (caches(format)?, caches(peer)?);
    let requests = |f: KvFormat, c| batch_requests(f, c, &q, h_q, (tokens, h_kv, d), &params);
    let (ro, rt) = (requests(format, &ours)?, requests(peer, &theirs)?);
    let step = |r: &[DecodeRequest<'_>]| {
        std::hint::black_box(kernel.decode_batch(r).expect("valid shapes"));
    };
    let (ours_s, peer_s) = median_pair(opts.runs, || step(&ro), || step(&rt))?;
    let bytes = |c: &[KvBytes]| c.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
    let ceiling = copy_bandwidth(bytes(&ours), opts.runs)?;
    Ok(BenchRecord {
        kernel: format!("decode_attention_{format}_vs_{peer}"),
        shape: format!("{batch} x {tokens} tokens, {h_kv} KV heads x {d}, {h_q} query heads"),
        ours_gbps: gbps(bytes(&ours), ours_s),
        peer: format!("same kernel, {peer} cache"),
        peer_gbps: gbps(bytes(&theirs), peer_s),
        ratio: peer_s / ours_s,
        ceiling_gbps: ceiling,
        unit: "GB/s".into(),
    })
}

/// One sequence's K and V cache bytes.
type KvBytes = (Vec<u8>, Vec<u8>);

/// One decode request per sequence of `caches` (K, V bytes of `shape` = tokens, KV heads, d),
/// sequence `i` taking rows `i · h_q ..` of `q`.
fn batch_requests<'a>(
    format: KvFormat,
    caches: &'a [KvBytes],
    q: &'a [f32],
    h_q: usize,
    (tokens, h_kv, d): (usize, usize, usize),
    params: &AttentionParams,
) -> Result<Vec<DecodeRequest<'a>>, Error> {
    caches
        .iter()
        .zip(q.chunks_exact(h_q * d))
        .map(|((kb, vb), q)| {
            Ok(DecodeRequest {
                q,
                h_q,
                k: KvCacheView::new(format, kb, tokens, h_kv, d)?,
                v: KvCacheView::new(format, vb, tokens, h_kv, d)?,
                params: params.clone(),
            })
        })
        .collect()
}

/// Every CPU benchmark of `only`'s section (None: all of them), in order.
pub fn run_all(
    opts: &BenchOptions,
    only: Option<Section>,
    mut progress: impl FnMut(&str),
) -> Result<Vec<BenchRecord>, Error> {
    progress("copy bandwidth");
    let ceiling = copy_bandwidth(opts.bytes, opts.runs)?;
    let mut out = Vec::new();
    if Section::Fwht.wanted(only) {
        for n in [128, 4096] {
            progress(&format!("fwht n = {n}"));
            out.extend(fwht(n, opts, ceiling)?);
        }
    }
    if Section::Quantize.wanted(only) {
        for f in [KvFormat::Q4_0, KvFormat::Q8_0] {
            progress(&format!("rotate-quantize {f}"));
            out.push(rotate_quantize(f, opts, ceiling)?);
        }
        progress("rotate-quantize tq4 vs q4_0");
        out.push(rotate_quantize_vs(
            KvFormat::Tq4,
            KvFormat::Q4_0,
            opts,
            ceiling,
        )?);
    }
    if Section::Decode.wanted(only) {
        for f in [KvFormat::Q4_0, KvFormat::Q8_0] {
            progress(&format!("decode attention {f}"));
            out.push(decode(f, opts)?);
        }
        // The TurboQuant issue's shapes: one long sequence, and a batch of 16 × (tokens / 8).
        for (batch, tokens) in [(1, opts.tokens), (16, (opts.tokens / 8).max(1))] {
            progress(&format!("decode attention tq4 vs q4_0, {batch} x {tokens}"));
            out.push(decode_vs(
                KvFormat::Tq4,
                KvFormat::Q4_0,
                batch,
                tokens,
                opts,
            )?);
        }
    }
    Ok(out)
}
