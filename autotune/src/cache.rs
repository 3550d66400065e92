//! Writing the tuning cache: saving a device's entries, the save lock, moving a file that is
//! not a cache of this schema aside, and checking, before any tuning, that a save can succeed.
//!
//! The schema, the path lookup and the side-effect-free read are `rotq_reference::tuned`'s
//! (the kernels read the cache too); the writing is here, with the tuner, the cache's only
//! writer, so that an engine compiles none of it (temporary files, locks).
//!
//! **Saves merge under a lock.** Saving reads the file, merges a device's new entries in and
//! renames a new file over it. Two processes doing that at once (say two `autotune` runs)
//! could both read the old file, and the second rename would drop the first one's entries: a
//! lost update. So the whole read-merge-write holds an exclusive lock
//! ([`std::fs::File::lock`]) on a sidecar file `<name>.lock` in the same folder, from before
//! the read until after the rename; a second saver waits for it ([`SaveLock`] holds it). The
//! lock file is created if missing and never deleted (deleting it would let two savers lock
//! two different files). The lock is advisory, and per cache file: it serializes savers that
//! go through this module for the same path (in any process, or threads of one), and stops
//! nothing else. Readers take no lock and never block: the rename is atomic, so they see the
//! old file or the new one, whole.
//!
//! **Files are moved aside under the lock too.** A corrupt file ([`load`]) or one of another
//! schema ([`replace_foreign`]) is moved aside only while holding the lock, after reading it
//! again there: another run may have moved it already and saved a cache of this schema in its
//! place, which is then merged into, not moved. The move never replaces anything: the file is
//! linked to a free name (`<name>.corrupt`, else `.corrupt.1`, …), which fails if the name is
//! taken, and only then unlinked from the cache path.
//!
//! **Writes are atomic**: a temporary file of a random name, created exclusively in the
//! cache's folder, written, flushed to disk, renamed over the cache, and the folder flushed; a
//! reader never sees half a file. Errors name the user's paths (the cache, its lock file or
//! its folder), never the temporary file's.
//!
//! **No file is opened through a symbolic link** (on Unix): the temporary file is created
//! exclusively (`O_CREAT | O_EXCL`, which never follows a link), the lock file is opened with
//! `O_NOFOLLOW`, and a cache path that is a link is refused by the read that precedes every
//! write (`rotq_reference::tuned::read`); a link at the cache or lock path is an error naming
//! it, and nothing is created where it points. Writing through a link would put the file
//! wherever anyone who can write the folder (a shared cache folder) points it; replacing the
//! link by a file would silently cut the user's link. A cache kept elsewhere is named by its
//! own path (`ROTQ_TUNE_CACHE`). Off Unix the temporary file is still created exclusively,
//! but a link put at the lock path between its check and its open is followed: the guarantee
//! is Unix's.

use rotq_reference::tuned::SCHEMA_VERSION;
use rotq_reference::tuned::{read, CacheFile, Contents, DeviceIdentity, Loaded, TuneFile};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `section`'s entries into the cache at `path` atomically (creating its folder),
/// merged entry by entry under the save lock (see the module docs): this device's other
/// entries, and the other devices' sections, are kept; where the file already has an entry
/// for one of `section`'s `kernel/bucket` keys, `section`'s wins. A file there that is not a
/// cache of this schema, a symbolic link or not a regular file is an error naming it (it is
/// not written over). A caller that saves as it goes (the autotuner, after each task) saves
/// its new entries only: re-saving entries it read earlier would overwrite what another saver
/// wrote for them since.
///
/// ```
/// use rotq_autotune::cache;
/// use rotq_reference::tuned::{DeviceIdentity, Loaded, TuneFile};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("tuned.json");
/// let cpu = DeviceIdentity { name: "cpu: test".into(), compute_capability: None, driver_version: None };
/// let gpu = DeviceIdentity { name: "gpu: test".into(), compute_capability: Some((9, 0)), driver_version: Some(13000) };
/// // Two savers at once (threads here; separate processes alike): neither section is lost.
/// std::thread::scope(|s| {
///     let a = s.spawn(|| cache::save(&TuneFile::new(cpu.clone()), &path));
///     let b = s.spawn(|| cache::save(&TuneFile::new(gpu.clone()), &path));
///     a.join().unwrap().and(b.join().unwrap())
/// })?;
/// assert!(matches!(TuneFile::peek(&path, &cpu), Loaded::Usable(_)));
/// assert!(matches!(TuneFile::peek(&path, &gpu), Loaded::Usable(_)));
/// assert!(dir.path().join("tuned.json.lock").exists(), "the lock file stays");
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn save(section: &TuneFile, path: &Path) -> std::io::Result<()> {
    save_with(section, path, || {})
}

/// [`save`], calling `waiting` first if another saver holds the lock (so that a caller can
/// say why it waits).
///
/// ```
/// use rotq_reference::tuned::{DeviceIdentity, TuneFile};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("tuned.json");
/// let cpu = DeviceIdentity { name: "cpu: test".into(), compute_capability: None, driver_version: None };
/// rotq_autotune::cache::save_with(&TuneFile::new(cpu), &path, || eprintln!("waiting for another save"))?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn save_with(section: &TuneFile, path: &Path, waiting: impl FnOnce()) -> std::io::Result<()> {
    SaveLock::acquire(path, waiting)?.save(section)
}

/// Reads `device`'s section of the cache at `path`, as `TuneFile::peek` does, but moves a
/// corrupt file aside to a free `<name>.corrupt…` name (what the autotuner does before
/// writing anew), under the save lock, after reading it again there (see the module docs).
/// If the lock cannot be taken, the file stays where it is (`kept_at: None`).
///
/// ```
/// use rotq_reference::tuned::{DeviceIdentity, Loaded};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("tuned.json");
/// std::fs::write(&path, "not json")?;
/// let cpu = DeviceIdentity { name: "cpu: test".into(), compute_capability: None, driver_version: None };
/// let Loaded::Corrupt { kept_at: Some(aside), .. } = rotq_autotune::cache::load(&path, &cpu) else {
///     panic!("moved aside")
/// };
/// assert_eq!(std::fs::read_to_string(aside)?, "not json");
/// assert!(!path.exists());
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn load(path: &Path, device: &DeviceIdentity) -> Loaded {
    load_with(path, device, || {})
}

/// [`load`], calling `waiting` first if it must move a corrupt file aside and another saver
/// holds the lock.
pub fn load_with(path: &Path, device: &DeviceIdentity, waiting: impl FnOnce()) -> Loaded {
    let found = TuneFile::peek(path, device);
    if !matches!(found, Loaded::Corrupt { .. }) {
        return found;
    }
    match SaveLock::acquire(path, waiting) {
        Ok(lock) => lock.load(device),
        Err(_) => found,
    }
}

/// Moves a file of another schema at `path` aside to a free `<name>.replaced…` name, under
/// the save lock, after reading it again there: if it is gone, or is now a cache of this
/// schema (another run replaced it first), nothing is moved, and saves merge into it. Returns
/// where it went. Calls `waiting` first if another saver holds the lock.
///
/// ```
/// use rotq_autotune::cache;
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("tuned.json");
/// std::fs::write(&path, r#"{"schema": 2, "devices": []}"#)?;
/// let aside = cache::replace_foreign(&path, || {})?.expect("moved");
/// assert!(aside.ends_with("tuned.json.replaced") && !path.exists());
/// assert_eq!(cache::replace_foreign(&path, || {})?, None, "nothing left to move");
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn replace_foreign(path: &Path, waiting: impl FnOnce()) -> std::io::Result<Option<PathBuf>> {
    SaveLock::acquire(path, waiting)?.replace_foreign()
}

/// Checks that [`save`] could write the cache at `path`, changing nothing but creating its
/// folder and lock file (which stays: see the module docs): the lock file can be opened and
/// locked (or another saver holds it, and will let it go: this never waits), a temporary file
/// created beside the cache (and removed at once), and whatever is at `path` is absent or a
/// cache of this schema. The error names the path at fault. The autotuner asks before it
/// tunes anything, so that a cache it cannot write costs no work.
///
/// ```
/// use rotq_autotune::cache;
/// let dir = tempfile::tempdir()?;
/// cache::check_writable(&dir.path().join("tuned.json"))?;
/// std::fs::write(dir.path().join("x.json"), "not a cache")?;
/// assert!(cache::check_writable(&dir.path().join("x.json")).is_err());
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn check_writable(path: &Path) -> std::io::Result<()> {
    // Lockable: a lock another saver holds now will be let go (no need to wait for it).
    let (lock, lock_path) = open_lock(path)?;
    match lock.try_lock() {
        Ok(()) | Err(std::fs::TryLockError::WouldBlock) => {}
        Err(std::fs::TryLockError::Error(e)) => return Err(in_context(e, &lock_path, "locking")),
    }
    read_ours(path)?;
    temp_beside(path).map(drop)
}

/// The exclusive save lock of one cache file (see the module docs), held until dropped: the
/// steps of [`save`], [`load`] and [`replace_foreign`] for a caller that must know when it
/// holds the lock.
///
/// ```
/// use rotq_autotune::cache::SaveLock;
/// use rotq_reference::tuned::{DeviceIdentity, TuneFile};
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

    /// [`save`]'s read-merge-write of `section`, under this lock.
    pub fn save(&self, section: &TuneFile) -> std::io::Result<()> {
        let path = &self.path;
        let mut file = read_ours(path)?.unwrap_or_else(|| CacheFile::new(Vec::new()));
        match file.devices.iter_mut().find(|s| s.device == section.device) {
            // Entry by entry: this section's win, the file's others stay.
            Some(ours) => ours.entries.extend(section.entries.clone()),
            None => file.devices.push(section.clone()),
        }
        write_atomically(path, file.to_json().as_bytes())
    }

    /// [`load`], under this lock: reads the file again and moves it aside if it is corrupt.
    pub fn load(&self, device: &DeviceIdentity) -> Loaded {
        match TuneFile::peek(&self.path, device) {
            Loaded::Corrupt { reason, .. } => Loaded::Corrupt {
                reason,
                kept_at: move_aside(&self.path, "corrupt").ok(),
            },
            other => other,
        }
    }

    /// [`replace_foreign`], under this lock.
    pub fn replace_foreign(&self) -> std::io::Result<Option<PathBuf>> {
        match read(&self.path)? {
            Contents::Foreign { .. } => move_aside(&self.path, "replaced").map(Some),
            Contents::Missing | Contents::Ours(_) | Contents::Corrupt { .. } => Ok(None),
        }
    }
}

/// Moves the file at `path` to the first free name of `<name>.<what>`, `<name>.<what>.1`,
/// `.2`, …, never over anything there: a hard link to the new name, which fails if it is
/// taken (by anything, a dangling link included), then the old name removed. (A rename would
/// replace a file created at the new name after it was seen free.) Returns the new path.
/// Called under the save lock only, after reading the file there again.
fn move_aside(path: &Path, what: &str) -> std::io::Result<PathBuf> {
    let mut n = 0u64;
    loop {
        let mut name = path.as_os_str().to_os_string();
        name.push(format!(".{what}"));
        if n > 0 {
            name.push(format!(".{n}"));
        }
        let aside = PathBuf::from(name);
        match std::fs::hard_link(path, &aside) {
            Ok(()) => {
                std::fs::remove_file(path).map_err(|e| in_context(e, path, "removing"))?;
                return Ok(aside);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
            Err(e) => {
                let (from, to) = (path.display(), aside.display());
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("moving {from} aside to {to}: {e}"),
                ));
            }
        }
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
    let file =
        open_no_follow(&mut options, &lock_path).map_err(|e| refused_or(e, &lock_path, what))?;
    check_regular(&file, &lock_path, what)?;
    Ok((file, lock_path))
}

/// The cache at `path` if it is one of this schema, `None` if there is none; an error
/// naming `path` for anything else there (a saver does not write over it).
fn read_ours(path: &Path) -> std::io::Result<Option<CacheFile>> {
    let why = match read(path)? {
        Contents::Missing => return Ok(None),
        Contents::Ours(file) => return Ok(Some(file)),
        Contents::Foreign { schema } => format!("schema {schema}"),
        Contents::Corrupt { reason } => reason,
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
/// blocking on a FIFO: what is not a regular file is refused after opening). Off Unix, a link
/// is refused when checked just before the open (one put there in between is followed).
fn open_no_follow(options: &mut OpenOptions, path: &Path) -> std::io::Result<File> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    }
    #[cfg(not(unix))]
    if path.symlink_metadata().is_ok_and(|m| m.is_symlink()) {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    options.open(path)
}

/// The error of opening `path` (`what`): a clear refusal when a symbolic link is there.
fn refused_or(e: std::io::Error, path: &Path, what: &str) -> std::io::Error {
    if path.symlink_metadata().is_ok_and(|m| m.is_symlink()) {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{}: {what} is a symbolic link; rotq opens it only as a regular file, never \
                 through a link (remove the link)",
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

/// Replaces the file at `path` by `bytes` atomically: a temporary file of a random name,
/// created exclusively in the same folder, written and flushed, renamed over `path`, then the
/// folder flushed so that the rename survives a crash. Errors name `path`, not the temporary
/// file; on an error the temporary file is removed.
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

/// Random characters in a temporary file's name (tempfile's default).
const RANDOM_CHARS: usize = 6;

/// A new temporary file of a random name beside `path` (`.<name>.<random>.tmp`), created
/// exclusively, removed when dropped unless persisted. Errors name `path`.
fn temp_beside(path: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    temp_beside_with(path, RANDOM_CHARS)
}

/// [`temp_beside`] with `random_chars` random characters in the name (with none, the name is
/// `.<name>..tmp` and tried once: how the tests plant a link at exactly that name).
fn temp_beside_with(path: &Path, random_chars: usize) -> std::io::Result<tempfile::NamedTempFile> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .rand_bytes(random_chars)
        .make_in(folder_of(path), create_exclusive)
        .map_err(|e| in_context(e, path, "creating a temporary file beside"))
}

/// Creates the file `path` for writing, failing if anything is there: `O_CREAT | O_EXCL`
/// (Windows: `CREATE_NEW`), which never follows a symbolic link, so a link planted at a
/// temporary name is an error, not a write to wherever it points.
fn create_exclusive(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

/// Flushes `folder`'s entries to disk (a rename lives in the folder). File systems that cannot
/// flush a folder say so, and are let be. (Off Unix a folder cannot be opened as a file, and
/// the rename is left to the system.)
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

// (Links as Unix has them.)
#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// A symbolic link planted at exactly the name a temporary file gets is not followed: the
    /// create fails (the name is taken) and the file the link points to is untouched. (The
    /// name is made deterministic by asking for no random characters; with them, a planted
    /// name is only hit by chance, which this test could not see.)
    #[test]
    fn a_symlink_at_the_temporary_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let path = dir.path().join("tuned.json");
        let planted = dir.path().join(".tuned.json..tmp");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let e = temp_beside_with(&path, 0).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(planted.symlink_metadata().unwrap().is_symlink());
        // The same name, free: created, and it is the name the link was planted at.
        std::fs::remove_file(&planted).unwrap();
        let tmp = temp_beside_with(&path, 0).unwrap();
        assert_eq!(tmp.path(), planted);
    }
}
