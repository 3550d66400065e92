//! The tuning cache: which configuration each kernel uses, per device and shape bucket.
//!
//! The autotuner writes it; kernels read it. It lives here, in the shared vocabulary, because
//! both sides need the same schema and neither may depend on the other. The file is JSON: a
//! schema version and one section per device (the CPU, each GPU), each with the device's
//! identity, a hash of the kernels' sources, and one entry per `kernel/bucket` with the chosen
//! configuration and the timings that chose it. [`TuneFile`] is one device's section: saving
//! it replaces that section and keeps the others. A file of another schema, or a section for
//! another build of the kernels, is ignored (kept where it is); a file that cannot be parsed is
//! moved aside to `<name>.corrupt` and ignored. Writes are atomic (a temporary file in the same
//! folder, then a rename), so a reader never sees half a file. Saves are serialized by an
//! advisory lock on a sidecar `<name>.lock` beside the file, so that two processes saving at
//! once (say `autotune --device cuda:0` and `autotune --device cpu`) both keep their sections;
//! readers take no lock and never wait (see [`TuneFile::save`]).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The schema version this build reads and writes (2: one section per device).
pub const SCHEMA_VERSION: u32 = 2;

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
    /// Median milliseconds of the default configuration.
    pub default_ms: f64,
    /// Median milliseconds of the chosen one.
    pub tuned_ms: f64,
    /// Candidates timed.
    pub tried: usize,
    /// Candidates the correctness gate rejected.
    pub rejected: usize,
}

/// One device's section of the cache.
///
/// ```
/// use rotq_reference::tuned::{DeviceIdentity, TuneFile};
/// let dev = DeviceIdentity { name: "cpu: test".into(), compute_capability: None, driver_version: None };
/// let mut file = TuneFile::new(dev, "abc123");
/// file.insert("fwht", "n=128", &serde_json::json!({"rows_per_task": 64}), 1.0, 0.8, 9, 0);
/// let c: serde_json::Value = file.config("fwht", "n=128").unwrap();
/// assert_eq!(c["rows_per_task"], 64);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneFile {
    /// [`SCHEMA_VERSION`] (the file's, when read).
    #[serde(skip, default = "schema")]
    pub schema: u32,
    /// The device the timings were taken on.
    pub device: DeviceIdentity,
    /// Hash of the kernels' sources: a change to any kernel invalidates the file.
    pub kernel_hash: String,
    /// `kernel/bucket` → entry.
    pub entries: BTreeMap<String, TunedEntry>,
}

fn schema() -> u32 {
    SCHEMA_VERSION
}

/// The file on disk: every device's section.
#[derive(Debug, Serialize, Deserialize)]
struct OnDisk {
    schema: u32,
    devices: Vec<TuneFile>,
}

/// What [`TuneFile::load`] found.
#[derive(Debug)]
pub enum Loaded {
    /// No file there.
    Missing,
    /// This device's section, for this kernel build.
    Usable(TuneFile),
    /// A file with sections for other devices only (listed): nothing for this one yet.
    OtherDevices {
        /// The devices it has sections for.
        devices: Vec<String>,
    },
    /// This device's section, written for another build of the kernels: ignored (and
    /// replaced when this device is tuned again).
    Stale {
        /// Which build it was for.
        reason: String,
    },
    /// A valid file of another schema version: ignored, left in place.
    Foreign {
        /// Why it does not apply.
        reason: String,
    },
    /// A file that exists but could not be read (permissions, a folder): ignored, and not to
    /// be written over.
    Unreadable {
        /// What the system said.
        reason: String,
    },
    /// A file that could not be parsed: ignored; moved aside by [`TuneFile::load`].
    Corrupt {
        /// What was wrong.
        reason: String,
        /// Where the bad file now is, if it was moved.
        kept_at: Option<PathBuf>,
    },
}

/// A free name beside `path` for a file moved aside: `tuned.json.<what>`, else
/// `tuned.json.<what>.1`, `.2`, … (never over an earlier one).
///
/// ```
/// let p = rotq_reference::tuned::aside_path(std::path::Path::new("/nonexistent/tuned.json"), "corrupt");
/// assert!(p.to_string_lossy().ends_with("tuned.json.corrupt"));
/// ```
pub fn aside_path(path: &Path, what: &str) -> PathBuf {
    let base = format!("{}.{what}", path.display());
    let mut candidate = PathBuf::from(&base);
    let mut n = 1;
    while candidate.exists() {
        candidate = PathBuf::from(format!("{base}.{n}"));
        n += 1;
    }
    candidate
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
    /// An empty cache for `device` and the kernel build `kernel_hash`.
    pub fn new(device: DeviceIdentity, kernel_hash: &str) -> Self {
        Self {
            schema: SCHEMA_VERSION,
            device,
            kernel_hash: kernel_hash.to_string(),
            entries: BTreeMap::new(),
        }
    }

    fn key(kernel: &str, bucket: &str) -> String {
        format!("{kernel}/{bucket}")
    }

    /// Records the configuration chosen for `kernel` at `bucket`.
    #[allow(clippy::too_many_arguments)] // one entry's fields
    pub fn insert(
        &mut self,
        kernel: &str,
        bucket: &str,
        config: &serde_json::Value,
        default_ms: f64,
        tuned_ms: f64,
        tried: usize,
        rejected: usize,
    ) {
        self.entries.insert(
            Self::key(kernel, bucket),
            TunedEntry {
                config: config.clone(),
                default_ms,
                tuned_ms,
                tried,
                rejected,
            },
        );
    }

    /// The configuration recorded for `kernel` at `bucket`, if any and if it parses as `C`.
    pub fn config<C: serde::de::DeserializeOwned>(&self, kernel: &str, bucket: &str) -> Option<C> {
        let entry = self.entries.get(&Self::key(kernel, bucket))?;
        serde_json::from_value(entry.config.clone()).ok()
    }

    /// Reads the cache at `path` for `device` and `kernel_hash` (see [`Loaded`]); a corrupt
    /// file is moved aside to a free `<name>.corrupt…` name (what the autotuner does before
    /// writing anew).
    pub fn load(path: &Path, device: &DeviceIdentity, kernel_hash: &str) -> Loaded {
        Self::read(path, device, kernel_hash, true)
    }

    /// [`Self::load`] without side effects: a corrupt file is reported and left in place
    /// (what kernels do when they look up their configuration).
    pub fn peek(path: &Path, device: &DeviceIdentity, kernel_hash: &str) -> Loaded {
        Self::read(path, device, kernel_hash, false)
    }

    fn read(path: &Path, device: &DeviceIdentity, kernel_hash: &str, move_aside: bool) -> Loaded {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Missing,
            Err(e) => {
                return Loaded::Unreadable {
                    reason: format!("{}: {e}", path.display()),
                }
            }
        };
        let corrupt = |reason: String| {
            // Never lose it: move it aside for inspection, then carry on without it.
            let kept_at = if move_aside {
                let aside = aside_path(path, "corrupt");
                std::fs::rename(path, &aside).ok().map(|_| aside)
            } else {
                None
            };
            Loaded::Corrupt {
                reason: format!("{}: {reason}", path.display()),
                kept_at,
            }
        };
        // The schema first: a newer build may lay the rest out differently.
        let value: serde_json::Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => return corrupt(e.to_string()),
        };
        match value.get("schema").and_then(|s| s.as_u64()) {
            Some(v) if v == u64::from(SCHEMA_VERSION) => {}
            Some(v) => {
                return Loaded::Foreign {
                    reason: format!("schema {v} (this build reads {SCHEMA_VERSION})"),
                }
            }
            None => return corrupt("no schema version".into()),
        }
        let file: OnDisk = match serde_json::from_value(value) {
            Ok(f) => f,
            Err(e) => return corrupt(e.to_string()),
        };
        let Some(ours) = file.devices.iter().find(|s| &s.device == device) else {
            return Loaded::OtherDevices {
                devices: file.devices.iter().map(|s| s.device.name.clone()).collect(),
            };
        };
        if ours.kernel_hash != kernel_hash {
            return Loaded::Stale {
                reason: format!(
                    "tuned for kernel build {}, this is {kernel_hash}",
                    ours.kernel_hash
                ),
            };
        }
        Loaded::Usable(ours.clone())
    }

    /// Writes this device's section into the cache at `path` atomically (creating its
    /// folder): the other devices' sections are kept. A file there that is not a cache of this
    /// schema is an error (it is not written over).
    ///
    /// Saving reads the file, merges this section in and renames a new file over it. Two
    /// processes doing that at once (say `autotune --device cuda:0` and `autotune --device
    /// cpu`) could both read the old file, and the second rename would drop the first one's
    /// section: a lost update. So the read-merge-write holds an exclusive lock
    /// ([`std::fs::File::lock`]) on a sidecar file `<name>.lock` in the same folder, from
    /// before the read until after the rename; a second saver waits for it. The lock file is
    /// created if missing and never deleted (deleting it would let two savers lock two
    /// different files). The lock is advisory, and per cache file: it serializes savers that
    /// go through this function for the same path (in any process, or threads of one), and
    /// stops nothing else. Readers ([`Self::load`], [`Self::peek`]) take no lock and never
    /// block: the rename is atomic, so they see the old file or the new one, whole.
    ///
    /// ```
    /// use rotq_reference::tuned::{DeviceIdentity, Loaded, TuneFile};
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("tuned.json");
    /// let cpu = DeviceIdentity { name: "cpu: test".into(), compute_capability: None, driver_version: None };
    /// let gpu = DeviceIdentity { name: "gpu: test".into(), compute_capability: Some((9, 0)), driver_version: Some(13000) };
    /// // Two savers at once (threads here; separate processes alike): neither section is lost.
    /// std::thread::scope(|s| {
    ///     let a = s.spawn(|| TuneFile::new(cpu.clone(), "abc123").save(&path));
    ///     let b = s.spawn(|| TuneFile::new(gpu.clone(), "abc123").save(&path));
    ///     a.join().unwrap().and(b.join().unwrap())
    /// })?;
    /// assert!(matches!(TuneFile::load(&path, &cpu, "abc123"), Loaded::Usable(_)));
    /// assert!(matches!(TuneFile::load(&path, &gpu, "abc123"), Loaded::Usable(_)));
    /// assert!(dir.path().join("tuned.json.lock").exists(), "the lock file stays");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).map_err(|e| {
                std::io::Error::new(e.kind(), format!("creating {}: {e}", d.display()))
            })?;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "tuned.json".into());
        // Held until it is dropped (closing the file releases the lock), after the rename.
        let _lock = lock_beside(path, &name)?;
        self.merge_and_write(path, &name)
    }

    /// [`Self::save`]'s read-merge-write, run under the lock.
    fn merge_and_write(&self, path: &Path, name: &str) -> std::io::Result<()> {
        use std::io::Write;
        let mut file = match std::fs::read(path) {
            Ok(bytes) => {
                // Parsed as `read` parses it (through a JSON value), so that what a reader
                // accepts is what a writer accepts.
                let disk: OnDisk = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| serde_json::from_value(v).ok())
                    .filter(|d: &OnDisk| d.schema == SCHEMA_VERSION)
                    .ok_or_else(|| {
                        std::io::Error::other(format!(
                            "{} is not a schema {SCHEMA_VERSION} tuning cache; not writing over it",
                            path.display()
                        ))
                    })?;
                disk
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => OnDisk {
                schema: SCHEMA_VERSION,
                devices: Vec::new(),
            },
            Err(e) => return Err(e),
        };
        match file.devices.iter_mut().find(|s| s.device == self.device) {
            Some(section) => *section = self.clone(),
            None => file.devices.push(self.clone()),
        }
        // One saver at a time holds the lock, so one name per process is enough.
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let text = serde_json::to_string_pretty(&file).map_err(std::io::Error::other)?;
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Opens (creating it if missing) the sidecar lock file `<name>.lock` beside `path` and takes
/// an exclusive lock on it, waiting for any other holder; the lock is released when the
/// returned file is dropped. See [`TuneFile::save`].
fn lock_beside(path: &Path, name: &str) -> std::io::Result<std::fs::File> {
    let lock_path = path.with_file_name(format!("{name}.lock"));
    let context = |what: &str, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{what} {}: {e}", lock_path.display()))
    };
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| context("opening the lock file", e))?;
    lock.lock().map_err(|e| context("locking", e))?;
    Ok(lock)
}
