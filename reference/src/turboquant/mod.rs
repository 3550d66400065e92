//! TurboQuant (Zandieh et al., "TurboQuant: Online Vector Quantization with Near-optimal
//! Distortion Rate", ICLR 2026): the f64 spec of its two quantizers of a (rotated) row, which
//! rotq's TurboQuant cache formats implement.
//!
//! Both act on a row `y` that is already rotated (rotq's rotation plans do that, as for every
//! format: TurboQuant's random rotation is the plan's Q/K rotation, e.g. the randomized
//! Hadamard with rotq's documented SplitMix64 signs).
//!
//! **TurboQuant-MSE** ([`Mse`], the paper's Algorithm 1) stores the row's norm `‖y‖` and, for
//! each coordinate of the unit row `u = y / ‖y‖`, the index of the nearest level of the
//! `b`-bit Lloyd–Max codebook for one coordinate of a random unit vector of `R^d`
//! ([`crate::lloyd_max`]); a coordinate on the midpoint of two levels takes the upper one (as
//! vLLM's store kernel does). Its reconstruction is `‖y‖ · c`, `c` the row of levels; with
//! **norm correction** (vLLM's `_nc` presets, not in the paper) it is `‖y‖ · c / ‖c‖`, which
//! keeps the row's norm exactly. Every norm (`‖y‖`, `‖c‖`, `‖r‖`) sums its squares in the order of
//! [`sum_squares`]. A zero row stores norm 0 (and the top index everywhere) and comes back as zeros; a row with a NaN or an infinity stores
//! a non-finite norm and comes back non-finite (NaN, or ±∞ for an infinite norm).
//!
//! **TurboQuant-prod** ([`Prod`], Algorithm 2) quantizes `y` with TurboQuant-MSE at `b − 1` bits
//! (no norm correction; at `b = 1` the MSE part is the zero vector), then keeps a 1-bit QJL
//! sketch of the residual `r = y − ŷ`: the signs `z = sign(S r)` (`sign(0) = +1`) and `‖r‖`,
//! `S` a `d × d` matrix of independent standard normal entries drawn from the seed (below). Its
//! reconstruction is the unbiased `ŷ + ‖r‖ · √(π/2) / d · Sᵀ z`, so for any query `q`,
//! `E_S ⟨q, x̃⟩ = ⟨q, y⟩` with variance at most `π / (2d) · ‖r‖² ‖q‖²`. Attention over such
//! keys takes the scores `⟨q, x̃⟩` ([`Prod::inner`]): the estimator is linear in `q`, so the
//! oracle's attention on the reconstructed rows is exactly attention with the estimator.
//!
//! **The sketch matrix** of seed `s`: SplitMix64 seeded with `s`
//! ([`crate::rotation::SplitMix64`]) gives pairs of uniforms `v = ((x >> 11) + 0.5) / 2^53`
//! (in `(0, 1)`), and each pair `(v₁, v₂)` two normals by Box–Muller,
//! `√(−2 ln v₁) · cos(2π v₂)` then `√(−2 ln v₁) · sin(2π v₂)`; they fill `S` row by row.
//!
//! ```
//! use rotq_reference::turboquant::{Mse, Prod};
//! let y: Vec<f64> = (0..128).map(|i| ((i * 37 % 17) as f64 - 8.0) / 8.0).collect();
//! let mse = Mse::new(128, 4, true).unwrap();
//! let back = mse.decode(&mse.encode(&y).unwrap()).unwrap();
//! let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
//! assert!((norm(&back) - norm(&y)).abs() < 1e-12 * norm(&y)); // norm correction
//! let prod = Prod::new(128, 3, 7).unwrap();
//! let code = prod.encode(&y).unwrap();
//! let q = vec![0.5; 128];
//! let exact: f64 = q.iter().zip(&y).map(|(a, b)| a * b).sum();
//! assert!((prod.inner(&q, &code).unwrap() - exact).abs() < 0.5 * norm(&q) * norm(&y));
//! ```

use crate::lloyd_max;
use crate::rotation::SplitMix64;
use crate::{Error, Result};

/// One row quantized by TurboQuant-MSE: a level index per coordinate and the row's norm.
#[derive(Clone, Debug, PartialEq)]
pub struct MseCode {
    /// Index into the codebook's levels (ascending), per coordinate.
    pub codes: Vec<u8>,
    /// `‖y‖` (f64 here; a format stores it rounded).
    pub norm: f64,
}

/// TurboQuant-MSE of rows of `d` values at `bits` bits per coordinate (see the module docs).
#[derive(Clone, Debug)]
pub struct Mse {
    d: usize,
    levels: Vec<f64>,
    norm_correction: bool,
}

fn check_len(what: &'static str, row: &[f64], d: usize) -> Result<()> {
    if row.len() != d {
        return Err(Error::LengthMismatch {
            what,
            expected: d,
            actual: row.len(),
        });
    }
    Ok(())
}

/// `Σ v_i²` in the one order every TurboQuant norm uses (so that vectorized kernels give the
/// same bits): eight partial sums `p_j = Σ_{i ≡ j (mod 8)} v_i²`, each in index order, then
/// `t_j = p_j + p_{j+4}` and `(t₀ + t₂) + (t₁ + t₃)`.
///
/// ```
/// let v: Vec<f64> = (0..20).map(f64::from).collect();
/// let s = rotq_reference::turboquant::sum_squares(&v);
/// assert_eq!(s, (0..20).map(|i| f64::from(i * i)).sum::<f64>()); // exact: small integers
/// ```
pub fn sum_squares(v: &[f64]) -> f64 {
    let mut p = [0f64; 8];
    for (i, x) in v.iter().enumerate() {
        p[i % 8] += x * x;
    }
    let t = [p[0] + p[4], p[1] + p[5], p[2] + p[6], p[3] + p[7]];
    (t[0] + t[2]) + (t[1] + t[3])
}

fn norm(v: &[f64]) -> f64 {
    sum_squares(v).sqrt()
}

impl Mse {
    /// The quantizer for rows of `3 ≤ d ≤ MAX_DIM` values at `1 ≤ bits ≤ 4`, with or without
    /// norm correction.
    ///
    /// ```
    /// let q = rotq_reference::turboquant::Mse::new(64, 2, false).unwrap();
    /// assert_eq!(q.levels().len(), 4);
    /// assert!(rotq_reference::turboquant::Mse::new(64, 5, false).is_err());
    /// ```
    pub fn new(d: usize, bits: u32, norm_correction: bool) -> Result<Self> {
        check_dim(d)?;
        Ok(Self {
            d,
            levels: lloyd_max::codebook(d, bits)?,
            norm_correction,
        })
    }

    /// The codebook's levels, ascending.
    pub fn levels(&self) -> &[f64] {
        &self.levels
    }

    /// Whether the reconstruction is rescaled to the stored norm.
    pub fn norm_correction(&self) -> bool {
        self.norm_correction
    }

    /// The midpoints of consecutive levels, `(c_k + c_{k+1}) / 2`, ascending.
    pub fn midpoints(&self) -> Vec<f64> {
        self.levels
            .windows(2)
            .map(|w| (w[0] + w[1]) / 2.0)
            .collect()
    }

    /// The code of the row `y` (`d` values): coordinate `y_i` takes the number of midpoints
    /// `m` with `y_i ≥ m · ‖y‖` (the nearest level of `y_i / ‖y‖`, the upper one on a
    /// midpoint, compared without a division so that kernels can compare f32 rows against
    /// per-row thresholds exactly); NaN takes 0, and a zero row the top index.
    pub fn encode(&self, y: &[f64]) -> Result<MseCode> {
        check_len("TurboQuant row", y, self.d)?;
        let n = norm(y);
        let thresholds: Vec<f64> = self.midpoints().iter().map(|m| m * n).collect();
        let codes = y
            .iter()
            .map(|&v| thresholds.iter().filter(|&&t| v >= t).count() as u8)
            .collect();
        Ok(MseCode { codes, norm: n })
    }

    /// The row a code stands for (`‖y‖ · c`, or `‖y‖ · c / ‖c‖` with norm correction).
    pub fn decode(&self, code: &MseCode) -> Result<Vec<f64>> {
        if code.codes.len() != self.d {
            return Err(Error::LengthMismatch {
                what: "TurboQuant codes",
                expected: self.d,
                actual: code.codes.len(),
            });
        }
        let mut c = Vec::with_capacity(self.d);
        for &i in &code.codes {
            let level = self
                .levels
                .get(usize::from(i))
                .ok_or_else(|| Error::InvalidParameter {
                    name: "TurboQuant code",
                    reason: format!("index {i} of a {}-level codebook", self.levels.len()),
                })?;
            c.push(*level);
        }
        let scale = if self.norm_correction {
            code.norm / norm(&c)
        } else {
            code.norm
        };
        Ok(c.into_iter().map(|v| v * scale).collect())
    }
}

/// One row quantized by TurboQuant-prod: the MSE part, the residual's signs and norm.
#[derive(Clone, Debug, PartialEq)]
pub struct ProdCode {
    /// The `b − 1`-bit TurboQuant-MSE code (`None` at `b = 1`: the MSE part is zero).
    pub mse: Option<MseCode>,
    /// `sign(S r) ≥ 0`, per sketch row.
    pub signs: Vec<bool>,
    /// `‖r‖`.
    pub residual_norm: f64,
    /// The seed of the sketch the signs were taken with: a quantizer of another seed refuses
    /// the code (its signs would be read against the wrong matrix, a silently wrong score).
    pub seed: u64,
}

/// TurboQuant-prod of rows of `d` values at `bits` bits per coordinate, sketch seed `seed`.
#[derive(Clone, Debug)]
pub struct Prod {
    d: usize,
    seed: u64,
    mse: Option<Mse>,
    /// `S`, row-major `d × d`.
    sketch: Vec<f64>,
}

/// The largest row TurboQuant takes here (its codebooks converge, its sketch is `d²` values).
pub const MAX_DIM: usize = 4096;

fn check_dim(d: usize) -> Result<()> {
    if !(3..=MAX_DIM).contains(&d) {
        return Err(Error::InvalidParameter {
            name: "head dimension",
            reason: format!("TurboQuant takes rows of 3 to {MAX_DIM} values, not {d}"),
        });
    }
    Ok(())
}

/// The standard normals of a sketch, in order (module docs): Box–Muller pairs from SplitMix64.
pub(crate) struct Normals {
    g: SplitMix64,
    pending: Option<f64>,
}

impl Normals {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            g: SplitMix64::new(seed),
            pending: None,
        }
    }
}

impl Iterator for Normals {
    type Item = f64;

    fn next(&mut self) -> Option<f64> {
        if let Some(v) = self.pending.take() {
            return Some(v);
        }
        let mut uniform = || ((self.g.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let (v1, v2) = (uniform(), uniform());
        let radius = (-2.0 * v1.ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * v2;
        self.pending = Some(radius * angle.sin());
        Some(radius * angle.cos())
    }
}

/// The QJL sketch matrix of `d` rows and columns for `seed`, row-major (module docs);
/// `d ≤ MAX_DIM`.
///
/// ```
/// let s = rotq_reference::turboquant::sketch_matrix(4, 0).unwrap();
/// assert_eq!(s.len(), 16);
/// assert_eq!(s, rotq_reference::turboquant::sketch_matrix(4, 0).unwrap());
/// assert!(rotq_reference::turboquant::sketch_matrix(1 << 40, 0).is_err());
/// ```
pub fn sketch_matrix(d: usize, seed: u64) -> Result<Vec<f64>> {
    if d > MAX_DIM {
        return Err(Error::InvalidParameter {
            name: "sketch dimension",
            reason: format!("at most {MAX_DIM}, not {d}"),
        });
    }
    Ok(Normals::new(seed).take(d * d).collect())
}

impl Prod {
    /// The quantizer for rows of `d ≥ 3` values at `1 ≤ bits ≤ 4` (the MSE part takes
    /// `bits − 1`), with the sketch of `seed`.
    ///
    /// ```
    /// assert!(rotq_reference::turboquant::Prod::new(128, 1, 0).is_ok());
    /// assert!(rotq_reference::turboquant::Prod::new(128, 0, 0).is_err());
    /// ```
    pub fn new(d: usize, bits: u32, seed: u64) -> Result<Self> {
        check_dim(d)?;
        if !(1..=lloyd_max::MAX_BITS).contains(&bits) {
            return Err(Error::InvalidParameter {
                name: "TurboQuant-prod",
                reason: format!("needs d >= 3 and 1 to 4 bits, not d = {d}, {bits} bits"),
            });
        }
        let mse = (bits > 1)
            .then(|| Mse::new(d, bits - 1, false))
            .transpose()?;
        Ok(Self {
            d,
            mse,
            sketch: sketch_matrix(d, seed)?,
            seed,
        })
    }

    /// Refuses a code taken with another sketch seed, or of another length.
    fn check_code(&self, code: &ProdCode) -> Result<()> {
        if code.seed != self.seed {
            return Err(Error::InvalidParameter {
                name: "TurboQuant-prod sketch seed",
                reason: format!(
                    "the code was taken with seed {:#x}, this quantizer's is {:#x}",
                    code.seed, self.seed
                ),
            });
        }
        if code.signs.len() != self.d {
            return Err(Error::LengthMismatch {
                what: "TurboQuant-prod signs",
                expected: self.d,
                actual: code.signs.len(),
            });
        }
        Ok(())
    }

    fn mse_part(&self, code: &ProdCode) -> Result<Vec<f64>> {
        match (&self.mse, &code.mse) {
            (Some(m), Some(c)) => m.decode(c),
            (None, None) => Ok(vec![0.0; self.d]),
            _ => Err(Error::InvalidParameter {
                name: "TurboQuant-prod code",
                reason: "its MSE part does not match the quantizer's bits".into(),
            }),
        }
    }

    /// The code of the row `y` (`d` values).
    pub fn encode(&self, y: &[f64]) -> Result<ProdCode> {
        check_len("TurboQuant row", y, self.d)?;
        let mse = self.mse.as_ref().map(|m| m.encode(y)).transpose()?;
        let code = ProdCode {
            mse,
            signs: Vec::new(),
            residual_norm: 0.0,
            seed: self.seed,
        };
        let approx = self.mse_part(&code)?;
        let r: Vec<f64> = y.iter().zip(&approx).map(|(a, b)| a - b).collect();
        let signs = self
            .sketch
            .chunks_exact(self.d)
            .map(|row| row.iter().zip(&r).map(|(s, x)| s * x).sum::<f64>() >= 0.0)
            .collect();
        Ok(ProdCode {
            signs,
            residual_norm: norm(&r),
            ..code
        })
    }

    /// The unbiased reconstruction `ŷ + ‖r‖ · √(π/2) / d · Sᵀ z`; a code of another seed is an
    /// error.
    ///
    /// ```
    /// use rotq_reference::turboquant::Prod;
    /// let y: Vec<f64> = (0..16).map(|i| (i as f64 * 0.7).sin()).collect();
    /// let code = Prod::new(16, 3, 7).unwrap().encode(&y).unwrap();
    /// assert!(Prod::new(16, 3, 7).unwrap().decode(&code).is_ok());
    /// assert!(Prod::new(16, 3, 8).unwrap().decode(&code).is_err()); // another sketch
    /// ```
    pub fn decode(&self, code: &ProdCode) -> Result<Vec<f64>> {
        self.check_code(code)?;
        let mut out = self.mse_part(code)?;
        let k = code.residual_norm * (std::f64::consts::PI / 2.0).sqrt() / self.d as f64;
        for (row, &z) in self.sketch.chunks_exact(self.d).zip(&code.signs) {
            let z = if z { k } else { -k };
            for (o, s) in out.iter_mut().zip(row) {
                *o += z * s;
            }
        }
        Ok(out)
    }

    /// The estimator of `⟨q, y⟩`: `⟨q, ŷ⟩ + ‖r‖ · √(π/2) / d · ⟨S q, z⟩` (equal to
    /// `⟨q, decode(code)⟩`).
    pub fn inner(&self, q: &[f64], code: &ProdCode) -> Result<f64> {
        check_len("query", q, self.d)?;
        self.check_code(code)?;
        let approx = self.mse_part(code)?;
        let base: f64 = q.iter().zip(&approx).map(|(a, b)| a * b).sum();
        let sketched: f64 = self
            .sketch
            .chunks_exact(self.d)
            .zip(&code.signs)
            .map(|(row, &z)| {
                let sq: f64 = row.iter().zip(q).map(|(s, x)| s * x).sum();
                if z {
                    sq
                } else {
                    -sq
                }
            })
            .sum();
        Ok(base
            + code.residual_norm * (std::f64::consts::PI / 2.0).sqrt() / self.d as f64 * sketched)
    }
}

pub mod formats;
pub mod vllm;

/// `w`-bit codes (`w ≤ 8`) as an LSB-first bit stream into `out` (zeroed first): code `i` at
/// bits `w·i .. w·i + w`, so 4-bit code `2j` is the low nibble of byte `j`. The one packing of
/// the TurboQuant layouts, vLLM's and rotq's.
pub(crate) fn pack(codes: &[u8], w: u32, out: &mut [u8]) {
    out.fill(0);
    for (i, &c) in codes.iter().enumerate() {
        let at = i * w as usize;
        let word = u16::from(c) << (at % 8);
        out[at / 8] |= word as u8;
        if let Some(next) = out.get_mut(at / 8 + 1) {
            *next |= (word >> 8) as u8;
        }
    }
}

/// The `n` codes of [`pack`] (`bytes` holds at least `⌈n w / 8⌉`).
pub(crate) fn unpack(bytes: &[u8], w: u32, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| {
            let at = i * w as usize;
            let lo = u16::from(bytes[at / 8]);
            let hi = u16::from(bytes.get(at / 8 + 1).copied().unwrap_or(0));
            (((hi << 8 | lo) >> (at % 8)) & ((1 << w) - 1)) as u8
        })
        .collect()
}
