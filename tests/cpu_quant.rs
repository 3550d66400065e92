//! Differential tests: the CPU rotate-quantize and dequantize kernels against the oracle.

use half::{bf16, f16};
use proptest::prelude::*;
use rotq::reference::tolerance::{tolerance, Op, Precision};
use rotq::{KvFormat, Rotation};
use rotq_cpu::{CacheCodec, CpuRotation, Isa, QuantizeConfig};
use rotq_testkit::data::Rows;
use rotq_testkit::oracle::{assert_matches, assert_matches_f32};

/// The oracle's bytes of rows of `dim` values.
fn oracle_bytes(format: KvFormat, rows: &[f32], dim: usize) -> Vec<u8> {
    format.quantize_rows(rows, dim).unwrap()
}

/// Where two caches of `codec`'s rows first differ: the row and the byte in it, for messages.
fn first_row_difference(got: &[u8], want: &[u8], codec: &CacheCodec) -> String {
    let rb = codec.row_bytes();
    match got.iter().zip(want).position(|(a, b)| a != b) {
        Some(i) => format!(
            "first difference in row {} at byte {}: {:#04x}, the oracle's {:#04x}",
            i / rb,
            i % rb,
            got[i],
            want[i]
        ),
        None => format!("{} bytes vs {}", got.len(), want.len()),
    }
}

#[test]
fn unrotated_quantization_is_byte_exact_for_every_format() {
    let golden = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/reference/tests/data/ggml/input.f32"
    ))
    .unwrap();
    let golden: Vec<f32> = golden
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut special = Rows::stress().f32s(8 * 128, 5);
    special[3] = f32::NAN;
    // A NaN of the other sign in the same row, in the same lane of 8 (a row format sums the
    // squares of its row in eight lanes: its NaN norm must still be the oracle's bytes).
    special[11] = -f32::NAN;
    special[200] = f32::INFINITY;
    special[300] = f32::NEG_INFINITY;
    // Whole blocks (32-aligned): a subnormal scale whose 1/d overflows, all −0, all +0, and
    // a tiny scale whose 1/d stays finite.
    special[384..416].fill(1e-40);
    special[512..544].fill(-0.0);
    special[544..576].fill(0.0);
    special[576..608]
        .iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = (i as f32 - 15.5) * 1e-36);
    // Whole rows (what the row formats see): all −0, all subnormal, and one whose norm
    // overflows f16 (rows 0 to 2 hold NaN, +Inf and −Inf; rows 3 and 4 the blocks above).
    special[640..768].fill(-0.0);
    special[768..896].fill(1e-40);
    special[896..1024]
        .iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = if i % 2 == 0 { 7e4 } else { -3e4 });
    for isa in Isa::all_available() {
        for format in KvFormat::ALL {
            for data in [&golden, &special, &Rows::stress().f32s(64 * 256, 1)] {
                let codec = CacheCodec::new(format, 128, None, isa).unwrap();
                let mut cache = vec![0u8; data.len() / 128 * codec.row_bytes()];
                codec.quantize(data, &mut cache, 0).unwrap();
                assert!(
                    cache == oracle_bytes(format, data, 128),
                    "{format} on {isa}: {}",
                    first_row_difference(&cache, &oracle_bytes(format, data, 128), &codec)
                );
                let mut back = vec![0f32; data.len()];
                codec.dequantize(&cache, &mut back).unwrap();
                let want = format.dequantize_rows(&cache, 128).unwrap();
                assert!(
                    back.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())),
                    "{format} dequantize on {isa}"
                );
            }
        }
    }
}

/// Rotate-quantize against the oracle pipeline (rotate in f64, round to f32, quantize). The
/// kernel's bytes must equal the oracle's quantizer applied to the kernel's own rotation, and
/// that rotation must be within tolerance of the oracle's: so any byte that differs from the
/// oracle pipeline is a value within rotation rounding of a code boundary.
fn check_fused(format: KvFormat, r: &Rotation, data: &[f32], isa: Isa, config: QuantizeConfig) {
    let dim = r.dim();
    if format.check_row_len(dim).is_err() {
        // A length the format does not take (vLLM's keys: powers of two) is refused.
        assert!(
            CacheCodec::new(format, dim, Some(r), isa).is_err(),
            "{format} {dim}"
        );
        return;
    }
    let codec = CacheCodec::new(format, dim, Some(r), isa)
        .unwrap()
        .with_config(config);
    let mut cache = vec![0u8; data.len() / dim * codec.row_bytes()];
    codec.quantize(data, &mut cache, 0).unwrap();

    let mut rotated = data.to_vec();
    CpuRotation::new(r, isa).forward_rows(&mut rotated).unwrap();
    let own = oracle_bytes(format, &rotated, dim);
    assert!(
        cache == own,
        "{format} {r} on {isa}: quantizer differs ({})",
        first_row_difference(&cache, &own, &codec)
    );

    let mut exact: Vec<f64> = data.iter().map(|v| f64::from(*v)).collect();
    r.rotate_rows(&mut exact, false).unwrap();
    let got: Vec<f64> = rotated.iter().map(|v| f64::from(*v)).collect();
    let what = format!("{format} {r} on {isa}");
    for (g, w) in got.chunks(dim).zip(exact.chunks(dim)) {
        assert_matches(g, w, Op::Rotation, Precision::F32, &what);
    }
    let oracle_rotated: Vec<f32> = exact.iter().map(|v| *v as f32).collect();
    let oracle = oracle_bytes(format, &oracle_rotated, dim);
    // Boundary cases are rare: a few blocks in a hundred at most. f32 storage keeps every
    // rounding bit, so only its values are compared (below); fp8's scale is an exact f32, so
    // it is compared within rounding and the rarity rule applies to its codes. A row format's
    // unit is the whole row (its codes, norms and signs all follow from every value of it):
    // the rule counts rows there.
    let (unit, units_per_row) = if format.is_row() {
        (codec.row_bytes(), 1)
    } else {
        (format.block_bytes(), dim / format.block_size())
    };
    let codes_from = if format == KvFormat::Fp8E4m3 { 4 } else { 0 };
    let mut differing = 0;
    let tol = tolerance(Op::Rotation, Precision::F32);
    for (i, (a, b)) in cache.chunks(unit).zip(oracle.chunks(unit)).enumerate() {
        differing += usize::from(a[codes_from..] != b[codes_from..]);
        if codes_from == 4 {
            // The scale is the block's max |x| / 448: it may move by as much as the rotation
            // may (the tolerance's max-abs, relative to the row's largest value), plus f32
            // rounding.
            let row = &exact[i / units_per_row * dim..][..dim];
            let row_max = row.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let s = |x: &[u8]| f64::from(f32::from_le_bytes([x[0], x[1], x[2], x[3]]));
            assert!(
                (s(a) - s(b)).abs() <= tol.max_abs * row_max / 448.0 + 1e-6 * s(b).abs(),
                "{r}: fp8 scales {} vs {}",
                s(a),
                s(b)
            );
        }
    }
    let units = cache.len() / unit;
    // vLLM's codebook keys rotate inside by the same Hadamard, which undoes the plan's: their
    // codes see the raw row, whose exact zeros and repeated values sit on the codebook's zero
    // midpoint, where the rotations' last bits decide. Their bytes are held to the oracle's
    // above (on the kernel's own rotation); the rarity rule is for formats that see the row
    // the plan made.
    let internal_rotation = matches!(format, KvFormat::VllmK4 | KvFormat::VllmK3);
    if format != KvFormat::F32 && !internal_rotation {
        assert!(
            differing * 20 <= units.max(20),
            "{format} {r}: {differing} of {units} blocks (or rows) differ"
        );
    }

    // Dequantize + inverse rotation gives the input back within the format's error.
    let mut back = vec![0f32; data.len()];
    codec.dequantize(&cache, &mut back).unwrap();
    let decoded = format.dequantize_rows(&cache, dim).unwrap();
    let mut want: Vec<f64> = decoded.iter().map(|v| f64::from(*v)).collect();
    r.rotate_rows(&mut want, true).unwrap();
    assert_matches_f32(
        &back,
        &want,
        Op::Rotation,
        Precision::F32,
        &format!("{what}: dequantized"),
    );
}

#[test]
fn fused_rotate_quantize_matches_the_oracle_for_every_format_and_rotation() {
    for isa in Isa::all_available() {
        for dim in [64usize, 96, 128, 160, 192, 256] {
            let data = Rows::stress().f32s(33 * dim, dim as u64);
            let rots = [
                Rotation::hadamard(dim).unwrap(),
                Rotation::randomized(dim, 11).unwrap(),
                Rotation::block_hadamard(dim, 32).unwrap(),
                Rotation::matrix(Rotation::randomized(dim, 12).unwrap().to_matrix()).unwrap(),
            ];
            for format in KvFormat::ALL {
                for r in &rots {
                    check_fused(format, r, &data, isa, QuantizeConfig::default());
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn fused_kernel_any_rows_and_tasks(
        dim in proptest::sample::select(vec![32usize, 64, 96, 128, 256]),
        // Up to SERIAL_ROWS a call runs on the calling thread; past it, in tasks.
        n_rows in prop_oneof![0usize..50, 250usize..330],
        rows_per_task in 1usize..40,
        format in proptest::sample::select(KvFormat::ALL.to_vec()),
        seed in any::<u64>(),
    ) {
        let data = Rows::stress().f32s(n_rows * dim, seed);
        let r = Rotation::randomized(dim, seed).unwrap();
        for isa in Isa::all_available() {
            check_fused(format, &r, &data, isa, QuantizeConfig { rows_per_task });
        }
    }
}

#[test]
fn rows_land_at_the_offset_and_nowhere_else() {
    let r = Rotation::hadamard(128).unwrap();
    let codec = CacheCodec::new(KvFormat::Q4_0, 128, Some(&r), Isa::best()).unwrap();
    let rb = codec.row_bytes();
    let mut cache = vec![0xAAu8; 10 * rb];
    codec
        .quantize(&Rows::stress().f32s(3 * 128, 2), &mut cache, 4)
        .unwrap();
    assert!(cache[..4 * rb]
        .iter()
        .chain(&cache[7 * rb..])
        .all(|b| *b == 0xAA));
    assert!(cache[4 * rb..7 * rb].iter().any(|b| *b != 0xAA));
    // Too small a cache, a ragged input, an offset past the end: errors, cache untouched.
    let before = cache.clone();
    assert!(codec
        .quantize(&Rows::stress().f32s(3 * 128, 2), &mut cache, 8)
        .is_err());
    assert!(codec.quantize(&vec![0f32; 100], &mut cache, 0).is_err());
    assert!(codec
        .quantize(&Rows::stress().f32s(128, 2), &mut cache, usize::MAX)
        .is_err());
    assert_eq!(cache, before);
    assert!(codec
        .dequantize(&cache[..rb - 1], &mut vec![0f32; 128])
        .is_err());
    assert!(CacheCodec::new(KvFormat::Q4_0, 100, None, Isa::best()).is_err());
    assert!(CacheCodec::new(KvFormat::Q4_0, 64, Some(&r), Isa::best()).is_err());
}

#[test]
fn half_precision_inputs_quantize_like_their_f32_values() {
    let data = Rows::stress().f32s(16 * 128, 9);
    let r = Rotation::randomized(128, 4).unwrap();
    for isa in Isa::all_available() {
        let codec = CacheCodec::new(KvFormat::Q8_0, 128, Some(&r), isa).unwrap();
        let h: Vec<f16> = data.iter().map(|v| f16::from_f32(*v)).collect();
        let b: Vec<bf16> = data.iter().map(|v| bf16::from_f32(*v)).collect();
        for (widened, got) in [
            (h.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), {
                let mut c = vec![0u8; 16 * codec.row_bytes()];
                codec.quantize(&h, &mut c, 0).unwrap();
                c
            }),
            (b.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), {
                let mut c = vec![0u8; 16 * codec.row_bytes()];
                codec.quantize(&b, &mut c, 0).unwrap();
                c
            }),
        ] {
            let mut want = vec![0u8; 16 * codec.row_bytes()];
            codec.quantize(&widened, &mut want, 0).unwrap();
            assert_eq!(got, want);
        }
    }
}

#[test]
fn element_formats_are_bit_exact_at_any_row_length() {
    // Odd lengths reach the scalar tails of the SIMD conversions; the specials cover NaN
    // payloads (signalling and quiet), infinities, subnormals, signed zeros and f16 overflow.
    let specials = [
        f32::from_bits(0x7F80_0001), // signalling NaN
        f32::from_bits(0xFFC1_2345),
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-40,
        -1e-45,
        -0.0,
        0.0,
        65520.0,
        -1e6,
        6.1e-5,
        3.0e-8,
    ];
    for isa in Isa::all_available() {
        for dim in [1usize, 3, 12, 13, 20, 33] {
            let mut data = Rows::stress().f32s(7 * dim, dim as u64);
            let len = data.len();
            for (i, v) in specials.iter().enumerate() {
                data[(i * 5) % len] = *v;
            }
            for format in [KvFormat::F32, KvFormat::F16, KvFormat::Bf16] {
                let codec = CacheCodec::new(format, dim, None, isa).unwrap();
                let mut cache = vec![0u8; 7 * codec.row_bytes()];
                codec.quantize(&data, &mut cache, 0).unwrap();
                assert!(
                    cache == oracle_bytes(format, &data, dim),
                    "{format} dim {dim} on {isa}"
                );
                // Decoding every possible 16-bit pattern (or these f32 bytes) matches bit for bit.
                let patterns: Vec<u8> = if format == KvFormat::F32 {
                    cache.clone()
                } else {
                    (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect()
                };
                let len = patterns.len() / (codec.row_bytes() / dim) / dim * dim;
                let bytes = &patterns[..len / dim * codec.row_bytes()];
                let mut back = vec![0f32; len];
                codec.dequantize(bytes, &mut back).unwrap();
                let want = format.dequantize_rows(bytes, dim).unwrap();
                for (i, (a, b)) in back.iter().zip(&want).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{format} dim {dim} on {isa}: value {i}"
                    );
                }
            }
        }
    }
}

/// A cache at any byte alignment (a slice of a larger buffer starting 1 to 7 bytes in) is
/// written and read exactly as an aligned one: the kernels read and write cache bytes without
/// assuming their alignment.
#[test]
fn caches_at_any_alignment_work_like_aligned_ones() {
    let data = Rows::stress().f32s(6 * 128, 21);
    let r = Rotation::hadamard(128).unwrap();
    for isa in Isa::all_available() {
        for format in KvFormat::ALL {
            let codec = CacheCodec::new(format, 128, Some(&r), isa).unwrap();
            let len = 6 * codec.row_bytes();
            let mut aligned = vec![0u8; len];
            codec.quantize(&data, &mut aligned, 0).unwrap();
            let mut want = vec![0f32; data.len()];
            codec.dequantize(&aligned, &mut want).unwrap();
            for shift in 1..8 {
                let mut buf = vec![0x5Au8; len + 8];
                let cache = &mut buf[shift..shift + len];
                codec.quantize(&data, cache, 0).unwrap();
                assert!(
                    cache == aligned.as_slice(),
                    "{format} on {isa}, shift {shift}"
                );
                let mut got = vec![0f32; data.len()];
                codec.dequantize(cache, &mut got).unwrap();
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{format} on {isa}, shift {shift}"
                );
            }
        }
    }
}
