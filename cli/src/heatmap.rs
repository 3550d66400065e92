//! Heatmap PNGs of the `rotq eval` grid: K format (rows) × V format (columns), one picture per
//! rotation plan, like the KV-cache tables engine users share.
//!
//! Two pictures per plan:
//! * `kld-<plan>.png`: the mean KL divergence of the attention probabilities, as a ratio to
//!   the mean KLD of **f16 K / f16 V without rotation** (one baseline for every plan, so the
//!   pictures compare with each other: a cell at 0.5 in the `hadamard` picture is half the
//!   error of unrotated f16). Both sides get [`KLD_EPSILON`] added, so a baseline of exactly 0
//!   (f16 activations are exact in an f16 cache) still gives finite ratios; they then read as
//!   the KLD in units of ε. The attention probabilities depend on K only, so each row of this
//!   picture is one colour: V's share of the error is in the next picture.
//! * `rel_l2-<plan>.png`: the relative L2 error of the attention output, ‖out − exact‖ /
//!   ‖exact‖, in percent; this one depends on both formats. Errors below [`REL_L2_FLOOR`]
//!   (0.1 %) all get the palest colour.
//!
//! Colours run on a logarithmic scale, shared by a metric's pictures, from pale yellow (best)
//! to dark red (worst), with the scale drawn on the right. plotters' bitmap backend draws the
//! shapes; the text is DejaVu Sans, built into the binary (`assets/fonts/`) and rasterized
//! with ab_glyph, so no system font or fontconfig is needed. Files are written atomically.
//!
//! ```
//! use rotq_cli::heatmap::{kld_ratio, KLD_EPSILON};
//! assert_eq!(kld_ratio(0.0, 0.0), 1.0);
//! assert!((kld_ratio(1e-3, 1e-6) - (1e-3 + KLD_EPSILON) / (1e-6 + KLD_EPSILON)).abs() < 1e-9);
//! ```

mod render;

use crate::eval::{GridRow, PlanKind};
use crate::Error;
use rotq_reference::KvFormat;
use std::path::{Path, PathBuf};

pub use render::render;

/// Added to a KLD and to the baseline's before dividing (nats): a millionth of a nat, below
/// which a KLD does not matter. When f16's own KLD is below it (always, for f16 activations,
/// where it is 0), the ratios read as the KLD in micro-nats.
pub const KLD_EPSILON: f64 = 1e-6;

/// A cell's size in pixels.
const CELL_W: u32 = 68;
const CELL_H: u32 = 30;
/// Space left of the cells (row labels), above them (titles, column labels), right of them
/// (colour scale) and below them (notes).
const LEFT: u32 = 150;
const TOP: u32 = 176;
const RIGHT: u32 = 140;
const BOTTOM: u32 = 84;
/// The shortest colour scale.
const MIN_SCALE: u32 = 120;
/// The narrowest picture (room for the titles and notes with few cells).
const MIN_WIDTH: u32 = 900;

/// `(kld + ε) / (baseline + ε)`.
pub fn kld_ratio(kld: f64, baseline: f64) -> f64 {
    (kld + KLD_EPSILON) / (baseline + KLD_EPSILON)
}

/// The size in pixels of a heatmap of `rows` × `cols` cells.
///
/// ```
/// assert_eq!(rotq_cli::heatmap::heatmap_size(11, 11), (1038, 590));
/// assert_eq!(rotq_cli::heatmap::heatmap_size(2, 3), (900, 380));
/// ```
pub fn heatmap_size(rows: usize, cols: usize) -> (u32, u32) {
    let (r, c) = (rows as u32, cols as u32);
    let width = (LEFT + c * CELL_W + RIGHT).max(MIN_WIDTH);
    (width, TOP + (r * CELL_H).max(MIN_SCALE) + BOTTOM)
}

/// One heatmap: labels, values (row-major; NaN for none) and how to show them.
///
/// ```
/// use rotq_cli::heatmap::{heatmap_size, ratio_label, render, Heatmap};
/// let map = Heatmap {
///     title: "Example".into(),
///     subtitle: vec!["two by two".into()],
///     row_title: "K cache format".into(),
///     col_title: "V cache format".into(),
///     row_labels: vec![("f16".into(), "16 bits".into()), ("q4_0".into(), "4.5 bits".into())],
///     col_labels: vec![("f16".into(), "16 bits".into()), ("q4_0".into(), "4.5 bits".into())],
///     values: vec![1.0, 2.0, 300.0, f64::NAN],
///     range: (1.0, 300.0),
///     legend: "ratio".into(),
///     label: ratio_label,
///     notes: vec!["made in a doctest".into()],
/// };
/// let png = render(&map).unwrap();
/// assert_eq!(&png[1..4], b"PNG");
/// let (w, h) = heatmap_size(2, 2);
/// assert_eq!(&png[16..24], &[w.to_be_bytes(), h.to_be_bytes()].concat()[..]);
/// ```
#[derive(Clone, Debug)]
pub struct Heatmap {
    /// First line at the top.
    pub title: String,
    /// Lines under the title (what colour and numbers mean; wrapped to the width, two lines at
    /// most).
    pub subtitle: Vec<String>,
    /// Above the row labels (e.g. `K cache`).
    pub row_title: String,
    /// Above the column labels (e.g. `V cache`).
    pub col_title: String,
    /// One per row: name, and a second, smaller part (e.g. the bits).
    pub row_labels: Vec<(String, String)>,
    /// One per column: name, and a second line.
    pub col_labels: Vec<(String, String)>,
    /// `row_labels.len() × col_labels.len()` values.
    pub values: Vec<f64>,
    /// The colour scale's ends (log scale; values outside are clamped).
    pub range: (f64, f64),
    /// Above the colour scale.
    pub legend: String,
    /// How a value is written in its cell and on the scale.
    pub label: fn(f64) -> String,
    /// Lines below the cells (wrapped to the width, three lines at most).
    pub notes: Vec<String>,
}

/// `text` (a number with a decimal point) without trailing zeros after the point.
fn trimmed(text: String) -> String {
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// A ratio in a few characters, three significant digits: `1`, `1.16`, `23.4`, `512`, `12k`,
/// `3.4M`.
///
/// ```
/// use rotq_cli::heatmap::ratio_label;
/// assert_eq!(ratio_label(1.0), "1");
/// assert_eq!(ratio_label(1.163), "1.16");
/// assert_eq!(ratio_label(23.44), "23.4");
/// assert_eq!(ratio_label(12_345.0), "12k");
/// assert_eq!(ratio_label(3.4e6), "3.4M");
/// ```
pub fn ratio_label(x: f64) -> String {
    match x {
        x if !x.is_finite() => "-".into(),
        x if x < 9.995 => trimmed(format!("{x:.2}")),
        x if x < 99.95 => trimmed(format!("{x:.1}")),
        x if x < 9_999.5 => format!("{x:.0}"),
        x if x < 999_500.0 => format!("{:.0}k", x / 1e3),
        x if x < 99.95e6 => format!("{}M", trimmed(format!("{:.1}", x / 1e6))),
        x => format!("{x:.0e}"),
    }
}

/// A fraction as a percentage with two significant digits (`12%`, `3.4%`, `0.052%`); below
/// 0.01 % it is `<0.01%`.
///
/// ```
/// use rotq_cli::heatmap::percent_label;
/// assert_eq!(percent_label(0.123), "12%");
/// assert_eq!(percent_label(0.0341), "3.4%");
/// assert_eq!(percent_label(0.01), "1%");
/// assert_eq!(percent_label(0.00052), "0.052%");
/// assert_eq!(percent_label(2e-7), "<0.01%");
/// ```
pub fn percent_label(x: f64) -> String {
    let p = x * 100.0;
    match p {
        p if !p.is_finite() => "-".into(),
        p if p >= 9.95 => format!("{p:.0}%"),
        p if p >= 0.995 => format!("{}%", trimmed(format!("{p:.1}"))),
        p if p >= 0.0995 => format!("{}%", trimmed(format!("{p:.2}"))),
        p if p >= 0.00995 => format!("{}%", trimmed(format!("{p:.3}"))),
        _ => "<0.01%".into(),
    }
}

/// The bottom of the output-error colour scale (0.1 %): smaller errors all get its colour, so
/// that the scale's range is spent on the errors that matter.
pub const REL_L2_FLOOR: f64 = 1e-3;

/// How a baseline KLD is written: `0` or three significant digits.
fn nats(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else {
        format!("{x:.2e}")
    }
}

/// Renders `map` and writes it to `path` atomically.
pub fn write_png(map: &Heatmap, path: &Path) -> Result<(), Error> {
    let bytes = render(map).map_err(|reason| Error::Plot {
        path: path.to_path_buf(),
        reason,
    })?;
    crate::io::write_atomic(path, &bytes)
}

/// `s` with its first letter upper-case.
fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// The distinct formats of one axis (K or V) of a grid, most bits first.
fn axis(formats: impl IntoIterator<Item = KvFormat>) -> Vec<KvFormat> {
    let mut f: Vec<KvFormat> = Vec::new();
    for format in formats {
        if !f.contains(&format) {
            f.push(format);
        }
    }
    f.sort_by(|a, b| {
        b.bits_per_value()
            .total_cmp(&a.bits_per_value())
            .then(a.cmp(b))
    });
    f
}

/// The log-scale range of `values` (finite, positive), from `floor` at the lowest, at least
/// a factor of 10 wide.
fn range_of(values: impl Iterator<Item = f64>, floor: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, 0f64);
    for v in values.filter(|v| v.is_finite() && *v > 0.0) {
        lo = lo.min(v.max(floor));
        hi = hi.max(v.max(floor));
    }
    if !lo.is_finite() {
        return (1.0, 10.0);
    }
    if hi < lo * 10.0 {
        hi = lo * 10.0;
    }
    (lo, hi)
}

/// Writes the heatmaps of `rows` into `dir` (created if missing): for each plan present,
/// `kld-<plan>.png` and `rel_l2-<plan>.png` (see the module docs); `source` is a note naming
/// the data (shown under the cells). Needs f16/f16 without rotation among the rows (the
/// baseline). Returns the files written.
///
/// ```
/// use rotq_cli::eval::{PlanKind, Synthetic};
/// use rotq_cli::eval_grid::{evaluate_grid_with, GridOptions};
/// use rotq::KvFormat;
/// let layer = Synthetic { n_kv: 64, n_q: 2, h_kv: 1, group: 2, d: 64, ..Default::default() }.generate();
/// let opts = GridOptions {
///     k_formats: vec![KvFormat::F16, KvFormat::Q4_0],
///     v_formats: vec![KvFormat::F16, KvFormat::Q4_0],
///     plans: vec![PlanKind::None, PlanKind::Hadamard],
///     ..Default::default()
/// };
/// let rows = evaluate_grid_with(&[layer], &opts, |_, _| {}).unwrap().rows;
/// let dir = tempfile::tempdir().unwrap();
/// let files = rotq_cli::heatmap::grid_heatmaps(&rows, dir.path(), "synthetic").unwrap();
/// assert_eq!(files.len(), 4);
/// assert!(files[0].ends_with("kld-none.png"));
/// ```
pub fn grid_heatmaps(rows: &[GridRow], dir: &Path, source: &str) -> Result<Vec<PathBuf>, Error> {
    let find = |k: KvFormat, v: KvFormat, p: PlanKind| {
        rows.iter()
            .find(|r| r.k_format == k && r.v_format == v && r.plan == p)
    };
    let base = find(KvFormat::F16, KvFormat::F16, PlanKind::None).ok_or_else(|| {
        Error::Input(
            "the heatmaps need f16 K / f16 V without rotation as their baseline: keep f16 \
             among the K and V formats and `none` among the plans"
                .into(),
        )
    })?;
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let (ks, vs) = (
        axis(rows.iter().map(|r| r.k_format)),
        axis(rows.iter().map(|r| r.v_format)),
    );
    let plans: Vec<PlanKind> = PlanKind::ALL
        .into_iter()
        .filter(|p| rows.iter().any(|r| r.plan == *p))
        .collect();
    let bits = |f: KvFormat| format!("{:.2} bits", f.bits_per_value());
    let row_labels: Vec<(String, String)> = ks
        .iter()
        .map(|f| (f.name().to_string(), bits(*f)))
        .collect();
    let col_labels: Vec<(String, String)> = vs
        .iter()
        .map(|f| (f.name().to_string(), bits(*f)))
        .collect();
    let matrix = |plan: PlanKind, metric: &dyn Fn(&GridRow) -> f64| -> Vec<f64> {
        ks.iter()
            .flat_map(|&k| vs.iter().map(move |&v| (k, v)))
            .map(|(k, v)| find(k, v, plan).map_or(f64::NAN, metric))
            .collect()
    };
    let kld = |r: &GridRow| kld_ratio(r.mean_kld, base.mean_kld);
    let rel = |r: &GridRow| r.rel_l2;
    let kld_range = range_of(rows.iter().map(kld), 0.0);
    let rel_range = range_of(rows.iter().map(rel), REL_L2_FLOOR);
    let mut written = Vec::new();
    for plan in plans {
        let common = |what: &str, subtitle: String, values, range, legend: &str, label| Heatmap {
            title: format!("{what} \u{2014} plan {}", plan.name()),
            subtitle: vec![format!("{}.", capitalized(plan.describe())), subtitle],
            row_title: "K cache format".into(),
            col_title: "V cache format".into(),
            row_labels: row_labels.clone(),
            col_labels: col_labels.clone(),
            values,
            range,
            legend: legend.into(),
            label,
            notes: vec![
                source.to_string(),
                "Bits are per cached value, block scales included. The colour scale is shared by \
                 this metric's pictures (one per plan); grey: not measured."
                    .into(),
            ],
        };
        let maps = [
            (
                format!("kld-{}.png", plan.file_stem()),
                common(
                    "Attention KLD ratio to f16",
                    format!(
                        "Colour and value: mean KL divergence of the attention probabilities \
                         \u{f7} that of f16 K, f16 V without rotation ({} nats), with \
                         {KLD_EPSILON:e} added to both. It depends on K only.",
                        nats(base.mean_kld)
                    ),
                    matrix(plan, &kld),
                    kld_range,
                    "KLD ratio",
                    ratio_label as fn(f64) -> String,
                ),
            ),
            (
                format!("rel_l2-{}.png", plan.file_stem()),
                common(
                    "Attention output error",
                    "Colour and value: relative L2 error of the attention output, \
                     \u{2016}out \u{2212} exact\u{2016} / \u{2016}exact\u{2016}, mean over \
                     the layers, in percent."
                        .into(),
                    matrix(plan, &rel),
                    rel_range,
                    "rel. L2 error",
                    percent_label as fn(f64) -> String,
                ),
            ),
        ];
        for (name, map) in maps {
            let path = dir.join(name);
            write_png(&map, &path)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// A KL divergence in nats in a few characters: `0.134`, `0.0519`, `7.2e-7`.
///
/// ```
/// use rotq_cli::heatmap::kld_label;
/// assert_eq!(kld_label(0.13393), "0.134");
/// assert_eq!(kld_label(0.051857), "0.0519");
/// assert_eq!(kld_label(7.2e-7), "7.2e-7");
/// ```
pub fn kld_label(x: f64) -> String {
    match x {
        x if !x.is_finite() => "-".into(),
        x if x >= 0.995 => trimmed(format!("{x:.2}")),
        x if x >= 0.000995 => {
            let decimals = (2.0 - x.log10().floor()) as usize;
            format!("{x:.decimals$}")
        }
        x => format!("{x:.1e}"),
    }
}

/// Writes a `rotq eval --model` grid's heatmaps into `dir` (created if missing): for each
/// plan, `token_kld-<plan>.png`, K format × V format of the mean token KL divergence from the
/// f16 cache's output distribution, in nats, on one log scale for every plan. Returns the
/// files written.
///
/// ```
/// use rotq::KvFormat;
/// use rotq_model::grid::{run, GridOptions};
/// use rotq_model::llama::{Config, Llama};
/// let config = Config { n_layers: 1, dim: 64, ffn_dim: 64, n_heads: 2, n_kv_heads: 1,
///     head_dim: 32, vocab: 40, ..Config::default() };
/// let model = Llama::random(config, 1).unwrap();
/// let tokens: Vec<u32> = (0..32).map(|i| i % 40).collect();
/// let opts = GridOptions { ctx: 32, chunks: None, k_formats: vec![KvFormat::Q8_0, KvFormat::Q4_0],
///     v_formats: vec![KvFormat::Q4_0], plans: vec!["none".parse().unwrap()], ..GridOptions::default() };
/// let report = run(&model, &tokens, &opts, |_, _| {}).unwrap();
/// let dir = tempfile::tempdir().unwrap();
/// let files = rotq_cli::heatmap::model_heatmaps(&report, dir.path(), "a doctest").unwrap();
/// assert!(files[0].ends_with("token_kld-none.png"));
/// ```
pub fn model_heatmaps(
    report: &rotq_model::grid::Report,
    dir: &Path,
    source: &str,
) -> Result<Vec<PathBuf>, Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let grid = &report.rows[2.min(report.rows.len())..];
    let format = |name: &str| name.parse::<KvFormat>().ok();
    let (ks, vs) = (
        axis(grid.iter().filter_map(|r| format(&r.k_format))),
        axis(grid.iter().filter_map(|r| format(&r.v_format))),
    );
    let mut plans: Vec<&str> = Vec::new();
    for r in grid {
        if !plans.contains(&r.plan.as_str()) {
            plans.push(&r.plan);
        }
    }
    let bits = |f: &KvFormat| {
        (
            f.name().to_string(),
            format!("{:.2} bits", f.bits_per_value()),
        )
    };
    let range = range_of(grid.iter().map(|r| r.summary.kld_mean), 1e-6);
    let mut written = Vec::new();
    for plan in plans {
        let values = ks
            .iter()
            .flat_map(|k| vs.iter().map(move |v| (k, v)))
            .map(|(k, v)| {
                grid.iter()
                    .find(|r| {
                        r.plan == plan
                            && format(&r.k_format) == Some(*k)
                            && format(&r.v_format) == Some(*v)
                    })
                    .map_or(f64::NAN, |r| r.summary.kld_mean)
            })
            .collect();
        let map = Heatmap {
            title: format!("Token KLD from the f16 cache \u{2014} plan {plan}"),
            subtitle: vec![format!(
                "Colour and value: mean KL divergence of the model's next-token distribution from \
                 the f16 cache's, in nats, over {} chunks of {} tokens (second halves scored).",
                report.chunks, report.ctx
            )],
            row_title: "K cache format".into(),
            col_title: "V cache format".into(),
            row_labels: ks.iter().map(bits).collect(),
            col_labels: vs.iter().map(bits).collect(),
            values,
            range,
            legend: "token KLD (nats)".into(),
            label: kld_label,
            notes: vec![
                source.to_string(),
                "The colour scale is shared by the plans' pictures; grey: not measured.".into(),
            ],
        };
        let stem: String = plan
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = dir.join(format!("token_kld-{stem}.png"));
        write_png(&map, &path)?;
        written.push(path);
    }
    Ok(written)
}
