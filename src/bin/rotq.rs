//! The `rotq` command line: quantize, dequantize and rotate raw little-endian f32 files,
//! measure format quality, and list the formats.

#![forbid(unsafe_code)]

use clap::{Args, Parser, Subcommand};
use rotq::activations::read_activations;
use rotq::bench::{self, BenchOptions, BenchRecord};
use rotq::bench_cuda::{self, CudaBenchOptions};
use rotq::eval::{
    default_formats, evaluate, evaluate_grid, grid_csv, render_grid, render_table, PlanKind,
    Synthetic,
};
use rotq::{files, Error, KvFormat, RotationSpec};
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

#[derive(Subcommand)]
enum Command {
    /// Quantize a raw f32 file (rows of --row-len values) into a format's blocks, laid out as
    /// ggml lays them out in memory.
    Quantize(FormatFiles),
    /// Dequantize a file of format blocks back to raw little-endian f32.
    Dequantize(FormatFiles),
    /// Rotate every row of --dim values of a raw f32 file.
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
        /// Raw little-endian f32 input.
        #[arg(long)]
        input: PathBuf,
        /// Raw f32 output (written atomically).
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
        /// A safetensors file of per-layer Q, K, V (see `--names`): evaluate every K format x V
        /// format x rotation plan on them.
        #[arg(long, conflicts_with = "synthetic")]
        activations: Option<PathBuf>,
        /// Tensor names in the activations file: `{layer}` becomes 0, 1, …, `{t}` q, k or v.
        #[arg(long, default_value = "layers.{layer}.{t}")]
        names: String,
        /// Also write the grid (per layer and overall) as CSV to this file.
        #[arg(long)]
        csv: Option<PathBuf>,
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
    },
    /// List the KV-cache formats of the registry.
    Info,
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
    /// Input file (raw little-endian f32 for quantize, format blocks for dequantize).
    #[arg(long)]
    input: PathBuf,
    /// Output file (written atomically).
    #[arg(long)]
    output: PathBuf,
}

fn run(command: Command) -> Result<(), Error> {
    match command {
        Command::Quantize(a) => {
            let format: KvFormat = a.format.parse()?;
            let rows = files::quantize(format, a.row_len, &a.input, &a.output)?;
            eprintln!(
                "quantized {rows} rows of {} to {format}: {}",
                a.row_len,
                a.output.display()
            );
        }
        Command::Dequantize(a) => {
            let format: KvFormat = a.format.parse()?;
            let rows = files::dequantize(format, a.row_len, &a.input, &a.output)?;
            eprintln!(
                "dequantized {rows} rows of {} from {format}: {}",
                a.row_len,
                a.output.display()
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
            let rows = files::rotate(spec, dim, inverse, &input, &output)?;
            let dir = if inverse { "inverse " } else { "" };
            eprintln!(
                "applied {dir}{spec} to {rows} rows of {dim}: {}",
                output.display()
            );
        }
        Command::Eval {
            synthetic,
            seed,
            tokens,
            json,
            activations,
            names,
            csv,
        } => {
            if let Some(path) = activations {
                let layers = read_activations(&path, &names)?;
                let formats = default_formats();
                let total = formats.len() * formats.len() * PlanKind::ALL.len();
                eprintln!(
                    "{}: {} layers; {total} combinations of K format x V format x plan",
                    path.display(),
                    layers.len()
                );
                // A progress bar on stderr (hidden when stderr is not a terminal).
                let bar = indicatif::ProgressBar::new(total as u64);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:30} {pos}/{len} combinations {elapsed} (eta {eta})",
                    )
                    .expect("a valid template"),
                );
                let rows = evaluate_grid(
                    &layers,
                    &formats,
                    &formats,
                    &PlanKind::ALL,
                    seed,
                    |done, _| bar.set_position(done as u64),
                )?;
                bar.finish_and_clear();
                if let Some(csv) = csv {
                    rotq::io::write_atomic(&csv, grid_csv(&rows).as_bytes())?;
                }
                if json {
                    for r in &rows {
                        println!("{}", serde_json::to_string(r).expect("rows serialize"));
                    }
                } else {
                    print!("{}", render_grid(&rows));
                }
                return Ok(());
            }
            if !synthetic {
                return Err(Error::Input(
                    "give --synthetic or --activations FILE".into(),
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
        } => {
            let records = if device.starts_with("cuda") {
                cuda_bench(&device, quick)?
            } else if device == "cpu" {
                cpu_bench(quick)?
            } else {
                return Err(Error::Input(format!(
                    "device `{device}`: expected `cpu` or `cuda:N`"
                )));
            };
            print_records(&records, json);
        }
        Command::Info => {
            println!(
                "{:<9} {:>5} {:>6} {:>5}  origin",
                "format", "block", "bytes", "bits"
            );
            for f in KvFormat::ALL {
                let i = f.info();
                println!(
                    "{:<9} {:>5} {:>6} {:>5.2}  {}",
                    i.name,
                    i.block_size,
                    i.block_bytes,
                    f.bits_per_value(),
                    i.origin
                );
            }
            print_tuning();
        }
    }
    Ok(())
}

/// The CPU benchmarks, with a line on what is measured.
fn cpu_bench(quick: bool) -> Result<Vec<BenchRecord>, Error> {
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
    bench::run_all(&opts, |what| eprintln!("  timing {what} ..."))
}

/// The GPU benchmarks on `device` (`cuda:N`), with a line on what is measured.
fn cuda_bench(device: &str, quick: bool) -> Result<Vec<BenchRecord>, Error> {
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
    bench_cuda::run_all(device, &opts, |what| eprintln!("  {what} ..."))
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
    print_cache(state.path.as_deref(), &state.loaded);
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
            print_cache(t.path.as_deref(), &t.loaded);
        }
    }
}

/// What a tuning cache holds for this device.
fn print_cache(path: Option<&std::path::Path>, loaded: &rotq::reference::tuned::Loaded) {
    use rotq::reference::tuned::Loaded;
    let path = path.map_or("(no path: set ROTQ_TUNE_CACHE or HOME)".to_string(), |p| {
        p.display().to_string()
    });
    match loaded {
        Loaded::Usable(f) => {
            println!("tuned, from {path}:");
            for (key, e) in &f.entries {
                println!(
                    "  {key:<56} {}  ({:.3} ms -> {:.3} ms)",
                    e.config, e.default_ms, e.tuned_ms
                );
            }
            println!("  anything else: the kernel's default");
        }
        Loaded::Missing => println!("defaults: no tuning cache at {path} (run `autotune`)"),
        Loaded::OtherDevices { devices } => println!(
            "defaults: {path} has entries for {} only (run `autotune` on this device)",
            devices.join(", ")
        ),
        Loaded::Stale { reason } | Loaded::Foreign { reason } => {
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
            println!(
                "{:<26} {:>8.2} GB/s  vs {:<36} {:>8.2} GB/s  x{:<6.2} ceiling {:>7.2} GB/s ({:>3.0}%)  [{}]",
                r.kernel,
                r.ours_gbps,
                r.peer,
                r.peer_gbps,
                r.ratio,
                r.ceiling_gbps,
                100.0 * r.ours_gbps / r.ceiling_gbps,
                r.shape
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
