//! `rotq::cache::RotatedKvCache` on the CPU and on CUDA: the same calls (a prompt appended in
//! two chunks, decode steps, a context shift, a removal, prefill and decode attention) on a
//! cache of each backend with the same spec and data. Each backend's attention is held to the
//! tolerance table against the oracle on its own bytes, its shift to the oracle's
//! `shift_cache`, its removal to its own bytes with the rows cut; and the two backends' bytes
//! are compared: equal where the kernels are byte-exact (no rotation: both equal the oracle's
//! quantizer), else differing in at most one block in twenty (a rotated value within f32
//! rounding of a code boundary; see `rotq::reference::tolerance`).
//!
//! Every test runs for a contiguous cache and a paged one (pages of 16 tokens, which divide
//! none of the lengths): the same checks, and the two layouts' CPU and CUDA bytes compared
//! token by token.
//!
//! The CUDA tests need a GPU; where none opens each prints `skipped: no CUDA device` and
//! passes, unless `ROTQ_REQUIRE_CUDA` is set (the GPU bundle's run.sh sets it), which makes
//! that a failure. The sequence also runs on the CPU alone, so its checks run everywhere; there
//! also for the TurboQuant row formats, which the CUDA backend does not take.

mod common;

use common::{random, LAYOUTS};
use half::f16;
use ndarray::Array3;
use rotq::cache::{Backend, CacheSpec, Paging, RotatedKvCache};
use rotq::cuda::CudaError;
use rotq::reference::attention::attention_f64;
use rotq::reference::rope::{shift_cache, Rope, RopeVariant};
use rotq::reference::tolerance::{tolerance, Op, Precision};
use rotq::{AttentionParams, Error, KvFormat, Rotation, RotationPlan};
use std::io::Write;
use std::sync::OnceLock;

/// cuda:0, opened once for every test of this file; `None` where there is none, after
/// printing the skip line once (straight to stderr, which the test harness does not capture).
fn cuda() -> Option<Backend> {
    static BACKEND: OnceLock<Option<Backend>> = OnceLock::new();
    BACKEND
        .get_or_init(|| match Backend::open("cuda:0") {
            Ok(b) => Some(b),
            Err(Error::Cuda(e @ (CudaError::NoDriver | CudaError::NoDevice { .. }))) => {
                // On a GPU machine (the bundle's run.sh sets this) a missing device is a failure.
                if std::env::var_os("ROTQ_REQUIRE_CUDA").is_some() {
                    panic!("ROTQ_REQUIRE_CUDA is set but there is no CUDA device: {e}");
                }
                let _ = writeln!(std::io::stderr(), "skipped: no CUDA device");
                None
            }
            Err(e) => panic!("a CUDA device is present but could not be opened: {e}"),
        })
        .clone()
}

/// One cache configuration and its attention options.
#[derive(Clone, Debug)]
struct Case {
    k_format: KvFormat,
    v_format: KvFormat,
    /// 0 none; 1 Hadamard on Q/K; 2 randomized on Q/K and blocks of 32 on V; 3 explicit
    /// matrices on Q/K and on V.
    plan: u8,
    h_kv: usize,
    /// Query heads per KV head.
    group: usize,
    d: usize,
    window: Option<usize>,
    softcap: Option<f64>,
}

impl Case {
    fn spec(&self, paging: Paging) -> CacheSpec {
        let (qk, v) = match self.plan {
            0 => (None, None),
            1 => (Some(Rotation::hadamard(self.d).unwrap()), None),
            // Explicit matrices (a checkpoint's random-matrix transforms) on both sides.
            3 => {
                let m = |seed| {
                    let r = Rotation::randomized(self.d, seed).unwrap();
                    Some(Rotation::matrix(r.to_matrix()).unwrap())
                };
                (m(78), m(79))
            }
            _ => (
                Some(Rotation::randomized(self.d, 77).unwrap()),
                Some(Rotation::block_hadamard(self.d, 32).unwrap()),
            ),
        };
        CacheSpec {
            k_format: self.k_format,
            v_format: self.v_format,
            plan: RotationPlan { qk, v },
            n_heads: self.h_kv,
            head_dim: self.d,
            v_dim: self.d,
            capacity: 64,
            paging,
            query: rotq::QueryMode::Auto,
        }
    }

    fn h_q(&self) -> usize {
        self.h_kv * self.group
    }

    /// Causal attention whose first query sits at `pos_offset`.
    fn params(&self, pos_offset: usize) -> AttentionParams {
        AttentionParams {
            causal: true,
            pos_offset,
            window: self.window,
            softcap: self.softcap,
            ..Default::default()
        }
    }

    /// `n` tokens' rows (K and V alike: `d` values per head).
    fn rows(&self, n: usize, seed: u64) -> Vec<f32> {
        random(n * self.h_kv * self.d, seed)
    }
}

/// A case with no window and no soft-cap.
fn case(
    k_format: KvFormat,
    v_format: KvFormat,
    plan: u8,
    h_kv: usize,
    group: usize,
    d: usize,
) -> Case {
    Case {
        k_format,
        v_format,
        plan,
        h_kv,
        group,
        d,
        window: None,
        softcap: None,
    }
}

/// The cases of both backends: GQA, MHA and MQA; q8_0, q4_0 and others, the TurboQuant row
/// formats (alone, with QJL, beside a block format) and vLLM's slot parts; with and without
/// rotations (including an m·2^k Hadamard and explicit matrices); windows and soft-caps.
fn cases() -> Vec<Case> {
    let windowed = |c: Case| Case {
        window: Some(20),
        softcap: Some(30.0),
        ..c
    };
    vec![
        case(KvFormat::Q8_0, KvFormat::Q8_0, 0, 2, 4, 128),
        case(KvFormat::Q4_0, KvFormat::Q8_0, 1, 2, 4, 128),
        windowed(case(KvFormat::Q4_0, KvFormat::Q4_0, 2, 4, 1, 64)),
        case(KvFormat::Iq4Nl, KvFormat::F16, 0, 1, 8, 128),
        case(KvFormat::Q5_1, KvFormat::Iq4Nl, 1, 2, 2, 96),
        case(KvFormat::Q4_0, KvFormat::Q8_0, 3, 2, 4, 128),
        case(KvFormat::Tq4, KvFormat::Tq3Qjl, 1, 2, 4, 128),
        windowed(case(KvFormat::Tq2, KvFormat::Tq4, 2, 4, 1, 64)),
        case(KvFormat::Tq3, KvFormat::Tq2Qjl, 0, 1, 8, 96),
        case(KvFormat::Tq4Qjl, KvFormat::Q8_0, 2, 2, 2, 64),
        case(KvFormat::Tq4Qjl, KvFormat::Tq3, 1, 2, 4, 128),
        case(KvFormat::VllmK4, KvFormat::VllmV4, 0, 2, 4, 128),
        case(KvFormat::VllmFp8, KvFormat::VllmV3, 0, 1, 8, 64),
    ]
}

/// The oracle on `cache`'s own bytes: Q (as f64) rotated, K and V dequantized, the output
/// rotated back.
fn oracle(
    cache: &RotatedKvCache,
    q: &[f64],
    n_q: usize,
    h_q: usize,
    p: &AttentionParams,
) -> Vec<f64> {
    let s = cache.spec();
    let (kb, vb) = cache.bytes().unwrap();
    let n = cache.len();
    let decode = |f: KvFormat, b: &[u8], dim: usize| {
        let vals: Vec<f64> = f
            .dequantize_rows(b, dim)
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        Array3::from_shape_vec((n, s.n_heads, dim), vals).unwrap()
    };
    let mode = cache.query_mode();
    let q32: Vec<f32> = q.iter().map(|&v| v as f32).collect();
    let qr = rotq_testkit::oracle::oracle_queries(&q32, s.plan.qk.as_ref(), mode);
    let qa = Array3::from_shape_vec((n_q, h_q, s.head_dim), qr).unwrap();
    let k = decode(s.k_format, &kb, s.head_dim);
    let v = decode(s.v_format, &vb, s.v_dim);
    let out = attention_f64(qa.view(), k.view(), v.view(), p).unwrap();
    let mut o: Vec<f64> = out.output.iter().copied().collect();
    if let Some(r) = &s.plan.v {
        r.rotate_rows(&mut o, true).unwrap();
    }
    o
}

/// `n_q` query rows from position `pos_offset` through `cache.attention`, against the oracle
/// on its bytes (where the first token is at 0) under the f32 attention tolerance.
fn check_attention(
    cache: &RotatedKvCache,
    c: &Case,
    n_q: usize,
    pos_offset: usize,
    seed: u64,
    what: &str,
) {
    let q = random(n_q * c.h_q() * c.d, seed);
    let p = c.params(pos_offset);
    let got = cache.attention(&q, n_q, c.h_q(), &p).unwrap();
    let got: Vec<f64> = got.into_iter().map(f64::from).collect();
    let q64: Vec<f64> = q.iter().map(|&v| f64::from(v)).collect();
    let first = cache.positions().first().copied().unwrap_or(0);
    let want = oracle(cache, &q64, n_q, c.h_q(), &c.params(pos_offset - first));
    if let Err(m) = tolerance(Op::Attention, Precision::F32).check(&got, &want) {
        let paging = cache.spec().paging;
        panic!(
            "{} {paging:?} {c:?} {what} (n_q {n_q}): {m}",
            cache.backend().name()
        );
    }
}

fn owned(cache: &RotatedKvCache) -> (Vec<u8>, Vec<u8>) {
    let (k, v) = cache.bytes().unwrap();
    (k.into_owned(), v.into_owned())
}

/// A shift of `tokens` by `delta`: rows outside the range and all of V keep their bytes, and
/// each shifted token is within 5% of the oracle's re-quantization error of the exact target
/// (the shifted, rotated dequantized keys), as the CUDA kernel tests hold it.
fn check_shift(
    cache: &mut RotatedKvCache,
    tokens: std::ops::Range<usize>,
    delta: i64,
    rope: &Rope,
) {
    let s = cache.spec().clone();
    let (k0, v0) = owned(cache);
    cache.shift(tokens.clone(), delta, rope).unwrap();
    let (k1, v1) = owned(cache);
    assert_eq!(v1, v0, "V changed");
    let tb = s.k_format.row_bytes(s.head_dim).unwrap() * s.n_heads;
    let to_f64 = |b: &[u8]| -> Vec<f64> {
        s.k_format
            .dequantize_rows(b, s.head_dim)
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    };
    let dist = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f64>()
            .sqrt()
    };
    for t in 0..cache.len() {
        let span = t * tb..(t + 1) * tb;
        if !tokens.contains(&t) {
            assert_eq!(
                k1[span.clone()],
                k0[span],
                "token {t} outside the shift changed"
            );
            continue;
        }
        let mut oracle = k0[span.clone()].to_vec();
        shift_cache(
            s.k_format,
            &mut oracle,
            s.head_dim,
            s.plan.qk.as_ref(),
            rope,
            delta,
        )
        .unwrap();
        let mut target = to_f64(&k0[span.clone()]);
        if let Some(r) = &s.plan.qk {
            r.rotate_rows(&mut target, true).unwrap();
        }
        rope.shift_rows_of(&mut target, s.head_dim, delta).unwrap();
        if let Some(r) = &s.plan.qk {
            r.rotate_rows(&mut target, false).unwrap();
        }
        let e_oracle = dist(&to_f64(&oracle), &target);
        let e_got = dist(&to_f64(&k1[span]), &target);
        let norm = dist(&target, &vec![0.0; target.len()]);
        assert!(
            e_got <= 1.05 * e_oracle + 1e-6 * norm,
            "{} {s:?} token {t}: shifted {e_got:e}, oracle {e_oracle:e}",
            cache.backend().name()
        );
    }
}

/// The bytes after a removal of `tokens`: those before it, with the tokens' rows cut.
fn check_remove(cache: &mut RotatedKvCache, tokens: std::ops::Range<usize>) {
    let s = cache.spec().clone();
    let (k0, v0) = owned(cache);
    let len = cache.len();
    cache.remove(tokens.clone()).unwrap();
    assert_eq!(cache.len(), len - tokens.len());
    let cut = |b: &[u8], f: KvFormat, dim: usize| {
        let tb = f.row_bytes(dim).unwrap() * s.n_heads;
        [&b[..tokens.start * tb], &b[tokens.end * tb..]].concat()
    };
    let (k1, v1) = owned(cache);
    assert!(
        k1 == cut(&k0, s.k_format, s.head_dim),
        "{}: K after removal",
        cache.backend().name()
    );
    assert!(
        v1 == cut(&v0, s.v_format, s.v_dim),
        "{}: V after removal",
        cache.backend().name()
    );
}

/// The sequence of calls of an engine on `backend`, each step checked against the oracle;
/// returns the bytes after the appends (before the shift).
fn sequence(c: &Case, backend: &Backend, paging: Paging) -> (Vec<u8>, Vec<u8>) {
    let mut cache = RotatedKvCache::on(c.spec(paging), backend).unwrap();
    // A prompt of 40 tokens in two chunks, and prefill attention of its last 9 rows.
    let (k, v) = (c.rows(40, 1), c.rows(40, 2));
    let split = 17 * c.h_kv * c.d;
    cache.append(&k[..split], &v[..split]).unwrap();
    cache.append(&k[split..], &v[split..]).unwrap();
    check_attention(&cache, c, 9, 31, 3, "prefill");
    // Decode steps: a token appended, one query row at its position.
    for step in 0..3u64 {
        cache
            .append(&c.rows(1, 10 + step), &c.rows(1, 20 + step))
            .unwrap();
        check_attention(&cache, c, 1, cache.len() - 1, 30 + step, "decode");
    }
    let appended = owned(&cache);
    // llama.cpp's context shift: 3 tokens kept, a page's worth (16) dropped from inside the
    // first page, the later tokens' keys shifted down to close the gap.
    let rope = Rope {
        freq_base: 500_000.0,
        ..Rope::new(RopeVariant::Neox, c.d)
    };
    check_remove(&mut cache, 3..19);
    let len = cache.len();
    check_shift(&mut cache, 3..len, -16, &rope);
    check_attention(&cache, c, 1, len - 1, 40, "decode after a context shift");
    // The oldest 5 dropped: the rest keep their positions (5..) until shifted down.
    check_remove(&mut cache, 0..5);
    let len = cache.len();
    check_attention(&cache, c, 1, len + 4, 41, "decode from position 5");
    check_shift(&mut cache, 0..len, -5, &Rope::new(RopeVariant::Normal, c.d));
    // A prefill chunk appended at the end, then one decode step.
    cache.append(&c.rows(6, 42), &c.rows(6, 43)).unwrap();
    let len = cache.len();
    check_attention(
        &cache,
        c,
        6,
        len - 6,
        44,
        "prefill after shifts and removals",
    );
    check_attention(
        &cache,
        c,
        1,
        len - 1,
        45,
        "decode after shifts and removals",
    );
    // A whole page dropped from the front (the tokens stay in their pages when paged).
    check_remove(&mut cache, 0..16);
    check_attention(
        &cache,
        c,
        1,
        len - 1,
        46,
        "decode after a whole page dropped",
    );
    // An empty cache: every row sees nothing.
    let len = cache.len();
    check_remove(&mut cache, 0..len);
    let out = cache
        .attention(&random(2 * c.h_q() * c.d, 47), 2, c.h_q(), &c.params(0))
        .unwrap();
    assert!(
        out.iter().all(|&x| x == 0.0),
        "{} {paging:?}: attention over no token",
        backend.name()
    );
    appended
}

/// CPU and CUDA bytes of one cache of rows of `d`: equal without a rotation, else at most one
/// block (a row format's row) in twenty differs.
fn compare_bytes(cpu: &[u8], gpu: &[u8], format: KvFormat, d: usize, rotated: bool, what: &str) {
    assert_eq!(cpu.len(), gpu.len(), "{what}: lengths");
    if !rotated {
        assert!(
            cpu == gpu,
            "{what}: first difference at byte {:?}",
            cpu.iter().zip(gpu).position(|(a, b)| a != b)
        );
        return;
    }
    // A row format's unit is the whole row.
    let bb = if format.is_row() {
        format.row_bytes(d).unwrap()
    } else {
        format.block_bytes()
    };
    let blocks = cpu.len() / bb;
    let differing = cpu
        .chunks(bb)
        .zip(gpu.chunks(bb))
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        differing * 20 <= blocks.max(20),
        "{what}: {differing} of {blocks} blocks differ"
    );
}

#[test]
fn the_sequence_on_the_cpu_follows_the_oracle() {
    for c in cases() {
        let [contiguous, paged] = LAYOUTS.map(|paging| sequence(&c, &Backend::Cpu, paging));
        assert!(paged == contiguous, "{c:?}: paged and contiguous bytes");
    }
}

#[test]
fn cpu_and_cuda_caches_agree() {
    let Some(gpu) = cuda() else { return };
    for c in cases() {
        let (ck, cv) = sequence(&c, &Backend::Cpu, Paging::Contiguous);
        let spec = c.spec(Paging::Contiguous);
        for paging in LAYOUTS {
            let (gk, gv) = sequence(&c, &gpu, paging);
            compare_bytes(
                &ck,
                &gk,
                c.k_format,
                c.d,
                spec.plan.qk.is_some(),
                &format!("{paging:?} {c:?} K"),
            );
            compare_bytes(
                &cv,
                &gv,
                c.v_format,
                c.d,
                spec.plan.v.is_some(),
                &format!("{paging:?} {c:?} V"),
            );
        }
    }
}

/// Device buffers in and out: f32 rows append the bytes host rows do (at the engine's
/// positions too), f32 queries give the host call's output, and f16 queries (which may run on
/// the tensor cores) follow the oracle under the f16 tolerance; the device pools hold what
/// the pool copies do.
#[test]
fn device_buffers_give_the_host_results() {
    let Some(gpu) = cuda() else { return };
    for paging in LAYOUTS {
        device_buffers(&gpu, paging);
    }
}

fn device_buffers(gpu: &Backend, paging: Paging) {
    let Backend::Cuda(dev) = gpu else {
        unreachable!()
    };
    let s = dev.stream();
    let c = &cases()[1];
    let (k, v) = (c.rows(40, 1), c.rows(40, 2));
    let mut host = RotatedKvCache::on(c.spec(paging), gpu).unwrap();
    host.append(&k, &v).unwrap();
    let mut device = RotatedKvCache::on(c.spec(paging), gpu).unwrap();
    let split = 25 * c.h_kv * c.d;
    let up = |x: &[f32]| s.clone_htod(x).unwrap();
    device
        .append_device(&up(&k[..split]), &up(&v[..split]))
        .unwrap();
    let positions: Vec<usize> = (25..40).collect();
    device
        .append_device_at(&up(&k[split..]), &up(&v[split..]), &positions)
        .unwrap();
    assert!(device
        .append_device_at(&up(&k[..split]), &up(&v[..split]), &positions)
        .is_err());
    assert_eq!(owned(&device), owned(&host), "{paging:?}");
    assert_eq!(device.positions(), host.positions());
    let (pk, pv) = device.device_pool().unwrap();
    let (hk, hv) = host.pool().unwrap();
    assert!(s.clone_dtoh(pk).unwrap() == *hk && s.clone_dtoh(pv).unwrap() == *hv);
    for (n_q, pos) in [(1usize, 39usize), (8, 32)] {
        let p = c.params(pos);
        let n_out = n_q * c.h_q() * c.d;
        let q = random(n_q * c.h_q() * c.d, 5 + n_q as u64);
        let mut out = s.alloc_zeros::<f32>(n_out).unwrap();
        device
            .attention_device(&s.clone_htod(&q).unwrap(), n_q, c.h_q(), &p, &mut out)
            .unwrap();
        let want = host.attention(&q, n_q, c.h_q(), &p).unwrap();
        assert_eq!(
            s.clone_dtoh(&out).unwrap(),
            want,
            "{paging:?} f32 queries, n_q {n_q}"
        );

        let q16: Vec<f16> = q.iter().map(|&x| f16::from_f32(x)).collect();
        let mut out16 = s.alloc_zeros::<f16>(n_out).unwrap();
        device
            .attention_device(&s.clone_htod(&q16).unwrap(), n_q, c.h_q(), &p, &mut out16)
            .unwrap();
        let got: Vec<f64> = s
            .clone_dtoh(&out16)
            .unwrap()
            .into_iter()
            .map(|x| f64::from(x.to_f32()))
            .collect();
        let held: Vec<f64> = q16.iter().map(|x| f64::from(x.to_f32())).collect();
        let want = oracle(&device, &held, n_q, c.h_q(), &p);
        if let Err(m) = tolerance(Op::Attention, Precision::F16).check(&got, &want) {
            panic!("{paging:?} f16 queries, n_q {n_q}: {m}");
        }
        // An output of another length is refused.
        let mut short = s.alloc_zeros::<f32>(n_out - 1).unwrap();
        assert!(device
            .attention_device(&s.clone_htod(&q).unwrap(), n_q, c.h_q(), &p, &mut short)
            .is_err());
    }
}

/// A removal whose moved tail is larger than the device's copy chunk (16 MiB) and overlaps
/// its destination moves every byte; in a paged cache the tail moves page by page, and a cut of
/// whole pages moves nothing.
#[test]
fn a_removal_moves_a_long_tail() {
    let Some(gpu) = cuda() else { return };
    let (h, d, n) = (8usize, 128usize, 5000usize);
    for paging in LAYOUTS {
        let spec = CacheSpec {
            k_format: KvFormat::F32,
            v_format: KvFormat::F16,
            plan: RotationPlan::none(),
            n_heads: h,
            head_dim: d,
            v_dim: d,
            capacity: n,
            paging,
            query: rotq::QueryMode::Auto,
        };
        let mut cache = RotatedKvCache::on(spec, &gpu).unwrap();
        let rows: Vec<f32> = (0..n * h * d).map(|i| (i % 2039) as f32).collect();
        cache.append(&rows, &rows).unwrap();
        check_remove(&mut cache, 3..13);
        check_remove(&mut cache, 100..4000);
        check_remove(&mut cache, 160..800);
    }
}

/// Bad calls on a CUDA cache are the CPU's typed errors and change nothing; a capacity the
/// device cannot hold is an error, not an abort.
#[test]
fn bad_calls_on_cuda_are_errors_and_change_nothing() {
    let Some(gpu) = cuda() else { return };
    assert!(matches!(
        Backend::open("cuda:4096"),
        Err(Error::Cuda(CudaError::NoDevice { .. }))
    ));
    let c = &cases()[0];
    let (h, d) = (c.h_kv, c.d);
    for (backend, paging) in [Backend::Cpu, gpu.clone()]
        .into_iter()
        .flat_map(|b| LAYOUTS.map(|p| (b.clone(), p)))
    {
        let spec = CacheSpec {
            capacity: 10,
            ..c.spec(paging)
        };
        let mut cache = RotatedKvCache::on(spec.clone(), &backend).unwrap();
        // One token more than fits (10, or 16 when paged).
        let over = cache.capacity() - 8 + 1;
        cache.append(&c.rows(8, 29), &c.rows(8, 30)).unwrap();
        let (k, v) = (c.rows(over, 31), c.rows(over, 32));
        let before = owned(&cache);
        let rope = Rope::new(RopeVariant::Normal, d);
        let errors = [
            cache.append(&k, &v).unwrap_err(),
            cache.append(&k[..h * d + 1], &v[..h * d]).unwrap_err(),
            cache.append_at(&k[..h * d], &v[..h * d], &[3]).unwrap_err(),
            cache.remove(3..9).unwrap_err(),
            cache
                .shift(0..4, 1, &Rope::new(RopeVariant::Normal, d + 2))
                .unwrap_err(),
            cache.shift(0..4, -1, &rope).unwrap_err(), // position -1
            cache
                .attention(&random(3 * d, 33), 1, 3, &c.params(0))
                .unwrap_err(),
        ];
        let name = format!("{} {paging:?}", backend.name());
        for e in errors {
            assert!(matches!(e, Error::Reference(_)), "{name}: {e}");
        }
        assert_eq!(cache.len(), 8);
        assert_eq!(owned(&cache), before);
        assert_eq!(cache.positions(), (0..8).collect::<Vec<_>>(), "{name}");
        for capacity in [1 << 50, usize::MAX] {
            assert!(RotatedKvCache::on(
                CacheSpec {
                    capacity,
                    ..spec.clone()
                },
                &backend
            )
            .is_err());
        }
    }
}
