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
fn foreign_stale_and_newer_files_are_ignored_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    sample().save(&path).unwrap();
    assert!(matches!(
        TuneFile::load(&path, &device("gpu B"), "hash1"),
        Loaded::Foreign { .. }
    ));
    match TuneFile::load(&path, &device("gpu A"), "hash2") {
        Loaded::Foreign { reason } => assert!(reason.contains("stale"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let mut newer = sample();
    newer.schema = SCHEMA_VERSION + 1;
    newer.save(&path).unwrap();
    assert!(matches!(
        TuneFile::load(&path, &device("gpu A"), "hash1"),
        Loaded::Foreign { .. }
    ));
    assert!(path.exists(), "a foreign file is left where it is");
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
