//! The file commands of the `rotq` CLI, as functions: quantize, dequantize and rotate raw
//! little-endian files.
//!
//! Each streams: it reads, converts and writes [`CHUNK_BYTES`](crate::io::CHUNK_BYTES) of
//! input at a time (whole blocks or rows), so its memory is bounded whatever the size of the
//! file: about 12 MiB of buffers for `quantize` and `dequantize` (input, values, output of one
//! chunk), 16 MiB for `rotate` (the values are rotated in f64), or, for a row of more than
//! 4 MiB (`--dim` above 2^20), one row's worth: 16 bytes per value of the row. Everything that
//! can be checked before reading is checked first (the format, the row length, a file's size
//! against whole rows); an input whose size is only known at the end (standard input, a pipe)
//! is checked there. On any failure, a file output is discarded; standard output, a device or a
//! FIFO keeps what was written, and the error says it is incomplete. Outputs are written as
//! [`crate::io`] describes: atomically, never over the input.

use crate::io::{decode_f32, encode_f32, Input, Output, CHUNK_BYTES};
use crate::Error;
use rotq_reference::{KvFormat, RotationSpec};
use std::path::Path;

/// How far a file command has got: bytes of input read, and the input's size when known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Input bytes read and converted so far.
    pub done: u64,
    /// The input's size (`None`: a pipe or standard input, known only at the end).
    pub total: Option<u64>,
}

/// How a command's input splits into independent units (blocks or rows) and rows.
struct Layout {
    /// Bytes of one input unit (the unit of conversion: a block, or a row for rotations).
    unit_in: usize,
    /// Bytes of one output unit.
    unit_out: usize,
    /// Bytes of one input row (a whole number of units).
    row_in: u64,
    /// The rows, in words, for errors ("rows of 32 f32 values (128 bytes each)").
    rows: String,
}

impl Layout {
    /// Units per chunk: as many as fit in [`CHUNK_BYTES`] of input and of output, at least one.
    fn units_per_chunk(&self) -> usize {
        (CHUNK_BYTES / self.unit_in.max(self.unit_out)).max(1)
    }

    fn not_whole_rows(&self, input: &Path, bytes: u64) -> Error {
        Error::Input(format!(
            "{}: {bytes} bytes are not a whole, non-zero number of {}",
            input.display(),
            self.rows
        ))
    }

    fn check_len(&self, input: &Path, bytes: u64) -> Result<u64, Error> {
        if bytes == 0 || !bytes.is_multiple_of(self.row_in) {
            return Err(self.not_whole_rows(input, bytes));
        }
        Ok(bytes / self.row_in)
    }
}

/// Bytes of `n` values of `size` bytes, or an error naming the option that asked for them.
fn bytes_of(n: usize, size: usize, option: &str) -> Result<usize, Error> {
    n.checked_mul(size).ok_or_else(|| {
        Error::Input(format!(
            "{option} {n}: a row of that many values does not fit in memory"
        ))
    })
}

/// Streams `input` to `output` chunk by chunk, `convert` turning whole units of input into
/// their output (appended to the `Vec`, which is cleared before each chunk). Returns the rows.
fn stream(
    layout: &Layout,
    input: &Path,
    output: &Path,
    progress: &mut dyn FnMut(Progress),
    convert: impl FnMut(&[u8], &mut Vec<u8>) -> Result<(), Error>,
) -> Result<u64, Error> {
    let mut input = Input::open(input)?;
    if let Some(len) = input.len() {
        // A regular file: refused for its size before anything is read or written.
        layout.check_len(input.name(), len)?;
    }
    let mut output = Output::create(output, &input)?;
    match convert_all(layout, &mut input, &mut output, progress, convert) {
        Ok(rows) => {
            output.commit()?;
            Ok(rows)
        }
        // Whatever failed, mid-stream or at the end: an atomic output is discarded with its
        // temporary file; the others have the rows converted so far, and the error says so.
        Err(e) => Err(output.fail(e)),
    }
}

/// The loop of [`stream`]: reads, converts and writes every chunk, then checks the input's
/// length. Returns the rows.
fn convert_all(
    layout: &Layout,
    input: &mut Input,
    output: &mut Output,
    progress: &mut dyn FnMut(Progress),
    mut convert: impl FnMut(&[u8], &mut Vec<u8>) -> Result<(), Error>,
) -> Result<u64, Error> {
    let total = input.len();
    let chunk = layout.units_per_chunk() * layout.unit_in;
    let (mut buf, mut out) = (vec![0u8; chunk], Vec::with_capacity(chunk));
    // Input bytes read but not converted yet: a partial unit at the end of a read.
    let (mut held, mut done) = (0usize, 0u64);
    loop {
        let space = buf.len() - held; // positive: `held` is less than one unit
        let n = input.read_chunk(&mut buf[held..])?;
        done += n as u64;
        let available = held + n;
        let whole = available - available % layout.unit_in;
        if whole > 0 {
            out.clear();
            convert(&buf[..whole], &mut out)?;
            output.write_all(&out)?;
            // What did not make a whole unit moves to the front.
            buf.copy_within(whole..available, 0);
            progress(Progress { done, total });
        }
        held = available - whole;
        if n < space {
            break; // `read_chunk` stops short only at the end of the input
        }
    }
    let rows = layout.check_len(input.name(), done)?;
    match total {
        Some(len) if len != done => Err(Error::Input(format!(
            "{}: changed while it was read ({len} bytes, then {done})",
            input.name().display()
        ))),
        _ => Ok(rows),
    }
}

/// Quantizes a raw f32 file of rows of `row_len` into `format`'s blocks, laid out exactly as
/// ggml lays them out in memory (rows back to back). `input` or `output` may be `-` (standard
/// input or output). `progress` is called after each chunk. Returns the number of rows.
///
/// ```
/// use rotq::KvFormat;
/// use rotq_cli::files;
/// let dir = tempfile::tempdir().unwrap();
/// let (x, q) = (dir.path().join("x.f32"), dir.path().join("x.q8_0"));
/// let values: Vec<f32> = (0..64).map(|i| i as f32 / 8.0).collect();
/// rotq_cli::io::write_f32_atomic(&x, &values).unwrap();
/// assert_eq!(files::quantize(KvFormat::Q8_0, 32, &x, &q, &mut |_| {}).unwrap(), 2);
/// assert_eq!(std::fs::metadata(&q).unwrap().len(), 2 * 34);
/// ```
pub fn quantize(
    format: KvFormat,
    row_len: usize,
    input: &Path,
    output: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<u64, Error> {
    format.check_row_len(row_len)?;
    let row_in = bytes_of(row_len, 4, "--row-len")?;
    let unit = unit_values(format, row_len);
    let layout = Layout {
        unit_in: unit * 4,
        unit_out: format.row_bytes(unit)?,
        row_in: row_in as u64,
        rows: format!("rows of {row_len} f32 values ({row_in} bytes each)"),
    };
    let mut values = Vec::new();
    stream(&layout, input, output, progress, |bytes, out| {
        values.clear();
        values.extend(decode_f32(bytes));
        *out = format.quantize_rows(&values, unit)?;
        Ok(())
    })
}

/// The values a chunk of the stream is a whole number of: a block, or for the TurboQuant row
/// formats (whose codes depend on the whole row) a row.
fn unit_values(format: KvFormat, row_len: usize) -> usize {
    if format.is_row() {
        row_len
    } else {
        format.block_size()
    }
}

/// Dequantizes a file of `format` rows (each `row_len` values) back to raw f32.
/// `input` or `output` may be `-`. Returns the number of rows.
///
/// ```
/// use rotq::KvFormat;
/// use rotq_cli::files;
/// let dir = tempfile::tempdir().unwrap();
/// let (x, q, y) = (dir.path().join("x"), dir.path().join("q"), dir.path().join("y"));
/// let values: Vec<f32> = (0..128).map(|i| i as f32 / 4.0).collect(); // exact in f16
/// rotq_cli::io::write_f32_atomic(&x, &values).unwrap();
/// files::quantize(KvFormat::F16, 64, &x, &q, &mut |_| {}).unwrap();
/// assert_eq!(files::dequantize(KvFormat::F16, 64, &q, &y, &mut |_| {}).unwrap(), 2);
/// assert_eq!(rotq_cli::io::read_f32(&y).unwrap(), values);
/// ```
pub fn dequantize(
    format: KvFormat,
    row_len: usize,
    input: &Path,
    output: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<u64, Error> {
    let row_bytes = format.row_bytes(row_len)?;
    let unit = unit_values(format, row_len);
    let layout = Layout {
        unit_in: format.row_bytes(unit)?,
        unit_out: unit * 4,
        row_in: row_bytes as u64,
        rows: format!("{format} rows of {row_len} values ({row_bytes} bytes each)"),
    };
    stream(&layout, input, output, progress, |bytes, out| {
        let values = format.dequantize_rows(bytes, unit)?;
        encode_f32(values.iter().copied(), out);
        Ok(())
    })
}

/// Rotates every row of `dim` values of a raw f32 file (in f64, rounded to f32 on output).
/// `input` or `output` may be `-`. Returns the number of rows.
///
/// ```
/// use rotq::RotationSpec;
/// use rotq_cli::files;
/// let dir = tempfile::tempdir().unwrap();
/// let (x, y, z) = (dir.path().join("x"), dir.path().join("y"), dir.path().join("z"));
/// rotq_cli::io::write_f32_atomic(&x, &[1.0, 2.0, 3.0, 4.0]).unwrap();
/// files::rotate(RotationSpec::Randomized(3), 4, false, &x, &y, &mut |_| {}).unwrap();
/// files::rotate(RotationSpec::Randomized(3), 4, true, &y, &z, &mut |_| {}).unwrap();
/// let back = rotq_cli::io::read_f32(&z).unwrap();
/// assert!(back.iter().zip([1.0, 2.0, 3.0, 4.0]).all(|(a, b)| (a - b).abs() < 1e-6));
/// ```
pub fn rotate(
    spec: RotationSpec,
    dim: usize,
    inverse: bool,
    input: &Path,
    output: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<u64, Error> {
    let rotation = spec.build(dim)?.ok_or_else(|| {
        Error::Input("--rotation none leaves the data as it is: nothing to write".into())
    })?;
    let row_in = bytes_of(dim, 4, "--dim")?;
    let layout = Layout {
        unit_in: row_in,
        unit_out: row_in,
        row_in: row_in as u64,
        rows: format!("rows of {dim} f32 values ({row_in} bytes each)"),
    };
    let mut data = Vec::new();
    stream(&layout, input, output, progress, |bytes, out| {
        data.clear();
        data.extend(decode_f32(bytes).map(f64::from));
        rotation.rotate_rows(&mut data, inverse)?;
        encode_f32(data.iter().map(|v| *v as f32), out);
        Ok(())
    })
}
