//! GPU benchmarks: ours, PyTorch's dense `x @ H` (the peer, run by `scripts/torch_peer.py` in
//! the same process tree, same shapes) and the device-to-device copy bandwidth (the ceiling),
//! all in one run. Timed with CUDA events: warm-up, then the median of many runs, rotating
//! between two input buffers.

use crate::bench::{random, BenchRecord};
use crate::Error;
use half::{bf16, f16};
use rotq_cpu::Element;
use rotq_cuda::{CacheTarget, CudaCodec, CudaRotation, Device, GpuElement, RowConfig};
use rotq_reference::{KvFormat, Rotation};
use std::collections::HashMap;
use std::process::Command;

const TORCH_PEER: &str = include_str!("../scripts/torch_peer.py");

/// Sizes of a GPU benchmark run.
#[derive(Clone, Copy, Debug)]
pub struct CudaBenchOptions {
    /// Bytes of f16/bf16 rows per buffer.
    pub bytes: usize,
    /// Timed runs per measurement.
    pub runs: usize,
}

impl Default for CudaBenchOptions {
    fn default() -> Self {
        Self {
            bytes: 256 << 20,
            runs: 20,
        }
    }
}

fn gbps(bytes: usize, ms: f64) -> f64 {
    bytes as f64 / (ms * 1e-3) / 1e9
}

/// The torch peers' milliseconds per case id; empty (with a note) when torch can't run.
fn torch_peer(
    ordinal: usize,
    cases: &[serde_json::Value],
    opts: &CudaBenchOptions,
    progress: &mut impl FnMut(&str),
) -> HashMap<String, f64> {
    let spec = serde_json::json!({
        "device": ordinal,
        "bytes": opts.bytes,
        "runs": opts.runs,
        "cases": cases,
    });
    let out = Command::new("python3")
        .arg("-c")
        .arg(TORCH_PEER)
        .arg(spec.to_string())
        .output();
    let mut times = HashMap::new();
    match out {
        Ok(o) => {
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                let Some(id) = v["id"].as_str() else {
                    continue;
                };
                match v["ms"].as_f64() {
                    Some(ms) => {
                        if let Some(b) = v["backend"].as_str() {
                            progress(&format!("torch peer {id}: {ms:.3} ms ({b} backend)"));
                        }
                        times.insert(id.to_string(), ms);
                    }
                    None => progress(&format!("torch peer {id}: {}", v["error"])),
                }
            }
            if !o.status.success() {
                progress(&format!(
                    "torch peer failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                        .lines()
                        .last()
                        .unwrap_or("")
                ));
            }
        }
        Err(e) => progress(&format!("torch peer not run (python3: {e})")),
    }
    times
}

/// `len` random values (see [`random`]) stored as `T`, on the device: narrowed by the same
/// conversion the CPU kernels use.
fn rows_of<T: GpuElement + Element + Default>(
    dev: &Device,
    len: usize,
    seed: u64,
) -> Result<cudarc::driver::CudaSlice<T>, Error> {
    let mut v = vec![T::default(); len];
    T::narrow(&random(len, seed), &mut v);
    dev.stream().clone_htod(&v).map_err(cuda_err)
}

fn cuda_err(e: cudarc::driver::DriverError) -> Error {
    Error::Cuda(rotq_cuda::CudaError::Driver {
        what: "benchmark buffers".into(),
        source: e,
    })
}

/// GB/s of the default configuration and of the best one of the search space (with it).
struct Sweep {
    default: f64,
    best: f64,
    best_config: RowConfig,
}

/// Times `run(config, i)` for the default configuration `first` and every one of the search space;
/// `bytes` moved per call. Configurations a shape can't use are skipped.
fn sweep(
    dev: &Device,
    opts: &CudaBenchOptions,
    bytes: usize,
    first: RowConfig,
    mut run: impl FnMut(RowConfig, usize) -> rotq_cuda::Result<()>,
) -> Result<Sweep, Error> {
    let default = gbps(
        bytes,
        rotq_cuda::median_ms(dev, 3, opts.runs, |i| run(first, i))?,
    );
    let mut best = (default, first);
    for cfg in RowConfig::search_space() {
        if let Ok(ms) = rotq_cuda::median_ms(dev, 2, opts.runs.div_ceil(2), |i| run(cfg, i)) {
            if gbps(bytes, ms) > best.0 {
                best = (gbps(bytes, ms), cfg);
            }
        }
    }
    Ok(Sweep {
        default,
        best: best.0,
        best_config: best.1,
    })
}

/// FWHT over rows of `n` of type `T` (GB/s read + written).
fn fwht<T: GpuElement + Element + Default>(
    dev: &Device,
    n: usize,
    opts: &CudaBenchOptions,
) -> Result<Sweep, Error> {
    let len = opts.bytes / 2 / n * n;
    let mut bufs = [rows_of::<T>(dev, len, 1)?, rows_of::<T>(dev, len, 2)?];
    let rot = CudaRotation::new(dev, &Rotation::hadamard(n)?)?;
    sweep(dev, opts, 2 * 2 * len, RowConfig::default(), |cfg, i| {
        rot.clone().with_config(cfg).forward(dev, &mut bufs[i % 2])
    })
}

/// Rotate-quantize f16 rows of `n` into `format`: GB/s counting input read + blocks written.
fn rotate_quantize(
    dev: &Device,
    format: KvFormat,
    n: usize,
    opts: &CudaBenchOptions,
) -> Result<Sweep, Error> {
    let len = opts.bytes / 2 / n * n;
    let rows = len / n;
    let bufs = [rows_of::<f16>(dev, len, 3)?, rows_of::<f16>(dev, len, 4)?];
    let codec = CudaCodec::new(dev, format, n, Some(&Rotation::hadamard(n)?))?;
    let mut cache = dev
        .stream()
        .alloc_zeros::<u8>(rows * codec.row_bytes())
        .map_err(cuda_err)?;
    sweep(
        dev,
        opts,
        2 * len + rows * codec.row_bytes(),
        RowConfig::codec_default(),
        |cfg, i| {
            codec.clone().with_config(cfg).quantize(
                dev,
                &bufs[i % 2],
                &mut cache,
                CacheTarget::contiguous(1, 0),
            )
        },
    )
}

fn record(
    kernel: String,
    shape: String,
    ours: f64,
    peer: &str,
    peer_gbps: f64,
    ceiling: f64,
) -> BenchRecord {
    BenchRecord {
        kernel,
        shape,
        ours_gbps: ours,
        peer: peer.into(),
        peer_gbps,
        ratio: ours / peer_gbps,
        ceiling_gbps: ceiling,
        unit: "GB/s".into(),
    }
}

/// Every GPU benchmark on `device` (`cuda:N`), in order.
pub fn run_all(
    device: &str,
    opts: &CudaBenchOptions,
    mut progress: impl FnMut(&str),
) -> Result<Vec<BenchRecord>, Error> {
    let dev = Device::open(device)?;
    let info = dev.info();
    progress(&format!(
        "{} ({}, sm_{}{}, driver {})",
        info.id,
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.driver_version
    ));
    progress("copy bandwidth");
    let ceiling = rotq_cuda::copy_bandwidth(&dev, opts.bytes, opts.runs)?;
    let sizes = [128usize, 4096, 32768];
    let cases: Vec<(&str, usize)> = ["f16", "bf16"]
        .into_iter()
        .flat_map(|d| sizes.iter().map(move |&n| (d, n)))
        .collect();
    let decode = DecodeShape::target(opts);
    let mut peer_cases: Vec<serde_json::Value> = cases
        .iter()
        .map(|(d, n)| serde_json::json!({"id": format!("{d}/{n}"), "kind": "rotate", "dtype": d, "n": n}))
        .collect();
    peer_cases.push(serde_json::json!({
        "id": "sdpa", "kind": "sdpa", "batch": decode.batch, "h_q": decode.h_q,
        "h_kv": decode.h_kv, "n": decode.n, "d": decode.d,
    }));
    let prefill = PrefillShape::target(opts);
    peer_cases.push(serde_json::json!({
        "id": "sdpa_prefill", "kind": "sdpa_prefill", "h_q": prefill.h_q,
        "h_kv": prefill.h_kv, "n": prefill.n, "d": prefill.d,
    }));
    progress("torch x @ H, SDPA decode and prefill (python3 scripts/torch_peer.py)");
    let ordinal: usize = info.id.trim_start_matches("cuda:").parse().unwrap_or(0);
    let torch = torch_peer(ordinal, &peer_cases, opts, &mut progress);
    let mut out = Vec::new();
    let peer = "torch x @ H (dense)";
    for &(dtype, n) in &cases {
        progress(&format!(
            "FWHT {dtype} n={n} (default, then the search space)"
        ));
        let s = match dtype {
            "f16" => fwht::<f16>(&dev, n, opts)?,
            _ => fwht::<bf16>(&dev, n, opts)?,
        };
        let len = opts.bytes / 2 / n * n;
        let torch_gbps = torch
            .get(&format!("{dtype}/{n}"))
            .map_or(f64::NAN, |&ms| gbps(2 * 2 * len, ms));
        let shape = format!("{} rows x {n} {dtype} ({} MiB)", len / n, (2 * len) >> 20);
        let c = s.best_config;
        out.push(record(
            format!("fwht_{dtype}_n{n}"),
            shape.clone(),
            s.default,
            peer,
            torch_gbps,
            ceiling,
        ));
        out.push(record(
            format!("fwht_{dtype}_n{n}_tuned"),
            format!(
                "{shape}, {} per thread, {} rows per block",
                c.elems_per_thread, c.rows_per_block
            ),
            s.best,
            peer,
            torch_gbps,
            ceiling,
        ));
    }
    for format in [KvFormat::Q4_0, KvFormat::Q8_0] {
        progress(&format!("rotate-quantize f16 -> {format}"));
        let s = rotate_quantize(&dev, format, 128, opts)?;
        let shape = format!("{} rows x 128 f16 -> {format}", opts.bytes / 256);
        let c = s.best_config;
        out.push(record(
            format!("rotate_quantize_f16_{format}"),
            shape.clone(),
            s.default,
            "copy ceiling",
            ceiling,
            ceiling,
        ));
        out.push(record(
            format!("rotate_quantize_f16_{format}_tuned"),
            format!(
                "{shape}, {} per thread, {} rows per block",
                c.elems_per_thread, c.rows_per_block
            ),
            s.best,
            "copy ceiling",
            ceiling,
            ceiling,
        ));
    }
    // Decode attention: rates over our cache's bytes for both, so the ratio is the speed-up.
    let sdpa_ms = torch.get("sdpa").copied();
    for format in [KvFormat::Q4_0, KvFormat::Q8_0] {
        progress(&format!(
            "decode attention {format} ({} x {} tokens, {} KV heads x {}, {} query heads)",
            decode.batch, decode.n, decode.h_kv, decode.d, decode.h_q
        ));
        let t = decode_attention(&dev, format, decode, opts)?;
        let shape = format!(
            "{} seqs x {} tokens, {}/{} heads x {}, {format} K+V ({} MiB); torch on an f16 cache",
            decode.batch,
            decode.n,
            decode.h_q,
            decode.h_kv,
            decode.d,
            t.bytes >> 20
        );
        let peer_gbps = sdpa_ms.map_or(f64::NAN, |ms| gbps(t.bytes, ms));
        let c = t.best_config;
        for (name, ms, shape) in [
            (
                format!("decode_attention_{format}"),
                t.default,
                shape.clone(),
            ),
            (
                format!("decode_attention_{format}_tuned"),
                t.best,
                format!(
                    "{shape}, {} warps, splits {}, tensor cores {}",
                    c.warps, c.splits, c.tensor_cores
                ),
            ),
        ] {
            out.push(record(
                name,
                shape,
                gbps(t.bytes, ms),
                "torch SDPA (f16 cache)",
                peer_gbps,
                ceiling,
            ));
        }
    }
    // Prefill attention: TFLOP/s for both, counted the same way.
    let sdpa_prefill_ms = torch.get("sdpa_prefill").copied();
    for format in [KvFormat::Q8_0, KvFormat::Q4_0] {
        progress(&format!(
            "prefill attention {format} ({} tokens causal, {} KV heads x {}, {} query heads)",
            prefill.n, prefill.h_kv, prefill.d, prefill.h_q
        ));
        let t = prefill_attention(&dev, format, prefill, opts)?;
        let flop = prefill.flop();
        let tflops = |ms: f64| flop / (ms * 1e-3) / 1e12;
        let peer = sdpa_prefill_ms.map_or(f64::NAN, tflops);
        let shape = format!(
            "{} tokens causal, {}/{} heads x {}, {format} K+V; torch on f16",
            prefill.n, prefill.h_q, prefill.h_kv, prefill.d
        );
        let c = t.best_config;
        for (name, ms, shape) in [
            (
                format!("prefill_attention_{format}"),
                t.default,
                shape.clone(),
            ),
            (
                format!("prefill_attention_{format}_tuned"),
                t.best,
                format!(
                    "{shape}, {} warps x {} row tiles, tiles of {} tokens, flash {}",
                    c.warps, c.m_tiles, c.block_n, c.flash
                ),
            ),
        ] {
            out.push(BenchRecord {
                kernel: name,
                shape,
                ours_gbps: tflops(ms),
                peer: "torch SDPA flash (f16)".into(),
                peer_gbps: peer,
                ratio: tflops(ms) / peer,
                ceiling_gbps: f64::NAN,
                unit: "TFLOP/s".into(),
            });
        }
    }
    Ok(out)
}

/// The prefill shape of the benchmark: 8k tokens of one sequence, causal, 8 KV heads of 128,
/// 32 query heads (2k tokens with `--quick`).
#[derive(Clone, Copy, Debug)]
struct PrefillShape {
    n: usize,
    h_kv: usize,
    h_q: usize,
    d: usize,
}

impl PrefillShape {
    fn target(opts: &CudaBenchOptions) -> Self {
        let n = if opts.bytes >= 256 << 20 { 8192 } else { 2048 };
        Self {
            n,
            h_kv: 8,
            h_q: 32,
            d: 128,
        }
    }

    /// Flops of causal attention: 4 · d per visible (query, key) pair and query head.
    fn flop(&self) -> f64 {
        let pairs = self.n as f64 * (self.n as f64 + 1.0) / 2.0;
        4.0 * pairs * self.d as f64 * self.h_q as f64
    }
}

/// Causal prefill over a `format` K and V cache of `shape`, Hadamard-rotated, f16 queries,
/// with the default configuration and the best of the search space.
fn prefill_attention(
    dev: &Device,
    format: KvFormat,
    shape: PrefillShape,
    opts: &CudaBenchOptions,
) -> Result<PrefillTimes, Error> {
    use rotq_cuda::{CacheLayout, CudaAttention, CudaKvCache, PrefillConfig};
    let PrefillShape { n, h_kv, h_q, d } = shape;
    let rot = Rotation::hadamard(d)?;
    let codec = CudaCodec::new(dev, format, d, Some(&rot))?;
    let stream = dev.stream();
    let rows = rows_of::<f16>(dev, n * h_kv * d, 8)?;
    let mut caches = Vec::new();
    for _ in 0..2 {
        let mut cache = stream
            .alloc_zeros::<u8>(n * h_kv * codec.row_bytes())
            .map_err(cuda_err)?;
        codec.quantize(dev, &rows, &mut cache, CacheTarget::contiguous(h_kv, 0))?;
        caches.push(cache);
    }
    let qs = [
        rows_of::<f16>(dev, n * h_q * d, 9)?,
        rows_of::<f16>(dev, n * h_q * d, 10)?,
    ];
    let mut out = stream.alloc_zeros::<f16>(n * h_q * d).map_err(cuda_err)?;
    let layout = CacheLayout::Contiguous { tokens_per_seq: n };
    let k = CudaKvCache {
        format,
        bytes: &caches[0],
        n_heads: h_kv,
        dim: d,
        layout,
    };
    let v = CudaKvCache {
        bytes: &caches[1],
        ..k
    };
    let params = rotq_reference::AttentionParams {
        causal: true,
        ..Default::default()
    };
    let plan = rotq_reference::RotationPlan {
        qk: Some(rot),
        v: None,
    };
    let attn = CudaAttention::new(dev, &plan)?;
    let runs = opts.runs.div_ceil(4).max(3);
    let mut time = |config: PrefillConfig| {
        let a = attn.clone().with_prefill_config(config);
        rotq_cuda::median_ms(dev, 1, runs, |j| {
            a.prefill(dev, &qs[j % 2], n, h_q, &k, &v, n, &params, &mut out)
        })
    };
    let default = time(PrefillConfig::default())?;
    let mut best = (default, PrefillConfig::default());
    for config in PrefillConfig::search_space() {
        if let Ok(ms) = time(config) {
            if ms < best.0 {
                best = (ms, config);
            }
        }
    }
    Ok(PrefillTimes {
        default,
        best: best.0,
        best_config: best.1,
    })
}

/// Milliseconds of the default prefill configuration and of the best one.
struct PrefillTimes {
    default: f64,
    best: f64,
    best_config: rotq_cuda::PrefillConfig,
}

/// The decode shape of the benchmark: 16 sequences of 32k tokens, 8 KV heads of 128, 32
/// query heads (fewer tokens when `opts.bytes` is small, as with `--quick`).
#[derive(Clone, Copy, Debug)]
struct DecodeShape {
    batch: usize,
    n: usize,
    h_kv: usize,
    h_q: usize,
    d: usize,
}

impl DecodeShape {
    fn target(opts: &CudaBenchOptions) -> Self {
        let n = if opts.bytes >= 256 << 20 { 32768 } else { 2048 };
        Self {
            batch: 16,
            n,
            h_kv: 8,
            h_q: 32,
            d: 128,
        }
    }
}

/// Decode attention over a `format` K and V cache of `shape`, Hadamard-rotated, with the
/// default configuration and the best of the search space: (milliseconds, cache bytes read,
/// the configuration).
fn decode_attention(
    dev: &Device,
    format: KvFormat,
    shape: DecodeShape,
    opts: &CudaBenchOptions,
) -> Result<DecodeTimes, Error> {
    use rotq_cuda::{CacheLayout, CudaAttention, CudaKvCache, DecodeConfig, DecodeSeq};
    let DecodeShape {
        batch,
        n,
        h_kv,
        h_q,
        d,
    } = shape;
    let rot = Rotation::hadamard(d)?;
    let codec = CudaCodec::new(dev, format, d, Some(&rot))?;
    let tokens = batch * n;
    let cache_len = tokens * h_kv * codec.row_bytes();
    let stream = dev.stream();
    let mut caches = Vec::new();
    // Random rows, quantized a chunk at a time.
    let chunk_tokens = 4096;
    let chunk = rows_of::<f16>(dev, chunk_tokens * h_kv * d, 5)?;
    for _ in 0..2 {
        let mut cache = stream.alloc_zeros::<u8>(cache_len).map_err(cuda_err)?;
        for start in (0..tokens).step_by(chunk_tokens) {
            codec.quantize(
                dev,
                &chunk,
                &mut cache,
                CacheTarget::contiguous(h_kv, start),
            )?;
        }
        caches.push(cache);
    }
    let qs = [
        rows_of::<f16>(dev, batch * h_q * d, 6)?,
        rows_of::<f16>(dev, batch * h_q * d, 7)?,
    ];
    let mut out = stream
        .alloc_zeros::<f16>(batch * h_q * d)
        .map_err(cuda_err)?;
    let layout = CacheLayout::Contiguous { tokens_per_seq: n };
    let k = CudaKvCache {
        format,
        bytes: &caches[0],
        n_heads: h_kv,
        dim: d,
        layout,
    };
    let v = CudaKvCache {
        bytes: &caches[1],
        ..k
    };
    let seqs = vec![
        DecodeSeq {
            n_tokens: n,
            pos: n - 1
        };
        batch
    ];
    let params = rotq_reference::AttentionParams {
        causal: true,
        ..Default::default()
    };
    let plan = rotq_reference::RotationPlan {
        qk: Some(rot),
        v: None,
    };
    let attn = CudaAttention::new(dev, &plan)?;
    let mut time = |config: DecodeConfig, runs: usize| {
        let a = attn.clone().with_config(config);
        rotq_cuda::median_ms(dev, 2, runs, |j| {
            a.decode(dev, &qs[j % 2], h_q, &k, &v, &seqs, &params, &mut out)
        })
    };
    let default = time(DecodeConfig::default(), opts.runs)?;
    let mut best = (default, DecodeConfig::default());
    for config in DecodeConfig::search_space() {
        if let Ok(ms) = time(config, opts.runs.div_ceil(2)) {
            if ms < best.0 {
                best = (ms, config);
            }
        }
    }
    Ok(DecodeTimes {
        default,
        best: best.0,
        best_config: best.1,
        bytes: 2 * cache_len,
    })
}

/// Milliseconds of the default decode configuration and of the best one, and the cache bytes.
struct DecodeTimes {
    default: f64,
    best: f64,
    best_config: rotq_cuda::DecodeConfig,
    bytes: usize,
}
