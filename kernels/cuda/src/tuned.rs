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

/// Every source that decides what a configuration means, by file: the CUDA C and the Rust that
/// builds the modules, lays kernels over threads and launches them. A tuning cache written for
/// another build of them is stale.
const SOURCES: [(&str, &str); 16] = [
    ("cuda/common.cuh", include_str!("cuda/common.cuh")),
    ("cuda/decode.cu", include_str!("cuda/decode.cu")),
    ("cuda/decode_mma.cu", include_str!("cuda/decode_mma.cu")),
    ("cuda/elem.cuh", include_str!("cuda/elem.cuh")),
    ("cuda/flash.cu", include_str!("cuda/flash.cu")),
    ("cuda/formats.cuh", include_str!("cuda/formats.cuh")),
    ("cuda/hadamard.cu", include_str!("cuda/hadamard.cu")),
    ("attention.rs", include_str!("attention.rs")),
    ("attention_module.rs", include_str!("attention_module.rs")),
    ("codec.rs", include_str!("codec.rs")),
    ("decode_module.rs", include_str!("decode_module.rs")),
    ("device.rs", include_str!("device.rs")),
    ("flash_module.rs", include_str!("flash_module.rs")),
    ("kernel.rs", include_str!("kernel.rs")),
    ("rotation.rs", include_str!("rotation.rs")),
    ("tuned.rs", include_str!("tuned.rs")),
];

/// What every kernel depends on: the formats and element types its source pastes in, the
/// compile options and module cache (`device.rs`), the rotations' transforms and the launch
/// helpers (`kernel.rs`, `rotation.rs`), and the buckets (`tuned.rs`).
const SHARED: [&str; 6] = [
    "cuda/formats.cuh",
    "cuda/elem.cuh",
    "device.rs",
    "kernel.rs",
    "rotation.rs",
    "tuned.rs",
];

/// The sources each tuned kernel family depends on besides [`SHARED`], by the prefix of its
/// tuned name. Prefill can take the decode kernels (too few rows for the flash kernel, or
/// formats it does not read), so its timings depend on theirs too.
const FAMILIES: [(&str, &[&str]); 4] = [
    ("fwht_", &["cuda/hadamard.cu"]),
    ("rotate_quantize_", &["cuda/hadamard.cu", "codec.rs"]),
    (
        "decode_attention_",
        &[
            "cuda/common.cuh",
            "cuda/decode.cu",
            "cuda/decode_mma.cu",
            "decode_module.rs",
            "attention_module.rs",
            "attention.rs",
        ],
    ),
    (
        "prefill_attention_",
        &[
            "cuda/common.cuh",
            "cuda/decode.cu",
            "cuda/decode_mma.cu",
            "decode_module.rs",
            "attention_module.rs",
            "cuda/flash.cu",
            "flash_module.rs",
            "attention.rs",
        ],
    ),
];

/// FNV-1a, 64 bits, continued over `bytes` (stable across compilers, unlike std's hasher).
const fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        h = (h ^ bytes[i] as u64).wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// The hash of every source, in order.
const fn hash_sources() -> u64 {
    let mut h = FNV_START;
    let mut f = 0;
    while f < SOURCES.len() {
        h = fnv(h, SOURCES[f].1.as_bytes());
        f += 1;
    }
    h
}

const HASH: u64 = hash_sources();

/// Hash of all the kernels' sources (what a kernel of no known family is tuned against).
///
/// ```
/// assert_eq!(rotq_cuda::tuned::kernel_hash().len(), 16);
/// ```
pub fn kernel_hash() -> String {
    format!("{HASH:016x}")
}

/// The hash of the sources that `kernel` (a tuned name) depends on, from `sources` (by file);
/// `None` for a name of no known family.
fn family_hash(sources: &[(&str, &str)], kernel: &str) -> Option<u64> {
    let (_, own) = FAMILIES.iter().find(|(p, _)| kernel.starts_with(p))?;
    let mut h = FNV_START;
    for (name, text) in sources {
        if SHARED.contains(name) || own.contains(name) {
            h = fnv(h, name.as_bytes());
            h = fnv(h, text.as_bytes());
        }
    }
    Some(h)
}

/// Hash of exactly the sources a tuned kernel's compilation and launch depend on: its CUDA C
/// (and the headers pasted into it) and the Rust that builds its modules and launches it, by
/// the kernel's tuned name (`fwht_f16`, `rotate_quantize_q4_0`, `decode_attention_q8_0`,
/// `prefill_attention_q8_0`, ...). Editing one family's sources leaves the others' hashes, and
/// so their tuning entries, valid. A name of no known family gets [`kernel_hash`] (every
/// source).
///
/// ```
/// use rotq_cuda::tuned::source_hash;
/// // Rotations of f16 and bf16 rows share their sources; decode attention has others.
/// assert_eq!(source_hash("fwht_f16"), source_hash("fwht_bf16"));
/// assert_ne!(source_hash("fwht_f16"), source_hash("decode_attention_q8_0"));
/// assert_eq!(source_hash("decode_attention_q8_0").len(), 16);
/// ```
pub fn source_hash(kernel: &str) -> String {
    match family_hash(&SOURCES, kernel) {
        Some(h) => format!("{h:016x}"),
        None => kernel_hash(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const KERNELS: [&str; 4] = [
        "fwht_f16",
        "rotate_quantize_q4_0",
        "decode_attention_q8_0",
        "prefill_attention_q8_0",
    ];

    /// Each kernel's hash with `file`'s source edited (a comment appended).
    fn hashes_with_edit(file: &str) -> Vec<u64> {
        let edited: Vec<String> = SOURCES
            .iter()
            .map(|(name, text)| match *name == file {
                true => format!("{text}\n// edited\n"),
                false => text.to_string(),
            })
            .collect();
        let sources: Vec<(&str, &str)> = SOURCES
            .iter()
            .zip(&edited)
            .map(|((name, _), text)| (*name, text.as_str()))
            .collect();
        KERNELS
            .iter()
            .map(|k| family_hash(&sources, k).unwrap())
            .collect()
    }

    /// Which of [`KERNELS`] change when `file` is edited.
    fn changed_by(file: &str) -> Vec<&'static str> {
        let before: Vec<u64> = KERNELS
            .iter()
            .map(|k| family_hash(&SOURCES, k).unwrap())
            .collect();
        let after = hashes_with_edit(file);
        KERNELS
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|(_, (b, a))| b != a)
            .map(|(k, _)| *k)
            .collect()
    }

    #[test]
    fn editing_one_family_changes_only_its_hashes() {
        assert_eq!(changed_by("cuda/flash.cu"), ["prefill_attention_q8_0"]);
        assert_eq!(changed_by("flash_module.rs"), ["prefill_attention_q8_0"]);
        let attention = ["decode_attention_q8_0", "prefill_attention_q8_0"];
        for f in [
            "cuda/decode.cu",
            "cuda/decode_mma.cu",
            "cuda/common.cuh",
            "attention_module.rs",
            "attention.rs",
        ] {
            assert_eq!(changed_by(f), attention, "{f}");
        }
        assert_eq!(changed_by("codec.rs"), ["rotate_quantize_q4_0"]);
        assert_eq!(
            changed_by("cuda/hadamard.cu"),
            ["fwht_f16", "rotate_quantize_q4_0"]
        );
        for f in SHARED {
            assert_eq!(changed_by(f), KERNELS, "{f}");
        }
    }

    #[test]
    fn every_source_belongs_to_a_family() {
        for (name, _) in SOURCES {
            assert!(
                !changed_by(name).is_empty(),
                "{name} changes no kernel's hash"
            );
        }
    }

    #[test]
    fn names_of_one_family_share_a_hash_and_unknown_names_take_every_source() {
        assert_eq!(
            source_hash("decode_attention_q4_0"),
            source_hash("decode_attention_f16")
        );
        assert_ne!(
            source_hash("decode_attention_q4_0"),
            source_hash("prefill_attention_q4_0")
        );
        assert_ne!(source_hash("fwht_f32"), source_hash("rotate_quantize_f16"));
        assert_eq!(source_hash("no_such_kernel"), kernel_hash());
        for k in KERNELS {
            assert_ne!(source_hash(k), kernel_hash(), "{k}");
            assert_eq!(source_hash(k).len(), 16);
        }
    }
}
