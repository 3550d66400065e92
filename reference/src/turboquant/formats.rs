//! rotq's TurboQuant cache formats: one head row (already rotated by the plan's Q/K or V
//! rotation) in, its bytes out. They store whole rows, not 32-value blocks, so they stand beside
//! the block registry ([`crate::KvFormat`]) until the kernels take row formats.
//!
//! | format | what | bytes per row of `d` |
//! | --- | --- | --- |
//! | `tq2`, `tq3`, `tq4` | TurboQuant-MSE at 2, 3, 4 bits, norm correction on | `⌈d b / 8⌉ + 2` |
//! | `tq2_qjl`, `tq3_qjl`, `tq4_qjl` | TurboQuant-prod at 2, 3, 4 bits | `⌈d (b−1) / 8⌉ + 2 + d / 8 + 2` |
//!
//! **Layout** (every field little-endian, codes as an LSB-first bit stream: coordinate `i` of
//! `w`-bit codes at bits `w·i .. w·i + w`, so 4-bit coordinate `2j` is the low nibble of byte `j`,
//! as in vLLM's slots):
//! * MSE: the `b`-bit level indices of [`super::Mse`] with the exact codebook of
//!   [`crate::lloyd_max`] for `d`, then `‖y‖` as f16. Decoding rescales the levels to unit norm
//!   (norm correction, which vLLM found worth 0.8% of perplexity at 4 bits) times the f16 norm.
//! * prod: the `(b−1)`-bit MSE indices (no norm correction, as the paper's Algorithm 2; the
//!   QJL estimate would be unbiased around any reconstruction) and the f16 `‖y‖`; then the `d` signs of `S r` (bit `i` set
//!   when `(S r)_i ≥ 0`), `r = y − ŷ` with `ŷ` decoded from the *stored* f16 norm; then `‖r‖`
//!   as f16. `S` is [`super::sketch_matrix`] of `d` and seed [`QJL_SEED`]. Decoding gives
//!   `ŷ + ‖r‖ √(π/2) / d · Sᵀ z`.
//!
//! A norm above f16's range (65504) is stored as infinity and the row decodes to ±∞ (NaN where
//! a level is 0), never to a silently wrong finite value; a row holding a NaN or an infinity
//! stores a NaN or infinite norm and decodes the same way; a zero row decodes to zeros; norms
//! below f16's normal range (6.1e-5) lose precision and under about 3e-8 decode to zeros, as
//! in vLLM.
//!
//! ```
//! use rotq_reference::turboquant::formats::RowFormat;
//! let f: RowFormat = "tq4".parse().unwrap();
//! assert_eq!(f.row_bytes(128).unwrap(), 66);
//! let y: Vec<f32> = rotq_reference::turboquant::sketch_matrix(128, 1).unwrap()[..128]
//!     .iter().map(|&x| x as f32).collect();
//! let back = f.dequantize_row(&f.quantize_row(&y).unwrap(), 128).unwrap();
//! let err: f32 = y.iter().zip(&back).map(|(a, b)| (a - b) * (a - b)).sum();
//! let norm: f32 = y.iter().map(|a| a * a).sum();
//! assert!(err / norm < 0.03); // 4 bits: 0.0093 of the squared norm on average over rows
//! ```

use super::{pack, unpack, Mse, MseCode, Normals, MAX_DIM};
use crate::{Error, Result};
use half::f16;

/// The seed of the QJL formats' sketch matrix (`"TQJL"` in ASCII).
pub const QJL_SEED: u64 = 0x5451_4A4C;

/// A TurboQuant row format (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RowFormat {
    /// TurboQuant-MSE at `bits` (2 to 4), norm correction on.
    Mse {
        /// Bits per coordinate.
        bits: u32,
    },
    /// TurboQuant-prod at `bits` (2 to 4): `bits − 1` MSE bits and a 1-bit QJL sketch.
    Prod {
        /// Bits per coordinate, the sketch's included.
        bits: u32,
    },
}

impl RowFormat {
    /// Every format, in the order of the module docs' table.
    pub const ALL: [RowFormat; 6] = [
        RowFormat::Mse { bits: 2 },
        RowFormat::Mse { bits: 3 },
        RowFormat::Mse { bits: 4 },
        RowFormat::Prod { bits: 2 },
        RowFormat::Prod { bits: 3 },
        RowFormat::Prod { bits: 4 },
    ];

    /// The format's name (`tq4`, `tq3_qjl`, …).
    pub fn name(self) -> String {
        match self {
            RowFormat::Mse { bits } => format!("tq{bits}"),
            RowFormat::Prod { bits } => format!("tq{bits}_qjl"),
        }
    }

    fn bits(self) -> u32 {
        match self {
            RowFormat::Mse { bits } | RowFormat::Prod { bits } => bits,
        }
    }

    /// Bits of the MSE indices per coordinate.
    fn mse_bits(self) -> u32 {
        match self {
            RowFormat::Mse { bits } => bits,
            RowFormat::Prod { bits } => bits - 1,
        }
    }

    fn check(self, d: usize) -> Result<()> {
        if !(2..=4).contains(&self.bits()) {
            return Err(Error::InvalidParameter {
                name: "TurboQuant format",
                reason: format!("{} bits: the formats have 2 to 4", self.bits()),
            });
        }
        if !(8..=MAX_DIM).contains(&d) || !d.is_multiple_of(8) {
            return Err(Error::InvalidParameter {
                name: "head dimension",
                reason: format!(
                    "{} takes rows of a multiple of 8 values, 8 to {MAX_DIM}, not {d}",
                    self.name()
                ),
            });
        }
        Ok(())
    }

    /// Bytes of a row of `d` values (a multiple of 8).
    pub fn row_bytes(self, d: usize) -> Result<usize> {
        self.check(d)?;
        let codes = (d * self.mse_bits() as usize).div_ceil(8) + 2;
        Ok(match self {
            RowFormat::Mse { .. } => codes,
            RowFormat::Prod { .. } => codes + d / 8 + 2,
        })
    }

    /// Bits per value, the norms included.
    pub fn bits_per_value(self, d: usize) -> Result<f64> {
        Ok(self.row_bytes(d)? as f64 * 8.0 / d as f64)
    }

    fn mse(self, d: usize) -> Result<Mse> {
        Mse::new(d, self.mse_bits(), matches!(self, RowFormat::Mse { .. }))
    }

    /// The bytes of one rotated row.
    pub fn quantize_row(self, y: &[f32]) -> Result<Vec<u8>> {
        let d = y.len();
        let mut out = vec![0u8; self.row_bytes(d)?];
        let y: Vec<f64> = y.iter().map(|&v| f64::from(v)).collect();
        let mse = self.mse(d)?;
        let mut code = mse.encode(&y)?;
        code.norm = f16::from_f64(code.norm).to_f64();
        let n_codes = (d * self.mse_bits() as usize).div_ceil(8);
        pack(&code.codes, self.mse_bits(), &mut out[..n_codes]);
        out[n_codes..n_codes + 2]
            .copy_from_slice(&f16::from_f64(code.norm).to_bits().to_le_bytes());
        if let RowFormat::Prod { .. } = self {
            let approx = mse.decode(&code)?;
            let r: Vec<f64> = y.iter().zip(&approx).map(|(a, b)| a - b).collect();
            // The sketch's rows one at a time (O(d) memory).
            let mut normals = Normals::new(QJL_SEED);
            let mut row = vec![0f64; d];
            let signs = &mut out[n_codes + 2..n_codes + 2 + d / 8];
            for i in 0..d {
                row.iter_mut()
                    .for_each(|v| *v = normals.next().unwrap_or(0.0));
                if row.iter().zip(&r).map(|(a, b)| a * b).sum::<f64>() >= 0.0 {
                    signs[i / 8] |= 1 << (i % 8);
                }
            }
            let rn = r.iter().map(|v| v * v).sum::<f64>().sqrt();
            let at = n_codes + 2 + d / 8;
            out[at..at + 2].copy_from_slice(&f16::from_f64(rn).to_bits().to_le_bytes());
        }
        Ok(out)
    }

    /// The row of `d` values that `bytes` stand for.
    pub fn dequantize_row(self, bytes: &[u8], d: usize) -> Result<Vec<f32>> {
        let want = self.row_bytes(d)?;
        if bytes.len() != want {
            return Err(Error::LengthMismatch {
                what: "TurboQuant row bytes",
                expected: want,
                actual: bytes.len(),
            });
        }
        let n_codes = (d * self.mse_bits() as usize).div_ceil(8);
        let f16_at = |at: usize| {
            f64::from(f16::from_bits(u16::from_le_bytes([
                bytes[at],
                bytes[at + 1],
            ])))
        };
        let code = MseCode {
            codes: unpack(&bytes[..n_codes], self.mse_bits(), d),
            norm: f16_at(n_codes),
        };
        let mut y = self.mse(d)?.decode(&code)?;
        if let RowFormat::Prod { .. } = self {
            let signs = &bytes[n_codes + 2..n_codes + 2 + d / 8];
            let k = f16_at(n_codes + 2 + d / 8) * (std::f64::consts::PI / 2.0).sqrt() / d as f64;
            let mut normals = Normals::new(QJL_SEED);
            let mut row = vec![0f64; d];
            for i in 0..d {
                row.iter_mut()
                    .for_each(|v| *v = normals.next().unwrap_or(0.0));
                let z = if signs[i / 8] >> (i % 8) & 1 == 1 {
                    k
                } else {
                    -k
                };
                for (o, v) in y.iter_mut().zip(&row) {
                    *o += z * v;
                }
            }
        }
        Ok(y.into_iter().map(|v| v as f32).collect())
    }
}

impl std::fmt::Display for RowFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl std::str::FromStr for RowFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        RowFormat::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| Error::InvalidParameter {
                name: "TurboQuant format",
                reason: format!("`{s}`: expected tq2, tq3, tq4, tq2_qjl, tq3_qjl or tq4_qjl"),
            })
    }
}
