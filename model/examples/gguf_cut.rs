//! Writes a GGUF model cut to its first layers (the real weights, a smaller file):
//!
//! ```text
//! cargo run --release -p rotq-model --example gguf_cut -- IN.gguf OUT.gguf LAYERS
//! ```
//!
//! SmolLM2-135M's 98 MB become about 41 MB with 4 of its 30 blocks (the 30 MB embedding stays
//! whole), small enough to carry to a GPU machine for `rotq eval --model OUT.gguf --device
//! cuda:0 --against cpu`. OUT is written through a new temporary file beside it, then renamed.

use rotq_model::gguf::Gguf;
use std::io::{BufWriter, Write};
use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output, layers] = &args[..] else {
        eprintln!("usage: gguf_cut IN.gguf OUT.gguf LAYERS");
        std::process::exit(2);
    };
    if let Err(e) = cut(Path::new(input), Path::new(output), layers) {
        eprintln!("gguf_cut: {e}");
        std::process::exit(1);
    }
}

fn cut(input: &Path, output: &Path, layers: &str) -> Result<(), Box<dyn std::error::Error>> {
    let layers: usize = layers
        .parse()
        .map_err(|e| format!("LAYERS {layers:?}: {e}"))?;
    let g = Gguf::open(input)?;
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    let mut out = BufWriter::new(tmp.as_file());
    let bytes = g.write_first_layers(layers, &mut out)?;
    out.flush()?;
    drop(out);
    tmp.as_file().sync_all()?;
    // A model file others may read, as one written with `cp` would be.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(output)?;
    eprintln!(
        "{}: {layers} of {} blocks, {} of {} tensors, {bytes} bytes",
        output.display(),
        g.u64(&format!("{}.block_count", g.str("general.architecture")?))?,
        Gguf::open(output)?.tensors().len(),
        g.tensors().len()
    );
    Ok(())
}
