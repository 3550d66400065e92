//! The tuning cache's writer, with its reader: round trip, foreign and corrupt files, stale
//! entries, links, savers at once, and files moved aside under the lock.

use rotq_autotune::cache::{self, SaveLock};
use rotq_reference::tuned::{
    bucket, DeviceIdentity, Ignored, Loaded, TuneFile, TunedEntry, SCHEMA_VERSION,
};

fn device(name: &str) -> DeviceIdentity {
    DeviceIdentity {
        name: name.into(),
        compute_capability: Some((9, 0)),
        driver_version: Some(13000),
    }
}

/// The names in `dir`, sorted.
fn folder(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// An entry with `config`, tuned for the kernel sources `hash1`.
fn entry(config: serde_json::Value) -> TunedEntry {
    TunedEntry {
        config,
        source_hash: "hash1".into(),
        default_ms: 2.0,
        tuned_ms: 1.5,
        tried: 12,
        rejected: 1,
    }
}

/// The configuration of `kernel` at `bucket` in `f`, as a kernel of the sources `hash1` that
/// runs any configuration would take it.
fn config(f: &TuneFile, kernel: &str, bucket: &str) -> Option<serde_json::Value> {
    f.entry(kernel, bucket)?.in_force("hash1", |_| true).ok()
}

fn sample() -> TuneFile {
    let mut f = TuneFile::new(device("gpu A"));
    f.insert(
        "fwht",
        &bucket(&[("n", 100)]),
        entry(serde_json::json!({"rows": 4})),
    );
    f
}

#[test]
fn round_trip_through_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub").join("tuned.json");
    let f = sample();
    cache::save(&f, &path).unwrap();
    match cache::load(&path, &device("gpu A")) {
        Loaded::Usable(g) => {
            assert_eq!(g, f);
            assert_eq!(config(&g, "fwht", "n=128").unwrap()["rows"], 4);
            assert!(config(&g, "fwht", "n=256").is_none());
        }
        other => panic!("{other:?}"),
    }
    // No temporary file is left behind: only the cache and its lock file (kept for good).
    assert_eq!(
        folder(path.parent().unwrap()),
        ["tuned.json", "tuned.json.lock"]
    );
}

#[test]
fn other_devices_and_newer_files_are_ignored_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    cache::save(&sample(), &path).unwrap();
    match cache::load(&path, &device("gpu B")) {
        Loaded::OtherDevices { devices } => assert_eq!(devices, ["gpu A"]),
        other => panic!("{other:?}"),
    }
    let newer = format!(r#"{{"schema": {}, "devices": []}}"#, SCHEMA_VERSION + 1);
    std::fs::write(&path, &newer).unwrap();
    assert!(matches!(
        cache::load(&path, &device("gpu A")),
        Loaded::Foreign { .. }
    ));
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        newer,
        "left where it is"
    );
    // Saving over a file of another schema is refused, not done.
    assert!(cache::save(&sample(), &path).is_err());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), newer);
}

#[test]
fn devices_share_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    let a = sample();
    let mut b = TuneFile::new(device("gpu B"));
    b.insert("decode", "n=64", entry(serde_json::json!({"splits": 2})));
    cache::save(&a, &path).unwrap();
    cache::save(&b, &path).unwrap();
    // A again, with another entry: B's section stays.
    let mut a2 = a.clone();
    a2.insert("fwht", "n=4096", entry(serde_json::json!({"rows": 1})));
    cache::save(&a2, &path).unwrap();
    match cache::load(&path, &device("gpu A")) {
        Loaded::Usable(f) => assert_eq!(f, a2),
        other => panic!("{other:?}"),
    }
    match cache::load(&path, &device("gpu B")) {
        Loaded::Usable(f) => assert_eq!(f, b),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_corrupt_file_is_moved_aside_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    std::fs::write(&path, "{ \"schema\": 1, truncated").unwrap();
    match cache::load(&path, &device("gpu A")) {
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
        cache::load(&path, &device("gpu A")),
        Loaded::Missing
    ));
}

#[test]
fn peek_leaves_a_corrupt_file_and_a_second_one_gets_its_own_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    std::fs::write(&path, [0xffu8, 0xfe, 0x00]).unwrap(); // not even UTF-8
    assert!(matches!(
        TuneFile::peek(&path, &device("gpu A")),
        Loaded::Corrupt { kept_at: None, .. }
    ));
    assert!(path.exists(), "peek moves nothing");
    assert!(matches!(
        cache::load(&path, &device("gpu A")),
        Loaded::Corrupt {
            kept_at: Some(_),
            ..
        }
    ));
    std::fs::write(&path, "{}").unwrap(); // no schema: corrupt too
    match cache::load(&path, &device("gpu A")) {
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
        cache::load(&path, &device("gpu A")),
        Loaded::Foreign { .. }
    ));
    assert!(path.exists());
}

#[test]
fn a_folder_in_the_way_is_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        cache::load(dir.path(), &device("gpu A")),
        Loaded::Unreadable { .. }
    ));
}

/// Found by the `tune_cache` fuzz target: JSON with a repeated key read as usable (the last
/// value wins) but could not be saved over. Reading and saving now accept the same files.
#[test]
fn a_file_that_reads_as_usable_can_be_saved_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    let text = r#"{"schema": 3, "devices": [{"device": {"name": "gpu A", "compute_capability": [9, 0], "driver_version": 13000},
        "entries": {},
        "entries": {"fwht/n=128": {"config": {"rows": 2}, "source_hash": "x", "source_hash": "hash1",
            "default_ms": 1.0, "tuned_ms": 0.5, "tried": 1, "rejected": 0}}}]}"#;
    std::fs::write(&path, text).unwrap();
    let f = match TuneFile::peek(&path, &device("gpu A")) {
        Loaded::Usable(f) => f,
        other => panic!("{other:?}"),
    };
    cache::save(&f, &path).unwrap();
    match cache::load(&path, &device("gpu A")) {
        Loaded::Usable(g) => assert_eq!(f, g),
        other => panic!("{other:?}"),
    }
}

/// Rounds each saver runs in the tests of savers at once.
const ROUNDS: usize = 20;

/// Saves `device(name)`'s section at `path` `ROUNDS` times, the entry `k/b` set to the round.
fn save_rounds(path: &std::path::Path, name: &str) {
    let mut f = TuneFile::new(device(name));
    for round in 0..ROUNDS {
        f.insert("k", "b", entry(serde_json::json!({ "round": round })));
        cache::save(&f, path).unwrap_or_else(|e| panic!("{name}, round {round}: {e}"));
    }
}

/// Every saver's section is in the file at `path`, at its last round, and nothing else is
/// left in the folder but the cache and its lock file.
fn assert_every_section_kept(path: &std::path::Path, names: &[String]) {
    for name in names {
        match cache::load(path, &device(name)) {
            Loaded::Usable(f) => {
                assert_eq!(config(&f, "k", "b").unwrap()["round"], ROUNDS - 1, "{name}");
            }
            other => panic!("{name}'s section: {other:?}"),
        }
    }
    assert_eq!(
        folder(path.parent().unwrap()),
        ["tuned.json", "tuned.json.lock"]
    );
}

/// Eight savers, each for another device, saving into one file at once (20 times each; each
/// save opens the lock file itself, so they exclude each other as separate processes would),
/// with a reader peeking all along: no section is lost, and the reader never sees a broken
/// file. Without the lock, sections go missing (a lost update) or saves fail.
#[test]
fn savers_at_once_keep_every_section() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    let names: Vec<String> = (0..8).map(|i| format!("gpu {i}")).collect();
    let start = std::sync::Barrier::new(names.len() + 1);
    std::thread::scope(|s| {
        let savers: Vec<_> = names
            .iter()
            .map(|name| {
                s.spawn(|| {
                    start.wait();
                    save_rounds(&path, name);
                })
            })
            .collect();
        start.wait();
        while !savers.iter().all(|h| h.is_finished()) {
            match TuneFile::peek(&path, &device("gpu 0")) {
                Loaded::Missing | Loaded::OtherDevices { .. } | Loaded::Usable(_) => {}
                other => panic!("a reader saw {other:?}"),
            }
        }
        for h in savers {
            h.join().unwrap();
        }
    });
    assert_every_section_kept(&path, &names);
}

/// Run by [`processes_saving_at_once_keep_every_section`] in child processes (this test
/// binary again); does nothing in an ordinary test run.
#[test]
fn saver_child_process() {
    let (Some(path), Some(name)) = (
        std::env::var_os("ROTQ_TEST_SAVE_PATH"),
        std::env::var("ROTQ_TEST_SAVE_AS").ok(),
    ) else {
        return;
    };
    let path = std::path::PathBuf::from(path);
    // Start together: wait for the parent's go.
    let go = path.with_file_name("go");
    let t0 = std::time::Instant::now();
    while !go.exists() {
        assert!(t0.elapsed().as_secs() < 60, "no go");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    save_rounds(&path, &name);
}

/// Four processes saving their sections into one file at once: none is lost.
#[test]
fn processes_saving_at_once_keep_every_section() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    let names: Vec<String> = (0..4).map(|i| format!("process {i}")).collect();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = names
        .iter()
        .map(|name| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "saver_child_process",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("ROTQ_TEST_SAVE_PATH", &path)
                .env("ROTQ_TEST_SAVE_AS", name)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let go = dir.path().join("go");
    std::fs::write(&go, "").unwrap();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The filter ran the child's one test, not nothing.
        assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
    }
    std::fs::remove_file(go).unwrap();
    assert_every_section_kept(&path, &names);
}

/// A lock path that is a symbolic link is refused with an error naming it; nothing is
/// created or changed where it points.
#[cfg(unix)] // links and FIFOs as Unix has them
#[test]
fn a_lock_path_that_is_a_symlink_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    let lock = dir.path().join("tuned.json.lock");
    let target = dir.path().join("elsewhere");
    std::os::unix::fs::symlink(&target, &lock).unwrap();
    let e = cache::save(&sample(), &path).unwrap_err().to_string();
    assert!(e.contains(&lock.display().to_string()), "{e}");
    assert!(e.contains("symbolic link"), "{e}");
    assert!(!target.exists(), "nothing created through the link");
    assert!(!path.exists(), "nothing written");
    // Through a link to an existing file: that file is left as it was.
    std::fs::remove_file(&lock).unwrap();
    std::fs::write(&target, "precious").unwrap();
    std::os::unix::fs::symlink(&target, &lock).unwrap();
    assert!(cache::save(&sample(), &path).is_err());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
}

/// A saver that read the cache before another one saved (two `autotune` runs of one device)
/// keeps the other's entries: saving merges entry by entry.
#[test]
fn a_save_keeps_the_entries_another_saver_wrote_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    // A reads the cache (there is none yet) and tunes.
    let mut a = match cache::load(&path, &device("gpu A")) {
        Loaded::Missing => TuneFile::new(device("gpu A")),
        other => panic!("{other:?}"),
    };
    a.insert("fwht", "n=128", entry(serde_json::json!({"by": "a"})));
    // B, on the same device, saves meanwhile.
    let mut b = TuneFile::new(device("gpu A"));
    b.insert("decode", "n=64", entry(serde_json::json!({"by": "b"})));
    cache::save(&b, &path).unwrap();
    cache::save(&a, &path).unwrap();
    match cache::load(&path, &device("gpu A")) {
        Loaded::Usable(f) => {
            let keys: Vec<&String> = f.entries.keys().collect();
            assert_eq!(keys, ["decode/n=64", "fwht/n=128"]);
        }
        other => panic!("{other:?}"),
    }
}

/// A cache path that is a symbolic link is refused, when saving and when reading, with an
/// error naming it: nothing is written through the link, and the link is not replaced.
#[cfg(unix)] // links and FIFOs as Unix has them
#[test]
fn a_cache_path_that_is_a_symlink_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.json");
    cache::save(&sample(), &real).unwrap();
    let before = std::fs::read(&real).unwrap();
    let link = dir.path().join("tuned.json");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let mut other = sample();
    other.insert("fwht", "n=8", entry(serde_json::json!({"rows": 1})));
    let e = cache::save(&other, &link).unwrap_err().to_string();
    assert!(
        e.contains(&link.display().to_string()) && e.contains("symbolic link"),
        "{e}"
    );
    assert_eq!(std::fs::read(&real).unwrap(), before);
    assert!(link.symlink_metadata().unwrap().is_symlink());
    match TuneFile::peek(&link, &device("gpu A")) {
        Loaded::Unreadable { reason } => assert!(reason.contains("symbolic link"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // A dangling link: nothing is created where it points.
    let gone = dir.path().join("gone.json");
    let dangling = dir.path().join("dangling.json");
    std::os::unix::fs::symlink(&gone, &dangling).unwrap();
    assert!(cache::save(&sample(), &dangling).is_err());
    assert!(!gone.exists());
}

/// A FIFO or a folder at the cache path is not a regular file: reading says so at once (no
/// wait for a writer), saving refuses.
#[cfg(unix)] // links and FIFOs as Unix has them
#[test]
fn a_cache_path_that_is_not_a_regular_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("tuned.json");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if !made.is_ok_and(|s| s.success()) {
        return; // no mkfifo here
    }
    match TuneFile::peek(&fifo, &device("gpu A")) {
        Loaded::Unreadable { reason } => assert!(reason.contains("not a regular file"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let e = cache::save(&sample(), &fifo).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
}

/// Saver A holds the lock (it has read the file and is about to write), saver B tries to
/// save meanwhile and finds the lock taken (its `waiting` call is the barrier: no timing),
/// then A writes and lets go, then B merges into what A wrote: both entries are kept, and
/// for the key both wrote, B's, the later, wins.
#[test]
fn a_saver_waiting_for_the_lock_merges_into_what_the_holder_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    let entry = |f: &mut TuneFile, key: &str, by: &str| {
        f.insert(key, "b", entry(serde_json::json!({ "by": by })));
    };
    let mut a = TuneFile::new(device("gpu A"));
    entry(&mut a, "only_a", "a");
    entry(&mut a, "both", "a");
    let mut b = TuneFile::new(device("gpu A"));
    entry(&mut b, "only_b", "b");
    entry(&mut b, "both", "b");
    let a_lock = SaveLock::acquire(&path, || panic!("nobody else holds it")).unwrap();
    let (waits, waiting) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let saver_b = s.spawn(|| cache::save_with(&b, &path, move || waits.send(()).unwrap()));
        // A guard against hanging only: B reports the wait at once.
        waiting
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("B finds the lock taken");
        a_lock.save(&a).unwrap();
        drop(a_lock);
        saver_b.join().unwrap().unwrap();
    });
    match cache::load(&path, &device("gpu A")) {
        Loaded::Usable(f) => {
            let by = |key: &str| {
                config(&f, key, "b").unwrap()["by"]
                    .as_str()
                    .unwrap()
                    .to_string()
            };
            assert_eq!(f.entries.len(), 3);
            assert_eq!(
                (by("only_a"), by("only_b"), by("both")),
                ("a".into(), "b".into(), "b".into())
            );
        }
        other => panic!("{other:?}"),
    }
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config { cases: 48, ..Default::default() })]

    /// Two savers of one device, each saving random entries (keys from a small set, so that
    /// they overlap) in a random interleaving: the file holds the union of everything saved,
    /// each key with the value of the last save that wrote it.
    #[test]
    fn saves_in_any_interleaving_keep_the_union_with_the_last_writer_winning(
        saves in proptest::collection::vec(
            (proptest::bool::ANY, proptest::collection::btree_map(0u8..8, 0u32..1000, 0..5)),
            1..8,
        )
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tuned.json");
        let mut expected = std::collections::BTreeMap::new();
        for (by_b, entries) in &saves {
            let mut f = TuneFile::new(device("gpu A"));
            for (k, v) in entries {
                let value = serde_json::json!({ "saver": if *by_b { "b" } else { "a" }, "v": v });
                f.insert(&format!("k{k}"), "b", entry(value.clone()));
                expected.insert(format!("k{k}/b"), value);
            }
            cache::save(&f, &path).unwrap();
        }
        let found = match cache::load(&path, &device("gpu A")) {
            Loaded::Usable(f) => f.entries.into_iter().map(|(k, e)| (k, e.config)).collect(),
            Loaded::Missing => std::collections::BTreeMap::new(),
            other => panic!("{other:?}"),
        };
        proptest::prop_assert_eq!(found, expected);
    }
}

/// Each entry carries the hash of its own kernel's sources: an entry tuned for other sources
/// of its kernel is stale and ignored, and the other kernels' entries stay in force. A file of
/// the schema before (one hash for every kernel) is foreign: ignored, kept, not written over.
#[test]
fn a_stale_entry_is_ignored_and_the_others_stay_in_force() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    let mut f = TuneFile::new(device("gpu A"));
    f.insert("fwht", "n=128", entry(serde_json::json!(4)));
    let mut edited = entry(serde_json::json!(8));
    edited.source_hash = "hash0".into();
    f.insert("decode", "n=128", edited);
    cache::save(&f, &path).unwrap();
    let f = match cache::load(&path, &device("gpu A")) {
        Loaded::Usable(f) => f,
        other => panic!("{other:?}"),
    };
    // The kernels' current hashes: fwht's is still hash1, decode's is now hash1 too.
    let any = |_: &u32| true;
    assert_eq!(
        f.entry("fwht", "n=128").unwrap().in_force("hash1", any),
        Ok(4)
    );
    assert_eq!(
        f.entry("decode", "n=128").unwrap().in_force("hash1", any),
        Err(Ignored::Stale {
            tuned_for: "hash0".into(),
            current: "hash1".into()
        })
    );
    // A value of another type than the kernel's configuration is not trusted either.
    assert!(matches!(
        f.entry("fwht", "n=128")
            .unwrap()
            .in_force::<String>("hash1", |_| true),
        Err(Ignored::Unparsable { .. })
    ));
    let schema2 = r#"{"schema": 2, "devices": [{"device": {"name": "gpu A", "compute_capability": [9, 0], "driver_version": 13000},
        "kernel_hash": "hash1", "entries": {}}]}"#;
    std::fs::write(&path, schema2).unwrap();
    assert!(matches!(
        cache::load(&path, &device("gpu A")),
        Loaded::Foreign { .. }
    ));
    assert!(cache::save(&sample(), &path).is_err());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), schema2);
}

/// `check_writable` finds, changing nothing, each thing that would stop a save: a folder that
/// cannot be created, a lock path that is a folder or a link, a cache path that is a link, a
/// file of another schema or no cache at all (the links on Unix). Each error names the user's path (the cache,
/// its lock file or the folder in the way), never a temporary file.
#[test]
fn check_writable_names_what_is_in_the_way() {
    let dir = tempfile::tempdir().unwrap();
    let ok = dir.path().join("ok").join("tuned.json");
    cache::check_writable(&ok).unwrap();
    assert_eq!(folder(ok.parent().unwrap()), ["tuned.json.lock"]);
    cache::save(&sample(), &ok).unwrap();
    cache::check_writable(&ok).unwrap();

    let case = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        (d.join("tuned.json"), d)
    };
    let mut refused = Vec::new();
    // A file where the folder should be.
    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, "").unwrap();
    refused.push((blocker.join("tuned.json"), blocker.clone()));
    // The lock path is a folder; a link.
    let (p, d) = case("lock-folder");
    std::fs::create_dir(d.join("tuned.json.lock")).unwrap();
    refused.push((p, d.join("tuned.json.lock")));
    #[cfg(unix)]
    {
        let (p, d) = case("lock-link");
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), d.join("tuned.json.lock"))
            .unwrap();
        refused.push((p, d.join("tuned.json.lock")));
        // The cache is a link.
        let (p, _) = case("cache-link");
        std::os::unix::fs::symlink(&ok, &p).unwrap();
        refused.push((p.clone(), p));
    }
    // The cache is of another schema; not a cache.
    let (p, _) = case("schema-2");
    std::fs::write(&p, r#"{"schema": 2, "devices": []}"#).unwrap();
    refused.push((p.clone(), p));
    let (p, _) = case("not-a-cache");
    std::fs::write(&p, "1e308").unwrap();
    refused.push((p.clone(), p));
    for (path, named) in refused {
        let before = std::fs::read(&path).ok();
        let e = cache::check_writable(&path).unwrap_err().to_string();
        assert!(e.contains(&named.display().to_string()), "{e}");
        // (The temporary files' names start so.)
        assert!(!e.contains(".tuned.json.") && e.lines().count() == 1, "{e}");
        assert_eq!(std::fs::read(&path).ok(), before, "{e}");
    }
    assert!(!dir.path().join("elsewhere").exists());
}

/// A cache file far larger than any real one (1 GiB, sparse) is corrupt after reading at most
/// 16 MiB of it: memory stays bounded whatever lies at the path, and the file is kept.
#[test]
fn an_oversized_file_is_corrupt_and_read_no_further() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    match TuneFile::peek(&path, &device("gpu A")) {
        Loaded::Corrupt { reason, kept_at } => {
            assert!(reason.contains("larger than 16 MiB"), "{reason}");
            assert!(kept_at.is_none());
        }
        other => panic!("{other:?}"),
    }
    let e = cache::save(&sample(), &path).unwrap_err().to_string();
    assert!(e.contains("larger than 16 MiB"), "{e}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 30);
}

/// Two runs upgrading a cache of another schema both find it foreign. A moves it aside (under
/// the lock) and saves its first entry while B waits for the lock (its `waiting` call is the
/// barrier: no timing); B, reading the file again under the lock, finds A's cache of this
/// schema and moves nothing: its entry is merged in, A's kept, and the foreign file kept once.
/// Moving without reading again (as when the move was decided before the lock) would move
/// A's new cache aside as `.replaced.1`, and A's entry out of the cache.
#[test]
fn runs_replacing_a_foreign_file_keep_each_others_entries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    let schema2 = r#"{"schema": 2, "devices": []}"#;
    std::fs::write(&path, schema2).unwrap();
    for run in ["gpu A", "gpu B"] {
        assert!(matches!(
            TuneFile::peek(&path, &device(run)),
            Loaded::Foreign { .. }
        ));
    }
    let mut a = TuneFile::new(device("gpu A"));
    a.insert("fwht", "n=128", entry(serde_json::json!({"by": "a"})));
    let mut b = TuneFile::new(device("gpu A"));
    b.insert("decode", "n=64", entry(serde_json::json!({"by": "b"})));
    let a_lock = SaveLock::acquire(&path, || panic!("nobody else holds it")).unwrap();
    let (waits, waiting) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let run_b = s.spawn(|| {
            let moved = cache::replace_foreign(&path, move || waits.send(()).unwrap())?;
            cache::save(&b, &path)?;
            Ok::<_, std::io::Error>(moved)
        });
        // A guard against hanging only: B reports the wait at once.
        waiting
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("B finds the lock taken");
        let moved = a_lock.replace_foreign().unwrap();
        assert_eq!(moved, Some(dir.path().join("tuned.json.replaced")));
        a_lock.save(&a).unwrap();
        drop(a_lock);
        assert_eq!(run_b.join().unwrap().unwrap(), None, "B moves nothing");
    });
    match TuneFile::peek(&path, &device("gpu A")) {
        Loaded::Usable(f) => {
            let keys: Vec<&String> = f.entries.keys().collect();
            assert_eq!(keys, ["decode/n=64", "fwht/n=128"]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("tuned.json.replaced")).unwrap(),
        schema2
    );
    assert_eq!(
        folder(dir.path()),
        ["tuned.json", "tuned.json.lock", "tuned.json.replaced"]
    );
    // A run that finds nothing foreign any more (B, later, sequentially) moves nothing.
    assert_eq!(cache::replace_foreign(&path, || {}).unwrap(), None);
}

/// Two runs find the cache corrupt. A moves it aside and saves its entry under the lock while
/// B waits for it (the `waiting` call is the barrier); B, reading again under the lock, finds
/// A's cache and uses it, moving nothing. Moving without reading again would put A's cache
/// aside as `.corrupt.1`.
#[test]
fn a_loader_waiting_for_the_lock_does_not_move_what_the_holder_saved() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    std::fs::write(&path, "{ truncated").unwrap();
    let a_lock = SaveLock::acquire(&path, || panic!("nobody else holds it")).unwrap();
    let (waits, waiting) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let run_b =
            s.spawn(|| cache::load_with(&path, &device("gpu A"), move || waits.send(()).unwrap()));
        waiting
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("B finds the lock taken");
        match a_lock.load(&device("gpu A")) {
            Loaded::Corrupt {
                kept_at: Some(aside),
                ..
            } => assert_eq!(aside, dir.path().join("tuned.json.corrupt")),
            other => panic!("{other:?}"),
        }
        a_lock.save(&sample()).unwrap();
        drop(a_lock);
        match run_b.join().unwrap() {
            Loaded::Usable(f) => assert_eq!(f, sample()),
            other => panic!("B: {other:?}"),
        }
    });
    assert_eq!(
        std::fs::read_to_string(dir.path().join("tuned.json.corrupt")).unwrap(),
        "{ truncated"
    );
    assert_eq!(
        folder(dir.path()),
        ["tuned.json", "tuned.json.corrupt", "tuned.json.lock"]
    );
}

/// A file moved aside never goes over anything at the names it tries: an earlier file kept
/// there, a folder, (on Unix) a dangling link, whose target is not created. It takes the first
/// free name.
#[test]
fn moving_aside_never_replaces_what_is_at_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    std::fs::write(&path, "bad").unwrap();
    std::fs::write(dir.path().join("tuned.json.corrupt"), "earlier").unwrap();
    std::fs::create_dir(dir.path().join("tuned.json.corrupt.1")).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(
        dir.path().join("target"),
        dir.path().join("tuned.json.corrupt.2"),
    )
    .unwrap();
    let free = dir.path().join(if cfg!(unix) {
        "tuned.json.corrupt.3"
    } else {
        "tuned.json.corrupt.2"
    });
    match cache::load(&path, &device("gpu A")) {
        Loaded::Corrupt {
            kept_at: Some(aside),
            ..
        } => assert_eq!(aside, free),
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read_to_string(&free).unwrap(), "bad");
    assert!(!path.exists());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("tuned.json.corrupt")).unwrap(),
        "earlier"
    );
    assert!(dir.path().join("tuned.json.corrupt.1").is_dir());
    assert!(!dir.path().join("target").exists());
}

/// Every input of the `tune_cache` fuzz corpus (`fuzz/corpus/tune_cache/`), through the
/// writer: a file the reader finds usable is saved over and reads back the same; a corrupt
/// one is moved aside by `load`, its bytes kept, never deleted. (The fuzz target itself checks
/// the reader, which the engine builds; it cannot call this crate, which depends on the
/// crate it lives in.)
#[test]
fn the_tune_cache_fuzz_corpus_through_the_writer() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/tune_cache");
    let mut files: Vec<_> = std::fs::read_dir(&corpus)
        .unwrap_or_else(|e| panic!("{}: {e}", corpus.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty());
    // The identity the corpus's files name.
    let fuzz = DeviceIdentity {
        name: "fuzz".into(),
        compute_capability: None,
        driver_version: None,
    };
    let (mut usable, mut corrupt) = (0, 0);
    for input in &files {
        let data = std::fs::read(input).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tuned.json");
        std::fs::write(&path, &data).unwrap();
        let name = input.display();
        match TuneFile::peek(&path, &fuzz) {
            Loaded::Usable(f) => {
                usable += 1;
                cache::save(&f, &path).unwrap_or_else(|e| panic!("{name}: {e}"));
                match cache::load(&path, &fuzz) {
                    Loaded::Usable(g) => assert_eq!(f, g, "{name}"),
                    other => panic!("{name}: saved and read back: {other:?}"),
                }
            }
            Loaded::Corrupt { kept_at, .. } => {
                corrupt += 1;
                assert!(kept_at.is_none(), "{name}: peek moves nothing");
                match cache::load(&path, &fuzz) {
                    Loaded::Corrupt {
                        kept_at: Some(aside),
                        ..
                    } => assert_eq!(std::fs::read(aside).unwrap(), data, "{name}"),
                    other => panic!("{name}: {other:?}"),
                }
                assert!(!path.exists(), "{name}");
            }
            _ => {}
        }
    }
    // The corpus holds both kinds (else this test checks less than it says).
    assert!(
        usable > 0 && corrupt > 0,
        "{usable} usable, {corrupt} corrupt"
    );
}
