//! rotq's TurboQuant cache formats: one head row (already rotated by the plan's Q/K or V
//! rotation) in, its bytes out. They store whole rows, not 32-value blocks; the format registry
//! ([`crate::KvFormat`]) lists them as its row formats (`tq4`, …).
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
//!   [`crate::lloyd_max`] for `d`, then the row's **scale** `s = ‖y‖ / ‖c‖` as f16, `c` the
//!   row of levels the indices pick. A value decodes as `s · c_i`: the levels rescaled to the
//!   row's norm (norm correction, which vLLM found worth 0.8% of perplexity at 4 bits), with the
//!   division done once when the row is written, so that reading a row is a table lookup and a
//!   multiply, as for ggml's iq4_nl. (vLLM stores `‖y‖` and divides by `‖c‖` in every read.)
//! * prod: the `(b−1)`-bit MSE indices (no norm correction, as the paper's Algorithm 2; the
//!   QJL estimate would be unbiased around any reconstruction) and `‖y‖` as f16 (the scale of
//!   those levels); then the `d` signs of `S r` (bit `i` set when `(S r)_i ≥ 0`), `r = y − ŷ`
//!   with `ŷ` decoded from the *stored* f16 norm; then `‖r‖` as f16. `S` is
//!   [`super::sketch_matrix`] of `d` and seed [`QJL_SEED`]. Decoding gives
//!   `ŷ + ‖r‖ √(π/2) / d · Sᵀ z`.
//!
//! **Arithmetic**, exactly (so that kernels match these bytes bit for bit): the row's f32 values
//! are widened to f64; `‖y‖ = √(Σ y²)` in the order of [`super::sum_squares`]; code `i` is the
//! number of midpoints `m` of consecutive levels (f64, `(c_k + c_{k+1}) / 2`) with
//! `y_i ≥ m · ‖y‖` (so NaN codes 0); MSE stores `f16(‖y‖ / √(Σ c²))` (`Σ c²` in f32 as
//! [`level_energy`] says, widened; f16 rounding to nearest even) and decodes, in f32,
//! `f32(c_i) · s₁₆` (the level rounded to f32, times the scale, which f32 holds exactly). QJL stores `f16(‖y‖)`,
//! takes `ŷ_i = c_i · n₁₆` (f64), `r = y − ŷ`, sets sign `j` when `Σ_i S_ji r_i ≥ 0` summed in
//! index order, stores `f16(‖r‖)` (`‖r‖` as for `‖y‖`); its decode starts from `ŷ_i`, adds
//! `(±k) · S_ji` for `j = 0, 1, …` in that order, `k = (r₁₆ · √(π/2)) / d`, then rounds to f32
//! (products and sums rounded one by one, never fused).
//!
//! A scale or norm above f16's range (65504) is stored as infinity and the row decodes to ±∞,
//! never to a silently wrong finite value; a row holding a NaN or an infinity stores a NaN
//! (always the f16 bits `0x7E00`, [`stored_f16`]) or an infinite scale and decodes the same way; a zero row decodes to zeros; scales below f16's
//! normal range (6.1e-5) lose precision and under about 3e-8 decode to zeros, as in vLLM.
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

use super::{pack, sketch_matrix, unpack, Mse, MAX_DIM};
use crate::{Error, Result};
use half::f16;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

/// The longest row of the QJL formats: kernels hold their `d × d` sketch (8 MiB of f64 here).
pub const MAX_QJL_DIM: usize = 1024;

/// The seed of the QJL formats' sketch matrix (`"TQJL"` in ASCII).
pub const QJL_SEED: u64 = 0x5451_4A4C;

/// The f16 bits a norm or scale is stored as: `f16(x)` rounded to nearest even, and every NaN
/// as the one quiet NaN `0x7E00` (a NaN's sign and payload depend on the order in which
/// hardware adds NaNs of a row, which neither Rust nor a GPU fixes).
pub fn stored_f16(x: f64) -> u16 {
    if x.is_nan() {
        0x7E00
    } else {
        f16::from_f64(x).to_bits()
    }
}

/// The sketch of the QJL formats for rows of `d` (`d ≤ MAX_QJL_DIM`), built once per length
/// and kept (at most four lengths, 8 MiB each at most): the oracle decodes rows one by one.
fn qjl_sketch(d: usize) -> Result<Arc<Vec<f64>>> {
    type Sketches = Mutex<Vec<(usize, Arc<Vec<f64>>)>>;
    static CACHE: OnceLock<Sketches> = OnceLock::new();
    let lock = || {
        CACHE
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    };
    if let Some((_, s)) = lock().iter().find(|(k, _)| *k == d) {
        return Ok(s.clone());
    }
    let s = Arc::new(sketch_matrix(d, QJL_SEED)?);
    let mut all = lock();
    if all.len() == 4 {
        all.remove(0);
    }
    all.push((d, s.clone()));
    Ok(s)
}

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
        let max = match self {
            RowFormat::Mse { .. } => MAX_DIM,
            RowFormat::Prod { .. } => MAX_QJL_DIM,
        };
        if !(8..=max).contains(&d) || !d.is_multiple_of(8) {
            return Err(Error::InvalidParameter {
                name: "head dimension",
                reason: format!(
                    "{} takes rows of a multiple of 8 values, 8 to {max}, not {d}",
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
        let n_codes = (d * self.mse_bits() as usize).div_ceil(8);
        pack(&code.codes, self.mse_bits(), &mut out[..n_codes]);
        let stored = match self {
            RowFormat::Mse { .. } => {
                code.norm / f64::from(level_energy(&code.codes, mse.levels())).sqrt()
            }
            RowFormat::Prod { .. } => code.norm,
        };
        code.norm = f16::from_bits(stored_f16(stored)).to_f64();
        out[n_codes..n_codes + 2].copy_from_slice(&stored_f16(stored).to_le_bytes());
        if let RowFormat::Prod { .. } = self {
            let approx = mse.decode(&code)?;
            let r: Vec<f64> = y.iter().zip(&approx).map(|(a, b)| a - b).collect();
            let sketch = qjl_sketch(d)?;
            let signs = &mut out[n_codes + 2..n_codes + 2 + d / 8];
            for (i, row) in sketch.chunks_exact(d).enumerate() {
                if row.iter().zip(&r).map(|(a, b)| a * b).sum::<f64>() >= 0.0 {
                    signs[i / 8] |= 1 << (i % 8);
                }
            }
            let rn = super::sum_squares(&r).sqrt();
            let at = n_codes + 2 + d / 8;
            out[at..at + 2].copy_from_slice(&stored_f16(rn).to_le_bytes());
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
        let levels = self.mse(d)?.levels().to_vec();
        // s · c_i (MSE: the stored scale; prod: the stored norm, no correction).
        let scale = f16_at(n_codes);
        let codes = unpack(&bytes[..n_codes], self.mse_bits(), d);
        if let RowFormat::Mse { .. } = self {
            // In f32: the level rounded to f32, times the f16 scale (exact in f32), rounded.
            let s32 = scale as f32;
            return Ok(codes
                .into_iter()
                .map(|i| levels[usize::from(i)] as f32 * s32)
                .collect());
        }
        let mut y: Vec<f64> = codes
            .into_iter()
            .map(|i| levels[usize::from(i)] * scale)
            .collect();
        if let RowFormat::Prod { .. } = self {
            let signs = &bytes[n_codes + 2..n_codes + 2 + d / 8];
            let k = f16_at(n_codes + 2 + d / 8) * (std::f64::consts::PI / 2.0).sqrt() / d as f64;
            let sketch = qjl_sketch(d)?;
            for (i, row) in sketch.chunks_exact(d).enumerate() {
                let z = if signs[i / 8] >> (i % 8) & 1 == 1 {
                    k
                } else {
                    -k
                };
                for (o, v) in y.iter_mut().zip(row) {
                    *o += z * v;
                }
            }
        }
        Ok(y.into_iter().map(|v| v as f32).collect())
    }
}

/// `Σ c²` of the levels that `codes` pick, as the MSE formats' scale takes it: each level's
/// square rounded to f32 once (`f32(c_k · c_k)`), summed in f32 in eight lanes by index
/// (`p_j = Σ_{i ≡ j (mod 8)}`, each in index order), then `t_j = p_j + p_{j+4}` and
/// `(t₀ + t₂) + (t₁ + t₃)`: the order of [`super::sum_squares`] in f32, which a kernel looks
/// up and adds eight values per instruction. (The scale is stored as f16: f32's rounding here
/// is a hundred times finer.)
///
/// ```
/// use rotq_reference::turboquant::formats::level_energy;
/// assert_eq!(level_energy(&[0, 1, 1, 0], &[-0.5, 0.25]), 0.625);
/// ```
pub fn level_energy(codes: &[u8], levels: &[f64]) -> f32 {
    let mut p = [0f32; 8];
    for (i, &c) in codes.iter().enumerate() {
        let l = levels[usize::from(c)];
        p[i % 8] += (l * l) as f32;
    }
    let t = [p[0] + p[4], p[1] + p[5], p[2] + p[6], p[3] + p[7]];
    (t[0] + t[2]) + (t[1] + t[3])
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
