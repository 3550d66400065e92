//! Raw little-endian files: read and written in bounded chunks, written atomically, never over
//! the input.
//!
//! Where an output goes depends on what its path is:
//!
//! - a regular file, or nothing yet: a temporary file with a random name is created exclusively
//!   in the destination's folder, written, fsynced, renamed over the destination, and the folder
//!   is fsynced. A failure at any point leaves the destination as it was (never half of a new
//!   file; a process killed before the rename leaves its hidden `.rotq-*` temporary). The new
//!   file has the permissions of the file it replaces, or 0666 less the umask, as
//!   `File::create` gives. A symlink at the destination is replaced by the new file; its target
//!   is not written.
//! - a character device or a FIFO (`/dev/null`, a named pipe): it cannot be replaced atomically
//!   and must not be replaced at all (a device file turned into a regular file breaks whatever
//!   uses it), so it is opened and written directly, like `-` (standard output). What was
//!   written stays there when a command fails, and the error says it is incomplete.
//! - anything else (a folder, a block device, a socket): refused.
//!
//! An output that is the input (the same path, or another path to the same file: a symlink, a
//! hard link, `./x` for `x`, standard input or output redirected from or to the input file) is
//! refused before anything is read or written. Errors name the paths as the user gave them,
//! never a temporary file's.

use crate::Error;
use std::fs::{File, Metadata};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

/// Bytes a file command reads, converts or writes at a time. The buffers of one chunk (input,
/// values, output) bound the memory of `quantize`, `dequantize` and `rotate`, whatever the
/// size of the file.
pub const CHUNK_BYTES: usize = 4 << 20;

/// The path that means standard input (for `--input`) or standard output (for `--output`).
pub const STDIO: &str = "-";

/// How errors name standard input and output.
const STDIN_NAME: &str = "standard input";
const STDOUT_NAME: &str = "standard output";

fn is_stdio(path: &Path) -> bool {
    path.as_os_str() == STDIO
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Which file an open file or path is: device and inode on Unix (equal for every path to one
/// file: symlinks, hard links, `./x`); elsewhere only canonical paths are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    #[cfg(unix)]
    fn of(m: &Metadata) -> Option<FileId> {
        use std::os::unix::fs::MetadataExt;
        Some(FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    #[cfg(not(unix))]
    fn of(_: &Metadata) -> Option<FileId> {
        None
    }
}

/// What standard input or output is connected to, when that can be known.
#[cfg(unix)]
fn stdio_metadata(fd: std::os::fd::BorrowedFd<'_>) -> Option<Metadata> {
    let owned = fd.try_clone_to_owned().ok()?;
    File::from(owned).metadata().ok()
}

#[cfg(unix)]
fn stdin_metadata() -> Option<Metadata> {
    use std::os::fd::AsFd;
    stdio_metadata(std::io::stdin().as_fd())
}

#[cfg(unix)]
fn stdout_metadata() -> Option<Metadata> {
    use std::os::fd::AsFd;
    stdio_metadata(std::io::stdout().as_fd())
}

#[cfg(not(unix))]
fn stdin_metadata() -> Option<Metadata> {
    None
}

#[cfg(not(unix))]
fn stdout_metadata() -> Option<Metadata> {
    None
}

/// A file being read from start to end: a file, or standard input for `-`.
///
/// ```
/// use rotq_cli::io::Input;
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("x.bin");
/// std::fs::write(&path, b"abcdef").unwrap();
/// let mut input = Input::open(&path).unwrap();
/// assert_eq!(input.len(), Some(6));
/// let mut buf = [0u8; 4];
/// assert_eq!(input.read_chunk(&mut buf).unwrap(), 4);
/// assert_eq!(input.read_chunk(&mut buf).unwrap(), 2);
/// assert_eq!(input.read_chunk(&mut buf).unwrap(), 0);
/// ```
pub struct Input {
    name: PathBuf,
    reader: Box<dyn Read>,
    len: Option<u64>,
    id: Option<FileId>,
    canonical: Option<PathBuf>,
    stdin: bool,
}

impl Input {
    /// Opens `path` (`-`: standard input). Nothing is read yet.
    pub fn open(path: &Path) -> Result<Input, Error> {
        if is_stdio(path) {
            // Standard input may be a file read from an offset: its length says nothing about
            // what is left to read, so it is only known at the end.
            let id = stdin_metadata()
                .filter(Metadata::is_file)
                .and_then(|m| FileId::of(&m));
            return Ok(Input {
                name: PathBuf::from(STDIN_NAME),
                reader: Box::new(std::io::stdin().lock()),
                len: None,
                id,
                canonical: None,
                stdin: true,
            });
        }
        let file = File::open(path).map_err(io_error(path))?;
        let meta = file.metadata().map_err(io_error(path))?;
        if meta.is_dir() {
            return Err(Error::Input(format!(
                "{}: is a folder, not a file",
                path.display()
            )));
        }
        Ok(Input {
            name: path.to_path_buf(),
            len: meta.is_file().then_some(meta.len()),
            id: if meta.is_file() {
                FileId::of(&meta)
            } else {
                None
            },
            canonical: std::fs::canonicalize(path).ok(),
            stdin: false,
            reader: Box::new(file),
        })
    }

    /// The input as errors name it: the path given, or `standard input`.
    pub fn name(&self) -> &Path {
        &self.name
    }

    /// The size of a regular file, known before reading; `None` for a pipe or a device.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> Option<u64> {
        self.len
    }

    /// Fills `buf` as far as the input goes; returns the bytes read (less than `buf.len()`
    /// only at the end of the input).
    pub fn read_chunk(&mut self, buf: &mut [u8]) -> Result<usize, Error> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(&self.name)(e)),
            }
        }
        Ok(filled)
    }
}

/// A file being written: atomically to a regular file, directly to standard output (`-`), a
/// character device or a FIFO (see the module's documentation).
///
/// ```
/// use rotq_cli::io::{Input, Output};
/// let dir = tempfile::tempdir().unwrap();
/// let (x, y) = (dir.path().join("x"), dir.path().join("y"));
/// std::fs::write(&x, b"in").unwrap();
/// let input = Input::open(&x).unwrap();
/// let mut out = Output::create(&y, &input).unwrap();
/// out.write_all(b"out").unwrap();
/// assert!(!y.exists()); // nothing there until commit
/// out.commit().unwrap();
/// assert_eq!(std::fs::read(&y).unwrap(), b"out");
/// // The input itself, by another path, is refused.
/// let same = dir.path().join(".").join("x");
/// assert!(Output::create(&same, &input).is_err());
/// ```
pub struct Output {
    name: PathBuf,
    sink: Sink,
    /// Whether bytes went to a sink that keeps them whatever happens next (not an atomic one).
    written_directly: bool,
}

enum Sink {
    /// A temporary file, renamed over the destination on commit.
    Atomic(AtomicFile),
    /// A character device or FIFO, written directly.
    Direct(File),
    Stdout(std::io::StdoutLock<'static>),
}

impl Output {
    /// Prepares the output `path` (`-`: standard output) for the data read from `input`:
    /// refuses the input itself and paths that are neither regular files, character devices
    /// nor FIFOs; creates the temporary file of an atomic write.
    pub fn create(path: &Path, input: &Input) -> Result<Output, Error> {
        let refuse_input = |output: String| {
            let input = if input.stdin {
                STDIN_NAME.to_string()
            } else {
                format!("--input {}", input.name.display())
            };
            Error::Input(format!(
                "{output} is the same file as {input}: refusing to overwrite the input"
            ))
        };
        if is_stdio(path) {
            let meta = stdout_metadata();
            if let Some(m) = meta.filter(Metadata::is_file) {
                if input.id.is_some() && FileId::of(&m) == input.id {
                    return Err(refuse_input(STDOUT_NAME.to_string()));
                }
            }
            return Ok(Output {
                name: PathBuf::from(STDOUT_NAME),
                sink: Sink::Stdout(std::io::stdout().lock()),
                written_directly: false,
            });
        }
        // Follows symlinks: what the path leads to decides (a symlink itself is replaced).
        let meta = match std::fs::metadata(path) {
            Ok(m) => Some(m),
            // Nothing there (or a dangling symlink): a new file.
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(io_error(path)(e)),
        };
        if let Some(m) = &meta {
            let same_id = m.is_file() && input.id.is_some() && FileId::of(m) == input.id;
            let same_path =
                input.canonical.is_some() && std::fs::canonicalize(path).ok() == input.canonical;
            if same_id || same_path {
                return Err(refuse_input(format!("--output {}", path.display())));
            }
        }
        let sink = match meta {
            None => Sink::Atomic(AtomicFile::new(path)?),
            Some(m) if m.is_file() => Sink::Atomic(AtomicFile::new(path)?),
            Some(m) if m.is_dir() => {
                return Err(Error::Input(format!(
                    "--output {}: is a folder, not a file",
                    path.display()
                )))
            }
            Some(m) if is_stream(&m) => {
                // No create, no truncate: the device or FIFO that is there is written.
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io_error(path))?;
                Sink::Direct(file)
            }
            Some(_) => {
                return Err(Error::Input(format!(
                    "--output {}: neither a regular file, a character device nor a FIFO; \
                     rotq writes only those (or - for standard output)",
                    path.display()
                )))
            }
        };
        Ok(Output {
            name: path.to_path_buf(),
            sink,
            written_directly: false,
        })
    }

    /// The output as errors name it: the path given, or `standard output`.
    pub fn name(&self) -> &Path {
        &self.name
    }

    /// Writes all of `bytes`.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let result = match &mut self.sink {
            Sink::Atomic(f) => return f.write_all(bytes),
            Sink::Direct(f) => f.write_all(bytes),
            Sink::Stdout(s) => s.write_all(bytes),
        };
        // Even a write that fails may have written some of the bytes.
        self.written_directly |= !bytes.is_empty();
        result.map_err(io_error(&self.name))
    }

    /// Completes the output: renames an atomic write into place, flushes the others.
    pub fn commit(self) -> Result<(), Error> {
        let Output {
            name,
            sink,
            written_directly,
        } = self;
        let result = match sink {
            Sink::Atomic(f) => return f.commit(),
            Sink::Direct(mut f) => f.flush(),
            Sink::Stdout(mut s) => s.flush(),
        };
        result.map_err(|e| incomplete(io_error(&name)(e), &name, written_directly))
    }

    /// Abandons the output after `error`, and returns the error to report: an atomic output is
    /// discarded (its destination stays as it was); standard output, a device or a FIFO keeps
    /// what was written, and once anything was, the error says that it is incomplete.
    ///
    /// ```
    /// use rotq_cli::{io::{Input, Output}, Error};
    /// let dir = tempfile::tempdir().unwrap();
    /// let (x, y) = (dir.path().join("x"), dir.path().join("y"));
    /// std::fs::write(&x, b"in").unwrap();
    /// let mut out = Output::create(&y, &Input::open(&x).unwrap()).unwrap();
    /// out.write_all(b"half").unwrap();
    /// let e = out.fail(Error::Input("bad input".into()));
    /// assert_eq!(e.to_string(), "bad input"); // nothing at y: nothing incomplete
    /// assert!(std::fs::read_dir(dir.path()).unwrap().count() == 1);
    /// ```
    pub fn fail(self, error: Error) -> Error {
        incomplete(error, &self.name, self.written_directly)
    }
}

/// `error`, saying that what `output` has is incomplete when anything was `written` to it.
fn incomplete(error: Error, output: &Path, written: bool) -> Error {
    if !written {
        return error;
    }
    Error::Input(format!(
        "{error}; what was written to {} is incomplete",
        output.display()
    ))
}

#[cfg(unix)]
fn is_stream(m: &Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    m.file_type().is_char_device() || m.file_type().is_fifo()
}

#[cfg(not(unix))]
fn is_stream(_: &Metadata) -> bool {
    false
}

/// A file written to a temporary in its folder and renamed into place by [`AtomicFile::commit`];
/// dropped without a commit, the temporary is removed and the destination left as it was.
///
/// The new file has the permissions of the file it replaces, or, for a new file, those
/// `File::create` would give it: 0666 less the umask (0644 under the usual umask 022).
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("out.bin");
/// let mut f = rotq_cli::io::AtomicFile::new(&path).unwrap();
/// f.write_all(b"abc").unwrap();
/// f.commit().unwrap();
/// assert_eq!(std::fs::read(&path).unwrap(), b"abc");
/// ```
pub struct AtomicFile {
    path: PathBuf,
    tmp: tempfile::NamedTempFile,
}

impl AtomicFile {
    /// Creates the temporary file (random name, exclusive create, in `path`'s folder), with
    /// the permissions the file will have (see the type's documentation).
    pub fn new(path: &Path) -> Result<AtomicFile, Error> {
        let err = io_error(path);
        // Read now, so that the data is never readable by more than the replaced file was.
        let replaced = std::fs::metadata(path)
            .ok()
            .filter(Metadata::is_file)
            .map(|m| m.permissions());
        // Created here rather than by `tempfile_in`, whose errors name the temporary file: the
        // user never named it, so errors name `path`.
        let tmp = tempfile::Builder::new()
            .prefix(".rotq-")
            .make_in(folder_of(path), |tmp| create_new(tmp, replaced.is_none()))
            .map_err(&err)?;
        if let Some(permissions) = replaced {
            tmp.as_file().set_permissions(permissions).map_err(&err)?;
        }
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
        })
    }

    /// Appends `bytes` to the temporary file.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.tmp
            .as_file_mut()
            .write_all(bytes)
            .map_err(io_error(&self.path))
    }

    /// Syncs the file, renames it over the destination and syncs the folder.
    pub fn commit(self) -> Result<(), Error> {
        let err = io_error(&self.path);
        self.tmp.as_file().sync_all().map_err(&err)?;
        self.tmp.persist(&self.path).map_err(|e| err(e.error))?;
        sync_folder(folder_of(&self.path)).map_err(&err)
    }
}

/// Creates the file `path`, failing if anything (a symlink included) is there. `public`: with
/// the mode `File::create` uses, 0666, which the system reduces by the umask (a new file);
/// else private to the owner until its permissions are set (a file that replaces another).
fn create_new(path: &Path, public: bool) -> std::io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if public { 0o666 } else { 0o600 });
    }
    #[cfg(not(unix))]
    let _ = public;
    options.open(path)
}

/// The folder a path's file is in (`.` for a bare name).
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Makes a rename in `dir` durable.
#[cfg(unix)]
fn sync_folder(dir: &Path) -> std::io::Result<()> {
    match File::open(dir).and_then(|d| d.sync_all()) {
        // Some file systems cannot sync a folder; the rename is done all the same.
        Err(e) if matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::Unsupported) => Ok(()),
        other => other,
    }
}

#[cfg(not(unix))]
fn sync_folder(_: &Path) -> std::io::Result<()> {
    Ok(())
}

/// Reads a whole file (for files that are small by nature: activation dumps are read into
/// memory anyway; the file commands stream instead).
pub fn read_bytes(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(io_error(path))
}

/// Reads a whole file of little-endian f32 values.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("x.f32");
/// rotq_cli::io::write_f32_atomic(&path, &[1.5, -2.0]).unwrap();
/// assert_eq!(rotq_cli::io::read_f32(&path).unwrap(), vec![1.5, -2.0]);
/// ```
pub fn read_f32(path: &Path) -> Result<Vec<f32>, Error> {
    let bytes = read_bytes(path)?;
    if bytes.len() % 4 != 0 {
        return Err(Error::Input(format!(
            "{}: {} bytes is not a whole number of f32 values",
            path.display(),
            bytes.len()
        )));
    }
    Ok(decode_f32(&bytes).collect())
}

/// The little-endian f32 values of `bytes` (a trailing part of a value is ignored).
///
/// ```
/// let bytes = [0, 0, 0xc0, 0x3f, 0, 0, 0, 0xc0];
/// let values: Vec<f32> = rotq_cli::io::decode_f32(&bytes).collect();
/// assert_eq!(values, [1.5, -2.0]);
/// ```
pub fn decode_f32(bytes: &[u8]) -> impl ExactSizeIterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// Writes `values` little-endian into `out`, which is resized to hold exactly them (a buffer
/// reused chunk after chunk).
///
/// ```
/// let mut out = vec![9; 100];
/// rotq_cli::io::encode_f32([1.5f32, -2.0].into_iter(), &mut out);
/// assert_eq!(out, [0, 0, 0xc0, 0x3f, 0, 0, 0, 0xc0]);
/// ```
pub fn encode_f32(values: impl ExactSizeIterator<Item = f32>, out: &mut Vec<u8>) {
    out.resize(values.len() * 4, 0);
    for (o, v) in out.chunks_exact_mut(4).zip(values) {
        o.copy_from_slice(&v.to_le_bytes());
    }
}

/// Writes `bytes` to `path` atomically (see [`AtomicFile`]), with the replaced file's
/// permissions, or as `File::create` would make a new file (0666 less the umask).
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("out.bin");
/// rotq_cli::io::write_atomic(&path, b"abc").unwrap();
/// assert_eq!(std::fs::read(&path).unwrap(), b"abc");
/// #[cfg(unix)]
/// {
///     use std::os::unix::fs::PermissionsExt;
///     let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode();
///     std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
///     rotq_cli::io::write_atomic(&path, b"new").unwrap();
///     assert_eq!(mode(&path) & 0o777, 0o640); // the replaced file's
/// }
/// ```
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut file = AtomicFile::new(path)?;
    file.write_all(bytes)?;
    file.commit()
}

/// Writes f32 values little-endian, atomically.
pub fn write_f32_atomic(path: &Path, values: &[f32]) -> Result<(), Error> {
    let mut bytes = Vec::new();
    encode_f32(values.iter().copied(), &mut bytes);
    write_atomic(path, &bytes)
}

/// Whether two paths name one existing file (the same device and inode on Unix, so through
/// symlinks, hard links and `./x`; elsewhere the same canonical path).
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let a = dir.path().join("a");
/// std::fs::write(&a, b"x").unwrap();
/// assert!(rotq_cli::io::same_file(&a, &dir.path().join(".").join("a")));
/// assert!(!rotq_cli::io::same_file(&a, &dir.path().join("b")));
/// ```
pub fn same_file(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) else {
        return false;
    };
    match (FileId::of(&ma), FileId::of(&mb)) {
        (Some(x), Some(y)) => x == y,
        _ => std::fs::canonicalize(a).ok() == std::fs::canonicalize(b).ok(),
    }
}
