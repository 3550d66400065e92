//! The tuning cache: which configuration each kernel uses, per device and shape bucket.
//!
//! The autotuner writes it; kernels read it. It lives here, in the shared vocabulary, because
//! both sides need the same schema and neither may depend on the other. The file is JSON: a
//! schema version and one section per device (the CPU, each GPU), each with the device's
//! identity and one entry per `kernel/bucket` with the chosen configuration, the hash of that
//! kernel's sources and the timings that chose it. [`TuneFile`] is one device's section:
//! saving it merges its entries into the file and keeps everything else. An entry is in force
//! only if it was tuned for the current sources of its kernel and is one of the kernel's
//! configurations ([`TunedEntry::in_force`]): editing one kernel leaves the other kernels'
//! entries in force. A file of another schema is ignored (kept where it is); a file that
//! cannot be parsed is moved aside to `<name>.corrupt` and ignored.
//!
//! Writes are atomic: a temporary file of a random name, created exclusively in the cache's
//! folder (so never through a link planted there), written, flushed to disk, renamed over the
//! cache, and the folder flushed; a reader never sees half a file. Saves are serialized by an
//! advisory lock on a sidecar `<name>.lock` beside the file, so that two processes saving at
//! once (say `autotune --device cuda:0` and `autotune --device cpu`) both keep their sections;
//! readers take no lock and never wait (see [`TuneFile::save`]).
//!
//! The cache and its lock file are regular files at the path named, never symbolic links:
//! reading, saving and locking refuse a link there with an error naming it, and create nothing
//! where it points. Writing through a link would put the file wherever anyone who can write
//! the folder (a shared cache folder) points it, and replacing the link by a file would
//! silently cut the user's link; a cache kept elsewhere is named by its own path
//! (`ROTQ_TUNE_CACHE`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
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
    /// A file that could not be parsed: ignored; moved aside by [`TuneFile::load`].
    Corrupt {
        /// What was wrong.
        reason: String,
        /// Where the bad file now is, if it was moved.
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
    // A dangling link is not a free name either.
    while candidate.symlink_metadata().is_ok() {
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

    /// Reads `device`'s section of the cache at `path` (see [`Loaded`]); a corrupt file is
    /// moved aside to a free `<name>.corrupt…` name (what the autotuner does before writing
    /// anew).
    pub fn load(path: &Path, device: &DeviceIdentity) -> Loaded {
        Self::read(path, device, true)
    }

    /// [`Self::load`] without side effects: a corrupt file is reported and left in place
    /// (what kernels do when they look up their configuration).
    pub fn peek(path: &Path, device: &DeviceIdentity) -> Loaded {
        Self::read(path, device, false)
    }

    fn read(path: &Path, device: &DeviceIdentity, move_aside: bool) -> Loaded {
        let bytes = match read_cache(path) {
            Ok(Some(b)) => b,
            Ok(None) => return Loaded::Missing,
            Err(e) => {
                return Loaded::Unreadable {
                    reason: e.to_string(),
                }
            }
        };
        let file = match parse(&bytes) {
            Parsed::Ours(file) => file,
            Parsed::Foreign(v) => {
                return Loaded::Foreign {
                    reason: format!("schema {v} (this build reads {SCHEMA_VERSION})"),
                }
            }
            Parsed::Corrupt(reason) => {
                // Never lose it: move it aside for inspection, then carry on without it.
                let kept_at = if move_aside {
                    let aside = aside_path(path, "corrupt");
                    std::fs::rename(path, &aside).ok().map(|_| aside)
                } else {
                    None
                };
                return Loaded::Corrupt {
                    reason: format!("{}: {reason}", path.display()),
                    kept_at,
                };
            }
        };
        let Some(ours) = file.devices.iter().find(|s| &s.device == device) else {
            return Loaded::OtherDevices {
                devices: file.devices.iter().map(|s| s.device.name.clone()).collect(),
            };
        };
        Loaded::Usable(ours.clone())
    }

    /// Writes this section's entries into the cache at `path` atomically (creating its
    /// folder), merged entry by entry: this device's other entries, and the other devices'
    /// sections, are kept; where the file already has an entry for one of this section's
    /// `kernel/bucket` keys, this section's wins. A file there that is not a cache of this
    /// schema is an error (it is not written over). A caller that saves as it goes (the
    /// autotuner, after each task) saves its new entries only: re-saving entries it read
    /// earlier would overwrite what another saver wrote for them since.
    ///
    /// Saving reads the file, merges these entries in and renames a new file over it. Two
    /// processes doing that at once (say two `autotune` runs) could both read the old file, and
    /// the second rename would drop the first one's entries: a lost update. So the whole
    /// read-merge-write holds an exclusive lock ([`std::fs::File::lock`]) on a sidecar file
    /// `<name>.lock` in the same folder, from before the read until after the rename; a second
    /// saver waits for it ([`SaveLock`] holds it; [`Self::save_with`] says when a save waits).
    /// The lock file is created if missing and never deleted (deleting it would let two savers
    /// lock two different files). The lock is advisory, and per cache file: it serializes
    /// savers that go through this function for the same path (in any process, or threads of
    /// one), and stops nothing else. Readers ([`Self::load`], [`Self::peek`]) take no lock and
    /// never block: the rename is atomic, so they see the old file or the new one, whole.
    ///
    /// Neither the cache, its lock file nor the temporary file is ever opened through a
    /// symbolic link: a link at the cache or lock path is an error naming it (see the module
    /// docs for why), and the temporary file has a random name and is created exclusively.
    /// Errors name the user's paths (the cache, its lock file or its folder), never the
    /// temporary file's.
    ///
    /// ```
    /// use rotq_reference::tuned::{DeviceIdentity, Loaded, TuneFile};
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("tuned.json");
    /// let cpu = DeviceIdentity { name: "cpu: test".into(), compute_capability: None, driver_version: None };
    /// let gpu = DeviceIdentity { name: "gpu: test".into(), compute_capability: Some((9, 0)), driver_version: Some(13000) };
    /// // Two savers at once (threads here; separate processes alike): neither section is lost.
    /// std::thread::scope(|s| {
    ///     let a = s.spawn(|| TuneFile::new(cpu.clone()).save(&path));
    ///     let b = s.spawn(|| TuneFile::new(gpu.clone()).save(&path));
    ///     a.join().unwrap().and(b.join().unwrap())
    /// })?;
    /// assert!(matches!(TuneFile::load(&path, &cpu), Loaded::Usable(_)));
    /// assert!(matches!(TuneFile::load(&path, &gpu), Loaded::Usable(_)));
    /// assert!(dir.path().join("tuned.json.lock").exists(), "the lock file stays");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        self.save_with(path, || {})
    }

    /// [`Self::save`], calling `waiting` first if another saver holds the lock (so that a
    /// caller can say why it waits).
    ///
    /// ```
    /// use rotq_reference::tuned::{DeviceIdentity, TuneFile};
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("tuned.json");
    /// let cpu = DeviceIdentity { name: "cpu: test".into(), compute_capability: None, driver_version: None };
    /// TuneFile::new(cpu).save_with(&path, || eprintln!("waiting for another save"))?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn save_with(&self, path: &Path, waiting: impl FnOnce()) -> std::io::Result<()> {
        SaveLock::acquire(path, waiting)?.save(self)
    }

    /// Checks that [`Self::save`] could write the cache at `path`, changing nothing but
    /// creating its folder and lock file (which stays: see [`Self::save`]): the lock file can
    /// be opened and locked (or another saver holds it, and will let it go: this never waits),
    /// a temporary file created beside the cache (and removed at once), and whatever is at
    /// `path` is absent or a cache of this schema. The error names the path at fault. The
    /// autotuner asks before it tunes anything, so that a cache it cannot write costs no work.
    ///
    /// ```
    /// use rotq_reference::tuned::TuneFile;
    /// let dir = tempfile::tempdir()?;
    /// TuneFile::check_writable(&dir.path().join("tuned.json"))?;
    /// std::fs::write(dir.path().join("x.json"), "not a cache")?;
    /// assert!(TuneFile::check_writable(&dir.path().join("x.json")).is_err());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn check_writable(path: &Path) -> std::io::Result<()> {
        // Lockable: a lock another saver holds now will be let go (no need to wait for it).
        let (lock, lock_path) = open_lock(path)?;
        match lock.try_lock() {
            Ok(()) | Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(in_context(e, &lock_path, "locking"))
            }
        }
        read_ours(path)?;
        temp_beside(path).map(drop)
    }
}

/// The largest cache file read (a real one is a few KiB): a larger one is corrupt, and memory
/// stays bounded whatever lies at the path.
const MAX_BYTES: u64 = 16 << 20;

/// The exclusive save lock of one cache file (see [`TuneFile::save`]), held until dropped:
/// [`TuneFile::save`] in two steps, for a caller that must know when it holds the lock.
///
/// ```
/// use rotq_reference::tuned::{DeviceIdentity, SaveLock, TuneFile};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("tuned.json");
/// let cpu = DeviceIdentity { name: "cpu: test".into(), compute_capability: None, driver_version: None };
/// let lock = SaveLock::acquire(&path, || {})?;
/// // Another saver of `path` waits here, until `lock` is dropped.
/// lock.save(&TuneFile::new(cpu))?;
/// drop(lock);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct SaveLock {
    /// The cache file.
    path: PathBuf,
    /// The open lock file: closing it releases the lock.
    _file: File,
}

impl SaveLock {
    /// Creates the cache's folder, opens (creating it if missing) the lock file `<name>.lock`
    /// beside `path` and takes an exclusive lock on it; if another saver holds it, calls
    /// `waiting`, then waits for it. A lock path that is a symbolic link or not a regular file
    /// is an error naming it.
    pub fn acquire(path: &Path, waiting: impl FnOnce()) -> std::io::Result<Self> {
        let (file, lock_path) = open_lock(path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                waiting();
                file.lock()
                    .map_err(|e| in_context(e, &lock_path, "locking"))?;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(in_context(e, &lock_path, "locking"))
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            _file: file,
        })
    }

    /// [`TuneFile::save`]'s read-merge-write of `section`, under this lock.
    pub fn save(&self, section: &TuneFile) -> std::io::Result<()> {
        let path = &self.path;
        let mut file = read_ours(path)?.unwrap_or(OnDisk {
            schema: SCHEMA_VERSION,
            devices: Vec::new(),
        });
        match file.devices.iter_mut().find(|s| s.device == section.device) {
            // Entry by entry: this section's win, the file's others stay.
            Some(ours) => ours.entries.extend(section.entries.clone()),
            None => file.devices.push(section.clone()),
        }
        let text = serde_json::to_string_pretty(&file).map_err(std::io::Error::other)?;
        write_atomically(path, text.as_bytes())
    }
}

/// Creates the folder of the cache at `path` and opens (creating it if missing) its lock file
/// `<name>.lock`, refusing one that is a symbolic link or not a regular file; returns it and
/// its path.
fn open_lock(path: &Path) -> std::io::Result<(File, PathBuf)> {
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: not a file path", path.display()),
        )
    })?;
    let folder = folder_of(path);
    std::fs::create_dir_all(&folder)
        .map_err(|e| in_context(e, &folder, "creating the tuning cache's folder"))?;
    let mut lock_name = name.to_os_string();
    lock_name.push(".lock");
    let lock_path = path.with_file_name(lock_name);
    let what = "the tuning cache's lock file";
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    let file = open_no_follow(&mut options, &lock_path)
        .map_err(|e| refused_or(e, &lock_path, what, "remove the link"))?;
    check_regular(&file, &lock_path, what)?;
    Ok((file, lock_path))
}

/// What a cache file's bytes are.
enum Parsed {
    /// A cache of this schema.
    Ours(OnDisk),
    /// A valid file of another schema (a newer build may lay the rest out differently).
    Foreign(u64),
    /// Not a cache: why.
    Corrupt(String),
}

/// Parses a cache file's bytes. Reading and saving parse alike (through a JSON value), so
/// that what a reader accepts, a writer accepts.
fn parse(bytes: &[u8]) -> Parsed {
    if bytes.len() as u64 > MAX_BYTES {
        return Parsed::Corrupt(format!("larger than {} MiB", MAX_BYTES >> 20));
    }
    let value: serde_json::Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return Parsed::Corrupt(e.to_string()),
    };
    match value.get("schema").and_then(|s| s.as_u64()) {
        Some(v) if v == u64::from(SCHEMA_VERSION) => {}
        Some(v) => return Parsed::Foreign(v),
        None => return Parsed::Corrupt("no schema version".into()),
    }
    match serde_json::from_value(value) {
        Ok(file) => Parsed::Ours(file),
        Err(e) => Parsed::Corrupt(e.to_string()),
    }
}

/// The cache at `path` if it is one of this schema, `None` if there is none; an error
/// naming `path` for anything else there (a saver does not write over it).
fn read_ours(path: &Path) -> std::io::Result<Option<OnDisk>> {
    let Some(bytes) = read_cache(path)? else {
        return Ok(None);
    };
    let why = match parse(&bytes) {
        Parsed::Ours(file) => return Ok(Some(file)),
        Parsed::Foreign(v) => format!("schema {v}"),
        Parsed::Corrupt(why) => why,
    };
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!(
            "{}: not a schema {SCHEMA_VERSION} tuning cache ({why}); not writing over it",
            path.display()
        ),
    ))
}

/// The folder `path` is in (`.` for a bare file name).
fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `e`, saying what was being done to which of the user's paths.
fn in_context(e: std::io::Error, path: &Path, doing: &str) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{doing} {}: {e}", path.display()))
}

/// Opens `path` with `options`, not following a symbolic link at its last component (and not
/// blocking on a FIFO: what is not a regular file is refused after opening).
fn open_no_follow(options: &mut OpenOptions, path: &Path) -> std::io::Result<File> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    }
    options.open(path)
}

/// The error of opening `path` (`what`): a clear refusal, with `advice`, when a symbolic link
/// is there.
fn refused_or(e: std::io::Error, path: &Path, what: &str, advice: &str) -> std::io::Error {
    if path.symlink_metadata().is_ok_and(|m| m.is_symlink()) {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{}: {what} is a symbolic link; rotq opens it only as a regular file, never \
                 through a link ({advice})",
                path.display()
            ),
        )
    } else {
        in_context(e, path, &format!("opening {what}"))
    }
}

/// An error unless the open `file` at `path` (`what`) is a regular file.
fn check_regular(file: &File, path: &Path, what: &str) -> std::io::Result<()> {
    let meta = file
        .metadata()
        .map_err(|e| in_context(e, path, &format!("reading {what}")))?;
    if meta.is_file() {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: {what} is not a regular file", path.display()),
        ))
    }
}

/// The bytes of the cache at `path` (at most [`MAX_BYTES`] + 1), `None` if there is none; an
/// error naming `path` if it is a symbolic link, not a regular file, or cannot be read.
fn read_cache(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    let what = "the tuning cache";
    let file = match open_no_follow(OpenOptions::new().read(true), path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(refused_or(e, path, what, "name the file itself")),
    };
    check_regular(&file, path, what)?;
    let mut bytes = Vec::new();
    file.take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| in_context(e, path, "reading"))?;
    Ok(Some(bytes))
}

/// Replaces the file at `path` by `bytes` atomically: a temporary file of a random name,
/// created exclusively (`O_EXCL`: never through a link) in the same folder, written and
/// flushed, renamed over `path`, then the folder flushed so that the rename survives a crash.
/// Errors name `path`, not the temporary file; on an error the temporary file is removed.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = temp_beside(path)?;
    tmp.as_file_mut()
        .write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| in_context(e, path, "writing"))?;
    tmp.persist(path)
        .map_err(|e| in_context(e.error, path, "replacing"))?;
    let folder = folder_of(path);
    sync_folder(&folder).map_err(|e| in_context(e, &folder, "flushing the folder"))
}

/// A new temporary file of a random name beside `path` (`.<name>.<random>.tmp`), created
/// exclusively, removed when dropped unless persisted. Errors name `path`.
fn temp_beside(path: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .make_in(folder_of(path), |p| {
            OpenOptions::new().write(true).create_new(true).open(p)
        })
        .map_err(|e| in_context(e, path, "creating a temporary file beside"))
}

/// Flushes `folder`'s entries to disk (a rename lives in the folder). File systems that cannot
/// flush a folder say so, and are let be.
fn sync_folder(folder: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    match File::open(folder).and_then(|d| d.sync_all()) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
            ) => {}
        other => return other,
    }
    let _ = folder;
    Ok(())
}
