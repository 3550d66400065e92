//! `rotq::cache::RotatedKvCache` against the oracle: appends land as one quantization of all
//! rows would, attention equals the oracle on the same bytes, removal and context shift act on
//! the right tokens, and bad calls are typed errors that change nothing; each for a contiguous
//! cache and a paged one (pages of 16 tokens, which divide none of the lengths). A paged and a
//! contiguous cache fed the same calls hold the same tokens and give the same outputs, whole
//! pages removed are taken again, and the recorded positions follow every call.

mod common;

use common::{random, LAYOUTS};
use ndarray::Array3;
use proptest::prelude::*;
use rotq::cache::{CacheSpec, Paging, RotatedKvCache};
use rotq::reference::attention::attention_f64;
use rotq::reference::rope::{shift_cache, Rope, RopeVariant};
use rotq::reference::tolerance::{tolerance, Op, Precision};
use rotq::{AttentionParams, Error, KvFormat, Rotation, RotationPlan};
use rotq_testkit::threads::at_once;

const H: usize = 2;
const D: usize = 64;

fn spec(k_format: KvFormat, v_format: KvFormat, capacity: usize, paging: Paging) -> CacheSpec {
    CacheSpec {
        k_format,
        v_format,
        plan: RotationPlan {
            qk: Some(Rotation::hadamard(D).unwrap()),
            v: Some(Rotation::block_hadamard(D, 32).unwrap()),
        },
        n_heads: H,
        head_dim: D,
        v_dim: D,
        capacity,
        paging,
        query: rotq::QueryMode::Auto,
    }
}

/// The oracle on the cache's own bytes: Q rotated in f64 (or as the cache's query mode takes
/// it), K and V dequantized, the output rotated back.
fn oracle(
    cache: &RotatedKvCache,
    q: &[f32],
    n_q: usize,
    h_q: usize,
    p: &AttentionParams,
) -> Vec<f64> {
    let s = cache.spec();
    let (kb, vb) = cache.bytes().unwrap();
    let n = cache.len();
    let decode = |f: KvFormat, b: &[u8]| {
        let vals: Vec<f64> = f
            .dequantize_rows(b, D)
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        Array3::from_shape_vec((n, H, D), vals).unwrap()
    };
    let mode = cache.query_mode();
    let qr = rotq_testkit::oracle::oracle_queries(q, s.plan.qk.as_ref(), mode);
    let qa = Array3::from_shape_vec((n_q, h_q, D), qr).unwrap();
    let out = attention_f64(
        qa.view(),
        decode(s.k_format, &kb).view(),
        decode(s.v_format, &vb).view(),
        p,
    )
    .unwrap();
    let mut o: Vec<f64> = out.output.iter().copied().collect();
    s.plan
        .v
        .as_ref()
        .unwrap()
        .rotate_rows(&mut o, true)
        .unwrap();
    o
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    let got: Vec<f64> = got.iter().map(|&v| f64::from(v)).collect();
    if let Err(m) = tolerance(Op::Attention, Precision::F32).check(&got, want) {
        panic!("{what}: {m}");
    }
}

fn owned(c: &RotatedKvCache) -> (Vec<u8>, Vec<u8>) {
    let (k, v) = c.bytes().unwrap();
    (k.into_owned(), v.into_owned())
}

/// `n` tokens' rows of K or V.
fn rows(n: usize, seed: u64) -> Vec<f32> {
    random(n * H * D, seed)
}

/// Appending a prompt in three chunks writes the bytes one quantization of all its rows would,
/// and prefill and decode attention over the cache follow the oracle (GQA, causal).
#[test]
fn appends_and_attention_follow_the_oracle() {
    for paging in LAYOUTS {
        for (kf, vf) in [
            (KvFormat::Q4_0, KvFormat::Q8_0),
            (KvFormat::Iq4Nl, KvFormat::Q5_1),
            (KvFormat::Tq4, KvFormat::Tq3Qjl),
        ] {
            let n = 37;
            let (k, v) = (rows(n, 1), rows(n, 2));
            let mut cache = RotatedKvCache::new(spec(kf, vf, 64, paging)).unwrap();
            for r in [0..5, 5..25, 25..37] {
                cache
                    .append(
                        &k[r.start * H * D..r.end * H * D],
                        &v[r.start * H * D..r.end * H * D],
                    )
                    .unwrap();
            }
            assert_eq!(cache.len(), n);
            let mut whole = RotatedKvCache::new(spec(kf, vf, 64, Paging::Contiguous)).unwrap();
            whole.append(&k, &v).unwrap();
            assert_eq!(owned(&cache), owned(&whole), "{paging:?}");

            let h_q = 4 * H;
            for (n_q, pos_offset) in [(6usize, 31usize), (1, 36)] {
                let q = random(n_q * h_q * D, 3 + n_q as u64);
                let p = AttentionParams {
                    causal: true,
                    pos_offset,
                    ..Default::default()
                };
                let got = cache.attention(&q, n_q, h_q, &p).unwrap();
                assert_close(
                    &got,
                    &oracle(&cache, &q, n_q, h_q, &p),
                    &format!("{paging:?} {kf}/{vf} n_q {n_q}"),
                );
            }
        }
    }
}

/// Removing tokens leaves exactly the bytes of a cache that never held them, and attention
/// over it follows the oracle: cuts of a few tokens, and of whole pages' worth from a page
/// boundary or from inside a page.
#[test]
fn removal_drops_exactly_those_tokens() {
    let n = 70;
    let (k, v) = (rows(n, 11), rows(n, 12));
    for paging in LAYOUTS {
        for cut in [4..13, 16..48, 3..19, 50..70, 0..70] {
            let what = format!("{paging:?} cut {cut:?}");
            let mut cache =
                RotatedKvCache::new(spec(KvFormat::Q8_0, KvFormat::Q4_0, 80, paging)).unwrap();
            cache.append(&k, &v).unwrap();
            cache.remove(cut.clone()).unwrap();
            let mut kept =
                RotatedKvCache::new(spec(KvFormat::Q8_0, KvFormat::Q4_0, 80, paging)).unwrap();
            let (a, b) = (cut.start * H * D, cut.end * H * D);
            let (k2, v2) = ([&k[..a], &k[b..]].concat(), [&v[..a], &v[b..]].concat());
            kept.append(&k2, &v2).unwrap();
            assert_eq!(cache.len(), n - cut.len(), "{what}");
            assert_eq!(owned(&cache), owned(&kept), "{what}");
            let q = random(2 * H * D, 13);
            let p = AttentionParams::default();
            let got = cache.attention(&q, 1, 2 * H, &p).unwrap();
            assert_close(&got, &oracle(&cache, &q, 1, 2 * H, &p), &what);
        }
    }
}

/// A context shift of a range (across a page boundary) moves only those tokens' keys, as the
/// oracle's `shift_cache` would within the kernel's f32 rotations (each shifted row within one
/// quantization step of the oracle's), and leaves V and the other tokens' bytes alone.
#[test]
fn a_shift_moves_the_range_and_nothing_else() {
    let n = 30;
    let (k, v) = (rows(n, 21), rows(n, 22));
    let (a, b) = (5, 20);
    for paging in LAYOUTS {
        let mut cache =
            RotatedKvCache::new(spec(KvFormat::F16, KvFormat::Q8_0, 32, paging)).unwrap();
        cache.append(&k, &v).unwrap();
        let (k0, v0) = owned(&cache);
        let rope = Rope::new(RopeVariant::Neox, D);
        cache.shift(a..b, -5, &rope).unwrap();
        let (k1, v1) = owned(&cache);
        let rb = KvFormat::F16.row_bytes(D).unwrap() * H;
        assert_eq!(v1, v0);
        assert_eq!(&k1[..a * rb], &k0[..a * rb]);
        assert_eq!(&k1[b * rb..], &k0[b * rb..]);
        assert_ne!(&k1[a * rb..b * rb], &k0[a * rb..b * rb]);
        let mut want = k0[a * rb..b * rb].to_vec();
        let r = Rotation::hadamard(D).unwrap();
        shift_cache(KvFormat::F16, &mut want, D, Some(&r), &rope, -5).unwrap();
        let got = KvFormat::F16
            .dequantize_rows(&k1[a * rb..b * rb], D)
            .unwrap();
        let want = KvFormat::F16.dequantize_rows(&want, D).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 2e-3 * (1.0 + w.abs()),
                "{paging:?}: {g} vs {w}"
            );
        }
        let moved: Vec<usize> = (0..n)
            .map(|t| if (a..b).contains(&t) { t - 5 } else { t })
            .collect();
        assert_eq!(cache.positions(), moved);
    }
}

/// A paged cache (pages of 16) and a contiguous one fed the same appends, removals (of a few
/// tokens, of a whole page, of a page's worth from inside a page) and shifts hold the same
/// tokens (byte for byte, token by token), record the same positions, and give the same
/// attention outputs, bit for bit, which follow the oracle.
#[test]
fn paged_and_contiguous_caches_agree() {
    let rope = Rope::new(RopeVariant::Neox, D);
    let mut caches =
        LAYOUTS.map(|p| RotatedKvCache::new(spec(KvFormat::Q4_0, KvFormat::Q8_0, 100, p)).unwrap());
    let mut seed = 100;
    let mut step =
        |what: &str, caches: &mut [RotatedKvCache; 2], act: &dyn Fn(&mut RotatedKvCache)| {
            for c in caches.iter_mut() {
                act(c);
            }
            let [contiguous, paged] = &*caches;
            assert_eq!(owned(paged), owned(contiguous), "{what}: bytes");
            assert_eq!(
                paged.positions(),
                contiguous.positions(),
                "{what}: positions"
            );
            seed += 1;
            let last = contiguous.positions().last().copied().unwrap_or(0);
            for n_q in [1usize, 5] {
                let q = random(n_q * 2 * H * D, seed + n_q as u64);
                let p = AttentionParams {
                    causal: true,
                    pos_offset: (last + 1).saturating_sub(n_q),
                    ..Default::default()
                };
                let want = contiguous.attention(&q, n_q, 2 * H, &p).unwrap();
                assert_eq!(
                    paged.attention(&q, n_q, 2 * H, &p).unwrap(),
                    want,
                    "{what}: attention"
                );
                let mut as_index = p.clone();
                as_index.pos_offset -= contiguous.positions().first().copied().unwrap_or(0);
                assert_close(&want, &oracle(contiguous, &q, n_q, 2 * H, &as_index), what);
            }
        };
    let append = |n: usize, s: u64| {
        move |c: &mut RotatedKvCache| c.append(&rows(n, s), &rows(n, s + 1)).unwrap()
    };
    step("a prompt of 37", &mut caches, &append(37, 1));
    step("9 more", &mut caches, &append(9, 3));
    step("a decode step", &mut caches, &append(1, 5));
    step("4 removed from the front", &mut caches, &|c| {
        c.remove(0..4).unwrap()
    });
    step("the rest shifted down", &mut caches, &|c| {
        let len = c.len();
        c.shift(0..len, -4, &rope).unwrap()
    });
    step("a whole page dropped", &mut caches, &|c| {
        c.remove(16..32).unwrap();
        let len = c.len();
        c.shift(16..len, -16, &rope).unwrap()
    });
    step(
        "a page's worth dropped from inside a page",
        &mut caches,
        &|c| {
            c.remove(5..21).unwrap();
            let len = c.len();
            c.shift(5..len, -16, &rope).unwrap()
        },
    );
    step("a prefill chunk of 50", &mut caches, &append(50, 7));
    step("the newest 20 dropped", &mut caches, &|c| {
        let len = c.len();
        c.remove(len - 20..len).unwrap()
    });
    step("everything dropped", &mut caches, &|c| {
        let len = c.len();
        c.remove(0..len).unwrap()
    });
    step("a new prompt", &mut caches, &append(40, 9));
}

/// Pages of a removed whole page's worth go back to the pool and later appends take them: a
/// cache of 4 pages holds 64 tokens again after a page is dropped from its middle.
#[test]
fn whole_pages_removed_are_taken_again() {
    let paging = Paging::Paged { page_tokens: 16 };
    let mut cache = RotatedKvCache::new(spec(KvFormat::Q8_0, KvFormat::Q8_0, 64, paging)).unwrap();
    assert_eq!(cache.capacity(), 64);
    let (k, v) = (rows(64, 41), rows(64, 42));
    cache.append(&k[..48 * H * D], &v[..48 * H * D]).unwrap();
    assert_eq!(cache.block_table(), Some(&[0u32, 1, 2][..]));
    let (k0, v0) = owned(&cache);
    cache.remove(16..32).unwrap();
    assert_eq!(cache.block_table(), Some(&[0u32, 2][..]));
    // No token moved: the pool still holds the bytes the tokens had.
    let (pk, _) = cache.pool().unwrap();
    let tb = KvFormat::Q8_0.row_bytes(D).unwrap() * H;
    assert_eq!(&pk[..48 * tb], &k0[..]);
    cache.append(&k[48 * H * D..], &v[48 * H * D..]).unwrap(); // page 1 again
    assert_eq!(cache.block_table(), Some(&[0u32, 2, 1][..]));
    assert_eq!(cache.len(), 48);
    cache.append(&k[..16 * H * D], &v[..16 * H * D]).unwrap(); // the last fresh page
    assert_eq!(cache.block_table(), Some(&[0u32, 2, 1, 3][..]));
    assert_eq!(cache.len(), 64);
    assert!(cache.append(&k[..H * D], &v[..H * D]).is_err()); // full
    let mut want = k0[..16 * tb].to_vec();
    want.extend_from_slice(&k0[32 * tb..]);
    let (k1, v1) = owned(&cache);
    assert_eq!(&k1[..32 * tb], &want[..]);
    assert_eq!(&v1[..16 * tb], &v0[..16 * tb]);
    // A contiguous cache's pool is its one buffer; it has no table.
    let flat =
        RotatedKvCache::new(spec(KvFormat::Q8_0, KvFormat::Q8_0, 37, Paging::Contiguous)).unwrap();
    assert_eq!((flat.block_table(), flat.capacity()), (None, 37));
    assert_eq!(flat.pool().unwrap().0.len(), 37 * tb);
}

/// Positions: `append_at` records the engine's, `shift` and `remove` keep them in step, and
/// attention reads `pos_offset` as a position, so a cache whose tokens sit at 100.. gives what
/// the same tokens at 0.. give with the query 100 positions earlier. A gap left by a removal
/// is refused by a causal mask until a shift closes it.
#[test]
fn positions_follow_the_calls_and_place_the_mask() {
    for paging in LAYOUTS {
        let s = spec(KvFormat::Q8_0, KvFormat::Q8_0, 64, paging);
        let (k, v) = (rows(30, 51), rows(30, 52));
        let mut at_0 = RotatedKvCache::new(s.clone()).unwrap();
        at_0.append(&k, &v).unwrap();
        let mut at_100 = RotatedKvCache::new(s).unwrap();
        let positions: Vec<usize> = (100..130).collect();
        at_100
            .append_at(&k[..10 * H * D], &v[..10 * H * D], &positions[..10])
            .unwrap();
        at_100
            .append_at(&k[10 * H * D..], &v[10 * H * D..], &positions[10..])
            .unwrap();
        assert_eq!(at_100.positions(), positions);
        assert_eq!(owned(&at_100), owned(&at_0));
        let q = random(4 * 2 * H * D, 53);
        for (n_q, p0, window) in [(4usize, 20usize, None), (1, 29, Some(7)), (4, 3, Some(2))] {
            let p = |base: usize| AttentionParams {
                causal: true,
                pos_offset: base + p0,
                window,
                ..Default::default()
            };
            let q = &q[..n_q * 2 * H * D];
            assert_eq!(
                at_100.attention(q, n_q, 2 * H, &p(100)).unwrap(),
                at_0.attention(q, n_q, 2 * H, &p(0)).unwrap(),
                "{paging:?} n_q {n_q} from {p0}"
            );
        }
        let decode = |c: &RotatedKvCache, pos: usize| {
            let p = AttentionParams {
                causal: true,
                pos_offset: pos,
                ..Default::default()
            };
            c.attention(&q[..2 * H * D], 1, 2 * H, &p)
        };
        // A query before the first token is refused.
        assert!(decode(&at_100, 99).is_err());
        // llama.cpp's context shift: keep 4, drop 6, move the rest down.
        at_100.remove(4..10).unwrap();
        let gap: Vec<usize> = (100..104).chain(110..130).collect();
        assert_eq!(at_100.positions(), gap);
        assert!(matches!(
            decode(&at_100, 129),
            Err(Error::Reference(rotq::reference::Error::InvalidParameter {
                name: "positions",
                ..
            }))
        ));
        // Without a mask the positions do not matter.
        let all = AttentionParams::default();
        at_100.attention(&q[..2 * H * D], 1, 2 * H, &all).unwrap();
        let rope = Rope::new(RopeVariant::Normal, D);
        at_100.shift(4..24, -6, &rope).unwrap();
        assert_eq!(at_100.positions(), (100..124).collect::<Vec<_>>());
        decode(&at_100, 123).unwrap();
        // Appends continue from the newest position; an empty cache starts anew.
        at_100.append(&k[..H * D], &v[..H * D]).unwrap();
        assert_eq!(at_100.positions().last(), Some(&124));
        let len = at_100.len();
        at_100.remove(0..len).unwrap();
        at_100
            .append_at(&k[..2 * H * D], &v[..2 * H * D], &[7, 8])
            .unwrap();
        at_100.remove(0..2).unwrap();
        at_100.append(&k[..H * D], &v[..H * D]).unwrap();
        assert_eq!(at_100.positions(), [0]);
    }
}

/// Bad calls are typed errors and change nothing: shapes that disagree, a full cache, ranges
/// outside the tokens held, a plan for another head size, positions that do not continue the
/// cache's or would fall below 0, pages of no tokens.
#[test]
fn bad_calls_are_errors_and_change_nothing() {
    for paging in LAYOUTS {
        let mut cache =
            RotatedKvCache::new(spec(KvFormat::Q4_0, KvFormat::Q4_0, 10, paging)).unwrap();
        let cap = cache.capacity();
        let (k, v) = (rows(cap, 31), rows(cap, 32));
        cache.append(&k[..8 * H * D], &v[..8 * H * D]).unwrap();
        let before = (
            owned(&cache),
            cache.positions().to_vec(),
            cache.block_table().map(<[u32]>::to_vec),
        );
        let state = |c: &RotatedKvCache| {
            (
                owned(c),
                c.positions().to_vec(),
                c.block_table().map(<[u32]>::to_vec),
            )
        };
        let over = (cap - 8 + 1) * H * D; // one token more than fits (10, or 16 when paged)
        assert!(cache.append(&k[..over], &v[..over]).is_err());
        assert!(cache.append(&k[..H * D + 1], &v[..H * D]).is_err());
        assert!(cache.append(&k[..H * D], &v[..H * D - 1]).is_err());
        let one = (&k[..H * D], &v[..H * D]);
        for positions in [&[9usize][..], &[7], &[8, 9], &[]] {
            assert!(
                cache.append_at(one.0, one.1, positions).is_err(),
                "{positions:?}"
            );
        }
        assert!(cache.remove(3..9).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 5..2;
        assert!(cache.remove(backwards.clone()).is_err());
        assert!(cache
            .shift(backwards, 1, &Rope::new(RopeVariant::Normal, D))
            .is_err());
        assert!(cache
            .shift(0..4, 1, &Rope::new(RopeVariant::Normal, D + 2))
            .is_err());
        assert!(cache
            .shift(2..4, -3, &Rope::new(RopeVariant::Normal, D))
            .is_err()); // position 2 would move to -1
        assert_eq!(cache.len(), 8);
        assert_eq!(state(&cache), before);
        assert!(cache
            .attention(&random(3 * D, 33), 1, 3, &AttentionParams::default())
            .is_err());
        let wrong = CacheSpec {
            plan: RotationPlan {
                qk: Some(Rotation::hadamard(128).unwrap()),
                v: None,
            },
            ..spec(KvFormat::Q4_0, KvFormat::Q4_0, 10, paging)
        };
        assert!(RotatedKvCache::new(wrong).is_err());
        // More bytes than any machine has: refused, not an abort.
        for capacity in [1 << 50, usize::MAX] {
            assert!(
                RotatedKvCache::new(spec(KvFormat::Q4_0, KvFormat::Q4_0, capacity, paging))
                    .is_err()
            );
        }
    }
    let no_pages = spec(
        KvFormat::Q4_0,
        KvFormat::Q4_0,
        10,
        Paging::Paged { page_tokens: 0 },
    );
    assert!(matches!(
        RotatedKvCache::new(no_pages),
        Err(Error::Reference(rotq::reference::Error::InvalidParameter {
            name: "page_tokens",
            ..
        }))
    ));
}

/// A head dimension of `units` times `format`'s granularity: whole blocks, or for a row format
/// a length it takes (`units` cycles through them: multiples of 8 up to 4096, 1024 with QJL,
/// powers of two for vLLM's keys).
fn dim_of(format: KvFormat, units: usize) -> usize {
    if !format.is_row() {
        return units * format.block_size();
    }
    let lengths: Vec<usize> = (8..=rotq::reference::turboquant::MAX_DIM)
        .step_by(8)
        .filter(|&d| format.check_row_len(d).is_ok())
        .collect();
    lengths[(units.max(1) - 1) % lengths.len()]
}

/// Huge `usize` values: powers of two (whose products wrap to exactly 0) and any value from 2²⁴.
fn huge() -> impl Strategy<Value = usize> {
    prop_oneof![
        (24u32..usize::BITS).prop_map(|k| 1usize << k),
        (1usize << 24)..=usize::MAX,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A spec whose sizes wrap `usize` in any product (a token's values or bytes, a page's
    /// bytes, the pages, the capacity's bytes; computed here in u128) is refused when the cache
    /// is made, with `Error::Overflow`; one whose products fit is a cache whose calls answer
    /// without a panic. Capacities are 0 or at least 2⁴⁰ tokens, so a spec that fits allocates
    /// nothing.
    #[test]
    fn sizes_that_overflow_are_refused_when_the_cache_is_made(
        n_heads in huge(),
        k_blocks in 1usize..=2048,
        v_blocks in 1usize..=2048,
        k_format in proptest::sample::select(KvFormat::ALL.to_vec()),
        v_format in proptest::sample::select(KvFormat::ALL.to_vec()),
        capacity in prop_oneof![Just(0usize), (1usize << 40)..=usize::MAX],
        page_tokens in prop_oneof![Just(0usize), 1usize..=usize::MAX],
    ) {
        let (head_dim, v_dim) = (dim_of(k_format, k_blocks), dim_of(v_format, v_blocks));
        let paging = match page_tokens {
            0 => Paging::Contiguous,
            page_tokens => Paging::Paged { page_tokens },
        };
        let wide = |x: usize| x as u128;
        // The pool's tokens, at least one page's.
        let slots = match paging {
            Paging::Contiguous => Some(wide(capacity.max(1))),
            Paging::Paged { page_tokens } => {
                let pages = capacity.div_ceil(page_tokens);
                (pages <= u32::MAX as usize).then(|| wide(pages.max(1)) * wide(page_tokens))
            }
        };
        let token_bytes = |format: KvFormat, dim: usize| {
            wide(n_heads) * wide(format.row_bytes(dim).unwrap())
        };
        let sizes = [
            wide(n_heads) * wide(head_dim),
            wide(n_heads) * wide(v_dim),
            token_bytes(k_format, head_dim),
            token_bytes(v_format, v_dim),
        ];
        let fits = slots.is_some_and(|slots| {
            let max = wide(usize::MAX);
            sizes.iter().all(|&s| s <= max)
                && slots * sizes[2] <= max
                && slots * sizes[3] <= max
        });
        let spec = CacheSpec {
            k_format,
            v_format,
            plan: RotationPlan::none(),
            n_heads,
            head_dim,
            v_dim,
            capacity,
            paging,
            query: rotq::QueryMode::Auto,
        };
        match RotatedKvCache::new(spec) {
            Err(Error::Reference(rotq::reference::Error::Overflow(_))) => prop_assert!(!fits),
            Err(e) => prop_assert!(false, "not an overflow error: {e}"),
            Ok(mut cache) => {
                prop_assert!(fits, "an overflowing spec was accepted");
                prop_assert!(cache.append(&[], &[]).is_ok());
                prop_assert!(cache.append(&[1.0], &[1.0]).is_err());
                let e = cache.attention(&[], 0, n_heads, &AttentionParams::default());
                prop_assert!(e.is_ok(), "{:?}", e.err());
            }
        }
    }
}

/// The sizes of a spec that wrap `usize` exactly to 0 (2⁵⁹ heads of 32 values) used to make
/// a cache whose `append` divided by zero: now the cache is refused.
#[test]
fn a_token_size_that_wraps_to_zero_is_refused() {
    let spec = CacheSpec {
        k_format: KvFormat::Q8_0,
        v_format: KvFormat::Q8_0,
        n_heads: 1 << 59,
        head_dim: 32,
        v_dim: 32,
        capacity: 0,
        ..Default::default()
    };
    let e = RotatedKvCache::new(spec).expect_err("refused");
    assert!(
        matches!(e, Error::Reference(rotq::reference::Error::Overflow(_))),
        "{e}"
    );
    assert!(e.to_string().contains("overflow"), "{e}");
}

/// A head dimension the CPU attention kernels cannot take (over `MAX_HEAD_DIM`, for K or V)
/// is refused when the cache is made, naming the sizes they take; the largest they take
/// makes a cache whose attention follows the oracle. On a CUDA backend (where there is one)
/// the CUDA kernels' limits apply: multiples of 32, at most 4096.
#[test]
fn head_dims_the_kernels_cannot_take_are_refused_when_the_cache_is_made() {
    use rotq::cache::Backend;
    use rotq_cpu::attention::MAX_HEAD_DIM;
    let spec = |head_dim: usize, v_dim: usize| CacheSpec {
        k_format: KvFormat::F32,
        v_format: KvFormat::F32,
        n_heads: 1,
        head_dim,
        v_dim,
        capacity: 3,
        ..Default::default()
    };
    let refused = |e: Error, n: usize, sizes: &str| {
        assert!(
            matches!(
                e,
                Error::Reference(rotq::reference::Error::UnsupportedDim { n: m, .. }) if m == n
            ),
            "{e}"
        );
        assert!(e.to_string().contains(sizes), "{e}");
    };
    for (head_dim, v_dim, bad) in [
        (100_000, 64, 100_000),
        (64, 100_000, 100_000),
        (MAX_HEAD_DIM + 1, 64, MAX_HEAD_DIM + 1),
    ] {
        refused(
            RotatedKvCache::new(spec(head_dim, v_dim)).expect_err("refused"),
            bad,
            "65536",
        );
    }
    // The largest K and V rows: three tokens, attention against the oracle on the f32 rows.
    let d = MAX_HEAD_DIM;
    let mut cache = RotatedKvCache::new(spec(d, d)).unwrap();
    let (k, v, q) = (random(3 * d, 41), random(3 * d, 42), random(2 * d, 43));
    cache.append(&k, &v).unwrap();
    let p = AttentionParams::default();
    let got = cache.attention(&q, 1, 2, &p).unwrap();
    let f64s = |x: &[f32], n: usize| {
        Array3::from_shape_vec(
            (n, x.len() / n / d, d),
            x.iter().map(|&v| f64::from(v)).collect(),
        )
        .unwrap()
    };
    let want = attention_f64(
        f64s(&q, 1).view(),
        f64s(&k, 3).view(),
        f64s(&v, 3).view(),
        &p,
    )
    .unwrap()
    .output;
    assert_close(&got, want.as_slice().unwrap(), "head_dim 65536");

    if cuda_here() {
        let backend = Backend::open("cuda:0").unwrap();
        for (head_dim, v_dim, bad) in [(48, 64, 48), (64, 4128, 4128), (8192, 8192, 8192)] {
            let spec = CacheSpec {
                k_format: KvFormat::F16,
                v_format: KvFormat::F16,
                ..spec(head_dim, v_dim)
            };
            refused(
                RotatedKvCache::on(spec, &backend).expect_err("refused"),
                bad,
                "multiples of 32",
            );
        }
        for (head_dim, v_dim) in [(96, 96), (4096, 4096)] {
            assert!(RotatedKvCache::on(spec(head_dim, v_dim), &backend).is_ok());
        }
    }
}

// A cache may move to another thread, and `&cache` be shared by threads that read it at once
// (attention, bytes, positions); changing it takes `&mut`.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<RotatedKvCache>();
};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    /// 8 threads, each with a cache of its own (both layouts, three pairs of formats), append
    /// their own fresh rows in chunks, run prefill and decode attention after each and remove
    /// a few tokens, all at once: every output follows the oracle on the cache's bytes, and the
    /// bytes and outputs equal those of the same calls made on one thread.
    #[test]
    fn caches_on_eight_threads_at_once_follow_the_oracle(seed in any::<u64>()) {
        let run = |t: u64| {
            let paging = LAYOUTS[t as usize % 2];
            let formats = [
                (KvFormat::Q4_0, KvFormat::Q8_0),
                (KvFormat::Iq4Nl, KvFormat::F16),
                (KvFormat::Tq4, KvFormat::Tq2Qjl),
            ];
            let (kf, vf) = formats[t as usize / 2 % 3];
            let mut cache = RotatedKvCache::new(spec(kf, vf, 48, paging)).unwrap();
            let seed = seed ^ (t + 1).wrapping_mul(0x9E37_79B9);
            let mut outputs = Vec::new();
            for (i, n) in [5usize, 17, 1, 9].into_iter().enumerate() {
                let s = seed.wrapping_add(10 * i as u64);
                cache.append(&rows(n, s), &rows(n, s + 1)).unwrap();
                let (n_q, h_q) = (3, 2 * H);
                let q = random(n_q * h_q * D, s + 2);
                let p = AttentionParams {
                    causal: true,
                    pos_offset: cache.len() - n_q,
                    ..Default::default()
                };
                let out = cache.attention(&q, n_q, h_q, &p).unwrap();
                outputs.push((out, oracle(&cache, &q, n_q, h_q, &p)));
            }
            cache.remove(2..6).unwrap();
            let q = random(2 * H * D, seed + 99);
            let p = AttentionParams::default();
            let out = cache.attention(&q, 1, 2 * H, &p).unwrap();
            outputs.push((out, oracle(&cache, &q, 1, 2 * H, &p)));
            (owned(&cache), outputs)
        };
        let together = at_once(8, run);
        for (t, got) in (0..8).zip(&together) {
            for (i, (out, want)) in got.1.iter().enumerate() {
                assert_close(out, want, &format!("thread {t}, call {i}"));
            }
            prop_assert!(got == &run(t), "thread {t}: differs from the calls made alone");
        }
    }

    /// One cache read by 8 threads at once through `&cache`: each runs its own queries (prefill
    /// and decode, causal or not, GQA) on fresh random rows, and every output follows the
    /// oracle and equals the same call made alone.
    #[test]
    fn attention_on_one_cache_from_eight_threads_follows_the_oracle(seed in any::<u64>()) {
        for paging in LAYOUTS {
            let n = 70;
            let spec = spec(KvFormat::Q4_0, KvFormat::Q8_0, n, paging);
            let mut cache = RotatedKvCache::new(spec).unwrap();
            cache.append(&rows(n, seed), &rows(n, seed ^ 1)).unwrap();
            let cache = &cache;
            let call = |t: u64| {
                let (n_q, h_q) = (1 + t as usize % 4, H << (t % 3));
                let q = random(n_q * h_q * D, seed.wrapping_add(t + 2));
                let p = AttentionParams {
                    causal: t.is_multiple_of(2),
                    pos_offset: n - n_q,
                    ..Default::default()
                };
                (q, n_q, h_q, p)
            };
            let run = |t: u64| {
                let (q, n_q, h_q, p) = call(t);
                cache.attention(&q, n_q, h_q, &p).unwrap()
            };
            let together = at_once(8, run);
            for (t, got) in (0..8).zip(&together) {
                let (q, n_q, h_q, p) = call(t);
                let what = format!("{paging:?} thread {t}");
                assert_close(got, &oracle(cache, &q, n_q, h_q, &p), &what);
                prop_assert!(got == &run(t), "{what}: differs from the call made alone");
            }
        }
    }
}

/// Whether a CUDA device can be used here: never in a build without the `cuda` feature.
fn cuda_here() -> bool {
    #[cfg(feature = "cuda")]
    return rotq::cuda::cuda_available();
    #[cfg(not(feature = "cuda"))]
    return false;
}
