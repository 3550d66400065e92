//! Checkpoint-driven rotation: compressed-tensors `transform_config` → `RotationPlan`s, on
//! config.json and safetensors files written to a temporary folder.

use ndarray::Array2;
use proptest::prelude::*;
use rotq::checkpoint::{CheckpointError, TransformConfig};
use rotq::{Rotation, RotationPlan};
use rotq_testkit::data::Rows;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::Path;

/// A config.json whose transform_config has one group `R3` of this scheme JSON.
fn config(scheme: &str) -> String {
    format!(
        r#"{{"head_dim": 8, "quantization_config": {{"quant_method": "compressed-tensors",
            "transform_config": {{"config_groups": {{"R3": {scheme}}}}}}}}}"#
    )
}

/// An R3 scheme: `type`, extra fields, and q_attn + k_cache args.
fn r3(kind: &str, extra: &str) -> String {
    format!(
        r#"{{"type": "{kind}", "head_dim": 8, {extra} "apply": [
            {{"targets": ["re:.*self_attn$"], "location": "q_attn"}},
            {{"targets": ["re:.*self_attn$"], "location": "k_cache"}}]}}"#
    )
}

fn parse(json: &str) -> TransformConfig {
    TransformConfig::from_config_json(json).unwrap().unwrap()
}

/// A random orthogonal d×d matrix, as a checkpoint may store one (no Hadamard structure): a
/// product of Householder reflections of random vectors, uniform in [-½, ½).
fn orthogonal(d: usize, seed: u64) -> Array2<f64> {
    let mut q = Array2::<f64>::eye(d);
    for v in Rows::uniform(0.5).f64s(d * d, seed).chunks(d) {
        let norm2: f64 = v.iter().map(|x| x * x).sum();
        let h = Array2::from_shape_fn((d, d), |(i, j)| {
            f64::from(u8::from(i == j)) - 2.0 * v[i] * v[j] / norm2
        });
        q = q.dot(&h);
    }
    q
}

fn sylvester(d: usize) -> Array2<f64> {
    Array2::from_shape_fn((d, d), |(i, j)| {
        if (i & j).count_ones() % 2 == 0 {
            1.0
        } else {
            -1.0
        }
    })
}

fn bytes(m: &[f64], dtype: Dtype) -> Vec<u8> {
    m.iter()
        .flat_map(|&v| match dtype {
            Dtype::F64 => v.to_le_bytes().to_vec(),
            Dtype::F32 => (v as f32).to_le_bytes().to_vec(),
            Dtype::F16 => half::f16::from_f64(v).to_le_bytes().to_vec(),
            Dtype::BF16 => half::bf16::from_f64(v).to_le_bytes().to_vec(),
            Dtype::I64 => (v as i64).to_le_bytes().to_vec(),
            Dtype::I8 => vec![v as i8 as u8],
            _ => unimplemented!(),
        })
        .collect()
}

/// A tensor to write: name, dtype, shape, values.
type Tensor<'a> = (&'a str, Dtype, Vec<usize>, Vec<f64>);

/// Writes `tensors` as a safetensors file.
fn write_tensors(path: &Path, tensors: &[Tensor]) {
    let data: Vec<(String, Vec<u8>, Dtype, Vec<usize>)> = tensors
        .iter()
        .map(|(n, dt, s, v)| (n.to_string(), bytes(v, *dt), *dt, s.clone()))
        .collect();
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, b, dt, s)| (n.clone(), TensorView::new(*dt, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn name(layer: usize, loc: &str, param: &str) -> String {
    format!("model.layers.{layer}.self_attn.R3_{loc}.{param}")
}

/// `x ↦ x · A` on a row vector (how compressed-tensors applies an online transform).
fn row_times(x: &[f64], a: &Array2<f64>) -> Vec<f64> {
    (0..a.ncols())
        .map(|j| x.iter().enumerate().map(|(i, v)| v * a[[i, j]]).sum())
        .collect()
}

/// Checks that `r` maps x to x·A for random x, within `tol`.
fn assert_applies(r: &Rotation, a: &Array2<f64>, seed: u64, tol: f64) {
    for x in Rows::uniform(1.0)
        .f64s(4 * a.nrows(), seed)
        .chunks(a.nrows())
    {
        let want = row_times(x, a);
        let mut got = x.to_vec();
        r.forward_in_place(&mut got).unwrap();
        for (w, v) in want.iter().zip(&got) {
            assert!((w - v).abs() <= tol, "{w} vs {v}");
        }
    }
}

fn err_of(json: &str, n_layers: usize, d: usize, weights: Option<&Path>) -> CheckpointError {
    match TransformConfig::from_config_json(json) {
        Err(e) => e,
        Ok(cfg) => match cfg.unwrap().plans(n_layers, d, weights) {
            Err(e) => e,
            Ok(p) => panic!("{json}: planned {p:?}"),
        },
    }
}

fn assert_err_names(e: &CheckpointError, needles: &[&str]) {
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "`{msg}` should name `{n}`");
    }
}

#[test]
fn no_transform_config_is_none() {
    for json in [
        r#"{"head_dim": 128}"#,
        r#"{"quantization_config": null}"#,
        r#"{"quantization_config": {"quant_method": "compressed-tensors"}}"#,
        r#"{"quantization_config": {"transform_config": null}}"#,
        // What compressed-tensors writes into every checkpoint without transforms.
        r#"{"quantization_config": {"transform_config": {}}}"#,
    ] {
        assert_eq!(TransformConfig::from_config_json(json).unwrap(), None);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, r#"{"model_type": "llama"}"#).unwrap();
    assert_eq!(TransformConfig::from_config_file(&path).unwrap(), None);
}

#[test]
fn hadamard_on_q_and_k_is_the_hadamard_rotation() {
    let plain = config(&r3("hadamard", ""));
    let spelled = config(&r3(
        "Hadamard",
        r#""precision": "float32", "randomize": false,"#,
    ));
    let inverse = config(&r3("hadamard", "")).replace(
        r#""location": "k_cache"}"#,
        r#""location": "k_cache", "inverse": true}"#,
    );
    let inverse = inverse.replace(
        r#""location": "q_attn"}"#,
        r#""location": "q_attn", "inverse": true}"#,
    );
    for json in [plain, spelled, inverse] {
        let plans = parse(&json).plans(3, 8, None).unwrap();
        assert_eq!(plans.len(), 3);
        for p in &plans {
            assert_eq!(p.qk, Some(Rotation::hadamard(8).unwrap()), "{json}");
            assert_eq!(p.v, None);
        }
    }
}

#[test]
fn hadamard_matches_compressed_tensors_normalization() {
    // compressed-tensors: x · H_sylvester / √n; ours: H x with H symmetric.
    let r = Rotation::hadamard(16).unwrap();
    assert_applies(&r, &(sylvester(16) / 4.0), 1, 1e-12);
}

#[test]
fn stored_sylvester_hadamard_stays_a_hadamard() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    let h = sylvester(8).into_raw_vec_and_offset().0;
    write_tensors(
        &file,
        &[(&name(0, "q_attn", "weight"), Dtype::BF16, vec![8, 8], h)],
    );
    let plans = parse(&config(&r3("hadamard", "")))
        .plans(2, 8, Some(&file))
        .unwrap();
    assert!(plans
        .iter()
        .all(|p| p.qk == Some(Rotation::hadamard(8).unwrap())));
}

#[test]
fn random_matrix_per_layer_is_loaded() {
    let d = 16;
    let dir = tempfile::tempdir().unwrap();
    let mats: Vec<Array2<f64>> = (0..3).map(|l| orthogonal(d, 100 + l)).collect();
    let names: Vec<(String, String)> = (0..3)
        .map(|l| (name(l, "q_attn", "weight"), name(l, "k_cache", "weight")))
        .collect();
    let mut tensors = Vec::new();
    for (m, (q, k)) in mats.iter().zip(&names) {
        let v = m.iter().copied().collect::<Vec<_>>();
        tensors.push((q.as_str(), Dtype::F64, vec![d, d], v.clone()));
        tensors.push((k.as_str(), Dtype::F64, vec![d, d], v));
    }
    // Spread over two files of a folder, plus an unrelated tensor.
    let other = vec![(
        "model.layers.0.mlp.down_proj.weight",
        Dtype::F32,
        vec![2, 3],
        vec![0.5; 6],
    )];
    write_tensors(&dir.path().join("model-00001.safetensors"), &tensors[..3]);
    write_tensors(&dir.path().join("model-00002.safetensors"), &tensors[3..]);
    write_tensors(&dir.path().join("model-00003.safetensors"), &other);
    let json = config(
        &r3("random-matrix", r#""randomize": true,"#)
            .replace(r#""head_dim": 8"#, r#""head_dim": 16"#),
    );
    let plans = parse(&json).plans(3, d, Some(dir.path())).unwrap();
    for (l, (p, m)) in plans.iter().zip(&mats).enumerate() {
        let r = p.qk.as_ref().unwrap();
        assert_applies(r, m, l as u64, 1e-12);
        assert_eq!(p.v, None);
    }
    assert_ne!(plans[0].qk, plans[1].qk);
}

#[test]
fn shared_matrix_in_reduced_precision_serves_every_layer() {
    let d = 32;
    let m = orthogonal(d, 7);
    let json = config(&r3("random_matrix", "").replace(r#""head_dim": 8"#, r#""head_dim": 32"#));
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.safetensors");
        let v: Vec<f64> = m.iter().copied().collect();
        write_tensors(
            &file,
            &[(&name(0, "q_attn", "weight"), dtype, vec![d, d], v)],
        );
        let plans = parse(&json).plans(4, d, Some(&file)).unwrap();
        let tol = match dtype {
            Dtype::F32 => 1e-6,
            _ => 2e-2,
        };
        for p in &plans {
            assert_applies(p.qk.as_ref().unwrap(), &m, 3, tol);
        }
    }
}

#[test]
fn random_hadamard_and_permuted_hadamard_are_read_from_weights() {
    let d = 8;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    // A random Hadamard as compressed-tensors stores it: ±1 entries, H·diag(s).
    let signs = rotq::reference::rotation::random_signs(d, 9);
    let w = Array2::from_shape_fn((d, d), |(i, j)| sylvester(d)[[i, j]] * signs[j]);
    let perm = [3.0, 0.0, 7.0, 1.0, 6.0, 2.0, 5.0, 4.0];
    write_tensors(
        &file,
        &[
            (
                &name(0, "k_cache", "weight"),
                Dtype::F32,
                vec![d, d],
                w.iter().copied().collect(),
            ),
            (
                &name(0, "q_attn", "perm"),
                Dtype::I64,
                vec![d],
                perm.to_vec(),
            ),
        ],
    );
    let scale = (d as f64).sqrt();
    let plans = parse(&config(&r3("random-hadamard", "")))
        .plans(2, d, Some(&file))
        .unwrap();
    assert_applies(plans[1].qk.as_ref().unwrap(), &(&w / scale), 5, 1e-12);

    // hadamard + randomize, only the permutation stored: the Sylvester matrix, rows and
    // columns permuted.
    write_tensors(
        &file,
        &[(
            &name(0, "q_attn", "perm"),
            Dtype::I64,
            vec![d],
            perm.to_vec(),
        )],
    );
    let plans = parse(&config(
        &r3("hadamard", r#""randomize": false,"#).replace("false", "true"),
    ))
    .plans(2, d, Some(&file))
    .unwrap();
    let h = sylvester(d);
    let p = perm.map(|v| v as usize);
    let hp = Array2::from_shape_fn((d, d), |(i, j)| h[[p[i], p[j]]] / scale);
    assert_applies(plans[0].qk.as_ref().unwrap(), &hp, 6, 1e-12);
}

#[test]
fn other_groups_do_not_touch_the_cache() {
    // SpinQuant R1 (offline) + R2 (offline, V) + R4 (online, mlp): no KV rotation.
    let json = r#"{"quantization_config": {"transform_config": {"config_groups": {
        "R1": {"type": "hadamard", "apply": [
            {"targets": ["re:.*embed_tokens$"], "location": "weight_output"},
            {"targets": ["re:.*q_proj$"], "location": "weight_input", "inverse": true}]},
        "R2": {"type": "hadamard", "head_dim": 8, "apply": [
            {"targets": ["re:.*v_proj$"], "location": "weight_output"},
            {"targets": ["re:.*o_proj$"], "location": "weight_input", "inverse": true}]},
        "R4": {"type": "some-future-type", "apply": [
            {"targets": ["re:.*down_proj$"], "location": "input"}]}}}}}"#;
    let plans = parse(json).plans(2, 8, None).unwrap();
    assert_eq!(plans, vec![RotationPlan::none(); 2]);
}

#[test]
fn config_errors_name_the_field() {
    let cases: Vec<(String, Vec<&str>)> = vec![
        ("{\"quantization_config\": ".into(), vec!["config.json", "EOF"]),
        (config(r#"{"typ": "hadamard"}"#), vec!["config_groups.R3", "typ"]),
        (
            config(r#"{"type": "hadamard", "apply": [{"location": "q_attn"}]}"#),
            vec!["config_groups.R3.apply[0]", "targets"],
        ),
        (
            config(r#"{"type": "hadamard", "head_dim": "eight"}"#),
            vec!["config_groups.R3", "invalid type"],
        ),
        (
            config(&r3("hadamard", "")).replace("k_cache", "v_cache"),
            vec!["config_groups.R3.apply[1].location", "v_cache"],
        ),
        (
            config(&r3("dct", "")),
            vec!["config_groups.R3.type", "dct"],
        ),
        (
            config(&r3("hadamard", "")).replace(r#""head_dim": 8,"#, r#""head_dim": 64,"#),
            vec!["config_groups.R3.head_dim", "64", "8"],
        ),
        (
            config(&r3("hadamard", "")).replace(r#""location": "k_cache""#, r#""location": "input""#),
            vec!["config_groups.R3.apply[0].location", "k_cache"],
        ),
        (
            config(&r3("random-hadamard", "")).replace(
                r#""location": "k_cache"}"#,
                r#""location": "k_cache", "inverse": true}"#,
            ),
            vec!["config_groups.R3.apply[1].inverse"],
        ),
        (
            // Layer 0 ignored for q_attn only: rotated on one side.
            config(&r3("hadamard", "")).replace(
                r#""location": "q_attn"}"#,
                r#""location": "q_attn", "ignore": "model.layers.0.self_attn"}"#,
            ),
            vec!["config_groups.R3.apply[1]", "model.layers.0.self_attn", "k_cache", "q_attn"],
        ),
        (
            config(&r3("hadamard", "")).replace(
                r#""location": "q_attn"}"#,
                r#""location": "q_attn", "ignore": null}"#,
            ),
            vec!["config_groups.R3.apply[0].ignore", "null"],
        ),
        (
            config(&r3("hadamard", "")).replace("re:.*self_attn$", "re:(?<=x)self_attn"),
            vec!["config_groups.R3.apply[0].targets[0]", "does not compile"],
        ),
        (
            config(&r3("hadamard", "")).replace("re:.*self_attn$", "re:self_attn"),
            vec!["config_groups.R3.apply[0].targets[0]", "re:self_attn", "matches no module"],
        ),
        (
            config(&r3("hadamard", "")).replace("re:.*self_attn$", "LlamaAttention"),
            vec!["config_groups.R3.apply[0].targets[0]", "LlamaAttention", "architectures"],
        ),
        (
            config(&r3("hadamard", r#""precision": "float65","#)),
            vec!["config_groups.R3.precision", "float65"],
        ),
        (
            config(&r3("hadamard", "")).replace(r#""head_dim": 8, "#, ""),
            vec!["config_groups.R3.head_dim", "missing"],
        ),
        (
            config(&r3("hadamard", "")).replace(r#""head_dim": 8,"#, r#""head_dim": 6,"#),
            vec!["config_groups.R3.head_dim", "6"],
        ),
        (
            config(&r3("random-matrix", "")),
            vec!["config_groups.R3.type", "R3_q_attn.weight", "not given"],
        ),
        (
            config(&r3("hadamard", r#""randomize": true,"#)),
            vec!["config_groups.R3.randomize", "R3_q_attn.perm"],
        ),
        (
            r#"{"quantization_config": {"transform_config": {"config_groups": {}, "transform_groups": {}}}}"#.into(),
            vec!["transform_config", "transform_groups"],
        ),
        (
            r#"{"quantization_config": {"transform_config": {"transform_groups": {}}}}"#.into(),
            vec!["transform_config", "transform_groups", "no compressed-tensors release"],
        ),
        (
            r#"{"quantization_config": {"transform_config": {"groups": {}}}}"#.into(),
            vec!["transform_config", "groups"],
        ),
        (
            r#"{"quantization_config": {"transform_config": {"config_groups": {
                "A": {"type": "hadamard", "head_dim": 8, "apply": [
                      {"targets": "re:.*self_attn$", "location": "q_attn"},
                      {"targets": "re:.*self_attn$", "location": "k_cache"}]},
                "B": {"type": "hadamard", "head_dim": 8, "apply": [
                      {"targets": "model.layers.1.self_attn", "location": "q_attn"},
                      {"targets": "model.layers.1.self_attn", "location": "k_cache"}]}}}}}"#
                .into(),
            vec!["config_groups.B", "config_groups.A"],
        ),
    ];
    let head_dim = |json: &str| {
        if json.contains("\"head_dim\": 6,") {
            6
        } else {
            8
        }
    };
    for (json, needles) in cases {
        let e = err_of(&json, 2, head_dim(&json), None);
        assert_err_names(&e, &needles);
    }
}

#[test]
fn weight_errors_name_the_tensor() {
    let d = 8;
    let json = config(&r3("random-matrix", ""));
    let good: Vec<f64> = orthogonal(d, 3).iter().copied().collect();
    let mut skewed = good.clone();
    skewed[0] += 0.25;
    let q = name(0, "q_attn", "weight");
    let k = name(0, "k_cache", "weight");
    let other = orthogonal(d, 4).iter().copied().collect::<Vec<_>>();
    let cases: Vec<(Vec<Tensor>, Vec<&str>)> = vec![
        (
            vec![(&q, Dtype::F32, vec![d, d / 2], good[..d * d / 2].to_vec())],
            vec![&q, "[8, 4]"],
        ),
        (
            vec![(&q, Dtype::F32, vec![d, d], skewed)],
            vec![&q, "not orthogonal"],
        ),
        (
            vec![(&q, Dtype::I8, vec![d, d], vec![1.0; d * d])],
            vec![&q, "I8"],
        ),
        (
            vec![
                (&q, Dtype::F32, vec![d, d], good.clone()),
                (&k, Dtype::F32, vec![d, d], other),
            ],
            vec![&k, &q],
        ),
        (
            vec![(
                "model.layers.0.self_attn.R3_v_cache.weight",
                Dtype::F32,
                vec![d, d],
                good,
            )],
            vec!["config_groups.R3.type", "R3_q_attn.weight", "is not in"],
        ),
    ];
    for (tensors, needles) in cases {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.safetensors");
        write_tensors(&file, &tensors);
        assert_err_names(&err_of(&json, 2, d, Some(&file)), &needles);
    }
    // A permutation that is not one.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    let p = name(0, "q_attn", "perm");
    write_tensors(
        &file,
        &[(
            &p,
            Dtype::I64,
            vec![d],
            vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 6.0],
        )],
    );
    let json = config(&r3("hadamard", r#""randomize": true,"#));
    assert_err_names(&err_of(&json, 1, d, Some(&file)), &[&p, "permutation"]);
}

#[test]
fn broken_files_are_errors() {
    let json = config(&r3("random-matrix", ""));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    let v: Vec<f64> = orthogonal(8, 1).iter().copied().collect();
    write_tensors(
        &file,
        &[(&name(0, "q_attn", "weight"), Dtype::F32, vec![8, 8], v)],
    );
    let full = std::fs::read(&file).unwrap();
    for cut in [0, 5, 8, 20, full.len() - 1] {
        std::fs::write(&file, &full[..cut]).unwrap();
        let e = err_of(&json, 1, 8, Some(&file));
        assert!(e.to_string().contains("model.safetensors"), "{e}");
    }
    let e = err_of(&json, 1, 8, Some(&dir.path().join("missing.safetensors")));
    assert!(matches!(e, CheckpointError::Io { .. }), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any text: an answer, never a panic.
    #[test]
    fn arbitrary_text_never_panics(s in "\\PC{0,200}") {
        if let Ok(Some(cfg)) = TransformConfig::from_config_json(&s) {
            let _ = cfg.plans(2, 8, None);
        }
    }

    /// Mangled valid configs: an answer, never a panic.
    #[test]
    fn mangled_configs_never_panic(cut in 0usize..400, byte in any::<u8>()) {
        let mut json = config(&r3("random-hadamard", r#""randomize": true,"#)).into_bytes();
        if cut < json.len() {
            json[cut] = byte;
        }
        if let Ok(s) = std::str::from_utf8(&json) {
            if let Ok(Some(cfg)) = TransformConfig::from_config_json(s) {
                let _ = cfg.plans(2, 8, None);
            }
        }
    }

    /// Any orthogonal matrix stored per layer is reproduced by the plan's rotation.
    #[test]
    fn stored_orthogonal_matrices_round_trip(log_d in 1u32..6, seed in any::<u64>(), inverse in any::<bool>()) {
        let d = 1usize << log_d;
        let m = orthogonal(d, seed);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.safetensors");
        write_tensors(&file, &[(&name(0, "q_attn", "weight"), Dtype::F64, vec![d, d], m.iter().copied().collect())]);
        let inv = if inverse { r#", "inverse": true}"# } else { "}" };
        let json = config(&r3("random-matrix", "").replace(r#""head_dim": 8,"#, &format!(r#""head_dim": {d},"#))
            .replace(r#""location": "q_attn"}"#, &format!(r#""location": "q_attn"{inv}"#))
            .replace(r#""location": "k_cache"}"#, &format!(r#""location": "k_cache"{inv}"#)));
        let plans = parse(&json).plans(1, d, Some(&file)).unwrap();
        // random-matrix stores the applied matrix itself, inverse or not.
        assert_applies(plans[0].qk.as_ref().unwrap(), &m, seed, 1e-12);
    }
}

/// The `transform_config` objects llm-compressor's modifiers write (compressed-tensors sorts
/// the keys and writes every field; values as `SpinQuantModifier` and `QuIPModifier` set them,
/// from their source: docs/integration.md), each parsed into the expected per-layer plans.
#[test]
fn published_configs_give_their_plans() {
    let wrap = |tc: &str| {
        format!(
            r#"{{"architectures": ["LlamaForCausalLM"], "head_dim": 64, "quantization_config":
               {{"quant_method": "compressed-tensors", "transform_config": {tc}}}}}"#
        )
    };
    let r3 = r#""R3": {"apply": [{"ignore": [], "inverse": false, "location": "q_attn", "targets": ["re:.*self_attn$"]}, {"ignore": [], "inverse": false, "location": "k_cache", "targets": ["re:.*self_attn$"]}], "head_dim": 64, "precision": "torch.float64", "randomize": false, "requires_grad": false, "type": "hadamard"}"#;
    let r1 = r#""R1": {"apply": [{"ignore": [], "inverse": false, "location": "weight_output", "targets": ["re:.*embed_tokens$", "re:.*o_proj$", "re:.*down_proj$"]}, {"ignore": [], "inverse": true, "location": "weight_input", "targets": ["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$", "re:.*up_proj$", "re:.*gate_proj$", "lm_head"]}], "head_dim": null, "precision": "torch.float64", "randomize": false, "requires_grad": false, "type": "hadamard"}"#;
    let r2 = r#""R2": {"apply": [{"ignore": [], "inverse": false, "location": "weight_output", "targets": ["re:.*v_proj$"]}, {"ignore": [], "inverse": true, "location": "weight_input", "targets": ["re:.*o_proj$"]}], "head_dim": 64, "precision": "torch.float64", "randomize": false, "requires_grad": false, "type": "hadamard"}"#;
    let r4 = r#""R4": {"apply": [{"ignore": [], "inverse": false, "location": "input", "targets": ["re:.*down_proj$"]}, {"ignore": [], "inverse": true, "location": "weight_input", "targets": ["re:.*down_proj$"]}], "head_dim": null, "precision": "torch.float64", "randomize": false, "requires_grad": false, "type": "hadamard"}"#;
    let quip = r#""v": {"apply": [{"ignore": ["lm_head"], "inverse": false, "location": "input", "targets": ["Linear"]}, {"ignore": ["lm_head"], "inverse": true, "location": "weight_input", "targets": ["Linear"]}], "head_dim": 128, "precision": "torch.float64", "randomize": false, "requires_grad": false, "type": "hadamard"}"#;
    let h = Some(Rotation::hadamard(64).unwrap());
    let cases: [(String, Option<Rotation>); 4] = [
        // SpinQuant R3 alone (llm-compressor's experimental R3 example).
        (format!(r#"{{"config_groups": {{{r3}}}}}"#), h.clone()),
        // R1, R2, R4: weights and MLP inputs only, the cache untouched.
        (
            format!(r#"{{"config_groups": {{{r1}, {r2}, {r4}}}}}"#),
            None,
        ),
        // All four (R1 and R4 without a block size: `head_dim` null).
        (
            format!(r#"{{"config_groups": {{{r1}, {r2}, {r3}, {r4}}}}}"#),
            h,
        ),
        // QuIP: `Linear` targets, `lm_head` ignored; no attention location.
        (format!(r#"{{"config_groups": {{{quip}}}}}"#), None),
    ];
    for (tc, want) in cases {
        let plans = parse(&wrap(&tc)).plans(3, 64, None).unwrap();
        assert!(plans.iter().all(|p| p.qk == want && p.v.is_none()), "{tc}");
    }
}

/// compressed-tensors' matching: `re:` at the start of the full name, exact names, the model's
/// attention class and `Module`, ignore winning; layers no scheme selects stay unrotated;
/// a smaller `head_dim` repeats along the head; two schemes on disjoint layers.
#[test]
fn targets_and_ignore_select_layers() {
    let scheme = |targets: &str, ignore: &str, head_dim: usize| {
        format!(
            r#"{{"architectures": ["LlamaForCausalLM"], "quantization_config": {{"transform_config":
               {{"config_groups": {{"R3": {{"type": "hadamard", "head_dim": {head_dim}, "apply": [
               {{"targets": {targets}, "ignore": {ignore}, "location": "q_attn"}},
               {{"targets": {targets}, "ignore": {ignore}, "location": "k_cache"}}]}}}}}}}}}}"#
        )
    };
    let rotated = |json: &str| -> Vec<bool> {
        parse(json)
            .plans(4, 8, None)
            .unwrap()
            .iter()
            .map(|p| p.qk.is_some())
            .collect()
    };
    let cases = [
        (
            r#"["re:model\\.layers\\.(0|1)\\.self_attn$"]"#,
            "[]",
            [true, true, false, false],
        ),
        (
            r#""re:.*self_attn$""#,
            r#""re:model\\.layers\\.0\\.""#,
            [false, true, true, true],
        ),
        (
            r#"["model.layers.2.self_attn"]"#,
            "[]",
            [false, false, true, false],
        ),
        (
            r#"["LlamaAttention"]"#,
            r#"["model.layers.3.self_attn"]"#,
            [true, true, true, false],
        ),
        (r#""Module""#, "[]", [true, true, true, true]),
        // `re:` matches at the start only: `.*attn` also takes `self_attn`.
        (
            r#""re:.*attn""#,
            r#""re:.*layers\\.[13]""#,
            [true, false, true, false],
        ),
    ];
    for (targets, ignore, want) in cases {
        assert_eq!(
            rotated(&scheme(targets, ignore, 8)),
            want,
            "{targets} minus {ignore}"
        );
    }
    // head_dim 4 within heads of 8: the 4-point Hadamard on each half.
    let plans = parse(&scheme(r#""re:.*self_attn$""#, "[]", 4))
        .plans(4, 8, None)
        .unwrap();
    assert_eq!(plans[0].qk, Some(Rotation::block_hadamard(8, 4).unwrap()));
    // Two schemes on disjoint layers: each its own.
    let two = r#"{"quantization_config": {"transform_config": {"config_groups": {
        "A": {"type": "hadamard", "head_dim": 8, "apply": [
              {"targets": "re:model\\.layers\\.[01]\\.", "location": "q_attn"},
              {"targets": "re:model\\.layers\\.[01]\\.", "location": "k_cache"}]},
        "B": {"type": "hadamard", "head_dim": 4, "apply": [
              {"targets": "model.layers.3.self_attn", "location": "q_attn"},
              {"targets": "model.layers.3.self_attn", "location": "k_cache"}]}}}}}"#;
    let plans = parse(two).plans(4, 8, None).unwrap();
    let got: Vec<Option<Rotation>> = plans.into_iter().map(|p| p.qk).collect();
    assert_eq!(
        got,
        [
            Some(Rotation::hadamard(8).unwrap()),
            Some(Rotation::hadamard(8).unwrap()),
            None,
            Some(Rotation::block_hadamard(8, 4).unwrap())
        ]
    );
}

/// Module names come from the checkpoint's tensors: attention under a vision tower and under
/// the decoder, the decoder's stack (of the model's layer count) taken, and targets matched
/// against the real names.
#[test]
fn module_names_come_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    let w = |n: String| (n, Dtype::F32, vec![2usize, 2], vec![1.0, 0.0, 0.0, 1.0]);
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<f64>)> = Vec::new();
    for l in 0..3 {
        tensors.push(w(format!(
            "model.language_model.layers.{l}.self_attn.k_proj.weight"
        )));
    }
    for l in 0..2 {
        tensors.push(w(format!(
            "model.vision_tower.layers.{l}.self_attn.k_proj.weight"
        )));
    }
    let refs: Vec<Tensor> = tensors
        .iter()
        .map(|(n, d, s, v)| (n.as_str(), *d, s.clone(), v.clone()))
        .collect();
    write_tensors(&file, &refs);
    let json = |target: &str| config(&r3("hadamard", "").replace("re:.*self_attn$", target));
    let plans = parse(&json(
        r"re:model\\.language_model\\.layers\\.[12]\\.self_attn$",
    ))
    .plans(3, 8, Some(&file))
    .unwrap();
    let got: Vec<bool> = plans.iter().map(|p| p.qk.is_some()).collect();
    assert_eq!(got, [false, true, true]);
    // Llama's names are not this checkpoint's: a target naming them matches nothing.
    let e = err_of(&json("model.layers.1.self_attn"), 3, 8, Some(&file));
    assert_err_names(
        &e,
        &[
            "targets[0]",
            "model.layers.1.self_attn",
            "matches no module",
        ],
    );
}
