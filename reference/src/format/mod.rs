//! KV-cache formats: one registry describing every format (block size, bytes per block,
//! quantize, dequantize, worst-case error).
//!
//! A row of `row_len` values (a multiple of the block size) is stored as `row_len / block_size`
//! consecutive blocks, exactly as ggml lays them out in memory; rows are concatenated.
//!
//! | format | block | bytes | bits/value | origin |
//! |---|---|---|---|---|
//! | f32 | 1 | 4 | 32 | IEEE binary32, little-endian |
//! | f16 | 1 | 2 | 16 | IEEE binary16, round to nearest even |
//! | bf16 | 1 | 2 | 16 | bfloat16, round to nearest even |
//! | q8_0 | 32 | 34 | 8.5 | ggml, byte-exact |
//! | q4_0 | 32 | 18 | 4.5 | ggml, byte-exact |
//! | q4_1 | 32 | 20 | 5 | ggml, byte-exact |
//! | q5_0 | 32 | 22 | 5.5 | ggml, byte-exact |
//! | q5_1 | 32 | 24 | 6 | ggml, byte-exact |
//! | iq4_nl | 32 | 18 | 4.5 | ggml (`quantize_iq4_nl`, no importance weights), byte-exact |
//! | q6_0 | 32 | 26 | 6.5 | ik_llama.cpp |
//! | int4 | 32 | 18 | 4.5 | rotq ([`int4`](self#int4) layout below) |
//! | fp8_e4m3 | 32 | 36 | 9 | rotq ([`fp8`] layout) |
//! | tq2, tq3, tq4 | row | `⌈d b / 8⌉ + 2` | 2.125, 3.125, 4.125 at d = 128 | rotq TurboQuant-MSE ([`crate::turboquant::formats`]) |
//! | tq2_qjl, tq3_qjl, tq4_qjl | row | `⌈d (b−1) / 8⌉ + d / 8 + 4` | 2.25, 3.25, 4.25 at d = 128 | rotq TurboQuant-prod (same) |
//! | vllm_fp8, vllm_k4, vllm_k3 | row | `d`, `⌈d b / 8⌉ + 2` | 8, 4.125, 3.125 at d = 128 | vLLM's slot key parts ([`crate::turboquant::vllm::Part`]) |
//! | vllm_v4, vllm_v3 | row | `⌈d b / 8⌉ + 4` | 4.25, 3.25 at d = 128 | vLLM's slot value parts (same) |
//!
//! ## Row formats
//! The TurboQuant formats (rotq's `tq*`, and the parts of vLLM's slots, `vllm_*`) store a
//! whole head row (its norm, its codebook's indices and, with QJL, the residual's sketch), not
//! independent 32-value blocks: their codebook and their cost depend on the row's length `d`
//! (a multiple of 8, at most 4096; 1024 with QJL; a power of two for vLLM's keys). For them
//! [`KvFormat::block_size`] is 8 (the granularity of `d`), [`KvFormat::block_bytes`] is 0, and
//! the one-row methods ([`KvFormat::quantize_into`], [`KvFormat::dequantize_into`], …) take
//! exactly **one** row; [`KvFormat::quantize_rows`] and [`KvFormat::dequantize_rows`] take any
//! number of rows of a stated length, for every format.
//!
//! ## int4
//! Symmetric, scale `amax/7` stored as f16, codes `round_half_even(x/s)` in `[−7, 7]` stored as
//! `q + 8`, packed in consecutive pairs (value `2i` low nibble of byte `2 + i`).
//!
//! ## Non-finite input
//! ggml leaves NaN/Inf undefined (its float → int casts are undefined behaviour there). rotq
//! defines it: a block of a scaled format (everything but f32/f16/bf16) that holds any NaN or
//! ±Inf is **poisoned**: its scale (and min) fields are written as NaN and its codes as 0, so
//! the whole block dequantizes to NaN and the bad value is visible downstream, never silently
//! replaced. f32, f16 and bf16 convert value by value (NaN stays NaN, ±Inf stays ±Inf; f16
//! overflows to ±Inf above 65504 as IEEE rounding says).
//!
//! Finite inputs whose scale overflows f16 (|x| above about 65504 times the format's largest
//! code) dequantize to ±Inf/NaN exactly as in ggml; [`KvFormat::error_bound`] is infinite there.

mod float;
pub mod fp8;
mod ggml;
mod int4;
pub mod iq4_nl;
mod q6_0;
mod scalar;

use crate::error::{Error, Result};
use crate::turboquant::formats::RowFormat;
use crate::turboquant::vllm::Part;
use crate::turboquant::MAX_DIM;
use std::fmt;
use std::str::FromStr;

/// A KV-cache storage format.
///
/// ```
/// use rotq_reference::KvFormat;
/// let f: KvFormat = "q4_0".parse().unwrap();
/// let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
/// let bytes = f.quantize_row(&x).unwrap();
/// assert_eq!(bytes.len(), f.row_bytes(64).unwrap()); // 2 blocks × 18 bytes
/// let y = f.dequantize_row(&bytes).unwrap();
/// assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 0.15));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KvFormat {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
    /// ggml q8_0.
    Q8_0,
    /// ggml q4_0.
    Q4_0,
    /// ggml q4_1.
    Q4_1,
    /// ggml q5_0.
    Q5_0,
    /// ggml q5_1.
    Q5_1,
    /// ggml iq4_nl.
    Iq4Nl,
    /// ik_llama.cpp q6_0.
    Q6_0,
    /// rotq int4 (symmetric, f16 scale per 32).
    Int4,
    /// rotq fp8 E4M3 (f32 scale per 32).
    Fp8E4m3,
    /// TurboQuant-MSE, 2 bits (a row format).
    Tq2,
    /// TurboQuant-MSE, 3 bits (a row format).
    Tq3,
    /// TurboQuant-MSE, 4 bits (a row format).
    Tq4,
    /// TurboQuant-prod, 1-bit MSE and a 1-bit QJL sketch (a row format).
    Tq2Qjl,
    /// TurboQuant-prod, 2-bit MSE and a 1-bit QJL sketch (a row format).
    Tq3Qjl,
    /// TurboQuant-prod, 3-bit MSE and a 1-bit QJL sketch (a row format).
    Tq4Qjl,
    /// vLLM's FP8 key part (`turboquant_k8v4`; a row format).
    VllmFp8,
    /// vLLM's 4-bit codebook key part (`turboquant_4bit_nc`; a row format).
    VllmK4,
    /// vLLM's 3-bit codebook key part (`turboquant_k3v4_nc`, `turboquant_3bit_nc`).
    VllmK3,
    /// vLLM's 4-bit min-max value part (`turboquant_k8v4`, `_4bit_nc`, `_k3v4_nc`).
    VllmV4,
    /// vLLM's 3-bit min-max value part (`turboquant_3bit_nc`).
    VllmV3,
}

/// How a row format codes its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RowCodec {
    /// rotq's TurboQuant formats.
    TurboQuant(RowFormat),
    /// One part of vLLM's TurboQuant slots, byte for byte.
    Vllm(Part),
}

impl RowCodec {
    /// Bytes of a row of `d` values.
    fn row_bytes(self, d: usize) -> Result<usize> {
        match self {
            RowCodec::TurboQuant(f) => f.row_bytes(d),
            RowCodec::Vllm(p) => p.row_bytes(d),
        }
    }

    /// One row's bytes into `out` (its size checked).
    fn quantize(self, x: &[f32], out: &mut [u8]) -> Result<()> {
        match self {
            RowCodec::TurboQuant(f) => {
                out.copy_from_slice(&f.quantize_row(x)?);
                Ok(())
            }
            // rotq's rule on non-finite input (never a silently finite row) where vLLM's
            // kernels leave it open: a row with NaN or ±∞ is stored so that it decodes to NaN.
            RowCodec::Vllm(p) if !scalar::all_finite(x) => {
                p.row_bytes(x.len())?;
                p.poison(out);
                Ok(())
            }
            RowCodec::Vllm(p) => p.encode(x, out),
        }
    }

    /// The `d` values of one row's bytes.
    fn dequantize(self, bytes: &[u8], d: usize) -> Result<Vec<f32>> {
        match self {
            RowCodec::TurboQuant(f) => f.dequantize_row(bytes, d),
            RowCodec::Vllm(p) => p.decode(bytes, d),
        }
    }
}

/// What the registry knows of a format.
#[non_exhaustive]
#[derive(Debug)]
pub struct FormatInfo {
    /// The format.
    pub format: KvFormat,
    /// Its name on the command line and in files (`q4_0`, …).
    pub name: &'static str,
    /// Values per block.
    pub block_size: usize,
    /// Bytes per block.
    pub block_bytes: usize,
    /// Where the layout comes from.
    pub origin: &'static str,
    /// Whether it carries scales, per block or (the row formats) per row, so that a NaN or an
    /// infinity poisons its whole block or row.
    pub scaled: bool,
    /// How a row format codes its rows (module docs); `None` for the block formats.
    pub row: Option<RowCodec>,
    codec: Option<Codec>,
}

/// The functions behind a format, each over one block.
#[derive(Debug)]
struct Codec {
    quantize: fn(&[f32], &mut [u8]),
    dequantize: fn(&[u8], &mut [f32]),
    /// Writes the encoding of a block holding NaN/Inf (scaled formats only).
    poison: fn(&mut [u8]),
    /// Worst-case error of a finite block, before the f32 slack.
    bound: fn(&[f32], &[u8]) -> f64,
}

fn poison_one_scale(b: &mut [u8]) {
    ggml::poison(b, 1);
}

fn poison_two_scales(b: &mut [u8]) {
    ggml::poison(b, 2);
}

fn no_poison(_: &mut [u8]) {}

const fn entry(
    format: KvFormat,
    name: &'static str,
    block_size: usize,
    block_bytes: usize,
    origin: &'static str,
    codec: Codec,
) -> FormatInfo {
    FormatInfo {
        format,
        name,
        block_size,
        block_bytes,
        origin,
        scaled: block_size > 1,
        row: None,
        codec: Some(codec),
    }
}

const fn row_entry(format: KvFormat, name: &'static str, row: RowFormat) -> FormatInfo {
    FormatInfo {
        format,
        name,
        block_size: 8,
        block_bytes: 0,
        origin: "rotq TurboQuant",
        scaled: true,
        row: Some(RowCodec::TurboQuant(row)),
        codec: None,
    }
}

const fn vllm_entry(format: KvFormat, name: &'static str, part: Part) -> FormatInfo {
    FormatInfo {
        format,
        name,
        block_size: 8,
        block_bytes: 0,
        origin: "vLLM TurboQuant slot part",
        scaled: true,
        row: Some(RowCodec::Vllm(part)),
        codec: None,
    }
}

const fn codec(
    quantize: fn(&[f32], &mut [u8]),
    dequantize: fn(&[u8], &mut [f32]),
    poison: fn(&mut [u8]),
    bound: fn(&[f32], &[u8]) -> f64,
) -> Codec {
    Codec {
        quantize,
        dequantize,
        poison,
        bound,
    }
}

/// The registry, in [`KvFormat`] declaration order.
static REGISTRY: [FormatInfo; 23] = {
    use KvFormat::*;
    const QK: usize = ggml::QK;
    [
        entry(
            F32,
            "f32",
            1,
            4,
            "IEEE binary32",
            codec(
                float::quantize_f32,
                float::dequantize_f32,
                no_poison,
                float::bound_f32,
            ),
        ),
        entry(
            F16,
            "f16",
            1,
            2,
            "IEEE binary16",
            codec(
                float::quantize_f16,
                float::dequantize_f16,
                no_poison,
                float::bound_f16,
            ),
        ),
        entry(
            Bf16,
            "bf16",
            1,
            2,
            "bfloat16",
            codec(
                float::quantize_bf16,
                float::dequantize_bf16,
                no_poison,
                float::bound_bf16,
            ),
        ),
        entry(
            Q8_0,
            "q8_0",
            QK,
            34,
            "ggml",
            codec(
                ggml::quantize_q8_0,
                ggml::dequantize_q8_0,
                poison_one_scale,
                ggml::q8_0_bound,
            ),
        ),
        entry(
            Q4_0,
            "q4_0",
            QK,
            18,
            "ggml",
            codec(
                ggml::quantize_q4_0,
                ggml::dequantize_q4_0,
                poison_one_scale,
                ggml::q4_0_bound,
            ),
        ),
        entry(
            Q4_1,
            "q4_1",
            QK,
            20,
            "ggml",
            codec(
                ggml::quantize_q4_1,
                ggml::dequantize_q4_1,
                poison_two_scales,
                ggml::q4_1_bound,
            ),
        ),
        entry(
            Q5_0,
            "q5_0",
            QK,
            22,
            "ggml",
            codec(
                ggml::quantize_q5_0,
                ggml::dequantize_q5_0,
                poison_one_scale,
                ggml::q5_0_bound,
            ),
        ),
        entry(
            Q5_1,
            "q5_1",
            QK,
            24,
            "ggml",
            codec(
                ggml::quantize_q5_1,
                ggml::dequantize_q5_1,
                poison_two_scales,
                ggml::q5_1_bound,
            ),
        ),
        entry(
            Iq4Nl,
            "iq4_nl",
            QK,
            18,
            "ggml",
            codec(
                iq4_nl::quantize,
                iq4_nl::dequantize,
                poison_one_scale,
                iq4_nl::bound,
            ),
        ),
        entry(
            Q6_0,
            "q6_0",
            QK,
            26,
            "ik_llama.cpp",
            codec(
                q6_0::quantize,
                q6_0::dequantize,
                poison_one_scale,
                q6_0::bound,
            ),
        ),
        entry(
            Int4,
            "int4",
            QK,
            18,
            "rotq",
            codec(
                int4::quantize,
                int4::dequantize,
                poison_one_scale,
                int4::bound,
            ),
        ),
        entry(
            Fp8E4m3,
            "fp8_e4m3",
            QK,
            36,
            "rotq",
            codec(fp8::quantize, fp8::dequantize, fp8::poison, fp8::bound),
        ),
        row_entry(Tq2, "tq2", RowFormat::Mse { bits: 2 }),
        row_entry(Tq3, "tq3", RowFormat::Mse { bits: 3 }),
        row_entry(Tq4, "tq4", RowFormat::Mse { bits: 4 }),
        row_entry(Tq2Qjl, "tq2_qjl", RowFormat::Prod { bits: 2 }),
        row_entry(Tq3Qjl, "tq3_qjl", RowFormat::Prod { bits: 3 }),
        row_entry(Tq4Qjl, "tq4_qjl", RowFormat::Prod { bits: 4 }),
        vllm_entry(VllmFp8, "vllm_fp8", Part::Fp8Key),
        vllm_entry(VllmK4, "vllm_k4", Part::Key { bits: 4 }),
        vllm_entry(VllmK3, "vllm_k3", Part::Key { bits: 3 }),
        vllm_entry(VllmV4, "vllm_v4", Part::Value { bits: 4 }),
        vllm_entry(VllmV3, "vllm_v3", Part::Value { bits: 3 }),
    ]
};

impl KvFormat {
    /// Every format, in registry order.
    pub const ALL: [KvFormat; 23] = [
        KvFormat::F32,
        KvFormat::F16,
        KvFormat::Bf16,
        KvFormat::Q8_0,
        KvFormat::Q4_0,
        KvFormat::Q4_1,
        KvFormat::Q5_0,
        KvFormat::Q5_1,
        KvFormat::Iq4Nl,
        KvFormat::Q6_0,
        KvFormat::Int4,
        KvFormat::Fp8E4m3,
        KvFormat::Tq2,
        KvFormat::Tq3,
        KvFormat::Tq4,
        KvFormat::Tq2Qjl,
        KvFormat::Tq3Qjl,
        KvFormat::Tq4Qjl,
        KvFormat::VllmFp8,
        KvFormat::VllmK4,
        KvFormat::VllmK3,
        KvFormat::VllmV4,
        KvFormat::VllmV3,
    ];

    /// The block formats: every format but the row formats.
    pub const BLOCKS: [KvFormat; 12] = Self::slice_of_all(0);

    /// rotq's TurboQuant row formats (module docs).
    pub const TURBOQUANT: [KvFormat; 6] = Self::slice_of_all(12);

    /// The parts of vLLM's TurboQuant slots as row formats (module docs).
    pub const VLLM: [KvFormat; 5] = Self::slice_of_all(18);

    /// `N` formats of [`KvFormat::ALL`] from `start` (a `const` slice: the groups above are
    /// runs of `ALL`, so the registry's order stays the one place that defines them).
    const fn slice_of_all<const N: usize>(start: usize) -> [KvFormat; N] {
        let mut out = [KvFormat::F32; N];
        let mut i = 0;
        while i < N {
            out[i] = Self::ALL[start + i];
            i += 1;
        }
        out
    }

    /// The rotq TurboQuant row format behind this format, if it is one (module docs).
    ///
    /// ```
    /// use rotq_reference::KvFormat;
    /// assert!(KvFormat::Tq4.row_format().is_some());
    /// assert!(KvFormat::Q4_0.row_format().is_none());
    /// assert!(KvFormat::VllmK4.row_format().is_none() && KvFormat::VllmK4.is_row());
    /// ```
    pub fn row_format(self) -> Option<RowFormat> {
        match self.info().row {
            Some(RowCodec::TurboQuant(f)) => Some(f),
            _ => None,
        }
    }

    /// Whether this is a row format (a whole row is its unit; module docs).
    pub fn is_row(self) -> bool {
        self.info().row.is_some()
    }

    /// The registry entry.
    ///
    /// ```
    /// let info = rotq_reference::KvFormat::Q5_1.info();
    /// assert_eq!((info.block_size, info.block_bytes), (32, 24));
    /// ```
    pub fn info(self) -> &'static FormatInfo {
        &REGISTRY[self as usize]
    }

    /// The format's name (`q4_0`, …).
    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        self.info().block_size
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.info().block_bytes
    }

    /// Storage cost in bits per value (4.5 for q4_0); for a row format, at rows of 128 values
    /// (see [`Self::bits_per_value_at`]).
    pub fn bits_per_value(self) -> f64 {
        self.bits_per_value_at(128)
            .unwrap_or((8 * self.block_bytes()) as f64 / self.block_size() as f64)
    }

    /// Storage cost in bits per value of rows of `row_len` values.
    ///
    /// ```
    /// use rotq_reference::KvFormat;
    /// assert_eq!(KvFormat::Q4_0.bits_per_value_at(64).unwrap(), 4.5);
    /// assert_eq!(KvFormat::Tq4.bits_per_value_at(64).unwrap(), 4.25);
    /// ```
    pub fn bits_per_value_at(self, row_len: usize) -> Result<f64> {
        Ok((8 * self.row_bytes(row_len)?) as f64 / row_len as f64)
    }

    /// Checks that `row_len` is a positive multiple of the block size (for a row format: a
    /// length its codebook and layout take).
    pub fn check_row_len(self, row_len: usize) -> Result<()> {
        if let Some(row) = self.info().row {
            return row.row_bytes(row_len).map(|_| ());
        }
        let block = self.block_size();
        if row_len == 0 || !row_len.is_multiple_of(block) {
            return Err(Error::RowNotMultipleOfBlock {
                format: self.name(),
                row_len,
                block,
            });
        }
        Ok(())
    }

    /// Bytes of one encoded row of `row_len` values.
    ///
    /// ```
    /// use rotq_reference::KvFormat;
    /// assert_eq!(KvFormat::Q8_0.row_bytes(128).unwrap(), 4 * 34);
    /// assert!(KvFormat::Q8_0.row_bytes(100).is_err());
    /// ```
    pub fn row_bytes(self, row_len: usize) -> Result<usize> {
        if let Some(row) = self.info().row {
            return row.row_bytes(row_len);
        }
        self.check_row_len(row_len)?;
        (row_len / self.block_size())
            .checked_mul(self.block_bytes())
            .ok_or(Error::Overflow("row bytes"))
    }

    /// Quantizes values (a whole number of blocks; for a row format, exactly one row) into
    /// `out` (exactly the encoded size).
    pub fn quantize_into(self, x: &[f32], out: &mut [u8]) -> Result<()> {
        let expected = self.row_bytes(x.len())?;
        if out.len() != expected {
            return Err(Error::LengthMismatch {
                what: "quantized output buffer",
                expected,
                actual: out.len(),
            });
        }
        let info = self.info();
        let Some(codec) = &info.codec else {
            let row = info.row.expect("a format without blocks is a row format");
            return row.quantize(x, out);
        };
        for (xb, ob) in x
            .chunks_exact(info.block_size)
            .zip(out.chunks_exact_mut(info.block_bytes))
        {
            if info.scaled && !scalar::all_finite(xb) {
                (codec.poison)(ob);
            } else {
                (codec.quantize)(xb, ob);
            }
        }
        Ok(())
    }

    /// Quantizes a row (a whole number of blocks; for a row format, exactly one row) into a
    /// new buffer.
    pub fn quantize_row(self, x: &[f32]) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.row_bytes(x.len())?];
        self.quantize_into(x, &mut out)?;
        Ok(out)
    }

    /// Quantizes rows of `row_len` values (any number of them), row by row: what a cache of
    /// any format holds.
    ///
    /// ```
    /// use rotq_reference::KvFormat;
    /// let x: Vec<f32> = (0..3 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
    /// let f = KvFormat::Tq4;
    /// let bytes = f.quantize_rows(&x, 64).unwrap();
    /// assert_eq!(bytes.len(), 3 * f.row_bytes(64).unwrap());
    /// assert_eq!(&bytes[..34], &f.quantize_row(&x[..64]).unwrap()[..]);
    /// let back = f.dequantize_rows(&bytes, 64).unwrap();
    /// assert_eq!(back.len(), x.len());
    /// ```
    pub fn quantize_rows(self, x: &[f32], row_len: usize) -> Result<Vec<u8>> {
        let row_bytes = self.row_bytes(row_len)?;
        if !x.len().is_multiple_of(row_len) {
            return Err(Error::LengthMismatch {
                what: "values (a whole number of rows)",
                expected: x.len().div_ceil(row_len) * row_len,
                actual: x.len(),
            });
        }
        let mut out = vec![0u8; x.len() / row_len * row_bytes];
        for (row, o) in x.chunks_exact(row_len).zip(out.chunks_exact_mut(row_bytes)) {
            self.quantize_into(row, o)?;
        }
        Ok(out)
    }

    /// Dequantizes rows of `row_len` values (any number of them), row by row.
    pub fn dequantize_rows(self, bytes: &[u8], row_len: usize) -> Result<Vec<f32>> {
        let row_bytes = self.row_bytes(row_len)?;
        if !bytes.len().is_multiple_of(row_bytes) {
            return Err(Error::TruncatedBuffer {
                format: self.name(),
                row_bytes,
                actual: bytes.len(),
            });
        }
        let mut out = vec![0f32; bytes.len() / row_bytes * row_len];
        for (b, o) in bytes
            .chunks_exact(row_bytes)
            .zip(out.chunks_exact_mut(row_len))
        {
            self.dequantize_into(b, o)?;
        }
        Ok(out)
    }

    /// Number of values encoded in `bytes` (a whole number of blocks; for a row format, one
    /// row), or an error.
    pub fn values_in(self, bytes: usize) -> Result<usize> {
        let info = self.info();
        if let Some(row) = info.row {
            // Row bytes grow with the row: the one length that fits, if any.
            let d = (8..=MAX_DIM)
                .step_by(8)
                .find(|&d| row.row_bytes(d).is_ok_and(|b| b >= bytes));
            return match d {
                Some(d) if row.row_bytes(d).is_ok_and(|b| b == bytes) => Ok(d),
                _ => Err(Error::TruncatedBuffer {
                    format: info.name,
                    row_bytes: bytes,
                    actual: bytes,
                }),
            };
        }
        if bytes == 0 || !bytes.is_multiple_of(info.block_bytes) {
            return Err(Error::TruncatedBuffer {
                format: info.name,
                row_bytes: info.block_bytes,
                actual: bytes,
            });
        }
        Ok(bytes / info.block_bytes * info.block_size)
    }

    /// Dequantizes whole blocks into `out` (exactly the decoded length).
    pub fn dequantize_into(self, bytes: &[u8], out: &mut [f32]) -> Result<()> {
        let expected = self.values_in(bytes.len())?;
        if out.len() != expected {
            return Err(Error::LengthMismatch {
                what: "dequantized output buffer",
                expected,
                actual: out.len(),
            });
        }
        let info = self.info();
        let Some(codec) = &info.codec else {
            let row = info.row.expect("a format without blocks is a row format");
            out.copy_from_slice(&row.dequantize(bytes, expected)?);
            return Ok(());
        };
        for (b, o) in bytes
            .chunks_exact(info.block_bytes)
            .zip(out.chunks_exact_mut(info.block_size))
        {
            (codec.dequantize)(b, o);
        }
        Ok(())
    }

    /// Dequantizes whole blocks into a new vector.
    pub fn dequantize_row(self, bytes: &[u8]) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; self.values_in(bytes.len())?];
        self.dequantize_into(bytes, &mut out)?;
        Ok(out)
    }

    /// Worst-case `|x − dequantize(quantize(x))|` over one finite block `x`, whose encoding is
    /// `encoded` (only iq4_nl, whose scale comes from a search, looks at it). Includes the f16
    /// rounding of the scale and the f32 rounding of the dequantized values; infinite where
    /// the scale overflows its storage type.
    ///
    /// ```
    /// use rotq_reference::KvFormat;
    /// let x = [1.0f32; 32];
    /// let f = KvFormat::Q8_0;
    /// let bound = f.error_bound(&x, &f.quantize_row(&x).unwrap());
    /// assert!(bound < 0.01);
    /// ```
    ///
    /// A row format has no a-priori bound per value (its error spreads over the row): its
    /// bound is the largest error of the oracle's own decoding of `encoded` (infinite if it
    /// does not decode or holds a non-finite value), plus the f32 slack.
    pub fn error_bound(self, x: &[f32], encoded: &[u8]) -> f64 {
        let amax = f64::from(scalar::abs_max(x));
        let Some(codec) = &self.info().codec else {
            let worst = self.dequantize_row(encoded).ok().and_then(|y| {
                (y.len() == x.len()).then(|| {
                    x.iter()
                        .zip(&y)
                        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).abs())
                        .fold(0.0f64, |m: f64, e: f64| {
                            if m.is_nan() || e.is_nan() {
                                f64::NAN
                            } else {
                                m.max(e)
                            }
                        })
                })
            });
            return match worst {
                Some(w) if w.is_finite() => w + scalar::f32_slack(amax.max(w)),
                _ => f64::INFINITY,
            };
        };
        (codec.bound)(x, encoded) + scalar::f32_slack(amax)
    }
}

impl fmt::Display for KvFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KvFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        let wanted = match lower.as_str() {
            "fp8" | "e4m3" => "fp8_e4m3",
            other => other,
        };
        KvFormat::ALL
            .into_iter()
            .find(|f| f.name() == wanted)
            .ok_or_else(|| Error::UnknownFormat(s.to_string()))
    }
}
