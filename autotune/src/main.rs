//! `autotune`: tunes the kernels for this machine and writes the tuning cache.

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use rotq_autotune::timing::{EventClock, WallClock};
use rotq_autotune::{cache, cpu, cuda, tune, Clock, Outcome, TimingPlan, Tunable};
use rotq_cpu::QueryMode;
use rotq_reference::tuned::{default_path, Loaded, Millis, TuneFile, TunedEntry};
use rotq_reference::KvFormat;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Search each kernel's configuration for this device, keep only candidates that agree with
/// the oracle, time them, and write the tuning cache the kernels read.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// `cuda:N` or `cpu` (default: cuda:0 when a GPU is present, else cpu).
    #[arg(long)]
    device: Option<String>,
    /// Kernels to tune, comma-separated: fwht, quantize, decode, prefill (prefill: GPUs only).
    #[arg(
        long,
        default_value = "fwht,quantize,decode,prefill",
        value_delimiter = ','
    )]
    kernels: Vec<String>,
    /// Shapes: a preset (`default`: what the benches use; `small`: a quick run) or a JSON file
    /// like {"fwht": [128], "quantize": [{"format": "q4_0", "dim": 128}],
    /// "decode": [{"format": "q4_0", "n_kv": 4096, "h_kv": 8, "batch": 16}],
    /// "prefill": [{"format": "q8_0", "n": 4096, "h_kv": 8}]} (`batch`, the sequences of a
    /// decode call, is for GPUs; the CPU tunes one sequence; prefill, a causal prompt of `n`
    /// tokens, is tuned on GPUs only, the CPU skips it).
    #[arg(long, default_value = "default")]
    shapes: String,
    /// Time budget for the whole run, in seconds, shared by the (kernel, shape) tasks.
    #[arg(long, default_value_t = 120)]
    budget_secs: u64,
    /// The cache file (default: ROTQ_TUNE_CACHE, else $XDG_CACHE_HOME/rotq/tuned.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print one JSON object per (kernel, bucket) instead of a table.
    #[arg(long)]
    json: bool,
}

/// A rotate-quantize shape.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuantShape {
    format: String,
    dim: usize,
}

/// A decode shape (head dim 128, four query heads per KV head).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecodeShape {
    format: String,
    n_kv: usize,
    h_kv: usize,
    /// Sequences per call (GPU only).
    #[serde(default = "one")]
    batch: usize,
    /// The queries' arithmetic: `exact` (the default) or `q8_0` (CPU only; see
    /// `rotq_cpu::QueryMode`). The two modes run different loops and are tuned apart.
    #[serde(default = "exact")]
    query: String,
}

fn exact() -> String {
    "exact".into()
}

fn one() -> usize {
    1
}

/// A prefill shape (GPU only): one causal prompt of `n` tokens, all of them query rows, head
/// dim 128, four query heads per KV head.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrefillShape {
    format: String,
    n: usize,
    h_kv: usize,
}

/// The shapes to tune, per kernel.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Shapes {
    #[serde(default)]
    fwht: Vec<usize>,
    #[serde(default)]
    quantize: Vec<QuantShape>,
    #[serde(default)]
    decode: Vec<DecodeShape>,
    /// Prefill shapes (tuned on GPUs only).
    #[serde(default)]
    prefill: Vec<PrefillShape>,
    /// Bytes of rows per buffer for the FWHT and rotate-quantize timings.
    #[serde(default = "default_bytes")]
    bytes: usize,
}

fn default_bytes() -> usize {
    64 << 20
}

impl Shapes {
    fn preset(name: &str, gpu: bool) -> Result<Self, String> {
        let q = |format: &str, dim| QuantShape {
            format: format.into(),
            dim,
        };
        let d = |format: &str, n_kv, batch| DecodeShape {
            format: format.into(),
            n_kv,
            h_kv: 8,
            batch,
            query: exact(),
        };
        // The same with q8_0 queries (the CPU's integer loop).
        let dq = |format: &str, n_kv| DecodeShape {
            query: "q8_0".into(),
            ..d(format, n_kv, 1)
        };
        let p = |format: &str, n| PrefillShape {
            format: format.into(),
            n,
            h_kv: 8,
        };
        match name {
            // A GPU: decode of one short sequence and of a batch of long ones, prefill of a
            // 4096-token prompt. The CPU has no prefill kernel to tune (no prefill shapes).
            "default" if gpu => Ok(Self {
                fwht: vec![128, 4096],
                quantize: vec![q("q4_0", 128), q("q8_0", 128)],
                decode: vec![
                    d("q4_0", 4096, 1),
                    d("q4_0", 32768, 16),
                    d("q8_0", 4096, 1),
                    d("q8_0", 32768, 16),
                ],
                prefill: vec![p("q8_0", 4096), p("q4_0", 4096)],
                bytes: 64 << 20,
            }),
            "small" if gpu => Ok(Self {
                fwht: vec![128],
                quantize: vec![q("q4_0", 128)],
                decode: vec![d("q4_0", 2048, 4)],
                prefill: vec![p("q8_0", 1024)],
                bytes: 16 << 20,
            }),
            "default" => Ok(Self {
                fwht: vec![128, 4096],
                quantize: vec![q("q4_0", 128), q("q8_0", 128)],
                decode: vec![
                    d("q4_0", 4096, 1),
                    d("q4_0", 32768, 1),
                    d("q8_0", 4096, 1),
                    d("q8_0", 32768, 1),
                    dq("q4_0", 4096),
                    dq("q4_0", 32768),
                    dq("q8_0", 4096),
                    dq("q8_0", 32768),
                ],
                prefill: Vec::new(),
                bytes: 64 << 20,
            }),
            "small" => Ok(Self {
                fwht: vec![128],
                quantize: vec![q("q4_0", 128)],
                decode: vec![d("q4_0", 2048, 1), d("q8_0", 2048, 1), dq("q4_0", 2048)],
                prefill: Vec::new(),
                bytes: 4 << 20,
            }),
            file => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    format!(
                        "--shapes {file}: not a preset (default, small) nor a readable file: {e}"
                    )
                })?;
                serde_json::from_str(&text).map_err(|e| format!("--shapes {file}: {e}"))
            }
        }
    }
}

fn format_of(name: &str) -> Result<KvFormat, String> {
    name.parse::<KvFormat>().map_err(|e| e.to_string())
}

/// One line of the final report.
#[derive(Serialize)]
struct Row {
    kernel: String,
    bucket: String,
    default_ms: f64,
    default_spread: f64,
    tuned_ms: f64,
    tuned_spread: f64,
    speedup: f64,
    config: serde_json::Value,
    tried: usize,
    rejected: usize,
    untried: usize,
}

impl<C: Serialize> From<&Outcome<C>> for Row {
    fn from(o: &Outcome<C>) -> Self {
        Row {
            kernel: o.kernel.clone(),
            bucket: o.bucket.clone(),
            default_ms: o.default.median_ms,
            default_spread: o.default.spread,
            tuned_ms: o.chosen_timing.median_ms,
            tuned_spread: o.chosen_timing.spread,
            speedup: o.speedup(),
            config: serde_json::to_value(&o.chosen).unwrap_or_default(),
            tried: o.tried,
            rejected: o.rejected.len(),
            untried: o.untried,
        }
    }
}

/// Tunes one task and records it, with the hash of its kernel's sources (`source_hash`);
/// returns its report row.
fn run_one<T: Tunable, C: Clock>(
    t: &mut T,
    clock: &mut C,
    budget: Duration,
    plan: TimingPlan,
    bar: &ProgressBar,
    file: &mut TuneFile,
    source_hash: fn(&str) -> String,
) -> Result<Row, String> {
    let label = format!("{} {}", t.kernel(), t.bucket());
    bar.set_message(label.clone());
    let o = tune(t, clock, budget, plan, |m| {
        bar.set_message(format!("{label}: {m}"))
    })?;
    for r in &o.rejected {
        bar.println(format!(
            "{label}: gate rejected {:?}: {}",
            r.config, r.reason
        ));
    }
    let row = Row::from(&o);
    let entry = TunedEntry {
        config: row.config.clone(),
        source_hash: source_hash(&o.kernel),
        default_ms: o.default.median_ms,
        tuned_ms: o.chosen_timing.median_ms,
        tried: o.tried,
        rejected: o.rejected.len(),
    };
    file.insert(&o.kernel, &o.bucket, entry);
    Ok(row)
}

/// Checks every shape before any tuning starts, so that a bad one costs no work.
fn validate(shapes: &Shapes, wants: &dyn Fn(&str) -> bool, gpu: bool) -> Result<(), String> {
    let err = |e: rotq_reference::Error| e.to_string();
    if wants("fwht") {
        for &n in &shapes.fwht {
            rotq_reference::Rotation::hadamard(n).map_err(err)?;
        }
    }
    if wants("quantize") {
        for q in &shapes.quantize {
            format_of(&q.format)?.row_bytes(q.dim).map_err(err)?;
            rotq_reference::Rotation::hadamard(q.dim).map_err(err)?;
        }
    }
    if wants("decode") {
        for d in &shapes.decode {
            let row = format_of(&d.format)?.row_bytes(128).map_err(err)?;
            let fits = d
                .n_kv
                .checked_mul(d.h_kv)
                .and_then(|r| r.checked_mul(d.batch))
                .and_then(|r| r.checked_mul(row))
                .is_some_and(|b| b <= 1 << 34);
            if d.n_kv == 0 || d.h_kv == 0 || d.batch == 0 || !fits {
                return Err(format!(
                    "decode shape {d:?}: need n_kv, h_kv and batch >= 1 and a cache under 16 GiB"
                ));
            }
            if d.batch != 1 && !gpu {
                return Err(format!(
                    "decode shape {d:?}: the CPU tunes one sequence (batch 1)"
                ));
            }
            let mode: QueryMode = d.query.parse().map_err(err)?;
            if gpu && mode != QueryMode::Exact {
                return Err(format!(
                    "decode shape {d:?}: the GPU kernels take f32 queries (query \"exact\")"
                ));
            }
        }
    }
    // (The CPU skips prefill shapes: see `run`.)
    if wants("prefill") && gpu {
        for p in &shapes.prefill {
            let format = format_of(&p.format)?;
            format.row_bytes(cuda::D).map_err(err)?;
            if !(rotq_cuda::TENSOR_CORE_K_FORMATS.contains(&format)
                && rotq_cuda::TENSOR_CORE_V_FORMATS.contains(&format))
            {
                let names: Vec<String> = rotq_cuda::TENSOR_CORE_V_FORMATS
                    .iter()
                    .filter(|f| rotq_cuda::TENSOR_CORE_K_FORMATS.contains(f))
                    .map(|f| f.to_string())
                    .collect();
                return Err(format!(
                    "prefill shape {p:?}: the flash prefill kernel reads {} (other formats \
                     run the decode kernel: tune them as decode)",
                    names.join(", ")
                ));
            }
            // Each query buffer (two, and the output) under 4 GiB; the flash kernel's token
            // offsets are 32-bit.
            let fits =
                p.n.checked_mul(p.h_kv)
                    .and_then(|r| r.checked_mul(cuda::GROUP * cuda::D * 2))
                    .is_some_and(|b| b <= 1 << 32);
            if p.n == 0 || p.h_kv == 0 || !fits || p.n > (i32::MAX / 2) as usize {
                return Err(format!(
                    "prefill shape {p:?}: need n and h_kv >= 1 and queries under 4 GiB"
                ));
            }
        }
    }
    if shapes.bytes == 0 || shapes.bytes > 1 << 34 {
        return Err(format!("bytes {}: between 1 and 16 GiB", shapes.bytes));
    }
    Ok(())
}

/// Saves this run's entries not saved yet and forgets them: the cache merges them entry by
/// entry under its lock, so entries another run saved meanwhile are kept (and this run never
/// writes back entries it did not tune).
fn save(new: &mut TuneFile, path: &std::path::Path, bar: &ProgressBar) -> Result<(), String> {
    let waiting = || {
        let note = format!("waiting for another run's save to {}", path.display());
        bar.suspend(|| eprintln!("{note}"));
    };
    cache::save_with(new, path, waiting)
        .map_err(|e| format!("cannot write the tuning cache {}: {e}", path.display()))?;
    new.entries.clear();
    Ok(())
}

/// A decode task's share of the budget, in units of the others': its search spaces are the
/// largest (140 configurations on CUDA, about 20 kernels to compile on a first run; 90 on the
/// CPU), against 24 for the row kernels. (A space larger than the share allows is sampled at
/// random, and the untried candidates are reported: `--budget-secs` buys more of them.)
const DECODE_WEIGHT: usize = 4;
/// A prefill task's share: its space is only 8 configurations, but each is a flash kernel to
/// compile (on a first run, a second or so each) and its calls take milliseconds (a
/// 4096-token prompt), so that one unit could leave candidates untried.
const PREFILL_WEIGHT: usize = 2;

fn run(args: Args) -> Result<(), String> {
    let device_name = args.device.clone().unwrap_or_else(|| {
        if rotq_cuda::cuda_available() {
            "cuda:0".into()
        } else {
            "cpu".into()
        }
    });
    let gpu = device_name != "cpu";
    let cuda_dev = if gpu {
        Some(
            rotq_cuda::Device::open(&device_name)
                .map_err(|e| format!("device `{device_name}`: {e} (use `cpu` or `cuda:N`)"))?,
        )
    } else {
        None
    };
    let small = args.shapes == "small";
    let shapes = Shapes::preset(&args.shapes, gpu)?;
    for k in &args.kernels {
        if !["fwht", "quantize", "decode", "prefill"].contains(&k.as_str()) {
            return Err(format!(
                "unknown kernel `{k}`: fwht, quantize, decode or prefill"
            ));
        }
    }
    let wants = |k: &str| args.kernels.iter().any(|x| x == k);
    // The CPU has no prefill kernel of its own to tune (no `prefill_attention_*` entries):
    // prefill shapes from a file are skipped there, with a note.
    let prefill_shapes = if gpu { shapes.prefill.len() } else { 0 };
    if !gpu && wants("prefill") && !shapes.prefill.is_empty() {
        eprintln!(
            "skipping {} prefill shape(s): prefill is tuned on GPUs only",
            shapes.prefill.len()
        );
    }
    let path = args
        .out
        .clone()
        .or_else(default_path)
        .ok_or("no cache path: pass --out, or set ROTQ_TUNE_CACHE or HOME")?;
    let (device, source_hash): (_, fn(&str) -> String) = match &cuda_dev {
        Some(d) => (
            rotq_cuda::tuned::device_identity(d.info()),
            rotq_cuda::tuned::source_hash,
        ),
        None => (
            rotq_cpu::tuned::device_identity(),
            rotq_cpu::tuned::source_hash,
        ),
    };
    // A foreign file is kept: moved aside once the run is known to have work to do. (A corrupt
    // one is moved aside now.)
    let mut replace = false;
    match cache::load(&path, &device) {
        Loaded::Usable(_) | Loaded::Missing => {}
        Loaded::OtherDevices { devices } => {
            eprintln!(
                "adding {} to {} (which holds {})",
                device.name,
                path.display(),
                devices.join(", ")
            );
        }
        Loaded::Unreadable { reason } => {
            return Err(format!(
                "cannot read the cache ({reason}); not writing over it"
            ))
        }
        Loaded::Foreign { reason } => {
            eprintln!(
                "ignoring {} ({reason}); it will be kept beside the new one",
                path.display()
            );
            replace = true;
        }
        Loaded::Corrupt { reason, kept_at } => {
            eprintln!(
                "ignoring a corrupt cache ({reason}){}",
                kept_at.map_or(String::new(), |p| format!("; kept as {}", p.display()))
            );
        }
    }
    // This run's entries not saved yet.
    let mut file = TuneFile::new(device.clone());
    validate(&shapes, &wants, gpu)?;
    // Tasks, and their weights in the budget.
    let counts = [
        ("fwht", shapes.fwht.len(), 1),
        ("quantize", shapes.quantize.len(), 1),
        ("decode", shapes.decode.len(), DECODE_WEIGHT),
        ("prefill", prefill_shapes, PREFILL_WEIGHT),
    ];
    let chosen = counts.iter().filter(|(k, _, _)| wants(k));
    let tasks = chosen.clone().map(|(_, n, _)| n).sum::<usize>();
    let weights = chosen.map(|(_, n, w)| n * w).sum::<usize>();
    if tasks == 0 {
        if !gpu && wants("prefill") {
            return Err(
                "nothing to tune: no shapes for the kernels asked for (prefill is tuned on GPUs \
                 only)"
                    .into(),
            );
        }
        return Err("nothing to tune: no shapes for the kernels asked for".into());
    }
    // Under the save lock, if it is still there and still foreign: another run may have
    // replaced it first, and then its cache is merged into, not moved.
    if replace {
        let aside = cache::replace_foreign(&path, || {})
            .map_err(|e| format!("cannot keep the earlier cache: {e}"))?;
        if let Some(aside) = aside {
            eprintln!("kept the earlier cache as {}", aside.display());
        }
    }
    // Before any tuning: a cache that cannot be written costs no work.
    cache::check_writable(&path)
        .map_err(|e| format!("cannot write the tuning cache {}: {e}", path.display()))?;
    let budget = Duration::from_secs(args.budget_secs);
    let started = std::time::Instant::now();
    // What a task of weight `w` may spend: its part of the budget left, shared by the tasks
    // left in proportion to their weights (unused time carries over).
    let mut done = 0usize;
    let share = |done: usize, w: usize| {
        budget.saturating_sub(started.elapsed()) * w as u32 / (weights - done).max(1) as u32
    };
    let per_task = share(0, 1);
    let plan = if gpu {
        TimingPlan::gpu()
    } else if small {
        TimingPlan {
            samples: 5,
            min_sample: Duration::from_millis(5),
            ..TimingPlan::default()
        }
    } else {
        TimingPlan::default()
    };
    // (The weights of the kinds of task this run has.)
    let mut heavier = Vec::new();
    if !shapes.decode.is_empty() && wants("decode") {
        heavier.push(format!("{DECODE_WEIGHT}x that for decode"));
    }
    if prefill_shapes > 0 && wants("prefill") {
        heavier.push(format!("{PREFILL_WEIGHT}x for prefill"));
    }
    eprintln!(
        "tuning {} on {} ({tasks} tasks, about {:.0} s each{})",
        args.kernels.join(", "),
        device.name,
        per_task.as_secs_f64(),
        if heavier.is_empty() {
            String::new()
        } else {
            format!(", {}", heavier.join(", "))
        }
    );
    let bar = ProgressBar::new(tasks as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} {wide_msg}")
            .map_err(|e| e.to_string())?,
    );
    let mut rows = Vec::new();
    let err = |e: rotq_reference::Error| e.to_string();
    // Tunes one task, records it and saves the cache.
    // The CPU's kernels are timed by the wall clock, a GPU's by CUDA events on its stream.
    let mut wall = WallClock::new();
    let mut events = cuda_dev
        .as_ref()
        .map(|d| EventClock::new(d.stream().clone()));
    macro_rules! task {
        ($t:expr, $w:expr, $clock:expr) => {{
            let mut t = $t;
            let budget = share(done, $w);
            rows.push(run_one(
                &mut t,
                $clock,
                budget,
                plan,
                &bar,
                &mut file,
                source_hash,
            )?);
            done += $w;
            save(&mut file, &path, &bar)?;
            bar.inc(1);
        }};
    }
    // (A GPU task is only made where `cuda_dev`, and so its clock, is.)
    macro_rules! gpu_clock {
        () => {
            events.as_mut().ok_or("no GPU clock")?
        };
    }
    // Decode first: the kernel with the most to gain gets the budget while it is whole.
    if wants("decode") {
        for d in &shapes.decode {
            let f = format_of(&d.format)?;
            // (Checked by `validate`: only "exact" on a GPU.)
            let mode: QueryMode = d.query.parse().map_err(err)?;
            match &cuda_dev {
                Some(dev) => task!(
                    cuda::Decode::new(dev, f, d.n_kv, d.h_kv, d.batch)?,
                    DECODE_WEIGHT,
                    gpu_clock!()
                ),
                None => task!(
                    cpu::Decode::new(f, d.n_kv, d.h_kv, mode).map_err(err)?,
                    DECODE_WEIGHT,
                    &mut wall
                ),
            }
        }
    }
    if wants("fwht") {
        for &n in &shapes.fwht {
            match &cuda_dev {
                Some(dev) => task!(cuda::Fwht::new(dev, n, shapes.bytes)?, 1, gpu_clock!()),
                None => task!(cpu::Fwht::new(n, shapes.bytes).map_err(err)?, 1, &mut wall),
            }
        }
    }
    if wants("quantize") {
        for q in &shapes.quantize {
            let f = format_of(&q.format)?;
            match &cuda_dev {
                Some(dev) => task!(
                    cuda::Quantize::new(dev, f, q.dim, shapes.bytes)?,
                    1,
                    gpu_clock!()
                ),
                None => task!(
                    cpu::Quantize::new(f, q.dim, shapes.bytes).map_err(err)?,
                    1,
                    &mut wall
                ),
            }
        }
    }
    // Prefill last: its few candidates take what the faster tasks left of their shares.
    if let (true, Some(dev)) = (wants("prefill"), &cuda_dev) {
        for p in &shapes.prefill {
            let f = format_of(&p.format)?;
            task!(
                cuda::Prefill::new(dev, f, p.n, p.h_kv)?,
                PREFILL_WEIGHT,
                gpu_clock!()
            );
        }
    }
    bar.finish_and_clear();
    if args.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r).map_err(|e| e.to_string())?);
        }
    } else {
        println!(
            "{:<22} {:<32} {:>15} {:>15} {:>8} {:>6} {:>8} {:>8}  config",
            "kernel", "bucket", "default", "tuned", "speedup", "tried", "rejected", "untried"
        );
        for r in &rows {
            println!(
                "{:<22} {:<32} {:>8}ms±{:>2.0}% {:>8}ms±{:>2.0}% {:>7.2}x {:>6} {:>8} {:>8}  {}",
                r.kernel,
                r.bucket,
                Millis(r.default_ms),
                50.0 * r.default_spread,
                Millis(r.tuned_ms),
                50.0 * r.tuned_spread,
                r.speedup,
                r.tried,
                r.rejected,
                r.untried,
                r.config
            );
        }
        let geo =
            (rows.iter().map(|r| r.speedup.ln()).sum::<f64>() / rows.len().max(1) as f64).exp();
        println!(
            "geometric-mean speed-up x{geo:.3}; cache written to {}",
            path.display()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("autotune: {e}");
            ExitCode::FAILURE
        }
    }
}
