//! The end-to-end grid of `rotq eval --model`: every K format × V format × plan scored on the
//! same chunks of text against an f16 cache without rotation (the baseline, as
//! `llama-perplexity --kl-divergence` takes an f16 run) and against an f32 cache. One chunk
//! at a time: the baseline's and the f32 run's distributions for that chunk are kept while
//! every configuration runs on it, so memory is bounded by one chunk whatever the text's
//! length.
//!
//! ```
//! use rotq::KvFormat;
//! use rotq_model::grid::{run, GridOptions};
//! use rotq_model::llama::{Config, Llama};
//! let config = Config { n_layers: 1, dim: 64, ffn_dim: 64, n_heads: 2, n_kv_heads: 1,
//!     head_dim: 32, vocab: 40, ..Config::default() };
//! let model = Llama::random(config, 1)?;
//! let tokens: Vec<u32> = (0..64).map(|i| i % 40).collect();
//! let opts = GridOptions { ctx: 32, k_formats: vec![KvFormat::Q4_0], v_formats: vec![KvFormat::F16],
//!     plans: vec!["none".parse()?, "hadamard".parse()?], ..GridOptions::default() };
//! let report = run(&model, &tokens, &opts, |_, _| {})?;
//! assert_eq!(report.rows.len(), 2 + 2); // the f16 and f32 caches, then the grid
//! assert_eq!(report.rows[0].summary.tokens, 2 * 15);
//! # Ok::<(), rotq_model::Error>(())
//! ```

use std::time::Instant;

use rayon::prelude::*;
use rotq::cache::{Backend, CacheSpec};
use rotq::QueryMode;
use rotq::{KvFormat, RotationPlan};
use serde::Serialize;

use crate::llama::Llama;
use crate::perplexity::{chunk_log_probs_on, Summary, Tally};
use crate::plan::Plan;
use crate::Error;

/// What the grid runs.
#[derive(Clone, Debug)]
pub struct GridOptions {
    /// Tokens per chunk (each chunk runs in a fresh context).
    pub ctx: usize,
    /// Chunks scored (`None`: as many whole chunks as the text holds).
    pub chunks: Option<usize>,
    /// Tokens per prefill call.
    pub batch: usize,
    /// K cache formats.
    pub k_formats: Vec<KvFormat>,
    /// V cache formats.
    pub v_formats: Vec<KvFormat>,
    /// Rotation plans.
    pub plans: Vec<Plan>,
    /// Where the caches live and their attention runs.
    pub backend: Backend,
    /// Configurations run at once on a chunk (at least 1). On a GPU, several hide each
    /// other's host work and transfers; each holds its own caches and scored log-probabilities.
    pub jobs: usize,
    /// The CPU attention's `K·Q` arithmetic in the configurations' caches (default
    /// [`QueryMode::Exact`], so that the grid scores the formats themselves; the f16 and f32
    /// references always take exact queries).
    pub query: QueryMode,
}

impl Default for GridOptions {
    fn default() -> Self {
        Self {
            ctx: 512,
            chunks: Some(2),
            batch: 128,
            k_formats: vec![KvFormat::Q8_0, KvFormat::Q4_0],
            v_formats: vec![KvFormat::Q8_0, KvFormat::Q4_0],
            plans: Plan::defaults(),
            backend: Backend::Cpu,
            jobs: 1,
            query: QueryMode::Exact,
        }
    }
}

/// One configuration's scores.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Row {
    /// K cache format.
    pub k_format: String,
    /// V cache format.
    pub v_format: String,
    /// Rotation plan.
    pub plan: String,
    /// Scores against the f16 baseline.
    #[serde(flatten)]
    pub summary: Summary,
    /// Mean token KL divergence from the f32 cache's distributions.
    pub kld_mean_vs_f32: f64,
    /// Its 99th percentile.
    pub kld_p99_vs_f32: f64,
    /// Its largest.
    pub kld_max_vs_f32: f64,
}

/// The grid's rows (the f16 baseline first, then the f32 cache, then every configuration in
/// the order asked) and what the run cost.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Report {
    /// The scores.
    pub rows: Vec<Row>,
    /// Chunks scored.
    pub chunks: usize,
    /// Tokens per chunk.
    pub ctx: usize,
    /// Prefill tokens per second over every run, by the wall clock.
    pub tokens_per_second: f64,
    /// Share of the forward passes' time spent in the caches' append and attention calls.
    pub attention_share: f64,
    /// Wall-clock seconds of the whole grid.
    pub seconds: f64,
}

/// Whole chunks `tokens` holds for these options, or an error that says what is missing.
pub fn chunk_count(tokens: usize, opts: &GridOptions) -> Result<usize, Error> {
    if opts.ctx < 4 || opts.batch == 0 {
        return Err(Error::Shape(format!(
            "a context of {} tokens in batches of {}: at least 4 tokens and a positive batch",
            opts.ctx, opts.batch
        )));
    }
    if opts.jobs == 0 {
        return Err(Error::Shape("--jobs must be positive".into()));
    }
    let whole = tokens / opts.ctx;
    match opts.chunks {
        _ if whole == 0 => Err(Error::Shape(format!(
            "the text has {tokens} tokens, fewer than one context of {}",
            opts.ctx
        ))),
        Some(0) => Err(Error::Shape("--chunks must be positive".into())),
        Some(n) if n > whole => Err(Error::Shape(format!(
            "the text has {tokens} tokens: {whole} chunks of {}, not {n}",
            opts.ctx
        ))),
        Some(n) => Ok(n),
        None => Ok(whole),
    }
}

/// The most memory the grid holds beside the model's weights, in bytes (`None` if it does not
/// fit in 64 bits): the log-probabilities of a chunk's scored half for the baseline, the f32
/// cache and each of the `jobs` configurations running at once, and for each of those, one
/// prefill batch's activations and logits and one set of caches of `ctx` tokens at 4 bytes a
/// value (the widest format).
///
/// ```
/// use rotq_model::grid::{memory_needed, GridOptions};
/// use rotq_model::llama::Config;
/// let small = memory_needed(&Config::default(), &GridOptions::default()).unwrap();
/// assert!(small < 1 << 30);
/// let huge = GridOptions { ctx: 1_000_000, ..GridOptions::default() };
/// assert!(memory_needed(&Config::default(), &huge).unwrap() > 64 << 30);
/// ```
pub fn memory_needed(config: &crate::llama::Config, opts: &GridOptions) -> Option<u64> {
    let n = |x: usize| u64::try_from(x).ok();
    let (ctx, batch, vocab) = (n(opts.ctx)?, n(opts.batch.min(opts.ctx))?, n(config.vocab)?);
    let jobs = n(opts.jobs.max(1))?;
    let scored = (ctx / 2).checked_mul(vocab)?.checked_mul(4)?;
    let widest = n(config.dim.max(config.ffn_dim))?.max(vocab);
    let activations = batch.checked_mul(widest)?.checked_mul(4 * 8)?;
    let caches = ctx
        .checked_mul(n(config.kv_dim())?)?
        .checked_mul(n(config.n_layers)?)?
        .checked_mul(4 * 2)?;
    let per_job = scored.checked_add(activations)?.checked_add(caches)?;
    scored
        .checked_mul(2)?
        .checked_add(per_job.checked_mul(jobs)?)
}

/// The configurations the grid runs, after the two references: (K, V, plan).
pub fn configurations(opts: &GridOptions) -> Vec<(KvFormat, KvFormat, Plan)> {
    let mut out = Vec::new();
    for &k in &opts.k_formats {
        for &v in &opts.v_formats {
            for &p in &opts.plans {
                out.push((k, v, p));
            }
        }
    }
    out
}

/// The caches of [`configurations`], in their order, for heads of `head_dim` values (an error
/// names a plan the heads cannot take).
pub fn cache_specs(opts: &GridOptions, head_dim: usize) -> Result<Vec<CacheSpec>, Error> {
    configurations(opts)
        .into_iter()
        .map(|(k_format, v_format, plan)| {
            Ok(CacheSpec {
                k_format,
                v_format,
                plan: plan.build(head_dim)?,
                query: opts.query,
                ..Default::default()
            })
        })
        .collect()
}

/// A reference cache: K and V in `format`, no rotation, exact queries.
fn reference(format: KvFormat) -> CacheSpec {
    CacheSpec {
        k_format: format,
        v_format: format,
        plan: RotationPlan::none(),
        query: QueryMode::Exact,
        ..Default::default()
    }
}

/// Runs the grid on `tokens`; `progress(done, total)` is called after each run of a chunk.
pub fn run(
    model: &Llama,
    tokens: &[u32],
    opts: &GridOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<Report, Error> {
    let start = Instant::now();
    let chunks = chunk_count(tokens.len(), opts)?;
    let configs = configurations(opts);
    let specs = cache_specs(opts, model.config.head_dim)?;
    let (f16, f32) = (reference(KvFormat::F16), reference(KvFormat::F32));
    let mut base_tally = Tally::default();
    let mut f32_tally = (Tally::default(), Tally::default());
    // The baseline's divergence from the f32 cache: KL(f32 ‖ f16).
    let mut base_vs_f32 = Tally::default();
    let mut tallies = vec![(Tally::default(), Tally::default()); specs.len()];
    let before = model.timings();
    let total = chunks * (specs.len() + 2);
    let mut done = 0;
    let mut step = |done: &mut usize| {
        *done += 1;
        progress(*done, total);
    };
    for chunk in tokens.chunks_exact(opts.ctx).take(chunks) {
        let run =
            |spec: &CacheSpec| chunk_log_probs_on(model, chunk, spec, opts.batch, &opts.backend);
        let base = run(&f16)?;
        step(&mut done);
        let full = run(&f32)?;
        step(&mut done);
        base_tally.add(&base, &base)?;
        f32_tally.0.add(&base, &full)?;
        f32_tally.1.add(&full, &full)?;
        base_vs_f32.add(&full, &base)?;
        // `jobs` configurations at a time: memory stays bounded by `jobs` runs of a chunk.
        for (group, tallies) in specs
            .chunks(opts.jobs.max(1))
            .zip(tallies.chunks_mut(opts.jobs.max(1)))
        {
            let outs: Vec<_> = group.par_iter().map(run).collect();
            for (out, (vs_base, vs_f32)) in outs.into_iter().zip(tallies) {
                let out = out?;
                vs_base.add(&base, &out)?;
                vs_f32.add(&full, &out)?;
                step(&mut done);
            }
        }
    }

    let row = |k: KvFormat, v: KvFormat, plan: String, t: &(Tally, Tally)| Row {
        k_format: k.info().name.to_string(),
        v_format: v.info().name.to_string(),
        plan,
        summary: t.0.summary(Some(&base_tally)),
        kld_mean_vs_f32: t.1.summary(None).kld_mean,
        kld_p99_vs_f32: t.1.summary(None).kld_p99,
        kld_max_vs_f32: t.1.summary(None).kld_max,
    };
    let mut rows = vec![
        row(
            KvFormat::F16,
            KvFormat::F16,
            "none".into(),
            &(base_tally.clone(), base_vs_f32),
        ),
        row(KvFormat::F32, KvFormat::F32, "none".into(), &f32_tally),
    ];
    for (&(k, v, plan), t) in configs.iter().zip(&tallies) {
        rows.push(row(k, v, plan.to_string(), t));
    }
    let spent = model.timings();
    let (forward, attention) = (
        spent.total.saturating_sub(before.total),
        spent.attention.saturating_sub(before.attention),
    );
    let seconds = start.elapsed().as_secs_f64();
    Ok(Report {
        rows,
        chunks,
        ctx: opts.ctx,
        tokens_per_second: (total * opts.ctx) as f64 / seconds.max(1e-9),
        attention_share: attention.as_secs_f64() / forward.as_secs_f64().max(1e-9),
        seconds,
    })
}

/// One configuration run on two backends ([`agreement`]).
#[derive(Clone, Debug, Serialize, PartialEq)]
#[non_exhaustive]
pub struct Agreement {
    /// K cache format.
    pub k_format: String,
    /// V cache format.
    pub v_format: String,
    /// Rotation plan.
    pub plan: String,
    /// The perplexity of the first backend's run.
    pub ppl_first: f64,
    /// The second run against the first: its perplexity and gap, KL(first ‖ second) per token,
    /// and how often both pick the same most likely token.
    pub summary: Summary,
}

/// Every configuration of the grid, with the f16 and f32 caches first, run on two backends
/// (`first` and `second`: a model and where its caches live, each model's products where it
/// was put) and scored run against run: how far the two backends' kernels disagree on the
/// same cache formats (the f16 cache's KL divergence is the kernels' own, with nothing
/// quantized). `progress(done, total)` after each pair of runs of a chunk.
///
/// ```no_run
/// use rotq::cache::Backend;
/// use rotq_model::grid::{agreement, GridOptions};
/// # fn models() -> (rotq_model::llama::Llama, rotq_model::llama::Llama) { unimplemented!() }
/// let (on_cpu, on_gpu) = models(); // one GGUF loaded twice, products on each backend
/// let gpu = Backend::open("cuda:0")?;
/// let tokens = vec![1u32; 1024];
/// let rows = agreement((&on_cpu, &Backend::Cpu), (&on_gpu, &gpu), &tokens,
///                      &GridOptions::default(), |_, _| {})?;
/// assert!(rows[0].summary.kld_mean < 1e-6); // the f16 caches
/// # Ok::<(), rotq_model::Error>(())
/// ```
pub fn agreement(
    first: (&Llama, &Backend),
    second: (&Llama, &Backend),
    tokens: &[u32],
    opts: &GridOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Agreement>, Error> {
    let chunks = chunk_count(tokens.len(), opts)?;
    let none = Plan {
        qk: rotq::RotationSpec::None,
        v_block: None,
    };
    let mut configs = vec![
        (KvFormat::F16, KvFormat::F16, none),
        (KvFormat::F32, KvFormat::F32, none),
    ];
    configs.extend(configurations(opts));
    let mut specs = vec![reference(KvFormat::F16), reference(KvFormat::F32)];
    specs.extend(cache_specs(opts, first.0.config.head_dim)?);
    let mut tallies = vec![(Tally::default(), Tally::default()); specs.len()];
    let total = chunks * specs.len();
    let mut done = 0;
    for chunk in tokens.chunks_exact(opts.ctx).take(chunks) {
        for (spec, (a_tally, b_tally)) in specs.iter().zip(&mut tallies) {
            let a = chunk_log_probs_on(first.0, chunk, spec, opts.batch, first.1)?;
            let b = chunk_log_probs_on(second.0, chunk, spec, opts.batch, second.1)?;
            a_tally.add(&a, &a)?;
            b_tally.add(&a, &b)?;
            done += 1;
            progress(done, total);
        }
    }
    Ok(configs
        .into_iter()
        .zip(&tallies)
        .map(|((k, v, plan), (a, b))| Agreement {
            k_format: k.info().name.to_string(),
            v_format: v.info().name.to_string(),
            plan: plan.to_string(),
            ppl_first: a.summary(None).ppl,
            summary: b.summary(Some(a)),
        })
        .collect())
}
