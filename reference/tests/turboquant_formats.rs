//! rotq's TurboQuant row formats: their error is the spec's distortion, their bytes follow the
//! documented layout, and edge cases and bad input are handled.

use rotq_reference::lloyd_max;
use rotq_reference::turboquant::formats::RowFormat;
use rotq_reference::turboquant::{sketch_matrix, Mse};

const D: usize = 128;

fn gaussian_rows(n: usize, seed: u64) -> Vec<Vec<f32>> {
    let g = sketch_matrix(D, seed).unwrap();
    (0..n)
        .map(|r| g[r * D..][..D].iter().map(|&x| x as f32).collect())
        .collect()
}

/// Over random rows, the squared error relative to the squared norm is the codebook's
/// distortion for the MSE formats and `π/2 ·` the `b − 1`-bit distortion for the QJL ones
/// (the paper's `D_prod · d` for a unit vector), within 10%.
#[test]
fn row_errors_are_the_specs_distortion() {
    let rows = gaussian_rows(D, 3);
    for f in RowFormat::ALL {
        let mut total = 0.0;
        for y in &rows {
            let back = f.dequantize_row(&f.quantize_row(y).unwrap(), D).unwrap();
            let err: f64 = y
                .iter()
                .zip(&back)
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum();
            total += err / y.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>();
        }
        let mean = total / rows.len() as f64;
        let want = match f {
            RowFormat::Mse { bits } => {
                lloyd_max::distortion(D, &lloyd_max::codebook(D, bits).unwrap()).unwrap()
            }
            RowFormat::Prod { bits } => {
                std::f64::consts::FRAC_PI_2
                    * lloyd_max::distortion(D, &lloyd_max::codebook(D, bits - 1).unwrap()).unwrap()
            }
        };
        assert!((mean - want).abs() <= 0.1 * want, "{f}: {mean} vs {want}");
    }
}

/// The bytes: sizes, the codes as an LSB-first stream (4-bit coordinate 0 in the low nibble of
/// byte 0) equal to the spec's indices, the f16 scale after them, the QJL signs and norm last.
#[test]
fn bytes_follow_the_layout() {
    let sizes: Vec<usize> = RowFormat::ALL
        .iter()
        .map(|f| f.row_bytes(D).unwrap())
        .collect();
    assert_eq!(sizes, [34, 50, 66, 36, 52, 68]);
    let y = &gaussian_rows(1, 9)[0];
    let y64: Vec<f64> = y.iter().map(|&v| f64::from(v)).collect();
    for bits in 2..=4u32 {
        let f = RowFormat::Mse { bits };
        let bytes = f.quantize_row(y).unwrap();
        let spec = Mse::new(D, bits, true).unwrap().encode(&y64).unwrap();
        for (i, &c) in spec.codes.iter().enumerate() {
            let at = i * bits as usize;
            let w = u16::from(bytes[at / 8]) | u16::from(*bytes.get(at / 8 + 1).unwrap_or(&0)) << 8;
            assert_eq!(
                ((w >> (at % 8)) & ((1 << bits) - 1)) as u8,
                c,
                "tq{bits} code {i}"
            );
        }
        if bits == 4 {
            assert_eq!(bytes[0] & 0xF, spec.codes[0]);
            assert_eq!(bytes[0] >> 4, spec.codes[1]);
        }
        // The scale: the norm over the norm of the levels picked (norm correction, stored).
        let at = D * bits as usize / 8;
        let scale = half::f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]]));
        let levels = Mse::new(D, bits, true).unwrap().levels().to_vec();
        let c: Vec<f64> = spec.codes.iter().map(|&i| levels[usize::from(i)]).collect();
        let c_norm = f64::from(rotq_reference::turboquant::formats::level_energy(
            &spec.codes,
            &levels,
        ))
        .sqrt();
        assert!((c_norm - rotq_reference::turboquant::sum_squares(&c).sqrt()).abs() < 1e-6);
        assert_eq!(scale, half::f16::from_f64(spec.norm / c_norm));
        // So the row decodes to the levels times that scale, keeping the row's norm.
        let back = f.dequantize_row(&bytes, D).unwrap();
        for (b, l) in back.iter().zip(&c) {
            assert_eq!(*b, *l as f32 * scale.to_f32());
        }
    }
    let f = RowFormat::Prod { bits: 3 };
    let bytes = f.quantize_row(y).unwrap();
    let n = bytes.len();
    let rn = half::f16::from_bits(u16::from_le_bytes([bytes[n - 2], bytes[n - 1]])).to_f32();
    assert!(rn > 0.0 && rn < 0.5 * y.iter().map(|a| a * a).sum::<f32>().sqrt());
    let signs = &bytes[n - 2 - D / 8..n - 2];
    let ones: u32 = signs.iter().map(|b| b.count_ones()).sum();
    assert!((32..=96).contains(&ones), "{ones} of {D} signs set");
}

#[test]
fn names_parse_and_print() {
    for f in RowFormat::ALL {
        assert_eq!(f.name().parse::<RowFormat>().unwrap(), f);
    }
    assert!("tq5".parse::<RowFormat>().is_err());
    assert!((RowFormat::Mse { bits: 4 }.bits_per_value(128).unwrap() - 4.125).abs() < 1e-12);
}

/// Zeros come back as zeros; a NaN or an infinity, or a norm past f16's range, comes back as
/// NaN, never as a finite wrong row; bad sizes are typed errors.
#[test]
fn edge_cases_and_bad_input() {
    for f in RowFormat::ALL {
        let zeros = f
            .dequantize_row(&f.quantize_row(&[0.0; D]).unwrap(), D)
            .unwrap();
        assert!(zeros.iter().all(|&v| v == 0.0), "{f}");
        let mut y = gaussian_rows(1, 4).remove(0);
        y[3] = f32::NAN;
        let back = f.dequantize_row(&f.quantize_row(&y).unwrap(), D).unwrap();
        assert!(back.iter().all(|v| v.is_nan()), "{f}: NaN");
        y[3] = 1e6; // norm 1e6 > 65504
        let back = f.dequantize_row(&f.quantize_row(&y).unwrap(), D).unwrap();
        assert!(back.iter().all(|v| !v.is_finite()), "{f}: norm past f16");
        assert!(f.quantize_row(&[1.0; 12]).is_err());
        assert!(f.dequantize_row(&[0u8; 3], D).is_err());
        assert!(f.row_bytes(0).is_err());
        assert!(f.row_bytes(4104).is_err()); // past MAX_DIM: refused, never a d² sketch
        assert!(f.row_bytes(1 << 62).is_err());
    }
    assert!(RowFormat::Mse { bits: 5 }.row_bytes(D).is_err());
}

/// The row formats in the format registry: one row per call of the one-row methods, any number
/// through `quantize_rows`, each row the row format's bytes; lengths they cannot hold refused.
#[test]
fn registry_row_formats_hold_rows_one_by_one() {
    use rotq_reference::KvFormat;
    let rows = gaussian_rows(3, 11);
    let flat: Vec<f32> = rows.concat();
    for format in KvFormat::ALL {
        let Some(row) = format.row_format() else {
            continue;
        };
        let rb = row.row_bytes(D).unwrap();
        assert_eq!(format.row_bytes(D).unwrap(), rb);
        assert_eq!(format.values_in(rb).unwrap(), D);
        assert!(format.values_in(rb + 1).is_err() && format.values_in(0).is_err());
        let bytes = format.quantize_rows(&flat, D).unwrap();
        for (r, b) in rows.iter().zip(bytes.chunks_exact(rb)) {
            assert_eq!(b, &row.quantize_row(r).unwrap()[..], "{format}");
            assert_eq!(format.quantize_row(r).unwrap(), b, "{format}");
            let back = format.dequantize_row(b).unwrap();
            assert_eq!(back, row.dequantize_row(b, D).unwrap());
            // The bound is the oracle's own error: met, and not loose.
            let bound = format.error_bound(r, b);
            let worst = r
                .iter()
                .zip(&back)
                .map(|(a, b)| f64::from((a - b).abs()))
                .fold(0.0, f64::max);
            assert!(worst <= bound && bound < worst * 1.01 + 1e-6, "{format}");
            // A wrong row (another row's bytes) breaks the bound.
            assert!(format.error_bound(&rows[(rows.len() + 1) % 3], b) > 0.0);
        }
        assert_eq!(format.dequantize_rows(&bytes, D).unwrap().len(), flat.len());
        assert!(format.quantize_rows(&flat[1..], D).is_err());
        assert!(format.dequantize_rows(&bytes[1..], D).is_err());
        assert!(format.check_row_len(100).is_err() && format.check_row_len(96).is_ok());
        // The QJL sketch is d × d: its formats stop at 1024, the others at 4096.
        assert_eq!(
            format.row_bytes(2048).is_ok(),
            matches!(row, RowFormat::Mse { .. })
        );
        let bits = format.bits_per_value_at(D).unwrap();
        assert_eq!(bits, rb as f64 * 8.0 / D as f64);
        assert_eq!(format.bits_per_value(), bits);
    }
    assert!(KvFormat::Tq4.bits_per_value_at(100).is_err());
}
