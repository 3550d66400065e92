//! The `rotq` CLI end to end: round trips for every format and rotation, ggml's bytes, and
//! bad input (one-line error, non-zero exit, no output written).

mod common;

use common::{assert_one_line_error, f32_bytes, from_f32_bytes, rotq, rotq_ok, s, stderr};
use rotq::KvFormat;
use rotq_testkit::data::Rows;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `CMD --format F --row-len N --input IN --output OUT`.
fn codec_args<'a>(
    cmd: &'a str,
    format: &'a str,
    row_len: &'a str,
    input: &'a Path,
    output: &'a Path,
) -> Vec<&'a str> {
    vec![
        cmd,
        "--format",
        format,
        "--row-len",
        row_len,
        "--input",
        s(input),
        "--output",
        s(output),
    ]
}

fn write_values(path: &Path, values: &[f32]) {
    std::fs::write(path, f32_bytes(values)).unwrap();
}

fn read_values(path: &Path) -> Vec<f32> {
    from_f32_bytes(&std::fs::read(path).unwrap())
}

#[test]
fn every_format_round_trips_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.f32");
    let values = Rows::uniform(4.0).f32s(256 * 3, 1);
    write_values(&x, &values);
    for format in KvFormat::ALL {
        let (q, y) = (
            dir.path().join(format!("q.{format}")),
            dir.path().join(format!("y.{format}.f32")),
        );
        rotq_ok(&codec_args("quantize", format.name(), "256", &x, &q));
        let bytes = std::fs::read(&q).unwrap();
        assert_eq!(bytes.len(), 3 * format.row_bytes(256).unwrap());
        assert_eq!(
            bytes,
            format.quantize_rows(&values, 256).unwrap(),
            "{format}"
        );
        rotq_ok(&codec_args("dequantize", format.name(), "256", &q, &y));
        let back = read_values(&y);
        assert_eq!(
            back,
            format.dequantize_rows(&bytes, 256).unwrap(),
            "{format}"
        );
        if format == KvFormat::F32 {
            assert_eq!(back, values);
        }
    }
}

#[test]
fn quantize_writes_ggml_bytes() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../reference/tests/data/ggml");
    let dir = tempfile::tempdir().unwrap();
    for name in ["q4_0", "q8_0", "iq4_nl"] {
        let out_path = dir.path().join(name);
        rotq_ok(&codec_args(
            "quantize",
            name,
            "128",
            &data.join("input.f32"),
            &out_path,
        ));
        let golden = std::fs::read(data.join(format!("{name}.bin"))).unwrap();
        assert_eq!(std::fs::read(&out_path).unwrap(), golden, "{name}");
    }
}

#[test]
fn rotations_round_trip_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.f32");
    let values = Rows::uniform(4.0).f32s(96 * 5, 2);
    write_values(&x, &values);
    let (y, z) = (dir.path().join("y"), dir.path().join("z"));
    for (rotation, dim) in [
        ("hadamard", "96"),
        ("randomized:42", "96"),
        ("block:32", "96"),
        ("hadamard", "32"),
    ] {
        let args = |input, output| {
            vec![
                "rotate",
                "--rotation",
                rotation,
                "--dim",
                dim,
                "--input",
                s(input),
                "--output",
                s(output),
            ]
        };
        rotq_ok(&args(&x, &y));
        let rotated = read_values(&y);
        assert_ne!(rotated, values);
        let norm = |v: &[f32]| v.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>();
        assert!(
            (norm(&rotated) / norm(&values) - 1.0).abs() < 1e-6,
            "{rotation}"
        );
        rotq_ok(&[args(&y, &z), vec!["--inverse"]].concat());
        let back = read_values(&z);
        assert!(
            back.iter().zip(&values).all(|(a, b)| (a - b).abs() < 1e-5),
            "{rotation}"
        );
    }
}

#[test]
fn bad_input_fails_in_one_line_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.f32");
    write_values(&x, &Rows::uniform(4.0).f32s(100, 3));
    let out_path = dir.path().join("out.bin");
    let missing = dir.path().join("missing.f32");
    let rotate = |rotation, dim| {
        vec![
            "rotate",
            "--rotation",
            rotation,
            "--dim",
            dim,
            "--input",
            s(&x),
            "--output",
            s(&out_path),
        ]
    };
    let cases: Vec<Vec<&str>> = vec![
        codec_args("quantize", "q4_0", "32", &missing, &out_path),
        codec_args("quantize", "q4_0", "32", &x, &out_path), // 100 % 32 != 0
        codec_args("quantize", "q4_0", "50", &x, &out_path), // 50 % 32 != 0
        codec_args("quantize", "q9_9", "100", &x, &out_path),
        codec_args("quantize", "f16", "0", &x, &out_path),
        codec_args("dequantize", "q4_0", "32", &x, &out_path), // 400 % 18 != 0
        rotate("hadamard", "100"),
        rotate("hadamard", "64"),
        rotate("spin:3", "4"),
        rotate("none", "4"),
        vec!["eval"],
        vec!["quantize", "--format", "q4_0"], // missing arguments (clap)
    ];
    for args in &cases {
        let out = rotq(args);
        assert_one_line_error(&out, &format!("{args:?}"));
        assert!(!out_path.exists(), "{args:?} left an output");
        // No temporary files are left behind either.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{args:?}: {leftovers:?}");
    }
    // A failing run does not touch an existing output.
    std::fs::write(&out_path, b"keep me").unwrap();
    let out = rotq(&codec_args("quantize", "q4_0", "32", &x, &out_path));
    assert_one_line_error(&out, "an existing output");
    assert_eq!(std::fs::read(&out_path).unwrap(), b"keep me");
    // An output in a folder that does not exist is a one-line error too.
    let nowhere = dir.path().join("no/such/dir/out.bin");
    let out = rotq(&codec_args("quantize", "f32", "4", &x, &nowhere));
    assert_one_line_error(&out, "an output in a missing folder");
}

#[test]
fn eval_and_info_print_what_they_say() {
    let out = rotq_ok(&["eval", "--synthetic", "--tokens", "64", "--json"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Every format but f32 and vLLM's slot parts (rotq's TurboQuant formats included), K
    // only and K+V.
    let formats = KvFormat::ALL.len() - 1 - KvFormat::VLLM.len();
    assert_eq!(lines.len(), 2 * formats, "{text}");
    for line in &lines {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        for key in [
            "rel_l2_plain",
            "rel_l2_rotated",
            "kld_plain",
            "kld_rotated",
            "bits_per_value",
        ] {
            assert!(row[key].as_f64().unwrap().is_finite(), "{line}");
        }
    }
    let table = rotq(&["eval", "--synthetic", "--tokens", "64"]);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains("q4_0") && table.contains("KLD plain"));
    let info = String::from_utf8(rotq(&["info"]).stdout).unwrap();
    for f in KvFormat::ALL {
        assert!(info.contains(f.name()), "{f}");
    }
    assert!(rotq(&["--help"]).status.success());
}

#[test]
fn bench_runs_only_the_section_asked_for() {
    let out = rotq_ok(&["bench", "--quick", "--only", "quantize", "--json"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let kernels: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kernel"].to_string())
        .collect();
    // The rotate-quantize section only: its q4_0 and q8_0 kernels (and whatever formats it
    // adds), nothing else.
    for kernel in ["rotate_quantize_q4_0", "rotate_quantize_q8_0"] {
        assert!(kernels.iter().any(|k| k.contains(kernel)), "{text}");
    }
    assert!(
        kernels.iter().all(|k| k.contains("rotate_quantize")),
        "{kernels:?}"
    );
    // The CPU has no prefill benchmark: a one-line error, not an empty table.
    let out = rotq(&["bench", "--quick", "--only", "prefill"]);
    assert_one_line_error(&out, "--only prefill on the CPU");
    assert!(stderr(&out).contains("prefill"));
}

/// `rotq info` lists the CPU's tuned entries, says which the kernels ignore and why (a value
/// outside the search space, an entry for other sources of its kernel), and prints timings
/// in few digits, even absurd ones.
#[test]
fn info_marks_tuned_entries_the_kernels_ignore() {
    use rotq::reference::tuned::{CacheFile, TuneFile, TunedEntry};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    let mut file = TuneFile::new(rotq_cpu::tuned::device_identity());
    let entry = |kernel: &str, config, default_ms, tuned_ms| TunedEntry {
        config,
        source_hash: rotq_cpu::tuned::source_hash(kernel),
        default_ms,
        tuned_ms,
        tried: 3,
        rejected: 0,
    };
    let good = serde_json::to_value(rotq_cpu::QuantizeConfig::search_space()[0]).unwrap();
    let q4 = "rotate_quantize_q4_0";
    file.insert(q4, "dim=128", entry(q4, good, 2.0, 1.0));
    let odd = serde_json::json!({ "rows_per_task": 7 });
    let q8 = "rotate_quantize_q8_0";
    file.insert(q8, "dim=128", entry(q8, odd, 1e308, 1e-300));
    let mut stale = entry(
        "fwht_f32",
        serde_json::json!({ "rows_per_task": 1 }),
        1.0,
        1.0,
    );
    stale.source_hash = "0123456789abcdef".into();
    file.insert("fwht_f32", "n=1024", stale);
    std::fs::write(&path, CacheFile::new(vec![file]).to_json()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rotq"))
        .arg("info")
        .env("ROTQ_TUNE_CACHE", &path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let line = |key: &str| {
        text.lines()
            .find(|l| l.contains(key))
            .unwrap_or_else(|| panic!("no {key} in {text}"))
            .to_string()
    };
    let in_force = line("rotate_quantize_q4_0/dim=128");
    assert!(!in_force.contains("ignored"), "{in_force}");
    let ignored = line("rotate_quantize_q8_0/dim=128");
    assert!(
        ignored.contains("ignored") && ignored.contains("search space"),
        "{ignored}"
    );
    let stale = line("fwht_f32/n=1024");
    assert!(stale.contains("ignored: stale"), "{stale}");
    // No number runs to hundreds of digits.
    let longest_digits = text
        .split(|c: char| !c.is_ascii_digit())
        .map(str::len)
        .max()
        .unwrap_or(0);
    assert!(longest_digits < 20, "{text}");
}

/// `rotq info` says whether ROTQ_DISABLE_ROTATION turns the default rotation off.
#[test]
fn info_reports_the_rotation_switch() {
    for (value, says) in [
        ("1", "none (ROTQ_DISABLE_ROTATION is set)"),
        ("0", "Hadamard on Q and K"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_rotq"))
            .arg("info")
            .env("ROTQ_DISABLE_ROTATION", value)
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains(&format!("default rotation: {says}")),
            "{value}: {text}"
        );
    }
}

/// `rotq checkpoint`: one line (or JSON object) per layer, layers that the config's `ignore`
/// leaves out unrotated; a target that matches no module, or a folder without config.json, is
/// a one-line error.
#[test]
fn checkpoint_prints_each_layers_plan() {
    let dir = tempfile::tempdir().unwrap();
    let config = |targets: &str| {
        format!(
            r#"{{"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 3, "hidden_size": 256,
            "num_attention_heads": 4, "quantization_config": {{"transform_config": {{
            "config_groups": {{"R3": {{"type": "hadamard", "head_dim": 64, "apply": [
            {{"targets": "{targets}", "ignore": "model.layers.1.self_attn", "location": "q_attn"}},
            {{"targets": "{targets}", "ignore": "model.layers.1.self_attn", "location": "k_cache"}}
            ]}}}}}}}}}}"#
        )
    };
    let path = dir.path().join("config.json");
    std::fs::write(&path, config("LlamaAttention")).unwrap();
    let out = rotq_ok(&["checkpoint", s(dir.path())]);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].contains("hadamard(64)") && lines[2].contains("hadamard(64)"));
    assert!(lines[1].contains("no rotation"), "{text}");
    let out = rotq_ok(&["checkpoint", s(dir.path()), "--json"]);
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows[1]["qk"], serde_json::Value::Null);
    assert_eq!(rows[2]["qk"], "hadamard(64)");
    std::fs::write(&path, config("re:self_attn")).unwrap();
    let out = rotq(&["checkpoint", s(dir.path())]);
    assert_one_line_error(&out, "a target that matches no module");
    assert!(stderr(&out).contains("targets[0]"), "{}", stderr(&out));
    let out = rotq(&["checkpoint", s(&dir.path().join("nothing"))]);
    assert_one_line_error(&out, "a folder without config.json");
}
