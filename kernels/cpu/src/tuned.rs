//! Configurations from the tuning cache that `autotune --device cpu` writes.
//!
//! A kernel made without an explicit `with_config` looks up its (kernel, shape bucket) in the
//! cache (see `rotq_reference::tuned` for where it lives) and uses what it finds, else its
//! default. The cache is read once per process, without side effects: a file for another
//! machine or another build of these kernels ([`KERNEL_HASH`]) is ignored.

use crate::isa::Isa;
use rotq_reference::tuned::{bucket, default_path, DeviceIdentity, Loaded, TuneFile};
use std::path::PathBuf;
use std::sync::OnceLock;

/// Hash of this crate's sources; tuning caches record it.
pub const KERNEL_HASH: &str = env!("ROTQ_CPU_KERNEL_HASH");

/// This machine as tuning caches name it: CPU model and instruction set. (Not the thread
/// count: a run with fewer threads would otherwise make the cache foreign; tuned configs
/// only change speed, never results.)
///
/// ```
/// assert!(rotq_cpu::tuned::device_identity().name.starts_with("cpu: "));
/// ```
pub fn device_identity() -> DeviceIdentity {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    DeviceIdentity {
        name: format!("cpu: {model} ({})", Isa::best()),
        compute_capability: None,
        driver_version: None,
    }
}

/// The cache as this process sees it: where it is, and what was found there.
#[non_exhaustive]
#[derive(Debug)]
pub struct CacheState {
    /// The file looked at (`None`: no path could be formed).
    pub path: Option<PathBuf>,
    /// What was found.
    pub loaded: Loaded,
}

/// The cache, read on first use.
pub fn cache() -> &'static CacheState {
    static STATE: OnceLock<CacheState> = OnceLock::new();
    STATE.get_or_init(|| {
        let path = default_path();
        let loaded = match &path {
            Some(p) => TuneFile::peek(p, &device_identity(), KERNEL_HASH),
            None => Loaded::Missing,
        };
        CacheState { path, loaded }
    })
}

/// The tuned configuration of `kernel` at `bucket`, if the cache has one and it is one of
/// the kernel's `candidates` (a hand-edited value outside the search space is not trusted).
pub(crate) fn lookup<C: serde::de::DeserializeOwned + PartialEq>(
    kernel: &str,
    bucket: &str,
    candidates: &[C],
) -> Option<C> {
    match &cache().loaded {
        Loaded::Usable(f) => f.config(kernel, bucket).filter(|c| candidates.contains(c)),
        _ => None,
    }
}

/// The bucket of the f32 rotation of rows of `n`.
pub fn fwht_bucket(n: usize) -> String {
    bucket(&[("n", n)])
}

/// The bucket of decode attention: head dim, KV heads, query heads per KV head, cached tokens.
pub fn decode_bucket(d: usize, h_kv: usize, group: usize, n_kv: usize) -> String {
    bucket(&[("d", d), ("h_kv", h_kv), ("group", group), ("n_kv", n_kv)])
}

/// The bucket of rotate-quantize: the row length.
pub fn quantize_bucket(dim: usize) -> String {
    bucket(&[("dim", dim)])
}
