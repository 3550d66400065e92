//! `rotq eval --activations`: per-layer Q, K, V read from a safetensors dump the test writes,
//! the K format × V format × plan grid on them, and the errors of bad dumps.

mod common;

use common::{rotq_ok, s, small_layer as layer};
use half::{bf16, f16};
use rotq::KvFormat;
use rotq_cli::activations::read_activations;
use rotq_cli::eval::{evaluate_grid, grid_csv, Activations, PlanKind};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::Path;

/// The bytes of `x` in `dtype` (f16 or bf16).
fn encode(x: &ndarray::Array3<f32>, dtype: Dtype) -> Vec<u8> {
    x.iter()
        .flat_map(|&v| match dtype {
            Dtype::F16 => f16::from_f32(v).to_le_bytes(),
            _ => bf16::from_f32(v).to_le_bytes(),
        })
        .collect()
}

/// Writes `layers` to `path` under `layers.{i}.{q,k,v}`, layer i in f16 (even) or bf16 (odd).
fn write_dump(path: &Path, layers: &[Activations], skip: Option<&str>) {
    let mut owned = Vec::new();
    for (i, a) in layers.iter().enumerate() {
        let dtype = if i % 2 == 0 { Dtype::F16 } else { Dtype::BF16 };
        for (t, x) in [("q", &a.q), ("k", &a.k), ("v", &a.v)] {
            let name = format!("layers.{i}.{t}");
            if skip == Some(name.as_str()) {
                continue;
            }
            let (n, h, d) = x.dim();
            owned.push((name, dtype, vec![n, h, d], encode(x, dtype)));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(n, dt, shape, bytes)| {
            (
                n.clone(),
                TensorView::new(*dt, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A dump reads back as written (f16 and bf16 layers), and on it a Hadamard rotation cuts the
/// q4_0 K cache's KL divergence at least twofold; the grid is sorted by bits and its CSV has a
/// line per row and layer.
#[test]
fn a_dump_reads_back_and_rotation_cuts_q4_0_key_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acts.safetensors");
    let layers = [layer(1), layer(2)];
    write_dump(&path, &layers, None);
    let read = read_activations(&path, "layers.{layer}.{t}").unwrap();
    assert_eq!(read.len(), 2);
    for (i, (a, b)) in layers.iter().zip(&read).enumerate() {
        assert_eq!(a.k.dim(), b.k.dim());
        let round = |v: f32| {
            if i % 2 == 0 {
                f16::from_f32(v).to_f32()
            } else {
                bf16::from_f32(v).to_f32()
            }
        };
        assert!(a.k.iter().zip(b.k.iter()).all(|(x, y)| round(*x) == *y));
        assert_eq!(b.params.pos_offset, 92);
    }
    let rows = evaluate_grid(
        &read,
        &[KvFormat::Q4_0, KvFormat::Q8_0],
        &[KvFormat::Q8_0],
        &[PlanKind::None, PlanKind::Hadamard],
        0,
        |_, _| {},
    )
    .unwrap();
    assert_eq!(rows.len(), 4);
    assert!(rows
        .windows(2)
        .all(|w| w[0].bits_per_value <= w[1].bits_per_value));
    let q4 = |plan| {
        rows.iter()
            .find(|r| r.k_format == KvFormat::Q4_0 && r.plan == plan)
            .unwrap()
    };
    let (plain, rotated) = (q4(PlanKind::None), q4(PlanKind::Hadamard));
    assert!(
        rotated.mean_kld * 2.0 < plain.mean_kld,
        "q4_0 K: KLD {} without rotation, {} with",
        plain.mean_kld,
        rotated.mean_kld
    );
    assert!(rows
        .iter()
        .all(|r| r.layers.len() == 2 && r.p99_kld >= r.mean_kld));
    let csv = grid_csv(&rows);
    assert_eq!(csv.lines().count(), 1 + rows.len() * 3);
}

/// Bad dumps are errors naming what is wrong.
#[test]
fn bad_dumps_are_errors_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acts.safetensors");
    write_dump(&path, &[layer(1), layer(2)], Some("layers.1.v"));
    let e = read_activations(&path, "layers.{layer}.{t}")
        .unwrap_err()
        .to_string();
    assert!(e.contains("layers.1.v"), "{e}");
    let e = read_activations(&path, "blocks.{layer}.{t}")
        .unwrap_err()
        .to_string();
    assert!(e.contains("blocks.0.q"), "{e}");
    let e = read_activations(&path, "layers.{layer}.q")
        .unwrap_err()
        .to_string();
    assert!(e.contains("{t}"), "{e}");
    std::fs::write(&path, b"not a safetensors file").unwrap();
    assert!(read_activations(&path, "layers.{layer}.{t}").is_err());
    // K of another head dimension than Q.
    let mut odd = layer(3);
    odd.k = ndarray::Array3::from_elem((96, 2, 32), 0.5);
    write_dump(&path, &[odd], None);
    let e = read_activations(&path, "layers.{layer}.{t}")
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not fit"), "{e}");
}

/// `rotq eval --activations` end to end: the table on stdout, the CSV written.
#[test]
fn the_cli_evaluates_a_dump() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acts.safetensors");
    write_dump(&path, &[layer(4)], None);
    let csv = dir.path().join("grid.csv");
    let out = rotq_ok(&["eval", "--activations", s(&path), "--csv", s(&csv)]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("hadamard+v") && table.contains("q4_0"),
        "{table}"
    );
    let written = std::fs::read_to_string(&csv).unwrap();
    assert!(written.starts_with("k_format,v_format,plan"));
}
