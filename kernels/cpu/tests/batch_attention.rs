//! Planned batch attention (`CpuAttention::plan` + `run_planned`) against the oracle: random
//! batches of decode rows and prefill chunks, each sequence with its own caches (any format,
//! contiguous or in shuffled pages), heads, dims, causal offset, window, soft-cap and additive
//! mask, checked sequence by sequence against `attention_f64_masked` on the same dequantized
//! cache bytes, output and log-sum-exp, on every instruction set of the machine. Then the edge
//! cases: rows the mask hides entirely, empty caches, NaN in the mask, −∞ scores from the
//! data, and the typed errors of wrong buffers and of a plan given another batch.

use ndarray::{Array2, Array3};
use proptest::prelude::*;
use rotq_cpu::{
    AttentionConfig, AttentionMask, BatchPlan, CacheCodec, CpuAttention, Isa, KvCacheView,
    SeqAttention,
};
use rotq_reference::attention::attention_f64_masked;
use rotq_reference::rotation::SplitMix64;
use rotq_reference::tolerance::{Op, Precision};
use rotq_reference::{AttentionParams, Error, KvFormat, RotationPlan};
use rotq_testkit::data::Rows;
use rotq_testkit::oracle::assert_matches_f32;
use rotq_testkit::rotations::RotationKind;

/// How a sequence's mask is drawn: finite biases in `[-3, 3)`, a share of −∞ entries, rows
/// hidden entirely, a stride longer than the keys (its padding NaN, as are the entries of keys
/// outside causality and the window: neither may be read).
#[derive(Clone, Debug)]
struct MaskSpec {
    extra_stride: usize,
    /// Chance (in 1/8) of a −∞ entry.
    hidden_eighths: u64,
    /// Chance (in 1/8) of a row hidden entirely.
    hidden_row_eighths: u64,
}

#[derive(Clone, Debug)]
struct Seq {
    n_q: usize,
    n_tokens: usize,
    h_kv: usize,
    group: usize,
    d: usize,
    d_v: usize,
    k_format: KvFormat,
    v_format: KvFormat,
    params: AttentionParams,
    mask: Option<MaskSpec>,
    /// Tokens per page of a paged view (`None`: contiguous).
    page_tokens: Option<usize>,
    seed: u64,
}

impl Seq {
    fn h_q(&self) -> usize {
        self.h_kv * self.group
    }

    fn row_stride(&self) -> usize {
        self.n_tokens + self.mask.as_ref().map_or(0, |m| m.extra_stride)
    }
}

#[derive(Clone, Debug)]
struct Batch {
    seqs: Vec<Seq>,
    /// The rotations of Q and K, and of V (one plan for the whole batch).
    plan_kind: (RotationKind, RotationKind),
    config: AttentionConfig,
    seed: u64,
}

impl Batch {
    fn plan(&self) -> RotationPlan {
        let (d, d_v) = (self.seqs[0].d, self.seqs[0].d_v);
        RotationKind::plan(self.plan_kind.0, self.plan_kind.1, d, d_v, self.seed)
    }
}

/// `bytes` (whole tokens of `token_bytes`) moved into a pool of pages of `page_tokens` tokens,
/// the pages in a seeded random order among two spare ones, every byte not written 0xFF (NaN
/// in f16 and in the formats' scales, so a read of a wrong page shows): `(pool, block table)`.
fn shuffled_pages(bytes: &[u8], token_bytes: usize, page_tokens: usize, seed: u64) -> Pages {
    let page_bytes = page_tokens * token_bytes;
    let used = (bytes.len() / token_bytes).div_ceil(page_tokens);
    let mut order: Vec<u32> = (0..used as u32 + 2).collect();
    let mut g = SplitMix64::new(seed);
    for i in (1..order.len()).rev() {
        order.swap(i, (g.next_u64() % (i as u64 + 1)) as usize);
    }
    let mut pool = vec![0xFF; order.len() * page_bytes];
    for (chunk, &page) in bytes.chunks(page_bytes).zip(&order) {
        let at = page as usize * page_bytes;
        pool[at..at + chunk.len()].copy_from_slice(chunk);
    }
    order.truncate(used);
    (pool, order)
}

/// A pool of pages and a block table.
type Pages = (Vec<u8>, Vec<u32>);

/// One sequence's buffers: queries, cache bytes (contiguous, and the paged pools and tables
/// of K and V when paged), mask values.
struct SeqData {
    q: Vec<f32>,
    kb: Vec<u8>,
    vb: Vec<u8>,
    paged: Option<(Pages, Pages)>,
    mask: Option<Vec<f32>>,
}

impl SeqData {
    /// Caches written by the kernel codec (the bytes both sides read), seeded queries and mask.
    fn new(s: &Seq, plan: &RotationPlan) -> Self {
        let isa = Isa::best();
        let kc = CacheCodec::new(s.k_format, s.d, plan.qk.as_ref(), isa).unwrap();
        let vc = CacheCodec::new(s.v_format, s.d_v, plan.v.as_ref(), isa).unwrap();
        let rows = s.n_tokens * s.h_kv;
        let mut kb = vec![0u8; rows * kc.row_bytes()];
        let mut vb = vec![0u8; rows * vc.row_bytes()];
        let k_rows = Rows::uniform(2.0).f32s(rows * s.d, s.seed ^ 2);
        kc.quantize(&k_rows, &mut kb, 0).unwrap();
        let v_rows = Rows::uniform(1.0).f32s(rows * s.d_v, s.seed ^ 3);
        vc.quantize(&v_rows, &mut vb, 0).unwrap();
        let paged = s.page_tokens.map(|pt| {
            (
                shuffled_pages(&kb, s.h_kv * kc.row_bytes(), pt, s.seed ^ 5),
                shuffled_pages(&vb, s.h_kv * vc.row_bytes(), pt, s.seed ^ 6),
            )
        });
        let q = Rows::uniform(1.5).f32s(s.n_q * s.h_q() * s.d, s.seed ^ 4);
        let mask = s.mask.as_ref().map(|m| {
            let stride = s.row_stride();
            let bias = Rows::uniform(3.0).f32s(s.n_q * stride, s.seed ^ 7);
            let mut g = SplitMix64::new(s.seed ^ 8);
            let mut values = vec![f32::NAN; s.n_q * stride];
            for i in 0..s.n_q {
                let whole_row = g.next_u64() % 8 < m.hidden_row_eighths;
                for j in 0..s.n_tokens {
                    let hidden = whole_row || g.next_u64() % 8 < m.hidden_eighths;
                    values[i * stride + j] = if !s.params.visible(i, j) {
                        f32::NAN
                    } else if hidden {
                        f32::NEG_INFINITY
                    } else {
                        bias[i * stride + j]
                    };
                }
            }
            values
        });
        Self {
            q,
            kb,
            vb,
            paged,
            mask,
        }
    }

    /// The kernel's view of this sequence: paged where drawn so, else contiguous (or
    /// contiguous whatever was drawn, with `contiguous`).
    fn seq<'a>(&'a self, s: &'a Seq, contiguous: bool) -> SeqAttention<'a> {
        let (k, v) = match (&self.paged, contiguous) {
            (Some(((kp, kt), (vp, vt))), false) => {
                let pt = s.page_tokens.unwrap();
                (
                    KvCacheView::paged(s.k_format, kp, kt, pt, s.n_tokens, s.h_kv, s.d).unwrap(),
                    KvCacheView::paged(s.v_format, vp, vt, pt, s.n_tokens, s.h_kv, s.d_v).unwrap(),
                )
            }
            _ => (
                KvCacheView::new(s.k_format, &self.kb, s.n_tokens, s.h_kv, s.d).unwrap(),
                KvCacheView::new(s.v_format, &self.vb, s.n_tokens, s.h_kv, s.d_v).unwrap(),
            ),
        };
        SeqAttention {
            q: &self.q,
            n_q: s.n_q,
            h_q: s.h_q(),
            k,
            v,
            params: &s.params,
            mask: self.mask.as_deref().map(|values| AttentionMask {
                values,
                row_stride: s.row_stride(),
            }),
        }
    }

    /// The oracle on the same cache bytes: Q rotated in f64, dense f64 attention with the mask
    /// on the dequantized caches, the output rotated back. Returns (output, LSE).
    fn oracle(&self, s: &Seq, plan: &RotationPlan) -> (Vec<f64>, Vec<f64>) {
        let decode = |f: KvFormat, b: &[u8], dim: usize| {
            let vals = f.dequantize_rows(b, dim).unwrap();
            let vals = vals.into_iter().map(f64::from).collect();
            Array3::from_shape_vec((s.n_tokens, s.h_kv, dim), vals).unwrap()
        };
        let mut q: Vec<f64> = self.q.iter().map(|&v| f64::from(v)).collect();
        if let Some(r) = &plan.qk {
            r.rotate_rows(&mut q, false).unwrap();
        }
        let q = Array3::from_shape_vec((s.n_q, s.h_q(), s.d), q).unwrap();
        let (k, v) = (
            decode(s.k_format, &self.kb, s.d),
            decode(s.v_format, &self.vb, s.d_v),
        );
        let stride = s.row_stride();
        let mask = self.mask.as_ref().map(|m| {
            Array2::from_shape_fn((s.n_q, s.n_tokens), |(i, j)| f64::from(m[i * stride + j]))
        });
        let a = attention_f64_masked(
            q.view(),
            k.view(),
            v.view(),
            &s.params,
            mask.as_ref().map(|m| m.view()),
        )
        .unwrap();
        let mut out: Vec<f64> = a.output.iter().copied().collect();
        if let Some(r) = &plan.v {
            r.rotate_rows(&mut out, true).unwrap();
        }
        (out, a.lse.iter().copied().collect())
    }
}

/// Plans `seqs` and runs them in a workspace, output and LSE first filled with NaN (the
/// kernel must not read what it did not write): (plan, output, LSE).
fn run(kernel: &CpuAttention, seqs: &[SeqAttention<'_>]) -> (BatchPlan, Vec<f32>, Vec<f32>) {
    let plan = kernel.plan(seqs).unwrap();
    let mut workspace = vec![f32::NAN; plan.workspace_len()];
    let mut out = vec![f32::NAN; plan.out_len()];
    let mut lse = vec![f32::NAN; plan.lse_len()];
    kernel
        .run_planned(&plan, seqs, &mut workspace, &mut out, Some(&mut lse))
        .unwrap();
    (plan, out, lse)
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Every check of a batch, on every instruction set: each sequence's output and the whole
/// LSE follow the oracle; running the plan again in the dirty workspace gives the same bits;
/// with a fixed number of slices (the partition of a sequence then does not depend on the
/// others), each sequence's rows equal, bit for bit, a batch of that sequence alone on
/// contiguous views.
fn check(b: &Batch) {
    let plan = b.plan();
    let data: Vec<SeqData> = b.seqs.iter().map(|s| SeqData::new(s, &plan)).collect();
    let seqs: Vec<SeqAttention<'_>> = b
        .seqs
        .iter()
        .zip(&data)
        .map(|(s, d)| d.seq(s, false))
        .collect();
    let want: Vec<(Vec<f64>, Vec<f64>)> = b
        .seqs
        .iter()
        .zip(&data)
        .map(|(s, d)| d.oracle(s, &plan))
        .collect();
    let want_lse: Vec<f64> = want.iter().flat_map(|w| w.1.iter().copied()).collect();
    for isa in Isa::all_available() {
        let kernel = CpuAttention::new(&plan, isa).with_config(b.config);
        let (batch_plan, out, lse) = run(&kernel, &seqs);
        let mut at = 0;
        for (i, (s, (want_out, _))) in b.seqs.iter().zip(&want).enumerate() {
            let got = &out[at..at + want_out.len()];
            let what = format!("{isa}, sequence {i} of {b:?}");
            assert_matches_f32(got, want_out, Op::Attention, Precision::F32, &what);
            if b.config.kv_splits > 0 {
                let alone = run(&kernel, &[data[i].seq(s, true)]).1;
                assert_eq!(bits(got), bits(&alone), "{what}: alone");
            }
            at += want_out.len();
        }
        let what = format!("{isa}, LSE of {b:?}");
        assert_matches_f32(&lse, &want_lse, Op::Attention, Precision::F32, &what);
        // The same plan again, in the workspace the first run left.
        let mut workspace = vec![f32::NAN; batch_plan.workspace_len()];
        let (mut again, mut lse_again) = (vec![0.0; out.len()], vec![0.0; lse.len()]);
        for _ in 0..2 {
            kernel
                .run_planned(
                    &batch_plan,
                    &seqs,
                    &mut workspace,
                    &mut again,
                    Some(&mut lse_again),
                )
                .unwrap();
        }
        assert_eq!(bits(&again), bits(&out), "{isa}: rerun of {b:?}");
        assert_eq!(bits(&lse_again), bits(&lse), "{isa}: rerun LSE of {b:?}");
    }
}

/// The formats that take rows of `d` values.
fn formats_for(d: usize) -> Vec<KvFormat> {
    KvFormat::ALL
        .into_iter()
        .filter(|f| f.check_row_len(d).is_ok())
        .collect()
}

fn seqs() -> impl Strategy<Value = Seq> {
    let dims = vec![32usize, 64, 128];
    (
        (
            1usize..10,
            0usize..71,
            1usize..3,
            prop::sample::select(vec![1usize, 2, 4]),
        ),
        (
            prop::sample::select(dims.clone()),
            prop::sample::select(dims),
            any::<prop::sample::Index>(),
            any::<prop::sample::Index>(),
        ),
        (
            prop::bool::weighted(0.8),
            0usize..3,
            0usize..80,
            prop::option::of(1usize..40),
            prop::option::of(1.0f64..30.0),
        ),
        prop::option::of((0usize..4, 0u64..4, 0u64..3)),
        prop::option::of(1usize..20),
        any::<u64>(),
    )
        .prop_map(
            |(
                (n_q, n_tokens, h_kv, group),
                (d, d_v, fk, fv),
                (causal, offset_kind, offset, window, softcap),
                mask,
                page_tokens,
                seed,
            )| Seq {
                n_q,
                n_tokens,
                h_kv,
                group,
                d,
                d_v,
                k_format: *fk.get(&formats_for(d)),
                v_format: *fv.get(&formats_for(d_v)),
                params: AttentionParams {
                    scale: None,
                    causal,
                    // The last n_q tokens' queries (a prefill chunk or a decode row), or
                    // queries anywhere.
                    pos_offset: match offset_kind {
                        0 | 1 => n_tokens.saturating_sub(n_q),
                        _ => offset,
                    },
                    window,
                    softcap,
                },
                mask: mask.map(
                    |(extra_stride, hidden_eighths, hidden_row_eighths)| MaskSpec {
                        extra_stride,
                        hidden_eighths,
                        hidden_row_eighths,
                    },
                ),
                page_tokens,
                seed,
            },
        )
}

fn batches() -> impl Strategy<Value = Batch> {
    (
        prop::collection::vec(seqs(), 1..6),
        (0usize..4, 0usize..4),
        (
            prop::sample::select(vec![16usize, 64]),
            prop::sample::select(vec![1usize, 3, 16]),
            0usize..5,
            0usize..3,
        ),
        prop::sample::select(vec![32usize, 64, 128]),
        any::<u64>(),
    )
        .prop_map(
            |(mut seqs, (qk, v), (block_n, block_m, kv_splits, heads_per_task), dim, seed)| {
                let plan_kind = (RotationKind::nth(qk), RotationKind::nth(v));
                // One rotation plan for the batch: the sides it rotates share its dim (each
                // sequence keeps its own where nothing is rotated).
                for s in &mut seqs {
                    if plan_kind.0 != RotationKind::None {
                        s.d = dim;
                        s.k_format = formats_for(dim)
                            .into_iter()
                            .find(|f| *f == s.k_format)
                            .unwrap_or(KvFormat::Q4_0);
                    }
                    if plan_kind.1 != RotationKind::None {
                        s.d_v = dim;
                        s.v_format = formats_for(dim)
                            .into_iter()
                            .find(|f| *f == s.v_format)
                            .unwrap_or(KvFormat::Q8_0);
                    }
                }
                Batch {
                    seqs,
                    plan_kind,
                    config: AttentionConfig {
                        block_n,
                        block_m,
                        kv_splits,
                        heads_per_task,
                    },
                    seed,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn planned_batches_match_the_oracle(b in batches()) {
        check(&b);
    }
}

/// A sequence of the edge-case tests: one KV head, f32 caches, the last `n_q` positions'
/// queries, no mask (tests plant values into its [`SeqData`]).
fn f32_seq(n_q: usize, n_tokens: usize, group: usize, d: usize, seed: u64) -> Seq {
    Seq {
        n_q,
        n_tokens,
        h_kv: 1,
        group,
        d,
        d_v: d,
        k_format: KvFormat::F32,
        v_format: KvFormat::F32,
        params: AttentionParams {
            causal: true,
            pos_offset: n_tokens.saturating_sub(n_q),
            ..Default::default()
        },
        mask: None,
        page_tokens: None,
        seed,
    }
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Runs `seqs` (their data given) on every instruction set and slice count, and checks
/// output and LSE against the oracle (NaN where it has NaN, −∞ where it has −∞).
fn check_data(seqs: &[Seq], data: &[SeqData]) -> Vec<(Vec<f32>, Vec<f32>)> {
    let plan = RotationPlan::none();
    let views: Vec<SeqAttention<'_>> = seqs.iter().zip(data).map(|(s, d)| d.seq(s, true)).collect();
    let want: Vec<(Vec<f64>, Vec<f64>)> = seqs
        .iter()
        .zip(data)
        .map(|(s, d)| d.oracle(s, &plan))
        .collect();
    let want_out: Vec<f64> = want.iter().flat_map(|w| w.0.iter().copied()).collect();
    let want_lse: Vec<f64> = want.iter().flat_map(|w| w.1.iter().copied()).collect();
    let mut results = Vec::new();
    for isa in Isa::all_available() {
        for kv_splits in [1, 3] {
            let config = AttentionConfig {
                block_n: 16,
                block_m: 4,
                kv_splits,
                heads_per_task: 0,
            };
            let kernel = CpuAttention::new(&plan, isa).with_config(config);
            let (_, out, lse) = run(&kernel, &views);
            let what = format!("{isa}, {kv_splits} slices");
            assert_matches_f32(&out, &want_out, Op::Attention, Precision::F32, &what);
            for (i, (g, w)) in lse.iter().zip(&want_lse).enumerate() {
                let infinite = g.is_infinite() || w.is_infinite();
                assert!(
                    g.is_nan() == w.is_nan() && (!infinite || f64::from(*g) == *w),
                    "{what}: LSE {i}: got {g}, want {w}"
                );
            }
            assert_matches_f32(&lse, &want_lse, Op::Attention, Precision::F32, &what);
            results.push((out, lse));
        }
    }
    results
}

/// Rows whose mask hides every visible key are the zero row with LSE −∞ whatever K and V hold
/// there (NaN planted in both); a row with one key the mask leaves is NaN when that key scores
/// −∞ (the oracle's 0/0), and takes a NaN from the V row of a key it hides in another slice
/// (weight 0 · NaN). On the tiled path and the in-register decode path (f16, four heads a
/// group, on AVX2), over one and three slices.
#[test]
fn rows_the_mask_hides_entirely_are_zero_with_lse_minus_infinity() {
    let inf = f32::NEG_INFINITY;
    let plan = RotationPlan::none();
    for (group, d, n_q) in [(4usize, 64usize, 1usize), (2, 32, 5)] {
        for format in [KvFormat::F32, KvFormat::F16] {
            let n_tokens = 40;
            let (h_q, row_bytes) = (group, format.row_bytes(d).unwrap());
            let seq = |seed| Seq {
                k_format: format,
                v_format: format,
                mask: Some(MaskSpec {
                    extra_stride: 3,
                    hidden_eighths: 0,
                    hidden_row_eighths: 0,
                }),
                ..f32_seq(n_q, n_tokens, group, d, seed)
            };
            let seqs = [seq(11), seq(12), seq(13)];
            let stride = seqs[0].row_stride();
            let mut data: Vec<SeqData> = seqs.iter().map(|s| SeqData::new(s, &plan)).collect();
            let put = |bytes: &mut [u8], token: usize, first: f32| {
                let mut values = vec![1.0f32; d];
                values[0] = first;
                let row: Vec<u8> = match format {
                    KvFormat::F16 => values
                        .iter()
                        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                        .collect(),
                    _ => f32_bytes(&values),
                };
                bytes[token * row_bytes..][..row_bytes].copy_from_slice(&row);
            };
            // Every row hides every key, K and V of key 7 hold NaN.
            put(&mut data[0].kb, 7, f32::NAN);
            put(&mut data[0].vb, 7, f32::NAN);
            // Every row leaves key 30 alone, which scores −∞ (a −∞ in K times a positive
            // query value, in every head).
            put(&mut data[1].kb, 30, inf);
            for r in 0..n_q * h_q {
                data[1].q[r * d] = 0.75;
            }
            // Every row leaves key 33 alone (slice 2 of 3) and hides key 3 (slice 0), whose V
            // row has a NaN in column 0.
            put(&mut data[2].vb, 3, f32::NAN);
            for (s, keep) in [(0usize, None), (1, Some(30usize)), (2, Some(33))] {
                let mask = data[s].mask.as_mut().unwrap();
                for i in 0..n_q {
                    mask[i * stride..i * stride + n_tokens].fill(inf);
                    if let Some(j) = keep {
                        mask[i * stride + j] = -0.5;
                    }
                }
            }
            let results = check_data(&seqs, &data);
            let rows = n_q * h_q;
            for (out, lse) in results {
                let (o, l) = (
                    |s: usize| &out[s * rows * d..][..rows * d],
                    |s: usize| &lse[s * rows..][..rows],
                );
                assert!(o(0).iter().all(|x| *x == 0.0), "{format}: hidden");
                assert!(l(0).iter().all(|x| *x == inf), "{format}: hidden LSE");
                assert!(o(1).iter().all(|x| x.is_nan()), "{format}: −∞ score");
                assert!(l(1).iter().all(|x| x.is_nan()), "{format}: −∞ score LSE");
                assert!(o(2)
                    .chunks(d)
                    .all(|r| r[0].is_nan() && r[1..].iter().all(|x| x.is_finite())));
                assert!(l(2).iter().all(|x| x.is_finite()), "{format}: 0 · NaN LSE");
            }
        }
    }
}

/// An empty cache, and queries that see no key, give zero rows with LSE −∞; a NaN mask value
/// at a visible key makes its row NaN (LSE too), and one outside causality is never read.
#[test]
fn empty_caches_and_nan_in_the_mask() {
    let plan = RotationPlan::none();
    let empty = f32_seq(3, 0, 2, 32, 1);
    let mut windowed = f32_seq(2, 20, 2, 32, 2);
    // Queries at positions 40 and 41 with a window of 5: no key in reach.
    windowed.params.pos_offset = 40;
    windowed.params.window = Some(5);
    let mut masked = f32_seq(4, 20, 1, 64, 3);
    masked.mask = Some(MaskSpec {
        extra_stride: 0,
        hidden_eighths: 2,
        hidden_row_eighths: 0,
    });
    let seqs = [empty, windowed, masked];
    let mut data: Vec<SeqData> = seqs.iter().map(|s| SeqData::new(s, &plan)).collect();
    let m = data[2].mask.as_mut().unwrap();
    m[20 + 5] = f32::NAN; // row 1 (position 17) sees key 5: NaN
    assert!(m[2 * 20 + 19].is_nan()); // row 2 (position 18) must not read key 19
    m[2 * 20 + 4] = 1.0;
    let results = check_data(&seqs, &data);
    for (out, lse) in results {
        // The first two sequences: 3·2 + 2·2 rows of 32, all zero, LSE −∞.
        assert!(out[..10 * 32].iter().all(|x| *x == 0.0));
        assert!(lse[..10].iter().all(|x| *x == f32::NEG_INFINITY));
        let rows: Vec<&[f32]> = out[10 * 32..].chunks(64).collect();
        assert!(rows[1].iter().all(|x| x.is_nan()) && lse[11].is_nan());
        assert!(rows[2].iter().all(|x| x.is_finite()) && lse[12].is_finite());
    }
}

/// Wrong buffer lengths, masks too short, and a plan given another batch are typed errors,
/// found before any work: `out` and `lse` are left as they were.
#[test]
fn wrong_buffers_and_batches_are_typed_errors() {
    let plan = RotationPlan::none();
    let a = f32_seq(3, 30, 2, 32, 1);
    let b = f32_seq(1, 50, 4, 32, 2);
    let mut with_mask = a.clone();
    with_mask.mask = Some(MaskSpec {
        extra_stride: 2,
        hidden_eighths: 1,
        hidden_row_eighths: 0,
    });
    let (da, db, dm) = (
        SeqData::new(&a, &plan),
        SeqData::new(&b, &plan),
        SeqData::new(&with_mask, &plan),
    );
    let seqs = [da.seq(&a, true), db.seq(&b, true)];
    let kernel = CpuAttention::new(&plan, Isa::best());
    let p = kernel.plan(&seqs).unwrap();
    let mut ws = vec![0.0f32; p.workspace_len()];
    let (mut out, mut lse) = (vec![7.0f32; p.out_len()], vec![7.0f32; p.lse_len()]);
    let length = |r: rotq_reference::Result<()>| matches!(r, Err(Error::LengthMismatch { .. }));
    let n = p.workspace_len();
    assert!(length(kernel.run_planned(
        &p,
        &seqs,
        &mut ws[..n - 1],
        &mut out,
        None
    )));
    let o = p.out_len();
    assert!(length(kernel.run_planned(
        &p,
        &seqs,
        &mut ws,
        &mut out[..o - 1],
        None
    )));
    let mut long_out = vec![7.0f32; o + 1];
    assert!(length(kernel.run_planned(
        &p,
        &seqs,
        &mut ws,
        &mut long_out,
        None
    )));
    let l = p.lse_len();
    assert!(length(kernel.run_planned(
        &p,
        &seqs,
        &mut ws,
        &mut out,
        Some(&mut lse[..l - 1])
    )));
    // Another batch: fewer sequences, another order, another cache length or position.
    assert!(length(kernel.run_planned(
        &p,
        &seqs[..1],
        &mut ws,
        &mut out,
        None
    )));
    let swapped = [seqs[1], seqs[0]];
    let shape = |r: rotq_reference::Result<()>| matches!(r, Err(Error::Shape(_)));
    assert!(shape(
        kernel.run_planned(&p, &swapped, &mut ws, &mut out, None)
    ));
    let short_k = KvCacheView::new(KvFormat::F32, &da.kb[..29 * 32 * 4], 29, 1, 32).unwrap();
    let shorter = [
        SeqAttention {
            k: short_k,
            v: short_k,
            ..seqs[0]
        },
        seqs[1],
    ];
    assert!(shape(
        kernel.run_planned(&p, &shorter, &mut ws, &mut out, None)
    ));
    let moved = AttentionParams {
        pos_offset: 28,
        ..a.params.clone()
    };
    let later = [
        SeqAttention {
            params: &moved,
            ..seqs[0]
        },
        seqs[1],
    ];
    assert!(shape(
        kernel.run_planned(&p, &later, &mut ws, &mut out, None)
    ));
    assert!(out.iter().all(|x| *x == 7.0) && lse.iter().all(|x| *x == 7.0));
    // A mask may change between runs (the plan does not depend on it), but it is checked.
    let ms = dm.seq(&with_mask, true);
    let mask = ms.mask.unwrap();
    let pm = kernel.plan(&[ms]).unwrap();
    let mut wsm = vec![0.0f32; pm.workspace_len()];
    let mut outm = vec![7.0f32; pm.out_len()];
    let cut = AttentionMask {
        values: &mask.values[..mask.values.len() - 3],
        ..mask
    };
    let short = SeqAttention {
        mask: Some(cut),
        ..ms
    };
    assert!(length(kernel.plan(&[short]).map(|_| ())));
    assert!(length(kernel.run_planned(
        &pm,
        &[short],
        &mut wsm,
        &mut outm,
        None
    )));
    let narrow = AttentionMask {
        row_stride: 29,
        ..mask
    };
    let narrow = SeqAttention {
        mask: Some(narrow),
        ..ms
    };
    assert!(shape(kernel.plan(&[narrow]).map(|_| ())));
    assert!(outm.iter().all(|x| *x == 7.0));
    let unmasked = SeqAttention { mask: None, ..ms };
    kernel
        .run_planned(&pm, &[unmasked], &mut wsm, &mut outm, None)
        .unwrap();
    let alone = kernel
        .run(&da.q, 3, 2, &seqs[0].k, &seqs[0].v, &a.params)
        .unwrap();
    assert_eq!(bits(&outm), bits(&alone));
    // An empty batch plans to nothing and runs.
    let none = kernel.plan(&[]).unwrap();
    assert_eq!((none.out_len(), none.lse_len()), (0, 0));
    kernel
        .run_planned(&none, &[], &mut [], &mut [], Some(&mut []))
        .unwrap();
}
