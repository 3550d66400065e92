//! Hashes this crate's sources into `ROTQ_CPU_KERNEL_HASH`: a tuning cache written for
//! another build of the kernels is stale and must not be trusted.

use std::path::{Path, PathBuf};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut all = Vec::new();
    let d = root.join("src");
    println!("cargo:rerun-if-changed={}", d.display());
    files(&d, &mut all);
    all.sort();
    // FNV-1a, 64 bits: stable across compilers, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in &all {
        let name = p
            .strip_prefix(root)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned();
        for b in name.bytes().chain(std::fs::read(p).unwrap_or_default()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    println!("cargo:rustc-env=ROTQ_CPU_KERNEL_HASH={h:016x}");
}
