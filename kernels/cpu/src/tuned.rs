//! Configurations from the tuning cache that `autotune --device cpu` writes.
//!
//! A kernel made without an explicit `with_config` looks up its (kernel, shape bucket) in the
//! cache (see `rotq_reference::tuned` for where it lives) and uses what it finds if that is in
//! force: tuned for the kernel's current sources ([`source_hash`]) and one of its candidates;
//! else its default. The cache is read once per process, without side effects: a file for
//! another machine is ignored.

use crate::isa::Isa;
use rotq_reference::tuned::{
    bucket, default_path, DeviceIdentity, Ignored, Loaded, TuneFile, TunedEntry,
};
use std::path::PathBuf;
use std::sync::OnceLock;

/// Hash of the sources of `kernel`'s family, as tuning cache entries record it: `fwht_*` the
/// rotation's module, `rotate_quantize_*` quantization's, `decode_attention_*` attention's,
/// each with the instruction-set dispatch; a name of no family, every source of the crate.
/// Editing one family makes its entries stale and leaves the others' in force. (A module a
/// family calls, such as the rotation inside rotate-quantize, changes its speed but not what
/// its configuration means, and is left out of its hash.)
///
/// ```
/// use rotq_cpu::tuned::source_hash;
/// assert_eq!(source_hash("rotate_quantize_q4_0"), source_hash("rotate_quantize_q8_0"));
/// assert_ne!(source_hash("fwht_f32"), source_hash("decode_attention_q4_0"));
/// ```
pub fn source_hash(kernel: &str) -> String {
    let family = [
        ("fwht_", env!("ROTQ_CPU_HASH_FWHT")),
        ("rotate_quantize_", env!("ROTQ_CPU_HASH_QUANT")),
        ("decode_attention_", env!("ROTQ_CPU_HASH_ATTENTION")),
    ];
    family
        .iter()
        .find(|(prefix, _)| kernel.starts_with(prefix))
        .map_or(env!("ROTQ_CPU_KERNEL_HASH"), |(_, hash)| hash)
        .to_string()
}

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
            Some(p) => TuneFile::peek(p, &device_identity()),
            None => Loaded::Missing,
        };
        CacheState { path, loaded }
    })
}

/// `entry`'s configuration if it is in force for `kernel`, whose configurations are
/// `candidates`: tuned for its current sources, and one of them (a hand-edited value outside
/// the search space is not trusted); else why not.
fn in_force<C: serde::de::DeserializeOwned + PartialEq>(
    entry: &TunedEntry,
    kernel: &str,
    candidates: &[C],
) -> Result<C, Ignored> {
    entry.in_force(&source_hash(kernel), |c| candidates.contains(c))
}

/// The tuned configuration of `kernel` at `bucket`, if the cache has one in force.
pub(crate) fn lookup<C: serde::de::DeserializeOwned + PartialEq>(
    kernel: &str,
    bucket: &str,
    candidates: &[C],
) -> Option<C> {
    match &cache().loaded {
        Loaded::Usable(f) => in_force(f.entry(kernel, bucket)?, kernel, candidates).ok(),
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
