//! vLLM's TurboQuant KV cache (its attention backend of PR 38479, with the random signs that
//! PR 40194 removed left out): the four presets, their codebooks and the bytes of one slot, as
//! vLLM's source states them, so that rotq reads and writes the same slots. (The pages that hold
//! them are vLLM's business: token-major in the merged backend, head-major later, and for GQA
//! groups of four a "qgroup4" page layout that splits a slot's bytes into planes.)
//!
//! **Presets.** `turboquant_k8v4`: FP8 E4M3 keys (unscaled, unrotated) and 4-bit values;
//! `turboquant_4bit_nc`, `turboquant_k3v4_nc`, `turboquant_3bit_nc`: 4-, 3-, 3-bit codebook
//! keys with norm correction, and 4-, 4-, 3-bit values. No preset uses QJL.
//!
//! **A slot** holds one token's key and value for one KV head, `[key | value | pad]`:
//! * codebook keys: the codes, `⌈d · b / 8⌉` bytes, then `‖k‖` as little-endian f16. 4-bit
//!   codes: coordinate `2j` in the low nibble of byte `j`, `2j + 1` in the high one; 3-bit codes:
//!   an LSB-first bit stream (coordinate `i` at bits `3i .. 3i + 3`);
//! * FP8 keys: byte `i` is `k_i` in E4M3 (`rotq_reference::format::fp8::e4m3_encode`: nearest,
//!   ties to even, saturating at ±448; vLLM's cast on compute capability ≥ 8.9 GPUs, whose
//!   saturation its source does not pin down; older GPUs store Triton's e4b15 instead);
//! * values: the codes packed as the keys', then the f16 scale and the f16 minimum;
//! * a pad byte when the sum is odd (slots are even-sized: 196, 134, 118 and 102 bytes at
//!   d = 128); vLLM never writes it, rotq writes 0.
//!
//! **Keys** (codebook presets): `x = k / (‖k‖ + 10⁻⁸)`, `y = H x` with the normalized Sylvester
//! Hadamard (rotq's `Rotation::hadamard`; powers of two only), each `y_i` rounded to f32 and
//! coded as the number of the codebook's f32 midpoints `≤ y_i` (ties go up). Decoding looks up
//! the levels `c`, rescales them to unit norm (`c / √(Σ c² + 10⁻¹⁶)`, the norm correction), times
//! the stored norm, and rotates back. **The codebook** is vLLM's `solve_lloyd_max`: Lloyd–Max
//! for a Gaussian of variance `1/d` (not the exact law of [`crate::lloyd_max`]), from levels
//! spread evenly over ±3.5σ, cells closed at ±10.5σ, both cell integrals by the trapezoid rule
//! on 200 intervals, at most 200 rounds (a round that moves no level by `10⁻¹⁰` or more ends
//! without being taken), then rounded to f32 ([`codebook`] repeats it operation for
//! operation in f64). **Values**, per token and head over all `d`, in f32: `m = min v`,
//! `s = max((max v − m) / (2^b − 1), 10⁻⁸)`, code `min(⌊(v − m) / s + 0.5⌋, 2^b − 1)`; stored
//! `f16(s)`, `f16(m)`; decoded `code · s + m` from the f16 fields.
//!
//! Byte equality with a GPU's cache holds up to floating point vLLM does not pin down (its f32
//! matrix product for `H x`, Triton's f32 division): a code can differ by one where a value
//! sits on a boundary.
//!
//! ```
//! use rotq_reference::turboquant::vllm::Preset;
//! let p = Preset::FourBitNc;
//! assert_eq!(p.slot_bytes(128).unwrap(), 134);
//! // A key like a random one (normal coordinates): what the Gaussian codebook is made for.
//! let key: Vec<f32> = rotq_reference::turboquant::sketch_matrix(128, 5).unwrap()[..128]
//!     .iter().map(|&x| x as f32).collect();
//! let value: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin()).collect();
//! let mut slot = vec![0u8; 134];
//! p.encode_slot(&key, &value, &mut slot).unwrap();
//! let (k, v) = p.decode_slot(&slot, 128).unwrap();
//! let rel = |a: &[f32], b: &[f32]| {
//!     let e: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
//!     (e / b.iter().map(|y| y * y).sum::<f32>()).sqrt()
//! };
//! assert!(rel(&k, &key) < 0.15); // 4-bit codebook: about √0.0093 of the norm
//! assert!(rel(&v, &value) < 0.1);
//! ```

use super::{pack, unpack};
use crate::format::fp8::{e4m3_decode, e4m3_encode};
use crate::{Error, Result, Rotation};
use half::f16;

/// One of vLLM's TurboQuant cache presets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Preset {
    /// `turboquant_k8v4`: FP8 keys, 4-bit values.
    K8V4,
    /// `turboquant_4bit_nc`: 4-bit codebook keys, 4-bit values.
    FourBitNc,
    /// `turboquant_k3v4_nc`: 3-bit codebook keys, 4-bit values.
    K3V4Nc,
    /// `turboquant_3bit_nc`: 3-bit codebook keys, 3-bit values.
    ThreeBitNc,
}

impl Preset {
    /// Every preset.
    pub const ALL: [Preset; 4] = [
        Preset::K8V4,
        Preset::FourBitNc,
        Preset::K3V4Nc,
        Preset::ThreeBitNc,
    ];

    /// vLLM's `--kv-cache-dtype` name.
    ///
    /// ```
    /// assert_eq!(rotq_reference::turboquant::vllm::Preset::K3V4Nc.name(), "turboquant_k3v4_nc");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Preset::K8V4 => "turboquant_k8v4",
            Preset::FourBitNc => "turboquant_4bit_nc",
            Preset::K3V4Nc => "turboquant_k3v4_nc",
            Preset::ThreeBitNc => "turboquant_3bit_nc",
        }
    }

    /// Bits per key coordinate of the codebook presets (`None`: FP8 keys).
    pub fn key_bits(self) -> Option<u32> {
        match self {
            Preset::K8V4 => None,
            Preset::FourBitNc => Some(4),
            Preset::K3V4Nc | Preset::ThreeBitNc => Some(3),
        }
    }

    /// Bits per value coordinate.
    pub fn value_bits(self) -> u32 {
        match self {
            Preset::ThreeBitNc => 3,
            _ => 4,
        }
    }

    fn check_dim(self, d: usize) -> Result<()> {
        if !(1..=super::MAX_DIM).contains(&d)
            || !d.is_multiple_of(8)
            || (self.key_bits().is_some() && !d.is_power_of_two())
        {
            return Err(Error::InvalidParameter {
                name: "head dimension",
                reason: format!(
                    "{} takes a multiple of 8 up to 4096 (a power of two for its Hadamard \
                     keys), not {d}",
                    self.name()
                ),
            });
        }
        Ok(())
    }

    /// Bytes of a key, `⌈d · b / 8⌉ + 2` (codebook) or `d` (FP8).
    pub fn key_bytes(self, d: usize) -> Result<usize> {
        self.check_dim(d)?;
        Ok(match self.key_bits() {
            Some(b) => (d * b as usize).div_ceil(8) + 2,
            None => d,
        })
    }

    /// Bytes of a value, `⌈d · b / 8⌉ + 4`.
    pub fn value_bytes(self, d: usize) -> Result<usize> {
        self.check_dim(d)?;
        Ok((d * self.value_bits() as usize).div_ceil(8) + 4)
    }

    /// Bytes of a slot: key and value, rounded up to an even count.
    pub fn slot_bytes(self, d: usize) -> Result<usize> {
        let n = self.key_bytes(d)? + self.value_bytes(d)?;
        Ok(n + n % 2)
    }

    /// Writes one token's `key` and `value` (`d` values each) into `slot` (exactly
    /// [`Self::slot_bytes`] long), as vLLM's store kernels do.
    pub fn encode_slot(self, key: &[f32], value: &[f32], slot: &mut [u8]) -> Result<()> {
        let d = key.len();
        check(self, d, value.len(), slot.len())?;
        let kb = self.key_bytes(d)?;
        let (k_out, rest) = slot.split_at_mut(kb);
        let vb = self.value_bytes(d)?;
        let (v_out, pad) = rest.split_at_mut(vb);
        pad.fill(0);
        self.key_part().encode(key, k_out)?;
        self.value_part().encode(value, v_out)
    }

    /// The key and value a slot of heads of `d` values stands for (the key rotated back).
    pub fn decode_slot(self, slot: &[u8], d: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        check(self, d, d, slot.len())?;
        let kb = self.key_bytes(d)?;
        let vb = self.value_bytes(d)?;
        let (k_in, rest) = slot.split_at(kb);
        Ok((
            self.key_part().decode(k_in, d)?,
            self.value_part().decode(&rest[..vb], d)?,
        ))
    }

    /// The format of the slot's key part.
    pub fn key_part(self) -> Part {
        match self.key_bits() {
            None => Part::Fp8Key,
            Some(bits) => Part::Key { bits },
        }
    }

    /// The format of the slot's value part.
    pub fn value_part(self) -> Part {
        Part::Value {
            bits: self.value_bits(),
        }
    }
}

/// One part of a vLLM slot as a cache row of its own: what rotq's registry holds as the
/// `vllm_*` formats (a K cache of key parts, a V cache of value parts), byte for byte the
/// slot's bytes.
///
/// ```
/// use rotq_reference::turboquant::vllm::{Part, Preset};
/// let key: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
/// let value: Vec<f32> = (0..64).map(|i| (i as f32 * 0.11).cos()).collect();
/// let p = Preset::FourBitNc;
/// let mut slot = vec![0u8; p.slot_bytes(64).unwrap()];
/// p.encode_slot(&key, &value, &mut slot).unwrap();
/// let mut k = vec![0u8; p.key_part().row_bytes(64).unwrap()];
/// p.key_part().encode(&key, &mut k).unwrap();
/// assert_eq!(&slot[..k.len()], &k[..]);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// FP8 E4M3 keys (`turboquant_k8v4`): byte `i` is `e4m3(k_i)`, no scale, no rotation.
    Fp8Key,
    /// Codebook keys of `bits` (3 or 4): the key normalized, rotated by the Hadamard inside
    /// the format, coded against vLLM's codebook; its f16 norm after the codes.
    Key {
        /// Bits per coordinate.
        bits: u32,
    },
    /// Min-max values of `bits` (3 or 4): the codes, then the f16 scale and the f16 minimum.
    Value {
        /// Bits per coordinate.
        bits: u32,
    },
}

impl Part {
    /// Every part the presets use.
    pub const ALL: [Part; 5] = [
        Part::Fp8Key,
        Part::Key { bits: 4 },
        Part::Key { bits: 3 },
        Part::Value { bits: 4 },
        Part::Value { bits: 3 },
    ];

    /// The name rotq's registry gives it (`vllm_fp8`, `vllm_k4`, `vllm_k3`, `vllm_v4`,
    /// `vllm_v3`).
    pub fn name(self) -> &'static str {
        match self {
            Part::Fp8Key => "vllm_fp8",
            Part::Key { bits: 4 } => "vllm_k4",
            Part::Key { .. } => "vllm_k3",
            Part::Value { bits: 4 } => "vllm_v4",
            Part::Value { .. } => "vllm_v3",
        }
    }

    /// Bytes of a row of `d` values (what the preset's slot holds for it); `d` a multiple of
    /// 8 up to 4096, a power of two for the codebook keys (vLLM's Hadamard).
    pub fn row_bytes(self, d: usize) -> Result<usize> {
        match self {
            Part::Fp8Key => Preset::K8V4.key_bytes(d),
            Part::Key { bits: 4 } => Preset::FourBitNc.key_bytes(d),
            Part::Key { bits: 3 } => Preset::K3V4Nc.key_bytes(d),
            // Values have no Hadamard: any multiple of 8 (the FP8 preset checks just that).
            Part::Value { bits: b @ (3 | 4) } => {
                Preset::K8V4.value_bytes(d)?;
                Ok((d * b as usize).div_ceil(8) + 4)
            }
            _ => Err(Error::InvalidParameter {
                name: "vLLM slot part",
                reason: format!("{self:?}: vLLM's presets use 3 and 4 bits"),
            }),
        }
    }

    /// Writes one row (`d` values) into `out` (exactly [`Self::row_bytes`] long), as vLLM's
    /// store kernels write that part of a slot.
    pub fn encode(self, row: &[f32], out: &mut [u8]) -> Result<()> {
        let d = row.len();
        let want = self.row_bytes(d)?;
        if out.len() != want {
            return Err(Error::LengthMismatch {
                what: "vLLM slot part",
                expected: want,
                actual: out.len(),
            });
        }
        match self {
            Part::Fp8Key => {
                for (o, &k) in out.iter_mut().zip(row) {
                    *o = e4m3_encode(k);
                }
            }
            Part::Key { bits } => {
                // The norm in f32, as vLLM's `torch.norm` of the f32 key (its reduction order
                // may differ in the last bit: then so may the stored f16).
                let n32 = row.iter().map(|k| k * k).sum::<f32>().sqrt();
                let n = f64::from(n32);
                let mut y: Vec<f64> = row.iter().map(|&k| f64::from(k) / (n + 1e-8)).collect();
                Rotation::hadamard(d)?.forward_in_place(&mut y)?;
                let mids = midpoints(&codebook(d, bits)?);
                let codes: Vec<u8> = y
                    .iter()
                    .map(|&v| mids.iter().filter(|&&m| v as f32 >= m).count() as u8)
                    .collect();
                let (code_bytes, norm) = out.split_at_mut(want - 2);
                pack(&codes, bits, code_bytes);
                norm.copy_from_slice(&f16::from_f32(n32).to_bits().to_le_bytes());
            }
            Part::Value { bits } => {
                let top = ((1u32 << bits) - 1) as f32;
                // The first of equal extremes (so −0 and +0 store as they come, as a kernel
                // scanning the row keeps them; `f32::min` may return either).
                let lo = row[1..]
                    .iter()
                    .fold(row[0], |m, &v| if v < m { v } else { m });
                let hi = row[1..]
                    .iter()
                    .fold(row[0], |m, &v| if v > m { v } else { m });
                let s = (hi - lo) / top;
                let s = if s > 1e-8 { s } else { 1e-8 };
                let codes: Vec<u8> = row
                    .iter()
                    .map(|&v| (((v - lo) / s + 0.5) as i32).clamp(0, top as i32) as u8)
                    .collect();
                let (code_bytes, fields) = out.split_at_mut(want - 4);
                pack(&codes, bits, code_bytes);
                fields[..2].copy_from_slice(&f16::from_f32(s).to_bits().to_le_bytes());
                fields[2..].copy_from_slice(&f16::from_f32(lo).to_bits().to_le_bytes());
            }
        }
        Ok(())
    }

    /// Writes the row that decodes to NaN everywhere (rotq's registry stores a row holding a
    /// NaN or an infinity so; vLLM leaves such rows undefined): FP8 codes `0x7F`, or zero
    /// codes and f16 NaN (`0x7E00`) fields.
    pub fn poison(self, out: &mut [u8]) {
        let nan = 0x7E00u16.to_le_bytes();
        match self {
            Part::Fp8Key => out.fill(0x7F),
            Part::Key { .. } => {
                out.fill(0);
                let n = out.len();
                out[n - 2..].copy_from_slice(&nan);
            }
            Part::Value { .. } => {
                out.fill(0);
                let n = out.len();
                out[n - 4..n - 2].copy_from_slice(&nan);
                out[n - 2..].copy_from_slice(&nan);
            }
        }
    }

    /// The `d` values a row of this part stands for (a key rotated back).
    pub fn decode(self, bytes: &[u8], d: usize) -> Result<Vec<f32>> {
        let want = self.row_bytes(d)?;
        if bytes.len() != want {
            return Err(Error::LengthMismatch {
                what: "vLLM slot part",
                expected: want,
                actual: bytes.len(),
            });
        }
        Ok(match self {
            Part::Fp8Key => bytes.iter().map(|&c| e4m3_decode(c)).collect(),
            Part::Key { bits } => {
                let levels = codebook(d, bits)?;
                let codes = unpack(&bytes[..want - 2], bits, d);
                let c: Vec<f64> = codes
                    .iter()
                    .map(|&i| f64::from(levels[usize::from(i)]))
                    .collect();
                let norm = f64::from(f16_at(bytes, want - 2));
                let unit = (c.iter().map(|v| v * v).sum::<f64>() + 1e-16).sqrt();
                let mut k: Vec<f64> = c.iter().map(|v| norm * v / unit).collect();
                Rotation::hadamard(d)?.inverse_in_place(&mut k)?;
                k.into_iter().map(|v| v as f32).collect()
            }
            Part::Value { bits } => {
                let (s, m) = (f16_at(bytes, want - 4), f16_at(bytes, want - 2));
                unpack(&bytes[..want - 4], bits, d)
                    .into_iter()
                    .map(|c| f32::from(c).mul_add(s, m)) // one rounding, as Triton fuses it
                    .collect()
            }
        })
    }
}

fn check(p: Preset, d: usize, value_len: usize, slot_len: usize) -> Result<()> {
    if value_len != d {
        return Err(Error::LengthMismatch {
            what: "value row (the key's length)",
            expected: d,
            actual: value_len,
        });
    }
    let want = p.slot_bytes(d)?;
    if slot_len != want {
        return Err(Error::LengthMismatch {
            what: "TurboQuant slot",
            expected: want,
            actual: slot_len,
        });
    }
    Ok(())
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// vLLM's codebook for heads of `d` values at `bits` bits: its `solve_lloyd_max(d, bits)`,
/// operation for operation in f64 (see the module docs), rounded to f32; ascending.
///
/// ```
/// let c = rotq_reference::turboquant::vllm::codebook(128, 3).unwrap();
/// assert_eq!(c.len(), 8);
/// assert_eq!(c[7].to_bits(), 0x3e42a09f); // as vLLM's solver gives it
/// ```
pub fn codebook(d: usize, bits: u32) -> Result<Vec<f32>> {
    // vLLM caches its solver's result per (d, bits) too.
    static CACHE: crate::lloyd_max::Codebooks<f32> = std::sync::OnceLock::new();
    crate::lloyd_max::cached(&CACHE, d, bits, solve)
}

/// [`codebook`] computed.
fn solve(d: usize, bits: u32) -> Result<Vec<f32>> {
    if !(1..=super::MAX_DIM).contains(&d) || !(1..=8).contains(&bits) {
        return Err(Error::InvalidParameter {
            name: "vLLM codebook",
            reason: format!("needs d >= 1 and 1 to 8 bits, not d = {d}, {bits} bits"),
        });
    }
    let n_levels = 1usize << bits;
    let sigma2 = 1.0 / d as f64;
    let sigma = sigma2.sqrt();
    let pdf = |x: f64| {
        (1.0 / (2.0 * std::f64::consts::PI * sigma2).sqrt()) * (-x * x / (2.0 * sigma2)).exp()
    };
    let trapz = |f: &dyn Fn(f64) -> f64, a: f64, b: f64| {
        let n = 200;
        let h = (b - a) / n as f64;
        let mut result = 0.5 * (f(a) + f(b));
        for i in 1..n {
            result += f(a + i as f64 * h);
        }
        result * h
    };
    let (lo, hi) = (-3.5 * sigma, 3.5 * sigma);
    let mut centroids: Vec<f64> = (0..n_levels)
        .map(|i| lo + (hi - lo) * (i as f64 + 0.5) / n_levels as f64)
        .collect();
    for _ in 0..200 {
        let mut edges = vec![lo * 3.0];
        edges.extend((0..n_levels - 1).map(|i| (centroids[i] + centroids[i + 1]) / 2.0));
        edges.push(hi * 3.0);
        let new: Vec<f64> = (0..n_levels)
            .map(|i| {
                let (a, b) = (edges[i], edges[i + 1]);
                let num = trapz(&|x| x * pdf(x), a, b);
                let den = trapz(&pdf, a, b);
                if den > 1e-15 {
                    num / den
                } else {
                    centroids[i]
                }
            })
            .collect();
        let moved = new
            .iter()
            .zip(&centroids)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        if moved < 1e-10 {
            break;
        }
        centroids = new;
    }
    Ok(centroids.into_iter().map(|c| c as f32).collect())
}

/// The f32 decision boundaries of a codebook: `(c_i + c_(i+1)) / 2` in f32, as vLLM's store
/// kernel computes them.
pub fn midpoints(levels: &[f32]) -> Vec<f32> {
    levels.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect()
}
