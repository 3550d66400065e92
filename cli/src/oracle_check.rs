//! The oracle checks the kernels `rotq eval` measures: for a sample of query rows of every
//! layer and combination, the kernel's attention output must match the oracle's attention on
//! the *same* cache bytes (dequantized by the oracle, Q rotated in f64, dense f64 attention,
//! output rotated back) within the tolerance table of `rotq_reference::tolerance` (attention,
//! at the kernel's precision: f32 for the CPU and CUDA kernels, `rel_l2 ≤ 1e-5` and
//! `max_abs ≤ 1e-4`). A disagreement is [`Error::OracleMismatch`]; otherwise the
//! [`OracleCheck`] summary says what was compared and the worst error seen.
//!
//! ```
//! use rotq_cli::oracle_check::sample_rows;
//! assert_eq!(sample_rows(100, 3), vec![0, 49, 99]);
//! assert_eq!(sample_rows(2, 4), vec![0, 1]);
//! assert!(sample_rows(5, 0).is_empty());
//! ```

use crate::Error;
use ndarray::{Array3, Axis, Slice};
use rotq_reference::metrics::{max_abs_rel, rel_l2};
use rotq_reference::tolerance::{tolerance, Op, Precision, Tolerance};
use rotq_reference::{attention_f64, AttentionParams, Rotation};
use serde::Serialize;

/// `count` query rows of `0..n_q`, evenly spread, the first and the last included (every row
/// when `count ≥ n_q`).
pub fn sample_rows(n_q: usize, count: usize) -> Vec<usize> {
    match count {
        0 => Vec::new(),
        _ if count >= n_q => (0..n_q).collect(),
        1 => vec![n_q - 1],
        _ => (0..count).map(|i| i * (n_q - 1) / (count - 1)).collect(),
    }
}

/// The oracle's attention output for query `rows` (each `[h_q, d_v]`, concatenated), from
/// rotated queries `q_rot` `[n_q, h_q, d]`, the dequantized caches `k` `[n_kv, h_kv, d]` and `v`
/// `[n_kv, h_kv, d_v]`, rotated back by `v_rotation`.
///
/// ```
/// use rotq_cli::oracle_check::oracle_rows;
/// use rotq::AttentionParams;
/// let q = ndarray::Array3::from_elem((3, 2, 4), 0.5f64);
/// let k = ndarray::Array3::from_shape_fn((5, 1, 4), |(t, _, c)| (t + c) as f64 * 0.1);
/// let v = ndarray::Array3::from_shape_fn((5, 1, 4), |(t, _, _)| t as f64);
/// let params = AttentionParams { causal: true, pos_offset: 2, ..Default::default() };
/// let out = oracle_rows(&q, &k, &v, None, &params, &[0, 2]).unwrap();
/// assert_eq!(out.len(), 2 * 2 * 4);
/// assert!(out[0] < out[8]); // query 0 sees keys 0..=2, query 2 all five
/// ```
pub fn oracle_rows(
    q_rot: &Array3<f64>,
    k: &Array3<f64>,
    v: &Array3<f64>,
    v_rotation: Option<&Rotation>,
    params: &AttentionParams,
    rows: &[usize],
) -> Result<Vec<f64>, Error> {
    let n_q = q_rot.dim().0;
    let mut out = Vec::new();
    let mut run = |start: usize, end: usize| -> Result<(), Error> {
        let p = AttentionParams {
            pos_offset: params.pos_offset + start,
            ..params.clone()
        };
        let q = q_rot.slice_axis(Axis(0), Slice::from(start..end));
        let a = attention_f64(q, k.view(), v.view(), &p)?;
        let mut o = a.output;
        if let Some(r) = v_rotation {
            let mut buf = vec![0f64; o.dim().2];
            for mut row in o.lanes_mut(Axis(2)) {
                for (b, x) in buf.iter_mut().zip(row.iter()) {
                    *b = *x;
                }
                r.inverse_in_place(&mut buf)?;
                for (x, b) in row.iter_mut().zip(&buf) {
                    *x = *b;
                }
            }
        }
        out.extend(o.iter().copied());
        Ok(())
    };
    if rows.len() == n_q && rows.iter().enumerate().all(|(i, &r)| i == r) {
        run(0, n_q)?;
    } else {
        for &r in rows {
            if r >= n_q {
                return Err(Error::Input(format!(
                    "query row {r} of a layer of {n_q} queries"
                )));
            }
            run(r, r + 1)?;
        }
    }
    Ok(out)
}

/// Rows `rows` of an output `[n_q, row_len]` (flattened), concatenated.
pub fn pick_rows(output: &[f64], row_len: usize, rows: &[usize]) -> Vec<f64> {
    rows.iter()
        .flat_map(|&r| output.get(r * row_len..(r + 1) * row_len).unwrap_or(&[]))
        .copied()
        .collect()
}

/// What the check compared, and the worst agreement it saw (serialized in `--json` runs'
/// summary).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OracleCheck {
    /// The kernels checked (`cpu`, `cuda:0`).
    pub backend: String,
    /// Comparisons made: one per combination and layer.
    pub comparisons: usize,
    /// Query rows compared per layer.
    pub rows_per_layer: usize,
    /// The tolerance: largest relative L2 error.
    pub tolerance_rel_l2: f64,
    /// The tolerance: largest relative max-abs error.
    pub tolerance_max_abs: f64,
    /// Largest relative L2 error seen.
    pub worst_rel_l2: f64,
    /// Largest relative max-abs error seen.
    pub worst_max_abs: f64,
    /// Where the largest relative L2 error was.
    pub worst_at: String,
}

impl OracleCheck {
    /// A check of `backend`'s output at `precision`, nothing compared yet.
    ///
    /// ```
    /// use rotq_cli::oracle_check::OracleCheck;
    /// use rotq::reference::tolerance::Precision;
    /// let mut c = OracleCheck::new("cpu", Precision::F32, 2);
    /// c.compare(|| "q4_0/q8_0/none layer 0".into(), &[1.0, 2.0], &[1.0, 2.0]).unwrap();
    /// assert!(c.compare(|| "q4_0/q8_0/none layer 1".into(), &[1.0, 2.5], &[1.0, 2.0]).is_err());
    /// assert_eq!(c.comparisons, 1);
    /// ```
    pub fn new(backend: &str, precision: Precision, rows_per_layer: usize) -> Self {
        let t = tolerance(Op::Attention, precision);
        Self {
            backend: backend.into(),
            comparisons: 0,
            rows_per_layer,
            tolerance_rel_l2: t.rel_l2,
            tolerance_max_abs: t.max_abs,
            worst_rel_l2: 0.0,
            worst_max_abs: 0.0,
            worst_at: String::new(),
        }
    }

    fn tolerance(&self) -> Tolerance {
        Tolerance {
            rel_l2: self.tolerance_rel_l2,
            max_abs: self.tolerance_max_abs,
        }
    }

    /// Compares the kernel's rows `got` with the oracle's `want`; `what` names the combination
    /// and layer (for the error and the summary).
    pub fn compare(
        &mut self,
        what: impl FnOnce() -> String,
        got: &[f64],
        want: &[f64],
    ) -> Result<(), Error> {
        if let Err(mismatch) = self.tolerance().check(got, want) {
            return Err(Error::OracleMismatch {
                backend: self.backend.clone(),
                what: what(),
                mismatch,
            });
        }
        let measured = (rel_l2(got, want), max_abs_rel(got, want));
        self.comparisons += 1;
        if measured.0 >= self.worst_rel_l2 {
            self.worst_rel_l2 = measured.0;
            self.worst_at = what();
        }
        self.worst_max_abs = self.worst_max_abs.max(measured.1);
        Ok(())
    }

    /// One line for the terminal.
    ///
    /// ```
    /// use rotq_cli::oracle_check::OracleCheck;
    /// use rotq::reference::tolerance::Precision;
    /// let c = OracleCheck::new("cpu", Precision::F32, 2);
    /// assert!(c.line().starts_with("oracle check (cpu): 0 comparisons"));
    /// ```
    pub fn line(&self) -> String {
        let worst = if self.comparisons == 0 {
            String::new()
        } else {
            format!(
                "; worst rel L2 {:.1e} ({}), worst max-abs {:.1e}",
                self.worst_rel_l2, self.worst_at, self.worst_max_abs
            )
        };
        format!(
            "oracle check ({}): {} comparisons of {} query rows each against the oracle on the \
             same cache bytes, all within the attention tolerance (rel L2 <= {:e}, max-abs <= \
             {:e}){worst}",
            self.backend,
            self.comparisons,
            self.rows_per_layer,
            self.tolerance_rel_l2,
            self.tolerance_max_abs
        )
    }
}
