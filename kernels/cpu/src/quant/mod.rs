//! Fused rotate-quantize into a KV cache, and dequantize (+ inverse rotation) out of it.
//!
//! One pass per row: the row is read once (f32, f16 or bf16), widened into a thread-local f32
//! buffer that stays in L1, rotated there, and its blocks are written straight into the cache
//! at the row's offset. f32/f16/bf16 convert in tight loops (F16C on AVX2 machines); q8_0 and
//! q4_0 have AVX2 and NEON block codecs; the other block formats (and the portable path) use the
//! oracle's block codec, which is already scalar code. Either way the
//! bytes are those of `rotq_reference::KvFormat::quantize_row` on the rotated f32 row.

mod avx2;
mod neon;
pub(crate) mod turbo;

use crate::fwht::CpuRotation;
use crate::isa::Isa;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;
use rotq_reference::rope::Rope;
use rotq_reference::{Error, KvFormat, Result, Rotation};
use serde::{Deserialize, Serialize};

/// A storage type of rows: widened to f32 for arithmetic, rounded back (nearest even).
pub trait Element: Copy + Send + Sync {
    /// Converts `src` into `dst` (same length).
    fn widen(src: &[Self], dst: &mut [f32]);
    /// Converts `src` back into `dst` (same length), rounding to nearest even.
    fn narrow(src: &[f32], dst: &mut [Self]);
    /// The rows themselves where they are f32 already (kernels then work in place, with no
    /// copy through a widened row).
    fn as_f32_mut(data: &mut [Self]) -> Option<&mut [f32]> {
        let _ = data;
        None
    }
}

impl Element for f32 {
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    fn narrow(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    fn as_f32_mut(data: &mut [f32]) -> Option<&mut [f32]> {
        Some(data)
    }
}

impl Element for f16 {
    fn widen(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }

    fn narrow(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }
}

impl Element for bf16 {
    fn widen(src: &[bf16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }

    fn narrow(src: &[f32], dst: &mut [bf16]) {
        dst.convert_from_f32_slice(src);
    }
}

/// Calls of at most this many rows run on the calling thread: waking rayon's workers from a
/// thread outside the pool cost 20–80 µs on the 2-core development machine (a codec call of 65
/// rows took 25–83 µs where one of 64, a single task, took 5–9 µs), the work of about 200–700
/// rows; a decode step's append is tens of rows.
const SERIAL_ROWS: usize = 256;

/// Tuning knobs of rotate-quantize and dequantize.
///
/// ```
/// let c = rotq_cpu::QuantizeConfig::default();
/// assert!(rotq_cpu::QuantizeConfig::search_space().contains(&c));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuantizeConfig {
    /// Rows handed to a thread at a time.
    pub rows_per_task: usize,
}

impl Default for QuantizeConfig {
    fn default() -> Self {
        Self { rows_per_task: 64 }
    }
}

impl QuantizeConfig {
    /// Candidates for the autotuner.
    pub fn search_space() -> Vec<Self> {
        [8, 16, 32, 64, 128, 256, 512]
            .into_iter()
            .map(|rows_per_task| Self { rows_per_task })
            .collect()
    }
}

/// A SIMD block quantizer of `format` for `isa` (q8_0 and q4_0 on AVX2 and NEON), if any.
/// It returns false, writing nothing, for a block it leaves to the oracle's codec.
type BlockQuantizer = unsafe fn(&[f32], &mut [u8]) -> bool;

fn simd_block_quantizer(format: KvFormat, isa: Isa) -> Option<BlockQuantizer> {
    match (format, isa) {
        #[cfg(target_arch = "x86_64")]
        (KvFormat::Q8_0, Isa::Avx2) => Some(avx2::quantize_q8_0),
        #[cfg(target_arch = "x86_64")]
        (KvFormat::Q4_0, Isa::Avx2) => Some(avx2::quantize_q4_0),
        #[cfg(target_arch = "aarch64")]
        (KvFormat::Q8_0, Isa::Neon) => Some(neon::quantize_q8_0),
        #[cfg(target_arch = "aarch64")]
        (KvFormat::Q4_0, Isa::Neon) => Some(neon::quantize_q4_0),
        _ => None,
    }
}

/// Quantizes one f32 row into `out` with the fastest codec for `format`.
pub(crate) fn quantize_row(format: KvFormat, x: &[f32], out: &mut [u8], isa: Isa) {
    match (format, isa) {
        (KvFormat::F32, _) => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        // SAFETY: Isa::Avx2 is only used when the CPU has it; out holds 2 bytes per value.
        #[cfg(target_arch = "x86_64")]
        (KvFormat::F16, Isa::Avx2) => unsafe { avx2::quantize_f16(x, out) },
        (KvFormat::F16, _) => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        (KvFormat::Bf16, _) => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        _ if format.row_format().is_some() => {
            turbo::quantize(format.row_format().expect("checked"), x, out, isa)
        }
        _ if simd_block_quantizer(format, isa).is_some() => {
            let block_fn = simd_block_quantizer(format, isa).expect("checked by the guard");
            for (xb, ob) in x
                .chunks_exact(32)
                .zip(out.chunks_exact_mut(format.block_bytes()))
            {
                // SAFETY: the quantizer is for `isa`, which is only used when the CPU has it;
                // 32 values and one block of bytes.
                if !unsafe { block_fn(xb, ob) } {
                    // NaN/Inf or a subnormal scale: the oracle's codec writes the block.
                    format
                        .quantize_into(xb, ob)
                        .expect("one block has the right lengths");
                }
            }
        }
        _ => format
            .quantize_into(x, out)
            .expect("callers pass whole rows and buffers of the right size"),
    }
}

/// Dequantizes one row of `format` into `out` with the fastest codec.
#[inline(always)]
pub(crate) fn dequantize_row(format: KvFormat, bytes: &[u8], out: &mut [f32], isa: Isa) {
    match (format, isa) {
        (KvFormat::F32, _) => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: (every Avx2 arm) Isa::Avx2 is only used when the CPU has it, and the
        // callers pass whole rows (2 bytes per value, or whole blocks).
        (KvFormat::F16, Isa::Avx2) => unsafe { avx2::dequantize_f16(bytes, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (KvFormat::Bf16, Isa::Avx2) => unsafe { avx2::dequantize_bf16(bytes, out) },
        (KvFormat::F16, _) => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        (KvFormat::Bf16, _) => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        (KvFormat::Q8_0, Isa::Avx2) => unsafe { avx2::dequantize_row_q8_0(bytes, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        (KvFormat::Q4_0, Isa::Avx2) => unsafe { avx2::dequantize_row_q4_0(bytes, out) },
        // SAFETY: as above, for NEON.
        #[cfg(target_arch = "aarch64")]
        (KvFormat::Q8_0, Isa::Neon) => unsafe { neon::dequantize_row_q8_0(bytes, out) },
        // SAFETY: as above, for NEON.
        #[cfg(target_arch = "aarch64")]
        (KvFormat::Q4_0, Isa::Neon) => unsafe { neon::dequantize_row_q4_0(bytes, out) },
        _ => match format.row_format() {
            Some(row) => turbo::dequantize(row, bytes, out),
            None => format
                .dequantize_into(bytes, out)
                .expect("callers pass whole rows and buffers of the right size"),
        },
    }
}

/// Rotate-quantize (and its inverse) for one format, rotation and row length.
///
/// `Send` and `Sync`: threads may share one codec and encode into, decode from and shift
/// their own buffers at once.
///
/// ```
/// use rotq_cpu::{CacheCodec, Isa};
/// use rotq_reference::{KvFormat, Rotation};
/// let r = Rotation::hadamard(64).unwrap();
/// let codec = CacheCodec::new(KvFormat::Q8_0, 64, Some(&r), Isa::best()).unwrap();
/// let rows: Vec<f32> = (0..3 * 64).map(|i| (i as f32 * 0.1).sin()).collect();
/// let mut cache = vec![0u8; 5 * codec.row_bytes()];
/// codec.quantize(&rows, &mut cache, 2).unwrap(); // rows 2, 3, 4 of the cache
/// let mut back = vec![0f32; 3 * 64];
/// codec.dequantize(&cache[2 * codec.row_bytes()..], &mut back).unwrap();
/// assert!(rows.iter().zip(&back).all(|(a, b)| (a - b).abs() < 0.05));
/// ```
#[derive(Clone, Debug)]
pub struct CacheCodec {
    format: KvFormat,
    dim: usize,
    row_bytes: usize,
    rotation: Option<CpuRotation>,
    isa: Isa,
    config: QuantizeConfig,
}

impl CacheCodec {
    /// A codec for rows of `dim` values stored as `format`, rotated by `rotation` first.
    pub fn new(
        format: KvFormat,
        dim: usize,
        rotation: Option<&Rotation>,
        isa: Isa,
    ) -> Result<Self> {
        let row_bytes = format.row_bytes(dim)?;
        if let Some(r) = rotation {
            if r.dim() != dim {
                return Err(Error::LengthMismatch {
                    what: "rotation dimension",
                    expected: dim,
                    actual: r.dim(),
                });
            }
        }
        let isa = if isa.available() { isa } else { Isa::Portable };
        let kernel = format!("rotate_quantize_{format}");
        let config = crate::tuned::lookup(
            &kernel,
            &crate::tuned::quantize_bucket(dim),
            &QuantizeConfig::search_space(),
        )
        .unwrap_or_default();
        Ok(Self {
            format,
            dim,
            row_bytes,
            rotation: rotation.map(|r| CpuRotation::new(r, isa)),
            isa,
            config: QuantizeConfig::default(),
        }
        .with_config(config))
    }

    /// The tuning in force: the tuning cache's for this format and row length, the default,
    /// or the last [`Self::with_config`].
    pub fn config(&self) -> QuantizeConfig {
        self.config
    }

    /// The same codec with another tuning.
    pub fn with_config(mut self, config: QuantizeConfig) -> Self {
        // Clamped so that a stray (deserialized) value cannot overflow the task size.
        self.config = QuantizeConfig {
            rows_per_task: config.rows_per_task.clamp(1, 1 << 20),
        };
        self
    }

    /// Rows per task, small enough that a task's values and bytes fit in `usize`.
    fn rows_per_task(&self) -> usize {
        let widest = self.dim.max(self.row_bytes).max(1);
        self.config
            .rows_per_task
            .min(usize::MAX / 2 / widest)
            .max(1)
    }

    /// Bytes of one encoded row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// The format.
    pub fn format(&self) -> KvFormat {
        self.format
    }

    /// Rotates and quantizes every row of `rows` (a whole number of rows of `dim`) into
    /// `cache`, starting at row `first_row` of the cache.
    pub fn quantize<T: Element>(
        &self,
        rows: &[T],
        cache: &mut [u8],
        first_row: usize,
    ) -> Result<()> {
        if !rows.len().is_multiple_of(self.dim) {
            return Err(Error::LengthMismatch {
                what: "rows (a multiple of the row length)",
                expected: rows.len().div_ceil(self.dim) * self.dim,
                actual: rows.len(),
            });
        }
        let n_rows = rows.len() / self.dim;
        let start = first_row
            .checked_mul(self.row_bytes)
            .ok_or(Error::Overflow("cache offset"))?;
        let end = (first_row + n_rows)
            .checked_mul(self.row_bytes)
            .ok_or(Error::Overflow("cache offset"))?;
        if end > cache.len() {
            return Err(Error::LengthMismatch {
                what: "cache (too small for the rows at this offset)",
                expected: end,
                actual: cache.len(),
            });
        }
        let encode = |out: &mut [u8], input: &[T]| {
            // One row buffer per task: it stays in L1 while the row is rotated and encoded.
            let mut buf = vec![0.0f32; self.dim];
            for (o, x) in out
                .chunks_exact_mut(self.row_bytes)
                .zip(input.chunks_exact(self.dim))
            {
                T::widen(x, &mut buf);
                if let Some(r) = &self.rotation {
                    r.apply_row(&mut buf, false);
                }
                quantize_row(self.format, &buf, o, self.isa);
            }
        };
        if n_rows <= SERIAL_ROWS {
            encode(&mut cache[start..end], rows);
            return Ok(());
        }
        let task = self.rows_per_task();
        cache[start..end]
            .par_chunks_mut(task * self.row_bytes)
            .zip(rows.par_chunks(task * self.dim))
            .for_each(|(out, input)| encode(out, input));
        Ok(())
    }

    /// The context shift of whole rows of `cache` (keys quantized by this codec): every row
    /// moves by `delta` positions under `rope`. Fused per row, as the oracle's
    /// [`rotq_reference::rope::shift_cache`] specifies: dequantize, rotate back, shift each
    /// RoPE pair, rotate again and re-quantize in place. A `cache` that is not whole rows is an
    /// error and is left untouched.
    ///
    /// ```
    /// use rotq_cpu::{CacheCodec, Isa};
    /// use rotq_reference::rope::{Rope, RopeVariant};
    /// use rotq_reference::{KvFormat, Rotation};
    /// let r = Rotation::hadamard(64).unwrap();
    /// let codec = CacheCodec::new(KvFormat::Q8_0, 64, Some(&r), Isa::best()).unwrap();
    /// let rows: Vec<f32> = (0..4 * 64).map(|i| (i as f32 * 0.37).cos()).collect();
    /// let mut cache = vec![0u8; 4 * codec.row_bytes()];
    /// codec.quantize(&rows, &mut cache, 0).unwrap();
    /// codec.shift(&mut cache, &Rope::new(RopeVariant::Normal, 64), -7).unwrap();
    /// ```
    pub fn shift(&self, cache: &mut [u8], rope: &Rope, delta: i64) -> Result<()> {
        rope.check(self.dim)?;
        if !cache.len().is_multiple_of(self.row_bytes) {
            return Err(Error::TruncatedBuffer {
                format: self.format.name(),
                row_bytes: self.row_bytes,
                actual: cache.len(),
            });
        }
        let angles = rope.angles(delta);
        let task = self.rows_per_task();
        cache
            .par_chunks_mut(task * self.row_bytes)
            .for_each(|chunk| {
                let mut row = vec![0.0f32; self.dim];
                for rb in chunk.chunks_exact_mut(self.row_bytes) {
                    dequantize_row(self.format, rb, &mut row, self.isa);
                    if let Some(r) = &self.rotation {
                        r.apply_row(&mut row, true);
                    }
                    for (i, &(c, s)) in angles.iter().enumerate() {
                        let (a, b) = rope.pair(i);
                        let (x, y) = (f64::from(row[a]), f64::from(row[b]));
                        row[a] = (x * c - y * s) as f32;
                        row[b] = (x * s + y * c) as f32;
                    }
                    if let Some(r) = &self.rotation {
                        r.apply_row(&mut row, false);
                    }
                    quantize_row(self.format, &row, rb, self.isa);
                }
            });
        Ok(())
    }

    /// Dequantizes whole rows of `cache` into `out` (as many rows as `out` holds) and undoes
    /// the rotation.
    pub fn dequantize(&self, cache: &[u8], out: &mut [f32]) -> Result<()> {
        if !out.len().is_multiple_of(self.dim) {
            return Err(Error::LengthMismatch {
                what: "output (a multiple of the row length)",
                expected: out.len().div_ceil(self.dim) * self.dim,
                actual: out.len(),
            });
        }
        let bytes = out.len() / self.dim * self.row_bytes;
        if cache.len() < bytes {
            return Err(Error::TruncatedBuffer {
                format: self.format.name(),
                row_bytes: self.row_bytes,
                actual: cache.len(),
            });
        }
        let task = self.rows_per_task();
        out.par_chunks_mut(task * self.dim)
            .zip(cache[..bytes].par_chunks(task * self.row_bytes))
            .for_each(|(o, b)| {
                for (row, rb) in o
                    .chunks_exact_mut(self.dim)
                    .zip(b.chunks_exact(self.row_bytes))
                {
                    dequantize_row(self.format, rb, row, self.isa);
                    if let Some(r) = &self.rotation {
                        r.apply_row(row, true);
                    }
                }
            });
        Ok(())
    }
}
