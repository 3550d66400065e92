//! Configurations from the tuning cache that `autotune --device cpu` writes.
//!
//! A kernel made without an explicit `with_config` looks up its (kernel, shape bucket) in the
//! cache (see `rotq_reference::tuned` for where it lives) and uses what it finds if that is in
//! force: tuned for the kernel's current sources ([`source_hash`]) and one of its candidates;
//! else its default. The cache is read once per process, without side effects: a file for
//! another machine is ignored.

use crate::isa::Isa;
use rotq_reference::tuned::{
    bucket, default_path, split_key, DeviceIdentity, Ignored, Loaded, TuneFile, TunedEntry,
};
use rotq_reference::KvFormat;
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

/// Whether the cache's entry `key` (`kernel/bucket`) is in force: what the kernel does with
/// it when it looks its configuration up, through the same test ([`TunedEntry::in_force`]
/// against its search space); else why not. For reports such as `rotq info`. (The row
/// rotation's space depends on the row length: the bucket's is taken, which is exact for the
/// powers of two the bucket is named for.)
///
/// ```
/// use rotq_reference::tuned::{Ignored, TunedEntry};
/// let entry = TunedEntry {
///     config: serde_json::json!({ "rows_per_task": 7 }),
///     source_hash: rotq_cpu::tuned::source_hash("rotate_quantize_q4_0"),
///     default_ms: 1.0, tuned_ms: 0.9, tried: 7, rejected: 0,
/// };
/// let status = rotq_cpu::tuned::entry_status("rotate_quantize_q4_0/dim=128", &entry);
/// assert_eq!(status, Err(Ignored::OutsideSpace));
/// ```
pub fn entry_status(key: &str, entry: &TunedEntry) -> Result<(), Ignored> {
    use crate::{AttentionConfig, FwhtConfig, QuantizeConfig};
    let (kernel, bucket) = split_key(key).ok_or(Ignored::UnknownKey)?;
    let format_of = |prefix: &str| {
        kernel
            .strip_prefix(prefix)
            .is_some_and(|f| f.parse::<KvFormat>().is_ok())
    };
    if kernel == "fwht_f32" {
        let n = bucket
            .strip_prefix("n=")
            .and_then(|n| n.parse().ok())
            .ok_or(Ignored::UnknownKey)?;
        in_force(entry, kernel, &FwhtConfig::search_space(n)).map(drop)
    } else if format_of("rotate_quantize_") {
        in_force(entry, kernel, &QuantizeConfig::search_space()).map(drop)
    } else if format_of("decode_attention_") {
        in_force(entry, kernel, &AttentionConfig::search_space()).map(drop)
    } else {
        Err(Ignored::UnknownKey)
    }
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

/// The tuning-cache name of decode attention over a K cache in `format` with queries in
/// `mode` (resolved: [`crate::QueryMode::Auto`] is named as what it became). The two modes run
/// different inner loops, so each has its own entries.
///
/// ```
/// use rotq_cpu::{tuned::decode_kernel, QueryMode};
/// use rotq_reference::KvFormat;
/// assert_eq!(decode_kernel(KvFormat::Q4_0, QueryMode::Exact), "decode_attention_q4_0");
/// assert_eq!(decode_kernel(KvFormat::Q4_0, QueryMode::Q8_0), "decode_attention_q4_0_q8_0_query");
/// ```
pub fn decode_kernel(format: KvFormat, mode: crate::QueryMode) -> String {
    match mode {
        crate::QueryMode::Q8_0 => format!("decode_attention_{format}_q8_0_query"),
        _ => format!("decode_attention_{format}"),
    }
}

/// The bucket of decode attention: head dim, KV heads, query heads per KV head, cached tokens.
pub fn decode_bucket(d: usize, h_kv: usize, group: usize, n_kv: usize) -> String {
    bucket(&[("d", d), ("h_kv", h_kv), ("group", group), ("n_kv", n_kv)])
}

/// The bucket of rotate-quantize: the row length.
pub fn quantize_bucket(dim: usize) -> String {
    bucket(&[("dim", dim)])
}
