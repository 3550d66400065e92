//! `rotq eval --model` through the built binary: bad models and texts are one-line errors
//! naming the file, and (with SmolLM2's GGUF, see `cli/scripts/fetch-models.sh`) a short grid
//! runs end to end and writes its CSV.

mod common;

use common::{assert_ok, assert_one_line_error, rotq, s, stderr};
use std::path::PathBuf;

/// A GGUF v3 file holding only `general.architecture = arch`.
fn gguf_with_arch(arch: &str) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata
    let key = "general.architecture";
    b.extend((key.len() as u64).to_le_bytes());
    b.extend(key.as_bytes());
    b.extend(8u32.to_le_bytes()); // string
    b.extend((arch.len() as u64).to_le_bytes());
    b.extend(arch.as_bytes());
    b
}

/// SmolLM2's GGUF, if fetched (`ROTQ_SMOLLM2_GGUF`); with `ROTQ_REQUIRE_MODEL=1` its absence fails.
fn smollm2() -> Option<PathBuf> {
    let path = std::env::var_os("ROTQ_SMOLLM2_GGUF").map(PathBuf::from);
    match path.filter(|p| p.is_file()) {
        Some(p) => Some(p),
        None if std::env::var("ROTQ_REQUIRE_MODEL").as_deref() == Ok("1") => {
            panic!("ROTQ_REQUIRE_MODEL=1 but ROTQ_SMOLLM2_GGUF names no file")
        }
        None => {
            eprintln!("skipped: no model");
            None
        }
    }
}

#[test]
fn bad_models_are_one_line_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "Some words of text. ".repeat(50)).unwrap();
    let cases = [
        (
            "truncated.gguf",
            gguf_with_arch("llama")[..30].to_vec(),
            "truncated",
        ),
        (
            "notgguf.gguf",
            b"not a gguf file at all, just text".to_vec(),
            "magic",
        ),
        ("bert.gguf", gguf_with_arch("bert"), "architecture \"bert\""),
        ("llama.gguf", gguf_with_arch("llama"), "llama."),
    ];
    for (name, bytes, says) in cases {
        let model = dir.path().join(name);
        std::fs::write(&model, bytes).unwrap();
        let out = rotq(&["eval", "--model", s(&model), "--text", s(&text)]);
        assert_one_line_error(&out, name);
        let err = stderr(&out);
        assert!(err.contains(name) && err.contains(says), "{name}: {err}");
    }
    let out = rotq(&["eval", "--model", "/no/such/model.gguf", "--text", s(&text)]);
    assert_one_line_error(&out, "missing model");
    assert!(stderr(&out).contains("/no/such/model.gguf"));
}

#[test]
fn a_short_grid_on_smollm2_runs_and_a_short_text_is_refused() {
    let Some(model) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "Too short a text for a context.").unwrap();
    let out = rotq(&[
        "eval",
        "--model",
        s(&model),
        "--text",
        s(&short),
        "--ctx",
        "64",
    ]);
    assert_one_line_error(&out, "short text");
    assert!(stderr(&out).contains("short.txt") && stderr(&out).contains("fewer than one context"));
    let text = dir.path().join("text.txt");
    let words = "The keeper of the lighthouse counted the ships that passed the rocks each night, \
                 and wrote their names in a book that she kept by the lamp. ";
    std::fs::write(&text, words.repeat(12)).unwrap();
    let (csv, layers, maps) = (
        dir.path().join("grid.csv"),
        dir.path().join("layers.csv"),
        dir.path().join("maps"),
    );
    let out = rotq(&[
        "eval",
        "--model",
        s(&model),
        "--text",
        s(&text),
        "--ctx",
        "128",
        "--chunks",
        "1",
        "--k-formats",
        "q4_0",
        "--v-formats",
        "f16",
        "--plans",
        "none,hadamard",
        "--csv",
        s(&csv),
        "--layers-csv",
        s(&layers),
        "--heatmaps",
        s(&maps),
    ]);
    assert_ok(&out, "grid");
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        table.contains("q4_0") && table.contains("hadamard"),
        "{table}"
    );
    let csv = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(csv.lines().count(), 1 + 4, "{csv}");
    // Per layer: 2 plans x (30 layers + the overall line), and the header.
    let layers = std::fs::read_to_string(&layers).unwrap();
    assert_eq!(layers.lines().count(), 1 + 2 * 31, "{layers}");
    for plan in ["none", "hadamard"] {
        let png = std::fs::read(maps.join(format!("token_kld-{plan}.png"))).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
    // Repeated formats and plans (v:32 is none+v:32) run once.
    let out2 = rotq(&[
        "eval",
        "--model",
        s(&model),
        "--text",
        s(&text),
        "--ctx",
        "64",
        "--chunks",
        "1",
        "--k-formats",
        "q8_0,q8_0",
        "--v-formats",
        "f16",
        "--plans",
        "v:32,none+v:32",
        "--json",
    ]);
    assert_ok(&out2, "duplicates");
    assert_eq!(String::from_utf8_lossy(&out2.stdout).lines().count(), 2 + 1);
    // A plan the heads cannot take is refused before the text is tokenized.
    let out2 = rotq(&[
        "eval",
        "--model",
        s(&model),
        "--text",
        s(&text),
        "--plans",
        "block:7",
    ]);
    assert_one_line_error(&out2, "block:7");
    assert!(stderr(&out2).contains("plan block:7"), "{}", stderr(&out2));
    assert!(!stderr(&out2).contains("tokens;"), "{}", stderr(&out2));
}

#[test]
fn a_context_shift_on_smollm2_is_reported_per_configuration() {
    let Some(model) = smollm2() else { return };
    let text =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/eval-text/text.txt");
    let out = rotq(&[
        "eval",
        "--model",
        s(&model),
        "--text",
        s(&text),
        "--ctx",
        "128",
        "--batch",
        "16",
        "--shift",
        "--k-formats",
        "q8_0",
        "--v-formats",
        "q8_0",
        "--plans",
        "none,hadamard",
        "--json",
    ]);
    assert_ok(&out, "shift");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        assert!(
            l["scored"].as_u64().unwrap() > 0 && l["kld_mean"].as_f64().unwrap() < 0.5,
            "{l}"
        );
    }
}

#[test]
fn outputs_and_options_are_checked_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let (model, text) = (dir.path().join("m.gguf"), dir.path().join("t.txt"));
    std::fs::write(&model, b"not a model, and never read").unwrap();
    std::fs::write(&text, "words ".repeat(100)).unwrap();
    let base = ["eval", "--model", s(&model), "--text", s(&text)];
    let same = dir.path().join(".").join("m.gguf");
    let missing = dir.path().join("no/such/l.csv");
    let cases: [(Vec<&str>, &str); 5] = [
        (vec!["--csv", s(&same)], "refusing to overwrite an input"),
        (
            vec!["--layers-csv", s(&text)],
            "refusing to overwrite an input",
        ),
        (vec!["--layers-csv", s(&missing)], "folder does not exist"),
        (vec!["--heatmaps", s(&text)], "not a folder"),
        (vec!["--device", "oracle"], "goes with --activations"),
    ];
    for (extra, says) in cases {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let out = rotq(&args);
        assert_one_line_error(&out, says);
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(
        std::fs::read(&model).unwrap(),
        b"not a model, and never read"
    );
    // A missing text is found before the model is read.
    let absent = dir.path().join("absent.txt");
    let out = rotq(&["eval", "--model", s(&model), "--text", s(&absent)]);
    assert_one_line_error(&out, "missing text");
    assert!(stderr(&out).contains("absent.txt"), "{}", stderr(&out));
    let out = rotq(&["eval", "--synthetic", "--text", s(&text)]);
    assert_one_line_error(&out, "--text alone");
    let out = rotq(&[
        "eval",
        "--model",
        s(&model),
        "--text",
        s(&text),
        "--shift",
        "--csv",
        "x.csv",
    ]);
    assert_one_line_error(&out, "--shift with --csv");
    assert_eq!(out.status.code(), Some(2));
}
