//! GPU benchmarks: ours, PyTorch's dense `x @ H` (the peer, run by `cli/scripts/torch_peer.py` in
//! the same process tree, same shapes) and the device-to-device copy bandwidth (the ceiling),
//! all in one run. Timed with CUDA events: warm-up, then the median of many runs, rotating
//! between two input buffers.

use crate::bench::{random, BenchRecord, Section};
use crate::Error;
use half::{bf16, f16};
use rotq_autotune::timing::{self, EventClock, TimingError};
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
    Error::from(rotq_cuda::CudaError::Driver {
        what: "benchmark buffers".into(),
        source: e,
    })
}

/// A kernel measured with its default configuration and with the fastest one of its search
/// space (milliseconds, or a rate after [`Tuned::map`]).
struct Tuned<C> {
    default: f64,
    best: f64,
    best_config: C,
}

impl<C> Tuned<C> {
    /// Both measurements through `f` (milliseconds to a rate).
    fn map(self, f: impl Fn(f64) -> f64) -> Self {
        Self {
            default: f(self.default),
            best: f(self.best),
            ..self
        }
    }
}

/// Median milliseconds of `runs` calls of `f(i)` on `dev`, each timed with CUDA events, after
/// `warmup` untimed calls.
fn median_ms(
    dev: &Device,
    warmup: usize,
    runs: usize,
    f: impl FnMut(usize) -> rotq_cuda::Result<()>,
) -> Result<f64, TimingError> {
    timing::median_ms(&mut EventClock::new(dev.stream().clone()), warmup, runs, f)
}

/// Device-to-device copy bandwidth over `bytes` (GB/s counting bytes read + written): the
/// ceiling every memory-bound kernel is measured against.
fn copy_bandwidth(dev: &Device, bytes: usize, runs: usize) -> Result<f64, Error> {
    let stream = dev.stream();
    let src = stream.alloc_zeros::<u8>(bytes).map_err(cuda_err)?;
    let mut dst = stream.alloc_zeros::<u8>(bytes).map_err(cuda_err)?;
    let ms = median_ms(dev, 3, runs, |_| {
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(|e| rotq_cuda::CudaError::Driver {
                what: "copying on the device".into(),
                source: e,
            })
    })?;
    Ok(2.0 * bytes as f64 / (ms * 1e-3) / 1e9)
}

/// Milliseconds of `default` and of the fastest of `space`: `time(config, is_default)`.
/// Configurations a shape can't use (an error) are skipped; the default's error is returned.
fn tune<C: Copy>(
    default: C,
    space: Vec<C>,
    mut time: impl FnMut(C, bool) -> Result<f64, TimingError>,
) -> Result<Tuned<C>, Error> {
    let default_ms = time(default, true)?;
    let mut best = (default_ms, default);
    for config in space {
        if let Ok(ms) = time(config, false) {
            if ms < best.0 {
                best = (ms, config);
            }
        }
    }
    Ok(Tuned {
        default: default_ms,
        best: best.0,
        best_config: best.1,
    })
}

/// GB/s of `run(config, i)` for the default configuration `first` and the best of the search
/// space; `bytes` moved per call.
fn sweep(
    dev: &Device,
    opts: &CudaBenchOptions,
    bytes: usize,
    first: RowConfig,
    mut run: impl FnMut(RowConfig, usize) -> rotq_cuda::Result<()>,
) -> Result<Tuned<RowConfig>, Error> {
    let t = tune(first, RowConfig::search_space(), |cfg, is_default| {
        let (warmup, runs) = if is_default {
            (3, opts.runs)
        } else {
            (2, opts.runs.div_ceil(2))
        };
        median_ms(dev, warmup, runs, |i| run(cfg, i))
    })?;
    Ok(t.map(|ms| gbps(bytes, ms)))
}

/// FWHT over rows of `n` of type `T` (GB/s read + written).
fn fwht<T: GpuElement + Element + Default>(
    dev: &Device,
    n: usize,
    opts: &CudaBenchOptions,
) -> Result<Tuned<RowConfig>, Error> {
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
) -> Result<Tuned<RowConfig>, Error> {
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

/// The batch append of 256 sequences × 1 token (8 KV heads × 128, f16 → q4_0 under a
/// Hadamard) into a pool of 4096 slots, scattered as a server's are: one launch through a
/// device slot mapping, and 256 single-token appends (a launch each) as an engine without the
/// batch call makes them. Milliseconds of each, and the bytes one append moves.
fn batch_append(dev: &Device, opts: &CudaBenchOptions) -> Result<(f64, f64, usize), Error> {
    let (tokens, heads, d, pool_slots) = (256usize, 8usize, 128usize, 4096usize);
    let codec = CudaCodec::new(dev, KvFormat::Q4_0, d, Some(&Rotation::hadamard(d)?))?;
    let stream = dev.stream();
    let mut pool = stream
        .alloc_zeros::<u8>(pool_slots * heads * codec.row_bytes())
        .map_err(cuda_err)?;
    let slots: Vec<i64> = (0..tokens as i64)
        .map(|i| i * 13 % pool_slots as i64)
        .collect();
    let dslots = stream.clone_htod(&slots).map_err(cuda_err)?;
    let batch = rows_of::<f16>(dev, tokens * heads * d, 5)?;
    let single: Vec<_> = (0..tokens)
        .map(|t| rows_of::<f16>(dev, heads * d, 100 + t as u64))
        .collect::<Result<_, _>>()?;
    let one = median_ms(dev, 3, opts.runs, |_| {
        codec.quantize_slots(dev, &batch, &mut pool, heads, &dslots, None)
    })?;
    let many = median_ms(dev, 3, opts.runs, |_| {
        for (rows, &slot) in single.iter().zip(&slots) {
            codec.quantize(
                dev,
                rows,
                &mut pool,
                CacheTarget::contiguous(heads, slot as usize),
            )?;
        }
        Ok(())
    })?;
    let bytes = tokens * heads * (2 * d + codec.row_bytes());
    Ok((one, many, bytes))
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

/// Every GPU benchmark of `only`'s section (None: all of them) on `device` (`cuda:N`), in
/// order.
pub fn run_all(
    device: &str,
    opts: &CudaBenchOptions,
    only: Option<Section>,
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
    let ceiling = copy_bandwidth(&dev, opts.bytes, opts.runs)?;
    let sizes = [128usize, 4096, 32768];
    let cases: Vec<(&str, usize)> = ["f16", "bf16"]
        .into_iter()
        .flat_map(|d| sizes.iter().map(move |&n| (d, n)))
        .filter(|_| Section::Fwht.wanted(only))
        .collect();
    // The cache formats of a section's benchmarks (none when it is not run).
    let formats = |section: Section, list: [KvFormat; 2]| {
        list.into_iter().filter(move |_| section.wanted(only))
    };
    let decode = DecodeShape::target(opts);
    let mut peer_cases: Vec<serde_json::Value> = cases
        .iter()
        .map(|(d, n)| serde_json::json!({"id": format!("{d}/{n}"), "kind": "rotate", "dtype": d, "n": n}))
        .collect();
    if Section::Decode.wanted(only) {
        peer_cases.push(serde_json::json!({
            "id": "sdpa", "kind": "sdpa", "batch": decode.batch, "h_q": decode.h_q,
            "h_kv": decode.h_kv, "n": decode.n, "d": decode.d,
        }));
    }
    let prefill = PrefillShape::target(opts);
    if Section::Prefill.wanted(only) {
        peer_cases.push(serde_json::json!({
            "id": "sdpa_prefill", "kind": "sdpa_prefill", "h_q": prefill.h_q,
            "h_kv": prefill.h_kv, "n": prefill.n, "d": prefill.d,
        }));
    }
    // The peers of the sections asked for (none for the quantizers: their peer is the copy).
    let peers: Vec<&str> = [
        ("x @ H", Section::Fwht),
        ("SDPA decode", Section::Decode),
        ("SDPA prefill", Section::Prefill),
    ]
    .into_iter()
    .filter(|(_, section)| section.wanted(only))
    .map(|(name, _)| name)
    .collect();
    let torch = if peers.is_empty() {
        HashMap::new()
    } else {
        progress(&format!(
            "torch {} (python3 cli/scripts/torch_peer.py)",
            peers.join(", ")
        ));
        let ordinal: usize = info.id.trim_start_matches("cuda:").parse().unwrap_or(0);
        torch_peer(ordinal, &peer_cases, opts, &mut progress)
    };
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
    for format in formats(Section::Quantize, [KvFormat::Q4_0, KvFormat::Q8_0]) {
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
    if Section::Quantize.wanted(only) {
        progress("batch append, 256 sequences x 1 token (one launch, then 256)");
        let (one, many, bytes) = batch_append(&dev, opts)?;
        out.push(record(
            "batch_append_256x1_q4_0".into(),
            format!(
                "256 tokens x 8 heads x 128 f16 -> q4_0, scattered slots: one launch {one:.4} ms, \
                 256 launches {many:.4} ms"
            ),
            gbps(bytes, one),
            "256 single-token appends",
            gbps(bytes, many),
            ceiling,
        ));
    }
    // Decode attention: rates over our cache's bytes for both, so the ratio is the speed-up.
    let sdpa_ms = torch.get("sdpa").copied();
    for format in formats(Section::Decode, [KvFormat::Q4_0, KvFormat::Q8_0]) {
        progress(&format!(
            "decode attention {format} ({} x {} tokens, {} KV heads x {}, {} query heads)",
            decode.batch, decode.n, decode.h_kv, decode.d, decode.h_q
        ));
        let (t, bytes) = decode_attention(&dev, format, decode, opts)?;
        let shape = format!(
            "{} seqs x {} tokens, {}/{} heads x {}, {format} K+V ({} MiB); torch on an f16 cache",
            decode.batch,
            decode.n,
            decode.h_q,
            decode.h_kv,
            decode.d,
            bytes >> 20
        );
        let peer_gbps = sdpa_ms.map_or(f64::NAN, |ms| gbps(bytes, ms));
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
                    "{shape}, {} warps, splits {}, tensor cores {}, pairs {}, split V {}",
                    c.warps, c.splits, c.tensor_cores, c.pairs, c.split_v
                ),
            ),
        ] {
            out.push(record(
                name,
                shape,
                gbps(bytes, ms),
                "torch SDPA (f16 cache)",
                peer_gbps,
                ceiling,
            ));
        }
    }
    // Prefill attention: TFLOP/s for both, counted the same way.
    let sdpa_prefill_ms = torch.get("sdpa_prefill").copied();
    for format in formats(Section::Prefill, [KvFormat::Q8_0, KvFormat::Q4_0]) {
        progress(&format!(
            "prefill attention {format} ({} tokens causal, {} KV heads x {}, {} query heads)",
            prefill.n, prefill.h_kv, prefill.d, prefill.h_q
        ));
        let (t, [ran_default, ran_best]) = prefill_attention(&dev, format, prefill, opts)?;
        let flop = prefill.flop();
        let tflops = |ms: f64| flop / (ms * 1e-3) / 1e12;
        let peer = sdpa_prefill_ms.map_or(f64::NAN, tflops);
        let shape = format!(
            "{} tokens causal, {}/{} heads x {}, {format} K+V; torch on f16",
            prefill.n, prefill.h_q, prefill.h_kv, prefill.d
        );
        // (What ran, which the device's limits may have changed from what was asked.)
        let ran = |c: rotq_cuda::PrefillConfig| {
            if c.flash {
                format!(
                    "{shape}, ran {} warps x {} row tiles, tiles of {} tokens, specialized {}",
                    c.warps, c.m_tiles, c.block_n, c.specialized
                )
            } else {
                format!("{shape}, ran the decode kernel")
            }
        };
        for (name, ms, shape) in [
            (
                format!("prefill_attention_{format}"),
                t.default,
                ran(ran_default),
            ),
            (
                format!("prefill_attention_{format}_tuned"),
                t.best,
                ran(ran_best),
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
    // Last: its graph needs a stream of its own, which puts the context in multi-stream mode.
    if Section::Decode.wanted(only) {
        progress("decode q4_0 through the batch API: run, and one run replayed as a CUDA graph");
        let b = batch_api_decode(&dev, decode, opts)?;
        let shape = format!(
            "{} seqs x {} tokens, {}/{} heads x {}, q4_0 K+V, default configuration; \
             host {:.2} us per graph launch, {:.2} us per run call",
            decode.batch,
            decode.n,
            decode.h_q,
            decode.h_kv,
            decode.d,
            b.graph_host_us,
            b.run_host_us
        );
        let direct = gbps(b.bytes, b.direct_ms);
        for (name, ms) in [("run", b.run_ms), ("graph", b.graph_ms)] {
            out.push(record(
                format!("decode_attention_q4_0_batch_{name}"),
                shape.clone(),
                gbps(b.bytes, ms),
                "CudaAttention::decode, same bytes",
                direct,
                ceiling,
            ));
        }
    }
    Ok(out)
}

/// The batch API's decode beside `CudaAttention::decode` on the same cache.
struct BatchApiTimes {
    direct_ms: f64,
    run_ms: f64,
    graph_ms: f64,
    /// Host time of one `CudaGraph::launch` and of one `run_batch` call (queueing only).
    graph_host_us: f64,
    run_host_us: f64,
    bytes: usize,
}

/// Decode of `shape` over one contiguous q4_0 cache three ways, default configuration:
/// `CudaAttention::decode`, `run_batch` (the same cache as a pool whose page `b` is sequence
/// `b`), and that run captured once in a CUDA graph and replayed.
fn batch_api_decode(
    dev: &Device,
    shape: DecodeShape,
    opts: &CudaBenchOptions,
) -> Result<BatchApiTimes, Error> {
    use rotq_cuda::batch::{
        BatchShape, DeviceBatch, DeviceBuf, DeviceStream, DeviceTables, PoolGeometry, TablesKind,
    };
    use rotq_cuda::DecodeConfig;
    let DecodeShape {
        batch,
        n,
        h_kv,
        h_q,
        d,
    } = shape;
    let (setup, mut out) = shape.setup(dev, KvFormat::Q4_0)?;
    let [k, v] = setup.views(n);
    let attn = setup.attn.clone().with_config(DecodeConfig::default());
    let q = rows_of::<f16>(dev, batch * h_q * d, 6)?;
    let stream = dev.stream();
    let seqs = shape.seqs();
    let direct_ms = median_ms(dev, 2, opts.runs, |_| {
        attn.decode(dev, &q, h_q, &k, &v, &seqs, &setup.params, &mut out)
    })?;

    let pool = PoolGeometry {
        k_format: KvFormat::Q4_0,
        v_format: KvFormat::Q4_0,
        n_kv_heads: h_kv,
        head_dim: d,
        v_dim: d,
        n_pages: batch,
        page_tokens: n,
    };
    let mut bshape = BatchShape::decode(batch, h_q, n, TablesKind::Contiguous);
    bshape.checked = false;
    let plan = attn.plan_batch::<f16>(dev, &pool, &bshape)?;
    let ws = stream
        .alloc_zeros::<u8>(plan.workspace_bytes())
        .map_err(cuda_err)?;
    let qsl = stream
        .clone_htod(&(0..=batch as u32).collect::<Vec<_>>())
        .map_err(cuda_err)?;
    let lens = stream
        .clone_htod(&vec![n as u32; batch])
        .map_err(cuda_err)?;
    let dbatch = DeviceBatch {
        query_start_loc: DeviceBuf::of(&qsl),
        seq_lens: DeviceBuf::of(&lens),
        q_positions: None,
        tables: DeviceTables::Contiguous,
        mask: None,
    };
    let (qb, kb, vb) = (
        DeviceBuf::of(&q),
        DeviceBuf::of(&setup.caches[0]),
        DeviceBuf::of(&setup.caches[1]),
    );
    let (wb, ob) = (DeviceBuf::of(&ws), DeviceBuf::of(&out));
    // SAFETY: every buffer lives to the end of this function, after the streams' last
    // synchronisation, and the graph is dropped before them.
    let on = |s| unsafe { attn.run_batch(&plan, &s, &qb, &kb, &vb, &dbatch, &wb, &ob, None) };
    let run_ms = median_ms(dev, 2, opts.runs, |_| on(DeviceStream::of(stream)))?;
    let calls = 200;
    let t0 = std::time::Instant::now();
    for _ in 0..calls {
        on(DeviceStream::of(stream))?;
    }
    let run_host_us = t0.elapsed().as_secs_f64() * 1e6 / calls as f64;
    stream.synchronize().map_err(cuda_err)?;
    plan.status(&DeviceStream::of(stream), &wb)?;

    let gs = dev.context().new_stream().map_err(cuda_err)?;
    gs.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(cuda_err)?;
    on(DeviceStream::of(&gs))?;
    let graph = gs
        .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
        .map_err(cuda_err)?
        .ok_or_else(|| Error::Input("the capture gave no graph".into()))?;
    graph.upload().map_err(cuda_err)?;
    let launch = || {
        graph.launch().map_err(|e| rotq_cuda::CudaError::Driver {
            what: "launching the graph".into(),
            source: e,
        })
    };
    let graph_ms = timing::median_ms(&mut EventClock::new(gs.clone()), 2, opts.runs, |_| launch())?;
    let t0 = std::time::Instant::now();
    for _ in 0..calls {
        launch()?;
    }
    let graph_host_us = t0.elapsed().as_secs_f64() * 1e6 / calls as f64;
    gs.synchronize().map_err(cuda_err)?;
    Ok(BatchApiTimes {
        direct_ms,
        run_ms,
        graph_ms,
        graph_host_us,
        run_host_us,
        bytes: setup.bytes(),
    })
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

/// The attention benchmarks' inputs: K and V caches of `tokens` random rows, Hadamard-rotated
/// and quantized to `format` (a chunk of `chunk` tokens at a time, the same chunk each time),
/// and the kernels for that rotation with causal masking.
struct AttentionSetup {
    format: KvFormat,
    h_kv: usize,
    d: usize,
    caches: [cudarc::driver::CudaSlice<u8>; 2],
    attn: rotq_cuda::CudaAttention,
    params: rotq_reference::AttentionParams,
}

impl AttentionSetup {
    fn new(
        dev: &Device,
        format: KvFormat,
        (h_kv, d): (usize, usize),
        tokens: usize,
        chunk: usize,
        seed: u64,
    ) -> Result<Self, Error> {
        let rot = Rotation::hadamard(d)?;
        let codec = CudaCodec::new(dev, format, d, Some(&rot))?;
        let rows = rows_of::<f16>(dev, chunk * h_kv * d, seed)?;
        let fill = || -> Result<_, Error> {
            let mut cache = dev
                .stream()
                .alloc_zeros::<u8>(tokens * h_kv * codec.row_bytes())
                .map_err(cuda_err)?;
            for start in (0..tokens).step_by(chunk) {
                codec.quantize(dev, &rows, &mut cache, CacheTarget::contiguous(h_kv, start))?;
            }
            Ok(cache)
        };
        let caches = [fill()?, fill()?];
        let plan = rotq_reference::RotationPlan {
            qk: Some(rot),
            v: None,
        };
        Ok(Self {
            format,
            h_kv,
            d,
            caches,
            attn: rotq_cuda::CudaAttention::new(dev, &plan)?,
            params: rotq_reference::AttentionParams {
                causal: true,
                ..Default::default()
            },
        })
    }

    /// K and V as contiguous caches of `tokens_per_seq` tokens per sequence.
    fn views(&self, tokens_per_seq: usize) -> [rotq_cuda::CudaKvCache<'_>; 2] {
        let k = rotq_cuda::CudaKvCache {
            format: self.format,
            bytes: &self.caches[0],
            n_heads: self.h_kv,
            dim: self.d,
            layout: rotq_cuda::CacheLayout::Contiguous { tokens_per_seq },
        };
        let v = rotq_cuda::CudaKvCache {
            bytes: &self.caches[1],
            ..k
        };
        [k, v]
    }

    /// Bytes of K and V together.
    fn bytes(&self) -> usize {
        self.caches.iter().map(|c| c.len()).sum()
    }
}

/// Causal prefill over a `format` K and V cache of `shape`, Hadamard-rotated, f16 queries,
/// with the default configuration and the best of the search space.
fn prefill_attention(
    dev: &Device,
    format: KvFormat,
    shape: PrefillShape,
    opts: &CudaBenchOptions,
) -> Result<
    (
        Tuned<rotq_cuda::PrefillConfig>,
        [rotq_cuda::PrefillConfig; 2],
    ),
    Error,
> {
    use rotq_cuda::PrefillConfig;
    let PrefillShape { n, h_kv, h_q, d } = shape;
    let setup = AttentionSetup::new(dev, format, (h_kv, d), n, n, 8)?;
    let [k, v] = setup.views(n);
    let qs = [
        rows_of::<f16>(dev, n * h_q * d, 9)?,
        rows_of::<f16>(dev, n * h_q * d, 10)?,
    ];
    let mut out = dev
        .stream()
        .alloc_zeros::<f16>(n * h_q * d)
        .map_err(cuda_err)?;
    let runs = opts.runs.div_ceil(4).max(3);
    let t = tune(
        PrefillConfig::default(),
        PrefillConfig::search_space(),
        |config, _| {
            let a = setup.attn.clone().with_prefill_config(config);
            median_ms(dev, 1, runs, |j| {
                a.prefill(dev, &qs[j % 2], n, h_q, &k, &v, n, &setup.params, &mut out)
            })
        },
    )?;
    let ran = |config| {
        let a = setup.attn.clone().with_prefill_config(config);
        a.prefill_plan::<f16>(dev, n, h_q, &k, &v, n, 0)
            .map_err(Error::from)
    };
    let plans = [ran(PrefillConfig::default())?, ran(t.best_config)?];
    Ok((t, plans))
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
    /// Every sequence full, its query at the last position.
    fn seqs(&self) -> Vec<rotq_cuda::DecodeSeq> {
        let s = rotq_cuda::DecodeSeq {
            n_tokens: self.n,
            pos: self.n - 1,
        };
        vec![s; self.batch]
    }

    /// One contiguous `format` cache of the shape's sequences (random rows, quantized 4,096
    /// tokens at a time) and an f16 output buffer for it.
    fn setup(
        &self,
        dev: &Device,
        format: KvFormat,
    ) -> Result<(AttentionSetup, cudarc::driver::CudaSlice<f16>), Error> {
        let setup = AttentionSetup::new(
            dev,
            format,
            (self.h_kv, self.d),
            self.batch * self.n,
            4096,
            5,
        )?;
        let out = dev
            .stream()
            .alloc_zeros::<f16>(self.batch * self.h_q * self.d)
            .map_err(cuda_err)?;
        Ok((setup, out))
    }

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
/// default configuration and the best of the search space, and the cache bytes read.
fn decode_attention(
    dev: &Device,
    format: KvFormat,
    shape: DecodeShape,
    opts: &CudaBenchOptions,
) -> Result<(Tuned<rotq_cuda::DecodeConfig>, usize), Error> {
    use rotq_cuda::DecodeConfig;
    let DecodeShape {
        batch, n, h_q, d, ..
    } = shape;
    let (setup, mut out) = shape.setup(dev, format)?;
    let [k, v] = setup.views(n);
    let qs = [
        rows_of::<f16>(dev, batch * h_q * d, 6)?,
        rows_of::<f16>(dev, batch * h_q * d, 7)?,
    ];
    let seqs = shape.seqs();
    let t = tune(
        DecodeConfig::default(),
        DecodeConfig::search_space(),
        |config, is_default| {
            let a = setup.attn.clone().with_config(config);
            let runs = if is_default {
                opts.runs
            } else {
                opts.runs.div_ceil(2)
            };
            median_ms(dev, 2, runs, |j| {
                a.decode(dev, &qs[j % 2], h_q, &k, &v, &seqs, &setup.params, &mut out)
            })
        },
    )?;
    Ok((t, setup.bytes()))
}
