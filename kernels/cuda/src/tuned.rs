//! Configurations from the tuning cache that `autotune --device cuda:N` writes.
//!
//! A [`Device`](crate::Device) reads the cache once, when it is opened (without side
//! effects: a file for another device or driver is ignored). A kernel made without an
//! explicit `with_config` looks up its (kernel, shape bucket) there and uses what it finds if
//! that is in force: tuned for the kernel's current sources ([`source_hash`]) and one of its
//! candidates; else its default.

use crate::device::DeviceInfo;
use rotq_reference::tuned::{bucket, split_key, DeviceIdentity, Ignored, TunedEntry};
use rotq_reference::KvFormat;

/// Every source that decides what a configuration means: the CUDA C and the Rust that lays
/// kernels over threads. An entry tuned for other sources is stale.
const SOURCES: [&str; 10] = [
    include_str!("cuda/attention.cu"),
    include_str!("cuda/elem.cuh"),
    include_str!("cuda/formats.cuh"),
    include_str!("cuda/hadamard.cu"),
    include_str!("attention.rs"),
    include_str!("codec.rs"),
    include_str!("device.rs"),
    include_str!("kernel.rs"),
    include_str!("rotation.rs"),
    include_str!("tuned.rs"),
];

/// FNV-1a, 64 bits, over the sources (stable across compilers, unlike std's hasher).
const fn hash_sources() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut f = 0;
    while f < SOURCES.len() {
        let bytes = SOURCES[f].as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            h = (h ^ bytes[i] as u64).wrapping_mul(0x0100_0000_01b3);
            i += 1;
        }
        f += 1;
    }
    h
}

const HASH: u64 = hash_sources();

/// Hash of the sources of `kernel`, as tuning cache entries record it: for now every kernel's
/// is the hash of all the sources above, so that editing any kernel makes every entry stale.
///
/// ```
/// assert_eq!(rotq_cuda::tuned::source_hash("fwht_f16").len(), 16);
/// ```
pub fn source_hash(kernel: &str) -> String {
    let _ = kernel;
    format!("{HASH:016x}")
}

/// `entry`'s configuration if it is in force for `kernel`, whose configurations are
/// `candidates`: tuned for its current sources, and one of them (a hand-edited value outside
/// the search space is not trusted); else why not.
pub(crate) fn in_force<C: serde::de::DeserializeOwned + PartialEq>(
    entry: &TunedEntry,
    kernel: &str,
    candidates: &[C],
) -> Result<C, Ignored> {
    entry.in_force(&source_hash(kernel), |c| candidates.contains(c))
}

/// Whether a GPU's cache entry `key` (`kernel/bucket`) is in force: what the kernel does with
/// it when it looks its configuration up, through the same test ([`TunedEntry::in_force`]
/// against its search space); else why not. For reports such as `rotq info`.
///
/// ```
/// use rotq_reference::tuned::{Ignored, TunedEntry};
/// let entry = TunedEntry {
///     config: Default::default(), // JSON null: not a configuration
///     source_hash: rotq_cuda::tuned::source_hash("fwht_f16"),
///     default_ms: 1.0, tuned_ms: 0.9, tried: 7, rejected: 0,
/// };
/// let status = rotq_cuda::tuned::entry_status("fwht_f16/n=128", &entry);
/// assert!(matches!(status, Err(Ignored::Unparsable { .. })));
/// ```
pub fn entry_status(key: &str, entry: &TunedEntry) -> Result<(), Ignored> {
    use crate::{DecodeConfig, PrefillConfig, RowConfig};
    let (kernel, _bucket) = split_key(key).ok_or(Ignored::UnknownKey)?;
    let format_of = |prefix: &str| {
        kernel
            .strip_prefix(prefix)
            .is_some_and(|f| f.parse::<KvFormat>().is_ok())
    };
    if ["fwht_f32", "fwht_f16", "fwht_bf16"].contains(&kernel) || format_of("rotate_quantize_") {
        in_force(entry, kernel, &RowConfig::search_space()).map(drop)
    } else if format_of("decode_attention_") {
        in_force(entry, kernel, &DecodeConfig::search_space()).map(drop)
    } else if format_of("prefill_attention_") {
        in_force(entry, kernel, &PrefillConfig::search_space()).map(drop)
    } else {
        Err(Ignored::UnknownKey)
    }
}

/// A GPU as tuning caches name it: its name, compute capability and driver.
///
/// ```no_run
/// let dev = rotq_cuda::Device::open("cuda:0")?;
/// let id = rotq_cuda::tuned::device_identity(dev.info());
/// assert_eq!(id.compute_capability, Some(dev.info().compute_capability));
/// # Ok::<(), rotq_cuda::CudaError>(())
/// ```
pub fn device_identity(info: &DeviceInfo) -> DeviceIdentity {
    DeviceIdentity {
        name: info.name.clone(),
        compute_capability: Some(info.compute_capability),
        driver_version: Some(info.driver_version),
    }
}

/// The bucket of a rotation of rows of `n`.
pub fn fwht_bucket(n: usize) -> String {
    bucket(&[("n", n)])
}

/// The bucket of rotate-quantize: the row length.
pub fn quantize_bucket(dim: usize) -> String {
    bucket(&[("dim", dim)])
}

/// The bucket of decode attention: head dim, KV heads, query heads per KV head, the longest
/// visible range and the number of sequences (which decide how the work fills the device).
pub fn decode_bucket(d: usize, h_kv: usize, group: usize, n_kv: usize, batch: usize) -> String {
    bucket(&[
        ("d", d),
        ("h_kv", h_kv),
        ("group", group),
        ("n_kv", n_kv),
        ("batch", batch),
    ])
}

/// The bucket of prefill attention: head dim, KV heads, query heads per KV head, the query
/// rows and the cached tokens of the call.
pub fn prefill_bucket(d: usize, h_kv: usize, group: usize, n_q: usize, n_kv: usize) -> String {
    bucket(&[
        ("d", d),
        ("h_kv", h_kv),
        ("group", group),
        ("n_q", n_q),
        ("n_kv", n_kv),
    ])
}

/// The cache's kernel name of a rotation of `T` rows (`fwht_f16`, …).
pub fn fwht_kernel(elem: u32) -> String {
    let t = match elem {
        0 => "f32",
        1 => "f16",
        _ => "bf16",
    };
    format!("fwht_{t}")
}
