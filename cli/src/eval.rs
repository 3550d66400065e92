//! Which cache format, with or without rotation, keeps attention close to exact?
//!
//! [`Synthetic`] makes Q/K/V with the structure that makes K hard to quantize in real LLMs: a
//! few channels per head (4 of 128 by default) carry a large offset that is the same for every
//! token (±10…20 times an ordinary channel's spread, with a spread of 2), on top of ordinary
//! channels of unequal scale (spreads 0.5…1.5); Q and V are standard normal. [`evaluate`] runs the oracle's
//! rotated quantized attention for every format, without rotation and with a Hadamard
//! rotation, and measures the attention-output error and the KL divergence of the attention
//! probabilities against exact f64 attention.

use crate::Error;
use ndarray::{Array3, Axis};
use rotq_reference::metrics::{kl_divergence, rel_l2};
use rotq_reference::rotation::SplitMix64;
use rotq_reference::{
    attention, rotated_quantized_attention, Attention, AttentionParams, KvCacheSpec, KvFormat,
    Rotation, RotationPlan,
};
use serde::Serialize;
use std::fmt::Write as _;

/// Shape and statistics of synthetic activations.
///
/// ```
/// let acts = rotq_cli::eval::Synthetic { n_kv: 64, n_q: 4, ..Default::default() }.generate();
/// assert_eq!(acts.k.dim(), (64, 4, 128));
/// assert_eq!(acts.q.dim(), (4, 16, 128));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Synthetic {
    /// Cached tokens.
    pub n_kv: usize,
    /// Queries, at the last `n_q` positions (causal).
    pub n_q: usize,
    /// KV heads.
    pub h_kv: usize,
    /// Query heads per KV head.
    pub group: usize,
    /// Head dimension (Q, K and V).
    pub d: usize,
    /// Outlier channels per K head.
    pub outlier_channels: usize,
    /// Offset of the K outlier channels, in units of an ordinary channel's spread.
    pub outlier_magnitude: f64,
    /// Generator seed.
    pub seed: u64,
}

impl Default for Synthetic {
    fn default() -> Self {
        Self {
            n_kv: 1024,
            n_q: 16,
            h_kv: 4,
            group: 4,
            d: 128,
            outlier_channels: 4,
            outlier_magnitude: 20.0,
            seed: 0,
        }
    }
}

/// Q, K, V and the attention parameters they are meant for.
#[derive(Clone, Debug)]
pub struct Activations {
    /// `[n_q, h_q, d]`.
    pub q: Array3<f32>,
    /// `[n_kv, h_kv, d]`.
    pub k: Array3<f32>,
    /// `[n_kv, h_kv, d]`.
    pub v: Array3<f32>,
    /// Causal, queries at the end of the cache.
    pub params: AttentionParams,
}

/// Standard normal samples (Box–Muller over SplitMix64).
struct Normal(SplitMix64);

impl Normal {
    fn sample(&mut self) -> f64 {
        let u = 1.0 - self.0.next_f64(); // (0, 1]
        let v = self.0.next_f64();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

impl Synthetic {
    /// The shapes of the activations [`Synthetic::generate`] draws.
    ///
    /// ```
    /// let s = rotq_cli::eval::Synthetic { n_kv: 64, n_q: 4, ..Default::default() };
    /// assert_eq!(s.shape().q, (4, 16, 128));
    /// assert_eq!(s.shape(), s.generate().shape());
    /// ```
    pub fn shape(&self) -> LayerShape {
        let kv = (self.n_kv, self.h_kv, self.d);
        LayerShape {
            q: (self.n_q, self.h_kv.saturating_mul(self.group), self.d),
            k: kv,
            v: kv,
        }
    }

    /// Bytes that [`evaluate`] holds at its peak on these activations, or `None` when the
    /// sizes overflow 64 bits: Q, K, V in f32; the exact attention probabilities (f64) kept
    /// while each format runs with its own probabilities, its dequantized K and V (f64) and
    /// rotated Q; the outputs. About 24 bytes per K/V value and 16 per attention probability.
    ///
    /// ```
    /// let s = rotq_cli::eval::Synthetic { n_kv: 1024, ..Default::default() };
    /// let kv = 1024 * 4 * 128; // K or V values
    /// assert!(s.memory_needed().unwrap() > 24 * kv);
    /// assert_eq!(rotq_cli::eval::Synthetic { n_kv: usize::MAX, ..s }.memory_needed(), None);
    /// ```
    pub fn memory_needed(&self) -> Option<u64> {
        let s = self.shape().sizes()?;
        // K, V: f32 inputs + dequantized f64 caches (12 each); Q: f32 input and f64 rotated
        // copy (12); outputs: f64, and their flattened copies (32); probabilities: exact and
        // approximate (16).
        s.k.checked_add(s.v)?
            .checked_add(s.q)?
            .checked_mul(12)?
            .checked_add(s.out.checked_mul(32)?)?
            .checked_add(s.probs.checked_mul(16)?)
    }

    /// Checks, before anything is allocated, that [`evaluate`] on these activations fits in the
    /// memory available (see [`check_memory`]). Returns the bytes it needs.
    ///
    /// ```
    /// use rotq_cli::eval::Synthetic;
    /// assert!(Synthetic { n_kv: 64, ..Default::default() }.check_memory().is_ok());
    /// let err = Synthetic { n_kv: usize::MAX, ..Default::default() }.check_memory().unwrap_err();
    /// assert!(err.to_string().contains("overflow"), "{err}");
    /// ```
    pub fn check_memory(&self) -> Result<u64, Error> {
        check_memory(self.memory_needed())
    }

    /// Draws the activations (deterministic for a given configuration).
    pub fn generate(&self) -> Activations {
        let mut g = Normal(SplitMix64::new(self.seed));
        let (d, h_kv) = (self.d, self.h_kv);
        // Per (head, channel): mean and spread of K; ordinary channels have spreads 0.5..1.5.
        let mut k_mean = vec![0.0f64; h_kv * d];
        let mut k_std = vec![0.0f64; h_kv * d];
        for h in 0..h_kv {
            for c in 0..d {
                k_std[h * d + c] = 0.5 + g.0.next_f64();
            }
            for _ in 0..self.outlier_channels.min(d) {
                let c = (g.0.next_u64() % d as u64) as usize;
                let sign = if g.0.next_u64() >> 63 == 0 { 1.0 } else { -1.0 };
                k_mean[h * d + c] = sign * self.outlier_magnitude * (0.5 + 0.5 * g.0.next_f64());
                k_std[h * d + c] = 1.0 + 0.05 * self.outlier_magnitude;
            }
        }
        let k = Array3::from_shape_fn((self.n_kv, h_kv, d), |(_, h, c)| {
            (k_mean[h * d + c] + k_std[h * d + c] * g.sample()) as f32
        });
        let v = Array3::from_shape_fn((self.n_kv, h_kv, d), |_| g.sample() as f32);
        let q = Array3::from_shape_fn((self.n_q, h_kv * self.group, d), |_| g.sample() as f32);
        Activations {
            q,
            k,
            v,
            params: AttentionParams {
                causal: true,
                pos_offset: self.n_kv.saturating_sub(self.n_q),
                ..Default::default()
            },
        }
    }
}

/// The shapes of one layer's activations, `[tokens, heads, dim]` each: Q `[n_q, h_q, d]`, K
/// `[n_kv, h_kv, d]`, V `[n_kv, h_kv, d_v]`. They decide an evaluation's memory, and are known
/// from a dump's headers before any value is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerShape {
    /// Q's shape.
    pub q: (usize, usize, usize),
    /// K's shape.
    pub k: (usize, usize, usize),
    /// V's shape.
    pub v: (usize, usize, usize),
}

/// How many values of each kind a layer has (see [`LayerShape::sizes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerSizes {
    /// Values of Q.
    pub q: u64,
    /// Values of K.
    pub k: u64,
    /// Values of V.
    pub v: u64,
    /// Values of the attention output, `n_q · h_q · d_v`.
    pub out: u64,
    /// Attention probabilities, `h_q · n_q · n_kv`.
    pub probs: u64,
}

impl LayerShape {
    /// The value counts of this layer, or `None` when one overflows 64 bits.
    ///
    /// ```
    /// use rotq_cli::eval::LayerShape;
    /// let s = LayerShape { q: (2, 8, 64), k: (10, 4, 64), v: (10, 4, 32) };
    /// let n = s.sizes().unwrap();
    /// assert_eq!((n.q, n.k, n.v, n.out, n.probs), (1024, 2560, 1280, 512, 160));
    /// ```
    pub fn sizes(&self) -> Option<LayerSizes> {
        let n = |x: usize| u64::try_from(x).ok();
        let count = |(a, b, c): (usize, usize, usize)| n(a)?.checked_mul(n(b)?)?.checked_mul(n(c)?);
        let ((n_q, h_q, _), (n_kv, _, _), (_, _, d_v)) = (self.q, self.k, self.v);
        Some(LayerSizes {
            q: count(self.q)?,
            k: count(self.k)?,
            v: count(self.v)?,
            out: count((n_q, h_q, d_v))?,
            probs: count((h_q, n_q, n_kv))?,
        })
    }
}

impl Activations {
    /// The shapes of Q, K and V.
    pub fn shape(&self) -> LayerShape {
        LayerShape {
            q: self.q.dim(),
            k: self.k.dim(),
            v: self.v.dim(),
        }
    }
}

/// Checks that an evaluation needing `needed` bytes (`None`: more than 64 bits can count) fits
/// in the memory available: on Linux `MemAvailable` and the address-space limit; elsewhere only
/// that the sizes fit in 64 bits. Returns the bytes needed; the error names them and what is
/// available.
///
/// ```
/// use rotq_cli::eval::check_memory;
/// assert_eq!(check_memory(Some(1 << 20)).unwrap(), 1 << 20);
/// assert!(check_memory(None).unwrap_err().to_string().contains("overflow"));
/// ```
pub fn check_memory(needed: Option<u64>) -> Result<u64, Error> {
    let Some(needed) = needed else {
        return Err(Error::Input(
            "the evaluation's sizes overflow 64 bits (it would need more than 16 EiB of memory)"
                .into(),
        ));
    };
    match available_memory() {
        Some(available) if needed > available => Err(Error::Input(format!(
            "the evaluation needs about {} of memory; {} is available",
            human_bytes(needed),
            human_bytes(available)
        ))),
        _ => Ok(needed),
    }
}

/// Memory this process can still take: the smaller of the system's available memory and the
/// address-space limit (Linux; `None` where neither can be read).
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let available = meminfo.as_deref().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    });
    let limits = std::fs::read_to_string("/proc/self/limits").ok();
    let address_space = limits.as_deref().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("Max address space"))?;
        // "Max address space  <soft>  <hard>  bytes"; "unlimited" parses to nothing.
        line["Max address space".len()..]
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
    });
    match (available, address_space) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A byte count with three significant digits (`1.23 TiB`).
///
/// ```
/// assert_eq!(rotq_cli::eval::human_bytes(3 << 29), "1.50 GiB");
/// assert_eq!(rotq_cli::eval::human_bytes(1000), "1000 B");
/// ```
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let digits = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    format!("{value:.digits$} {}", UNITS[unit])
}

/// Which caches hold the format under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// K in the format, V in f32: isolates the K cache.
    KOnly,
    /// K and V both in the format.
    KAndV,
}

/// One line of the quality table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalRow {
    /// The format under test.
    #[serde(serialize_with = "format_name")]
    pub format: KvFormat,
    /// Its storage cost.
    pub bits_per_value: f64,
    /// Which caches use it.
    pub scope: Scope,
    /// ‖out − exact‖ / ‖exact‖ without rotation.
    pub rel_l2_plain: f64,
    /// The same with Hadamard rotation (Q+K, and V when V is quantized).
    pub rel_l2_rotated: f64,
    /// Mean KL(exact ‖ quantized) over attention rows, without rotation.
    pub kld_plain: f64,
    /// The same with rotation.
    pub kld_rotated: f64,
}

fn format_name<S: serde::Serializer>(f: &KvFormat, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(f.name())
}

impl EvalRow {
    /// How many times rotation cuts the attention-output error.
    pub fn rel_l2_gain(&self) -> f64 {
        self.rel_l2_plain / self.rel_l2_rotated
    }

    /// How many times rotation cuts the mean KLD.
    pub fn kld_gain(&self) -> f64 {
        self.kld_plain / self.kld_rotated
    }
}

/// Mean KL divergence between the attention rows of `exact` and `approx`.
fn mean_kld(exact: &Attention, approx: &Attention) -> f64 {
    let rows: Vec<f64> = exact
        .probs
        .lanes(Axis(2))
        .into_iter()
        .zip(approx.probs.lanes(Axis(2)))
        .map(|(p, q)| kl_divergence(&p.to_vec(), &q.to_vec()))
        .collect();
    rows.iter().sum::<f64>() / rows.len().max(1) as f64
}

/// Measures every format in `formats`, for K only and for K+V, without and with rotation.
///
/// ```
/// use rotq_cli::eval::{evaluate, Scope, Synthetic};
/// use rotq::KvFormat;
/// let acts = Synthetic { n_kv: 128, n_q: 4, ..Default::default() }.generate();
/// let rows = evaluate(&acts, &[KvFormat::Q8_0]).unwrap();
/// assert_eq!(rows.len(), 2);
/// assert_eq!(rows[0].scope, Scope::KOnly);
/// assert!(rows[0].rel_l2_rotated < 0.05);
/// ```
pub fn evaluate(acts: &Activations, formats: &[KvFormat]) -> Result<Vec<EvalRow>, Error> {
    let (q, k, v) = (acts.q.view(), acts.k.view(), acts.v.view());
    let d = acts.q.dim().2;
    let exact = attention(q, k, v, &acts.params)?;
    let exact_out: Vec<f64> = exact.output.iter().copied().collect();
    let hadamard = Rotation::hadamard(d)?;
    let mut rows = Vec::new();
    for &format in formats {
        for scope in [Scope::KOnly, Scope::KAndV] {
            let v_format = if scope == Scope::KOnly {
                KvFormat::F32
            } else {
                format
            };
            let run = |plan: RotationPlan| -> Result<(f64, f64), Error> {
                let spec = KvCacheSpec {
                    k_format: format,
                    v_format,
                    plan,
                };
                let a = rotated_quantized_attention(q, k, v, &acts.params, &spec)?;
                let out: Vec<f64> = a.output.iter().copied().collect();
                Ok((rel_l2(&out, &exact_out), mean_kld(&exact, &a)))
            };
            let (rel_l2_plain, kld_plain) = run(RotationPlan::none())?;
            let rotated_v = (scope == Scope::KAndV).then(|| hadamard.clone());
            let (rel_l2_rotated, kld_rotated) = run(RotationPlan {
                qk: Some(hadamard.clone()),
                v: rotated_v,
            })?;
            rows.push(EvalRow {
                format,
                bits_per_value: format
                    .bits_per_value_at(d)
                    .unwrap_or(format.bits_per_value()),
                scope,
                rel_l2_plain,
                rel_l2_rotated,
                kld_plain,
                kld_rotated,
            });
        }
    }
    Ok(rows)
}

/// The formats worth comparing, most bits first (f32 is exact and left out, and so are the
/// parts of vLLM's slots, which rotate inside and so take a plan of their own: ask for them).
pub fn default_formats() -> Vec<KvFormat> {
    let mut f: Vec<KvFormat> = KvFormat::ALL
        .into_iter()
        .filter(|f| *f != KvFormat::F32 && !KvFormat::VLLM.contains(f))
        .collect();
    f.sort_by(|a, b| b.bits_per_value().total_cmp(&a.bits_per_value()));
    f
}

/// A fixed-width text table of the rows.
pub fn render_table(rows: &[EvalRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<9} {:>5} {:<6} | {:>10} {:>10} {:>6} | {:>10} {:>10} {:>6}",
        "format", "bits", "cache", "err plain", "err rot", "gain", "KLD plain", "KLD rot", "gain"
    );
    let _ = writeln!(s, "{}", "-".repeat(88));
    for r in rows {
        let scope = match r.scope {
            Scope::KOnly => "K",
            Scope::KAndV => "K+V",
        };
        let _ = writeln!(
            s,
            "{:<9} {:>5.2} {:<6} | {:>10.3e} {:>10.3e} {:>5.2}x | {:>10.3e} {:>10.3e} {:>5.2}x",
            r.format.name(),
            r.bits_per_value,
            scope,
            r.rel_l2_plain,
            r.rel_l2_rotated,
            r.rel_l2_gain(),
            r.kld_plain,
            r.kld_rotated,
            r.kld_gain()
        );
    }
    s
}

/// A rotation plan compared by [`evaluate_grid`].
///
/// ```
/// use rotq_cli::eval::PlanKind;
/// let plan = PlanKind::HadamardAndV.plan(128, 128, 0).unwrap();
/// assert!(plan.qk.is_some() && plan.v.is_some());
/// assert!(PlanKind::None.plan(128, 128, 0).unwrap().qk.is_none());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanKind {
    /// No rotation.
    None,
    /// Hadamard on Q and K.
    Hadamard,
    /// Randomized Hadamard (seeded signs) on Q and K.
    Randomized,
    /// Hadamard on Q and K, and blocks of 32 on V.
    HadamardAndV,
}

impl PlanKind {
    /// Every plan, in the order the table shows them.
    pub const ALL: [PlanKind; 4] = [
        PlanKind::None,
        PlanKind::Hadamard,
        PlanKind::Randomized,
        PlanKind::HadamardAndV,
    ];

    /// The plan's short name.
    pub fn name(self) -> &'static str {
        match self {
            PlanKind::None => "none",
            PlanKind::Hadamard => "hadamard",
            PlanKind::Randomized => "randomized",
            PlanKind::HadamardAndV => "hadamard+v",
        }
    }

    /// The name as a file-name stem (`hadamard+v` becomes `hadamard_v`).
    ///
    /// ```
    /// assert_eq!(rotq_cli::eval::PlanKind::HadamardAndV.file_stem(), "hadamard_v");
    /// ```
    pub fn file_stem(self) -> String {
        self.name().replace('+', "_")
    }

    /// What the plan does, in words (heatmap titles).
    pub fn describe(self) -> &'static str {
        match self {
            PlanKind::None => "no rotation",
            PlanKind::Hadamard => "Q and K rotated by the Hadamard transform",
            PlanKind::Randomized => "Q and K rotated by a randomized Hadamard transform",
            PlanKind::HadamardAndV => {
                "Q and K rotated by the Hadamard transform, V by blocks of 32"
            }
        }
    }

    /// The plan whose Q/K rotation this one shares (`hadamard+v` rotates Q and K as
    /// `hadamard` does), so that both read the same K cache.
    ///
    /// ```
    /// use rotq_cli::eval::PlanKind;
    /// assert_eq!(PlanKind::HadamardAndV.qk_group(), PlanKind::Hadamard);
    /// assert_eq!(PlanKind::Randomized.qk_group(), PlanKind::Randomized);
    /// ```
    pub fn qk_group(self) -> PlanKind {
        match self {
            PlanKind::HadamardAndV => PlanKind::Hadamard,
            other => other,
        }
    }

    /// The plan for head dimensions `d` (Q, K) and `d_v` (V); `seed` for the randomized one.
    pub fn plan(self, d: usize, d_v: usize, seed: u64) -> Result<RotationPlan, Error> {
        Ok(match self {
            PlanKind::None => RotationPlan::none(),
            PlanKind::Hadamard => RotationPlan {
                qk: Some(Rotation::hadamard(d)?),
                v: None,
            },
            PlanKind::Randomized => RotationPlan {
                qk: Some(Rotation::randomized(d, seed)?),
                v: None,
            },
            PlanKind::HadamardAndV => RotationPlan {
                qk: Some(Rotation::hadamard(d)?),
                v: Some(Rotation::block_hadamard(d_v, d_v.min(32))?),
            },
        })
    }
}

impl std::str::FromStr for PlanKind {
    type Err = Error;

    /// A plan by its [`PlanKind::name`].
    ///
    /// ```
    /// use rotq_cli::eval::PlanKind;
    /// assert_eq!("hadamard+v".parse::<PlanKind>().unwrap(), PlanKind::HadamardAndV);
    /// assert!("hadamard-v".parse::<PlanKind>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self, Error> {
        PlanKind::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                Error::Input(format!(
                    "plan `{s}`: expected one of none, hadamard, randomized, hadamard+v"
                ))
            })
    }
}

/// The error of one (K format, V format, plan) on one layer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerScore {
    /// Mean KL(exact ‖ quantized) over the layer's attention rows (query, head).
    pub mean_kld: f64,
    /// Its 99th percentile.
    pub p99_kld: f64,
    /// ‖out − exact‖ / ‖exact‖ of the layer's attention output.
    pub rel_l2: f64,
}

/// One line of the grid: a K format, a V format and a plan, over every layer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GridRow {
    /// K cache format.
    #[serde(serialize_with = "format_name")]
    pub k_format: KvFormat,
    /// V cache format.
    #[serde(serialize_with = "format_name")]
    pub v_format: KvFormat,
    /// Rotation plan.
    pub plan: PlanKind,
    /// Mean storage cost of K and V.
    pub bits_per_value: f64,
    /// Mean KLD over every attention row of every layer.
    pub mean_kld: f64,
    /// 99th percentile of the KLD over every attention row of every layer.
    pub p99_kld: f64,
    /// Mean over the layers of their attention-output error.
    pub rel_l2: f64,
    /// Per layer.
    pub layers: Vec<LayerScore>,
}

/// Every K format × V format × plan on every layer, with the oracle's own quantization and
/// attention (the spec's numbers, no kernel involved), against exact f64 attention, sorted by
/// bits per value, then mean KLD. `progress(done, total)` is called after each (combination,
/// layer). [`crate::eval_grid::evaluate_grid_with`] runs the same grid on the CPU or CUDA
/// kernels.
///
/// ```
/// use rotq_cli::eval::{evaluate_grid, PlanKind, Synthetic};
/// use rotq::KvFormat;
/// let layer = Synthetic { n_kv: 64, n_q: 4, ..Default::default() }.generate();
/// let rows = evaluate_grid(&[layer], &[KvFormat::Q4_0], &[KvFormat::Q8_0],
///                          &[PlanKind::None, PlanKind::Hadamard], 0, |_, _| {}).unwrap();
/// assert_eq!(rows.len(), 2);
/// let (plain, rotated) = (&rows.iter().find(|r| r.plan == PlanKind::None).unwrap(),
///                         &rows.iter().find(|r| r.plan == PlanKind::Hadamard).unwrap());
/// assert!(rotated.mean_kld < plain.mean_kld);
/// ```
pub fn evaluate_grid(
    layers: &[Activations],
    k_formats: &[KvFormat],
    v_formats: &[KvFormat],
    plans: &[PlanKind],
    seed: u64,
    progress: impl FnMut(usize, usize),
) -> Result<Vec<GridRow>, Error> {
    let opts = crate::eval_grid::GridOptions {
        k_formats: k_formats.to_vec(),
        v_formats: v_formats.to_vec(),
        plans: plans.to_vec(),
        seed,
        backend: crate::eval_backend::Backend::Oracle,
        check_rows: 0,
        query: rotq_cpu::QueryMode::Exact,
    };
    Ok(crate::eval_grid::evaluate_grid_with(layers, &opts, progress)?.rows)
}

/// A fixed-width text table of the grid (one line per row, overall figures).
pub fn render_grid(rows: &[GridRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<9} {:<9} {:<11} {:>5} | {:>10} {:>10} {:>10}",
        "K", "V", "plan", "bits", "mean KLD", "p99 KLD", "rel L2"
    );
    let _ = writeln!(s, "{}", "-".repeat(74));
    for r in rows {
        let _ = writeln!(
            s,
            "{:<9} {:<9} {:<11} {:>5.2} | {:>10.3e} {:>10.3e} {:>10.3e}",
            r.k_format.name(),
            r.v_format.name(),
            r.plan.name(),
            r.bits_per_value,
            r.mean_kld,
            r.p99_kld,
            r.rel_l2
        );
    }
    s
}

/// The grid as CSV: one line per row and layer (`layer` = `all` for the overall figures).
pub fn grid_csv(rows: &[GridRow]) -> String {
    let mut s =
        String::from("k_format,v_format,plan,bits_per_value,layer,mean_kld,p99_kld,rel_l2\n");
    for r in rows {
        let head = format!(
            "{},{},{},{}",
            r.k_format.name(),
            r.v_format.name(),
            r.plan.name(),
            r.bits_per_value
        );
        let _ = writeln!(s, "{head},all,{},{},{}", r.mean_kld, r.p99_kld, r.rel_l2);
        for (i, l) in r.layers.iter().enumerate() {
            let _ = writeln!(s, "{head},{i},{},{},{}", l.mean_kld, l.p99_kld, l.rel_l2);
        }
    }
    s
}
