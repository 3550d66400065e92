//! rotq's CPU kernels beside llama.cpp and ik_llama.cpp, in one run, on the same data and the
//! same thread count, timed alternately (ours, peer, peer, ours, …) after correctness checks.
//!
//! ```text
//! peer_bench [--threads N] [--runs R] [--only decode|fwht|quantize] [--json]
//!            [--llama PATH] [--ik PATH]
//! ```
//!
//! Throughput is GB/s (10⁹ B/s) of bytes read plus written, rotq's convention (`rotq bench`):
//! decode attention reads its K and V caches; an f32 rotation of `N` bytes moves `2N`;
//! rotate-quantize reads the f32 rows and writes the cache. The ceiling is a parallel memcpy
//! (which moves twice its size) over a buffer as large as the data under test, with the same
//! threads. Each sample is as many calls as last about 50 ms; the table gives the median of
//! `--runs` samples per contender and the spread (min–max) of throughput and of the per-round
//! ratio. With `--json`, one JSON row per (kernel, peer) goes to stdout and the table to
//! stderr.

use ndarray::Array3;
use rayon::prelude::*;
use rotq_cpu::{CacheCodec, CpuAttention, CpuRotation, DecodeRequest, Isa, KvCacheView, QueryMode};
use rotq_peers::{ElemType, FlashAttnSpec, MaskKind, Peer, PeerKind, QuantizePath, RotationKind};
use rotq_reference::{attention_f64, AttentionParams, KvFormat, Rotation, RotationPlan};
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

type BoxError = Box<dyn std::error::Error>;

const H_KV: usize = 8;
const H_Q: usize = 32;
const D: usize = 128;

struct Args {
    threads: usize,
    runs: usize,
    json: bool,
    only: Option<String>,
    llama: PathBuf,
    ik: PathBuf,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut a = Args {
        threads: 2,
        runs: 7,
        json: false,
        only: None,
        llama: PeerKind::LlamaCpp.default_path(),
        ik: PeerKind::IkLlamaCpp.default_path(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--threads" => a.threads = val()?.parse()?,
            "--runs" => a.runs = val()?.parse()?,
            "--json" => a.json = true,
            "--only" => a.only = Some(val()?),
            "--llama" => a.llama = val()?.into(),
            "--ik" => a.ik = val()?.into(),
            "-h" | "--help" => {
                println!("peer_bench [--threads N (2)] [--runs R (7, >= 5)] [--only decode|fwht|quantize] [--json] [--llama PATH] [--ik PATH]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other} (see --help)").into()),
        }
    }
    if a.threads == 0 || a.runs < 5 {
        return Err("--threads must be positive and --runs at least 5".into());
    }
    if let Some(o) = &a.only {
        if !["decode", "fwht", "quantize"].contains(&o.as_str()) {
            return Err(format!("--only takes decode, fwht or quantize, not {o}").into());
        }
    }
    Ok(a)
}

/// One row of the comparison (the JSON row).
#[derive(Serialize, Clone, Debug)]
struct Row {
    kernel: String,
    shape: String,
    ours_gbps: f64,
    peer: String,
    peer_gbps: f64,
    /// Median peer time / median ours (> 1: ours is faster).
    ratio: f64,
    ceiling_gbps: f64,
    ours_gbps_range: [f64; 2],
    peer_gbps_range: [f64; 2],
    ratio_range: [f64; 2],
    runs: usize,
    threads: usize,
    unit: &'static str,
}

/// Deterministic uniform values in [-1, 1) (xorshift64*), split over threads by chunk.
fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut v = vec![0f32; len];
    v.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut s = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ (c as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03))
                | 1;
            for x in chunk {
                s ^= s >> 12;
                s ^= s << 25;
                s ^= s >> 27;
                let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40; // 24 bits
                *x = r as f32 / (1u64 << 23) as f32 - 1.0;
            }
        });
    v
}

fn parallel_copy(dst: &mut [u8], src: &[u8]) {
    let chunk = (src.len() / rayon::current_num_threads().max(1)).max(1 << 16);
    dst.par_chunks_mut(chunk)
        .zip(src.par_chunks(chunk))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// Copy bandwidth (read + written) over `bytes` (capped at 512 MiB), median of `runs`.
fn copy_ceiling(bytes: usize, runs: usize) -> f64 {
    let bytes = bytes.min(512 << 20);
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    parallel_copy(&mut dst, &src);
    let mut t: Vec<f64> = (0..runs.max(5))
        .map(|_| {
            let s = Instant::now();
            parallel_copy(&mut dst, &src);
            s.elapsed().as_secs_f64()
        })
        .collect();
    std::hint::black_box(&dst);
    t.sort_by(f64::total_cmp);
    2.0 * bytes as f64 / t[t.len() / 2] / 1e9
}

/// A contender of a race: a call, and the factor its measured time is multiplied by (the
/// dense rotation runs on a part of the rows).
struct Contender<'a> {
    name: String,
    call: Box<dyn FnMut() + 'a>,
    time_scale: f64,
}

/// Seconds per call of each contender, `runs` samples each, taken round-robin.
fn race(contenders: &mut [Contender<'_>], runs: usize) -> Vec<Vec<f64>> {
    let target = Duration::from_millis(50);
    let reps: Vec<usize> = contenders
        .iter_mut()
        .map(|c| {
            (c.call)(); // warm-up
            let s = Instant::now();
            (c.call)();
            let t = s.elapsed();
            (target.as_secs_f64() / t.as_secs_f64().max(1e-9))
                .ceil()
                .clamp(1.0, 1e5) as usize
        })
        .collect();
    let mut samples = vec![Vec::with_capacity(runs); contenders.len()];
    for _ in 0..runs {
        for (i, c) in contenders.iter_mut().enumerate() {
            let s = Instant::now();
            for _ in 0..reps[i] {
                (c.call)();
            }
            samples[i].push(s.elapsed().as_secs_f64() / reps[i] as f64 * c.time_scale);
        }
    }
    samples
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn range(v: impl Iterator<Item = f64>) -> [f64; 2] {
    v.fold([f64::INFINITY, f64::NEG_INFINITY], |[lo, hi], x| {
        [lo.min(x), hi.max(x)]
    })
}

/// Rows comparing contender 0 (ours) with each other one; `bytes` per call.
fn rows_of(
    kernel: &str,
    shape: &str,
    names: &[String],
    samples: &[Vec<f64>],
    bytes: usize,
    ceiling: f64,
    threads: usize,
) -> Vec<Row> {
    let gbps = |t: f64| bytes as f64 / t / 1e9;
    let ours = &samples[0];
    (1..samples.len())
        .map(|i| {
            let peer = &samples[i];
            Row {
                kernel: kernel.into(),
                shape: shape.into(),
                ours_gbps: gbps(median(ours)),
                peer: names[i].clone(),
                peer_gbps: gbps(median(peer)),
                ratio: median(peer) / median(ours),
                ceiling_gbps: ceiling,
                ours_gbps_range: range(ours.iter().map(|&t| gbps(t))),
                peer_gbps_range: range(peer.iter().map(|&t| gbps(t))),
                ratio_range: range(ours.iter().zip(peer).map(|(o, p)| p / o)),
                runs: ours.len(),
                threads,
                unit: "GB/s",
            }
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
}

fn max_abs(a: impl IntoIterator<Item = f64>) -> f64 {
    a.into_iter().map(f64::abs).fold(0.0, f64::max)
}

/// Rotates each `D`-value row of `q` by `r` (in f64), as the K cache's rows are rotated.
fn rotate_rows(r: &Rotation, q: &[f32]) -> Result<Vec<f64>, BoxError> {
    let mut x: Vec<f64> = q.iter().map(|&v| v as f64).collect();
    for row in x.chunks_exact_mut(D) {
        r.forward_in_place(row)?;
    }
    Ok(x)
}

/// K (rotated by `r`) and V caches of `n_seq` sequences of `n_kv` tokens in `format`, rows
/// uniform in [-1, 1): rotq's cache bytes, which the peers read as they are.
fn caches(
    format: KvFormat,
    r: &Rotation,
    n_seq: usize,
    n_kv: usize,
    seed: u64,
) -> Result<(Vec<u8>, Vec<u8>), BoxError> {
    let kc = CacheCodec::new(format, D, Some(r), Isa::best())?;
    let vc = CacheCodec::new(format, D, None, Isa::best())?;
    let per = n_kv * H_KV * kc.row_bytes();
    let (mut kb, mut vb) = (vec![0u8; n_seq * per], vec![0u8; n_seq * per]);
    for s in 0..n_seq {
        let k = random(n_kv * H_KV * D, seed + 2 * s as u64);
        kc.quantize(&k, &mut kb[s * per..(s + 1) * per], 0)?;
        let v = random(n_kv * H_KV * D, seed + 2 * s as u64 + 1);
        vc.quantize(&v, &mut vb[s * per..(s + 1) * per], 0)?;
    }
    Ok((kb, vb))
}

/// Our attention over the same caches: one sequence through `run`, several through
/// `decode_batch` (decode) — or `run` per sequence with `n_q` rows (the causal check).
struct Ours<'a> {
    kernel: CpuAttention,
    views: Vec<(KvCacheView<'a>, KvCacheView<'a>)>,
    params: AttentionParams,
    n_q: usize,
}

impl<'a> Ours<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        r: &Rotation,
        format: KvFormat,
        kb: &'a [u8],
        vb: &'a [u8],
        n_seq: usize,
        n_kv: usize,
        n_q: usize,
        params: AttentionParams,
    ) -> Result<Self, BoxError> {
        let plan = RotationPlan {
            qk: Some(r.clone()),
            v: None,
        };
        let per = kb.len() / n_seq;
        let views = (0..n_seq)
            .map(|s| -> Result<_, BoxError> {
                Ok((
                    KvCacheView::new(format, &kb[s * per..(s + 1) * per], n_kv, H_KV, D)?,
                    KvCacheView::new(format, &vb[s * per..(s + 1) * per], n_kv, H_KV, D)?,
                ))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            kernel: CpuAttention::new(&plan, Isa::best()),
            views,
            params,
            n_q,
        })
    }

    /// The same with the queries' arithmetic in `mode`.
    fn with_query_mode(mut self, mode: QueryMode) -> Self {
        self.kernel = self.kernel.with_query_mode(mode);
        self
    }

    /// `q` is `[n_seq, n_q, h_q, d]`, unrotated.
    fn run(&self, q: &[f32]) -> Vec<f32> {
        let per = self.n_q * H_Q * D;
        if self.views.len() == 1 || self.n_q > 1 {
            let mut out = Vec::with_capacity(q.len());
            for (s, (k, v)) in self.views.iter().enumerate() {
                out.extend(
                    self.kernel
                        .run(
                            &q[s * per..(s + 1) * per],
                            self.n_q,
                            H_Q,
                            k,
                            v,
                            &self.params,
                        )
                        .expect("valid shapes"),
                );
            }
            out
        } else {
            let reqs: Vec<DecodeRequest<'_>> = self
                .views
                .iter()
                .enumerate()
                .map(|(s, (k, v))| DecodeRequest {
                    q: &q[s * per..(s + 1) * per],
                    h_q: H_Q,
                    k: *k,
                    v: *v,
                    params: self.params.clone(),
                })
                .collect();
            self.kernel
                .decode_batch(&reqs)
                .expect("valid shapes")
                .concat()
        }
    }
}

/// The oracle (f64) for the rotated queries `qr` (`[n_seq, n_q, h_q, d]`) over the
/// dequantized caches.
#[allow(clippy::too_many_arguments)]
fn oracle(
    format: KvFormat,
    kb: &[u8],
    vb: &[u8],
    qr: &[f64],
    n_seq: usize,
    n_kv: usize,
    n_q: usize,
    params: &AttentionParams,
) -> Result<Vec<f64>, BoxError> {
    let per = kb.len() / n_seq;
    let mut out = Vec::new();
    for s in 0..n_seq {
        let deq = |b: &[u8]| -> Result<Array3<f64>, BoxError> {
            let mut f = vec![0f32; n_kv * H_KV * D];
            format.dequantize_into(b, &mut f)?;
            Ok(Array3::from_shape_vec(
                (n_kv, H_KV, D),
                f.into_iter().map(f64::from).collect(),
            )?)
        };
        let k = deq(&kb[s * per..(s + 1) * per])?;
        let v = deq(&vb[s * per..(s + 1) * per])?;
        let q = Array3::from_shape_vec(
            (n_q, H_Q, D),
            qr[s * n_q * H_Q * D..(s + 1) * n_q * H_Q * D].to_vec(),
        )?;
        let a = attention_f64(q.view(), k.view(), v.view(), params)?;
        out.extend(a.output.iter().copied());
    }
    Ok(out)
}

/// The largest error (relative to the output's max |value|) a peer's arithmetic allows: both
/// peers quantize the query to q8_0 against a quantized K (or round it to f16 against f16),
/// which costs up to ~1e-2 of the output's scale on this data (2e-2 allowed); llama.cpp also
/// accumulates the weighted sum of an f16 V in f16, rounding its accumulator to 11 bits at
/// each of the `n_kv` steps: `sqrt(n_kv) · 2^-11` more (the random-walk size of those
/// roundings). A wrong layout, mask or head mapping gives errors of the output's whole scale
/// (the negative control).
fn peer_tolerance(peer: PeerKind, v: KvFormat, n_kv: usize) -> f64 {
    let f16_acc = if peer == PeerKind::LlamaCpp && v == KvFormat::F16 {
        (n_kv as f64).sqrt() * 2f64.powi(-11)
    } else {
        0.0
    };
    2e-2 + f16_acc
}

fn err_vs(oracle: &[f64], x: &[f32]) -> f64 {
    oracle
        .iter()
        .zip(x)
        .map(|(o, v)| (o - *v as f64).abs())
        .fold(0.0, f64::max)
}

/// Attention checks against the oracle; returns whether all passed.
fn check_attention(
    peers: &[&Peer],
    threads: usize,
    log: &mut dyn FnMut(String),
) -> Result<bool, BoxError> {
    let r = Rotation::hadamard(D)?;
    let mut ok = true;
    log(
        "attention vs the f64 oracle (same cache bytes; max |error|, relative to max |oracle|):"
            .into(),
    );
    // (n_seq, n_kv, n_q): decode of one and of several sequences, and a causal block of 4 rows.
    for (n_seq, n_kv, n_q) in [(1usize, 4096usize, 1usize), (4, 1024, 1), (1, 1024, 4)] {
        for format in [KvFormat::Q4_0, KvFormat::Q8_0, KvFormat::F16] {
            let (kb, vb) = caches(format, &r, n_seq, n_kv, 100)?;
            let q: Vec<f32> = random(n_seq * n_q * H_Q * D, 7)
                .iter()
                .map(|x| 4.0 * x)
                .collect();
            let qr = rotate_rows(&r, &q)?;
            let qr32: Vec<f32> = qr.iter().map(|&x| x as f32).collect();
            let causal = n_q > 1;
            let params = AttentionParams {
                causal: true,
                pos_offset: n_kv - n_q,
                ..Default::default()
            };
            let exact = oracle(format, &kb, &vb, &qr, n_seq, n_kv, n_q, &params)?;
            let scale = max_abs(exact.iter().copied());
            let ours = Ours::new(&r, format, &kb, &vb, n_seq, n_kv, n_q, params.clone())?.run(&q);
            let e_ours = err_vs(&exact, &ours);
            let mut line = format!(
                "  {format:<5} {n_seq:>2} seq x {n_kv:>5} tokens, {n_q} query row{}: max|oracle| {scale:.3}; rotq {e_ours:.2e} ({:.1e})",
                if causal { "s, causal" } else { "" },
                e_ours / scale
            );
            ok &= e_ours / scale < 1e-3;
            for peer in peers {
                let ty = ElemType::of(format)?;
                let mut spec = FlashAttnSpec::decode(ty, n_seq, n_kv, H_KV, D, H_Q, threads);
                spec.n_q = n_q;
                spec.mask = if causal {
                    MaskKind::Causal {
                        pos_offset: n_kv - n_q,
                    }
                } else {
                    MaskKind::AllVisible
                };
                let mut fa = peer.flash_attn(&spec, &kb, &vb)?;
                let mut out = vec![0f32; spec.q_len()];
                fa.run(&qr32, &mut out)?;
                let e = err_vs(&exact, &out);
                let pass = e / scale < peer_tolerance(peer.kind(), format, n_kv);
                ok &= pass;
                line += &format!(
                    "; {} {e:.2e} ({:.1e}){}",
                    peer.kind().name(),
                    e / scale,
                    if pass { "" } else { " FAIL" }
                );
            }
            log(line);
        }
    }
    // A negative control: the same check with the KV heads of the cache swapped must fail.
    {
        let (n_kv, format) = (1024, KvFormat::Q8_0);
        let (kb, vb) = caches(format, &r, 1, n_kv, 100)?;
        let row = format.row_bytes(D)?;
        let mut swapped = kb.clone();
        for t in 0..n_kv {
            let base = t * H_KV * row;
            let (a, b) = swapped[base..base + 2 * row].split_at_mut(row);
            a.swap_with_slice(b);
        }
        let q: Vec<f32> = random(H_Q * D, 7).iter().map(|x| 4.0 * x).collect();
        let qr = rotate_rows(&r, &q)?;
        let qr32: Vec<f32> = qr.iter().map(|&x| x as f32).collect();
        let params = AttentionParams {
            causal: true,
            pos_offset: n_kv - 1,
            ..Default::default()
        };
        let exact = oracle(format, &kb, &vb, &qr, 1, n_kv, 1, &params)?;
        let scale = max_abs(exact.iter().copied());
        let spec = FlashAttnSpec::decode(ElemType::Q8_0, 1, n_kv, H_KV, D, H_Q, threads);
        let mut fa = peers[0].flash_attn(&spec, &swapped, &vb)?;
        let mut out = vec![0f32; spec.q_len()];
        fa.run(&qr32, &mut out)?;
        log(format!(
            "  negative control (K heads 0 and 1 swapped, q8_0, {}): error {:.1e} of the scale (the check must see it)",
            peers[0].kind().name(),
            err_vs(&exact, &out) / scale
        ));
    }
    Ok(ok)
}

/// Quantized bytes of the peers vs rotq's registry and rotq's CPU codec.
fn check_quantize(peers: &[&Peer], log: &mut dyn FnMut(String)) -> Result<bool, BoxError> {
    let n = 1 << 20;
    let mut x = random(n, 11);
    // Edge blocks: zeros, a constant, a negative maximum, tiny values, ±ties of the scale.
    x[..32].fill(0.0);
    x[32..64].fill(0.5);
    x[64] = -8.0;
    for (i, v) in x[96..128].iter_mut().enumerate() {
        *v = (i as f32 - 16.0) / 16.0;
    }
    x[128..160].iter_mut().for_each(|v| *v *= 1e-30);
    let mut ok = true;
    log("quantized bytes (blocks differing from rotq_reference::KvFormat::quantize_into):".into());
    for format in [KvFormat::Q4_0, KvFormat::Q8_0] {
        let ours = format.quantize_row(&x)?;
        let codec = CacheCodec::new(format, 128, None, Isa::best())?;
        let mut fast = vec![0u8; ours.len()];
        codec.quantize(&x, &mut fast, 0)?;
        let bb = format.block_bytes();
        let diff = |a: &[u8], b: &[u8]| {
            a.chunks(bb)
                .zip(b.chunks(bb))
                .filter(|(x, y)| x != y)
                .count()
        };
        let blocks = ours.len() / bb;
        let mut line = format!(
            "  {format:<5} {blocks} blocks: rotq_cpu::CacheCodec {}",
            diff(&ours, &fast)
        );
        ok &= diff(&ours, &fast) == 0;
        for peer in peers {
            let ty = ElemType::of(format)?;
            let r = peer.quantize(ty, QuantizePath::Reference, &x)?;
            let c = peer.quantize(ty, QuantizePath::CpuFromFloat, &x)?;
            let (dr, dc) = (diff(&ours, &r), diff(&ours, &c));
            ok &= dr == 0;
            line += &format!(
                "; {} ggml_quantize_chunk {dr}, quantize_row_{} (CPU from_float) {dc}",
                peer.kind().name(),
                format.name()
            );
        }
        log(line);
    }
    Ok(ok)
}

fn kernel_name(format: KvFormat) -> String {
    format!("decode_attention_{format}")
}

fn bench_decode(
    ik: &Peer,
    llama: &Peer,
    a: &Args,
    rows: &mut Vec<Row>,
    log: &mut dyn FnMut(String),
) -> Result<bool, BoxError> {
    let r = Rotation::hadamard(D)?;
    let mut ok = true;
    for (n_seq, n_kv) in [(1usize, 4096usize), (1, 32768), (16, 4096), (16, 32768)] {
        for format in [KvFormat::Q4_0, KvFormat::Q8_0, KvFormat::F16] {
            let (kb, vb) = caches(format, &r, n_seq, n_kv, 1000)?;
            let bytes = kb.len() + vb.len();
            let q: Vec<f32> = random(n_seq * H_Q * D, 3).iter().map(|x| 4.0 * x).collect();
            let qr: Vec<f32> = rotate_rows(&r, &q)?.iter().map(|&x| x as f32).collect();
            let params = AttentionParams {
                causal: true,
                pos_offset: n_kv - 1,
                ..Default::default()
            };
            let ours = Ours::new(&r, format, &kb, &vb, n_seq, n_kv, 1, params.clone())?;
            let spec =
                FlashAttnSpec::decode(ElemType::of(format)?, n_seq, n_kv, H_KV, D, H_Q, a.threads);
            let mut fa_ik = ik.flash_attn(&spec, &kb, &vb)?;
            let mut fa_ll = llama.flash_attn(&spec, &kb, &vb)?;
            // The same bytes: every peer agrees with ours before it is timed.
            let o = ours.run(&q);
            let scale = max_abs(o.iter().map(|&x| x as f64));
            let (mut out_ik, mut out_ll) = (vec![0f32; spec.q_len()], vec![0f32; spec.q_len()]);
            fa_ik.run(&qr, &mut out_ik)?;
            fa_ll.run(&qr, &mut out_ll)?;
            let (e_ik, e_ll) = (
                max_abs_diff(&o, &out_ik) / scale,
                max_abs_diff(&o, &out_ll) / scale,
            );
            let pass = e_ik < peer_tolerance(PeerKind::IkLlamaCpp, format, n_kv)
                && e_ll < peer_tolerance(PeerKind::LlamaCpp, format, n_kv);
            ok &= pass;
            let shape = format!("{n_seq} x {n_kv} tokens, {H_KV} KV heads x {D}, {H_Q} query heads, {format} K and V");
            log(format!(
                "{shape}: {:.1} MiB of cache; |peer - rotq| / max|rotq|: ik {e_ik:.1e}, llama {e_ll:.1e}{}",
                bytes as f64 / (1 << 20) as f64,
                if pass { "" } else { "  FAIL: not timed" }
            ));
            if !pass {
                continue;
            }
            let ceiling = copy_ceiling(bytes, a.runs);
            // rotq with q8_0 queries too (the engine API's default over these rotated q4_0 and
            // q8_0 caches; ik_llama.cpp quantizes its queries the same way).
            let ours_q8 = (format != KvFormat::F16)
                .then(|| {
                    Ours::new(&r, format, &kb, &vb, n_seq, n_kv, 1, params.clone())
                        .map(|o| o.with_query_mode(QueryMode::Q8_0))
                })
                .transpose()?;
            // Checked like the peers: q8_0 queries stay within what ik_llama.cpp's own q8_0
            // queries are allowed.
            if let Some(o8) = &ours_q8 {
                let e8 = max_abs_diff(&o, &o8.run(&q)) / scale;
                if e8 >= peer_tolerance(PeerKind::IkLlamaCpp, format, n_kv) {
                    log(format!(
                        "{shape}: rotq with q8_0 queries {e8:.1e} from f32 queries  FAIL"
                    ));
                    ok = false;
                    continue;
                }
            }
            let names = [
                "rotq".to_string(),
                "ik_llama.cpp iqk flash attention (KQ mask)".to_string(),
                "llama.cpp ggml_flash_attn_ext (KQ mask)".to_string(),
                "rotq, q8_0 queries".to_string(),
            ];
            let mut contenders = vec![
                Contender {
                    name: names[0].clone(),
                    call: Box::new(|| {
                        std::hint::black_box(ours.run(&q));
                    }),
                    time_scale: 1.0,
                },
                Contender {
                    name: names[1].clone(),
                    call: Box::new(|| fa_ik.run(&qr, &mut out_ik).expect("checked")),
                    time_scale: 1.0,
                },
                Contender {
                    name: names[2].clone(),
                    call: Box::new(|| fa_ll.run(&qr, &mut out_ll).expect("checked")),
                    time_scale: 1.0,
                },
            ];
            if let Some(o8) = &ours_q8 {
                contenders.push(Contender {
                    name: names[3].clone(),
                    call: Box::new(|| {
                        std::hint::black_box(o8.run(&q));
                    }),
                    time_scale: 1.0,
                });
            }
            let samples = race(&mut contenders, a.runs);
            let names: Vec<String> = contenders.iter().map(|c| c.name.clone()).collect();
            rows.extend(rows_of(
                &kernel_name(format),
                &shape,
                &names[..3],
                &samples[..3],
                bytes,
                ceiling,
                a.threads,
            ));
            if samples.len() == 4 {
                // The q8_0-query rows: the same peers against rotq's integer loop.
                let pick = [3, 1, 2];
                rows.extend(rows_of(
                    &format!("{}_q8_0_query", kernel_name(format)),
                    &shape,
                    &pick.map(|i| names[i].clone()),
                    &pick.map(|i| samples[i].clone()),
                    bytes,
                    ceiling,
                    a.threads,
                ));
            }
        }
    }
    Ok(ok)
}

fn bench_fwht(
    ik: &Peer,
    llama: &Peer,
    a: &Args,
    rows: &mut Vec<Row>,
    log: &mut dyn FnMut(String),
) -> Result<bool, BoxError> {
    let mut ok = true;
    // 64 MiB rows (memory-bound: the copy ceiling caps every kernel) and, at n = 128, 1 MiB
    // (in L2: the arithmetic decides).
    for (n, mib) in [(128usize, 64usize), (128, 1), (4096, 64)] {
        let len = (mib << 20) / 4 / n * n;
        let n_rows = len / n;
        let rotation = Rotation::hadamard(n)?;
        let ours = CpuRotation::new(&rotation, Isa::best());
        let x = random(len, 1);
        let mut expect = x.clone();
        ours.forward_rows(&mut expect)?;
        // The dense product costs n² per row: at n = 4096 it runs on fewer rows, its time
        // scaled to all of them (its cost per row does not depend on the row count).
        let dense_rows = n_rows.min(((1usize << 29) / (n * n)).max(8));
        let (mut o_ik, mut o_hint, mut o_dense) = (
            vec![0u8; 4 * len],
            vec![0u8; 4 * len],
            vec![0u8; 4 * dense_rows * n],
        );
        let mut r_ik = ik.rotate(
            RotationKind::HadamardOp,
            n,
            &x,
            ElemType::F32,
            &mut o_ik,
            a.threads,
        )?;
        let mut r_hint = llama.rotate(
            RotationKind::HintedMatmul,
            n,
            &x,
            ElemType::F32,
            &mut o_hint,
            a.threads,
        )?;
        let mut r_dense = llama.rotate(
            RotationKind::DenseMatmul,
            n,
            &x[..dense_rows * n],
            ElemType::F32,
            &mut o_dense,
            a.threads,
        )?;
        r_ik.run()?;
        r_hint.run()?;
        r_dense.run()?;
        let f32s = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let scale = max_abs(expect.iter().map(|&v| v as f64));
        let errs = [
            max_abs_diff(&expect, &f32s(r_ik.output())),
            max_abs_diff(&expect, &f32s(r_hint.output())),
            max_abs_diff(&expect[..dense_rows * n], &f32s(r_dense.output())),
        ];
        let pass = errs.iter().all(|e| e / scale < 1e-5);
        ok &= pass;
        log(format!(
            "fwht n = {n}: |peer - rotq| / max|rotq|: ik ggml_hadamard {:.1e}, llama.cpp hinted mul_mat {:.1e}, dense mul_mat {:.1e}{}",
            errs[0] / scale,
            errs[1] / scale,
            errs[2] / scale,
            if pass { "" } else { "  FAIL: not timed" }
        ));
        if !pass {
            continue;
        }
        let ceiling = copy_ceiling(4 * len, a.runs);
        let mut xo = x.clone();
        let mut contenders = vec![
            Contender {
                name: "rotq".into(),
                call: Box::new(|| ours.forward_rows(&mut xo).expect("whole rows")),
                time_scale: 1.0,
            },
            Contender {
                name: "ik_llama.cpp ggml_hadamard".into(),
                call: Box::new(|| r_ik.run().expect("checked")),
                time_scale: 1.0,
            },
            Contender {
                name: "llama.cpp ggml_mul_mat + GGML_HINT_SRC0_IS_HADAMARD (FWHT)".into(),
                call: Box::new(|| r_hint.run().expect("checked")),
                time_scale: 1.0,
            },
            Contender {
                name: format!(
                    "llama.cpp dense ggml_mul_mat (PR 21038; {dense_rows} rows, time scaled)"
                ),
                call: Box::new(|| r_dense.run().expect("checked")),
                time_scale: n_rows as f64 / dense_rows as f64,
            },
        ];
        let samples = race(&mut contenders, a.runs);
        let names: Vec<String> = contenders.iter().map(|c| c.name.clone()).collect();
        let shape = format!("{n_rows} rows x {n} f32 ({mib} MiB)");
        rows.extend(rows_of(
            &format!("fwht_f32_n{n}"),
            &shape,
            &names,
            &samples,
            8 * len,
            ceiling,
            a.threads,
        ));
    }
    Ok(ok)
}

fn bench_rotate_quantize(
    ik: &Peer,
    llama: &Peer,
    a: &Args,
    rows: &mut Vec<Row>,
    log: &mut dyn FnMut(String),
) -> Result<bool, BoxError> {
    let (n, n_rows) = (128usize, 32768 * H_KV);
    let len = n * n_rows;
    let format = KvFormat::Q4_0;
    let rotation = Rotation::hadamard(n)?;
    let fused = CacheCodec::new(format, n, Some(&rotation), Isa::best())?;
    let x = random(len, 2);
    let cache_len = n_rows * fused.row_bytes();
    let mut ours_out = vec![0u8; cache_len];
    fused.quantize(&x, &mut ours_out, 0)?;
    let (mut o_dense, mut o_hint, mut o_ik) = (
        vec![0u8; cache_len],
        vec![0u8; cache_len],
        vec![0u8; cache_len],
    );
    let mut r_dense = llama.rotate(
        RotationKind::DenseMatmul,
        n,
        &x,
        ElemType::Q4_0,
        &mut o_dense,
        a.threads,
    )?;
    let mut r_hint = llama.rotate(
        RotationKind::HintedMatmul,
        n,
        &x,
        ElemType::Q4_0,
        &mut o_hint,
        a.threads,
    )?;
    let mut r_ik = ik.rotate(
        RotationKind::HadamardOp,
        n,
        &x,
        ElemType::Q4_0,
        &mut o_ik,
        a.threads,
    )?;
    r_dense.run()?;
    r_hint.run()?;
    r_ik.run()?;
    // The rotations round differently in their last bits, so a value on a rounding boundary
    // may land on the neighbouring code: compare the dequantized rows (one q4_0 step at most).
    let deq = |b: &[u8]| -> Result<Vec<f32>, BoxError> {
        let mut f = vec![0f32; len];
        format.dequantize_into(b, &mut f)?;
        Ok(f)
    };
    let ours_f = deq(&ours_out)?;
    let mut ok = true;
    let mut line = format!("rotate-quantize {n_rows} rows x {n} -> q4_0: identical bytes / max |dequantized diff| vs rotq:");
    for (name, out) in [
        ("llama.cpp dense", r_dense.output()),
        ("llama.cpp hinted", r_hint.output()),
        ("ik_llama.cpp", r_ik.output()),
    ] {
        let same =
            ours_out.iter().zip(out).filter(|(x, y)| x == y).count() as f64 / cache_len as f64;
        let e = max_abs_diff(&ours_f, &deq(out)?);
        // One step of q4_0 is amax/8 of a block; rows of 128 values in [-1, 1) rotate to
        // |x| <= 11.3, so a differently rounded code moves a value by at most ~1.5.
        // (ik_llama.cpp's CPU quantize_row_q4_0 rounds to nearest and refits the scale by
        // least squares, so most of its blocks differ from ggml's reference in their bytes.)
        let pass = e < 1.5;
        ok &= pass;
        line += &format!(
            " {name} {:.4}% / {e:.3}{};",
            100.0 * same,
            if pass { "" } else { " FAIL" }
        );
    }
    log(line);
    if !ok {
        return Ok(false);
    }
    let bytes = 4 * len + cache_len;
    let ceiling = copy_ceiling(4 * len, a.runs);
    let mut contenders = vec![
        Contender {
            name: "rotq".into(),
            call: Box::new(|| fused.quantize(&x, &mut ours_out, 0).expect("whole rows")),
            time_scale: 1.0,
        },
        Contender {
            name: "llama.cpp dense ggml_mul_mat (PR 21038) + quantize_row_q4_0 (ggml_cpy)".into(),
            call: Box::new(|| r_dense.run().expect("checked")),
            time_scale: 1.0,
        },
        Contender {
            name: "llama.cpp hinted ggml_mul_mat (FWHT) + quantize_row_q4_0 (ggml_cpy)".into(),
            call: Box::new(|| r_hint.run().expect("checked")),
            time_scale: 1.0,
        },
        Contender {
            name: "ik_llama.cpp ggml_hadamard + quantize_row_q4_0 (ggml_cpy)".into(),
            call: Box::new(|| r_ik.run().expect("checked")),
            time_scale: 1.0,
        },
    ];
    let samples = race(&mut contenders, a.runs);
    let names: Vec<String> = contenders.iter().map(|c| c.name.clone()).collect();
    let shape = format!("{n_rows} rows x {n} f32 -> q4_0 (32k tokens x {H_KV} heads)");
    rows.extend(rows_of(
        "rotate_quantize_q4_0",
        &shape,
        &names,
        &samples,
        bytes,
        ceiling,
        a.threads,
    ));
    Ok(true)
}

fn main() -> Result<(), BoxError> {
    let a = parse_args()?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build_global()?;
    let mut log = |s: String| eprintln!("{s}");
    let ik = Peer::load(PeerKind::IkLlamaCpp, &a.ik)?;
    let llama = Peer::load(PeerKind::LlamaCpp, &a.llama)?;
    log(format!("peers: {}; {}", ik.info(), llama.info()));
    log(format!(
        "rotq: rotq-cpu with {:?}; {} threads for every contender; {} alternating samples each",
        Isa::best(),
        a.threads,
        a.runs
    ));
    let peers = [&ik, &llama];
    let want = |s: &str| a.only.as_deref().is_none_or(|o| o == s);

    // Correctness before any timing.
    let started = Instant::now();
    let mut ok = check_quantize(&peers, &mut log)?;
    if want("decode") {
        ok &= check_attention(&peers, a.threads, &mut log)?;
    }
    if !ok {
        return Err("a correctness check failed: nothing was timed".into());
    }
    log(format!(
        "checks passed in {:.1} s",
        started.elapsed().as_secs_f64()
    ));

    let mut rows = Vec::new();
    let mut all_ok = true;
    if want("fwht") {
        all_ok &= bench_fwht(&ik, &llama, &a, &mut rows, &mut log)?;
    }
    if want("quantize") {
        all_ok &= bench_rotate_quantize(&ik, &llama, &a, &mut rows, &mut log)?;
    }
    if want("decode") {
        all_ok &= bench_decode(&ik, &llama, &a, &mut rows, &mut log)?;
    }

    let mut table = String::new();
    table += "| kernel | shape | peer | rotq GB/s (spread) | peer GB/s (spread) | ratio (spread) | copy ceiling GB/s |\n";
    table += "| --- | --- | --- | --- | --- | --- | --- |\n";
    for r in &rows {
        table += &format!(
            "| {} | {} | {} | {:.2} ({:.2}-{:.2}) | {:.3} ({:.3}-{:.3}) | {:.2}x ({:.2}-{:.2}) | {:.1} |\n",
            r.kernel, r.shape, r.peer, r.ours_gbps, r.ours_gbps_range[0], r.ours_gbps_range[1], r.peer_gbps,
            r.peer_gbps_range[0], r.peer_gbps_range[1], r.ratio, r.ratio_range[0], r.ratio_range[1], r.ceiling_gbps
        );
    }
    if a.json {
        eprint!("{table}");
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print!("{table}");
    }
    if !all_ok {
        return Err(
            "a peer disagreed with rotq on a benchmark's data: that row was not timed".into(),
        );
    }
    Ok(())
}
