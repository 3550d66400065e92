//! The CUDA tunables on a GPU: every prefill candidate passes the gate and is timed, and the
//! binary tunes prefill end to end. Where no GPU opens each test prints `skipped: no CUDA
//! device` and passes (with `ROTQ_REQUIRE_CUDA` set, it fails instead).

use rotq_autotune::timing::EventClock;
use rotq_autotune::{cuda, tune, TimingPlan, Tunable};
use rotq_cuda::{CudaError, Device, PrefillConfig};
use rotq_reference::KvFormat;
use std::io::Write;
use std::time::Duration;

fn device() -> Option<Device> {
    match Device::open("cuda:0") {
        Ok(d) => Some(d),
        Err(e @ (CudaError::NoDriver | CudaError::NoDevice { .. })) => {
            if std::env::var_os("ROTQ_REQUIRE_CUDA").is_some() {
                panic!("ROTQ_REQUIRE_CUDA is set but there is no CUDA device: {e}");
            }
            let _ = writeln!(std::io::stderr(), "skipped: no CUDA device ({e})");
            None
        }
        Err(e) => panic!("a CUDA device is present but could not be opened: {e}"),
    }
}

#[test]
fn every_prefill_candidate_passes_the_gate_and_is_timed() {
    let Some(dev) = device() else { return };
    for format in [KvFormat::Q8_0, KvFormat::Q4_0] {
        // 1024 tokens × 8 KV heads × 4: 256–512 row blocks, the flash kernel on any GPU.
        let mut t = cuda::Prefill::new(&dev, format, 1024, 8).unwrap();
        assert_eq!(t.kernel(), format!("prefill_attention_{format}"));
        assert_eq!(
            t.bucket(),
            rotq_cuda::tuned::prefill_bucket(128, 8, 4, 1024, 1024)
        );
        assert_eq!(t.default_config(), PrefillConfig::default());
        let off = PrefillConfig {
            flash: false,
            ..PrefillConfig::default()
        };
        for c in t.candidates().into_iter().chain([off]) {
            t.gate(&c).unwrap_or_else(|e| panic!("{format} {c:?}: {e}"));
        }
        let plan = TimingPlan {
            samples: 5,
            min_sample: Duration::from_millis(2),
            ..TimingPlan::gpu()
        };
        // (The budget, counted on the wall clock, only guards against a hang: the assertion
        // below is that every candidate was tried.)
        let mut clock = EventClock::new(dev.stream().clone());
        let o = tune(&mut t, &mut clock, Duration::from_secs(600), plan, |_| {}).unwrap();
        assert!(o.rejected.is_empty(), "{o:?}");
        let others = PrefillConfig::search_space().len() - 1;
        assert_eq!((o.tried, o.untried), (others, 0), "{o:?}");
        assert!(
            o.default.median_ms > 0.0 && o.chosen_timing.median_ms > 0.0,
            "{o:?}"
        );
        assert!(PrefillConfig::search_space().contains(&o.chosen));
    }
}

#[test]
fn the_binary_tunes_prefill_and_rejects_bad_prefill_shapes() {
    // Where this test executable was carried away from its build (the GPU bundle), the
    // binary beside it is named by ROTQ_AUTOTUNE_BIN.
    let exe = std::env::var_os("ROTQ_AUTOTUNE_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_autotune").into());
    if !exe.exists() {
        let _ = writeln!(std::io::stderr(), "skipped: no autotune binary at {exe:?}");
        return;
    }
    if device().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (out, shapes) = (
        dir.path().join("tuned.json"),
        dir.path().join("shapes.json"),
    );
    let run = |json: &str| {
        std::fs::write(&shapes, json).unwrap();
        std::process::Command::new(&exe)
            .args(["--device", "cuda:0", "--kernels", "prefill", "--json"])
            .args(["--budget-secs", "60", "--shapes"])
            .arg(&shapes)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let o = run(r#"{"prefill": [{"format": "q8_0", "n": 1024, "h_kv": 8}]}"#);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["kernel"], "prefill_attention_q8_0");
    assert_eq!(
        rows[0]["bucket"],
        rotq_cuda::tuned::prefill_bucket(128, 8, 4, 1024, 1024)
    );
    assert_eq!(rows[0]["rejected"], 0);
    // A format the flash kernel does not read, and an empty prompt: one-line errors.
    for (json, says) in [
        (
            r#"{"prefill": [{"format": "q5_1", "n": 1024, "h_kv": 8}]}"#,
            "flash prefill kernel reads",
        ),
        (
            r#"{"prefill": [{"format": "q8_0", "n": 0, "h_kv": 8}]}"#,
            "need n and h_kv >= 1",
        ),
    ] {
        let o = run(json);
        assert!(!o.status.success());
        let msg = String::from_utf8_lossy(&o.stderr);
        assert!(msg.contains("prefill shape") && msg.contains(says), "{msg}");
    }
}
