//! The search, the correctness gate and the noise rule, on a fake clock (the decisions can
//! never depend on how busy the machine is); the binary end to end.

use rotq_autotune::timing::FakeClock;
use rotq_autotune::{tune, TimingPlan, Tunable};
use rotq_reference::rotation::SplitMix64;
use rotq_reference::tolerance::{tolerance, Op, Precision};
use rotq_reference::tuned::{DeviceIdentity, Loaded, TuneFile};
use rotq_reference::Rotation;
use std::path::Path;
use std::time::Duration;

/// A toy rotation kernel on a fake clock, with a deliberately broken candidate:
/// configuration 1 forgets the 1/√n normalization (and is by far the fastest), the others are
/// correct and take `cost[config]` milliseconds per call, times a noise factor drawn from a
/// seeded generator (uniform within ±`noise`).
struct Toy {
    x: Vec<f64>,
    clock: FakeClock,
    cost: [f64; 4],
    noise: f64,
    g: SplitMix64,
}

impl Toy {
    /// Default 0 and candidate 3 equally fast (10 ms), 2 four times slower, 1 broken and fast.
    fn new(seed: u64, noise: f64) -> Self {
        Self::with_costs(seed, noise, [10.0, 1.0, 40.0, 10.0])
    }

    fn with_costs(seed: u64, noise: f64, cost: [f64; 4]) -> Self {
        Self {
            x: (0..64)
                .map(|i| (i as f64 * 0.2 + seed as f64).sin())
                .collect(),
            clock: FakeClock::new(),
            cost,
            noise,
            g: SplitMix64::new(seed),
        }
    }

    fn compute(&self, config: u32) -> Vec<f64> {
        let r = Rotation::hadamard(self.x.len()).unwrap();
        let mut y = self.x.clone();
        r.forward_in_place(&mut y).unwrap();
        if config == 1 {
            let s = (self.x.len() as f64).sqrt();
            y.iter_mut().for_each(|v| *v *= s);
        }
        y
    }

    fn tune(&mut self, budget: Duration) -> Result<rotq_autotune::Outcome<u32>, String> {
        let mut clock = self.clock.clone();
        tune(self, &mut clock, budget, plan(), |_| {})
    }
}

impl Tunable for Toy {
    type Config = u32;
    fn kernel(&self) -> String {
        "toy".into()
    }
    fn bucket(&self) -> String {
        "n=64".into()
    }
    fn default_config(&self) -> u32 {
        0
    }
    fn candidates(&self) -> Vec<u32> {
        vec![0, 1, 2, 3]
    }
    fn gate(&mut self, config: &u32) -> Result<(), String> {
        let mut want = self.x.clone();
        Rotation::hadamard(64)
            .unwrap()
            .forward_in_place(&mut want)
            .unwrap();
        tolerance(Op::Rotation, Precision::F64)
            .check(&self.compute(*config), &want)
            .map_err(|m| m.to_string())
    }
    fn run(&mut self, config: &u32, _i: usize) -> Result<(), String> {
        let jitter = 1.0 + self.noise * (2.0 * self.g.next_f64() - 1.0);
        self.clock.advance(self.cost[*config as usize] * jitter);
        Ok(())
    }
}

fn plan() -> TimingPlan {
    TimingPlan {
        samples: 5,
        min_sample: Duration::from_millis(25),
        ..TimingPlan::default()
    }
}

#[test]
fn the_gate_rejects_a_wrong_candidate_however_fast() {
    let mut t = Toy::new(0, 0.05);
    let o = t.tune(Duration::from_secs(30)).unwrap();
    assert_eq!(o.rejected.len(), 1);
    assert_eq!(o.rejected[0].config, 1);
    assert!(
        o.rejected[0].reason.contains("rel_l2"),
        "{}",
        o.rejected[0].reason
    );
    assert_ne!(o.chosen, 1, "a rejected candidate is never chosen");
    assert_ne!(o.chosen, 2, "a slower candidate is never chosen");
    assert_eq!(o.tried, 2); // 2 and 3 (the default is timed separately)
}

/// How often, over 1,000 noise draws, candidate 3 at `cost` ms (the default: 10 ms) is
/// chosen under per-call noise of ±`noise`.
fn times_chosen(cost: f64, noise: f64) -> usize {
    (0..1000)
        .filter(|&seed| {
            let mut t = Toy::with_costs(seed, noise, [10.0, 1.0, 40.0, cost]);
            t.tune(Duration::from_secs(30)).unwrap().chosen == 3
        })
        .count()
}

/// A candidate exactly as fast as the default replaces it rarely, whatever the first timings
/// said: the paired confirmation rounds see no gain beyond their noise. (Replacing it would
/// cost nothing, but each replacement is a decision made on noise.) Under ±1% noise never;
/// the rates asserted for ±5% and ±20% are a little above the measured 4 and 49 per 1,000.
#[test]
fn an_equally_fast_candidate_rarely_replaces_the_default() {
    assert_eq!(times_chosen(10.0, 0.01), 0);
    assert!(times_chosen(10.0, 0.05) <= 10);
    assert!(times_chosen(10.0, 0.2) <= 60);
    // The confirmation is what holds: the first timings make candidate 3 look faster about
    // half the time, and each time the paired rounds keep the default.
    let confirmed = (0..40)
        .filter(|&seed| {
            let mut t = Toy::new(seed, 0.01);
            let mut steps = Vec::new();
            let mut clock = t.clock.clone();
            let o = tune(&mut t, &mut clock, Duration::from_secs(30), plan(), |m| {
                steps.push(m.to_string())
            })
            .unwrap();
            assert_eq!(o.chosen, 0, "seed {seed}");
            steps.iter().any(|m| m.starts_with("confirming"))
        })
        .count();
    assert!((10..=30).contains(&confirmed), "{confirmed}");
}

/// A slower candidate is never chosen under moderate noise (±5%), and rarely under heavy noise
/// (±20%: measured 8 per 1,000 for 2% slower, 1 for 5% slower).
#[test]
fn a_slower_candidate_is_not_chosen() {
    for cost in [10.2, 10.5, 12.0] {
        assert_eq!(times_chosen(cost, 0.01), 0, "{cost}");
        assert_eq!(times_chosen(cost, 0.05), 0, "{cost}");
        assert!(times_chosen(cost, 0.2) <= 12, "{cost}");
    }
}

/// A candidate clearly faster than the default (20%) replaces it under noise up to ±20%, and
/// the reported speed-up is that of the confirmation rounds.
#[test]
fn a_clearly_faster_candidate_replaces_the_default() {
    assert_eq!(times_chosen(8.0, 0.05), 1000);
    assert!(times_chosen(8.0, 0.2) >= 990);
    let mut t = Toy::with_costs(9, 0.05, [10.0, 1.0, 40.0, 8.0]);
    let o = t.tune(Duration::from_secs(30)).unwrap();
    assert_eq!(o.chosen, 3);
    assert!((1.15..1.35).contains(&o.speedup()), "{}", o.speedup());
}

#[test]
fn a_default_that_fails_the_gate_is_an_error() {
    struct Broken(Toy);
    impl Tunable for Broken {
        type Config = u32;
        fn kernel(&self) -> String {
            self.0.kernel()
        }
        fn bucket(&self) -> String {
            self.0.bucket()
        }
        fn default_config(&self) -> u32 {
            1
        }
        fn candidates(&self) -> Vec<u32> {
            vec![0]
        }
        fn gate(&mut self, c: &u32) -> Result<(), String> {
            self.0.gate(c)
        }
        fn run(&mut self, c: &u32, i: usize) -> Result<(), String> {
            self.0.run(c, i)
        }
    }
    let mut t = Broken(Toy::new(1, 0.0));
    let mut clock = t.0.clock.clone();
    let e = tune(&mut t, &mut clock, Duration::from_secs(5), plan(), |_| {}).unwrap_err();
    assert!(e.contains("default fails the gate"), "{e}");
}

/// A candidate that fails when it runs is rejected with the reason, never chosen; a default
/// that fails is an error.
#[test]
fn a_candidate_that_fails_when_timed_is_rejected() {
    struct Failing(Toy);
    impl Tunable for Failing {
        type Config = u32;
        fn kernel(&self) -> String {
            self.0.kernel()
        }
        fn bucket(&self) -> String {
            self.0.bucket()
        }
        fn default_config(&self) -> u32 {
            self.0.default_config()
        }
        fn candidates(&self) -> Vec<u32> {
            vec![0, 2, 3]
        }
        fn gate(&mut self, c: &u32) -> Result<(), String> {
            self.0.gate(c)
        }
        fn run(&mut self, c: &u32, i: usize) -> Result<(), String> {
            if *c == 3 {
                return Err("launch failed".into());
            }
            self.0.run(c, i)
        }
    }
    let mut t = Failing(Toy::with_costs(2, 0.0, [10.0, 1.0, 40.0, 1.0]));
    let mut clock = t.0.clock.clone();
    let o = tune(&mut t, &mut clock, Duration::from_secs(30), plan(), |_| {}).unwrap();
    assert_eq!(o.chosen, 0);
    assert_eq!(o.rejected.len(), 1);
    assert!(o.rejected[0].reason.contains("launch failed"), "{o:?}");
}

/// A candidate that wins the search but fails while it is confirmed leaves the default in
/// place (and is no error: the run goes on).
#[test]
fn a_candidate_failing_in_the_confirmation_keeps_the_default() {
    struct Flaky(Toy, usize);
    impl Tunable for Flaky {
        type Config = u32;
        fn kernel(&self) -> String {
            self.0.kernel()
        }
        fn bucket(&self) -> String {
            self.0.bucket()
        }
        fn default_config(&self) -> u32 {
            self.0.default_config()
        }
        fn candidates(&self) -> Vec<u32> {
            vec![0, 3]
        }
        fn gate(&mut self, c: &u32) -> Result<(), String> {
            self.0.gate(c)
        }
        fn run(&mut self, c: &u32, i: usize) -> Result<(), String> {
            if *c == 3 {
                // Its search timing takes 1 + 1 + 5 samples of 25 calls: past that, it fails.
                self.1 += 1;
                if self.1 > 130 {
                    return Err("device lost".into());
                }
            }
            self.0.run(c, i)
        }
    }
    let mut t = Flaky(Toy::with_costs(4, 0.0, [10.0, 1.0, 40.0, 1.0]), 0);
    let mut steps = Vec::new();
    let mut clock = t.0.clock.clone();
    let o = tune(&mut t, &mut clock, Duration::from_secs(30), plan(), |m| {
        steps.push(m.to_string())
    })
    .unwrap();
    assert_eq!(o.chosen, 0, "{o:?}");
    assert!(
        steps
            .iter()
            .any(|m| m.contains("re-timing failed: device lost")),
        "{steps:?}"
    );
}

/// The budget is read from the clock: with 300 ms of fake time, the default's timing and the
/// first candidate's use it up and the rest are reported as untried.
#[test]
fn an_exhausted_budget_reports_what_was_left() {
    let mut t = Toy::new(3, 0.0);
    let o = t.tune(Duration::ZERO).unwrap();
    assert_eq!((o.tried, o.untried), (0, 3));
    assert_eq!(o.chosen, 0);
    let mut t = Toy::new(3, 0.0);
    let o = t.tune(Duration::from_millis(300)).unwrap();
    assert_eq!((o.tried, o.rejected.len(), o.untried), (1, 1, 1), "{o:?}");
}

/// A space larger than EXHAUSTIVE: the kernel's leads are tried first, in their order (a
/// lead that is not a candidate, or the default, is skipped), then the rest, each once.
#[test]
fn leads_come_first_then_the_rest_once_each() {
    struct Order {
        gated: Vec<u32>,
        clock: FakeClock,
    }
    impl Tunable for Order {
        type Config = u32;
        fn kernel(&self) -> String {
            "order".into()
        }
        fn bucket(&self) -> String {
            "n=1".into()
        }
        fn default_config(&self) -> u32 {
            0
        }
        fn candidates(&self) -> Vec<u32> {
            (0..40).collect()
        }
        fn leads(&self) -> Vec<u32> {
            vec![37, 0, 500, 5, 37]
        }
        fn gate(&mut self, c: &u32) -> Result<(), String> {
            self.gated.push(*c);
            Ok(())
        }
        fn run(&mut self, _c: &u32, _i: usize) -> Result<(), String> {
            self.clock.advance(1.0);
            Ok(())
        }
    }
    let clock = FakeClock::new();
    let mut t = Order {
        gated: Vec::new(),
        clock: clock.clone(),
    };
    let plan = TimingPlan {
        warmup: 0,
        samples: 1,
        min_sample: Duration::from_millis(1),
        ..TimingPlan::default()
    };
    let o = tune(
        &mut t,
        &mut clock.clone(),
        Duration::from_secs(60),
        plan,
        |_| {},
    )
    .unwrap();
    // The default's own gate, then 37 and 5, then the other 37 candidates.
    assert_eq!(&t.gated[..3], &[0, 37, 5], "{:?}", t.gated);
    let mut rest = t.gated[1..].to_vec();
    rest.sort_unstable();
    assert_eq!(rest, (1..40).collect::<Vec<_>>());
    assert_eq!((o.tried, o.untried), (39, 0));
}

/// Runs the `autotune` binary with `args`, `--shapes shapes` when given, and `--out out`.
/// This machine's CPU section of the cache at `path`.
fn cpu_section(path: &Path) -> TuneFile {
    match TuneFile::peek(path, &rotq_cpu::tuned::device_identity()) {
        Loaded::Usable(f) => f,
        other => panic!("{other:?}"),
    }
}

fn autotune(args: &[&str], shapes: Option<&Path>, out: &Path) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_autotune"));
    cmd.args(args);
    if let Some(s) = shapes {
        cmd.arg("--shapes").arg(s);
    }
    cmd.arg("--out").arg(out).output().unwrap()
}

#[test]
fn tuning_on_the_cpu_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tuned.json");
    std::fs::write(&out, "not json").unwrap();
    let o = autotune(
        &[
            "--device",
            "cpu",
            "--shapes",
            "small",
            "--budget-secs",
            "4",
            "--json",
        ],
        None,
        &out,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The corrupt file was moved aside, not lost, and reported.
    assert_eq!(
        std::fs::read_to_string(out.with_extension("json.corrupt")).unwrap(),
        "not json"
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("corrupt"));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // small: fwht, quantize q4_0, decode q4_0 and q8_0, and q4_0 with q8_0 queries (tuned
    // apart: its own loop, its own entry).
    assert_eq!(rows.len(), 5);
    for r in &rows {
        assert_eq!(r["rejected"], 0);
        assert!(r["default_ms"].as_f64().unwrap() > 0.0);
    }
    let kernels: Vec<&str> = rows.iter().filter_map(|r| r["kernel"].as_str()).collect();
    assert!(kernels.contains(&"decode_attention_q4_0"), "{kernels:?}");
    assert!(
        kernels.contains(&"decode_attention_q4_0_q8_0_query"),
        "{kernels:?}"
    );
    // The file is ours and names every task.
    let file = cpu_section(&out);
    assert_eq!(file.entries.len(), 5);
    let another = DeviceIdentity {
        name: "another".into(),
        compute_capability: None,
        driver_version: None,
    };
    assert!(matches!(
        rotq_autotune::cache::load(&out, &another),
        Loaded::OtherDevices { .. }
    ));
    // Shapes from a JSON file, for one kernel; merged into the same cache. The CPU has no
    // prefill kernel to tune: prefill shapes are skipped, with a note.
    let shapes = dir.path().join("shapes.json");
    let prefill = r#""prefill": [{"format": "q8_0", "n": 256, "h_kv": 2}]"#;
    std::fs::write(
        &shapes,
        format!(r#"{{"fwht": [64], {prefill}, "bytes": 1048576}}"#),
    )
    .unwrap();
    let o = autotune(
        &[
            "--device",
            "cpu",
            "--kernels",
            "fwht,prefill",
            "--budget-secs",
            "2",
            "--json",
        ],
        Some(&shapes),
        &out,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("prefill is tuned on GPUs only"));
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 1);
    let file = cpu_section(&out);
    assert!(file.entries.contains_key("fwht_f32/n=64"));
    assert_eq!(file.entries.len(), 6);
    // A file of an older schema is kept beside the new one.
    let old = r#"{"schema": 1, "device": {}, "entries": {}}"#;
    std::fs::write(&out, old).unwrap();
    let o = autotune(
        &["--device", "cpu", "--kernels", "fwht", "--budget-secs", "2"],
        Some(&shapes),
        &out,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let kept = dir.path().join("tuned.json.replaced");
    assert_eq!(std::fs::read_to_string(kept).unwrap(), old);
    assert!(cpu_section(&out).entries.contains_key("fwht_f32/n=64"));
    std::fs::write(&shapes, r#"{"fwht": [64], "typo": 1}"#).unwrap();
    let o = autotune(&["--device", "cpu"], Some(&shapes), &out);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("typo"));
    // A bad argument is a one-line error.
    let bad = autotune(&["--device", "gpu7"], None, &out);
    assert!(!bad.status.success());
    let msg = String::from_utf8_lossy(&bad.stderr);
    assert!(msg.contains("gpu7") && msg.contains("cuda:N"), "{msg}");
    assert_eq!(msg.lines().count(), 1, "{msg}");
}

/// Asking the CPU for prefill alone is a clear error; kernel names and the prefill shape's
/// fields are checked (all before any tuning).
#[test]
fn the_cpu_has_no_prefill_to_tune() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tuned.json");
    let o = autotune(&["--device", "cpu", "--kernels", "prefill"], None, &out);
    assert!(!o.status.success());
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(
        msg.contains("nothing to tune") && msg.contains("GPUs only"),
        "{msg}"
    );
    let o = autotune(&["--device", "cpu", "--kernels", "prefil"], None, &out);
    assert!(!o.status.success());
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(msg.contains("decode or prefill"), "{msg}");
    let shapes = dir.path().join("shapes.json");
    std::fs::write(
        &shapes,
        r#"{"prefill": [{"format": "q8_0", "n_kv": 256, "h_kv": 2}]}"#,
    )
    .unwrap();
    let o = autotune(&["--device", "cpu"], Some(&shapes), &out);
    assert!(!o.status.success());
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(msg.contains("n_kv"), "{msg}");
    assert!(!out.exists(), "nothing was tuned, nothing written");
}

/// A cache that cannot be written (its lock path a folder; on Unix, the cache a symbolic
/// link) is reported at once, in one line naming the cache, before any tuning.
#[test]
fn an_unwritable_cache_is_reported_before_any_tuning() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tuned.json");
    std::fs::create_dir(dir.path().join("tuned.json.lock")).unwrap();
    #[cfg_attr(not(unix), allow(unused_mut))]
    let mut refused = vec![out];
    #[cfg(unix)]
    {
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(dir.path().join("elsewhere.json"), &link).unwrap();
        refused.push(link);
    }
    for out in &refused {
        let o = autotune(
            &["--device", "cpu", "--kernels", "fwht", "--budget-secs", "1"],
            None,
            out,
        );
        assert!(!o.status.success());
        let msg = String::from_utf8_lossy(&o.stderr);
        assert_eq!(msg.lines().count(), 1, "{msg}");
        assert!(msg.contains(&out.display().to_string()), "{msg}");
        assert!(!out.exists());
    }
    assert!(!dir.path().join("elsewhere.json").exists());
}

/// Another run saves an entry while this one is tuning: this run's later saves keep it (it
/// saves only the entries it tuned, merged under the lock, never a copy of what it read at
/// its start). The test holds the cache's lock, so that the run's first save waits; the
/// run's "waiting" note is the barrier (no timing): the other save happens then.
#[test]
fn a_run_keeps_entries_another_run_saves_meanwhile() {
    use rotq_autotune::cache::SaveLock;
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tuned.json");
    let other = |v: u32| {
        let mut f = TuneFile::new(rotq_cpu::tuned::device_identity());
        let entry = rotq_reference::tuned::TunedEntry {
            config: serde_json::json!({ "v": v }),
            source_hash: "h".into(),
            default_ms: 1.0,
            tuned_ms: 1.0,
            tried: 1,
            rejected: 0,
        };
        f.insert("other_kernel", "x=1", entry);
        f
    };
    // What the run reads at its start.
    rotq_autotune::cache::save(&other(0), &out).unwrap();
    let shapes = dir.path().join("shapes.json");
    std::fs::write(&shapes, r#"{"fwht": [64, 128], "bytes": 65536}"#).unwrap();
    let lock = SaveLock::acquire(&out, || {}).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_autotune"))
        .args(["--device", "cpu", "--kernels", "fwht", "--budget-secs", "1"])
        .arg("--shapes")
        .arg(&shapes)
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines, heard) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let _ = lines.send(line.unwrap());
        }
    });
    let mut said = String::new();
    while !said.contains("waiting for another run's save") {
        // A guard against hanging only.
        let line = heard
            .recv_timeout(Duration::from_secs(300))
            .unwrap_or_else(|e| panic!("{e}: {said}"));
        said.push_str(&line);
        said.push('\n');
    }
    // The other run's save, while this run waits.
    lock.save(&other(1)).unwrap();
    drop(lock);
    assert!(child.wait().unwrap().success(), "{said}");
    let file = cpu_section(&out);
    assert_eq!(file.entries["other_kernel/x=1"].config["v"], 1);
    assert!(file.entries.contains_key("fwht_f32/n=64"));
    assert!(file.entries.contains_key("fwht_f32/n=128"));
}
