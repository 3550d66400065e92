//! Hashes this crate's sources for the tuning cache: an entry tuned for other sources of its
//! kernel is stale and must not be trusted. One hash per kernel family, over its module's
//! files and the instruction-set dispatch they all use (`ROTQ_CPU_HASH_FWHT`, `_QUANT`,
//! `_ATTENTION`), so that editing one family leaves the others' entries in force; and one
//! over every source (`ROTQ_CPU_KERNEL_HASH`), for names of no family.

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

/// FNV-1a, 64 bits, over the names (relative to `root`) and contents of `paths`, sorted:
/// stable across compilers, unlike std's hasher.
fn hash(root: &Path, mut paths: Vec<PathBuf>) -> String {
    paths.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in &paths {
        let name = p
            .strip_prefix(root)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned();
        for b in name.bytes().chain(std::fs::read(p).unwrap_or_default()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    println!("cargo:rerun-if-changed={}", src.display());
    let mut all = Vec::new();
    files(&src, &mut all);
    println!("cargo:rustc-env=ROTQ_CPU_KERNEL_HASH={}", hash(root, all));
    for (family, dir) in [
        ("FWHT", "fwht"),
        ("QUANT", "quant"),
        ("ATTENTION", "attention"),
    ] {
        let mut family_files = vec![src.join("isa.rs")];
        files(&src.join(dir), &mut family_files);
        println!(
            "cargo:rustc-env=ROTQ_CPU_HASH_{family}={}",
            hash(root, family_files)
        );
    }
}
