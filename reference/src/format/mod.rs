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
    /// Whether it carries per-block scales (and so is poisoned by NaN/Inf).
    pub scaled: bool,
    codec: Codec,
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
        codec,
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
static REGISTRY: [FormatInfo; 12] = {
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
    ]
};

impl KvFormat {
    /// Every format, in registry order.
    pub const ALL: [KvFormat; 12] = [
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
    ];

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

    /// Storage cost in bits per value (4.5 for q4_0).
    pub fn bits_per_value(self) -> f64 {
        (8 * self.block_bytes()) as f64 / self.block_size() as f64
    }

    /// Checks that `row_len` is a positive multiple of the block size.
    pub fn check_row_len(self, row_len: usize) -> Result<()> {
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
        self.check_row_len(row_len)?;
        (row_len / self.block_size())
            .checked_mul(self.block_bytes())
            .ok_or(Error::Overflow("row bytes"))
    }

    /// Quantizes values (a whole number of blocks) into `out` (exactly the encoded size).
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
        for (xb, ob) in x
            .chunks_exact(info.block_size)
            .zip(out.chunks_exact_mut(info.block_bytes))
        {
            if info.scaled && !scalar::all_finite(xb) {
                (info.codec.poison)(ob);
            } else {
                (info.codec.quantize)(xb, ob);
            }
        }
        Ok(())
    }

    /// Quantizes a row (a whole number of blocks) into a new buffer.
    pub fn quantize_row(self, x: &[f32]) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.row_bytes(x.len())?];
        self.quantize_into(x, &mut out)?;
        Ok(out)
    }

    /// Number of values encoded in `bytes` (a whole number of blocks), or an error.
    pub fn values_in(self, bytes: usize) -> Result<usize> {
        let info = self.info();
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
        for (b, o) in bytes
            .chunks_exact(info.block_bytes)
            .zip(out.chunks_exact_mut(info.block_size))
        {
            (info.codec.dequantize)(b, o);
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
    pub fn error_bound(self, x: &[f32], encoded: &[u8]) -> f64 {
        let amax = f64::from(scalar::abs_max(x));
        (self.info().codec.bound)(x, encoded) + scalar::f32_slack(amax)
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
