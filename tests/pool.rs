//! The batch engine API (`rotq::pool`) against the oracle: random batches of sequences in one
//! pool (shuffled pages, page sizes that divide nothing, decode and prefill rows mixed, masks
//! with hidden keys) give, sequence by sequence, the oracle's attention and log-sum-exp on the
//! pool's own bytes; one batch append lands each token where its slot says, as a
//! quantization of its rows alone would; both table forms name the same pages; and every
//! malformed table, slot mapping, mask or buffer is a typed error that changes nothing.

use ndarray::{Array2, Array3};
use proptest::prelude::*;
use rotq::pool::{Batch, KvPool, Mask, PageTables, PoolSpec};
use rotq::reference::attention::attention_f64_masked;
use rotq::reference::tolerance::{Op, Precision};
use rotq::{AttentionParams, KvFormat, Rotation, RotationPlan};
use rotq_testkit::oracle::assert_matches;

/// Values in [-1, 1) with a large outlier every 31 (what rotation is for).
fn random(len: usize, seed: u64) -> Vec<f32> {
    rotq_testkit::data::Rows::outliers().f32s(len, seed)
}

const HKV: usize = 2;
const D: usize = 64;

fn spec(k_format: KvFormat, v_format: KvFormat, n_pages: usize, page_tokens: usize) -> PoolSpec {
    PoolSpec {
        k_format,
        v_format,
        plan: RotationPlan {
            qk: Some(Rotation::hadamard(D).unwrap()),
            v: Some(Rotation::block_hadamard(D, 32).unwrap()),
        },
        n_kv_heads: HKV,
        head_dim: D,
        v_dim: D,
        n_pages,
        page_tokens,
        query: rotq::QueryMode::Auto,
    }
}

/// A batch laid out in a pool: each sequence's pages (drawn from a shuffled pool) and length.
struct Layout {
    page_tokens: usize,
    n_pages: usize,
    pages: Vec<Vec<u32>>,
    lens: Vec<usize>,
}

impl Layout {
    fn new(lens: &[usize], page_tokens: usize, seed: u64) -> Self {
        let need: usize = lens.iter().map(|l| l.div_ceil(page_tokens)).sum();
        let n_pages = need + 3; // some pages no sequence uses
        let mut order: Vec<u32> = (0..n_pages as u32).collect();
        let mut rng = rotq::reference::rotation::SplitMix64::new(seed);
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let mut next = order.into_iter();
        let pages = lens
            .iter()
            .map(|l| next.by_ref().take(l.div_ceil(page_tokens)).collect())
            .collect();
        Self {
            page_tokens,
            n_pages,
            pages,
            lens: lens.to_vec(),
        }
    }

    fn slot(&self, b: usize, t: usize) -> i64 {
        (self.pages[b][t / self.page_tokens] as usize * self.page_tokens + t % self.page_tokens)
            as i64
    }

    fn csr(&self) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
        let mut indptr = vec![0u32];
        let (mut indices, mut last) = (Vec::new(), Vec::new());
        for (p, &l) in self.pages.iter().zip(&self.lens) {
            indices.extend_from_slice(p);
            indptr.push(indices.len() as u32);
            last.push(if l == 0 {
                0
            } else {
                (l - (p.len() - 1) * self.page_tokens) as u32
            });
        }
        (indptr, indices, last)
    }
}

/// Writes every sequence's rows in one append, tokens in a shuffled order with padding
/// slots; returns each sequence's K and V rows.
fn fill(pool: &mut KvPool, layout: &Layout, seed: u64) -> Vec<(Vec<f32>, Vec<f32>)> {
    let rows: Vec<(Vec<f32>, Vec<f32>)> = layout
        .lens
        .iter()
        .enumerate()
        .map(|(b, &l)| {
            (
                random(l * HKV * D, seed + 2 * b as u64),
                random(l * HKV * D, seed + 2 * b as u64 + 1),
            )
        })
        .collect();
    let mut tokens: Vec<Option<(usize, usize)>> = layout
        .lens
        .iter()
        .enumerate()
        .flat_map(|(b, &l)| (0..l).map(move |t| Some((b, t))))
        .collect();
    tokens.push(None);
    tokens.insert(tokens.len() / 2, None);
    let mut rng = rotq::reference::rotation::SplitMix64::new(seed ^ 0xabc);
    for i in (1..tokens.len()).rev() {
        tokens.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let (mut k, mut v, mut slots, mut pos) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for tok in &tokens {
        let row = HKV * D;
        match *tok {
            Some((b, t)) => {
                k.extend_from_slice(&rows[b].0[t * row..(t + 1) * row]);
                v.extend_from_slice(&rows[b].1[t * row..(t + 1) * row]);
                slots.push(layout.slot(b, t));
                pos.push(t as u64);
            }
            None => {
                k.extend(std::iter::repeat_n(f32::NAN, row));
                v.extend(std::iter::repeat_n(f32::NAN, row));
                slots.push(-1);
                pos.push(0);
            }
        }
    }
    pool.append(&k, &v, &slots, &pos).unwrap();
    rows
}

/// Sequence `b`'s K (or V) rows, dequantized from the pool through its pages, in f64.
fn read(pool: &KvPool, layout: &Layout, b: usize, v: bool) -> Array3<f64> {
    let s = pool.spec();
    let (format, bytes) = if v {
        (s.v_format, pool.v())
    } else {
        (s.k_format, pool.k())
    };
    let tb = HKV * format.row_bytes(D).unwrap();
    let mut vals = Vec::new();
    for t in 0..layout.lens[b] {
        let slot = layout.slot(b, t) as usize;
        let row = format
            .dequantize_rows(&bytes[slot * tb..(slot + 1) * tb], D)
            .unwrap();
        vals.extend(row.into_iter().map(f64::from));
    }
    Array3::from_shape_vec((layout.lens[b], HKV, D), vals).unwrap()
}

fn formats() -> impl Strategy<Value = KvFormat> {
    prop::sample::select(vec![
        KvFormat::F32,
        KvFormat::F16,
        KvFormat::Q8_0,
        KvFormat::Q4_0,
        KvFormat::Iq4Nl,
        KvFormat::Tq4,
        KvFormat::Tq2,
        KvFormat::Tq3Qjl,
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// A random batch equals its sequences run one by one through the oracle, output and LSE.
    #[test]
    fn batches_follow_the_oracle_sequence_by_sequence(
        seqs in prop::collection::vec((0usize..40, 0usize..7), 1..5),
        page_tokens in prop::sample::select(vec![1usize, 3, 5, 16]),
        group in prop::sample::select(vec![1usize, 2, 4]),
        kf in formats(),
        vf in formats(),
        csr in any::<bool>(),
        masked in any::<bool>(),
        window in prop::option::of(1usize..20),
        softcap in prop::option::of(5.0f64..50.0),
        seed in any::<u64>(),
    ) {
        let lens: Vec<usize> = seqs.iter().map(|s| s.0).collect();
        let n_q: Vec<usize> = seqs.iter().map(|&(l, q)| q.min(l)).collect();
        let layout = Layout::new(&lens, page_tokens, seed);
        let mut pool = KvPool::new(spec(kf, vf, layout.n_pages, page_tokens)).unwrap();
        fill(&mut pool, &layout, seed);
        let h_q = HKV * group;
        let mut loc = vec![0u32];
        for &n in &n_q {
            loc.push(loc.last().unwrap() + n as u32);
        }
        let rows = *loc.last().unwrap() as usize;
        let q = random(rows * h_q * D, seed ^ 0x51);
        let stride = lens.iter().copied().max().unwrap_or(0) + 3;
        let mask_values: Vec<f32> = random(rows * stride, seed ^ 0x77)
            .into_iter()
            .map(|x| if x > 0.6 { f32::NEG_INFINITY } else { x })
            .collect();
        let (indptr, indices, last) = layout.csr();
        let table_rows: Vec<i32> = {
            let max = layout.pages.iter().map(|p| p.len()).max().unwrap_or(0) + 1;
            let mut t = vec![-1i32; lens.len() * max];
            for (b, p) in layout.pages.iter().enumerate() {
                for (i, &pg) in p.iter().enumerate() {
                    t[b * max + i] = pg as i32;
                }
            }
            t
        };
        let lens32: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
        let tables = if csr {
            PageTables::Csr { indptr: &indptr, indices: &indices, last_page_len: &last }
        } else {
            PageTables::Block {
                table: &table_rows,
                max_blocks: table_rows.len() / lens.len(),
                seq_lens: &lens32,
            }
        };
        let mut batch = Batch::new(&loc, tables, h_q);
        batch.params.window = window;
        batch.params.softcap = softcap;
        if masked {
            batch.mask = Some(Mask { values: &mask_values, row_stride: stride });
        }
        let plan = pool.plan(&batch).unwrap();
        let mut ws = vec![f32::NAN; plan.workspace_len()];
        let mut out = vec![f32::NAN; plan.out_len()];
        let mut lse = vec![f32::NAN; plan.lse_len()];
        pool.run(&plan, &batch, &q, &mut ws, &mut out, Some(&mut lse)).unwrap();
        // The same plan runs again on the same workspace, to the same bits.
        let mut again = vec![0f32; plan.out_len()];
        pool.run(&plan, &batch, &q, &mut ws, &mut again, None).unwrap();
        prop_assert_eq!(
            out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            again.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );

        let s = pool.spec().clone();
        for b in 0..lens.len() {
            let (r0, r1) = (loc[b] as usize, loc[b + 1] as usize);
            let mode = s.query.resolve(s.k_format, s.plan.qk.is_some(), D);
            let qr = rotq_testkit::oracle::oracle_queries(&q[r0 * h_q * D..r1 * h_q * D], s.plan.qk.as_ref(), mode);
            let qa = Array3::from_shape_vec((r1 - r0, h_q, D), qr).unwrap();
            let mask = masked.then(|| {
                Array2::from_shape_fn((r1 - r0, lens[b]), |(i, j)| {
                    f64::from(mask_values[(r0 + i) * stride + j])
                })
            });
            let params = AttentionParams {
                causal: true,
                pos_offset: lens[b] - (r1 - r0),
                window,
                softcap,
                ..Default::default()
            };
            let want = attention_f64_masked(
                qa.view(),
                read(&pool, &layout, b, false).view(),
                read(&pool, &layout, b, true).view(),
                &params,
                mask.as_ref().map(|m| m.view()),
            )
            .unwrap();
            let mut o: Vec<f64> = want.output.iter().copied().collect();
            s.plan.v.as_ref().unwrap().rotate_rows(&mut o, true).unwrap();
            let got: Vec<f64> = out[r0 * h_q * D..r1 * h_q * D].iter().map(|&x| f64::from(x)).collect();
            assert_matches(&got, &o, Op::Attention, Precision::F32, &format!("sequence {b} output"));
            for (i, (&g, &w)) in lse[r0 * h_q..r1 * h_q].iter().zip(want.lse.iter()).enumerate() {
                let g = f64::from(g);
                prop_assert!(
                    g == w || (g.is_nan() && w.is_nan()) || (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "sequence {} lse {}: got {} want {}", b, i, g, w
                );
            }
        }
    }

    /// Both table forms name the same pages, and convert into each other.
    #[test]
    fn table_forms_agree(
        lens in prop::collection::vec(0usize..50, 0..6),
        page_tokens in 1usize..9,
        seed in any::<u64>(),
    ) {
        let layout = Layout::new(&lens, page_tokens, seed);
        let (indptr, indices, last) = layout.csr();
        let csr = PageTables::Csr { indptr: &indptr, indices: &indices, last_page_len: &last };
        let (table, max_blocks, seq_lens) = csr.to_block(layout.n_pages, page_tokens).unwrap();
        let block = PageTables::Block { table: &table, max_blocks, seq_lens: &seq_lens };
        prop_assert_eq!(
            block.check(layout.n_pages, page_tokens).unwrap(),
            csr.check(layout.n_pages, page_tokens).unwrap()
        );
        let back = block.to_csr(layout.n_pages, page_tokens).unwrap();
        prop_assert_eq!(back, (indptr.clone(), indices.clone(), last.clone()));
        for (b, s) in csr.check(layout.n_pages, page_tokens).unwrap().iter().enumerate() {
            prop_assert_eq!(s.len, lens[b]);
            prop_assert_eq!(s.pages, &layout.pages[b][..]);
        }
    }
}

/// One batch append writes each token's rows where its slot says, bytes equal to quantizing
/// that token alone, and leaves every other slot's bytes as they were: for block formats and
/// for row formats (whose padding rows of NaN must not reach any slot either).
#[test]
fn batch_append_writes_each_slot_alone() {
    for (kf, vf) in [
        (KvFormat::Q4_0, KvFormat::Q8_0),
        (KvFormat::Tq3, KvFormat::Tq4Qjl),
    ] {
        let layout = Layout::new(&[5, 1, 9], 4, 3);
        let mut pool = KvPool::new(spec(kf, vf, layout.n_pages, 4)).unwrap();
        let before = (pool.k().to_vec(), pool.v().to_vec());
        let rows = fill(&mut pool, &layout, 9);
        let (tk, tv) = (
            HKV * kf.row_bytes(D).unwrap(),
            HKV * vf.row_bytes(D).unwrap(),
        );
        let mut written = vec![false; layout.n_pages * 4];
        for (b, (k, v)) in rows.iter().enumerate() {
            for t in 0..layout.lens[b] {
                let slot = layout.slot(b, t) as usize;
                written[slot] = true;
                let mut alone = KvPool::new(spec(kf, vf, 1, 1)).unwrap();
                let span = t * HKV * D..(t + 1) * HKV * D;
                alone
                    .append(&k[span.clone()], &v[span], &[0], &[7])
                    .unwrap();
                let what = format!("{kf}/{vf} sequence {b} token {t}");
                assert_eq!(&pool.k()[slot * tk..(slot + 1) * tk], alone.k(), "{what}");
                assert_eq!(&pool.v()[slot * tv..(slot + 1) * tv], alone.v(), "{what}");
                assert_eq!(pool.position(slot), Some(t as u64));
            }
        }
        for (slot, w) in written.iter().enumerate() {
            if !w {
                assert_eq!(
                    &pool.k()[slot * tk..(slot + 1) * tk],
                    &before.0[slot * tk..(slot + 1) * tk]
                );
                assert_eq!(
                    &pool.v()[slot * tv..(slot + 1) * tv],
                    &before.1[slot * tv..(slot + 1) * tv]
                );
                assert_eq!(pool.position(slot), None);
            }
        }
    }
}

/// Every malformed slot mapping, table, row offset, mask or buffer is a typed error before any
/// work: the pool's bytes and the caller's output stay as they were.
#[test]
fn bad_batches_are_typed_errors_that_change_nothing() {
    let layout = Layout::new(&[6, 2], 4, 1);
    let mut pool = KvPool::new(spec(KvFormat::Q8_0, KvFormat::Q8_0, layout.n_pages, 4)).unwrap();
    fill(&mut pool, &layout, 5);
    let (k0, v0) = (pool.k().to_vec(), pool.v().to_vec());
    let row = random(HKV * D, 1);
    let two: Vec<f32> = row.iter().chain(&row).copied().collect();
    let slots = layout.n_pages as i64 * 4;
    for (k, slots_, pos) in [
        (&two[..], &[0i64, slots][..], &[0u64, 1][..]), // outside the pool
        (&two[..], &[3, 3][..], &[0, 1][..]),           // a slot twice
        (&two[..], &[-2, 3][..], &[0, 1][..]),          // below -1
        (&row[..], &[1, 2][..], &[0, 1][..]),           // rows for one token
        (&two[..], &[1, 2][..], &[0][..]),              // one position
    ] {
        assert!(pool.append(k, k, slots_, pos).is_err(), "{slots_:?}");
        assert_eq!((pool.k(), pool.v()), (&k0[..], &v0[..]));
    }

    let (indptr, indices, last) = layout.csr();
    let good = PageTables::Csr {
        indptr: &indptr,
        indices: &indices,
        last_page_len: &last,
    };
    let loc = [0u32, 2, 3];
    let bad_tables = [
        PageTables::Csr {
            indptr: &[0, 2, 1],
            indices: &indices,
            last_page_len: &last,
        },
        PageTables::Csr {
            indptr: &indptr,
            indices: &indices,
            last_page_len: &[2, 0],
        },
        PageTables::Csr {
            indptr: &indptr,
            indices: &indices,
            last_page_len: &[2],
        },
        PageTables::Block {
            table: &[0, 0, 1, -1],
            max_blocks: 2,
            seq_lens: &[6, 2],
        },
        PageTables::Block {
            table: &[0, 99, 1, -1],
            max_blocks: 2,
            seq_lens: &[6, 2],
        },
        PageTables::Block {
            table: &[0, 2, 1, -1],
            max_blocks: 2,
            seq_lens: &[9, 2],
        },
        PageTables::Block {
            table: &[0, -1, 1, -1],
            max_blocks: 2,
            seq_lens: &[6, 2],
        },
        PageTables::Block {
            table: &[0, 2, 1],
            max_blocks: 2,
            seq_lens: &[6, 2],
        },
    ];
    for t in bad_tables {
        assert!(pool.plan(&Batch::new(&loc, t, 4)).is_err(), "{t:?}");
    }
    let mask = [0f32; 3 * 6];
    for batch in [
        Batch::new(&[0, 2], good, 4),    // one offset short
        Batch::new(&[1, 2, 3], good, 4), // not from 0
        Batch::new(&[0, 3, 2], good, 4), // decreasing
        Batch::new(&[0, 2, 5], good, 4), // 3 rows, 2 tokens
        Batch::new(&loc, good, 3),       // not a multiple of the KV heads
        Batch {
            mask: Some(Mask {
                values: &mask,
                row_stride: 5,
            }),
            ..Batch::new(&loc, good, 4)
        },
        Batch {
            mask: Some(Mask {
                values: &mask[1..],
                row_stride: 6,
            }),
            ..Batch::new(&loc, good, 4)
        },
        Batch {
            q_positions: Some(&[0]),
            ..Batch::new(&loc, good, 4)
        },
    ] {
        assert!(pool.plan(&batch).is_err(), "{batch:?}");
    }

    let batch = Batch::new(&loc, good, 4);
    let plan = pool.plan(&batch).unwrap();
    let q = random(3 * 4 * D, 2);
    let mut ws = vec![0f32; plan.workspace_len()];
    let mut out = vec![7f32; plan.out_len()];
    let mut lse = vec![7f32; plan.lse_len()];
    assert!(pool
        .run(&plan, &batch, &q[1..], &mut ws, &mut out, None)
        .is_err());
    assert!(pool
        .run(&plan, &batch, &q, &mut ws[1..], &mut out, None)
        .is_err());
    let n = out.len();
    assert!(pool
        .run(&plan, &batch, &q, &mut ws, &mut out[..n - 1], None)
        .is_err());
    assert!(pool
        .run(&plan, &batch, &q, &mut ws, &mut out, Some(&mut lse[1..]))
        .is_err());
    let other = Batch::new(&[0, 1, 3], good, 4);
    assert!(pool
        .run(&plan, &other, &q, &mut ws, &mut out, None)
        .is_err());
    let mut windowed = batch.clone();
    windowed.params.window = Some(2);
    assert!(pool
        .run(&plan, &windowed, &q, &mut ws, &mut out, None)
        .is_err());
    assert!(out.iter().all(|&x| x == 7.0) && lse.iter().all(|&x| x == 7.0));
    pool.run(&plan, &batch, &q, &mut ws, &mut out, Some(&mut lse))
        .unwrap();
    assert!(out.iter().all(|x| x.is_finite()) && lse.iter().all(|x| x.is_finite()));
}

/// A shift turns the keys of the named slots by RoPE inside their rotation (they equal the
/// shifted keys to a q8_0 error), moves their positions and touches no other slot; a copy moves
/// bytes and positions; bad calls change nothing.
#[test]
fn shift_and_copy_act_on_their_slots_only() {
    use rotq::reference::rope::{Rope, RopeVariant};
    let rope = Rope::new(RopeVariant::Normal, D);
    let mut pool = KvPool::new(spec(KvFormat::Q8_0, KvFormat::Q8_0, 2, 8)).unwrap();
    let k = random(6 * HKV * D, 4);
    let slots = [9i64, 10, 11, 2, 3, 4];
    pool.append(&k, &k, &slots, &[20, 21, 22, 5, 6, 7]).unwrap();
    let before = pool.k().to_vec();
    let tb = HKV * KvFormat::Q8_0.row_bytes(D).unwrap();
    // Bad calls first: nothing changes.
    assert!(pool.shift(&[9, 9], -1, &rope).is_err()); // twice
    assert!(pool.shift(&[9, 0], -1, &rope).is_err()); // slot 0 never written
    assert!(pool.shift(&[2], -6, &rope).is_err()); // position -1
    assert!(pool.shift(&[99], 1, &rope).is_err()); // outside
    assert!(pool.copy_slots(&[9, 10], &[1, 1]).is_err());
    assert!(pool.copy_slots(&[9], &[16]).is_err());
    assert!(pool.copy_slots(&[9], &[]).is_err());
    assert_eq!(pool.k(), &before[..]);

    pool.shift(&[9, 10, 11], -5, &rope).unwrap();
    assert_eq!(
        (pool.position(9), pool.position(11), pool.position(2)),
        (Some(15), Some(17), Some(5))
    );
    let decode = |bytes: &[u8]| -> Vec<f64> {
        let mut row: Vec<f64> = KvFormat::Q8_0
            .dequantize_rows(bytes, D)
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        pool.spec()
            .plan
            .qk
            .as_ref()
            .unwrap()
            .rotate_rows(&mut row, true)
            .unwrap();
        row
    };
    for (i, &s) in slots.iter().enumerate() {
        let s = s as usize;
        let got = decode(&pool.k()[s * tb..(s + 1) * tb]);
        let mut want: Vec<f64> = k[i * HKV * D..(i + 1) * HKV * D]
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        if i < 3 {
            rope.shift_rows_of(&mut want, D, -5).unwrap();
        } else {
            assert_eq!(
                &pool.k()[s * tb..(s + 1) * tb],
                &before[s * tb..(s + 1) * tb]
            );
        }
        let err = rotq::reference::metrics::rel_l2(&got, &want);
        assert!(err < 0.02, "slot {s}: {err}");
    }
    let shifted = pool.k()[9 * tb..10 * tb].to_vec();
    pool.copy_slots(&[9, 2], &[2, 9]).unwrap(); // a swap: sources read before writing
    assert_eq!(&pool.k()[2 * tb..3 * tb], &shifted[..]);
    assert_eq!(&pool.k()[9 * tb..10 * tb], &before[2 * tb..3 * tb]);
    assert_eq!((pool.position(2), pool.position(9)), (Some(15), Some(5)));
}

/// An append larger than the pool's staging buffer (4 MiB) goes through the codec in several
/// calls and still lands every token, in a shuffled slot order, exactly (f32 rows, no
/// rotation: the bytes are the values).
#[test]
fn appends_larger_than_the_staging_buffer_land_whole() {
    let n: usize = 9000; // 9000 tokens x 1 KiB of K and V: three staging calls
    let spec = PoolSpec {
        k_format: KvFormat::F32,
        v_format: KvFormat::F32,
        plan: RotationPlan::none(),
        n_kv_heads: HKV,
        head_dim: D,
        v_dim: D,
        n_pages: n.div_ceil(16) + 1,
        page_tokens: 16,
        query: rotq::QueryMode::Auto,
    };
    let mut pool = KvPool::new(spec).unwrap();
    let k = random(n * HKV * D, 21);
    let v = random(n * HKV * D, 22);
    // Token t goes to slot (t * 7919) mod slots: a permutation (7919 is prime to the count).
    let slots_in_pool = pool.spec().slots().unwrap() as i64;
    assert_ne!(slots_in_pool % 7919, 0);
    let slots: Vec<i64> = (0..n as i64).map(|t| t * 7919 % slots_in_pool).collect();
    let positions: Vec<u64> = (0..n as u64).collect();
    pool.append(&k, &v, &slots, &positions).unwrap();
    let row = HKV * D;
    for (t, &s) in slots.iter().enumerate() {
        let s = s as usize;
        let got = |bytes: &[u8]| -> Vec<f32> {
            bytes[s * row * 4..(s + 1) * row * 4]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        };
        assert_eq!(got(pool.k()), &k[t * row..(t + 1) * row], "K of token {t}");
        assert_eq!(got(pool.v()), &v[t * row..(t + 1) * row], "V of token {t}");
        assert_eq!(pool.position(s), Some(t as u64));
    }
}

/// q8_0 queries need heads of a multiple of 32 values: refused when the pool is made, not at
/// `run`; `Auto` takes such heads with f32 queries.
#[test]
fn q8_0_queries_on_heads_not_a_multiple_of_32_are_refused_up_front() {
    let spec = |query| PoolSpec {
        k_format: KvFormat::F16,
        v_format: KvFormat::F16,
        plan: RotationPlan::none(),
        n_kv_heads: 1,
        head_dim: 80,
        v_dim: 80,
        n_pages: 2,
        page_tokens: 4,
        query,
    };
    let err = KvPool::new(spec(rotq::QueryMode::Q8_0)).unwrap_err();
    assert!(err.to_string().contains("multiple of 32"), "{err}");
    assert!(KvPool::new(spec(rotq::QueryMode::Auto)).is_ok());
    assert!(KvPool::new(spec(rotq::QueryMode::Exact)).is_ok());
}
