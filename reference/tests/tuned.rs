//! The tuning cache's reading (the writer, `rotq_autotune::cache`, is tested with it in
//! autotune/tests/cache.rs): what the schema writes reads back, what is not a cache of this
//! schema is reported and left as it is, links and other files are refused.

use rotq_reference::tuned::{
    bucket, read, CacheFile, Contents, DeviceIdentity, Loaded, TuneFile, TunedEntry, SCHEMA_VERSION,
};

fn device(name: &str) -> DeviceIdentity {
    DeviceIdentity {
        name: name.into(),
        compute_capability: Some((9, 0)),
        driver_version: Some(13000),
    }
}

/// A section of `name` with one entry.
fn section(name: &str) -> TuneFile {
    let mut f = TuneFile::new(device(name));
    f.insert(
        "fwht",
        &bucket(&[("n", 100)]),
        TunedEntry {
            config: serde_json::json!({"rows": 4}),
            source_hash: "hash1".into(),
            default_ms: 2.0,
            tuned_ms: 1.5,
            tried: 12,
            rejected: 1,
        },
    );
    f
}

#[test]
fn buckets_round_up_to_powers_of_two() {
    assert_eq!(bucket(&[("d", 128), ("n_kv", 32768)]), "d=128,n_kv=32768");
    assert_eq!(bucket(&[("d", 80), ("n_kv", 0)]), "d=128,n_kv=1");
    assert_eq!(bucket(&[("n", usize::MAX)]), format!("n={}", usize::MAX));
}

/// The file as the schema writes it reads back whole; a device with no section is told which
/// devices have one; what is not a cache of this schema is reported as such, and every read
/// leaves the file as it was.
#[test]
fn reading_reports_what_is_there_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    assert!(matches!(read(&path).unwrap(), Contents::Missing));
    assert!(matches!(
        TuneFile::peek(&path, &device("gpu A")),
        Loaded::Missing
    ));
    let file = CacheFile::new(vec![section("gpu A"), section("gpu B")]);
    std::fs::write(&path, file.to_json()).unwrap();
    assert!(matches!(read(&path).unwrap(), Contents::Ours(f) if f == file));
    match TuneFile::peek(&path, &device("gpu B")) {
        Loaded::Usable(f) => assert_eq!(f, section("gpu B")),
        other => panic!("{other:?}"),
    }
    match TuneFile::peek(&path, &device("gpu C")) {
        Loaded::OtherDevices { devices } => assert_eq!(devices, ["gpu A", "gpu B"]),
        other => panic!("{other:?}"),
    }
    let newer = format!(r#"{{"schema": {}, "devices": 7}}"#, SCHEMA_VERSION + 1);
    let cases: [(&[u8], &str); 5] = [
        (newer.as_bytes(), "foreign"),
        (b"{ \"schema\": 3, truncated", "corrupt"),
        (b"{}", "corrupt"),
        (&[0xff, 0xfe, 0x00], "corrupt"),
        (br#"{"schema": 3, "devices": [{"device": {}}]}"#, "corrupt"),
    ];
    for (bytes, kind) in cases {
        std::fs::write(&path, bytes).unwrap();
        let found = TuneFile::peek(&path, &device("gpu A"));
        match (&found, read(&path).unwrap(), kind) {
            (Loaded::Foreign { .. }, Contents::Foreign { schema }, "foreign") => {
                assert_eq!(schema, u64::from(SCHEMA_VERSION) + 1)
            }
            (Loaded::Corrupt { reason, kept_at }, Contents::Corrupt { .. }, "corrupt") => {
                assert!(reason.contains(&path.display().to_string()), "{reason}");
                assert!(kept_at.is_none(), "reading moves nothing");
            }
            (_, contents, _) => panic!("{kind}: {found:?}, {contents:?}"),
        }
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "left as it was");
    }
    // A folder in the way: unreadable, not a regular file.
    match TuneFile::peek(dir.path(), &device("gpu A")) {
        Loaded::Unreadable { reason } => assert!(reason.contains("not a regular file"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

/// A file far larger than any cache (1 GiB, sparse) is corrupt after reading at most 16 MiB.
#[test]
fn an_oversized_file_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    match read(&path).unwrap() {
        Contents::Corrupt { reason } => assert!(reason.contains("larger than 16 MiB"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

/// A link at the cache path (to a cache, or dangling) is refused, naming the path, and a FIFO
/// is refused without waiting for a writer.
#[cfg(unix)] // links and FIFOs as Unix has them
#[test]
fn links_and_fifos_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.json");
    std::fs::write(&real, CacheFile::new(vec![section("gpu A")]).to_json()).unwrap();
    let link = dir.path().join("tuned.json");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let dangling = dir.path().join("dangling.json");
    std::os::unix::fs::symlink(dir.path().join("gone"), &dangling).unwrap();
    for path in [&link, &dangling] {
        let e = read(path).unwrap_err().to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("symbolic link"),
            "{e}"
        );
        match TuneFile::peek(path, &device("gpu A")) {
            Loaded::Unreadable { reason } => assert!(reason.contains("symbolic link"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
    let fifo = dir.path().join("fifo.json");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if made.is_ok_and(|s| s.success()) {
        let e = read(&fifo).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
