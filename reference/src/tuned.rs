//! The tuning cache's schema, and its reading: which configuration each kernel uses, per
//! device and shape bucket.
//!
//! The autotuner writes the cache (`rotq_autotune::cache`: saving, its lock, moving a bad file
//! aside); kernels read it. The schema lives here, in the shared vocabulary, because both
//! sides need it and neither may depend on the other; the writing lives with the tuner, its
//! only writer, so that an engine, which only reads, compiles nothing a writer needs. The
//! file is JSON ([`CacheFile`]): a schema version and one section per device (the CPU, each
//! GPU), each with the device's identity and one entry per `kernel/bucket` with the chosen
//! configuration, the hash of that kernel's sources and the timings that chose it.
//! [`TuneFile`] is one device's section. An entry is in force only if it was tuned for the
//! current sources of its kernel and is one of the kernel's configurations
//! ([`TunedEntry::in_force`]): editing one kernel leaves the other kernels' entries in force.
//! A file of another schema is ignored, a file that cannot be parsed reported corrupt; reading
//! ([`TuneFile::peek`], [`read`]) changes nothing, and never waits for a writer (writes are
//! atomic renames: a reader sees the old file or the new one, whole).
//!
//! The cache is a regular file at the path named, never read through a symbolic link: a link
//! there, or anything but a regular file (a FIFO, a folder), is refused with an error naming
//! it, and at most 16 MiB of it is read. On Unix the file opened is checked to be the one
//! found at the path, so that a link put there between the check and the open is refused too;
//! elsewhere such a link is followed (for reading only): the guarantee is Unix's.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The schema version this build reads and writes (3: one section per device, a source hash
/// per entry).
pub const SCHEMA_VERSION: u32 = 3;

/// Which device a cache belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceIdentity {
    /// `cpu: <model>` or the GPU's name.
    pub name: String,
    /// GPU compute capability; `None` for a CPU.
    pub compute_capability: Option<(u32, u32)>,
    /// GPU driver version; `None` for a CPU.
    pub driver_version: Option<i32>,
}

/// One tuned kernel and shape bucket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TunedEntry {
    /// The chosen configuration (the kernel's `Config`, as JSON).
    pub config: serde_json::Value,
    /// Hash of the sources of the kernel it was tuned for (its crate's
    /// `tuned::source_hash(kernel)`): when they change, the entry is stale.
    pub source_hash: String,
    /// Median milliseconds of the default configuration.
    pub default_ms: f64,
    /// Median milliseconds of the chosen one.
    pub tuned_ms: f64,
    /// Candidates timed.
    pub tried: usize,
    /// Candidates the correctness gate rejected.
    pub rejected: usize,
}

/// Why a kernel does not use a tuned entry (see [`TunedEntry::in_force`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// Tuned for other sources of the kernel (it was edited since): its timings say nothing
    /// about the kernel as it is.
    Stale {
        /// The hash the entry was tuned for.
        tuned_for: String,
        /// The kernel's hash now.
        current: String,
    },
    /// The configuration does not parse as the kernel's.
    Unparsable {
        /// What the parser said.
        reason: String,
    },
    /// A configuration of the kernel's type, but not one of those it runs (edited by hand, or
    /// from a wider search space of another build): not trusted.
    OutsideSpace,
    /// No kernel of this device looks this `kernel/bucket` key up.
    UnknownKey,
}

impl std::fmt::Display for Ignored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stale { tuned_for, current } => write!(
                f,
                "stale: tuned for kernel sources {tuned_for}, these are {current}"
            ),
            Self::Unparsable { reason } => {
                write!(f, "not a configuration of this kernel: {reason}")
            }
            Self::OutsideSpace => write!(f, "outside the kernel's search space"),
            Self::UnknownKey => write!(f, "no kernel of this device looks this key up"),
        }
    }
}

impl std::error::Error for Ignored {}

impl TunedEntry {
    /// The entry's configuration, if a kernel whose sources hash to `source_hash` and that
    /// runs the configurations `valid` accepts would use it; else why not. Kernels look their
    /// configuration up through this, and tools that report the cache (`rotq info`) ask it
    /// too, so that what is reported in force is what the kernels use.
    ///
    /// ```
    /// use rotq_reference::tuned::{Ignored, TunedEntry};
    /// let entry = TunedEntry {
    ///     config: serde_json::json!(64), source_hash: "abc".into(),
    ///     default_ms: 1.0, tuned_ms: 0.8, tried: 9, rejected: 0,
    /// };
    /// let space = [32u32, 64, 128];
    /// assert_eq!(entry.in_force("abc", |c: &u32| space.contains(c)), Ok(64));
    /// assert_eq!(entry.in_force("abc", |c: &u32| *c < 64), Err(Ignored::OutsideSpace));
    /// assert!(matches!(entry.in_force("def", |_: &u32| true), Err(Ignored::Stale { .. })));
    /// ```
    pub fn in_force<C: serde::de::DeserializeOwned>(
        &self,
        source_hash: &str,
        valid: impl FnOnce(&C) -> bool,
    ) -> Result<C, Ignored> {
        if self.source_hash != source_hash {
            return Err(Ignored::Stale {
                tuned_for: self.source_hash.clone(),
                current: source_hash.to_string(),
            });
        }
        let config: C =
            serde_json::from_value(self.config.clone()).map_err(|e| Ignored::Unparsable {
                reason: e.to_string(),
            })?;
        if valid(&config) {
            Ok(config)
        } else {
            Err(Ignored::OutsideSpace)
        }
    }
}

/// One device's section of the cache.
///
/// ```
/// use rotq_reference::tuned::{DeviceIdentity, TuneFile, TunedEntry};
/// let dev = DeviceIdentity { name: "cpu: test".into(), compute_capability: None, driver_version: None };
/// let mut file = TuneFile::new(dev);
/// let config = serde_json::json!({"rows_per_task": 64});
/// file.insert("fwht", "n=128", TunedEntry {
///     config, source_hash: "abc123".into(), default_ms: 1.0, tuned_ms: 0.8, tried: 9, rejected: 0,
/// });
/// let entry = file.entry("fwht", "n=128").unwrap();
/// let c: serde_json::Value = entry.in_force("abc123", |_| true).unwrap();
/// assert_eq!(c["rows_per_task"], 64);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneFile {
    /// The device the timings were taken on.
    pub device: DeviceIdentity,
    /// `kernel/bucket` → entry.
    pub entries: BTreeMap<String, TunedEntry>,
}

/// The whole file: every device's section.
///
/// ```
/// use rotq_reference::tuned::{read, CacheFile, Contents, DeviceIdentity, TuneFile};
/// let cpu = DeviceIdentity { name: "cpu: test".into(), compute_capability: None, driver_version: None };
/// let file = CacheFile::new(vec![TuneFile::new(cpu)]);
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("tuned.json");
/// std::fs::write(&path, file.to_json())?;
/// assert!(matches!(read(&path)?, Contents::Ours(f) if f == file));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheFile {
    /// [`SCHEMA_VERSION`].
    pub schema: u32,
    /// One section per device.
    pub devices: Vec<TuneFile>,
}

impl CacheFile {
    /// A file of this schema holding `devices`.
    pub fn new(devices: Vec<TuneFile>) -> Self {
        Self {
            schema: SCHEMA_VERSION,
            devices,
        }
    }

    /// The file's text, as it is written (indented JSON, for people who read it).
    pub fn to_json(&self) -> String {
        // Maps with string keys, strings and numbers: serializing cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The section of `device`, if the file has one.
    pub fn section(&self, device: &DeviceIdentity) -> Option<&TuneFile> {
        self.devices.iter().find(|s| &s.device == device)
    }
}

/// What [`read`] found at a cache path.
#[derive(Debug)]
pub enum Contents {
    /// No file there.
    Missing,
    /// A cache of this schema.
    Ours(CacheFile),
    /// A valid file of another schema version (a newer build may lay the rest out
    /// differently).
    Foreign {
        /// Its schema version.
        schema: u64,
    },
    /// Not a cache: too large, not JSON, no schema version, or not laid out as this schema's.
    Corrupt {
        /// What was wrong.
        reason: String,
    },
}

/// What [`TuneFile::peek`] found for one device.
#[derive(Debug)]
pub enum Loaded {
    /// No file there.
    Missing,
    /// This device's section (each entry in force or not: see [`TunedEntry::in_force`]).
    Usable(TuneFile),
    /// A file with sections for other devices only (listed): nothing for this one yet.
    OtherDevices {
        /// The devices it has sections for.
        devices: Vec<String>,
    },
    /// A valid file of another schema version: ignored, left in place.
    Foreign {
        /// Why it does not apply.
        reason: String,
    },
    /// A file that exists but could not be read (permissions, a folder, a symbolic link):
    /// ignored, and not to be written over.
    Unreadable {
        /// What the system said.
        reason: String,
    },
    /// A file that could not be parsed: ignored.
    Corrupt {
        /// What was wrong.
        reason: String,
        /// Where the bad file now is, if it was moved aside: reading never moves it (`None`);
        /// the autotuner's `rotq_autotune::cache::load` does, before writing anew.
        kept_at: Option<PathBuf>,
    },
}

/// Milliseconds in few digits, for people: three decimals from 0.001 to a million, else three
/// significant digits and an exponent, so that a hand-edited `1e308` in a cache prints as
/// `1.000e308`, not as 309 digits (`{}` of an `f64` never uses an exponent). Padding and
/// alignment apply (`{:>8}`).
///
/// ```
/// use rotq_reference::tuned::Millis;
/// assert_eq!(Millis(0.1234).to_string(), "0.123");
/// assert_eq!(Millis(1e308).to_string(), "1.000e308");
/// assert_eq!(format!("{:>8}", Millis(2.0)), "   2.000");
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Millis(pub f64);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let x = self.0;
        let text = if x == 0.0 || !x.is_finite() || (1e-3..1e6).contains(&x.abs()) {
            format!("{x:.3}")
        } else {
            format!("{x:.3e}")
        };
        f.pad(&text)
    }
}

/// The kernel and the bucket of a `kernel/bucket` key (kernel names have no `/`).
///
/// ```
/// assert_eq!(rotq_reference::tuned::split_key("fwht_f32/n=128"), Some(("fwht_f32", "n=128")));
/// ```
pub fn split_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('/')
}

/// Shape bucket of a problem: each size rounded up to a power of two, e.g.
/// `bucket(&[("d", 96), ("n_kv", 3000)]) == "d=128,n_kv=4096"`.
///
/// ```
/// assert_eq!(rotq_reference::tuned::bucket(&[("d", 96), ("n_kv", 3000)]), "d=128,n_kv=4096");
/// ```
pub fn bucket(sizes: &[(&str, usize)]) -> String {
    sizes
        .iter()
        .map(|(k, v)| {
            let rounded = v.max(&1).checked_next_power_of_two().unwrap_or(usize::MAX);
            format!("{k}={rounded}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Where the cache lives: `ROTQ_TUNE_CACHE`, else `$XDG_CACHE_HOME/rotq/tuned.json`, else
/// `~/.cache/rotq/tuned.json`; `None` when none of those is set.
pub fn default_path() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = var("ROTQ_TUNE_CACHE") {
        return Some(PathBuf::from(p));
    }
    let base = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("rotq").join("tuned.json"))
}

impl TuneFile {
    /// An empty section for `device`.
    pub fn new(device: DeviceIdentity) -> Self {
        Self {
            device,
            entries: BTreeMap::new(),
        }
    }

    fn key(kernel: &str, bucket: &str) -> String {
        format!("{kernel}/{bucket}")
    }

    /// Records the configuration chosen for `kernel` at `bucket`.
    pub fn insert(&mut self, kernel: &str, bucket: &str, entry: TunedEntry) {
        self.entries.insert(Self::key(kernel, bucket), entry);
    }

    /// The entry recorded for `kernel` at `bucket`, if any (whether it is in force is
    /// [`TunedEntry::in_force`]'s to say).
    pub fn entry(&self, kernel: &str, bucket: &str) -> Option<&TunedEntry> {
        self.entries.get(&Self::key(kernel, bucket))
    }

    /// Reads `device`'s section of the cache at `path` (see [`Loaded`]), without side effects:
    /// a corrupt file is reported and left in place (what kernels do when they look up their
    /// configuration). Never waits: see the module docs.
    ///
    /// ```
    /// use rotq_reference::tuned::{DeviceIdentity, Loaded, TuneFile};
    /// let cpu = DeviceIdentity { name: "cpu: test".into(), compute_capability: None, driver_version: None };
    /// let path = std::path::Path::new("/nonexistent/tuned.json");
    /// assert!(matches!(TuneFile::peek(path, &cpu), Loaded::Missing));
    /// ```
    pub fn peek(path: &Path, device: &DeviceIdentity) -> Loaded {
        match read(path) {
            Ok(Contents::Missing) => Loaded::Missing,
            Ok(Contents::Ours(file)) => match file.section(device) {
                Some(ours) => Loaded::Usable(ours.clone()),
                None => Loaded::OtherDevices {
                    devices: file.devices.into_iter().map(|s| s.device.name).collect(),
                },
            },
            Ok(Contents::Foreign { schema }) => Loaded::Foreign {
                reason: format!("schema {schema} (this build reads {SCHEMA_VERSION})"),
            },
            Ok(Contents::Corrupt { reason }) => Loaded::Corrupt {
                reason: format!("{}: {reason}", path.display()),
                kept_at: None,
            },
            Err(e) => Loaded::Unreadable {
                reason: e.to_string(),
            },
        }
    }
}

/// Reads the whole cache at `path`, without side effects (what [`TuneFile::peek`] reads, and
/// what the autotuner merges its entries into). An error, naming `path`, if something is there
/// that cannot be read: a symbolic link, not a regular file, or no permission.
///
/// ```
/// use rotq_reference::tuned::{read, Contents};
/// assert!(matches!(read(std::path::Path::new("/nonexistent/tuned.json"))?, Contents::Missing));
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn read(path: &Path) -> std::io::Result<Contents> {
    Ok(match read_cache(path)? {
        None => Contents::Missing,
        Some(bytes) => parse(&bytes),
    })
}

/// The largest cache file read (a real one is a few KiB): a larger one is corrupt, and memory
/// stays bounded whatever lies at the path.
const MAX_BYTES: u64 = 16 << 20;

/// How often the file at a cache path may be found replaced between the check and the open
/// (a writer's rename: rare, and over at once) before reading gives up.
const OPEN_ATTEMPTS: usize = 8;

/// Parses a cache file's bytes. Reading and writing go through this one parse (through a JSON
/// value), so that what a reader accepts, the writer accepts.
fn parse(bytes: &[u8]) -> Contents {
    let corrupt = |reason: String| Contents::Corrupt { reason };
    if bytes.len() as u64 > MAX_BYTES {
        return corrupt(format!("larger than {} MiB", MAX_BYTES >> 20));
    }
    let value: serde_json::Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return corrupt(e.to_string()),
    };
    match value.get("schema").and_then(|s| s.as_u64()) {
        Some(v) if v == u64::from(SCHEMA_VERSION) => {}
        Some(schema) => return Contents::Foreign { schema },
        None => return corrupt("no schema version".into()),
    }
    match serde_json::from_value(value) {
        Ok(file) => Contents::Ours(file),
        Err(e) => corrupt(e.to_string()),
    }
}

/// `e`, saying what was being done to which of the user's paths.
fn in_context(e: std::io::Error, path: &Path, doing: &str) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{doing} {}: {e}", path.display()))
}

/// An error naming `path`, refusing it (`why`).
fn refused(path: &Path, why: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("{}: the tuning cache {why}", path.display()),
    )
}

/// The bytes of the cache at `path` (at most [`MAX_BYTES`] + 1), `None` if there is none; an
/// error naming `path` if it is a symbolic link, not a regular file, or cannot be read.
///
/// What is at the path is checked first (`lstat`, which does not follow a link), so that a
/// link is not opened and a FIFO not waited on; then it is opened (plainly: the flags that
/// would refuse a link or a FIFO at the open itself need `libc`, which an engine should not
/// compile for a read), and on Unix the open file must be the one checked (device and inode),
/// else something was put there in between: a writer's rename is tried again, a link refused
/// when checked again. (A FIFO put there in that instant can make the open wait.)
fn read_cache(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    for _ in 0..OPEN_ATTEMPTS {
        let found = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(in_context(e, path, "reading")),
        };
        if found.is_symlink() {
            return Err(refused(
                path,
                "is a symbolic link; rotq reads it only as a regular file, never through a \
                 link (name the file itself)",
            ));
        }
        if !found.is_file() {
            return Err(refused(path, "is not a regular file"));
        }
        let file = match File::open(path) {
            Ok(f) => f,
            // Moved away since the check (say, aside by the autotuner): none there now.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(in_context(e, path, "reading")),
        };
        let opened = file
            .metadata()
            .map_err(|e| in_context(e, path, "reading"))?;
        if !same_file(&found, &opened) {
            continue;
        }
        let mut bytes = Vec::new();
        file.take(MAX_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| in_context(e, path, "reading"))?;
        return Ok(Some(bytes));
    }
    Err(refused(path, "kept changing while it was being opened"))
}

/// Whether `opened` (the metadata of an open file) is the regular file `found` (checked at
/// its path before the open): the same device and inode on Unix; elsewhere, a regular file.
fn same_file(found: &std::fs::Metadata, opened: &std::fs::Metadata) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        opened.is_file() && (found.dev(), found.ino()) == (opened.dev(), opened.ino())
    }
    #[cfg(not(unix))]
    {
        let _ = found;
        opened.is_file()
    }
}
