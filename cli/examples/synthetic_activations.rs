//! Writes a synthetic activation dump for `rotq eval --activations`: three layers of Q, K and V
//! with LLM-like outlier channels in K (`rotq_cli::eval::Synthetic`, seeds 1, 2, 3), 512 cached
//! tokens, the last 32 as queries, 4 KV heads of 128 with 4 query heads each, stored in f16
//! under `layers.{layer}.{t}`. Deterministic: the same file on every machine.
//!
//! ```text
//! cargo run --release --example synthetic_activations -- target/synthetic.safetensors
//! cargo run --release --example synthetic_activations -- target/synthetic-npy --npy
//! ```

use rotq_cli::activations::{write_npy_folder, write_safetensors, DumpDtype};
use rotq_cli::eval::Synthetic;
use rotq_cli::npy::NpyDtype;
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out) = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map(PathBuf::from)
    else {
        eprintln!("usage: synthetic_activations OUT.safetensors | OUT_DIR --npy");
        return ExitCode::from(2);
    };
    let layers: Vec<_> = (1..=3)
        .map(|seed| {
            Synthetic {
                n_kv: 512,
                n_q: 32,
                seed,
                ..Default::default()
            }
            .generate()
        })
        .collect();
    let template = "layers.{layer}.{t}";
    let written = if args.iter().any(|a| a == "--npy") {
        write_npy_folder(&out, &layers, template, NpyDtype::F16)
    } else {
        write_safetensors(&out, &layers, template, DumpDtype::F16)
    };
    match written {
        Ok(()) => {
            eprintln!("wrote {} layers to {}", layers.len(), out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
