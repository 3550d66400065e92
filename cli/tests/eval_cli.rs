//! `rotq eval --activations` end to end through the built binary: an `.npy` folder with the
//! table, JSON, CSV and heatmap PNGs (valid, of the documented size, not blank), the oracle
//! check's line, `--device` errors, and bad option combinations failing before any work.

mod common;

use common::{assert_ok, assert_one_line_error, assert_one_line_failure, rotq, s, stderr};
use rotq_cli::activations::{write_npy_folder, write_safetensors, DumpDtype};
use rotq_cli::heatmap::heatmap_size;
use rotq_cli::npy::NpyDtype;
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

fn layers() -> Vec<rotq_cli::eval::Activations> {
    (1..=2).map(common::small_layer).collect()
}

const FORMATS: [&str; 2] = ["--k-formats", "f16,q8_0,q4_0"];
const V_FORMATS: [&str; 2] = ["--v-formats", "f16,q4_0,q8_0"];
const PLANS: [&str; 2] = ["--plans", "none,hadamard"];

/// Decodes a PNG: (width, height, distinct colours), checking it is 8-bit RGB.
fn decode(path: &Path) -> (u32, u32, usize) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(
        (info.color_type, info.bit_depth),
        (png::ColorType::Rgb, png::BitDepth::Eight)
    );
    let colours: HashSet<&[u8]> = buf[..info.buffer_size()].chunks_exact(3).collect();
    (info.width, info.height, colours.len())
}

#[test]
fn an_npy_folder_gives_json_csv_heatmaps_and_the_check_line() {
    let dir = tempfile::tempdir().unwrap();
    let acts = dir.path().join("acts");
    write_npy_folder(&acts, &layers(), "layers.{layer}.{t}", NpyDtype::F16).unwrap();
    let (csv, maps) = (dir.path().join("grid.csv"), dir.path().join("maps"));
    let mut args = vec![
        "eval",
        "--activations",
        s(&acts),
        "--json",
        "--csv",
        s(&csv),
    ];
    args.extend(["--heatmaps", s(&maps)]);
    args.extend(FORMATS.iter().chain(&V_FORMATS).chain(&PLANS));
    let out = rotq(&args);
    assert_ok(&out, &format!("{args:?}"));
    let err = stderr(&out);
    assert!(
        err.contains("oracle check (cpu): 36 comparisons of 2 query rows"),
        "{err}"
    );
    // JSON: one object per (K, V, plan), sorted by bits.
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3 * 3 * 2);
    let bits: Vec<f64> = rows
        .iter()
        .map(|r| r["bits_per_value"].as_f64().unwrap())
        .collect();
    assert!(bits.windows(2).all(|w| w[0] <= w[1]));
    let kld = |k: &str, plan: &str| {
        rows.iter()
            .find(|r| r["k_format"] == k && r["v_format"] == "f16" && r["plan"] == plan)
            .unwrap()["mean_kld"]
            .as_f64()
            .unwrap()
    };
    assert!(kld("q4_0", "hadamard") * 2.0 < kld("q4_0", "none"));
    assert_eq!(rows[0]["layers"].as_array().unwrap().len(), 2);
    // CSV: a header, then per row an overall line and one per layer.
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(text.lines().count(), 1 + 18 * 3);
    // Heatmaps: two metrics x two plans, valid PNGs of the documented size, not blank.
    let (w, h) = heatmap_size(3, 3);
    for name in [
        "kld-none.png",
        "kld-hadamard.png",
        "rel_l2-none.png",
        "rel_l2-hadamard.png",
    ] {
        let (pw, ph, colours) = decode(&maps.join(name));
        assert_eq!((pw, ph), (w, h), "{name}");
        assert!(colours > 50, "{name}: {colours} colours");
    }
    let count = std::fs::read_dir(&maps).unwrap().count();
    assert_eq!(count, 4, "no temporary files left behind");
}

#[test]
fn a_safetensors_dump_gives_the_table_and_the_check_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acts.safetensors");
    write_safetensors(&path, &layers(), "m.{layer}.{t}", DumpDtype::F32).unwrap();
    let mut args = vec![
        "eval",
        "--activations",
        s(&path),
        "--names",
        "m.{layer}.{t}",
    ];
    args.extend(FORMATS.iter().chain(&PLANS));
    args.extend(["--v-formats", "f16", "--check-rows", "4"]);
    let out = rotq(&args);
    assert_ok(&out, &format!("{args:?}"));
    let table = String::from_utf8(out.stdout).unwrap();
    assert_eq!(table.lines().filter(|l| l.contains(" f16 ")).count(), 6);
    let last = table.lines().last().unwrap();
    assert!(
        last.starts_with("oracle check (cpu): 12 comparisons of 4 query rows"),
        "{table}"
    );
    // The oracle backend has nothing to check.
    args.extend(["--device", "oracle"]);
    let out = rotq(&args);
    assert_ok(&out, &format!("{args:?}"));
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .contains("not needed"));
}

/// One line on stderr, a failure status, and nothing written.
fn assert_fails(args: &[&str], needle: &str, not_written: &Path) {
    let out = rotq(args);
    assert_one_line_error(&out, &format!("{args:?}"));
    let err = stderr(&out);
    assert!(err.contains(needle), "{args:?}: {err}");
    assert!(!not_written.exists(), "{}", not_written.display());
}

#[test]
fn bad_devices_and_options_fail_in_one_line_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acts.safetensors");
    write_safetensors(&path, &layers()[..1], "layers.{layer}.{t}", DumpDtype::F16).unwrap();
    let maps = dir.path().join("maps");
    let base = ["eval", "--activations", s(&path), "--heatmaps", s(&maps)];
    let with = |extra: &[&'static str]| -> Vec<&str> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };
    if !rotq_cuda::cuda_available() {
        assert_fails(
            &with(&["--device", "cuda:0"]),
            "no CUDA device for cuda:0",
            &maps,
        );
    }
    assert_fails(&with(&["--device", "tpu"]), "device `tpu`", &maps);
    assert_fails(
        &with(&["--k-formats", "q4_0,q8_0"]),
        "--heatmaps needs f16",
        &maps,
    );
    assert_fails(
        &with(&["--plans", "hadamard"]),
        "--heatmaps needs f16",
        &maps,
    );
    assert_fails(&with(&["--plans", "rotated"]), "plan `rotated`", &maps);
    assert_fails(&with(&["--k-formats", "q3_k"]), "q3_k", &maps);
    // Options of the grid need --activations.
    assert_fails(
        &["eval", "--synthetic", "--device", "cpu"],
        "go with --activations",
        &maps,
    );
}

/// Creates `path` with `header` at its start and `len` bytes in all, the rest a hole: a file
/// of any size that costs no disk. Its values are never read (the test is that they are not).
fn sparse_file(path: &Path, header: &[u8], len: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(header).unwrap();
    f.set_len(len).unwrap();
}

/// A dump whose headers claim more than this machine can hold (K and V of 2^22 tokens, 8 heads
/// of 128: 8 GiB each in f16, and 2^39 attention probabilities) is refused from its headers,
/// with the memory it would need, before any value is read or allocated: rotq runs under an
/// address-space limit of 1 GiB and a CPU-time limit of 10 s, which reading 16 GiB of values
/// would exceed. Both a safetensors file and a folder of `.npy` files; nothing is written.
#[test]
fn a_dump_too_large_for_memory_is_refused_from_its_headers() {
    let Some(prlimit) = common::prlimit() else {
        eprintln!("skipped: no prlimit here");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (n_q, h_q, n_kv, h_kv, d) = (4096u64, 32u64, 1u64 << 22, 8u64, 128u64);
    let shapes = [
        ("q", [n_q, h_q, d]),
        ("k", [n_kv, h_kv, d]),
        ("v", [n_kv, h_kv, d]),
    ];
    let csv = dir.path().join("grid.csv");
    let eval = |path: &Path| {
        Command::new(prlimit)
            .args(["--as=1073741824", "--cpu=10", "--"])
            .arg(env!("CARGO_BIN_EXE_rotq"))
            .args(["eval", "--activations", s(path), "--csv", s(&csv)])
            .output()
            .unwrap()
    };
    let check = |path: &Path, out: &std::process::Output| {
        assert_one_line_failure(out, &path.display().to_string());
        let err = stderr(out);
        assert!(
            err.contains(s(path)) && err.contains("the evaluation needs about"),
            "{err}"
        );
        assert!(err.contains(" TiB of memory"), "{err}");
        assert!(!csv.exists());
    };

    // safetensors: an 8-byte header length, the JSON header, then 16 GiB of f16 values.
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (t, shape) in shapes {
        let bytes = shape.iter().product::<u64>() * 2;
        header.insert(
            format!("layers.0.{t}"),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let json = serde_json::to_vec(&header).unwrap();
    let mut head = (json.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(&json);
    let path = dir.path().join("huge.safetensors");
    sparse_file(&path, &head, head.len() as u64 + offset);
    check(&path, &eval(&path));

    // A folder of .npy files: each a header, then its f16 values.
    let folder = dir.path().join("huge");
    std::fs::create_dir(&folder).unwrap();
    for (t, [n, h, d]) in shapes {
        let header =
            format!("{{'descr': '<f2', 'fortran_order': False, 'shape': ({n}, {h}, {d}), }}");
        let head = common::handmade_npy(1, &header, &[]);
        let len = head.len() as u64 + n * h * d * 2;
        sparse_file(&folder.join(format!("layers.0.{t}.npy")), &head, len);
    }
    check(&folder, &eval(&folder));
}
