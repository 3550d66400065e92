//! Context shift of rotated, quantized K caches: the oracle's `rope::shift_cache` against the
//! definition (shifting the rotated cache equals rotating the shifted keys, within the
//! quantization error), and the CPU kernel (`CacheCodec::shift`) against the oracle.

use proptest::prelude::*;
use rotq::reference::rope::{shift_cache, Rope, RopeVariant};
use rotq::{KvFormat, Rotation};
use rotq_cpu::{CacheCodec, Isa};
use rotq_testkit::data::Rows;
use rotq_testkit::rotations::RotationKind;

/// Keys with a few large outliers (what rotation is for): uniform in [-1, 1), every 29th value
/// 25 times larger.
const KEYS: Rows = Rows::uniform(1.0).every(29, 3, 25.0);

fn rotated(x: &[f64], r: Option<&Rotation>) -> Vec<f64> {
    let mut y = x.to_vec();
    if let Some(r) = r {
        r.rotate_rows(&mut y, false).unwrap();
    }
    y
}

/// The oracle's bytes of rows of `d` values.
fn quantized(format: KvFormat, x: &[f64], d: usize) -> Vec<u8> {
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    format.quantize_rows(&x32, d).unwrap()
}

fn dequantized(format: KvFormat, bytes: &[u8], d: usize) -> Vec<f64> {
    format
        .dequantize_rows(bytes, d)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

fn distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt()
}

/// Some block formats, then every row format.
fn formats() -> Vec<KvFormat> {
    let blocks = [
        KvFormat::Q8_0,
        KvFormat::Q4_0,
        KvFormat::Q5_1,
        KvFormat::Iq4Nl,
        KvFormat::Q6_0,
        KvFormat::F16,
    ];
    blocks.into_iter().chain(KvFormat::TURBOQUANT).collect()
}

fn rope_of(variant: bool, dims: usize, base: f64, scale: f64) -> Rope {
    Rope {
        variant: if variant {
            RopeVariant::Neox
        } else {
            RopeVariant::Normal
        },
        dims,
        freq_base: base,
        freq_scale: scale,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Shifting the rotated cache by δ equals quantizing the rotation of the keys shifted by
    /// δ, within the error of the quantizations involved (the original one, carried through
    /// the orthogonal maps, the re-quantization, and the reference's own): at most three
    /// quantization errors of the same data. Shifting the rotated values directly (without
    /// undoing the rotation) is off by the size of the keys themselves.
    #[test]
    fn shifting_the_rotated_cache_equals_rotating_the_shifted_keys(
        f in 0..formats().len(),
        d in prop::sample::select(vec![64usize, 128]),
        half in any::<bool>(),
        neox in any::<bool>(),
        big_base in any::<bool>(),
        scale in prop::sample::select(vec![1.0f64, 0.25]),
        kind in prop::sample::select(vec![RotationKind::None, RotationKind::Hadamard, RotationKind::Randomized]),
        delta in -5000i64..5000,
        seed in any::<u64>(),
    ) {
        let format = formats()[f];
        let rope = rope_of(neox, if half { d / 2 } else { d }, if big_base { 500_000.0 } else { 10_000.0 }, scale);
        let r = kind.build(d, seed);
        let n_rows = 6;
        let x = KEYS.f64s(n_rows * d, seed);
        let rx = rotated(&x, r.as_ref());
        let mut cache = quantized(format, &rx, d);
        let e_orig = distance(&dequantized(format, &cache, d), &rx);
        shift_cache(format, &mut cache, d, r.as_ref(), &rope, delta).unwrap();

        let mut sx = x.clone();
        rope.shift_rows_of(&mut sx, d, delta).unwrap();
        let rsx = rotated(&sx, r.as_ref());
        let reference = quantized(format, &rsx, d);
        let e_ref = distance(&dequantized(format, &reference, d), &rsx);
        let got = dequantized(format, &cache, d);
        let err = distance(&got, &dequantized(format, &reference, d));
        let norm = distance(&rx, &vec![0.0; rx.len()]);
        prop_assert!(
            err <= 3.0 * e_orig.max(e_ref) + 1e-9 * norm,
            "{format} d {d} {rope:?} rotation {kind:?} delta {delta}: error {err:e}, one quantization {e_ref:e}"
        );
    }
}

/// The CPU kernel's shift against the oracle's on the same cache: both re-quantize (nearly) the
/// same vector, the exact rotation of the shifted dequantized keys, so their distances to it
/// are one quantization error each; the kernel's (f32 rotations) may not be worse than the
/// oracle's by more than a few percent.
#[test]
fn the_cpu_shift_follows_the_oracle() {
    let d = 128;
    let n_rows = 40;
    for isa in Isa::all_available() {
        for (i, format) in formats().into_iter().enumerate() {
            for kind in 0u8..3 {
                let seed = 77 + i as u64 + 10 * kind as u64;
                let r = RotationKind::nth(kind.into()).build(d, seed);
                let rope = rope_of(i % 2 == 0, d, 10_000.0, 1.0);
                let delta = -1234 + 411 * i as i64;
                let x = KEYS.f64s(n_rows * d, seed);
                let start = quantized(format, &rotated(&x, r.as_ref()), d);
                // The exact target: the start's keys, unrotated, shifted, rotated (f64).
                let mut target = dequantized(format, &start, d);
                if let Some(r) = &r {
                    r.rotate_rows(&mut target, true).unwrap();
                }
                rope.shift_rows_of(&mut target, d, delta).unwrap();
                let target = rotated(&target, r.as_ref());

                let mut oracle = start.clone();
                shift_cache(format, &mut oracle, d, r.as_ref(), &rope, delta).unwrap();
                let codec = CacheCodec::new(format, d, r.as_ref(), isa).unwrap();
                let mut kernel = start.clone();
                codec.shift(&mut kernel, &rope, delta).unwrap();

                let e_oracle = distance(&dequantized(format, &oracle, d), &target);
                let e_kernel = distance(&dequantized(format, &kernel, d), &target);
                let norm = distance(&target, &vec![0.0; target.len()]);
                assert!(
                    e_kernel <= 1.05 * e_oracle + 1e-6 * norm,
                    "{format} on {isa}, rotation {kind}: kernel {e_kernel:e}, oracle {e_oracle:e}"
                );
            }
        }
    }
}

/// Shifting by δ and back by −δ returns the keys within two re-quantizations.
#[test]
fn a_shift_and_its_inverse_return_the_keys() {
    let d = 128;
    let r = Rotation::hadamard(d).unwrap();
    let rope = rope_of(true, d, 1_000_000.0, 1.0);
    for format in formats() {
        let rx = rotated(&KEYS.f64s(8 * d, 5), Some(&r));
        let start = quantized(format, &rx, d);
        let e_one = distance(&dequantized(format, &start, d), &rx);
        let codec = CacheCodec::new(format, d, Some(&r), Isa::best()).unwrap();
        let mut cache = start.clone();
        codec.shift(&mut cache, &rope, 3000).unwrap();
        codec.shift(&mut cache, &rope, -3000).unwrap();
        let err = distance(
            &dequantized(format, &cache, d),
            &dequantized(format, &start, d),
        );
        assert!(
            err <= 3.0 * e_one + 1e-9,
            "{format}: {err:e} vs one quantization {e_one:e}"
        );
    }
}

/// A zero shift of an exact format (f32 values, no rotation) changes no byte: the pairs turn
/// by cos 0 = 1, sin 0 = 0.
#[test]
fn a_zero_shift_of_an_exact_format_changes_nothing() {
    let d = 64;
    let x = KEYS.f64s(5 * d, 9);
    let start = quantized(KvFormat::F32, &x, d);
    let rope = Rope::new(RopeVariant::Normal, d);
    let mut oracle = start.clone();
    shift_cache(KvFormat::F32, &mut oracle, d, None, &rope, 0).unwrap();
    assert_eq!(oracle, start);
    let codec = CacheCodec::new(KvFormat::F32, d, None, Isa::best()).unwrap();
    let mut kernel = start.clone();
    codec.shift(&mut kernel, &rope, 0).unwrap();
    assert_eq!(kernel, start);
}

/// Bad RoPE parameters, a rotation of another size and a cache that is not whole rows are
/// typed errors, and the cache is left as it was.
#[test]
fn bad_shifts_are_errors_and_touch_nothing() {
    let d = 64;
    let r = Rotation::hadamard(d).unwrap();
    let start = quantized(KvFormat::Q8_0, &rotated(&KEYS.f64s(3 * d, 4), Some(&r)), d);
    let codec = CacheCodec::new(KvFormat::Q8_0, d, Some(&r), Isa::best()).unwrap();
    let good = Rope::new(RopeVariant::Neox, d);
    let bad_ropes = [
        Rope { dims: 0, ..good },
        Rope { dims: 63, ..good },
        Rope { dims: 128, ..good },
        Rope {
            freq_base: 0.0,
            ..good
        },
        Rope {
            freq_base: f64::NAN,
            ..good
        },
        Rope {
            freq_scale: -1.0,
            ..good
        },
    ];
    for rope in bad_ropes {
        let mut cache = start.clone();
        assert!(shift_cache(KvFormat::Q8_0, &mut cache, d, Some(&r), &rope, 3).is_err());
        assert!(codec.shift(&mut cache, &rope, 3).is_err(), "{rope:?}");
        assert_eq!(cache, start);
    }
    let mut cache = start.clone();
    let other = Rotation::hadamard(128).unwrap();
    assert!(shift_cache(KvFormat::Q8_0, &mut cache, d, Some(&other), &good, 3).is_err());
    let short = start.len() - 1;
    assert!(shift_cache(KvFormat::Q8_0, &mut cache[..short], d, Some(&r), &good, 3).is_err());
    assert!(codec.shift(&mut cache[..short], &good, 3).is_err());
    assert_eq!(cache, start);
}
