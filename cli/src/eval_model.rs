//! `rotq eval --model FILE.gguf --text FILE`: the end-to-end grid on a real model (see
//! [`rotq_model::grid`]): the model and its tokenizer from the GGUF file, the text cut into
//! chunks, every K format × V format × plan scored by perplexity, token KL divergence and
//! top-1 agreement against an f16 cache, printed as a table (or JSON lines) and written as CSV.

use std::path::{Path, PathBuf};

use rotq::KvFormat;
use rotq_model::gguf::Gguf;
use rotq_model::grid::{self, GridOptions, Report};
use rotq_model::tokenizer::Tokenizer;

use crate::Error;

/// The K and V formats `--model` runs when none are named: the 8-bit and 4-bit formats an
/// engine picks between (the whole registry is `--k-formats` away; each configuration costs a
/// full forward pass per chunk).
pub fn default_model_formats() -> (Vec<KvFormat>, Vec<KvFormat>) {
    (
        vec![
            KvFormat::Q8_0,
            KvFormat::Q5_0,
            KvFormat::Q4_0,
            KvFormat::Iq4Nl,
        ],
        vec![KvFormat::F16, KvFormat::Q8_0, KvFormat::Q4_0],
    )
}

/// A model, its tokenizer and a text's tokens, ready for the grid.
pub struct Loaded {
    /// The model.
    pub model: rotq_model::llama::Llama,
    /// The text's tokens.
    pub tokens: Vec<u32>,
}

impl From<rotq_model::Error> for Error {
    fn from(e: rotq_model::Error) -> Self {
        match e {
            rotq_model::Error::Engine(e) => Error::Engine(e),
            other => Error::Input(other.to_string()),
        }
    }
}

/// Opens the model (refusing one too large for memory, or whose heads `plans` cannot rotate,
/// before its weights are read), puts its matrix products on `backend` (a GPU's cuBLAS, or
/// the CPU), and tokenizes the text; an error names the file and what is wrong.
pub fn load(
    model: &Path,
    text: &Path,
    plans: &[rotq_model::plan::Plan],
    backend: &rotq::cache::Backend,
) -> Result<Loaded, Error> {
    match std::fs::metadata(text) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(Error::Input(format!("{}: not a file", text.display()))),
        Err(source) => {
            return Err(Error::Io {
                path: text.to_path_buf(),
                source,
            })
        }
    }
    let file = Gguf::open(model).map_err(rotq_model::Error::from)?;
    let config = rotq_model::load::config(&file)?;
    for plan in plans {
        plan.build(config.head_dim)
            .map_err(|e| Error::Input(format!("{}: {e}", model.display())))?;
    }
    crate::eval::check_memory(Some(rotq_model::load::f32_bytes(&file)))
        .map_err(|e| Error::Input(format!("{}: {e}", model.display())))?;
    let tokenizer = Tokenizer::from_gguf(&file).map_err(rotq_model::Error::from)?;
    if tokenizer.vocab_size() != config.vocab {
        return Err(Error::Input(format!(
            "{}: the tokenizer has {} tokens and the model a vocabulary of {}",
            model.display(),
            tokenizer.vocab_size(),
            config.vocab
        )));
    }
    let mut model = rotq_model::load::llama(&file)?;
    model.products_on(backend)?;
    let bytes = crate::io::read_bytes(text)?;
    let text_str = std::str::from_utf8(&bytes)
        .map_err(|e| Error::Input(format!("{}: not UTF-8 text: {e}", text.display())))?;
    let mut tokens = Vec::new();
    if tokenizer.add_bos() {
        tokens.extend(tokenizer.bos());
    }
    tokens.extend(tokenizer.encode(text_str));
    Ok(Loaded { model, tokens })
}

/// Runs the grid with a progress bar on stderr and prints the report.
pub fn run(
    loaded: &Loaded,
    text: &Path,
    opts: &GridOptions,
    json: bool,
    csv: Option<&PathBuf>,
) -> Result<Report, Error> {
    let chunks = grid::chunk_count(loaded.tokens.len(), opts)
        .map_err(|e| Error::Input(format!("{}: {e}", text.display())))?;
    crate::eval::check_memory(grid::memory_needed(&loaded.model.config, opts))
        .map_err(|e| Error::Input(format!("--ctx {} --batch {}: {e}", opts.ctx, opts.batch)))?;
    let configs = grid::configurations(opts).len();
    eprintln!(
        "{} tokens; {chunks} chunks of {}; caches on {}, matrix products on {}; {configs} configurations (K x V x plan) + the f16 and f32 caches",
        loaded.tokens.len(),
        opts.ctx,
        opts.backend.name(),
        loaded.model.products_device()
    );
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} chunk runs {elapsed} (eta {eta})",
    ) {
        bar.set_style(style);
    }
    let report = grid::run(&loaded.model, &loaded.tokens, opts, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    let report = report?;
    if let Some(csv) = csv {
        crate::io::write_atomic(csv, report_csv(&report).as_bytes())?;
        eprintln!("wrote {}", csv.display());
    }
    if json {
        for r in &report.rows {
            println!(
                "{}",
                serde_json::to_string(r).map_err(|e| Error::Input(e.to_string()))?
            );
        }
    } else {
        print!("{}", report_table(&report));
    }
    eprintln!(
        "{:.0} prefill tokens/s, {:.1}% of it in rotq's append and attention calls; {:.1} s in all",
        report.tokens_per_second,
        100.0 * report.attention_share,
        report.seconds
    );
    Ok(report)
}

/// The report as a table: the two references, then the grid by mean token KLD.
pub fn report_table(report: &Report) -> String {
    let mut out = format!(
        "{:<8} {:<8} {:<16} {:>9} {:>16} {:>10} {:>10} {:>10} {:>7} {:>11}\n",
        "K",
        "V",
        "plan",
        "PPL",
        "dPPL% (+- se)",
        "KLD mean",
        "KLD p99",
        "KLD max",
        "top-1%",
        "KLD vs f32"
    );
    let mut rows: Vec<_> = report.rows.iter().collect();
    rows[2..].sort_by(|a, b| a.summary.kld_mean.total_cmp(&b.summary.kld_mean));
    for r in rows {
        let s = &r.summary;
        out += &format!(
            "{:<8} {:<8} {:<16} {:>9.4} {:>+8.3} +- {:<5.3} {:>10.2e} {:>10.2e} {:>10.2e} {:>7.2} {:>11.2e}\n",
            r.k_format,
            r.v_format,
            r.plan,
            s.ppl,
            100.0 * s.delta_ppl.unwrap_or(0.0),
            100.0 * s.delta_ppl_se.unwrap_or(0.0),
            s.kld_mean,
            s.kld_p99,
            s.kld_max,
            100.0 * s.top1,
            r.kld_mean_vs_f32
        );
    }
    out
}

/// The report as CSV, one row per configuration in the order run.
pub fn report_csv(report: &Report) -> String {
    let mut out = String::from(
        "k_format,v_format,plan,tokens,ppl,delta_ppl,delta_ppl_se,kld_mean,kld_p99,kld_max,top1,\
         kld_mean_vs_f32,kld_p99_vs_f32,kld_max_vs_f32\n",
    );
    for r in &report.rows {
        let s = &r.summary;
        out += &format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            r.k_format,
            r.v_format,
            r.plan,
            s.tokens,
            s.ppl,
            s.delta_ppl.unwrap_or(0.0),
            s.delta_ppl_se.unwrap_or(0.0),
            s.kld_mean,
            s.kld_p99,
            s.kld_max,
            s.top1,
            r.kld_mean_vs_f32,
            r.kld_p99_vs_f32,
            r.kld_max_vs_f32
        );
    }
    out
}

/// The first chunk's attention inputs per layer, from a run on an f32 cache: the last
/// `queries` positions' queries (after RoPE), and every position's keys (after RoPE) and
/// values, as the activation grid takes them.
///
/// ```
/// use rotq_model::llama::{Config, Llama};
/// let config = Config { n_layers: 2, dim: 64, ffn_dim: 64, n_heads: 2, n_kv_heads: 1,
///     head_dim: 32, vocab: 40, ..Config::default() };
/// let model = Llama::random(config, 1).unwrap();
/// let chunk: Vec<u32> = (0..20).collect();
/// let layers = rotq_cli::eval_model::capture_layers(&model, &chunk, 8, 6).unwrap();
/// assert_eq!(layers.len(), 2);
/// assert_eq!((layers[1].q.shape(), layers[1].k.shape()), (&[8, 2, 32][..], &[20, 1, 32][..]));
/// assert_eq!(layers[0].params.pos_offset, 12);
/// ```
pub fn capture_layers(
    model: &rotq_model::llama::Llama,
    chunk: &[u32],
    queries: usize,
    batch: usize,
) -> Result<Vec<crate::eval::Activations>, Error> {
    let c = &model.config;
    let (n, d) = (chunk.len(), c.head_dim);
    let queries = queries.min(n);
    let f32_cache = rotq::cache::CacheSpec {
        k_format: KvFormat::F32,
        v_format: KvFormat::F32,
        ..Default::default()
    };
    let mut caches = model.caches(&f32_cache, n)?;
    let mut q = vec![Vec::new(); c.n_layers];
    let mut k = vec![Vec::new(); c.n_layers];
    let mut v = vec![Vec::new(); c.n_layers];
    let mut at = 0;
    for piece in chunk.chunks(batch.max(1)) {
        let first_kept = (n - queries).saturating_sub(at).min(piece.len());
        let mut tap = |layer: usize, qs: &[f32], ks: &[f32], vs: &[f32]| {
            q[layer].extend_from_slice(&qs[first_kept * c.n_heads * d..]);
            k[layer].extend_from_slice(ks);
            v[layer].extend_from_slice(vs);
        };
        model.forward(piece, &mut caches, Some(&mut tap))?;
        at += piece.len();
    }
    let array = |data: Vec<f32>, rows: usize, heads: usize| {
        ndarray::Array3::from_shape_vec((rows, heads, d), data)
            .map_err(|e| Error::Input(format!("captured activations: {e}")))
    };
    (0..c.n_layers)
        .map(|l| {
            Ok(crate::eval::Activations {
                q: array(std::mem::take(&mut q[l]), queries, c.n_heads)?,
                k: array(std::mem::take(&mut k[l]), n, c.n_kv_heads)?,
                v: array(std::mem::take(&mut v[l]), n, c.n_kv_heads)?,
                params: rotq::AttentionParams {
                    causal: true,
                    pos_offset: n - queries,
                    ..Default::default()
                },
            })
        })
        .collect()
}

/// The activation grid's plan for a model plan, where it has one (`none`, `hadamard`,
/// `randomized` with its default seed, `hadamard+v:32`); [`layer_grid`] runs the activation
/// grid with that seed, so both score the same rotation.
///
/// ```
/// use rotq_cli::eval::PlanKind;
/// use rotq_cli::eval_model::activation_plan;
/// let kind = |s: &str| activation_plan(&s.parse().unwrap());
/// assert_eq!(kind("randomized"), Some(PlanKind::Randomized));
/// assert_eq!(kind("hadamard+v:32"), Some(PlanKind::HadamardAndV));
/// assert_eq!(kind("randomized:7"), None);
/// assert_eq!(kind("block:32"), None);
/// ```
pub fn activation_plan(plan: &rotq_model::plan::Plan) -> Option<crate::eval::PlanKind> {
    use crate::eval::PlanKind;
    use rotq::RotationSpec;
    use rotq_model::plan::DEFAULT_SEED;
    match (plan.qk, plan.v_block) {
        (RotationSpec::None, None) => Some(PlanKind::None),
        (RotationSpec::Hadamard, None) => Some(PlanKind::Hadamard),
        (RotationSpec::Randomized(DEFAULT_SEED), None) => Some(PlanKind::Randomized),
        (RotationSpec::Hadamard, Some(32)) => Some(PlanKind::HadamardAndV),
        _ => None,
    }
}

/// Attention-level scores per layer on the first chunk (see [`capture_layers`]) for the
/// grid's formats and the plans the activation grid knows, on the CPU kernels, written as the
/// activation grid's CSV (per layer and overall).
pub fn layer_grid(
    model: &rotq_model::llama::Llama,
    tokens: &[u32],
    opts: &GridOptions,
    csv: &Path,
) -> Result<(), Error> {
    let chunk = &tokens[..opts.ctx.min(tokens.len())];
    check_layer_plans(opts)?;
    let plans: Vec<_> = opts.plans.iter().filter_map(activation_plan).collect();
    let layers = capture_layers(model, chunk, opts.ctx / 4, opts.batch)?;
    let grid = crate::eval_grid::GridOptions {
        k_formats: opts.k_formats.clone(),
        v_formats: opts.v_formats.clone(),
        plans,
        seed: rotq_model::plan::DEFAULT_SEED,
        query: opts.query,
        ..Default::default()
    };
    eprintln!(
        "attention per layer: {} layers, the last {} of the first chunk's {} positions as queries",
        layers.len(),
        opts.ctx / 4,
        chunk.len()
    );
    let report = crate::eval_grid::evaluate_grid_with(&layers, &grid, |_, _| {})?;
    crate::io::write_atomic(csv, crate::eval::grid_csv(&report.rows).as_bytes())?;
    eprintln!(
        "wrote {} ({})",
        csv.display(),
        report.check.map_or_else(String::new, |c| c.line())
    );
    Ok(())
}

/// Checks what `rotq eval --model` will write before any work: no output is one of the
/// inputs (the same file by any path), each output file's folder exists, and the heatmaps'
/// folder is not a file.
///
/// ```
/// use std::path::Path;
/// let dir = tempfile::tempdir().unwrap();
/// let model = dir.path().join("m.gguf");
/// std::fs::write(&model, b"x").unwrap();
/// let text = dir.path().join("t.txt");
/// std::fs::write(&text, b"x").unwrap();
/// let check = |csv: &Path| rotq_cli::eval_model::check_outputs(&model, &text, &[csv], None);
/// assert!(check(&dir.path().join("grid.csv")).is_ok());
/// assert!(check(&dir.path().join(".").join("m.gguf")).is_err());
/// assert!(check(&dir.path().join("no/such/grid.csv")).is_err());
/// ```
pub fn check_outputs(
    model: &Path,
    text: &Path,
    files: &[&Path],
    heatmaps: Option<&Path>,
) -> Result<(), Error> {
    for &out in files {
        for input in [model, text] {
            if crate::io::same_file(out, input) {
                return Err(Error::Input(format!(
                    "{} is the same file as {}: refusing to overwrite an input",
                    out.display(),
                    input.display()
                )));
            }
        }
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
        if parent.is_some_and(|p| !p.is_dir()) {
            return Err(Error::Input(format!(
                "{}: its folder does not exist",
                out.display()
            )));
        }
    }
    if let Some(dir) = heatmaps {
        if dir.exists() && !dir.is_dir() {
            return Err(Error::Input(format!(
                "--heatmaps {}: not a folder",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Checks `--layers-csv`'s plans before any work: the activation grid knows `none`,
/// `hadamard`, `randomized` and `hadamard+v:32`.
pub fn check_layer_plans(opts: &GridOptions) -> Result<(), Error> {
    if opts.plans.iter().any(|p| activation_plan(p).is_some()) {
        Ok(())
    } else {
        Err(Error::Input(
            "--layers-csv needs one of the plans none, hadamard, randomized, hadamard+v:32".into(),
        ))
    }
}

/// `--against`: every configuration run on `reference`'s backend and on `opts.backend`
/// (`loaded`'s), the second scored against the first ([`grid::agreement`]); prints a table
/// (or JSON lines) with a progress bar on stderr.
pub fn run_against(
    reference: (&Loaded, &rotq::cache::Backend),
    loaded: &Loaded,
    opts: &GridOptions,
    json: bool,
) -> Result<(), Error> {
    let (first, first_backend) = reference;
    eprintln!(
        "{} tokens; caches on {} (products on {}) against caches on {} (products on {}); {} configurations + the f16 and f32 caches",
        loaded.tokens.len(),
        opts.backend.name(),
        loaded.model.products_device(),
        first_backend.name(),
        first.model.products_device(),
        grid::configurations(opts).len()
    );
    let bar = indicatif::ProgressBar::new(0);
    let rows = grid::agreement(
        (&first.model, first_backend),
        (&loaded.model, &opts.backend),
        &loaded.tokens,
        opts,
        |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    );
    bar.finish_and_clear();
    let rows = rows?;
    if !json {
        println!(
            "{:<8} {:<8} {:<16} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8}",
            "K", "V", "plan", "PPL ref", "PPL", "KLD mean", "KLD p99", "KLD max", "top-1%"
        );
    }
    for r in rows {
        let s = &r.summary;
        if json {
            println!(
                "{}",
                serde_json::to_string(&r).map_err(|e| Error::Input(e.to_string()))?
            );
        } else {
            println!(
                "{:<8} {:<8} {:<16} {:>10.4} {:>10.4} {:>10.2e} {:>10.2e} {:>10.2e} {:>8.2}",
                r.k_format,
                r.v_format,
                r.plan,
                r.ppl_first,
                s.ppl,
                s.kld_mean,
                s.kld_p99,
                s.kld_max,
                100.0 * s.top1
            );
        }
    }
    Ok(())
}

/// `--shift`: for every configuration of the grid, a context shift on the model against a
/// recomputed cache (see [`rotq_model::shift`]): the text's first `ctx + ctx / 2` tokens run
/// through caches of `ctx` tokens in batches of `opts.batch`, the first `keep` tokens kept.
/// Prints one line per configuration; an error if the text is too short.
pub fn run_shift(
    loaded: &Loaded,
    text: &Path,
    opts: &GridOptions,
    keep: usize,
    json: bool,
) -> Result<(), Error> {
    use rotq_model::shift::{compare, ShiftOptions};
    let Some(need) = opts.ctx.checked_add(opts.ctx / 2) else {
        return Err(Error::Input(format!("--ctx {} is too large", opts.ctx)));
    };
    if loaded.tokens.len() < need {
        return Err(Error::Input(format!(
            "{}: the text has {} tokens; --shift needs {need} (one and a half contexts)",
            text.display(),
            loaded.tokens.len()
        )));
    }
    let shift = ShiftOptions {
        ctx: opts.ctx,
        keep,
        batch: opts.batch,
        rope: None,
    };
    shift
        .check()
        .map_err(|e| Error::Input(format!("--shift (--keep, --batch, --ctx): {e}")))?;
    let configs = grid::configurations(opts);
    // Every plan is built before anything is printed.
    let specs = grid::cache_specs(opts, loaded.model.config.head_dim)?;
    eprintln!(
        "context shift: {need} tokens through caches of {} (keep {keep}, batches of {}); {} configurations",
        opts.ctx,
        opts.batch,
        configs.len()
    );
    if !json {
        println!(
            "{:<8} {:<8} {:<16} {:>7} {:>12} {:>14} {:>8} {:>10}",
            "K", "V", "plan", "scored", "PPL shifted", "PPL recomputed", "diff%", "KLD mean"
        );
    }
    for ((k, v, plan), spec) in configs.into_iter().zip(&specs) {
        let r = compare(&loaded.model, &loaded.tokens[..need], spec, &shift)?;
        if json {
            let mut value = serde_json::to_value(&r).map_err(|e| Error::Input(e.to_string()))?;
            value["k_format"] = k.info().name.into();
            value["v_format"] = v.info().name.into();
            value["plan"] = plan.to_string().into();
            println!("{value}");
        } else {
            println!(
                "{:<8} {:<8} {:<16} {:>7} {:>12.4} {:>14.4} {:>+8.3} {:>10.2e}",
                k.info().name,
                v.info().name,
                plan.to_string(),
                r.scored,
                r.ppl_shifted,
                r.ppl_recomputed,
                100.0 * (r.ppl_shifted / r.ppl_recomputed - 1.0),
                r.kld_mean
            );
        }
    }
    Ok(())
}
