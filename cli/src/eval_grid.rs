//! The K format × V format × rotation plan grid of `rotq eval --activations`, run on a backend
//! (CPU kernels by default, a CUDA device, or the oracle) and scored against exact f64
//! attention.
//!
//! For each layer, each plan's Q/K rotation and each K format, the backend rotates and
//! quantizes K once; the attention probabilities those cache bytes imply are computed in f64
//! (softmax of `scale · (R q)·k̂` over the visible keys) and compared with the exact ones: the
//! KL divergence of every `(head, query)` row. Those do not depend on V. Then, for each V
//! format (and V rotation), the backend quantizes V and runs its attention on both caches; the
//! output is compared with the exact output (relative L2), and a sample of its rows with the
//! oracle on the same bytes ([`crate::oracle_check`]).
//!
//! ```
//! use rotq_cli::eval::{PlanKind, Synthetic};
//! use rotq_cli::eval_grid::{evaluate_grid_with, GridOptions};
//! use rotq::KvFormat;
//! let layer = Synthetic { n_kv: 64, n_q: 4, ..Default::default() }.generate();
//! let opts = GridOptions {
//!     k_formats: vec![KvFormat::Q4_0],
//!     v_formats: vec![KvFormat::Q8_0],
//!     plans: vec![PlanKind::None, PlanKind::Hadamard],
//!     ..Default::default()
//! };
//! let report = evaluate_grid_with(&[layer], &opts, |_, _| {}).unwrap();
//! assert_eq!(report.rows.len(), 2);
//! assert_eq!(report.check.unwrap().comparisons, 2); // CPU kernels, checked by the oracle
//! ```

use crate::eval::{default_formats, Activations, GridRow, LayerScore, LayerShape, PlanKind};
use crate::eval_backend::{cache_klds, dequantize, queries_for, Backend, Runner};
use crate::oracle_check::{oracle_rows, pick_rows, sample_rows, OracleCheck};
use crate::Error;
use ndarray::Array3;
use rotq_cpu::QueryMode;
use rotq_reference::metrics::rel_l2;
use rotq_reference::{attention, KvFormat};
use std::collections::hash_map::Entry;
use std::collections::HashMap;

/// What [`evaluate_grid_with`] runs.
#[derive(Clone, Debug, PartialEq)]
pub struct GridOptions {
    /// K cache formats.
    pub k_formats: Vec<KvFormat>,
    /// V cache formats.
    pub v_formats: Vec<KvFormat>,
    /// Rotation plans.
    pub plans: Vec<PlanKind>,
    /// Seed of the randomized plan's signs.
    pub seed: u64,
    /// Where the quantization and attention run.
    pub backend: Backend,
    /// Query rows per layer and combination whose output the oracle checks (0: none).
    pub check_rows: usize,
    /// The arithmetic of `K·Q`: exact f32 queries, or queries through q8_0 (scored as the
    /// attention probabilities those queries imply).
    pub query: QueryMode,
}

impl Default for GridOptions {
    /// Every format but f32 for K and V, every plan, seed 0, the CPU kernels, 2 rows checked.
    fn default() -> Self {
        Self {
            k_formats: default_formats(),
            v_formats: default_formats(),
            plans: PlanKind::ALL.to_vec(),
            seed: 0,
            backend: Backend::Cpu,
            check_rows: 2,
            query: QueryMode::Exact,
        }
    }
}

/// The grid and the oracle's check of the kernels that made it.
#[derive(Clone, Debug, PartialEq)]
pub struct GridReport {
    /// One row per K format × V format × plan, sorted by bits per value, then mean KLD.
    pub rows: Vec<GridRow>,
    /// The check (`None` for the oracle backend, or with `check_rows` 0).
    pub check: Option<OracleCheck>,
}

/// Bytes that reading a dump of layers of these shapes and running [`evaluate_grid_on`] with
/// `opts` hold at their peak, or `None` when the sizes overflow 64 bits; `reading` is what
/// reading the dump holds beside the values (the file, or its largest `.npy` file). Compare it
/// with the memory available with [`crate::eval::check_memory`].
///
/// Every layer's Q, K and V are held in f32 throughout (4 bytes a value); reading holds the
/// file besides. The grid then works on one layer at a time, and holds at most: the exact
/// attention's f64 copies of Q, K and V (8 each), its probabilities (8) and output (8) and the
/// output's copy (8); Q rotated in f64 (8); one K cache (its bytes, at most 4 a value, its f32
/// input and its f64 values: 16); every V cache of the layer (bytes and f64 values, 12 a value,
/// one per V format and V rotation) and V's f32 copy (4); the backend's output (12) and its
/// copy of Q (4); and, on the oracle backend, the oracle's f64 Q, K, V, probabilities and
/// output again. The KL divergences of every attention row of every layer are kept for each K
/// format and Q/K rotation (16 bytes a row, with the copy their quantile sorts).
///
/// ```
/// use rotq_cli::eval::{check_memory, LayerShape};
/// use rotq_cli::eval_grid::{memory_needed, GridOptions};
/// let layer = LayerShape { q: (32, 16, 128), k: (512, 4, 128), v: (512, 4, 128) };
/// let opts = GridOptions::default();
/// let one = memory_needed(&[layer], &opts, 0).unwrap();
/// assert!(memory_needed(&[layer; 3], &opts, 0).unwrap() > one); // every layer is held
/// assert_eq!(one >> 20, 118); // MiB, most of it the 34 V caches (17 formats, 2 rotations)
/// assert!(check_memory(Some(one)).is_ok());
/// let huge = LayerShape { k: (usize::MAX, 4, 128), ..layer };
/// assert_eq!(memory_needed(&[huge], &opts, 0), None);
/// ```
pub fn memory_needed(layers: &[LayerShape], opts: &GridOptions, reading: u64) -> Option<u64> {
    let n = |x: usize| u64::try_from(x).ok();
    // V caches held at once per layer: one per V format and V rotation (with, without).
    let rotates_v = |p: &PlanKind| *p == PlanKind::HadamardAndV;
    let v_rotations =
        u64::from(opts.plans.iter().any(rotates_v)) + u64::from(!opts.plans.iter().all(rotates_v));
    let v_caches = n(opts.v_formats.len())?.checked_mul(v_rotations)?;
    let mut groups: Vec<&str> = opts.plans.iter().map(|p| p.qk_group().name()).collect();
    groups.sort_unstable();
    groups.dedup();
    let kld_sets = n(opts.k_formats.len())?.checked_mul(n(groups.len())?)?;
    // (values, bytes a value), summed.
    let bytes = |parts: &[(u64, u64)]| {
        parts
            .iter()
            .try_fold(0u64, |sum, &(n, b)| sum.checked_add(n.checked_mul(b)?))
    };
    let (mut inputs, mut working, mut rows) = (0u64, reading, 0u64);
    for layer in layers {
        let s = layer.sizes()?;
        let qkv = s.q.checked_add(s.k)?.checked_add(s.v)?;
        inputs = inputs.checked_add(qkv.checked_mul(4)?)?;
        rows = rows.checked_add(n(layer.q.0)?.checked_mul(n(layer.q.1)?)?)?;
        let mut w = bytes(&[
            (qkv, 8),                         // exact attention's f64 copies
            (s.probs, 8),                     // its probabilities
            (s.out, 28),                      // its output, the copy, the backend's
            (s.q, 12),                        // Q rotated, the backend's copy
            (s.k, 16),                        // one K cache: bytes, f32 copy, f64 values
            (s.v, v_caches.checked_mul(12)?), // every V cache: bytes, f64 values
            (s.v, 4),                         // V's f32 copy
        ])?;
        if opts.backend == Backend::Oracle {
            w = w.checked_add(bytes(&[(qkv, 8), (s.probs, 8), (s.out, 8)])?)?;
        }
        working = working.max(w);
    }
    let klds = bytes(&[(rows, kld_sets.checked_mul(16)?)])?;
    inputs.checked_add(working)?.checked_add(klds)
}

/// The `q`-quantile (0..1) of `x` (nearest rank); 0 for no values.
pub(crate) fn quantile(mut x: Vec<f64>, q: f64) -> f64 {
    if x.is_empty() {
        return 0.0;
    }
    x.sort_by(f64::total_cmp);
    let rank = ((q * x.len() as f64).ceil() as usize).clamp(1, x.len());
    x[rank - 1]
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

/// Runs the grid of `opts` on every layer (see the module docs). `progress(done, total)` is
/// called after each (combination, layer); `total` is layers × K formats × V formats × plans.
/// A kernel output that disagrees with the oracle is [`Error::OracleMismatch`].
pub fn evaluate_grid_with(
    layers: &[Activations],
    opts: &GridOptions,
    progress: impl FnMut(usize, usize),
) -> Result<GridReport, Error> {
    let runner = Runner::open(opts.backend)?;
    evaluate_grid_on(&runner, layers, opts, progress)
}

/// [`evaluate_grid_with`] on a backend already opened (`opts.backend` is ignored): open it
/// first to fail fast, e.g. on a missing GPU, before reading large inputs.
///
/// ```
/// use rotq_cli::eval::Synthetic;
/// use rotq_cli::eval_backend::{Backend, Runner};
/// use rotq_cli::eval_grid::{evaluate_grid_on, GridOptions};
/// use rotq::KvFormat;
/// let runner = Runner::open(Backend::Oracle).unwrap();
/// let layer = Synthetic { n_kv: 32, n_q: 2, d: 32, ..Default::default() }.generate();
/// let opts = GridOptions { k_formats: vec![KvFormat::Q8_0], v_formats: vec![KvFormat::Q8_0], ..Default::default() };
/// let report = evaluate_grid_on(&runner, &[layer], &opts, |_, _| {}).unwrap();
/// assert_eq!(report.rows.len(), 4); // one per plan
/// assert!(report.check.is_none()); // the oracle is not checked against itself
/// ```
pub fn evaluate_grid_on(
    runner: &Runner,
    layers: &[Activations],
    opts: &GridOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<GridReport, Error> {
    let backend = runner.backend();
    let mut check = (backend != Backend::Oracle && opts.check_rows > 0)
        .then(|| OracleCheck::new(&backend.to_string(), runner.precision(), opts.check_rows));
    let (nk, nv, np) = (opts.k_formats.len(), opts.v_formats.len(), opts.plans.len());
    let total = layers.len() * nk * nv * np;
    let at = |ki: usize, vi: usize, pi: usize| (ki * nv + vi) * np + pi;
    let mut scores: Vec<Vec<LayerScore>> = vec![Vec::with_capacity(layers.len()); nk * nv * np];
    // Every row's KLD, over all layers, per (K format, Q/K rotation).
    let mut klds: HashMap<(usize, PlanKind), Vec<f64>> = HashMap::new();
    let mut done = 0;
    for (li, layer) in layers.iter().enumerate() {
        let (n_q, h_q, d) = layer.q.dim();
        let (n_kv, h_kv, d_v) = layer.v.dim();
        let exact = attention(
            layer.q.view(),
            layer.k.view(),
            layer.v.view(),
            &layer.params,
        )?;
        let exact_out: Vec<f64> = exact.output.iter().copied().collect();
        let rows = sample_rows(n_q, opts.check_rows);
        // V caches by (format, rotated): bytes and, for the check, values.
        let mut v_caches: HashMap<(KvFormat, bool), (Vec<u8>, Array3<f64>)> = HashMap::new();
        // Plans that rotate Q and K alike share the K caches (and the probabilities).
        let mut groups: Vec<PlanKind> = Vec::new();
        for g in opts.plans.iter().map(|p| p.qk_group()) {
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        for group in groups {
            let qk = group.plan(d, d_v, opts.seed)?.qk;
            for (ki, &kf) in opts.k_formats.iter().enumerate() {
                let mode = opts.query.resolve(kf, qk.is_some(), d);
                let q_rot = queries_for(layer.q.view(), qk.as_ref(), mode, backend)?;
                let kb = runner.quantize(layer.k.view(), kf, qk.as_ref())?;
                let kd = dequantize(kf, &kb, (n_kv, h_kv, d))?;
                let layer_klds = cache_klds(&exact.probs, &q_rot, &kd, &layer.params);
                let (mean_kld, p99_kld) = (mean(&layer_klds), quantile(layer_klds.clone(), 0.99));
                klds.entry((ki, group)).or_default().extend(layer_klds);
                for (pi, &kind) in opts.plans.iter().enumerate() {
                    if kind.qk_group() != group {
                        continue;
                    }
                    let plan = kind.plan(d, d_v, opts.seed)?;
                    for (vi, &vf) in opts.v_formats.iter().enumerate() {
                        let key = (vf, plan.v.is_some());
                        let (vb, vd) = match v_caches.entry(key) {
                            Entry::Occupied(e) => e.into_mut(),
                            Entry::Vacant(e) => {
                                let vb = runner.quantize(layer.v.view(), vf, plan.v.as_ref())?;
                                let vd = dequantize(vf, &vb, (n_kv, h_kv, d_v))?;
                                e.insert((vb, vd))
                            }
                        };
                        let out =
                            runner.attention(layer, &plan, (kf, &kb), (vf, vb), opts.query)?;
                        if let Some(c) = check.as_mut() {
                            let want = oracle_rows(
                                &q_rot,
                                &kd,
                                vd,
                                plan.v.as_ref(),
                                &layer.params,
                                &rows,
                            )?;
                            let got = pick_rows(&out, h_q * d_v, &rows);
                            c.compare(
                                || {
                                    format!(
                                        "K {kf}, V {vf}, plan {}, layer {li}, query rows {rows:?}",
                                        kind.name()
                                    )
                                },
                                &got,
                                &want,
                            )?;
                        }
                        scores[at(ki, vi, pi)].push(LayerScore {
                            mean_kld,
                            p99_kld,
                            rel_l2: rel_l2(&out, &exact_out),
                        });
                        done += 1;
                        progress(done, total);
                    }
                }
            }
        }
    }
    let overall: HashMap<(usize, PlanKind), (f64, f64)> = klds
        .into_iter()
        .map(|(key, x)| (key, (mean(&x), quantile(x, 0.99))))
        .collect();
    // Bits per value at the first layer's head dims (a row format's cost depends on them).
    let (d_k, d_v) = layers
        .first()
        .map_or((128, 128), |l| (l.q.dim().2, l.v.dim().2));
    let bits = |f: KvFormat, d: usize| f.bits_per_value_at(d).unwrap_or(f.bits_per_value());
    let mut rows = Vec::with_capacity(nk * nv * np);
    for (ki, &k_format) in opts.k_formats.iter().enumerate() {
        for (vi, &v_format) in opts.v_formats.iter().enumerate() {
            for (pi, &plan) in opts.plans.iter().enumerate() {
                let layer_scores = std::mem::take(&mut scores[at(ki, vi, pi)]);
                let (mean_kld, p99_kld) = overall
                    .get(&(ki, plan.qk_group()))
                    .copied()
                    .unwrap_or((0.0, 0.0));
                let rel: Vec<f64> = layer_scores.iter().map(|s| s.rel_l2).collect();
                rows.push(GridRow {
                    k_format,
                    v_format,
                    plan,
                    bits_per_value: (bits(k_format, d_k) + bits(v_format, d_v)) / 2.0,
                    mean_kld,
                    p99_kld,
                    rel_l2: mean(&rel),
                    layers: layer_scores,
                });
            }
        }
    }
    rows.sort_by(|a, b| {
        a.bits_per_value
            .total_cmp(&b.bits_per_value)
            .then(a.mean_kld.total_cmp(&b.mean_kld))
            .then(a.rel_l2.total_cmp(&b.rel_l2))
    });
    Ok(GridReport { rows, check })
}
