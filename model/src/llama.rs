//! The llama forward pass on the CPU (RMSNorm, RoPE, grouped-query attention, SwiGLU), with
//! every layer's attention going through a [`RotatedKvCache`]: the runner appends each chunk's
//! keys and values to the layer's cache and asks the cache for the attention of the chunk's
//! queries, as an engine would. Everything else runs in f32; the matrix products go through
//! `ndarray` (matrixmultiply's kernels), split across threads by output rows with rayon.
//!
//! ```
//! use rotq::cache::CacheSpec;
//! use rotq_model::llama::{Config, Llama};
//! let config = Config { n_layers: 1, dim: 64, ffn_dim: 96, n_heads: 2, n_kv_heads: 1,
//!     head_dim: 32, vocab: 50, ..Config::default() };
//! let model = Llama::random(config, 7)?;
//! let mut caches = model.caches(&CacheSpec::default(), 16)?;
//! let logits = model.forward(&[1, 2, 3], &mut caches, None)?;
//! assert_eq!(logits.len(), 3 * 50);
//! assert_eq!(caches[0].len(), 3);
//! # Ok::<(), rotq_model::Error>(())
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::{linalg::general_mat_mul, ArrayView2, ArrayViewMut2};
use rayon::prelude::*;
use rotq::cache::{Backend, CacheSpec, RotatedKvCache};
use rotq::reference::rope::{Rope, RopeVariant};
use rotq::AttentionParams;

use crate::cublas::{Blas, DeviceMatrix};
use crate::Error;

/// A llama model's shape and constants (what a GGUF file's `llama.*` keys hold).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Transformer blocks.
    pub n_layers: usize,
    /// Hidden size (`embedding_length`).
    pub dim: usize,
    /// Feed-forward size.
    pub ffn_dim: usize,
    /// Query heads.
    pub n_heads: usize,
    /// KV heads (a divisor of `n_heads`: grouped-query attention).
    pub n_kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// RoPE base.
    pub rope_base: f32,
    /// RoPE pairing: ggml's llama files store Q and K for adjacent pairs ([`RopeVariant::Normal`]).
    pub rope_variant: RopeVariant,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// The context length the model was trained for.
    pub train_ctx: usize,
}

impl Default for Config {
    /// SmolLM2-135M's shape.
    fn default() -> Self {
        Self {
            n_layers: 30,
            dim: 576,
            ffn_dim: 1536,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            vocab: 49152,
            rope_base: 100_000.0,
            rope_variant: RopeVariant::Normal,
            rms_eps: 1e-5,
            train_ctx: 8192,
        }
    }
}

impl Config {
    /// Checks that the shape is one the runner can run (positive sizes, heads that divide
    /// the hidden size, GQA groups, an even head dimension for RoPE).
    ///
    /// ```
    /// use rotq_model::llama::Config;
    /// assert!(Config::default().check().is_ok());
    /// assert!(Config { n_kv_heads: 2, ..Config::default() }.check().is_err()); // 9 heads
    /// ```
    pub fn check(&self) -> Result<(), Error> {
        let bad = |reason: String| Err(Error::Shape(reason));
        let sizes = [
            self.n_layers,
            self.dim,
            self.ffn_dim,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
            self.vocab,
        ];
        if sizes.contains(&0) {
            return bad(format!("a size is zero: {self:?}"));
        }
        if self.n_heads.checked_mul(self.head_dim) != Some(self.dim) {
            return bad(format!(
                "{} heads of {} values do not make the hidden size {}",
                self.n_heads, self.head_dim, self.dim
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} query heads are not a multiple of {} KV heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dim {} is odd (RoPE pairs)", self.head_dim));
        }
        if !(self.rope_base.is_finite() && self.rope_base > 0.0) {
            return bad(format!("RoPE base {} is not positive", self.rope_base));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return bad(format!("RMSNorm epsilon {} is not valid", self.rms_eps));
        }
        Ok(())
    }

    /// Values of one token's keys (or values) across the KV heads.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// The RoPE the model applies, as rotq's context shift takes it.
    ///
    /// ```
    /// let rope = rotq_model::llama::Config::default().rope();
    /// assert_eq!((rope.dims, rope.freq_base), (64, 100_000.0));
    /// ```
    pub fn rope(&self) -> Rope {
        Rope {
            freq_base: f64::from(self.rope_base),
            ..Rope::new(self.rope_variant, self.head_dim)
        }
    }
}

/// A weight matrix `[rows, cols]`, row-major: a layer's `y = x · Wᵀ` maps `cols` inputs to
/// `rows` outputs (GGUF stores a linear layer as `[cols, rows]` with `cols` fastest, which
/// is this layout).
#[derive(Clone, Debug)]
pub struct Matrix {
    /// Outputs.
    pub rows: usize,
    /// Inputs.
    pub cols: usize,
    /// `rows × cols` values.
    pub data: Vec<f32>,
    /// A copy in device memory that [`Self::apply`] uses instead (see [`Llama::products_on`]).
    device: Option<Arc<DeviceMatrix>>,
}

impl Matrix {
    /// A matrix from its values, checked against its shape.
    ///
    /// ```
    /// use rotq_model::llama::Matrix;
    /// assert!(Matrix::new(2, 3, vec![0.0; 6]).is_ok());
    /// assert!(Matrix::new(2, 3, vec![0.0; 5]).is_err());
    /// ```
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self, Error> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(Error::Shape(format!(
                "a {rows} x {cols} matrix given {} values",
                data.len()
            )));
        }
        Ok(Self {
            rows,
            cols,
            data,
            device: None,
        })
    }

    /// `x · Wᵀ` for `n` rows of `x` (`[n, cols]`), as `[n, rows]`.
    ///
    /// ```
    /// use rotq_model::llama::Matrix;
    /// let w = Matrix::new(2, 3, vec![1.0, 0.0, 0.0, 0.0, 1.0, 1.0])?;
    /// assert_eq!(w.apply(&[1.0, 2.0, 3.0], 1)?, [1.0, 5.0]);
    /// assert!(w.apply(&[1.0, 2.0], 1).is_err());
    /// # Ok::<(), rotq_model::Error>(())
    /// ```
    pub fn apply(&self, x: &[f32], n: usize) -> Result<Vec<f32>, Error> {
        if n.checked_mul(self.cols) != Some(x.len()) {
            return Err(Error::Shape(format!(
                "{} inputs for {n} rows of a {} x {} matrix",
                x.len(),
                self.rows,
                self.cols
            )));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        if let Some(d) = &self.device {
            return d.apply(x, n, self.rows, self.cols);
        }
        // yᵀ = W · xᵀ, one block of W's rows per task (contiguous outputs), then transposed:
        // the transpose costs n·rows moves against the product's n·rows·cols.
        let mut yt = vec![0.0f32; self.rows * n];
        let x = ArrayView2::from_shape((n, self.cols), x).expect("x holds n rows of cols");
        let block = self.rows.div_ceil(rayon::current_num_threads() * 4).max(16);
        yt.par_chunks_mut(block * n)
            .zip(self.data.par_chunks(block * self.cols))
            .for_each(|(out, w)| {
                let rows = w.len() / self.cols;
                let w = ArrayView2::from_shape((rows, self.cols), w).expect("whole rows");
                let mut out = ArrayViewMut2::from_shape((rows, n), out).expect("whole rows");
                general_mat_mul(1.0, &w, &x.t(), 0.0, &mut out);
            });
        if n == 1 {
            return Ok(yt);
        }
        let mut y = vec![0.0f32; n * self.rows];
        for (r, row) in yt.chunks_exact(n).enumerate() {
            for (t, &v) in row.iter().enumerate() {
                y[t * self.rows + r] = v;
            }
        }
        Ok(y)
    }
}

/// One transformer block's weights.
#[derive(Clone, Debug)]
pub struct Layer {
    /// RMSNorm weight before attention (`dim`).
    pub attn_norm: Vec<f32>,
    /// Query projection `[dim, dim]`.
    pub wq: Matrix,
    /// Key projection `[kv_dim, dim]`.
    pub wk: Matrix,
    /// Value projection `[kv_dim, dim]`.
    pub wv: Matrix,
    /// Attention output projection `[dim, dim]`.
    pub wo: Matrix,
    /// RMSNorm weight before the feed-forward (`dim`).
    pub ffn_norm: Vec<f32>,
    /// SwiGLU gate `[ffn_dim, dim]`.
    pub w_gate: Matrix,
    /// SwiGLU up projection `[ffn_dim, dim]`.
    pub w_up: Matrix,
    /// Down projection `[dim, ffn_dim]`.
    pub w_down: Matrix,
}

/// Where a forward pass spends its time (wall clock, for the report; nothing decides on it).
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    /// Inside the caches' `append` and `attention` calls.
    pub attention: Duration,
    /// The whole forward passes.
    pub total: Duration,
}

/// What a forward pass hands to an observer: each layer's queries after RoPE
/// (`[n, n_heads, head_dim]`), and the keys and values it appended (`[n, n_kv_heads,
/// head_dim]`), for attention-level scores and fixtures.
pub type LayerTap<'a> = &'a mut dyn FnMut(usize, &[f32], &[f32], &[f32]);

/// A llama model held in f32.
#[derive(Debug)]
pub struct Llama {
    /// Its shape.
    pub config: Config,
    /// Token embeddings `[vocab, dim]`.
    pub embeddings: Matrix,
    /// The blocks.
    pub layers: Vec<Layer>,
    /// The final RMSNorm weight.
    pub out_norm: Vec<f32>,
    /// The output projection `[vocab, dim]`; `None` when tied to the embeddings.
    pub output: Option<Matrix>,
    /// Wall-clock time spent, accumulated over forward passes.
    timings: std::sync::Mutex<Timings>,
    /// The device the products run on, when not the CPU.
    blas: Option<Arc<Blas>>,
}

impl Llama {
    /// A model from its weights, checked against the shape.
    pub fn new(
        config: Config,
        embeddings: Matrix,
        layers: Vec<Layer>,
        out_norm: Vec<f32>,
        output: Option<Matrix>,
    ) -> Result<Self, Error> {
        config.check()?;
        let (d, kv, f, v) = (config.dim, config.kv_dim(), config.ffn_dim, config.vocab);
        let want = |what: String, m: &Matrix, rows: usize, cols: usize| {
            if (m.rows, m.cols) == (rows, cols) {
                Ok(())
            } else {
                Err(Error::Shape(format!(
                    "{what} is {} x {}, the model needs {rows} x {cols}",
                    m.rows, m.cols
                )))
            }
        };
        want("token embeddings".into(), &embeddings, v, d)?;
        if let Some(o) = &output {
            want("output".into(), o, v, d)?;
        }
        if layers.len() != config.n_layers || out_norm.len() != d {
            return Err(Error::Shape(format!(
                "{} layers and an output norm of {} for a model of {} layers of {d}",
                layers.len(),
                out_norm.len(),
                config.n_layers
            )));
        }
        for (i, l) in layers.iter().enumerate() {
            want(format!("layer {i} wq"), &l.wq, d, d)?;
            want(format!("layer {i} wk"), &l.wk, kv, d)?;
            want(format!("layer {i} wv"), &l.wv, kv, d)?;
            want(format!("layer {i} wo"), &l.wo, d, d)?;
            want(format!("layer {i} gate"), &l.w_gate, f, d)?;
            want(format!("layer {i} up"), &l.w_up, f, d)?;
            want(format!("layer {i} down"), &l.w_down, d, f)?;
            if l.attn_norm.len() != d || l.ffn_norm.len() != d {
                return Err(Error::Shape(format!("layer {i}'s norms are not {d} long")));
            }
        }
        Ok(Self {
            config,
            embeddings,
            layers,
            out_norm,
            output,
            timings: Default::default(),
            blas: None,
        })
    }

    /// A model of this shape with seeded random weights (tests and examples): scaled so that
    /// activations stay of order one through the layers.
    pub fn random(config: Config, seed: u64) -> Result<Self, Error> {
        config.check()?;
        let mut rng = rotq::reference::rotation::SplitMix64::new(seed);
        let mut m = |rows: usize, cols: usize| {
            let s = 1.0 / (cols as f64).sqrt();
            let data = (0..rows * cols)
                .map(|_| ((rng.next_f64() * 2.0 - 1.0) * s * 1.7) as f32)
                .collect();
            Matrix {
                rows,
                cols,
                data,
                device: None,
            }
        };
        let (d, kv, f, v) = (config.dim, config.kv_dim(), config.ffn_dim, config.vocab);
        let embeddings = m(v, d);
        let layers = (0..config.n_layers)
            .map(|_| Layer {
                attn_norm: vec![1.0; d],
                wq: m(d, d),
                wk: m(kv, d),
                wv: m(kv, d),
                wo: m(d, d),
                ffn_norm: vec![1.0; d],
                w_gate: m(f, d),
                w_up: m(f, d),
                w_down: m(d, f),
            })
            .collect();
        Self::new(config, embeddings, layers, vec![1.0; d], None)
    }

    /// Runs the matrix products on `backend` from now on: on a CUDA device the weights are
    /// uploaded once (as f32, 4 bytes a parameter) and every product is a cuBLAS SGEMM (see
    /// the `cublas` module); on the CPU they go back to the host's GEMM. The caches are chosen
    /// separately ([`Self::caches_on`]).
    ///
    /// ```
    /// # use rotq::cache::Backend;
    /// # use rotq_model::llama::{Config, Llama};
    /// # let config = Config { n_layers: 1, dim: 64, ffn_dim: 64, n_heads: 2, n_kv_heads: 1,
    /// #     head_dim: 32, vocab: 50, ..Config::default() };
    /// let mut model = Llama::random(config, 7)?;
    /// if let Ok(gpu) = Backend::open("cuda:0") {
    ///     model.products_on(&gpu)?;
    ///     assert_eq!(model.products_device(), "cuda:0");
    /// }
    /// # Ok::<(), rotq_model::Error>(())
    /// ```
    pub fn products_on(&mut self, backend: &Backend) -> Result<(), Error> {
        let blas = match backend {
            Backend::Cpu => None,
            Backend::Cuda(device) => Some(Blas::new(device)?),
        };
        let mut matrices: Vec<&mut Matrix> = vec![&mut self.embeddings];
        matrices.extend(self.output.as_mut());
        for l in &mut self.layers {
            matrices.extend([
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.w_gate,
                &mut l.w_up,
                &mut l.w_down,
            ]);
        }
        for m in matrices {
            m.device = match &blas {
                Some(b) => Some(Arc::new(DeviceMatrix::upload(b, &m.data)?)),
                None => None,
            };
        }
        self.blas = blas;
        Ok(())
    }

    /// Where the matrix products run: `cpu` or `cuda:N`.
    pub fn products_device(&self) -> &str {
        self.blas.as_ref().map_or("cpu", |b| b.name())
    }

    /// One CPU cache per layer, of `capacity` tokens, with `template`'s formats and rotations
    /// and this model's KV heads and head dimension.
    pub fn caches(
        &self,
        template: &CacheSpec,
        capacity: usize,
    ) -> Result<Vec<RotatedKvCache>, Error> {
        self.caches_on(template, capacity, &Backend::Cpu)
    }

    /// [`Self::caches`] on `backend` (a CUDA device holds the caches and runs their kernels;
    /// the rest of the model stays on the CPU).
    pub fn caches_on(
        &self,
        template: &CacheSpec,
        capacity: usize,
        backend: &Backend,
    ) -> Result<Vec<RotatedKvCache>, Error> {
        let spec = CacheSpec {
            n_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
            v_dim: self.config.head_dim,
            capacity,
            ..template.clone()
        };
        (0..self.config.n_layers)
            .map(|_| Ok(RotatedKvCache::on(spec.clone(), backend)?))
            .collect()
    }

    /// The logits (`[n, vocab]`) of `tokens`, which continue the sequence the caches hold:
    /// token `i` sits at the position after the newest cached one, plus `i`. Their keys and
    /// values are appended to the caches. `tap`, when given, sees each layer's queries, keys
    /// and values.
    pub fn forward(
        &self,
        tokens: &[u32],
        caches: &mut [RotatedKvCache],
        tap: Option<LayerTap<'_>>,
    ) -> Result<Vec<f32>, Error> {
        self.forward_from(tokens, caches, tap, 0)
    }

    /// [`Self::forward`], with the logits of rows `from..` only (`[n − from, vocab]`): the
    /// output projection is a fifth of a small model's work, and a perplexity run scores only
    /// part of each chunk. Every token still goes through every layer and into the caches.
    ///
    /// ```
    /// # use rotq::cache::CacheSpec;
    /// # use rotq_model::llama::{Config, Llama};
    /// # let config = Config { n_layers: 1, dim: 64, ffn_dim: 64, n_heads: 2, n_kv_heads: 1,
    /// #     head_dim: 32, vocab: 50, ..Config::default() };
    /// # let model = Llama::random(config, 7)?;
    /// let spec = CacheSpec::default();
    /// let (mut a, mut b) = (model.caches(&spec, 8)?, model.caches(&spec, 8)?);
    /// let all = model.forward(&[1, 2, 3], &mut a, None)?;
    /// let last = model.forward_from(&[1, 2, 3], &mut b, None, 2)?;
    /// assert_eq!(&all[2 * 50..], &last[..]);
    /// # Ok::<(), rotq_model::Error>(())
    /// ```
    pub fn forward_from(
        &self,
        tokens: &[u32],
        caches: &mut [RotatedKvCache],
        mut tap: Option<LayerTap<'_>>,
        from: usize,
    ) -> Result<Vec<f32>, Error> {
        let start = Instant::now();
        let mut in_attention = Duration::ZERO;
        let c = &self.config;
        if caches.len() != c.n_layers {
            return Err(Error::Shape(format!(
                "{} caches for {} layers",
                caches.len(),
                c.n_layers
            )));
        }
        let n = tokens.len();
        let pos = caches[0].positions().last().map_or(0, |&p| p + 1);
        let (d, hd) = (c.dim, c.head_dim);
        let mut x = Vec::with_capacity(n * d);
        for &t in tokens {
            let t = t as usize;
            if t >= c.vocab {
                return Err(Error::Shape(format!(
                    "token {t} is outside the vocabulary of {}",
                    c.vocab
                )));
            }
            x.extend_from_slice(&self.embeddings.data[t * d..(t + 1) * d]);
        }
        let rope = RopeTable::new(&c.rope(), pos, n);
        let params = AttentionParams {
            causal: true,
            pos_offset: pos,
            ..Default::default()
        };
        for (li, (layer, cache)) in self.layers.iter().zip(caches.iter_mut()).enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, c.rms_eps);
            let mut q = layer.wq.apply(&h, n)?;
            let mut k = layer.wk.apply(&h, n)?;
            let v = layer.wv.apply(&h, n)?;
            rope.apply(&mut q, c.n_heads, hd);
            rope.apply(&mut k, c.n_kv_heads, hd);
            if let Some(tap) = tap.as_mut() {
                tap(li, &q, &k, &v);
            }
            let t0 = Instant::now();
            cache.append(&k, &v)?;
            let attn = cache.attention(&q, n, c.n_heads, &params)?;
            in_attention += t0.elapsed();
            let o = layer.wo.apply(&attn, n)?;
            add(&mut x, &o);
            let h = rms_norm(&x, &layer.ffn_norm, c.rms_eps);
            let mut g = layer.w_gate.apply(&h, n)?;
            let u = layer.w_up.apply(&h, n)?;
            for (g, u) in g.iter_mut().zip(&u) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            let down = layer.w_down.apply(&g, n)?;
            add(&mut x, &down);
        }
        let from = from.min(n);
        let h = rms_norm(&x[from * d..], &self.out_norm, c.rms_eps);
        let logits = self
            .output
            .as_ref()
            .unwrap_or(&self.embeddings)
            .apply(&h, n - from)?;
        if let Ok(mut t) = self.timings.lock() {
            t.attention += in_attention;
            t.total += start.elapsed();
        }
        Ok(logits)
    }

    /// Time spent in forward passes so far (and in their attention calls).
    pub fn timings(&self) -> Timings {
        self.timings.lock().map(|t| *t).unwrap_or_default()
    }
}

/// `x / rms(x) · w` per row of `w.len()` values.
fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(w.len()) {
        let ms = row
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            / row.len() as f64;
        let scale = (1.0 / (ms + f64::from(eps)).sqrt()) as f32;
        out.extend(row.iter().zip(w).map(|(&v, &w)| v * scale * w));
    }
    out
}

fn add(x: &mut [f32], y: &[f32]) {
    for (x, y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

/// `(cos, sin)` of every pair's angle at positions `pos..pos + n`.
struct RopeTable {
    rope: Rope,
    angles: Vec<(f32, f32)>,
}

impl RopeTable {
    fn new(rope: &Rope, pos: usize, n: usize) -> Self {
        let angles = (pos..pos + n)
            .flat_map(|p| rope.angles(p as i64))
            .map(|(c, s)| (c as f32, s as f32))
            .collect();
        Self {
            rope: *rope,
            angles,
        }
    }

    /// Rotates rows `[n, heads, head_dim]` in place, row `t` at position `pos + t`.
    fn apply(&self, x: &mut [f32], heads: usize, head_dim: usize) {
        let pairs = self.rope.dims / 2;
        for (t, token) in x.chunks_exact_mut(heads * head_dim).enumerate() {
            let angles = &self.angles[t * pairs..(t + 1) * pairs];
            for head in token.chunks_exact_mut(head_dim) {
                for (i, &(c, s)) in angles.iter().enumerate() {
                    let (a, b) = self.rope.pair(i);
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * c - x1 * s;
                    head[b] = x0 * s + x1 * c;
                }
            }
        }
    }
}
