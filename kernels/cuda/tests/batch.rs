//! The batch engine API on the device (`rotq_cuda::batch`) against the oracle: mixed decode and
//! chunked-prefill steps over contiguous, rectangular and CSR tables, f32, f16 and bf16 queries,
//! with the log-sum-exp; one CUDA graph captured once and replayed with other tables, lengths
//! and queries; the host's typed errors and the device-side checks. Without a GPU each test
//! prints `skipped: no CUDA device` and passes.

mod common;

use common::{device, download, Elem, ROWS};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaSlice, CudaStream};
use half::{bf16, f16};
use ndarray::{Array2, Array3};
use rotq_cuda::batch::{
    BatchPlan, BatchShape, DeviceBatch, DeviceBuf, DeviceStream, DeviceTables, PoolGeometry,
    TablesKind,
};
use rotq_cuda::{CudaAttention, CudaError, Device};
use rotq_reference::attention::attention_f64_masked;
use rotq_reference::rotation::SplitMix64;
use rotq_reference::tolerance::{Op, Precision};
use rotq_reference::{AttentionParams, KvFormat, Rotation, RotationPlan};
use rotq_testkit::rotations::RotationKind;

/// Sequences' rows in one pool: `data[s]` is sequence `s`'s K and V rows (token-major,
/// `h_kv` rows a token, rotated and quantized), `pages[s]` the pool pages holding them.
struct Pool {
    g: PoolGeometry,
    plan: RotationPlan,
    k: CudaSlice<u8>,
    v: CudaSlice<u8>,
    data: Vec<(Vec<u8>, Vec<u8>)>,
    pages: Vec<Vec<u32>>,
}

impl Pool {
    /// Sequences of `lens` tokens; pages dealt in a scrambled order, or, for a contiguous
    /// pool (`n_pages` sequences of `page_tokens`), sequence s in page s; every byte no
    /// sequence owns 0xFF (NaN scales: a read out of place shows).
    fn new(dev: &Device, g: PoolGeometry, plan: RotationPlan, lens: &[usize], seed: u64) -> Self {
        let pt = g.page_tokens;
        let per: Vec<usize> = lens.iter().map(|n| n.div_ceil(pt)).collect();
        let mut order: Vec<u32> = (0..g.n_pages as u32).collect();
        let contiguous = g.n_pages == lens.len() && per.iter().all(|&p| p <= 1);
        let mut rng = SplitMix64::new(seed);
        for i in (1..order.len()).rev().filter(|_| !contiguous) {
            order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        assert!(per.iter().sum::<usize>() <= g.n_pages);
        let mut pages = Vec::new();
        let mut next = 0;
        for &p in &per {
            pages.push(order[next..next + p].to_vec());
            next += p;
        }
        let encode = |f: KvFormat, n: usize, dim: usize, r: Option<&Rotation>, s: u64| {
            let mut x: Vec<f64> = ROWS
                .f32s(n * g.n_kv_heads * dim, s)
                .into_iter()
                .map(f64::from)
                .collect();
            if let Some(r) = r {
                r.rotate_rows(&mut x, false).unwrap();
            }
            let x: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            if x.is_empty() {
                Vec::new()
            } else {
                f.quantize_rows(&x, dim).unwrap()
            }
        };
        let data: Vec<(Vec<u8>, Vec<u8>)> = lens
            .iter()
            .enumerate()
            .map(|(s, &n)| {
                let s = seed ^ (s as u64 * 7919);
                (
                    encode(g.k_format, n, g.head_dim, plan.qk.as_ref(), s ^ 2),
                    encode(g.v_format, n, g.v_dim, plan.v.as_ref(), s ^ 3),
                )
            })
            .collect();
        let lay = |bytes: usize, rows: Vec<&[u8]>, row: usize| {
            let token = g.n_kv_heads * row;
            let mut pool = vec![0xFFu8; bytes];
            for (s, p) in pages.iter().enumerate() {
                let r = rows[s];
                for t in 0..r.len() / token {
                    let slot = p[t / pt] as usize * pt + t % pt;
                    pool[slot * token..][..token].copy_from_slice(&r[t * token..][..token]);
                }
            }
            pool
        };
        let kb = lay(
            g.k_bytes().unwrap(),
            data.iter().map(|d| d.0.as_slice()).collect(),
            g.k_format.row_bytes(g.head_dim).unwrap(),
        );
        let vb = lay(
            g.v_bytes().unwrap(),
            data.iter().map(|d| d.1.as_slice()).collect(),
            g.v_format.row_bytes(g.v_dim).unwrap(),
        );
        let stream = dev.stream();
        Self {
            g,
            plan,
            k: stream.clone_htod(&kb).unwrap(),
            v: stream.clone_htod(&vb).unwrap(),
            data,
            pages,
        }
    }
}

/// One sequence of a step: which pool sequence, how many of its tokens, query rows, and the
/// first row's position if given.
#[derive(Clone, Copy, Debug)]
struct Seq {
    data: usize,
    len: usize,
    n_q: usize,
    pos: Option<usize>,
}

/// Elements past the plan's output and LSE in their buffers, NaN before a run and after it.
const GUARD: usize = 64;

/// A step's device arrays, in buffers of fixed size (a graph reads the same addresses).
struct Arrays<T> {
    qsl: CudaSlice<u32>,
    lens: CudaSlice<u32>,
    pos: CudaSlice<u32>,
    table: CudaSlice<u32>,
    indptr: CudaSlice<u32>,
    q: CudaSlice<T>,
    out: CudaSlice<T>,
    lse: CudaSlice<f32>,
    ws: CudaSlice<u8>,
    max_blocks: usize,
    /// The additive mask when the plan takes one: on the device, and its values and row
    /// stride for the oracle.
    mask: Option<(CudaSlice<f32>, Vec<f32>, usize)>,
}

impl<T: Elem> Arrays<T> {
    fn new(stream: &std::sync::Arc<CudaStream>, plan: &BatchPlan, pool: &Pool) -> Self {
        let s = plan.shape();
        let max_blocks = s.max_seq_len.div_ceil(pool.g.page_tokens);
        let z32 = |n: usize| stream.alloc_zeros::<u32>(n.max(1)).unwrap();
        Self {
            qsl: z32(s.seqs + 1),
            lens: z32(s.seqs),
            pos: z32(s.seqs),
            table: z32(s.seqs * max_blocks),
            indptr: z32(s.seqs + 1),
            q: stream.alloc_zeros::<T>(plan.q_len()).unwrap(),
            out: stream.alloc_zeros::<T>(plan.out_len() + GUARD).unwrap(),
            lse: stream.alloc_zeros::<f32>(plan.lse_len() + GUARD).unwrap(),
            ws: stream.alloc_zeros::<u8>(plan.workspace_bytes()).unwrap(),
            max_blocks,
            mask: s.mask.map(|stride| {
                // Values in [-2, 2], every 7th key of a row hidden (−∞), and row 2's every key.
                let n = s.max_rows * stride;
                let mut m: Vec<f32> = ROWS
                    .f32s(n, 77)
                    .iter()
                    .map(|v| v.clamp(-2.0, 2.0))
                    .collect();
                for (i, v) in m.iter_mut().enumerate() {
                    if i % stride % 7 == 3 || i / stride == 2 {
                        *v = f32::NEG_INFINITY;
                    }
                }
                (stream.clone_htod(&m).unwrap(), m, stride)
            }),
        }
    }

    /// Writes a step (queries `q` of every row the buffers hold) on `stream`.
    fn write(
        &mut self,
        stream: &std::sync::Arc<CudaStream>,
        pool: &Pool,
        seqs: &[Seq],
        kind: TablesKind,
        q: &[f32],
    ) {
        let pt = pool.g.page_tokens;
        let mut qsl = vec![0u32];
        for s in seqs {
            qsl.push(qsl.last().unwrap() + s.n_q as u32);
        }
        stream.memcpy_htod(&qsl, &mut self.qsl).unwrap();
        let lens: Vec<u32> = seqs.iter().map(|s| s.len as u32).collect();
        stream.memcpy_htod(&lens, &mut self.lens).unwrap();
        let pos: Vec<u32> = seqs
            .iter()
            .map(|s| s.pos.unwrap_or(s.len.saturating_sub(s.n_q)) as u32)
            .collect();
        stream.memcpy_htod(&pos, &mut self.pos).unwrap();
        // Entries past a sequence's pages are u32::MAX: a kernel that read one would fault.
        let mut table = vec![u32::MAX; self.table.len()];
        let mut indptr = vec![0u32];
        let mut at = 0;
        for (b, s) in seqs.iter().enumerate() {
            let used = &pool.pages[s.data][..s.len.div_ceil(pt)];
            match kind {
                TablesKind::Block { .. } => {
                    table[b * self.max_blocks..][..used.len()].copy_from_slice(used)
                }
                _ => {
                    table[at..][..used.len()].copy_from_slice(used);
                    at += used.len();
                }
            }
            indptr.push(at as u32);
        }
        stream.memcpy_htod(&table, &mut self.table).unwrap();
        stream.memcpy_htod(&indptr, &mut self.indptr).unwrap();
        let qh: Vec<T> = q.iter().map(|&x| T::from_f32(x)).collect();
        stream.memcpy_htod(&qh, &mut self.q).unwrap();
        // NaN everywhere the run writes, and past it: padding rows must be written (zeros), the
        // guard never.
        let nan = vec![T::from_f32(f32::NAN); self.out.len()];
        stream.memcpy_htod(&nan, &mut self.out).unwrap();
        stream
            .memcpy_htod(&vec![f32::NAN; self.lse.len()], &mut self.lse)
            .unwrap();
    }

    fn batch(&self, kind: TablesKind, positions: bool) -> DeviceBatch<'_> {
        DeviceBatch {
            query_start_loc: DeviceBuf::of(&self.qsl),
            seq_lens: DeviceBuf::of(&self.lens),
            q_positions: positions.then(|| DeviceBuf::of(&self.pos)),
            tables: match kind {
                TablesKind::Contiguous => DeviceTables::Contiguous,
                TablesKind::Block { max_blocks } => DeviceTables::Block {
                    table: DeviceBuf::of(&self.table),
                    max_blocks,
                },
                TablesKind::Csr => DeviceTables::Csr {
                    indptr: DeviceBuf::of(&self.indptr),
                    indices: DeviceBuf::of(&self.table),
                },
            },
            mask: self.mask.as_ref().map(|(m, _, _)| DeviceBuf::of(m)),
        }
    }

    fn run(&self, attn: &CudaAttention, plan: &BatchPlan, pool: &Pool, stream: &CudaStream) {
        let s = plan.shape();
        // SAFETY: the buffers live in `self` and `pool`, which the callers keep until they
        // have synchronised.
        unsafe {
            attn.run_batch(
                plan,
                &DeviceStream::of(stream),
                &DeviceBuf::of(&self.q),
                &DeviceBuf::of(&pool.k),
                &DeviceBuf::of(&pool.v),
                &self.batch(s.tables, s.q_positions),
                &DeviceBuf::of(&self.ws),
                &DeviceBuf::of(&self.out),
                Some(&DeviceBuf::of(&self.lse)),
            )
        }
        .unwrap();
    }
}

/// The oracle of a step: each sequence's query rows (as `T` holds them) against its first
/// `len` tokens, at its positions; (outputs, LSE) of the step's rows in order.
fn oracle<T: Elem>(
    pool: &Pool,
    seqs: &[Seq],
    h_q: usize,
    params: &AttentionParams,
    q: &[f32],
    mask: Option<(&[f32], usize)>,
) -> (Vec<f64>, Vec<f64>) {
    let g = &pool.g;
    let (mut out, mut lse) = (Vec::new(), Vec::new());
    let mut row = 0;
    for s in seqs {
        let per_row = h_q * g.head_dim;
        let mut qr: Vec<f64> = q[row * per_row..(row + s.n_q) * per_row]
            .iter()
            .map(|&x| f64::from(T::from_f32(x).to_f32()))
            .collect();
        // This sequence's rows of the mask, over its keys.
        let m = mask.map(|(values, stride)| {
            Array2::from_shape_fn((s.n_q, s.len), |(i, j)| {
                f64::from(values[(row + i) * stride + j])
            })
        });
        row += s.n_q;
        if let Some(r) = &pool.plan.qk {
            r.rotate_rows(&mut qr, false).unwrap();
        }
        let cache = |f: KvFormat, bytes: &[u8], dim: usize| {
            let rows = f.row_bytes(dim).unwrap() * g.n_kv_heads * s.len;
            let vals = if rows == 0 {
                Vec::new()
            } else {
                f.dequantize_rows(&bytes[..rows], dim).unwrap()
            };
            Array3::from_shape_vec(
                (s.len, g.n_kv_heads, dim),
                vals.into_iter().map(f64::from).collect(),
            )
            .unwrap()
        };
        let (kb, vb) = &pool.data[s.data];
        let k = cache(g.k_format, kb, g.head_dim);
        let v = cache(g.v_format, vb, g.v_dim);
        let qa = Array3::from_shape_vec((s.n_q, h_q, g.head_dim), qr).unwrap();
        let p = AttentionParams {
            pos_offset: s.pos.unwrap_or(s.len - s.n_q),
            ..params.clone()
        };
        let a = attention_f64_masked(
            qa.view(),
            k.view(),
            v.view(),
            &p,
            m.as_ref().map(|m| m.view()),
        )
        .unwrap();
        let mut o: Vec<f64> = a.output.iter().copied().collect();
        if let Some(r) = &pool.plan.v {
            r.rotate_rows(&mut o, true).unwrap();
        }
        out.extend(o);
        lse.extend(a.lse.iter().copied());
    }
    (out, lse)
}

/// The step's outputs and LSE against the oracle; rows past the step's last are zeros and −∞.
fn assert_step<T: Elem>(
    arrays: &Arrays<T>,
    dev: &Device,
    pool: &Pool,
    plan: &BatchPlan,
    seqs: &[Seq],
    q: &[f32],
    what: &str,
) {
    let s = plan.shape();
    let got: Vec<f64> = download(dev, &arrays.out)
        .into_iter()
        .map(f64::from)
        .collect();
    let lse: Vec<f64> = dev
        .stream()
        .clone_dtoh(&arrays.lse)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let mask = arrays.mask.as_ref().map(|(_, m, stride)| (&m[..], *stride));
    let (want, want_lse) = oracle::<T>(pool, seqs, s.h_q, &s.params, q, mask);
    let rows: usize = seqs.iter().map(|s| s.n_q).sum();
    let what = format!("{} {what} {seqs:?}", std::any::type_name::<T>());
    let n_out = rows * s.h_q * pool.g.v_dim;
    rotq_testkit::oracle::assert_matches(&got[..n_out], &want, Op::Attention, T::PRECISION, &what);
    rotq_testkit::oracle::assert_matches(
        &lse[..rows * s.h_q],
        &want_lse,
        Op::Attention,
        T::PRECISION,
        &format!("LSE of {what}"),
    );
    let (out_end, lse_end) = (plan.out_len(), plan.lse_len());
    assert!(
        got[n_out..out_end].iter().all(|&x| x == 0.0),
        "{what}: padding rows not zero"
    );
    assert!(
        lse[rows * s.h_q..lse_end]
            .iter()
            .all(|&x| x == f64::NEG_INFINITY),
        "{what}: padding LSE not -inf"
    );
    assert!(
        got[out_end..]
            .iter()
            .chain(&lse[lse_end..])
            .all(|x| x.is_nan()),
        "{what}: written past the output or the LSE"
    );
    plan.status(&DeviceStream::of(dev.stream()), &DeviceBuf::of(&arrays.ws))
        .unwrap();
}

fn geometry(
    k_format: KvFormat,
    v_format: KvFormat,
    page_tokens: usize,
    n_pages: usize,
) -> PoolGeometry {
    PoolGeometry {
        k_format,
        v_format,
        n_kv_heads: 2,
        head_dim: 128,
        v_dim: 128,
        n_pages,
        page_tokens,
    }
}

/// A mixed step (decode rows, a chunk of prefill rows, a sequence with no rows, one with
/// positions given when the plan takes them) checked once.
fn check_kind<T: Elem>(
    dev: &Device,
    kind: TablesKind,
    params: AttentionParams,
    positions: bool,
    formats: (KvFormat, KvFormat),
) {
    check_kind_with::<T>(dev, kind, params, positions, formats, None, rotations());
}

/// The rotations of [`check_kind`]'s steps: a Hadamard on Q/K, blocks of 32 on V.
fn rotations() -> RotationPlan {
    RotationPlan {
        qk: Some(Rotation::hadamard(128).unwrap()),
        v: Some(Rotation::block_hadamard(128, 32).unwrap()),
    }
}

/// Causal attention, the default scale.
fn causal() -> AttentionParams {
    AttentionParams {
        causal: true,
        ..Default::default()
    }
}

/// Causal, a window of 33 and a soft-cap of 20.
fn windowed() -> AttentionParams {
    AttentionParams {
        window: Some(33),
        softcap: Some(20.0),
        ..causal()
    }
}

/// [`check_kind`] with the plan's mask stride and rotations of the caller's.
fn check_kind_with<T: Elem>(
    dev: &Device,
    kind: TablesKind,
    params: AttentionParams,
    positions: bool,
    formats: (KvFormat, KvFormat),
    mask: Option<usize>,
    plan: RotationPlan,
) {
    let lens = [300usize, 77, 1, 40, 129];
    let (pt, n_pages) = match kind {
        TablesKind::Contiguous => (320, lens.len()),
        _ => (16, 64),
    };
    let pool = Pool::new(
        dev,
        geometry(formats.0, formats.1, pt, n_pages),
        plan.clone(),
        &lens,
        5,
    );
    let seqs = [
        Seq {
            data: 0,
            len: 300,
            n_q: 1,
            pos: None,
        },
        Seq {
            data: 1,
            len: 77,
            n_q: 9,
            pos: positions.then_some(50),
        },
        Seq {
            data: 2,
            len: 1,
            n_q: 0,
            pos: None,
        },
        Seq {
            data: 3,
            len: 40,
            n_q: 1,
            pos: None,
        },
        Seq {
            data: 4,
            len: 129,
            n_q: 3,
            pos: None,
        },
    ];
    let attn = CudaAttention::new(dev, &plan).unwrap();
    let kind = match kind {
        TablesKind::Block { .. } => TablesKind::Block {
            max_blocks: 320usize.div_ceil(pt),
        },
        k => k,
    };
    let shape = BatchShape {
        seqs: seqs.len(),
        max_rows: 17,
        max_seq_len: 320,
        h_q: 8,
        params,
        q_positions: positions,
        tables: kind,
        checked: true,
        mask,
    };
    let bp = attn.plan_batch::<T>(dev, &pool.g, &shape).unwrap();
    let stream = dev.stream();
    let mut arrays = Arrays::<T>::new(stream, &bp, &pool);
    let mut q = ROWS.f32s(bp.q_len(), 11);
    if mask.is_some() {
        // Row 2, whose every key the mask hides, gets NaN queries: still no key (zeros).
        let per_row = shape.h_q * pool.g.head_dim;
        q[2 * per_row..3 * per_row].fill(f32::NAN);
    }
    arrays.write(stream, &pool, &seqs, kind, &q);
    arrays.run(&attn, &bp, &pool, stream);
    assert_step(
        &arrays,
        dev,
        &pool,
        &bp,
        &seqs,
        &q,
        &format!("{kind:?} {formats:?} mask {mask:?} {plan:?}"),
    );
}

/// Every table layout, f32, f16 and bf16 queries; q_positions; window and soft-cap; a
/// tensor-core pair of formats and others.
#[test]
fn batch_steps_match_the_oracle() {
    let Some(dev) = device() else { return };
    let q4 = (KvFormat::Q4_0, KvFormat::Q8_0);
    for kind in [
        TablesKind::Contiguous,
        TablesKind::Block { max_blocks: 0 },
        TablesKind::Csr,
    ] {
        check_kind::<f16>(dev, kind, causal(), false, q4);
        check_kind::<bf16>(dev, kind, causal(), false, q4);
        check_kind::<f32>(dev, kind, causal(), false, q4);
    }
    let csr = TablesKind::Csr;
    check_kind::<f16>(dev, csr, causal(), true, q4);
    check_kind::<f16>(dev, csr, windowed(), false, q4);
    let open = AttentionParams {
        causal: false,
        ..Default::default()
    };
    check_kind::<bf16>(dev, TablesKind::Block { max_blocks: 0 }, open, false, q4);
    for formats in [
        (KvFormat::Q8_0, KvFormat::Q4_0),
        (KvFormat::F16, KvFormat::F16),
        (KvFormat::Tq4, KvFormat::Q8_0),
    ] {
        check_kind::<f16>(dev, csr, causal(), false, formats);
    }
}

/// An additive mask (values in [-2, 2], every 7th key hidden, one row's every key hidden):
/// every table layout and query type, a tensor-core pair of formats (the masked plan runs the
/// f32 kernel), soft-cap and window; a stride shorter than the longest sequence is refused.
#[test]
fn masked_steps_match_the_oracle() {
    let Some(dev) = device() else { return };
    let q4 = (KvFormat::Q4_0, KvFormat::Q8_0);
    let masked = |kind, params, positions, stride| {
        check_kind_with::<f16>(dev, kind, params, positions, q4, Some(stride), rotations())
    };
    for kind in [
        TablesKind::Contiguous,
        TablesKind::Block { max_blocks: 0 },
        TablesKind::Csr,
    ] {
        masked(kind, causal(), false, 320);
    }
    let csr = TablesKind::Csr;
    check_kind_with::<bf16>(dev, csr, causal(), true, q4, Some(333), rotations());
    check_kind_with::<f32>(dev, csr, causal(), false, q4, Some(320), rotations());
    masked(csr, windowed(), false, 320);
    // A stride shorter than max_seq_len is refused.
    let plan = RotationPlan::none();
    let attn = CudaAttention::new(dev, &plan).unwrap();
    let g = geometry(KvFormat::Q8_0, KvFormat::Q8_0, 16, 8);
    let short = BatchShape {
        mask: Some(100),
        ..BatchShape::decode(2, 4, 128, TablesKind::Csr)
    };
    assert!(matches!(
        attn.plan_batch::<f16>(dev, &g, &short).unwrap_err(),
        CudaError::Input(_)
    ));
}

/// Explicit-matrix rotations (compressed-tensors' `random-matrix`): the queries rotated into
/// the workspace before the kernels, the output rotated back in place after them; for Q/K, for
/// V, and both, with f16, bf16 and f32 queries, a mask and a tensor-core pair of formats.
#[test]
fn explicit_matrix_rotations_follow_the_oracle() {
    let Some(dev) = device() else { return };
    let m = |seed| RotationKind::Matrix.build(128, seed);
    let h = Some(Rotation::hadamard(128).unwrap());
    let plans = [
        RotationPlan { qk: m(5), v: m(6) },
        RotationPlan { qk: m(7), v: None },
        RotationPlan { qk: h, v: m(8) },
    ];
    let q4 = (KvFormat::Q4_0, KvFormat::Q8_0);
    let block = TablesKind::Block { max_blocks: 0 };
    for plan in plans {
        check_kind_with::<f16>(dev, block, causal(), false, q4, None, plan.clone());
        check_kind_with::<f32>(dev, TablesKind::Csr, causal(), false, q4, None, plan);
    }
    let plan = RotationPlan { qk: m(9), v: m(10) };
    check_kind_with::<bf16>(dev, TablesKind::Csr, causal(), true, q4, Some(320), plan);
}

/// One run captured in a CUDA graph on a stream of its own, replayed with other lengths,
/// tables (sequences swapped), row counts and queries; every replay against the oracle.
#[test]
fn batch_graph_replays_follow_the_oracle() {
    let Some(dev) = device() else { return };
    let lens = [500usize, 200, 64, 333];
    let plan = RotationPlan {
        qk: Some(Rotation::hadamard(128).unwrap()),
        v: None,
    };
    let pool = Pool::new(
        dev,
        geometry(KvFormat::Q4_0, KvFormat::Q4_0, 16, 80),
        plan.clone(),
        &lens,
        9,
    );
    // The pool was uploaded on the device's stream; the replays run on a non-blocking one.
    dev.stream().synchronize().unwrap();
    let attn = CudaAttention::new(dev, &plan).unwrap();
    let kind = TablesKind::Block { max_blocks: 32 };
    let shape = BatchShape {
        max_rows: 8,
        checked: true,
        ..BatchShape::decode(3, 8, 512, kind)
    };
    let bp = attn.plan_batch::<f16>(dev, &pool.g, &shape).unwrap();
    let stream = dev.context().new_stream().unwrap();
    let mut arrays = Arrays::<f16>::new(&stream, &bp, &pool);
    let steps: [[Seq; 3]; 3] = [
        [
            Seq {
                data: 0,
                len: 500,
                n_q: 1,
                pos: None,
            },
            Seq {
                data: 1,
                len: 200,
                n_q: 1,
                pos: None,
            },
            Seq {
                data: 2,
                len: 64,
                n_q: 1,
                pos: None,
            },
        ],
        [
            Seq {
                data: 3,
                len: 333,
                n_q: 4,
                pos: None,
            },
            Seq {
                data: 0,
                len: 17,
                n_q: 1,
                pos: None,
            },
            Seq {
                data: 1,
                len: 199,
                n_q: 3,
                pos: None,
            },
        ],
        [
            Seq {
                data: 2,
                len: 1,
                n_q: 1,
                pos: None,
            },
            Seq {
                data: 2,
                len: 64,
                n_q: 0,
                pos: None,
            },
            Seq {
                data: 0,
                len: 499,
                n_q: 2,
                pos: None,
            },
        ],
    ];
    let q0 = ROWS.f32s(bp.q_len(), 100);
    arrays.write(&stream, &pool, &steps[0], kind, &q0);
    // Every buffer's address taken before the capture: inside it only the run is queued.
    let (q, k, v) = (
        DeviceBuf::of(&arrays.q),
        DeviceBuf::of(&pool.k),
        DeviceBuf::of(&pool.v),
    );
    let (ws, out, lse) = (
        DeviceBuf::of(&arrays.ws),
        DeviceBuf::of(&arrays.out),
        DeviceBuf::of(&arrays.lse),
    );
    let batch = arrays.batch(kind, false);
    let s = DeviceStream::of(&stream);
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    // SAFETY: the buffers live to the end of the test, after the last replay's synchronisation.
    unsafe { attn.run_batch(&bp, &s, &q, &k, &v, &batch, &ws, &out, Some(&lse)) }.unwrap();
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a graph");
    for (i, step) in steps.iter().enumerate() {
        let q = ROWS.f32s(bp.q_len(), 100 + i as u64);
        arrays.write(&stream, &pool, step, kind, &q);
        graph.launch().unwrap();
        stream.synchronize().unwrap();
        assert_step(&arrays, dev, &pool, &bp, step, &q, &format!("replay {i}"));
    }
}

/// Host checks: typed errors before anything is queued. Device checks: a step that breaks the
/// contract (a page outside the pool, a length past its table or past the plan's bound, more
/// rows than tokens) reports through `status` and leaves the other sequences right.
#[test]
fn batch_bad_inputs_are_typed_errors() {
    let Some(dev) = device() else { return };
    let lens = [100usize, 50];
    let plan = RotationPlan {
        qk: Some(Rotation::hadamard(128).unwrap()),
        v: None,
    };
    let pool = Pool::new(
        dev,
        geometry(KvFormat::Q8_0, KvFormat::Q8_0, 16, 20),
        plan.clone(),
        &lens,
        3,
    );
    let attn = CudaAttention::new(dev, &plan).unwrap();
    let kind = TablesKind::Block { max_blocks: 8 };
    let shape = BatchShape {
        max_rows: 2,
        checked: true,
        ..BatchShape::decode(2, 4, 128, kind)
    };
    let bp = attn.plan_batch::<f16>(dev, &pool.g, &shape).unwrap();
    let stream = dev.stream();
    let mut arrays = Arrays::<f16>::new(stream, &bp, &pool);
    let good = [
        Seq {
            data: 0,
            len: 100,
            n_q: 1,
            pos: None,
        },
        Seq {
            data: 1,
            len: 50,
            n_q: 1,
            pos: None,
        },
    ];
    let q = ROWS.f32s(bp.q_len(), 1);
    arrays.write(stream, &pool, &good, kind, &q);
    let input = |e: CudaError| matches!(e, CudaError::Input(_) | CudaError::WrongDevice { .. });

    // Host: a plan of another shape, wrong lengths, the wrong tables, the wrong element type.
    assert!(input(
        attn.plan_batch::<f16>(
            dev,
            &pool.g,
            &BatchShape {
                h_q: 3,
                ..shape.clone()
            }
        )
        .unwrap_err()
    ));
    assert!(input(
        attn.plan_batch::<f16>(
            dev,
            &PoolGeometry {
                head_dim: 100,
                ..pool.g
            },
            &shape
        )
        .unwrap_err()
    ));
    let contiguous = BatchShape {
        tables: TablesKind::Contiguous,
        ..shape.clone()
    };
    assert!(
        input(
            attn.plan_batch::<f16>(dev, &pool.g, &contiguous)
                .unwrap_err()
        ),
        "max_seq_len past a contiguous sequence"
    );
    let s = DeviceStream::of(stream);
    let (q_buf, k, v, ws, out) = (
        DeviceBuf::of(&arrays.q),
        DeviceBuf::of(&pool.k),
        DeviceBuf::of(&pool.v),
        DeviceBuf::of(&arrays.ws),
        DeviceBuf::of(&arrays.out),
    );
    let batch = arrays.batch(kind, false);
    let short = stream.alloc_zeros::<u8>(8).unwrap();
    let short = DeviceBuf::of(&short);
    let roomy = stream.alloc_zeros::<u8>(k.len() + 16).unwrap();
    // SAFETY: (the calls below) each is refused before anything is queued, or its buffers
    // live until the status call that follows synchronises.
    for e in unsafe {
        [
            attn.run_batch(&bp, &s, &q_buf, &short, &v, &batch, &ws, &out, None),
            attn.run_batch(&bp, &s, &q_buf, &k, &v, &batch, &short, &out, None),
            attn.run_batch(
                &bp,
                &s,
                &q_buf,
                &k,
                &v,
                &arrays.batch(TablesKind::Csr, false),
                &ws,
                &out,
                None,
            ),
            attn.run_batch(
                &bp,
                &s,
                &q_buf,
                &k,
                &v,
                &arrays.batch(kind, true),
                &ws,
                &out,
                None,
            ),
            // A pool of the right length 1 byte off 16-byte alignment.
            attn.run_batch(
                &bp,
                &s,
                &q_buf,
                &DeviceBuf::<u8>::from_raw(dev, DeviceBuf::of(&roomy).ptr() + 1, k.len()).unwrap(),
                &v,
                &batch,
                &ws,
                &out,
                None,
            ),
        ]
    } {
        assert!(input(e.unwrap_err()));
    }
    let q32 = stream.alloc_zeros::<f32>(bp.q_len()).unwrap();
    let out32 = stream.alloc_zeros::<f32>(bp.out_len()).unwrap();
    // SAFETY: refused before anything is queued.
    let typed = unsafe {
        attn.run_batch(
            &bp,
            &s,
            &DeviceBuf::of(&q32),
            &k,
            &v,
            &batch,
            &ws,
            &DeviceBuf::of(&out32),
            None,
        )
    };
    assert!(input(typed.unwrap_err()));
    // A mask the plan did not ask for.
    let mask = stream.alloc_zeros::<f32>(2 * 128).unwrap();
    let masked = DeviceBatch {
        mask: Some(DeviceBuf::of(&mask)),
        ..batch
    };
    // SAFETY: refused before anything is queued.
    let e = unsafe { attn.run_batch(&bp, &s, &q_buf, &k, &v, &masked, &ws, &out, None) };
    assert!(input(e.unwrap_err()));
    for bad in [
        BatchShape {
            seqs: 0,
            ..shape.clone()
        },
        BatchShape {
            max_rows: 0,
            ..shape.clone()
        },
        BatchShape {
            max_rows: 65_536,
            ..shape.clone()
        },
    ] {
        assert!(input(
            attn.plan_batch::<f16>(dev, &pool.g, &bad).unwrap_err()
        ));
    }
    // Raw pointers: past the allocation, not device memory, misaligned.
    let raw = DeviceBuf::of(&arrays.q).ptr();
    // SAFETY: each call only asks the driver about the address; none is used.
    unsafe {
        assert!(DeviceBuf::<f16>::from_raw(dev, raw, bp.q_len()).is_ok());
        assert!(input(
            DeviceBuf::<f16>::from_raw(dev, raw, bp.q_len() + 4096).unwrap_err()
        ));
        let host = [0u64; 16];
        assert!(input(
            DeviceBuf::<u64>::from_raw(dev, host.as_ptr() as u64, 16).unwrap_err()
        ));
        assert!(input(
            DeviceBuf::<f32>::from_raw(dev, raw + 2, 4).unwrap_err()
        ));
        assert!(DeviceStream::from_raw(dev, std::ptr::null_mut()).is_ok());
    }

    // Device: each broken step reports, and the good sequence beside it stays right.
    // SAFETY: the buffers live past the status call, which synchronises.
    unsafe { attn.run_batch(&bp, &s, &q_buf, &k, &v, &batch, &ws, &out, None) }.unwrap();
    bp.status(&s, &ws).unwrap();
    let mut table = stream.clone_dtoh(&arrays.table).unwrap();
    // Sequence 1's first page: one past the pool.
    table[8] = 20;
    // Each broken step: what the status says (every part of it), lengths, query offsets, table.
    let (outside, past_table, past_plan) = (
        "a page entry lies outside the pool",
        "a sequence is longer than its page table",
        "longer than the plan's max_seq_len",
    );
    type Broken<'a> = (&'a [&'a str], [u32; 2], [u32; 3], &'a [u32]);
    let broken: [Broken; 5] = [
        (&[outside], [100, 50], [0, 1, 2], &table),
        (&[past_table, past_plan], [100, 200], [0, 1, 2], &[]),
        (&[past_table, past_plan], [100, 129], [0, 1, 2], &[]),
        (&["more query rows than tokens"], [100, 0], [0, 1, 2], &[]),
        (&["query_start_loc"], [100, 50], [0, 2, 1], &[]),
    ];
    for (says, lens, qsl, table) in broken {
        let what = says[0];
        arrays.write(stream, &pool, &good, kind, &q);
        stream.memcpy_htod(&lens, &mut arrays.lens).unwrap();
        stream.memcpy_htod(&qsl, &mut arrays.qsl).unwrap();
        if !table.is_empty() {
            stream.memcpy_htod(table, &mut arrays.table).unwrap();
        }
        // SAFETY: the buffers live past the status call, which synchronises.
        unsafe {
            attn.run_batch(
                &bp,
                &s,
                &DeviceBuf::of(&arrays.q),
                &k,
                &v,
                &arrays.batch(kind, false),
                &DeviceBuf::of(&arrays.ws),
                &DeviceBuf::of(&arrays.out),
                None,
            )
        }
        .unwrap();
        let e = bp
            .status(&s, &DeviceBuf::of(&arrays.ws))
            .unwrap_err()
            .to_string();
        // Exactly these parts: a status word left over from an earlier run would add some.
        assert!(says.iter().all(|w| e.contains(w)), "{what}: {e}");
        assert_eq!(e.matches("; ").count() + 1, says.len(), "{what}: {e}");
        let all = download(dev, &arrays.out);
        // The output rows, then the guard past them (never written).
        let (got, guard) = all.split_at(bp.out_len());
        assert!(
            guard.iter().all(|x| x.is_nan()),
            "{what}: the guard was written"
        );
        let per_row = 4 * 128;
        let zeros = |rows: &[f32]| rows.iter().all(|&x| x == 0.0);
        if what != "query_start_loc" {
            // Sequence 0 as the oracle has it; sequence 1's row saw no key.
            let (want, _) = oracle::<f16>(&pool, &good[..1], 4, &shape.params, &q, None);
            let got0: Vec<f64> = got[..per_row].iter().map(|&x| f64::from(x)).collect();
            rotq_testkit::oracle::assert_matches(&got0, &want, Op::Attention, Precision::F16, what);
            assert!(zeros(&got[per_row..]), "{what}: {:?}", &got[per_row..][..8]);
        } else {
            assert!(zeros(got), "{what}: {:?}", &got[..8]);
        }
    }
    // The good step again: the status is clear; and through a plan without the page check
    // (release builds' default), the same output.
    arrays.write(stream, &pool, &good, kind, &q);
    let unchecked = attn
        .plan_batch::<f16>(
            dev,
            &pool.g,
            &BatchShape {
                checked: false,
                ..shape.clone()
            },
        )
        .unwrap();
    for p in [&bp, &unchecked] {
        arrays.run(&attn, p, &pool, stream);
        assert_step(&arrays, dev, &pool, p, &good, &q, "good step");
    }
}
