//! The file commands of the `rotq` CLI, as functions: quantize, dequantize and rotate raw
//! little-endian files. Each validates everything before it writes, and writes atomically.

use crate::io::{read_bytes, read_f32, write_atomic, write_f32_atomic};
use crate::Error;
use rotq_reference::{KvFormat, RotationSpec};
use std::path::Path;

/// Checks that `len` values form a whole, non-zero number of rows of `row_len`.
fn check_rows(len: usize, row_len: usize, what: &Path) -> Result<usize, Error> {
    if row_len == 0 {
        return Err(Error::Input("--row-len must be positive".into()));
    }
    if len == 0 || !len.is_multiple_of(row_len) {
        return Err(Error::Input(format!(
            "{}: {len} values are not a whole, non-zero number of rows of {row_len}",
            what.display()
        )));
    }
    Ok(len / row_len)
}

/// Quantizes a raw f32 file of rows of `row_len` into `format`'s blocks, laid out exactly as
/// ggml lays them out in memory (rows back to back). Returns the number of rows.
///
/// ```
/// use rotq::KvFormat;
/// use rotq_cli::files;
/// let dir = tempfile::tempdir().unwrap();
/// let (x, q) = (dir.path().join("x.f32"), dir.path().join("x.q8_0"));
/// let values: Vec<f32> = (0..64).map(|i| i as f32 / 8.0).collect();
/// rotq_cli::io::write_f32_atomic(&x, &values).unwrap();
/// assert_eq!(files::quantize(KvFormat::Q8_0, 32, &x, &q).unwrap(), 2);
/// assert_eq!(std::fs::metadata(&q).unwrap().len(), 2 * 34);
/// ```
pub fn quantize(
    format: KvFormat,
    row_len: usize,
    input: &Path,
    output: &Path,
) -> Result<usize, Error> {
    format.check_row_len(row_len)?;
    let values = read_f32(input)?;
    let rows = check_rows(values.len(), row_len, input)?;
    let bytes = format.quantize_row(&values)?;
    write_atomic(output, &bytes)?;
    Ok(rows)
}

/// Dequantizes a file of `format` rows (each `row_len` values) back to raw f32.
/// Returns the number of rows.
pub fn dequantize(
    format: KvFormat,
    row_len: usize,
    input: &Path,
    output: &Path,
) -> Result<usize, Error> {
    let row_bytes = format.row_bytes(row_len)?;
    let bytes = read_bytes(input)?;
    if bytes.is_empty() || bytes.len() % row_bytes != 0 {
        return Err(Error::Input(format!(
            "{}: {} bytes are not a whole, non-zero number of {format} rows of {row_len} values ({row_bytes} bytes each)",
            input.display(),
            bytes.len()
        )));
    }
    let values = format.dequantize_row(&bytes)?;
    write_f32_atomic(output, &values)?;
    Ok(bytes.len() / row_bytes)
}

/// Rotates every row of `dim` values of a raw f32 file (in f64, rounded to f32 on output).
/// Returns the number of rows.
///
/// ```
/// use rotq::RotationSpec;
/// use rotq_cli::files;
/// let dir = tempfile::tempdir().unwrap();
/// let (x, y, z) = (dir.path().join("x"), dir.path().join("y"), dir.path().join("z"));
/// rotq_cli::io::write_f32_atomic(&x, &[1.0, 2.0, 3.0, 4.0]).unwrap();
/// files::rotate(RotationSpec::Randomized(3), 4, false, &x, &y).unwrap();
/// files::rotate(RotationSpec::Randomized(3), 4, true, &y, &z).unwrap();
/// let back = rotq_cli::io::read_f32(&z).unwrap();
/// assert!(back.iter().zip([1.0, 2.0, 3.0, 4.0]).all(|(a, b)| (a - b).abs() < 1e-6));
/// ```
pub fn rotate(
    spec: RotationSpec,
    dim: usize,
    inverse: bool,
    input: &Path,
    output: &Path,
) -> Result<usize, Error> {
    let rotation = spec.build(dim)?.ok_or_else(|| {
        Error::Input("--rotation none leaves the data as it is: nothing to write".into())
    })?;
    let values = read_f32(input)?;
    let rows = check_rows(values.len(), dim, input)?;
    let mut data: Vec<f64> = values.iter().map(|v| f64::from(*v)).collect();
    rotation.rotate_rows(&mut data, inverse)?;
    let out: Vec<f32> = data.iter().map(|v| *v as f32).collect();
    write_f32_atomic(output, &out)?;
    Ok(rows)
}
