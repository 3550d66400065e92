//! The tuning cache: round trip, and foreign, stale and corrupt files.

use rotq_reference::tuned::{bucket, DeviceIdentity, Loaded, TuneFile, SCHEMA_VERSION};

fn device(name: &str) -> DeviceIdentity {
    DeviceIdentity {
        name: name.into(),
        compute_capability: Some((9, 0)),
        driver_version: Some(13000),
    }
}

fn sample() -> TuneFile {
    let mut f = TuneFile::new(device("gpu A"), "hash1");
    f.insert(
        "fwht",
        &bucket(&[("n", 100)]),
        &serde_json::json!({"rows": 4}),
        2.0,
        1.5,
        12,
        1,
    );
    f
}

#[test]
fn round_trip_through_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub").join("tuned.json");
    let f = sample();
    f.save(&path).unwrap();
    match TuneFile::load(&path, &device("gpu A"), "hash1") {
        Loaded::Usable(g) => {
            assert_eq!(g, f);
            let c: serde_json::Value = g.config("fwht", "n=128").unwrap();
            assert_eq!(c["rows"], 4);
            assert!(g.config::<serde_json::Value>("fwht", "n=256").is_none());
        }
        other => panic!("{other:?}"),
    }
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
    assert_eq!(names.len(), 1);
}

#[test]
fn other_devices_stale_sections_and_newer_files_are_ignored_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    sample().save(&path).unwrap();
    match TuneFile::load(&path, &device("gpu B"), "hash1") {
        Loaded::OtherDevices { devices } => assert_eq!(devices, ["gpu A"]),
        other => panic!("{other:?}"),
    }
    match TuneFile::load(&path, &device("gpu A"), "hash2") {
        Loaded::Stale { reason } => assert!(reason.contains("hash1"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let newer = format!(r#"{{"schema": {}, "devices": []}}"#, SCHEMA_VERSION + 1);
    std::fs::write(&path, &newer).unwrap();
    assert!(matches!(
        TuneFile::load(&path, &device("gpu A"), "hash1"),
        Loaded::Foreign { .. }
    ));
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        newer,
        "left where it is"
    );
    // Saving over a file of another schema is refused, not done.
    assert!(sample().save(&path).is_err());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), newer);
}

#[test]
fn devices_share_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    let a = sample();
    let mut b = TuneFile::new(device("gpu B"), "hash9");
    b.insert(
        "decode",
        "n=64",
        &serde_json::json!({"splits": 2}),
        1.0,
        0.5,
        3,
        0,
    );
    a.save(&path).unwrap();
    b.save(&path).unwrap();
    // A again, with another entry: B's section stays.
    let mut a2 = a.clone();
    a2.insert(
        "fwht",
        "n=4096",
        &serde_json::json!({"rows": 1}),
        1.0,
        1.0,
        1,
        0,
    );
    a2.save(&path).unwrap();
    match TuneFile::load(&path, &device("gpu A"), "hash1") {
        Loaded::Usable(f) => assert_eq!(f, a2),
        other => panic!("{other:?}"),
    }
    match TuneFile::load(&path, &device("gpu B"), "hash9") {
        Loaded::Usable(f) => assert_eq!(f, b),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_corrupt_file_is_moved_aside_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    std::fs::write(&path, "{ \"schema\": 1, truncated").unwrap();
    match TuneFile::load(&path, &device("gpu A"), "hash1") {
        Loaded::Corrupt {
            kept_at: Some(aside),
            ..
        } => {
            assert_eq!(
                std::fs::read_to_string(aside).unwrap(),
                "{ \"schema\": 1, truncated"
            );
            assert!(!path.exists());
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        TuneFile::load(&path, &device("gpu A"), "hash1"),
        Loaded::Missing
    ));
}

#[test]
fn buckets_round_up_to_powers_of_two() {
    assert_eq!(bucket(&[("d", 128), ("n_kv", 32768)]), "d=128,n_kv=32768");
    assert_eq!(bucket(&[("d", 80), ("n_kv", 0)]), "d=128,n_kv=1");
}

#[test]
fn peek_leaves_a_corrupt_file_and_a_second_one_gets_its_own_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    std::fs::write(&path, [0xffu8, 0xfe, 0x00]).unwrap(); // not even UTF-8
    assert!(matches!(
        TuneFile::peek(&path, &device("gpu A"), "hash1"),
        Loaded::Corrupt { kept_at: None, .. }
    ));
    assert!(path.exists(), "peek moves nothing");
    assert!(matches!(
        TuneFile::load(&path, &device("gpu A"), "hash1"),
        Loaded::Corrupt {
            kept_at: Some(_),
            ..
        }
    ));
    std::fs::write(&path, "{}").unwrap(); // no schema: corrupt too
    match TuneFile::load(&path, &device("gpu A"), "hash1") {
        Loaded::Corrupt {
            kept_at: Some(aside),
            ..
        } => {
            assert!(
                aside.to_string_lossy().ends_with(".corrupt.1"),
                "{}",
                aside.display()
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        std::fs::read(path.with_extension("json.corrupt")).unwrap(),
        [0xffu8, 0xfe, 0x00]
    );
}

#[test]
fn a_newer_schema_with_another_layout_is_foreign_not_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    std::fs::write(
        &path,
        format!(r#"{{"schema": {}, "devices": []}}"#, SCHEMA_VERSION + 1),
    )
    .unwrap();
    assert!(matches!(
        TuneFile::load(&path, &device("gpu A"), "hash1"),
        Loaded::Foreign { .. }
    ));
    assert!(path.exists());
}

#[test]
fn a_folder_in_the_way_is_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        TuneFile::load(dir.path(), &device("gpu A"), "hash1"),
        Loaded::Unreadable { .. }
    ));
}

/// Found by the `tune_cache` fuzz target: JSON with a repeated key read as usable (the last
/// value wins) but could not be saved over. Reading and saving now accept the same files.
#[test]
fn a_file_that_reads_as_usable_can_be_saved_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    let text = r#"{"schema": 2, "devices": [{"device": {"name": "gpu A", "compute_capability": [9, 0], "driver_version": 13000},
        "kernel_hash": "x", "entries": {}, "kernel_hash": "hash1",
        "entries": {"fwht/n=128": {"config": {"rows": 2}, "default_ms": 1.0, "tuned_ms": 0.5, "tried": 1, "rejected": 0}}}]}"#;
    std::fs::write(&path, text).unwrap();
    let f = match TuneFile::peek(&path, &device("gpu A"), "hash1") {
        Loaded::Usable(f) => f,
        other => panic!("{other:?}"),
    };
    f.save(&path).unwrap();
    match TuneFile::load(&path, &device("gpu A"), "hash1") {
        Loaded::Usable(g) => assert_eq!(f, g),
        other => panic!("{other:?}"),
    }
}
