//! CUDA decode attention against the oracle on the same cache bytes. Every test but the one of
//! `auto_splits` (host arithmetic) needs a GPU; where there is none each prints `skipped: no
//! CUDA device` and passes.

mod common;

use common::{device, download, upload, Elem, ROWS};
use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use ndarray::Array3;
use proptest::prelude::*;
use rotq_cuda::{
    auto_splits, CacheLayout, CudaAttention, CudaError, CudaKvCache, DecodeConfig, DecodeSeq,
    Device, PrefillConfig, MIN_AUTO_SPLIT_TOKENS,
};
use rotq_reference::rotation::SplitMix64;
use rotq_reference::tolerance::{Op, Precision};
use rotq_reference::{attention_f64, AttentionParams, KvFormat, Rotation, RotationPlan};
use rotq_testkit::rotations::RotationKind;

/// One decode batch to check.
#[derive(Clone, Debug)]
struct Case {
    k_format: KvFormat,
    v_format: KvFormat,
    d: usize,
    d_v: usize,
    h_kv: usize,
    group: usize,
    /// (tokens in the cache, query position) per sequence.
    seqs: Vec<(usize, usize)>,
    causal: bool,
    window: Option<usize>,
    softcap: Option<f64>,
    /// 0 none, 1 Hadamard on Q/K, 2 randomized on Q/K, 3 Hadamard on Q/K and blocks of 32 on V,
    /// 4 explicit matrices on Q/K and on V.
    plan: u8,
    /// Tokens per page of a paged cache; `None`: contiguous.
    page_tokens: Option<usize>,
    config: DecodeConfig,
    seed: u64,
}

impl Case {
    fn plan(&self) -> RotationPlan {
        if self.plan == 4 {
            // Explicit matrices on both sides (compressed-tensors' random-matrix).
            return RotationKind::plan(
                RotationKind::Matrix,
                RotationKind::Matrix,
                self.d,
                self.d_v,
                self.seed,
            );
        }
        let qk = match self.plan {
            0 => RotationKind::None,
            2 => RotationKind::Randomized,
            _ => RotationKind::Hadamard,
        };
        let v = (self.plan == 3).then(|| Rotation::block_hadamard(self.d_v, 32).unwrap());
        RotationPlan {
            qk: qk.build(self.d, self.seed),
            v,
        }
    }

    fn params(&self) -> AttentionParams {
        AttentionParams {
            causal: self.causal,
            window: self.window,
            softcap: self.softcap,
            ..Default::default()
        }
    }

    /// A plain case: q4_0 K, q8_0 V, 128 dims, 2 KV heads of 4 query heads each.
    fn basic() -> Self {
        Self {
            k_format: KvFormat::Q4_0,
            v_format: KvFormat::Q8_0,
            d: 128,
            d_v: 128,
            h_kv: 2,
            group: 4,
            seqs: vec![(100, 99), (37, 36), (1, 0)],
            causal: true,
            window: None,
            softcap: None,
            plan: 1,
            page_tokens: None,
            config: DecodeConfig::default(),
            seed: 1,
        }
    }
}

/// The formats the CUDA backend takes: all of the registry's.
fn cuda_formats() -> Vec<KvFormat> {
    KvFormat::ALL.to_vec()
}

/// Rows of one sequence's cache, rotated by `r` in f64, rounded to f32 and quantized.
fn encode(format: KvFormat, x: &[f32], dim: usize, r: Option<&Rotation>) -> Vec<u8> {
    if x.is_empty() {
        return Vec::new();
    }
    let mut rows: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    if let Some(r) = r {
        r.rotate_rows(&mut rows, false).unwrap();
    }
    let rows: Vec<f32> = rows.iter().map(|&v| v as f32).collect();
    format.quantize_rows(&rows, dim).unwrap()
}

/// The caches of a case, per sequence: (K bytes, V bytes), `n × h_kv` rows each.
fn sequences(c: &Case, plan: &RotationPlan) -> Vec<(Vec<u8>, Vec<u8>)> {
    c.seqs
        .iter()
        .enumerate()
        .map(|(b, &(n, _))| {
            let seed = c.seed ^ (b as u64 * 7919);
            let k = ROWS.f32s(n * c.h_kv * c.d, seed ^ 2);
            let v = ROWS.f32s(n * c.h_kv * c.d_v, seed ^ 3);
            (
                encode(c.k_format, &k, c.d, plan.qk.as_ref()),
                encode(c.v_format, &v, c.d_v, plan.v.as_ref()),
            )
        })
        .collect()
}

/// The oracle for sequence `b`: its query (as the GPU holds it) against its cache bytes.
fn oracle(c: &Case, plan: &RotationPlan, q: &[f64], kb: &[u8], vb: &[u8], b: usize) -> Vec<f64> {
    let (n, pos) = c.seqs[b];
    oracle_rows(c, plan, q, kb, vb, n, pos)
}

/// The oracle for query rows `q` ([n_q, h_q, d], the first at position `pos`) against `n`
/// cached tokens.
fn oracle_rows(
    c: &Case,
    plan: &RotationPlan,
    q: &[f64],
    kb: &[u8],
    vb: &[u8],
    n: usize,
    pos: usize,
) -> Vec<f64> {
    let h_q = c.h_kv * c.group;
    let n_q = q.len() / (h_q * c.d);
    let decode = |f: KvFormat, bytes: &[u8], dim: usize| -> Array3<f64> {
        let vals = if bytes.is_empty() {
            Vec::new()
        } else {
            f.dequantize_rows(bytes, dim).unwrap()
        };
        Array3::from_shape_vec((n, c.h_kv, dim), vals.into_iter().map(f64::from).collect()).unwrap()
    };
    let mut qr = q.to_vec();
    if let Some(r) = &plan.qk {
        r.rotate_rows(&mut qr, false).unwrap();
    }
    let qa = Array3::from_shape_vec((n_q, h_q, c.d), qr).unwrap();
    let (k, v) = (decode(c.k_format, kb, c.d), decode(c.v_format, vb, c.d_v));
    let params = AttentionParams {
        pos_offset: pos,
        ..c.params()
    };
    let out = attention_f64(qa.view(), k.view(), v.view(), &params).unwrap();
    let mut o: Vec<f64> = out.output.iter().copied().collect();
    if let Some(r) = &plan.v {
        r.rotate_rows(&mut o, true).unwrap();
    }
    o
}

/// Lays the sequences' rows into one cache of the case's layout, every other byte 0xFF (NaN
/// scales in most formats, so a kernel reading a row it should not shows up). Returns the bytes
/// and, when paged, the block table and pages per sequence.
fn lay_out(
    c: &Case,
    rows: &[&[u8]],
    row_bytes: usize,
    capacity: usize,
) -> (Vec<u8>, Option<(Vec<u32>, usize)>) {
    let token_bytes = c.h_kv * row_bytes;
    match c.page_tokens {
        None => {
            let mut bytes = vec![0xFFu8; c.seqs.len() * capacity * token_bytes];
            for (b, r) in rows.iter().enumerate() {
                bytes[b * capacity * token_bytes..][..r.len()].copy_from_slice(r);
            }
            (bytes, None)
        }
        Some(pt) => {
            let per_seq = capacity.div_ceil(pt);
            let n_pages = c.seqs.len() * per_seq + 3;
            // Pages dealt in a scrambled order.
            let mut pages: Vec<u32> = (0..n_pages as u32).collect();
            let mut g = SplitMix64::new(c.seed ^ 99);
            for i in (1..pages.len()).rev() {
                pages.swap(i, (g.next_u64() % (i as u64 + 1)) as usize);
            }
            let table: Vec<u32> = pages[..c.seqs.len() * per_seq].to_vec();
            let mut bytes = vec![0xFFu8; n_pages * pt * token_bytes];
            for (b, r) in rows.iter().enumerate() {
                for t in 0..r.len() / token_bytes {
                    let page = table[b * per_seq + t / pt] as usize;
                    let slot = page * pt + t % pt;
                    bytes[slot * token_bytes..][..token_bytes]
                        .copy_from_slice(&r[t * token_bytes..][..token_bytes]);
                }
            }
            (bytes, Some((table, per_seq)))
        }
    }
}

/// The sequences' caches laid out as the case says and uploaded.
struct DeviceCaches {
    k: CudaSlice<u8>,
    v: CudaSlice<u8>,
    /// The block table and its entries per sequence (paged), or none (contiguous).
    table: Option<(Vec<u32>, usize)>,
    capacity: usize,
}

impl DeviceCaches {
    fn new(dev: &Device, c: &Case, per_seq: &[(Vec<u8>, Vec<u8>)], capacity: usize) -> Self {
        let krb = c.k_format.row_bytes(c.d).unwrap();
        let vrb = c.v_format.row_bytes(c.d_v).unwrap();
        let k_rows: Vec<&[u8]> = per_seq.iter().map(|s| s.0.as_slice()).collect();
        let v_rows: Vec<&[u8]> = per_seq.iter().map(|s| s.1.as_slice()).collect();
        let (kb, table) = lay_out(c, &k_rows, krb, capacity);
        let (vb, _) = lay_out(c, &v_rows, vrb, capacity);
        let stream = dev.stream();
        Self {
            k: stream.clone_htod(&kb).unwrap(),
            v: stream.clone_htod(&vb).unwrap(),
            table,
            capacity,
        }
    }

    /// K and V as the kernels take them.
    fn views(&self, c: &Case) -> (CudaKvCache<'_>, CudaKvCache<'_>) {
        let layout = match &self.table {
            None => CacheLayout::Contiguous {
                tokens_per_seq: self.capacity,
            },
            Some((table, per_seq)) => CacheLayout::Paged {
                table,
                pages_per_seq: *per_seq,
                page_tokens: c.page_tokens.unwrap(),
            },
        };
        let k = CudaKvCache {
            format: c.k_format,
            bytes: &self.k,
            n_heads: c.h_kv,
            dim: c.d,
            layout,
        };
        let v = CudaKvCache {
            format: c.v_format,
            bytes: &self.v,
            dim: c.d_v,
            ..k
        };
        (k, v)
    }
}

/// Runs the case on the GPU with Q and output of type `T` and checks it against the oracle.
fn check<T: Elem>(dev: &Device, c: &Case) {
    let plan = c.plan();
    let h_q = c.h_kv * c.group;
    let batch = c.seqs.len();
    let per_seq = sequences(c, &plan);
    let capacity = c.seqs.iter().map(|s| s.0).max().unwrap_or(0) + 5;
    let caches = DeviceCaches::new(dev, c, &per_seq, capacity);
    let (k, v) = caches.views(c);
    let stream = dev.stream();
    let q = ROWS.f32s(batch * h_q * c.d, c.seed ^ 4);
    let q_held: Vec<f64> = q
        .iter()
        .map(|&x| f64::from(T::from_f32(x).to_f32()))
        .collect();
    let qd = upload::<T>(dev, &q);
    let mut out = stream.alloc_zeros::<T>(batch * h_q * c.d_v).unwrap();
    let seqs: Vec<DecodeSeq> = c
        .seqs
        .iter()
        .map(|&(n_tokens, pos)| DecodeSeq { n_tokens, pos })
        .collect();
    let attn = CudaAttention::new(dev, &plan)
        .unwrap()
        .with_config(c.config);
    attn.decode(dev, &qd, h_q, &k, &v, &seqs, &c.params(), &mut out)
        .unwrap_or_else(|e| panic!("{c:?}: {e}"));
    let got: Vec<f64> = download(dev, &out).into_iter().map(f64::from).collect();
    let mut want = Vec::new();
    for b in 0..batch {
        let qb = &q_held[b * h_q * c.d..][..h_q * c.d];
        want.extend(oracle(c, &plan, qb, &per_seq[b].0, &per_seq[b].1, b));
    }
    assert_matches::<T>(&got, &want, &format!("{c:?}"));
}

/// `got` (outputs of type `T`) against the oracle's `want`: NaN in the same places, the rest
/// within the tolerance table of `T` (the test kit's comparison, named by the type).
fn assert_matches<T: Elem>(got: &[f64], want: &[f64], what: &str) {
    let what = format!("{} {what}", std::any::type_name::<T>());
    rotq_testkit::oracle::assert_matches(got, want, Op::Attention, T::PRECISION, &what);
}

/// Every format the backend takes (TurboQuant's MSE formats too) as K (V q8_0) and as V (K
/// q4_0), with a Hadamard plan, paged and contiguous; f32 runs the f32 kernel, f16 the tensor
/// cores where the formats allow.
#[test]
fn every_format_as_k_and_as_v() {
    let Some(dev) = device() else { return };
    for f in cuda_formats() {
        for (k_format, v_format, paged) in
            [(f, KvFormat::Q8_0, None), (KvFormat::Q4_0, f, Some(16))]
        {
            let c = Case {
                k_format,
                v_format,
                page_tokens: paged,
                plan: 3,
                ..Case::basic()
            };
            check::<f32>(dev, &c);
            check::<f16>(dev, &c);
        }
    }
}

/// Head dimensions 64, 256, 12·16 and 5·32, and a V head unlike K's, in decode and in
/// prefill (whose kernel rotates rows of 192 or 160 by blocks of 32 its own way).
#[test]
fn head_dimensions() {
    let Some(dev) = device() else { return };
    for (d, d_v) in [(64, 64), (256, 256), (192, 192), (160, 160), (128, 64)] {
        let c = Case {
            d,
            d_v,
            plan: if d == d_v { 3 } else { 1 },
            ..Case::basic()
        };
        check::<f32>(dev, &c);
        check::<f16>(dev, &c);
        check_prefill::<f16>(dev, &c, 9);
    }
}

/// GQA ratios 1, 4, 8 and 16 with f16 and bf16 queries and outputs.
#[test]
fn groups_and_half_types() {
    let Some(dev) = device() else { return };
    for group in [1, 4, 8, 16] {
        let c = Case {
            group,
            h_kv: 2,
            ..Case::basic()
        };
        check::<f16>(dev, &c);
        check::<bf16>(dev, &c);
    }
}

/// Paired KV heads (`DecodeConfig::pairs`) against the oracle with several pairs per token
/// (4 and 6 KV heads: a wrong pair or head offset shows), contiguous and paged caches (tiles
/// across page boundaries), warps 2 to 16 (3 and 8 pairs per block too), formats whose pairs
/// of rows are whole 16-byte units (q4_0, q8_0, and q5_0 with q6_0 through the formats'
/// accessors) and 64 dimensions, where they are not (q4_0's 36-byte rows: single heads); an
/// odd number of KV heads (single heads) and the knob off; one stage of V rows
/// (`DecodeConfig::split_v`) with and without pairs; decode and prefill rows through the
/// decode kernel.
#[test]
fn paired_heads() {
    let Some(dev) = device() else { return };
    for (k_format, v_format, d) in [
        (KvFormat::Q4_0, KvFormat::Q4_0, 128),
        (KvFormat::Q8_0, KvFormat::Q4_0, 128),
        (KvFormat::Q5_0, KvFormat::Q6_0, 128),
        (KvFormat::Q4_0, KvFormat::Q8_0, 64),
    ] {
        for (h_kv, warps, page_tokens, pairs, split_v) in [
            (4, 2, None, true, false),
            (6, 4, Some(16), true, false),
            (4, 8, Some(50), true, false),
            (4, 16, None, true, false),
            (6, 6, Some(16), true, false),
            (3, 4, Some(16), true, false),
            (4, 4, Some(16), false, false),
            (4, 4, Some(16), true, true),
            (6, 2, None, true, true),
            (3, 2, None, false, true),
        ] {
            let c = Case {
                k_format,
                v_format,
                d,
                d_v: d,
                h_kv,
                seqs: vec![(300, 299), (77, 60), (33, 32)],
                page_tokens,
                config: DecodeConfig {
                    warps,
                    splits: 2,
                    pairs,
                    split_v,
                    ..DecodeConfig::default()
                },
                ..Case::basic()
            };
            check::<f16>(dev, &c);
            // (The last 21 positions of the first sequence as prefill rows.)
            let rows = Case {
                seqs: vec![(300, 279)],
                ..c
            };
            check_prefill_configs::<f16>(
                dev,
                &rows,
                21,
                &[PrefillConfig {
                    flash: false,
                    ..PrefillConfig::default()
                }],
            );
        }
    }
}

/// Masks: not causal, causal with the query before the end of its cache, sliding windows, a
/// soft-cap; empty sequences and empty windows give zeros.
#[test]
fn masks_windows_and_softcap() {
    let Some(dev) = device() else { return };
    let seqs = vec![(300, 299), (300, 150), (0, 0), (64, 63), (33, 40)];
    for (causal, window, softcap) in [
        (false, None, None),
        (true, None, Some(5.0)),
        (true, Some(1), None),
        (true, Some(70), Some(30.0)),
        (false, Some(100), None),
    ] {
        let c = Case {
            seqs: seqs.clone(),
            causal,
            window,
            softcap,
            page_tokens: Some(32),
            ..Case::basic()
        };
        check::<f32>(dev, &c);
        check::<bf16>(dev, &c);
    }
}

/// Every configuration of the search space on one long sequence and a short one (f16: with
/// and without the tensor cores).
#[test]
fn every_configuration() {
    let Some(dev) = device() else { return };
    for config in DecodeConfig::search_space() {
        let c = Case {
            seqs: vec![(1500, 1499), (70, 69)],
            config,
            plan: 2,
            ..Case::basic()
        };
        if !config.tensor_cores {
            check::<f32>(dev, &c);
        }
        check::<f16>(dev, &c);
    }
}

/// NaN and infinities: a NaN in a visible V row reaches its heads' outputs, an infinite K value
/// gives the oracle's infinite or NaN scores, and NaN rows outside the visible range (the
/// padding of `lay_out`) never matter.
#[test]
fn special_values_follow_the_oracle() {
    let Some(dev) = device() else { return };
    // f32 caches, so that single values can be planted.
    let mut c = Case {
        k_format: KvFormat::F32,
        v_format: KvFormat::F32,
        plan: 0,
        seqs: vec![(50, 49)],
        ..Case::basic()
    };
    // Token 20's values start at 20 · h_kv · d.
    let t20 = 20 * c.h_kv * c.d;
    for (at, value, in_k) in [
        (10usize, f32::NAN, false),
        (3, f32::INFINITY, false),
        (7, f32::INFINITY, true),
        (7, f32::NEG_INFINITY, true),
        (t20 + 5, f32::INFINITY, false),
        (t20 + 9, f32::NAN, false),
        (t20 + 3, f32::NEG_INFINITY, true),
    ] {
        c.seed += 1;
        check_planted::<f32>(dev, &c, at, value, in_k);
        // f16 caches and queries: the tensor cores.
        let h = Case {
            k_format: KvFormat::F16,
            v_format: KvFormat::F16,
            ..c.clone()
        };
        check_planted::<f16>(dev, &h, at, value, in_k);
    }
}

/// [`check`] on f32 or f16 caches (`c`'s formats) where value `at` of K (or V) holds `value`.
fn check_planted<T: Elem>(dev: &Device, c: &Case, at: usize, value: f32, in_k: bool) {
    let h_q = c.h_kv * c.group;
    let (n, pos) = c.seqs[0];
    let mut k = ROWS.f32s(n * c.h_kv * c.d, c.seed ^ 2);
    let mut v = ROWS.f32s(n * c.h_kv * c.d_v, c.seed ^ 3);
    if in_k {
        k[at] = value;
    } else {
        v[at] = value;
    }
    let plan = c.plan();
    let bytes = |x: &[f32]| -> Vec<u8> {
        if c.k_format == KvFormat::F16 {
            x.iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect()
        } else {
            x.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
    };
    let (kb, vb) = (bytes(&k), bytes(&v));
    let stream = dev.stream();
    let (kd, vd) = (
        stream.clone_htod(&kb).unwrap(),
        stream.clone_htod(&vb).unwrap(),
    );
    let layout = CacheLayout::Contiguous { tokens_per_seq: n };
    let kc = CudaKvCache {
        format: c.k_format,
        bytes: &kd,
        n_heads: c.h_kv,
        dim: c.d,
        layout,
    };
    let vc = CudaKvCache {
        bytes: &vd,
        dim: c.d_v,
        ..kc
    };
    // Small queries: every weight stays far above the f16 underflow (a weight that rounds to
    // 0 turns an infinite V value into NaN; see the crate docs).
    let q: Vec<f32> = ROWS
        .f32s(h_q * c.d, c.seed ^ 4)
        .into_iter()
        .map(|x| x * 0.02)
        .collect();
    let qd = upload::<T>(dev, &q);
    let mut out = stream.alloc_zeros::<T>(h_q * c.d_v).unwrap();
    let attn = CudaAttention::new(dev, &plan).unwrap();
    attn.decode(
        dev,
        &qd,
        h_q,
        &kc,
        &vc,
        &[DecodeSeq { n_tokens: n, pos }],
        &c.params(),
        &mut out,
    )
    .unwrap();
    let got: Vec<f64> = download(dev, &out).into_iter().map(f64::from).collect();
    let q64: Vec<f64> = q
        .iter()
        .map(|&x| f64::from(T::from_f32(x).to_f32()))
        .collect();
    let want = oracle(c, &plan, &q64, &kb, &vb, 0);
    assert_matches::<T>(&got, &want, &format!("{value} at {at} (K: {in_k})"));

    // Prefill of every position: rows before the planted token must not see it, including in
    // the flash kernel, whose blocks hold rows on both sides of it.
    let q: Vec<f32> = ROWS
        .f32s(n * h_q * c.d, c.seed ^ 6)
        .into_iter()
        .map(|x| x * 0.02)
        .collect();
    let qd = upload::<T>(dev, &q);
    let mut out = stream.alloc_zeros::<T>(n * h_q * c.d_v).unwrap();
    let q64: Vec<f64> = q
        .iter()
        .map(|&x| f64::from(T::from_f32(x).to_f32()))
        .collect();
    let want = oracle_rows(c, &plan, &q64, &kb, &vb, n, 0);
    for (flash, block_n, m_tiles, specialized) in [
        (false, 64, 1, false),
        (true, 64, 1, false),
        (true, 32, 2, false),
        (true, 64, 2, true),
    ] {
        let prefill = PrefillConfig {
            flash,
            m_tiles,
            block_n,
            min_blocks: 1,
            specialized,
            ..PrefillConfig::default()
        };
        let attn = CudaAttention::new(dev, &plan)
            .unwrap()
            .with_prefill_config(prefill);
        let params = AttentionParams {
            pos_offset: 0,
            ..c.params()
        };
        attn.prefill(dev, &qd, n, h_q, &kc, &vc, n, &params, &mut out)
            .unwrap();
        let got: Vec<f64> = download(dev, &out).into_iter().map(f64::from).collect();
        let what = format!("prefill {prefill:?}: {value} at {at} (K: {in_k})");
        assert_matches::<T>(&got, &want, &what);
    }
}

/// Prefill: query rows of one sequence against its cache (the first `seqs` entry: tokens, and
/// the first query's position), contiguous or paged, every mask option, f32 and f16.
fn check_prefill<T: Elem>(dev: &Device, c: &Case, n_q: usize) {
    // The split decode kernel over the shared cache, and the flash kernel in each of its shapes.
    let mut configs = vec![PrefillConfig {
        flash: false,
        ..PrefillConfig::default()
    }];
    // (f32 queries never take the flash kernel. Warp-specialized blocks run on devices of
    // compute capability 9.0 only; elsewhere those configurations take the others' kernel.)
    if !matches!(T::PRECISION, Precision::F32) {
        for (warps, block_n, m_tiles, specialized) in [
            (4, 64, 1, false),
            (8, 32, 1, false),
            (4, 32, 2, false),
            (8, 64, 1, true),
        ] {
            configs.push(PrefillConfig {
                warps,
                block_n,
                m_tiles,
                min_blocks: 1,
                specialized,
                ..PrefillConfig::default()
            });
        }
    }
    check_prefill_configs::<T>(dev, c, n_q, &configs);
}

/// [`check_prefill`] with the given prefill configurations; returns what each ran
/// ([`CudaAttention::prefill_plan`]).
fn check_prefill_configs<T: Elem>(
    dev: &Device,
    c: &Case,
    n_q: usize,
    configs: &[PrefillConfig],
) -> Vec<PrefillConfig> {
    let plan = c.plan();
    let h_q = c.h_kv * c.group;
    let (n, pos) = c.seqs[0];
    let one = Case {
        seqs: vec![(n, pos)],
        ..c.clone()
    };
    let per_seq = sequences(&one, &plan);
    let capacity = n + 3;
    let caches = DeviceCaches::new(dev, &one, &per_seq, capacity);
    let (k, v) = caches.views(c);
    let stream = dev.stream();
    let q = ROWS.f32s(n_q * h_q * c.d, c.seed ^ 5);
    let q_held: Vec<f64> = q
        .iter()
        .map(|&x| f64::from(T::from_f32(x).to_f32()))
        .collect();
    let qd = upload::<T>(dev, &q);
    let mut out = stream.alloc_zeros::<T>(n_q * h_q * c.d_v).unwrap();
    let params = AttentionParams {
        pos_offset: pos,
        ..c.params()
    };
    let want = oracle_rows(c, &plan, &q_held, &per_seq[0].0, &per_seq[0].1, n, pos);
    let mut ran = Vec::new();
    for &prefill in configs {
        let attn = CudaAttention::new(dev, &plan)
            .unwrap()
            .with_config(c.config)
            .with_prefill_config(prefill);
        attn.prefill(dev, &qd, n_q, h_q, &k, &v, n, &params, &mut out)
            .unwrap_or_else(|e| panic!("{c:?} {prefill:?}: {e}"));
        let got: Vec<f64> = download(dev, &out).into_iter().map(f64::from).collect();
        let what = attn
            .prefill_plan::<T>(dev, n_q, h_q, &k, &v, n, pos)
            .unwrap();
        assert_matches::<T>(
            &got,
            &want,
            &format!("prefill n_q={n_q} {prefill:?} (ran {what:?}) {c:?}"),
        );
        ran.push(what);
    }
    ran
}

/// Warp-specialized flash blocks (devices of compute capability 9.0; elsewhere the same
/// configuration runs plain blocks): formats with and without the fast conversions, MHA and
/// GQA, fresh prompts and chunks at the end of a longer cache, windows, soft-cap, paged
/// caches, partial row blocks and tiles, f16 and bf16 — each against the oracle; with f16
/// queries each must actually have taken them there (on an H100 every one of these shapes
/// does; bf16's are printed).
#[test]
fn warp_specialized_prefill_matches_the_oracle() {
    let Some(dev) = device() else { return };
    let hopper = dev.info().compute_capability == (9, 0);
    let config = PrefillConfig {
        min_blocks: 1,
        ..PrefillConfig::default()
    };
    assert!(config.specialized && config.warps == 8);
    use KvFormat::{F16, Q4_0, Q8_0};
    let cases = [
        // (K, V, plan, group, KV heads, (tokens, first position), query rows, window, soft-cap, page)
        (Q8_0, Q8_0, 1, 4, 2, (300, 0), 300, None, None, None),
        (
            Q4_0,
            Q4_0,
            3,
            4,
            2,
            (400, 250),
            150,
            Some(100),
            None,
            Some(16),
        ),
        (Q8_0, Q4_0, 2, 1, 3, (200, 100), 100, None, Some(20.0), None),
        (Q4_0, F16, 1, 8, 1, (150, 113), 37, None, None, Some(32)),
    ];
    for (i, (k_format, v_format, plan, group, h_kv, seq, n_q, window, softcap, page)) in
        cases.into_iter().enumerate()
    {
        let c = Case {
            k_format,
            v_format,
            plan,
            group,
            h_kv,
            seqs: vec![seq],
            window,
            softcap,
            page_tokens: page,
            seed: 40 + i as u64,
            ..Case::basic()
        };
        let ran = check_prefill_configs::<f16>(dev, &c, n_q, &[config]);
        let ran_bf16 = check_prefill_configs::<bf16>(dev, &c, n_q, &[config]);
        println!(
            "{k_format}/{v_format} group {group}, bf16: ran {:?}",
            ran_bf16[0]
        );
        let r = ran[0];
        assert_eq!(
            r.specialized, hopper,
            "{k_format}/{v_format} group {group}: {r:?}"
        );
    }
}

/// Odd warp counts in the flash kernel: its queries sit after the tiles' space, which ends on
/// an 8-byte boundary when the warp count is odd; they are moved to 16 bytes (they are stored
/// and read 16 bytes at a time).
#[test]
fn prefill_with_odd_warp_counts() {
    let Some(dev) = device() else { return };
    let c = Case {
        k_format: KvFormat::Q8_0,
        v_format: KvFormat::Q8_0,
        seqs: vec![(150, 113)],
        ..Case::basic()
    };
    let configs: Vec<PrefillConfig> = [(1, 2), (3, 2), (3, 1), (5, 1)]
        .into_iter()
        .map(|(warps, m_tiles)| PrefillConfig {
            warps,
            block_n: 32,
            m_tiles,
            min_blocks: 1,
            ..PrefillConfig::default()
        })
        .collect();
    check_prefill_configs::<f16>(dev, &c, 37, &configs);
}

/// Prefill against the oracle: a fresh prompt (queries at 0..), a chunk at the end of a longer
/// cache, windows and soft-cap, contiguous and paged.
#[test]
fn prefill_matches_the_oracle() {
    let Some(dev) = device() else { return };
    for (n_kv, pos, n_q, causal, window, softcap, page_tokens) in [
        (77usize, 0usize, 77usize, true, None, None, None),
        (150, 113, 37, true, None, None, Some(16)),
        (150, 100, 50, true, Some(40), Some(20.0), None),
        (60, 0, 9, false, None, None, Some(32)),
        (0, 0, 5, true, None, None, None),
    ] {
        for (k_format, v_format, plan) in [
            (KvFormat::Q8_0, KvFormat::Q8_0, 1u8),
            (KvFormat::Q4_0, KvFormat::F16, 3),
            (KvFormat::Q5_1, KvFormat::Q4_1, 2),
        ] {
            let c = Case {
                k_format,
                v_format,
                plan,
                seqs: vec![(n_kv, pos)],
                causal,
                window,
                softcap,
                page_tokens,
                ..Case::basic()
            };
            check_prefill::<f32>(dev, &c, n_q);
            check_prefill::<f16>(dev, &c, n_q);
        }
    }
    // Other groups: the tensor-core kernel takes 8, 8, 2 and 1 query rows per block.
    for (group, h_kv) in [(1usize, 3usize), (2, 2), (8, 1), (16, 1)] {
        let c = Case {
            group,
            h_kv,
            seqs: vec![(150, 113)],
            window: Some(40),
            page_tokens: Some(16),
            ..Case::basic()
        };
        check_prefill::<f16>(dev, &c, 37);
        check_prefill::<bf16>(dev, &c, 37);
    }
}

/// Explicit-matrix plans (a checkpoint's random-matrix transforms) on both sides: decode over
/// contiguous and paged caches of block and row formats, f32 and f16 queries, and prefill
/// through the decode kernel and the flash kernel.
#[test]
fn explicit_matrix_plans_follow_the_oracle() {
    let Some(dev) = device() else { return };
    for (k_format, v_format, page_tokens) in [
        (KvFormat::Q8_0, KvFormat::Q4_0, None),
        (KvFormat::Q4_0, KvFormat::Tq4, Some(16)),
        (KvFormat::F16, KvFormat::Q8_0, Some(32)),
    ] {
        let c = Case {
            k_format,
            v_format,
            page_tokens,
            plan: 4,
            ..Case::basic()
        };
        check::<f32>(dev, &c);
        check::<f16>(dev, &c);
    }
    let c = Case {
        plan: 4,
        k_format: KvFormat::Q8_0,
        v_format: KvFormat::Q8_0,
        ..Case::basic()
    };
    check_prefill::<f16>(dev, &c, 37);
    check_prefill::<bf16>(dev, &c, 37);
}

/// Bad calls are typed errors, before anything runs.
#[test]
fn bad_inputs_are_typed_errors() {
    let Some(dev) = device() else { return };
    let s = dev.stream();
    let (d, h_kv, n) = (128, 2, 40);
    let rb = KvFormat::Q8_0.row_bytes(d).unwrap();
    let kd = s.alloc_zeros::<u8>(n * h_kv * rb).unwrap();
    let layout = CacheLayout::Contiguous { tokens_per_seq: n };
    let k = CudaKvCache {
        format: KvFormat::Q8_0,
        bytes: &kd,
        n_heads: h_kv,
        dim: d,
        layout,
    };
    let q = s.alloc_zeros::<f32>(8 * d).unwrap();
    let mut out = s.alloc_zeros::<f32>(8 * d).unwrap();
    let attn = CudaAttention::new(dev, &RotationPlan::none()).unwrap();
    let ok = [DecodeSeq {
        n_tokens: n,
        pos: n - 1,
    }];
    let p = AttentionParams::default();
    assert!(attn.decode(dev, &q, 8, &k, &k, &ok, &p, &mut out).is_ok());
    let input = |r: Result<(), CudaError>| matches!(r, Err(CudaError::Input(_)));
    // Bytes are checked against the named format's rows (f32's are larger than q8_0's),
    // never read as another format's; vLLM's keys at a length their Hadamard does not take
    // are refused.
    let wide = CudaKvCache {
        format: KvFormat::F32,
        ..k
    };
    assert!(KvFormat::F32.row_bytes(d).unwrap() > rb);
    assert!(input(attn.decode(dev, &q, 8, &wide, &k, &ok, &p, &mut out)));
    assert!(input(attn.decode(dev, &q, 8, &k, &wide, &ok, &p, &mut out)));
    assert!(rotq_cuda::CudaCodec::new(dev, KvFormat::VllmK4, 96, None).is_err());
    // Too many tokens for the cache.
    assert!(input(attn.decode(
        dev,
        &q,
        8,
        &k,
        &k,
        &[DecodeSeq {
            n_tokens: n + 1,
            pos: n
        }],
        &p,
        &mut out
    )));
    // Query heads not a multiple of KV heads; wrong query length.
    assert!(input(attn.decode(dev, &q, 7, &k, &k, &ok, &p, &mut out)));
    let short = s.alloc_zeros::<f32>(8 * d - 1).unwrap();
    assert!(input(
        attn.decode(dev, &short, 8, &k, &k, &ok, &p, &mut out)
    ));
    // A position offset (positions are per sequence), a NaN scale, a bad soft-cap.
    for bad in [
        AttentionParams {
            pos_offset: 1,
            ..Default::default()
        },
        AttentionParams {
            scale: Some(f64::NAN),
            ..Default::default()
        },
        AttentionParams {
            scale: Some(1e-300),
            ..Default::default()
        },
        AttentionParams {
            softcap: Some(-1.0),
            ..Default::default()
        },
    ] {
        assert!(
            input(attn.decode(dev, &q, 8, &k, &k, &ok, &bad, &mut out)),
            "{bad:?}"
        );
    }
    // A head dimension that is not a multiple of 32, and a group over the limit.
    let odd = CudaKvCache {
        format: KvFormat::F16,
        dim: 48,
        ..k
    };
    assert!(input(
        attn.decode(dev, &q, 8, &odd, &odd, &ok, &p, &mut out)
    ));
    let wide_q = s.alloc_zeros::<f32>(34 * d).unwrap();
    let mut wide_out = s.alloc_zeros::<f32>(34 * d).unwrap();
    assert!(input(attn.decode(
        dev,
        &wide_q,
        34,
        &k,
        &k,
        &ok,
        &p,
        &mut wide_out
    )));
    // A block table entry outside the cache.
    let table = [0u32, 7];
    let paged = CudaKvCache {
        layout: CacheLayout::Paged {
            table: &table,
            pages_per_seq: 2,
            page_tokens: 20,
        },
        ..k
    };
    assert!(input(
        attn.decode(dev, &q, 8, &paged, &paged, &ok, &p, &mut out)
    ));
    // A paged sequence longer than its table.
    let long = [DecodeSeq {
        n_tokens: 41,
        pos: 40,
    }];
    let table = [0u32, 1];
    let paged = CudaKvCache {
        layout: CacheLayout::Paged {
            table: &table,
            pages_per_seq: 2,
            page_tokens: 20,
        },
        ..k
    };
    assert!(attn
        .decode(dev, &q, 8, &paged, &paged, &ok, &p, &mut out)
        .is_ok());
    assert!(input(
        attn.decode(dev, &q, 8, &paged, &paged, &long, &p, &mut out)
    ));
    // Prefill: more tokens than the cache holds, a wrong query length, positions that
    // overflow.
    assert!(input(attn.prefill(
        dev,
        &q,
        1,
        8,
        &k,
        &k,
        n + 1,
        &p,
        &mut out
    )));
    assert!(input(attn.prefill(dev, &q, 2, 8, &k, &k, n, &p, &mut out)));
    let far = AttentionParams {
        pos_offset: usize::MAX,
        ..Default::default()
    };
    assert!(input(
        attn.prefill(dev, &q, 1, 8, &k, &k, n, &far, &mut out)
    ));
    assert!(attn.prefill(dev, &q, 1, 8, &k, &k, n, &p, &mut out).is_ok());
    // A plan for another head dimension.
    let plan = RotationPlan {
        qk: Some(Rotation::hadamard(64).unwrap()),
        v: None,
    };
    let other = CudaAttention::new(dev, &plan).unwrap();
    assert!(input(other.decode(dev, &q, 8, &k, &k, &ok, &p, &mut out)));
}

fn cases() -> impl Strategy<Value = Case> {
    let formats = proptest::sample::select(cuda_formats());
    (
        formats.clone(),
        formats,
        proptest::sample::select(vec![64usize, 128, 192]),
        proptest::sample::select(vec![1usize, 4, 8]),
        proptest::collection::vec((0usize..400, 0usize..450), 1..4),
        any::<bool>(),
        proptest::option::of(1usize..200),
        0u8..5,
        proptest::option::of(proptest::sample::select(vec![1usize, 16, 32, 50])),
        proptest::sample::select(DecodeConfig::search_space()),
        any::<u64>(),
    )
        .prop_map(
            |(
                k_format,
                v_format,
                d,
                group,
                seqs,
                causal,
                window,
                plan,
                page_tokens,
                config,
                seed,
            )| {
                // A length a format refuses (vLLM's keys take powers of two) becomes 128.
                let d = if k_format.check_row_len(d).is_ok() && v_format.check_row_len(d).is_ok() {
                    d
                } else {
                    128
                };
                Case {
                    k_format,
                    v_format,
                    d,
                    d_v: d,
                    h_kv: 2,
                    group,
                    seqs,
                    causal,
                    window,
                    softcap: None,
                    plan,
                    page_tokens,
                    config,
                    seed,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn decode_matches_the_oracle(c in cases()) {
        if let Some(dev) = device() {
            check::<f32>(dev, &c);
            check::<f16>(dev, &c);
        }
    }
}

proptest! {
    /// Automatic splits (no device needed): a power of two; above one only while the blocks
    /// stay within two per multiprocessor and every slice keeps its minimum of tokens; and the
    /// largest such (twice as many would break one of the two).
    #[test]
    fn automatic_splits_fill_the_device_with_long_slices(
        sms in 1usize..300,
        units in prop_oneof![0usize..16, 0usize..3000],
        longest in prop_oneof![0usize..20_000, 0usize..2_000_000],
    ) {
        let s = auto_splits(sms, units, longest);
        prop_assert!(s.is_power_of_two());
        // (No units counts as one.)
        let units = units.max(1);
        if s > 1 {
            prop_assert!(s * units <= 2 * sms, "{s} x {units} blocks on {sms}");
            prop_assert!(longest / s >= MIN_AUTO_SPLIT_TOKENS, "{longest} tokens in {s}");
        }
        let twice = 2 * s;
        prop_assert!(
            twice * units > 2 * sms || longest / twice < MIN_AUTO_SPLIT_TOKENS,
            "{twice} slices of {longest} tokens, {units} units, {sms} multiprocessors"
        );
    }
}

/// The default configuration on sequences long enough for several automatic slices (the other
/// tests' sequences take one), contiguous and paged, against the oracle.
#[test]
fn automatic_splits_match_the_oracle() {
    let Some(dev) = device() else { return };
    for page_tokens in [None, Some(64)] {
        let c = Case {
            k_format: KvFormat::Q8_0,
            v_format: KvFormat::Q4_0,
            seqs: vec![(4500, 4499), (2100, 1800), (5, 4)],
            page_tokens,
            ..Case::basic()
        };
        // (The 2 KV heads take one paired block per sequence and slice.)
        let sms = dev.info().multiprocessors as usize;
        let splits = auto_splits(sms, c.seqs.len(), 4500);
        assert!(
            splits > 1 || sms < 3,
            "{splits} slices on {sms} multiprocessors"
        );
        check::<f16>(dev, &c);
        check::<bf16>(dev, &c);
    }
}

/// Eight threads decode at once on one device, each its own case (K and V formats, contiguous
/// or paged, rotation plans, f16 and f32), and every result is checked against the oracle.
#[test]
fn attention_from_eight_threads_at_once() {
    let Some(dev) = device() else { return };
    let all = KvFormat::BLOCKS;
    let cases: Vec<Case> = (0..8usize)
        .map(|t| Case {
            k_format: all[(3 + t) % all.len()],
            v_format: all[(5 + 2 * t) % all.len()],
            seqs: vec![(60 + 9 * t, 59 + 9 * t), (33, 20), (1, 0)],
            plan: (t % 4) as u8,
            page_tokens: (t % 2 == 1).then_some(16),
            seed: 900 + t as u64,
            ..Case::basic()
        })
        .collect();
    std::thread::scope(|s| {
        for (t, c) in cases.iter().enumerate() {
            s.spawn(move || {
                if t % 2 == 0 {
                    check::<f16>(dev, c)
                } else {
                    check::<f32>(dev, c)
                }
            });
        }
    });
}

/// Tensor-parallel engines shard heads across GPUs: each device opened, compiled for and used
/// from its own thread at the same time (codec, decode, prefill through the decode kernel)
/// follows the oracle, and a codec made for one device refuses the other's buffers. With fewer
/// than two devices it says so and checks nothing more.
#[test]
fn two_devices_from_their_own_threads() {
    let Some(dev0) = device() else { return };
    let dev1 = match Device::open("cuda:1") {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipped: no second CUDA device ({e})");
            return;
        }
    };
    std::thread::scope(|s| {
        for (i, dev) in [dev0, &dev1].into_iter().enumerate() {
            s.spawn(move || {
                for (t, k_format) in [KvFormat::Q8_0, KvFormat::Q4_0, KvFormat::Tq4]
                    .into_iter()
                    .enumerate()
                {
                    let c = Case {
                        k_format,
                        plan: (t % 4) as u8,
                        page_tokens: (t % 2 == 1).then_some(16),
                        seed: 40 + 10 * i as u64 + t as u64,
                        ..Case::basic()
                    };
                    check::<f32>(dev, &c);
                    check::<f16>(dev, &c);
                }
            });
        }
    });
    let codec = rotq_cuda::CudaCodec::new(&dev1, KvFormat::Q8_0, 128, None).unwrap();
    let rows = dev0.stream().alloc_zeros::<f32>(128).unwrap();
    let mut cache = dev0.stream().alloc_zeros::<u8>(136).unwrap();
    let target = rotq_cuda::CacheTarget::contiguous(1, 0);
    assert!(matches!(
        codec.quantize(dev0, &rows, &mut cache, target),
        Err(CudaError::WrongDevice { .. })
    ));
}

/// A decode whose partial results cannot fit in the device's memory is
/// `CudaError::OutOfMemory` (no panic, no launch), and the device works normally afterwards.
#[test]
fn out_of_memory_is_a_typed_error() {
    let Some(dev) = device() else { return };
    // 40,000 sequences of 32k tokens that share one cache through the block table: the cache
    // is 2.4 MB per side, but the partial results (16 query heads x 1,024 slices of 131 floats
    // per sequence, whatever the warps and splits) would take over 340 GB.
    let (d, group, n, page_tokens, batch) = (128, 16, 32768, 256, 40_000);
    let rows = ROWS.f32s(n * d, 11);
    let stream = dev.stream();
    let k_bytes = stream
        .clone_htod(&encode(KvFormat::Q4_0, &rows, d, None))
        .unwrap();
    let v_bytes = stream
        .clone_htod(&encode(KvFormat::Q4_0, &ROWS.f32s(n * d, 12), d, None))
        .unwrap();
    let pages = n / page_tokens;
    let table: Vec<u32> = (0..batch).flat_map(|_| 0..pages as u32).collect();
    let layout = CacheLayout::Paged {
        table: &table,
        pages_per_seq: pages,
        page_tokens,
    };
    let k = CudaKvCache {
        format: KvFormat::Q4_0,
        bytes: &k_bytes,
        n_heads: 1,
        dim: d,
        layout,
    };
    let v = CudaKvCache {
        bytes: &v_bytes,
        ..k
    };
    let q = upload::<f16>(dev, &ROWS.f32s(batch * group * d, 13));
    let mut out = stream.alloc_zeros::<f16>(batch * group * d).unwrap();
    let seqs = vec![
        DecodeSeq {
            n_tokens: n,
            pos: n - 1
        };
        batch
    ];
    let attn = CudaAttention::new(dev, &RotationPlan::default())
        .unwrap()
        .with_config(DecodeConfig {
            warps: 16,
            splits: 1024,
            ..DecodeConfig::default()
        });
    let params = AttentionParams::default();
    match attn.decode(dev, &q, group, &k, &v, &seqs, &params, &mut out) {
        Err(CudaError::OutOfMemory { what }) => assert!(what.contains("partial"), "{what}"),
        other => panic!("expected CudaError::OutOfMemory, got {other:?}"),
    }
    drop((q, out, k_bytes, v_bytes));
    check::<f16>(dev, &Case::basic());
}

/// The CUDA handles can be shared between threads (checked when this file compiles; no GPU
/// needed).
#[test]
fn handles_are_send_and_sync() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Device>();
    shareable::<CudaAttention>();
    shareable::<rotq_cuda::CudaRotation>();
    shareable::<rotq_cuda::CudaCodec>();
}
