//! Raw little-endian files and atomic writes.
//!
//! Every file rotq writes goes to a temporary file in the destination's folder first and is
//! renamed over the destination only once complete, so a failure never leaves a partial or
//! truncated output behind (and never clobbers an existing file with half of a new one).

use crate::Error;
use std::io::Write;
use std::path::Path;

/// Reads a whole file.
pub fn read_bytes(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a file of little-endian f32 values.
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
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Writes `bytes` to `path` atomically (temporary file in the same folder, then rename), with
/// the replaced file's permissions, or 0644 for a new file.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("out.bin");
/// rotq_cli::io::write_atomic(&path, b"abc").unwrap();
/// assert_eq!(std::fs::read(&path).unwrap(), b"abc");
/// #[cfg(unix)]
/// {
///     use std::os::unix::fs::PermissionsExt;
///     let mode = std::fs::metadata(&path).unwrap().permissions().mode();
///     assert_eq!(mode & 0o777, 0o644);
/// }
/// ```
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let io_err = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".rotq-")
        .tempfile_in(dir)
        .map_err(io_err)?;
    tmp.write_all(bytes).map_err(io_err)?;
    // A temporary file is private (0600); the output gets the permissions of the file it
    // replaces, or the usual 0644 of a new file.
    match std::fs::metadata(path) {
        Ok(old) => tmp
            .as_file()
            .set_permissions(old.permissions())
            .map_err(io_err)?,
        Err(_) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::Permissions::from_mode(0o644);
                tmp.as_file().set_permissions(mode).map_err(io_err)?;
            }
        }
    }
    tmp.as_file().sync_all().map_err(io_err)?;
    tmp.persist(path).map_err(|e| io_err(e.error))?;
    Ok(())
}

/// Writes f32 values little-endian, atomically.
pub fn write_f32_atomic(path: &Path, values: &[f32]) -> Result<(), Error> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_atomic(path, &bytes)
}
