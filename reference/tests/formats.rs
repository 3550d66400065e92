//! The format registry: round trips within each format's worst-case bound, edge cases,
//! non-finite input, and errors for bad lengths.

use proptest::prelude::*;
use rotq_reference::format::fp8::{e4m3_decode, e4m3_encode};
use rotq_reference::{Error, KvFormat};

/// Checks every block of `x` against the registry's bound; returns the worst ratio error/bound.
fn check_roundtrip(format: KvFormat, x: &[f32]) -> f64 {
    let bytes = format.quantize_row(x).unwrap();
    let y = format.dequantize_row(&bytes).unwrap();
    assert_eq!(y.len(), x.len());
    let (bs, bb) = (format.block_size(), format.block_bytes());
    let mut worst = 0.0f64;
    for (i, (xb, (yb, eb))) in x
        .chunks(bs)
        .zip(y.chunks(bs).zip(bytes.chunks(bb)))
        .enumerate()
    {
        let bound = format.error_bound(xb, eb);
        if !bound.is_finite() {
            continue;
        }
        for (a, b) in xb.iter().zip(yb) {
            let err = (f64::from(*a) - f64::from(*b)).abs();
            assert!(
                err <= bound,
                "{format} block {i}: |{a:e} - {b:e}| = {err:e} > bound {bound:e}; block {xb:?}"
            );
            if bound > 0.0 {
                worst = worst.max(err / bound);
            }
        }
    }
    worst
}

/// Rows of `blocks` blocks of 32 with a per-block magnitude and optional outlier.
fn rows() -> impl Strategy<Value = Vec<f32>> {
    (1usize..5)
        .prop_flat_map(|blocks| {
            proptest::collection::vec(
                (
                    proptest::collection::vec(-1.0f32..1.0, 32),
                    -20i32..12,
                    proptest::option::of((0usize..32, -50.0f32..50.0)),
                ),
                blocks,
            )
        })
        .prop_map(|blocks| {
            let mut out = Vec::new();
            for (mut b, log_scale, outlier) in blocks {
                let s = 2f32.powi(log_scale);
                b.iter_mut().for_each(|v| *v *= s);
                if let Some((at, v)) = outlier {
                    b[at] = v * s;
                }
                out.extend(b);
            }
            out
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn dequantize_of_quantize_is_within_the_bound(x in rows()) {
        for format in KvFormat::BLOCKS {
            check_roundtrip(format, &x);
        }
    }

    #[test]
    fn quantize_is_deterministic_and_blockwise(x in rows()) {
        // Each block is encoded on its own: quantizing a row equals quantizing its blocks.
        for format in KvFormat::BLOCKS {
            let whole = format.quantize_row(&x).unwrap();
            let parts: Vec<u8> = x
                .chunks(32)
                .flat_map(|b| format.quantize_row(b).unwrap())
                .collect();
            prop_assert_eq!(&whole, &parts);
        }
    }

    #[test]
    fn arbitrary_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        for format in KvFormat::BLOCKS {
            match format.dequantize_row(&bytes) {
                Ok(v) => prop_assert_eq!(v.len() / format.block_size() * format.block_bytes(), bytes.len()),
                Err(e) => {
                    let is_truncated = matches!(e, Error::TruncatedBuffer { .. });
                    prop_assert!(is_truncated);
                }
            }
        }
    }
}

#[test]
fn bounds_are_tight_enough_to_catch_a_wrong_quantizer() {
    // On ordinary data each format uses a fair part of its bound: a bound that is too loose
    // would let a broken quantizer pass.
    let x: Vec<f32> = (0..32 * 64)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 3.0)
        .collect();
    for format in KvFormat::BLOCKS {
        let worst = check_roundtrip(format, &x);
        if format != KvFormat::F32 {
            assert!(
                worst > 0.2,
                "{format}: worst error is only {worst} of its bound"
            );
        }
    }
}

#[test]
fn registry_is_consistent() {
    for (i, format) in KvFormat::ALL.into_iter().enumerate() {
        let info = format.info();
        assert_eq!(info.format, format);
        assert_eq!(format as usize, i);
        assert_eq!(info.name.parse::<KvFormat>().unwrap(), format);
        assert_eq!(format.to_string(), info.name);
        assert_eq!(KvFormat::BLOCKS.contains(&format), info.row.is_none());
        if info.row.is_some() {
            assert!(format.is_row());
            assert_eq!((info.block_size, info.block_bytes), (8, 0));
            if let Some(row) = format.row_format() {
                assert_eq!(row.name(), info.name);
            }
            continue;
        }
        let x = vec![0.25f32; format.block_size() * 3];
        assert_eq!(format.quantize_row(&x).unwrap().len(), 3 * info.block_bytes);
        assert_eq!(info.scaled, info.block_size > 1);
    }
    let bits: Vec<(KvFormat, f64)> = KvFormat::ALL
        .iter()
        .map(|f| (*f, f.bits_per_value()))
        .collect();
    assert!(bits.contains(&(KvFormat::Q4_0, 4.5)) && bits.contains(&(KvFormat::Q6_0, 6.5)));
    assert!(bits.contains(&(KvFormat::Fp8E4m3, 9.0)) && bits.contains(&(KvFormat::F16, 16.0)));
    assert_eq!("FP8".parse::<KvFormat>().unwrap(), KvFormat::Fp8E4m3);
    assert!(matches!("q3_k".parse::<KvFormat>(), Err(Error::UnknownFormat(s)) if s == "q3_k"));
}

#[test]
fn bad_lengths_are_typed_errors() {
    let f = KvFormat::Q4_0;
    for len in [0usize, 1, 31, 33, 100] {
        assert!(matches!(
            f.quantize_row(&vec![1.0; len]),
            Err(Error::RowNotMultipleOfBlock { row_len, block: 32, .. }) if row_len == len
        ));
    }
    for len in [0usize, 17, 19, 35] {
        assert!(matches!(
            f.dequantize_row(&vec![0; len]),
            Err(Error::TruncatedBuffer { .. })
        ));
    }
    let mut out = vec![0u8; 17];
    assert!(matches!(
        f.quantize_into(&[1.0; 32], &mut out),
        Err(Error::LengthMismatch { .. })
    ));
    let mut small = vec![0f32; 31];
    assert!(matches!(
        f.dequantize_into(&[0; 18], &mut small),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(KvFormat::F16.quantize_row(&[]).is_err());
    assert!(matches!(
        KvFormat::Q8_0.row_bytes(usize::MAX - 31),
        Err(Error::Overflow(_))
    ));
}

#[test]
fn zeros_and_constant_rows() {
    for format in KvFormat::BLOCKS {
        let zeros = vec![0.0f32; 64];
        let y = format
            .dequantize_row(&format.quantize_row(&zeros).unwrap())
            .unwrap();
        assert!(y.iter().all(|v| *v == 0.0), "{format}: zeros");
        for c in [1.0f32, -3.5, 1e-3, 200.0] {
            let x = vec![c; 64];
            check_roundtrip(format, &x);
            let y = format
                .dequantize_row(&format.quantize_row(&x).unwrap())
                .unwrap();
            // Every value of a constant row decodes to the same number.
            assert!(y.iter().all(|v| *v == y[0]), "{format}: constant {c}");
        }
    }
}

#[test]
fn rounding_ties_follow_each_formats_rule() {
    // q8_0: step 1 (amax 127); x.5 rounds away from zero (roundf).
    let mut x = vec![0.0f32; 32];
    x[0] = 127.0;
    x[1] = 2.5;
    x[2] = -2.5;
    x[3] = 0.5;
    let y = KvFormat::Q8_0
        .dequantize_row(&KvFormat::Q8_0.quantize_row(&x).unwrap())
        .unwrap();
    assert_eq!(&y[..4], &[127.0, 3.0, -3.0, 1.0]);
    // q4_0: step 1 (max −8); x + 8.5 truncated, so a tie rounds up (toward +∞).
    let mut x = vec![0.0f32; 32];
    x[0] = -8.0;
    x[1] = 2.5;
    x[2] = -2.5;
    let y = KvFormat::Q4_0
        .dequantize_row(&KvFormat::Q4_0.quantize_row(&x).unwrap())
        .unwrap();
    assert_eq!(&y[..3], &[-8.0, 3.0, -2.0]);
    // int4: step 1 (amax 7); ties to even.
    let mut x = vec![0.0f32; 32];
    x[0] = 7.0;
    x[1] = 2.5;
    x[2] = -2.5;
    x[3] = 3.5;
    let y = KvFormat::Int4
        .dequantize_row(&KvFormat::Int4.quantize_row(&x).unwrap())
        .unwrap();
    assert_eq!(&y[..4], &[7.0, 2.0, -2.0, 4.0]);
    // fp8: 1.0625 lies halfway between 1.0 and 1.125; the even code (1.0) wins.
    assert_eq!(e4m3_decode(e4m3_encode(1.0625)), 1.0);
    assert_eq!(e4m3_decode(e4m3_encode(1.1875)), 1.25);
}

#[test]
fn e4m3_codes_round_trip_and_saturate() {
    for c in 0u8..=255 {
        let v = e4m3_decode(c);
        if c & 0x7F == 0x7F {
            assert!(v.is_nan());
        } else {
            assert_eq!(e4m3_encode(v), c, "code {c:#x} value {v}");
        }
    }
    assert_eq!(e4m3_decode(e4m3_encode(-1e30)), -448.0);
    assert_eq!(e4m3_decode(e4m3_encode(2f32.powi(-10))), 0.0); // half the smallest step: even 0
    assert_eq!(e4m3_decode(0x01), 2f32.powi(-9));
    assert_eq!(e4m3_encode(-0.0), 0x80);
}

#[test]
fn huge_and_tiny_magnitudes() {
    // Tiny: subnormal-scale blocks decode to zeros (ggml-identical) and stay within bound.
    for format in KvFormat::BLOCKS {
        for s in [1e-38f32, 1e-30, 1e-20, 1e-7] {
            let x: Vec<f32> = (0..32).map(|i| (i as f32 - 15.5) * s).collect();
            check_roundtrip(format, &x);
        }
    }
    // Huge but representable scales: within bound.
    for format in KvFormat::BLOCKS {
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 15.5) * 100.0).collect();
        check_roundtrip(format, &x);
    }
    // A q8_0 scale past f16's range overflows to Inf, as in ggml; the bound says so.
    let x = vec![1e7f32; 32];
    let bytes = KvFormat::Q8_0.quantize_row(&x).unwrap();
    assert_eq!(KvFormat::Q8_0.error_bound(&x, &bytes), f64::INFINITY);
    assert!(KvFormat::Q8_0
        .dequantize_row(&bytes)
        .unwrap()
        .iter()
        .all(|v| v.is_infinite()));
    // f32-range extremes: formats with an f32 scale keep them.
    let x: Vec<f32> = (0..32)
        .map(|i| if i % 2 == 0 { 3e38 } else { -1e38 })
        .collect();
    check_roundtrip(KvFormat::Fp8E4m3, &x);
    check_roundtrip(KvFormat::F32, &x);
    check_roundtrip(KvFormat::Bf16, &x);
}

#[test]
fn non_finite_values_poison_their_block_only() {
    for format in KvFormat::BLOCKS {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x: Vec<f32> = (0..96).map(|i| (i as f32 * 0.1).sin()).collect();
            x[40] = bad;
            let y = format
                .dequantize_row(&format.quantize_row(&x).unwrap())
                .unwrap();
            if format.info().scaled {
                // The whole middle block is NaN; its neighbours are untouched.
                assert!(y[32..64].iter().all(|v| v.is_nan()), "{format} {bad}");
                check_roundtrip(format, &x[..32]);
                check_roundtrip(format, &x[64..]);
                assert!(y[..32].iter().chain(&y[64..]).all(|v| v.is_finite()));
            } else {
                // Element-wise formats keep the value itself and nothing else changes.
                assert_eq!(y[40].is_nan(), bad.is_nan(), "{format} {bad}");
                if !bad.is_nan() {
                    assert_eq!(y[40], bad);
                }
                assert!(y.iter().enumerate().all(|(i, v)| i == 40 || v.is_finite()));
            }
        }
    }
}
