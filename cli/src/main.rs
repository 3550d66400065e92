//! The `rotq` command line: quantize, dequantize and rotate raw little-endian f32 files,
//! measure format quality, and list the formats.

#![forbid(unsafe_code)]

use clap::{Args, Parser, Subcommand, ValueEnum};
use rotq::{KvFormat, RotationSpec};
use rotq_cli::activations::Dump;
use rotq_cli::bench::{self, BenchOptions, BenchRecord, Section};
use rotq_cli::bench_cuda::{self, CudaBenchOptions};
use rotq_cli::eval::{
    check_memory, default_formats, evaluate, grid_csv, render_grid, render_table, PlanKind,
    Synthetic,
};
use rotq_cli::eval_backend::{Backend, Runner};
use rotq_cli::eval_grid::{evaluate_grid_on, memory_needed, GridOptions};
use rotq_cli::{eval_model, files, Error};
use rotq_reference::tuned::{Ignored, Loaded, Millis, TunedEntry};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "rotq",
    version,
    about = "Rotated quantized KV caches: formats, rotations, quality"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size of the largest variant (eval's options) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Quantize a raw f32 file (rows of --row-len values) into a format's blocks, laid out as
    /// ggml lays them out in memory.
    ///
    /// Streams 4 MiB of input at a time: about 12 MiB of memory for a file of any size.
    Quantize(FormatFiles),
    /// Dequantize a file of format blocks back to raw little-endian f32.
    ///
    /// Streams 4 MiB at a time: about 12 MiB of memory for a file of any size.
    Dequantize(FormatFiles),
    /// Rotate every row of --dim values of a raw f32 file.
    ///
    /// Streams 4 MiB of rows at a time: about 16 MiB of memory for a file of any size (16
    /// bytes per value of one row for rows over 4 MiB).
    Rotate {
        /// hadamard, randomized:SEED or block:B.
        #[arg(long)]
        rotation: String,
        /// Row length (the head dimension).
        #[arg(long)]
        dim: usize,
        /// Apply the inverse rotation.
        #[arg(long)]
        inverse: bool,
        /// Raw little-endian f32 input; - for standard input.
        #[arg(long)]
        input: PathBuf,
        /// Raw f32 output: a file (written atomically, never the input), - for standard
        /// output, or a character device or FIFO (written directly).
        #[arg(long)]
        output: PathBuf,
    },
    /// Attention error and KL divergence of every format, with and without rotation.
    Eval {
        /// Use synthetic activations with LLM-like outlier channels in K.
        #[arg(long)]
        synthetic: bool,
        /// Generator seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Cached tokens.
        #[arg(long, default_value_t = 1024)]
        tokens: usize,
        /// Print one JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// A safetensors file, or a folder of `.npy` files, of per-layer Q, K, V (see
        /// `--names`; docs/eval.md): evaluate every K format x V format x rotation plan on them.
        #[arg(long, conflicts_with = "synthetic")]
        activations: Option<PathBuf>,
        /// A llama GGUF model (e.g. SmolLM2-135M): score every K format x V format x plan end
        /// to end on --text by perplexity, token KL divergence and top-1 agreement against an
        /// f16 cache (docs/eval.md).
        #[arg(long, conflicts_with_all = ["synthetic", "activations"], requires = "text")]
        model: Option<PathBuf>,
        /// The UTF-8 text --model reads (cut into chunks of --ctx tokens).
        #[arg(long, requires = "model")]
        text: Option<PathBuf>,
        /// Tokens per chunk with --model (each chunk in a fresh context; its second half scored).
        #[arg(long, default_value_t = 512, requires = "model")]
        ctx: usize,
        /// Chunks scored with --model (default: 2; 0 for every whole chunk of the text).
        #[arg(long, default_value_t = 2, requires = "model")]
        chunks: usize,
        /// Tokens per prefill call with --model.
        #[arg(long, default_value_t = 128, requires = "model")]
        batch: usize,
        /// Configurations run at once with --model (each with its own caches). With
        /// --device cuda:N, where the model's matrix products also run on the GPU, 8 keep it
        /// busy while each run's host work goes on.
        #[arg(long, default_value_t = 1, requires = "model")]
        jobs: usize,
        /// With --model, also score attention per layer on the first chunk (the last quarter
        /// of its positions as queries, against exact attention) and write it as CSV here.
        #[arg(long, requires = "model")]
        layers_csv: Option<PathBuf>,
        /// With --model, instead of the grid: a context shift (llama.cpp's policy) on each
        /// configuration's caches against a recomputed cache, over the text's first 1.5
        /// contexts.
        #[arg(long, requires = "model", conflicts_with_all = ["csv", "heatmaps", "layers_csv"])]
        shift: bool,
        /// Tokens a --shift keeps at the start of the context.
        #[arg(long, default_value_t = 4, requires = "shift")]
        keep: usize,
        /// With --model, instead of scoring against the f16 cache: run every configuration
        /// (and the f16 and f32 caches) on this device too and score the --device run against
        /// it, token by token (KL divergence, top-1 agreement, perplexity gap); `--device
        /// cuda:0 --against cpu` checks the GPU's kernels and products against the CPU's.
        #[arg(long, requires = "model", conflicts_with_all = ["shift", "csv", "heatmaps", "layers_csv"])]
        against: Option<String>,
        /// Tensor names in the activations (a folder holds NAME.npy): `{layer}` becomes 0, 1, …,
        /// `{t}` q, k or v.
        #[arg(long, default_value = "layers.{layer}.{t}")]
        names: String,
        /// Also write the grid (per layer and overall) as CSV to this file.
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Write heatmap PNGs into this folder: K format x V format, per plan, of the mean KLD
        /// ratio to f16/f16 without rotation (kld-PLAN.png) and of the output error
        /// (rel_l2-PLAN.png); with --model, of the mean token KLD (token_kld-PLAN.png).
        #[arg(long)]
        heatmaps: Option<PathBuf>,
        /// Where the rotate-quantize and attention kernels run: cpu (default), cuda:N, or
        /// oracle (the spec itself, no kernel; not with --model).
        #[arg(long)]
        device: Option<String>,
        /// Query rows per layer and combination whose kernel output is checked against the
        /// oracle on the same cache bytes (0: no check).
        #[arg(long, default_value_t = 2, requires = "activations")]
        check_rows: usize,
        /// The arithmetic of K·Q: `exact` (f32 queries), `q8_0` (rotated queries through q8_0
        /// blocks: integer dot products over q4_0/q8_0 K) or `auto` (the engine API's default:
        /// q8_0 over rotated q4_0/q8_0 K, else exact). Not with --device cuda:N.
        #[arg(long, default_value = "exact")]
        query: rotq_cpu::QueryMode,
        /// K cache formats, comma-separated (default: every format but f32 and vLLM's slot parts;
        /// with --model q8_0,q5_0,q4_0,iq4_nl).
        #[arg(long, value_delimiter = ',')]
        k_formats: Vec<String>,
        /// V cache formats, comma-separated (default: every format but f32 and vLLM's slot parts;
        /// with --model f16,q8_0,q4_0).
        #[arg(long, value_delimiter = ',')]
        v_formats: Vec<String>,
        /// Rotation plans, comma-separated: none, hadamard, randomized, hadamard+v (default:
        /// all). With --model: none, hadamard, randomized[:SEED], block:B, each optionally
        /// +v:B (V in Hadamard blocks of B), or v:B (default: none, hadamard, randomized,
        /// block:32, hadamard+v:32, hadamard+v:64).
        #[arg(long, value_delimiter = ',')]
        plans: Vec<String>,
    },
    /// Time the kernels side by side with their peers and the copy-bandwidth ceiling.
    Bench {
        /// `cpu`, or `cuda:N` (a GPU; runs PyTorch's dense `x @ H` as the peer when python3 has torch).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Print one JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Smaller buffers and fewer runs (a quick look, not a measurement).
        #[arg(long)]
        quick: bool,
        /// Only this group of benchmarks (the copy ceiling is always measured).
        #[arg(long, value_enum)]
        only: Option<Section>,
    },
    /// List the KV-cache formats of the registry and the kernel configurations in force.
    Info,
    /// Print the Q/K rotation of each attention layer of a compressed-tensors checkpoint (its
    /// `quantization_config.transform_config`, matched against the module names of its
    /// safetensors files as compressed-tensors matches them; docs/integration.md).
    Checkpoint {
        /// The model folder: config.json and the .safetensors files.
        model_dir: PathBuf,
        /// Also build `hadamard` at 12, 20, 28 and 40 times a power of two (rotq's sizes;
        /// compressed-tensors builds powers of two only).
        #[arg(long)]
        extended_hadamard: bool,
        /// One JSON object per layer instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Input at least this large gets a progress bar (when stderr is a terminal).
const PROGRESS_MIN_BYTES: u64 = 64 << 20;

/// Runs a file command with a progress bar on stderr, drawn only when stderr is a terminal and
/// the input is large (at least [`PROGRESS_MIN_BYTES`], or of unknown size: a pipe), and
/// cleared at the end: never mixed into piped or redirected output.
fn with_progress<T>(
    run: impl FnOnce(&mut dyn FnMut(files::Progress)) -> Result<T, Error>,
) -> Result<T, Error> {
    use std::io::IsTerminal;
    let show = std::io::stderr().is_terminal();
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut update = |p: files::Progress| {
        if !show {
            return;
        }
        if bar.is_none() && p.total.is_none_or(|t| t >= PROGRESS_MIN_BYTES) {
            let (new, template) = match p.total {
                Some(t) => (
                    indicatif::ProgressBar::new(t),
                    "{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} (eta {eta})",
                ),
                None => (
                    indicatif::ProgressBar::new_spinner(),
                    "{spinner} {bytes} {binary_bytes_per_sec}",
                ),
            };
            if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
                new.set_style(style);
            }
            bar = Some(new);
        }
        if let Some(b) = &bar {
            b.set_position(p.done);
        }
    };
    let result = run(&mut update);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    result
}

/// A file argument as messages show it (`-` is standard output).
fn shown(path: &std::path::Path) -> String {
    if path.as_os_str() == rotq_cli::io::STDIO {
        "standard output".into()
    } else {
        path.display().to_string()
    }
}

/// The arguments shared by `quantize` and `dequantize`.
#[derive(Args)]
struct FormatFiles {
    /// Format name (see `rotq info`).
    #[arg(long)]
    format: String,
    /// Values per row; a multiple of the format's block size.
    #[arg(long)]
    row_len: usize,
    /// Input file (raw little-endian f32 for quantize, format blocks for dequantize); - for
    /// standard input.
    #[arg(long)]
    input: PathBuf,
    /// Output: a file (written atomically, never the input), - for standard output, or a
    /// character device or FIFO (written directly).
    #[arg(long)]
    output: PathBuf,
}

fn run(command: Command) -> Result<(), Error> {
    match command {
        Command::Quantize(a) => {
            let format: KvFormat = a.format.parse()?;
            let rows =
                with_progress(|p| files::quantize(format, a.row_len, &a.input, &a.output, p))?;
            eprintln!(
                "quantized {rows} rows of {} to {format}: {}",
                a.row_len,
                shown(&a.output)
            );
        }
        Command::Dequantize(a) => {
            let format: KvFormat = a.format.parse()?;
            let rows =
                with_progress(|p| files::dequantize(format, a.row_len, &a.input, &a.output, p))?;
            eprintln!(
                "dequantized {rows} rows of {} from {format}: {}",
                a.row_len,
                shown(&a.output)
            );
        }
        Command::Rotate {
            rotation,
            dim,
            inverse,
            input,
            output,
        } => {
            let spec: RotationSpec = rotation.parse()?;
            let rows = with_progress(|p| files::rotate(spec, dim, inverse, &input, &output, p))?;
            let dir = if inverse { "inverse " } else { "" };
            eprintln!(
                "applied {dir}{spec} to {rows} rows of {dim}: {}",
                shown(&output)
            );
        }
        Command::Eval {
            synthetic,
            seed,
            tokens,
            json,
            activations,
            model,
            text,
            ctx,
            chunks,
            batch,
            jobs,
            layers_csv,
            shift,
            keep,
            against,
            names,
            csv,
            heatmaps,
            device,
            check_rows,
            query,
            k_formats,
            v_formats,
            plans,
        } => {
            if model.is_none() && text.is_some() {
                return Err(Error::Input("--text goes with --model".into()));
            }
            if let (Some(model), Some(text)) = (model, text) {
                if device.as_deref() == Some("oracle") {
                    return Err(Error::Input(
                        "--device oracle goes with --activations; --model runs on cpu or cuda:N"
                            .into(),
                    ));
                }
                let (k_default, v_default) = eval_model::default_model_formats();
                let opts = rotq_model::grid::GridOptions {
                    ctx,
                    chunks: (chunks > 0).then_some(chunks),
                    batch,
                    k_formats: parse_once(&k_formats, k_default)?,
                    v_formats: parse_once(&v_formats, v_default)?,
                    plans: parse_once(&plans, rotq_model::plan::Plan::defaults())?,
                    // Open the device first: a missing GPU fails before the model is read.
                    backend: rotq::cache::Backend::open(device.as_deref().unwrap_or("cpu"))?,
                    jobs,
                    query,
                };
                if query != rotq_cpu::QueryMode::Exact && opts.backend.name() != "cpu" {
                    return Err(Error::Input(format!(
                        "--query {query} runs on the CPU; the CUDA kernels take f32 queries"
                    )));
                }
                // What would be written is checked before any work.
                let outputs: Vec<&std::path::Path> =
                    csv.iter().chain(&layers_csv).map(|p| p.as_path()).collect();
                eval_model::check_outputs(&model, &text, &outputs, heatmaps.as_deref())?;
                if layers_csv.is_some() {
                    eval_model::check_layer_plans(&opts)?;
                }
                if jobs == 0 {
                    return Err(Error::Input("--jobs must be positive".into()));
                }
                let against = against
                    .as_deref()
                    .map(rotq::cache::Backend::open)
                    .transpose()?;
                let loaded = eval_model::load(&model, &text, &opts.plans, &opts.backend)?;
                if let Some(reference) = against {
                    let first = eval_model::load(&model, &text, &opts.plans, &reference)?;
                    return eval_model::run_against((&first, &reference), &loaded, &opts, json);
                }
                if shift {
                    return eval_model::run_shift(&loaded, &text, &opts, keep, json);
                }
                let report = eval_model::run(&loaded, &text, &opts, json, csv.as_ref())?;
                if let Some(path) = &layers_csv {
                    eval_model::layer_grid(&loaded.model, &loaded.tokens, &opts, path)?;
                }
                if let Some(dir) = &heatmaps {
                    let name = |p: &std::path::Path| {
                        p.file_name().map_or_else(
                            || p.display().to_string(),
                            |n| n.to_string_lossy().into_owned(),
                        )
                    };
                    let source = format!(
                        "{} on {}; caches on {}",
                        name(&model),
                        name(&text),
                        opts.backend.name()
                    );
                    let files = rotq_cli::heatmap::model_heatmaps(&report, dir, &source)?;
                    eprintln!("wrote {} heatmaps into {}", files.len(), dir.display());
                }
                return Ok(());
            }
            if let Some(path) = activations {
                let parse_formats = |list: &[String]| -> Result<Vec<KvFormat>, Error> {
                    if list.is_empty() {
                        return Ok(default_formats());
                    }
                    list.iter()
                        .map(|f| f.trim().parse().map_err(Error::from))
                        .collect()
                };
                let opts = GridOptions {
                    k_formats: parse_formats(&k_formats)?,
                    v_formats: parse_formats(&v_formats)?,
                    plans: if plans.is_empty() {
                        PlanKind::ALL.to_vec()
                    } else {
                        plans
                            .iter()
                            .map(|p| p.trim().parse())
                            .collect::<Result<_, _>>()?
                    },
                    seed,
                    backend: device.as_deref().unwrap_or("cpu").parse()?,
                    check_rows,
                    query,
                };
                let eval = EvalRun {
                    path,
                    names,
                    opts,
                    json,
                    csv,
                    heatmaps,
                };
                return eval_activations(&eval);
            }
            if !synthetic {
                return Err(Error::Input(
                    "give --synthetic or --activations FILE".into(),
                ));
            }
            if heatmaps.is_some()
                || query != rotq_cpu::QueryMode::Exact
                || device.is_some()
                || !k_formats.is_empty()
                || !v_formats.is_empty()
                || !plans.is_empty()
            {
                return Err(Error::Input(
                    "--heatmaps, --query, --device, --k-formats, --v-formats and --plans go \
                     with --activations (the grid), not --synthetic"
                        .into(),
                ));
            }
            if tokens == 0 {
                return Err(Error::Input("--tokens must be positive".into()));
            }
            let config = Synthetic {
                n_kv: tokens,
                n_q: tokens.min(16),
                seed,
                ..Default::default()
            };
            // Refused before anything is allocated, with the memory it would take.
            config
                .check_memory()
                .map_err(|e| Error::Input(format!("--tokens {tokens}: {e}")))?;
            eprintln!(
                "synthetic activations: {} tokens, {} queries, {} KV heads x {} query heads per KV head, d = {}, {} outlier channels of offset ~{} in K (seed {seed})",
                config.n_kv, config.n_q, config.h_kv, config.group, config.d, config.outlier_channels, config.outlier_magnitude
            );
            let rows = evaluate(&config.generate(), &default_formats())?;
            if json {
                for r in &rows {
                    println!("{}", serde_json::to_string(r).expect("rows serialize"));
                }
            } else {
                print!("{}", render_table(&rows));
            }
        }
        Command::Bench {
            device,
            json,
            quick,
            only,
        } => {
            let records = if device.starts_with("cuda") {
                cuda_bench(&device, quick, only)?
            } else if device == "cpu" {
                if let Some(s) = only.filter(|s| !s.on_cpu()) {
                    let name = s.to_possible_value().map(|v| v.get_name().to_string());
                    return Err(Error::Input(format!(
                        "the CPU has no `{}` benchmark (it is a GPU one: --device cuda:N)",
                        name.unwrap_or_default()
                    )));
                }
                cpu_bench(quick, only)?
            } else {
                return Err(Error::Input(format!(
                    "device `{device}`: expected `cpu` or `cuda:N`"
                )));
            };
            print_records(&records, json);
        }
        Command::Checkpoint {
            model_dir,
            extended_hadamard,
            json,
        } => {
            let options = rotq::checkpoint::CheckpointOptions { extended_hadamard };
            let plans = rotq_cli::checkpoint::plans(&model_dir, &options)?;
            for p in &plans {
                if json {
                    println!("{}", serde_json::to_string(p).map_err(json_err)?);
                } else {
                    println!(
                        "layer {:>3}  {}",
                        p.layer,
                        p.qk.as_deref().unwrap_or("no rotation")
                    );
                }
            }
            if !json {
                let rotated = plans.iter().filter(|p| p.qk.is_some()).count();
                eprintln!("{rotated} of {} layers rotate Q and K", plans.len());
            }
        }
        Command::Info => {
            println!(
                "{:<9} {:>5} {:>7} {:>5}  origin",
                "format", "block", "bytes", "bits"
            );
            for f in KvFormat::ALL {
                let i = f.info();
                // A row format stores whole rows: its bytes (and bits) at rows of 128 values.
                let (block, bytes) = match i.row {
                    Some(_) => ("row".to_string(), format!("{}@128", f.row_bytes(128)?)),
                    None => (i.block_size.to_string(), i.block_bytes.to_string()),
                };
                println!(
                    "{:<9} {:>5} {:>7} {:>5.2}  {}",
                    i.name,
                    block,
                    bytes,
                    f.bits_per_value(),
                    i.origin
                );
            }
            println!(
                "default rotation: {}",
                if rotq::defaults::rotation_disabled() {
                    format!("none ({} is set)", rotq::defaults::DISABLE_ROTATION)
                } else {
                    format!(
                        "Hadamard on Q and K (set {}=1 to turn it off)",
                        rotq::defaults::DISABLE_ROTATION
                    )
                }
            );
            print_tuning();
        }
    }
    Ok(())
}

/// What `rotq eval --activations` was asked to do.
/// The values of a comma-separated option, each parsed once in the order given (a repeat, by
/// value: `v:32` and `none+v:32` are one plan, runs once); `default` when none were given.
fn parse_once<T>(list: &[String], default: Vec<T>) -> Result<Vec<T>, Error>
where
    T: std::str::FromStr + PartialEq,
    Error: From<T::Err>,
{
    if list.is_empty() {
        return Ok(default);
    }
    let mut values: Vec<T> = Vec::new();
    for item in list {
        let value = item.trim().parse()?;
        if !values.contains(&value) {
            values.push(value);
        }
    }
    Ok(values)
}

struct EvalRun {
    path: PathBuf,
    names: String,
    opts: GridOptions,
    json: bool,
    csv: Option<PathBuf>,
    heatmaps: Option<PathBuf>,
}

/// `rotq eval --activations`: the grid on the chosen kernels, checked by the oracle, as a
/// table (or JSON lines), CSV and heatmaps.
fn eval_activations(run: &EvalRun) -> Result<(), Error> {
    let opts = &run.opts;
    if run.heatmaps.is_some()
        && !(opts.k_formats.contains(&KvFormat::F16)
            && opts.v_formats.contains(&KvFormat::F16)
            && opts.plans.contains(&PlanKind::None))
    {
        return Err(Error::Input(
            "--heatmaps needs f16 among --k-formats and --v-formats and `none` among --plans \
             (f16/f16 without rotation is the heatmaps' baseline)"
                .into(),
        ));
    }
    // Open the device first: a missing GPU fails before large inputs are read.
    let runner = Runner::open(opts.backend)?;
    // The headers first: a dump too large for this machine is refused before it is read, with
    // the memory it would take.
    let dump = Dump::open(&run.path, &run.names)?;
    check_memory(memory_needed(dump.layers(), opts, dump.reading_bytes()))
        .map_err(|e| Error::Input(format!("{}: {e}", run.path.display())))?;
    let layers = dump.read()?;
    let combos = opts.k_formats.len() * opts.v_formats.len() * opts.plans.len();
    let shape = |a: &rotq_cli::eval::Activations| {
        format!(
            "Q {:?}, K {:?}, V {:?}",
            a.q.shape(),
            a.k.shape(),
            a.v.shape()
        )
    };
    let first = layers.first().map(shape).unwrap_or_default();
    eprintln!(
        "{}: {} layers (layer 0: {first}); {combos} combinations of K format x V format x plan \
         on {}, {} queries",
        run.path.display(),
        layers.len(),
        opts.backend,
        opts.query
    );
    // A progress bar on stderr (hidden when stderr is not a terminal).
    let bar = indicatif::ProgressBar::new((combos * layers.len()) as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} combination-layers {elapsed} (eta {eta})",
    ) {
        bar.set_style(style);
    }
    let report = evaluate_grid_on(&runner, &layers, opts, |done, _| {
        bar.set_position(done as u64)
    });
    bar.finish_and_clear();
    let report = report?;
    if let Some(csv) = &run.csv {
        rotq_cli::io::write_atomic(csv, grid_csv(&report.rows).as_bytes())?;
        eprintln!("wrote {}", csv.display());
    }
    if let Some(dir) = &run.heatmaps {
        let name = run.path.file_name().map_or_else(
            || run.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let source = format!(
            "{name}: {} layers, {first} in layer 0; kernels: {}",
            layers.len(),
            opts.backend
        );
        let files = rotq_cli::heatmap::grid_heatmaps(&report.rows, dir, &source)?;
        eprintln!("wrote {} heatmaps into {}", files.len(), dir.display());
    }
    let check = match &report.check {
        Some(c) => c.line(),
        None if opts.backend == Backend::Oracle => {
            "oracle check: not needed (--device oracle runs the oracle itself)".to_string()
        }
        None => "oracle check: skipped (--check-rows 0)".to_string(),
    };
    if run.json {
        for r in &report.rows {
            println!("{}", serde_json::to_string(r).map_err(json_err)?);
        }
        eprintln!("{check}");
    } else {
        print!("{}", render_grid(&report.rows));
        println!();
        println!("{check}");
    }
    Ok(())
}

fn json_err(e: serde_json::Error) -> Error {
    Error::Input(format!("JSON: {e}"))
}

/// The CPU benchmarks, with a line on what is measured.
fn cpu_bench(quick: bool, only: Option<Section>) -> Result<Vec<BenchRecord>, Error> {
    let opts = if quick {
        BenchOptions {
            bytes: 8 << 20,
            tokens: 4096,
            runs: 3,
        }
    } else {
        BenchOptions::default()
    };
    eprintln!(
        "cpu: {} threads, {} ; buffers of {} MiB, {} tokens; median of {} runs",
        rayon::current_num_threads(),
        rotq_cpu::Isa::best(),
        opts.bytes >> 20,
        opts.tokens,
        opts.runs
    );
    bench::run_all(&opts, only, |what| eprintln!("  timing {what} ..."))
}

/// The GPU benchmarks on `device` (`cuda:N`), with a line on what is measured.
fn cuda_bench(device: &str, quick: bool, only: Option<Section>) -> Result<Vec<BenchRecord>, Error> {
    let opts = if quick {
        CudaBenchOptions {
            bytes: 32 << 20,
            runs: 5,
        }
    } else {
        CudaBenchOptions::default()
    };
    eprintln!(
        "{device}: buffers of {} MiB; median of {} runs (CUDA events)",
        opts.bytes >> 20,
        opts.runs
    );
    bench_cuda::run_all(device, &opts, only, |what| eprintln!("  {what} ..."))
}

/// Which kernel configurations are in force, and where they come from: the CPU's, and each
/// GPU's.
fn print_tuning() {
    let state = rotq_cpu::tuned::cache();
    println!();
    println!(
        "CPU kernel configurations (device: {})",
        rotq_cpu::tuned::device_identity().name
    );
    print_cache(
        state.path.as_deref(),
        &state.loaded,
        rotq_cpu::tuned::entry_status,
    );
    if rotq_cuda::cuda_available() {
        for ordinal in 0.. {
            let Ok(dev) = rotq_cuda::Device::new(ordinal) else {
                break;
            };
            println!();
            println!(
                "CUDA kernel configurations (cuda:{ordinal}: {})",
                dev.info().name
            );
            let t = dev.tuning();
            print_cache(t.path.as_deref(), &t.loaded, rotq_cuda::tuned::entry_status);
        }
    }
}

/// Whether a tuning cache entry is in force (`rotq_cpu::tuned::entry_status`, or CUDA's).
type EntryStatus = fn(&str, &TunedEntry) -> Result<(), Ignored>;

/// What a tuning cache holds for this device, each entry in force or ignored (`status`: the
/// kernels' own test).
fn print_cache(path: Option<&std::path::Path>, loaded: &Loaded, status: EntryStatus) {
    let path = path.map_or("(no path: set ROTQ_TUNE_CACHE or HOME)".to_string(), |p| {
        p.display().to_string()
    });
    match loaded {
        Loaded::Usable(f) => {
            println!("tuned, from {path}:");
            for (key, e) in &f.entries {
                let (ms, to) = (Millis(e.default_ms), Millis(e.tuned_ms));
                match status(key, e) {
                    Ok(()) => println!("  {key:<56} {}  ({ms} ms -> {to} ms)", e.config),
                    Err(why) => println!("  {key:<56} {}  ignored: {why}", e.config),
                }
            }
            println!("  anything else: the kernel's default");
        }
        Loaded::Missing => println!("defaults: no tuning cache at {path} (run `autotune`)"),
        Loaded::OtherDevices { devices } => println!(
            "defaults: {path} has entries for {} only (run `autotune` on this device)",
            devices.join(", ")
        ),
        Loaded::Foreign { reason } => {
            println!("defaults: {path} is ignored ({reason})")
        }
        Loaded::Corrupt { reason, .. } | Loaded::Unreadable { reason } => {
            println!("defaults: {path} is ignored ({reason})")
        }
    }
}

/// One JSON object per line, or a table with the ratio and the share of the ceiling.
fn print_records(records: &[BenchRecord], json: bool) {
    for r in records {
        if json {
            println!("{}", serde_json::to_string(r).expect("records serialize"));
        } else {
            let ceiling = if r.ceiling_gbps.is_finite() {
                format!(
                    "ceiling {:>7.2} {} ({:>3.0}%)",
                    r.ceiling_gbps,
                    r.unit,
                    100.0 * r.ours_gbps / r.ceiling_gbps
                )
            } else {
                "ceiling: compute-bound".to_string()
            };
            println!(
                "{:<26} {:>8.2} {}  vs {:<36} {:>8.2} {}  x{:<6.2} {ceiling}  [{}]",
                r.kernel, r.ours_gbps, r.unit, r.peer, r.peer_gbps, r.unit, r.ratio, r.shape
            );
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            print!("{e}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: the message without clap's usage block, whitespace collapsed.
            let text = e.to_string();
            let message = text
                .split("\n\nUsage")
                .next()
                .and_then(|m| m.split("\n\nFor more information").next())
                .unwrap_or(&text);
            let line = message.split_whitespace().collect::<Vec<_>>().join(" ");
            eprintln!("{line} (see rotq --help)");
            return ExitCode::from(2);
        }
    };
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
