//! The TurboQuant row formats (`tq2` … `tq4_qjl`) on the CPU: quantize and dequantize one head
//! row, bit for bit the bytes and values of `rotq_reference::turboquant::formats`, whose
//! "Arithmetic" paragraph fixes every operation's order so that this code can vectorize it.
//!
//! The one trick: the oracle codes `y_i` by counting the midpoints `m` with `y_i ≥ m · ‖y‖` in
//! f64. For an f32 `y_i` that is exactly `y_i ≥ T`, `T` the smallest f32 at or above `m · ‖y‖`,
//! so each row computes its thresholds once and the codes come from f32 compares, eight or more
//! values per instruction, with no division.
//!
//! The QJL formats multiply by their `d × d` sketch (f64, as the oracle's), once to encode and
//! once to decode a row: exact but slow (about `2 d²` operations a row), kept for
//! correctness; the MSE formats are the fast ones.

use crate::isa::Isa;
use half::f16;
use rotq_reference::turboquant::formats::{stored_f16, RowFormat, QJL_SEED};
use rotq_reference::turboquant::{self, sketch_matrix, Mse};
use std::cell::RefCell;
use std::sync::{Arc, Mutex};

/// What a row format needs for rows of one length: its codebook and, with QJL, its sketch.
#[derive(Debug)]
pub(crate) struct Tables {
    row: RowFormat,
    d: usize,
    /// Bits of the MSE indices.
    bits: u32,
    /// The codebook's levels, ascending.
    levels: Vec<f64>,
    /// Midpoints of consecutive levels.
    mids: Vec<f64>,
    /// The levels squared and rounded to f32, padded with zeros to 16 (a lookup table).
    levels_sq: [f32; 16],
    /// The levels rounded to f32, padded with zeros to 16 (what MSE rows decode to).
    pub(crate) levels_f32: [f32; 16],
    /// QJL: `S` row-major and `Sᵀ` row-major (`d × d` each).
    sketch: Option<(Vec<f64>, Vec<f64>)>,
}

impl Tables {
    fn new(row: RowFormat, d: usize) -> Self {
        let (bits, norm_correction) = match row {
            RowFormat::Mse { bits } => (bits, true),
            RowFormat::Prod { bits } => (bits - 1, false),
        };
        // Callers checked the format and length (`row_bytes`), so the codebook exists.
        let mse = Mse::new(d, bits, norm_correction).expect("a checked format and length");
        let sketch = matches!(row, RowFormat::Prod { .. }).then(|| {
            let s = sketch_matrix(d, QJL_SEED).expect("a checked length");
            let mut t = vec![0f64; d * d];
            for (j, srow) in s.chunks_exact(d).enumerate() {
                for (i, v) in srow.iter().enumerate() {
                    t[i * d + j] = *v;
                }
            }
            (s, t)
        });
        let (mut levels_sq, mut levels_f32) = ([0f32; 16], [0f32; 16]);
        for ((o, f), l) in levels_sq.iter_mut().zip(&mut levels_f32).zip(mse.levels()) {
            *o = (l * l) as f32;
            *f = *l as f32;
        }
        Self {
            row,
            d,
            bits,
            levels_sq,
            levels_f32,
            levels: mse.levels().to_vec(),
            mids: mse.midpoints(),
            sketch,
        }
    }
}

/// Tables built so far (a handful: one per format and head length in use), oldest first.
static TABLES: Mutex<Vec<Arc<Tables>>> = Mutex::new(Vec::new());
/// At most this many tables are kept (a QJL table at d = 1024 is 16 MiB).
const MAX_TABLES: usize = 8;

thread_local! {
    /// The last tables this thread used: rows of a cache share them, so most calls stop here.
    static LAST: RefCell<Option<Arc<Tables>>> = const { RefCell::new(None) };
}

/// Runs `f` on the tables of `row` for rows of `d` values (`row.row_bytes(d)` must be `Ok`);
/// a thread that reads one cache finds them in its own slot, with no lock and no count.
pub(crate) fn with_tables<R>(row: RowFormat, d: usize, f: impl FnOnce(&Tables) -> R) -> R {
    LAST.with(|last| {
        let hit = last
            .borrow()
            .as_ref()
            .is_some_and(|t| t.row == row && t.d == d);
        if !hit {
            let mut all = TABLES.lock().unwrap_or_else(|e| e.into_inner());
            let t = match all.iter().find(|t| t.row == row && t.d == d) {
                Some(t) => t.clone(),
                None => {
                    let t = Arc::new(Tables::new(row, d));
                    if all.len() == MAX_TABLES {
                        all.remove(0);
                    }
                    all.push(t.clone());
                    t
                }
            };
            *last.borrow_mut() = Some(t);
        }
        let guard = last.borrow();
        f(guard.as_ref().expect("set above"))
    })
}

/// The 4-bit MSE codebook of rows of `d` values as f32 (what the attention kernels' register
/// path looks values up in; `d` must be a length `tq4` takes).
#[cfg(target_arch = "x86_64")]
pub(crate) fn tq4_levels(d: usize) -> [f32; 16] {
    with_tables(RowFormat::Mse { bits: 4 }, d, |t| t.levels_f32)
}

/// `Σ y²` of an f32 row in the oracle's order (lanes kept apart, so it vectorizes).
fn sum_squares_f32(y: &[f32]) -> f64 {
    let mut p = [0f64; 8];
    for c in y.chunks_exact(8) {
        for (acc, &v) in p.iter_mut().zip(c) {
            let v = f64::from(v);
            *acc += v * v;
        }
    }
    let t = [p[0] + p[4], p[1] + p[5], p[2] + p[6], p[3] + p[7]];
    (t[0] + t[2]) + (t[1] + t[3])
}

/// The smallest f32 at or above `v` (NaN stays NaN): for an f32 `y`, `y ≥ v ⟺ y ≥ ceil(v)`.
fn ceil_f32(v: f64) -> f32 {
    let f = v as f32;
    if f64::from(f) < v {
        f.next_up()
    } else {
        f
    }
}

/// Packs `w`-bit codes (`w ≤ 4`, a multiple of 8 of them) LSB first: 8 codes make `w` bytes.
fn pack(codes: &[u8], w: u32, out: &mut [u8]) {
    if w == 4 {
        // Eight codes as one word: nibble pairs, then bytes, folded together.
        for (c, o) in codes.chunks_exact(8).zip(out.chunks_exact_mut(4)) {
            let x = u64::from_le_bytes(c.try_into().expect("chunks of 8"));
            let x = (x | x >> 4) & 0x00FF_00FF_00FF_00FF;
            let x = (x | x >> 8) & 0x0000_FFFF_0000_FFFF;
            let x = (x | x >> 16) as u32;
            o.copy_from_slice(&x.to_le_bytes());
        }
        return;
    }
    for (c, o) in codes.chunks_exact(8).zip(out.chunks_exact_mut(w as usize)) {
        let word = c
            .iter()
            .enumerate()
            .fold(0u32, |acc, (j, &v)| acc | u32::from(v) << (w as usize * j));
        o.copy_from_slice(&word.to_le_bytes()[..w as usize]);
    }
}

/// The `w`-bit codes of [`pack`] into `codes`.
fn unpack(bytes: &[u8], w: u32, codes: &mut [u8]) {
    let mask = (1u32 << w) - 1;
    for (c, b) in codes
        .chunks_exact_mut(8)
        .zip(bytes.chunks_exact(w as usize))
    {
        let mut le = [0u8; 4];
        le[..w as usize].copy_from_slice(b);
        let word = u32::from_le_bytes(le);
        for (j, v) in c.iter_mut().enumerate() {
            *v = (word >> (w as usize * j) & mask) as u8;
        }
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f64 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f64()
}

fn put_f16(out: &mut [u8], at: usize, v: f64) {
    out[at..at + 2].copy_from_slice(&stored_f16(v).to_le_bytes());
}

thread_local! {
    /// Per-thread scratch: codes, and f64 rows for the QJL residual and sums.
    static SCRATCH: RefCell<(Vec<u8>, Vec<f64>, Vec<f64>)> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Counts, for every value of `y`, the thresholds at or below it (the codes), in `codes`.
#[inline(always)]
fn count_codes(y: &[f32], thresholds: &[f32], codes: &mut [u8]) {
    for (yc, cc) in y.chunks_exact(8).zip(codes.chunks_exact_mut(8)) {
        let mut n = [0u32; 8];
        for &th in thresholds {
            for (c, &v) in n.iter_mut().zip(yc) {
                *c += u32::from(v >= th);
            }
        }
        for (o, c) in cc.iter_mut().zip(n) {
            *o = c as u8;
        }
    }
}

/// For a branch-free binary search over `2^bits − 1` ascending thresholds: per step (step size
/// `st = 2^(bits−1)`, then halving), the thresholds `T[k · 2st + st − 1]` it may compare with,
/// at most eight, so that one register holds them and the search index shifted right by
/// `log2(2st)` picks one.
#[cfg(target_arch = "x86_64")]
fn search_tables(th: &[f32; 16], bits: u32) -> [[f32; 8]; 4] {
    let mut out = [[f32::INFINITY; 8]; 4];
    for (s, table) in out.iter_mut().enumerate().take(bits as usize) {
        let st = 1usize << (bits as usize - 1 - s);
        for (k, t) in table.iter_mut().enumerate().take((1 << bits) / (2 * st)) {
            *t = th[k * 2 * st + st - 1];
        }
    }
    out
}

/// `Σ c²` of the levels codes pick, in the oracle's order
/// (`rotq_reference::turboquant::formats::level_energy`): f32 lanes by index.
fn level_energy(codes: &[u8], levels_sq: &[f32; 16]) -> f32 {
    let mut p = [0f32; 8];
    for c in codes.chunks_exact(8) {
        for (acc, &k) in p.iter_mut().zip(c) {
            *acc += levels_sq[usize::from(k)];
        }
    }
    let t = [p[0] + p[4], p[1] + p[5], p[2] + p[6], p[3] + p[7]];
    (t[0] + t[2]) + (t[1] + t[3])
}

/// The codes of `y` against the ascending thresholds `th` (`2^bits − 1` of them, padded with
/// `+∞`) by a branch-free binary search on eight values at a time (`bits` steps of a shift, a
/// permute, a compare and an add, where counting takes `2^bits − 1` compares), written to
/// `codes`; returns [`level_energy`] of them (the same f32 lanes, the same bits). The
/// thresholds must be ascending, so a row whose norm is not finite is left to [`count_codes`].
///
/// # Safety
/// The CPU must have AVX2; `y.len()` and `codes.len()` are equal multiples of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn search_codes_avx2(
    y: &[f32],
    th: &[f32; 16],
    bits: u32,
    levels_sq: &[f32; 16],
    codes: &mut [u8],
) -> f32 {
    // SAFETY: the caller's contract, passed on; one loop per code width, unrolled.
    unsafe {
        match bits {
            1 => search_codes_bits::<1>(y, th, levels_sq, codes),
            2 => search_codes_bits::<2>(y, th, levels_sq, codes),
            3 => search_codes_bits::<3>(y, th, levels_sq, codes),
            _ => search_codes_bits::<4>(y, th, levels_sq, codes),
        }
    }
}

/// [`search_codes_avx2`] for codes of `BITS` bits.
///
/// # Safety
/// As [`search_codes_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn search_codes_bits<const BITS: u32>(
    y: &[f32],
    th: &[f32; 16],
    levels_sq: &[f32; 16],
    codes: &mut [u8],
) -> f32 {
    use std::arch::x86_64::*;
    let bits = BITS;
    let tables = search_tables(th, bits);
    // SAFETY: AVX2 is enabled; every pointer below stays inside `y`, `codes` (chunks of 8),
    // `tables` and `levels_sq`.
    unsafe {
        let t = tables.map(|t| _mm256_loadu_ps(t.as_ptr()));
        let (sq_lo, sq_hi) = (
            _mm256_loadu_ps(levels_sq.as_ptr()),
            _mm256_loadu_ps(levels_sq.as_ptr().add(8)),
        );
        let mut acc = _mm256_setzero_ps();
        for (yc, cc) in y.chunks_exact(8).zip(codes.chunks_exact_mut(8)) {
            let v = _mm256_loadu_ps(yc.as_ptr());
            let mut idx = _mm256_setzero_si256();
            for (s, table) in t.iter().enumerate().take(bits as usize) {
                let shift = bits as i32 - s as i32;
                let st = 1i32 << (shift - 1);
                let at = _mm256_srlv_epi32(idx, _mm256_set1_epi32(shift));
                let th = _mm256_permutevar8x32_ps(*table, at);
                let ge = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(v, th));
                idx = _mm256_add_epi32(idx, _mm256_and_si256(ge, _mm256_set1_epi32(st)));
            }
            // c² of the code: the low three bits pick within a half, bit 3 (moved to the sign)
            // picks the half.
            let sq = _mm256_blendv_ps(
                _mm256_permutevar8x32_ps(sq_lo, idx),
                _mm256_permutevar8x32_ps(sq_hi, idx),
                _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx)),
            );
            acc = _mm256_add_ps(acc, sq);
            let p16 = _mm256_packus_epi32(idx, idx);
            let p8 = _mm256_packus_epi16(p16, p16);
            let lo = _mm256_cvtsi256_si32(p8) as u32;
            let hi = _mm_cvtsi128_si32(_mm256_extracti128_si256::<1>(p8)) as u32;
            cc[..4].copy_from_slice(&lo.to_le_bytes());
            cc[4..].copy_from_slice(&hi.to_le_bytes());
        }
        let mut p = [0f32; 8];
        _mm256_storeu_ps(p.as_mut_ptr(), acc);
        let t = [p[0] + p[4], p[1] + p[5], p[2] + p[6], p[3] + p[7]];
        (t[0] + t[2]) + (t[1] + t[3])
    }
}

/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_squares_f32_avx2(y: &[f32]) -> f64 {
    sum_squares_f32(y)
}

/// Quantizes one rotated row `y` (its length checked by the caller's `row_bytes`) into `out`.
pub(crate) fn quantize(row: RowFormat, y: &[f32], out: &mut [u8], isa: Isa) {
    let d = y.len();
    with_tables(row, d, |t| quantize_with(t, y, out, isa))
}

fn quantize_with(t: &Tables, y: &[f32], out: &mut [u8], isa: Isa) {
    let d = y.len();
    let n = match isa {
        // SAFETY: Isa::Avx2 is only used when the CPU has it.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { sum_squares_f32_avx2(y) },
        _ => sum_squares_f32(y),
    }
    .sqrt();
    let n_codes = d * t.bits as usize / 8;
    let mut th = [f32::INFINITY; 16];
    for (o, m) in th.iter_mut().zip(&t.mids) {
        *o = ceil_f32(m * n);
    }
    SCRATCH.with(|s| {
        let (codes, r, acc) = &mut *s.borrow_mut();
        codes.resize(d, 0);
        let codes = &mut codes[..d];
        let c_sq = match isa {
            // SAFETY: Isa::Avx2 is only used when the CPU has it; whole chunks of 8; a finite
            // norm makes the thresholds ascending.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if n.is_finite() => unsafe {
                search_codes_avx2(y, &th, t.bits, &t.levels_sq, codes)
            },
            _ => {
                count_codes(y, &th[..t.mids.len()], codes);
                level_energy(codes, &t.levels_sq)
            }
        };
        pack(codes, t.bits, &mut out[..n_codes]);
        let Some((_, st)) = &t.sketch else {
            // MSE: the scale that gives the row its norm back.
            put_f16(out, n_codes, n / f64::from(c_sq).sqrt());
            return;
        };
        put_f16(out, n_codes, n);
        // QJL: the residual from the stored norm, its signs under S, its norm.
        let n16 = f16_at(out, n_codes);
        r.clear();
        r.extend(
            y.iter()
                .zip(codes.iter())
                .map(|(&v, &c)| f64::from(v) - t.levels[usize::from(c)] * n16),
        );
        acc.clear();
        acc.resize(d, 0.0);
        // acc_j = Σ_i S_ji r_i, each in index order (i outer: the lanes are the j's).
        for (col, &ri) in st.chunks_exact(d).zip(r.iter()) {
            for (a, &s) in acc.iter_mut().zip(col) {
                *a += s * ri;
            }
        }
        let signs = &mut out[n_codes + 2..n_codes + 2 + d / 8];
        for (b, a) in signs.iter_mut().zip(acc.chunks_exact(8)) {
            *b = a
                .iter()
                .enumerate()
                .fold(0u8, |bits, (j, &v)| bits | u8::from(v >= 0.0) << j);
        }
        put_f16(out, n_codes + 2 + d / 8, turboquant::sum_squares(r).sqrt());
    });
}

/// Dequantizes one row (`out.len()` values, checked by the caller) from `bytes`.
pub(crate) fn dequantize(row: RowFormat, bytes: &[u8], out: &mut [f32]) {
    let d = out.len();
    with_tables(row, d, |t| dequantize_with(t, bytes, out))
}

fn dequantize_with(t: &Tables, bytes: &[u8], out: &mut [f32]) {
    let d = out.len();
    let n_codes = d * t.bits as usize / 8;
    let scale = f16_at(bytes, n_codes);
    SCRATCH.with(|s| {
        let (codes, y, _) = &mut *s.borrow_mut();
        codes.resize(d, 0);
        unpack(&bytes[..n_codes], t.bits, &mut codes[..d]);
        let Some((s, _)) = &t.sketch else {
            let s32 = scale as f32;
            for (o, c) in out.iter_mut().zip(codes.iter()) {
                *o = t.levels_f32[usize::from(*c)] * s32;
            }
            return;
        };
        y.clear();
        y.extend(codes[..d].iter().map(|c| t.levels[usize::from(*c)] * scale));
        let signs = &bytes[n_codes + 2..n_codes + 2 + d / 8];
        let k = f16_at(bytes, n_codes + 2 + d / 8) * (std::f64::consts::PI / 2.0).sqrt() / d as f64;
        for (j, srow) in s.chunks_exact(d).enumerate() {
            let z = if signs[j / 8] >> (j % 8) & 1 == 1 {
                k
            } else {
                -k
            };
            for (o, &v) in y.iter_mut().zip(srow) {
                *o += z * v;
            }
        }
        for (o, v) in out.iter_mut().zip(y.iter()) {
            *o = *v as f32;
        }
    });
}
