//! `rotq::cache::RotatedKvCache` against the oracle: appends land as one quantization of all
//! rows would, attention equals the oracle on the same bytes, removal and context shift act on
//! the right tokens, and bad calls are typed errors that change nothing.

use ndarray::Array3;
use rotq::cache::{CacheSpec, RotatedKvCache};
use rotq::reference::attention::attention_f64;
use rotq::reference::rope::{shift_cache, Rope, RopeVariant};
use rotq::reference::rotation::SplitMix64;
use rotq::reference::tolerance::{tolerance, Op, Precision};
use rotq::{AttentionParams, KvFormat, Rotation, RotationPlan};

const H: usize = 2;
const D: usize = 64;

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut g = SplitMix64::new(seed);
    (0..len)
        .map(|i| {
            let v = (g.next_f64() * 2.0 - 1.0) as f32;
            if i % 31 == 7 {
                v * 20.0
            } else {
                v
            }
        })
        .collect()
}

fn spec(k_format: KvFormat, v_format: KvFormat, capacity: usize) -> CacheSpec {
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
    }
}

/// The oracle on the cache's own bytes: Q rotated in f64, K and V dequantized, the output
/// rotated back.
fn oracle(
    cache: &RotatedKvCache,
    q: &[f32],
    n_q: usize,
    h_q: usize,
    p: &AttentionParams,
) -> Vec<f64> {
    let s = cache.spec();
    let (kb, vb) = cache.bytes();
    let n = cache.len();
    let decode = |f: KvFormat, b: &[u8]| {
        let vals: Vec<f64> = if b.is_empty() {
            Vec::new()
        } else {
            f.dequantize_row(b)
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect()
        };
        Array3::from_shape_vec((n, H, D), vals).unwrap()
    };
    let mut qr: Vec<f64> = q.iter().map(|&v| f64::from(v)).collect();
    s.plan
        .qk
        .as_ref()
        .unwrap()
        .rotate_rows(&mut qr, false)
        .unwrap();
    let qa = Array3::from_shape_vec((n_q, h_q, D), qr).unwrap();
    let out = attention_f64(
        qa.view(),
        decode(s.k_format, kb).view(),
        decode(s.v_format, vb).view(),
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

/// Appending a prompt in three chunks writes the bytes one quantization of all its rows would,
/// and prefill and decode attention over the cache follow the oracle (GQA, causal).
#[test]
fn appends_and_attention_follow_the_oracle() {
    for (kf, vf) in [
        (KvFormat::Q4_0, KvFormat::Q8_0),
        (KvFormat::Iq4Nl, KvFormat::Q5_1),
    ] {
        let n = 37;
        let (k, v) = (random(n * H * D, 1), random(n * H * D, 2));
        let mut cache = RotatedKvCache::new(spec(kf, vf, 64)).unwrap();
        for r in [0..5, 5..25, 25..37] {
            cache
                .append(
                    &k[r.start * H * D..r.end * H * D],
                    &v[r.start * H * D..r.end * H * D],
                )
                .unwrap();
        }
        assert_eq!(cache.len(), n);
        let mut whole = RotatedKvCache::new(spec(kf, vf, 64)).unwrap();
        whole.append(&k, &v).unwrap();
        assert_eq!(cache.bytes(), whole.bytes());

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
                &format!("{kf}/{vf} n_q {n_q}"),
            );
        }
    }
}

/// Removing tokens leaves exactly the bytes of a cache that never held them, and attention
/// over it follows the oracle.
#[test]
fn removal_drops_exactly_those_tokens() {
    let n = 30;
    let (k, v) = (random(n * H * D, 11), random(n * H * D, 12));
    let mut cache = RotatedKvCache::new(spec(KvFormat::Q8_0, KvFormat::Q4_0, 40)).unwrap();
    cache.append(&k, &v).unwrap();
    cache.remove(4..13).unwrap();
    let mut kept = RotatedKvCache::new(spec(KvFormat::Q8_0, KvFormat::Q4_0, 40)).unwrap();
    let (a, b) = (4 * H * D, 13 * H * D);
    let (k2, v2) = ([&k[..a], &k[b..]].concat(), [&v[..a], &v[b..]].concat());
    kept.append(&k2, &v2).unwrap();
    assert_eq!(cache.len(), 21);
    assert_eq!(cache.bytes(), kept.bytes());
    let q = random(2 * H * D, 13);
    let p = AttentionParams::default();
    let got = cache.attention(&q, 1, 2 * H, &p).unwrap();
    assert_close(&got, &oracle(&cache, &q, 1, 2 * H, &p), "after removal");
}

/// A context shift of a range moves only those tokens' keys, as the oracle's `shift_cache`
/// would within the kernel's f32 rotations (each shifted row within one quantization step of
/// the oracle's), and leaves V and the other tokens' bytes alone.
#[test]
fn a_shift_moves_the_range_and_nothing_else() {
    let n = 20;
    let (k, v) = (random(n * H * D, 21), random(n * H * D, 22));
    let mut cache = RotatedKvCache::new(spec(KvFormat::F16, KvFormat::Q8_0, 32)).unwrap();
    cache.append(&k, &v).unwrap();
    let (k0, v0) = (cache.bytes().0.to_vec(), cache.bytes().1.to_vec());
    let rope = Rope::new(RopeVariant::Neox, D);
    cache.shift(5..12, -5, &rope).unwrap();
    let (k1, v1) = cache.bytes();
    let rb = KvFormat::F16.row_bytes(D).unwrap() * H;
    assert_eq!(v1, &v0[..]);
    assert_eq!(&k1[..5 * rb], &k0[..5 * rb]);
    assert_eq!(&k1[12 * rb..], &k0[12 * rb..]);
    assert_ne!(&k1[5 * rb..12 * rb], &k0[5 * rb..12 * rb]);
    let mut want = k0[5 * rb..12 * rb].to_vec();
    let r = Rotation::hadamard(D).unwrap();
    shift_cache(KvFormat::F16, &mut want, D, Some(&r), &rope, -5).unwrap();
    let got = KvFormat::F16.dequantize_row(&k1[5 * rb..12 * rb]).unwrap();
    let want = KvFormat::F16.dequantize_row(&want).unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 2e-3 * (1.0 + w.abs()), "{g} vs {w}");
    }
}

/// Bad calls are typed errors and change nothing: shapes that disagree, a full cache, ranges
/// outside the tokens held, a plan for another head size.
#[test]
fn bad_calls_are_errors_and_change_nothing() {
    let mut cache = RotatedKvCache::new(spec(KvFormat::Q4_0, KvFormat::Q4_0, 10)).unwrap();
    let (k, v) = (random(8 * H * D, 31), random(8 * H * D, 32));
    cache.append(&k, &v).unwrap();
    let before = (cache.bytes().0.to_vec(), cache.bytes().1.to_vec());
    assert!(cache.append(&k[..H * D * 3], &v[..H * D * 3]).is_err()); // 8 + 3 > 10
    assert!(cache.append(&k[..H * D + 1], &v[..H * D]).is_err());
    assert!(cache.append(&k[..H * D], &v[..H * D - 1]).is_err());
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
    assert_eq!(cache.len(), 8);
    assert_eq!((cache.bytes().0.to_vec(), cache.bytes().1.to_vec()), before);
    assert!(cache
        .attention(&random(3 * D, 33), 1, 3, &AttentionParams::default())
        .is_err());
    let wrong = CacheSpec {
        plan: RotationPlan {
            qk: Some(Rotation::hadamard(128).unwrap()),
            v: None,
        },
        ..spec(KvFormat::Q4_0, KvFormat::Q4_0, 10)
    };
    assert!(RotatedKvCache::new(wrong).is_err());
    // More bytes than any machine has: refused, not an abort.
    assert!(RotatedKvCache::new(CacheSpec {
        capacity: 1 << 50,
        ..spec(KvFormat::Q4_0, KvFormat::Q4_0, 1)
    })
    .is_err());
    assert!(RotatedKvCache::new(CacheSpec {
        capacity: usize::MAX,
        ..spec(KvFormat::Q4_0, KvFormat::Q4_0, 1)
    })
    .is_err());
}
