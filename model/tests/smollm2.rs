//! SmolLM2-135M end to end (skipped without the model; `cli/scripts/fetch-models.sh` fetches
//! it, and CI sets `ROTQ_REQUIRE_MODEL=1`): the tokenizer and the runner's f32 perplexity
//! against the NumPy forward pass of `cli/scripts/make-activation-fixture.py`
//! (`cli/tests/data/smollm2-reference.json`), the f16 cache's perplexity gap, the Hadamard's
//! gain on a q4_0 K cache, and the context shift against a wrong one.

mod common;

use std::path::Path;

use rotq::cache::CacheSpec;
use rotq::reference::rope::RopeVariant;
use rotq::{KvFormat, Rotation, RotationPlan};
use rotq_model::gguf::Gguf;
use rotq_model::grid::{run, GridOptions};
use rotq_model::shift::{compare, ShiftOptions};
use rotq_model::tokenizer::Tokenizer;

fn data(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cli/tests/data")
        .join(name)
}

/// The model of `path` and the evaluation text in its tokens.
fn model_and_text(path: &Path) -> (rotq_model::llama::Llama, Vec<u32>) {
    let file = Gguf::open(path).unwrap();
    let model = rotq_model::load::llama(&file).unwrap();
    let text = std::fs::read_to_string(data("eval-text/text.txt")).unwrap();
    (model, Tokenizer::from_gguf(&file).unwrap().encode(&text))
}

#[test]
fn smollm2_matches_the_numpy_reference_and_rotation_helps_q4_0_keys() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data("smollm2-reference.json")).unwrap()).unwrap();
    let file = Gguf::open(&path).unwrap();
    let tokenizer = Tokenizer::from_gguf(&file).unwrap();
    let text = std::fs::read_to_string(data("eval-text/text.txt")).unwrap();
    let tokens = tokenizer.encode(&text);
    let want: Vec<u32> = reference["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(
        tokens.len() as u64,
        reference["text_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        &tokens[..want.len()],
        &want[..],
        "the tokenizer's ids differ from HF's"
    );

    let model = rotq_model::load::llama(&file).unwrap();
    let opts = GridOptions {
        ctx: reference["ctx"].as_u64().unwrap() as usize,
        chunks: Some(reference["chunks"].as_u64().unwrap() as usize),
        k_formats: vec![KvFormat::Q4_0],
        v_formats: vec![KvFormat::F16],
        plans: vec!["none".parse().unwrap(), "hadamard".parse().unwrap()],
        ..GridOptions::default()
    };
    let report = run(&model, &want, &opts, |_, _| {}).unwrap();
    let [f16, f32, plain, rotated] = &report.rows[..] else {
        panic!("{report:?}")
    };
    let numpy = reference["perplexity"].as_f64().unwrap();
    eprintln!(
        "f32 cache {} (NumPy {numpy}), f16 {}",
        f32.summary.ppl, f16.summary.ppl
    );
    assert!(
        (f32.summary.ppl / numpy - 1.0).abs() < 0.005,
        "{f32:?} vs {numpy}"
    );
    assert!(
        (f16.summary.ppl / f32.summary.ppl - 1.0).abs() < 0.001,
        "{f16:?} vs {f32:?}"
    );
    assert_eq!(
        (plain.plan.as_str(), rotated.plan.as_str()),
        ("none", "hadamard")
    );
    eprintln!(
        "q4_0 K: {:?}\nq4_0 K, Hadamard: {:?}",
        plain.summary, rotated.summary
    );
    assert!(
        rotated.summary.kld_mean < plain.summary.kld_mean,
        "{plain:?} {rotated:?}"
    );
}

#[test]
fn smollm2_context_shift_stays_near_recomputation_and_a_wrong_shift_does_not() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let (model, tokens) = model_and_text(&path);
    let spec = CacheSpec {
        k_format: KvFormat::Q8_0,
        v_format: KvFormat::Q8_0,
        plan: RotationPlan {
            qk: Some(Rotation::hadamard(64).unwrap()),
            v: None,
        },
        ..Default::default()
    };
    let opts = ShiftOptions {
        ctx: 256,
        keep: 4,
        batch: 32,
        rope: None,
    };
    let right = compare(&model, &tokens[..400], &spec, &opts).unwrap();
    let wrong_rope = rotq::reference::rope::Rope {
        variant: RopeVariant::Neox,
        ..model.config.rope()
    };
    let wrong = compare(
        &model,
        &tokens[..400],
        &spec,
        &ShiftOptions {
            rope: Some(wrong_rope),
            ..opts
        },
    )
    .unwrap();
    eprintln!("right {right:?}\nwrong {wrong:?}");
    assert!(right.scored >= 64, "{right:?}");
    assert!(
        (right.ppl_shifted / right.ppl_recomputed - 1.0).abs() < 0.05,
        "{right:?}"
    );
    assert!(
        wrong.kld_mean > 5.0 * right.kld_mean,
        "right {right:?}, wrong {wrong:?}"
    );
}

/// `agreement` on one backend twice: the f16 and f32 caches first, then the grid's
/// configurations, every pair of runs equal (KL divergence 0, the same top token), and each
/// configuration's perplexity the grid's own for it.
#[test]
fn smollm2_agreement_of_a_backend_with_itself_is_exact() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let (model, tokens) = model_and_text(&path);
    let opts = GridOptions {
        ctx: 48,
        chunks: Some(1),
        batch: 16,
        k_formats: vec![KvFormat::Q4_0],
        v_formats: vec![KvFormat::Q8_0],
        plans: vec!["none".parse().unwrap(), "hadamard".parse().unwrap()],
        ..GridOptions::default()
    };
    let cpu = rotq::cache::Backend::Cpu;
    let rows =
        rotq_model::grid::agreement((&model, &cpu), (&model, &cpu), &tokens, &opts, |_, _| {})
            .unwrap();
    let grid = run(&model, &tokens, &opts, |_, _| {}).unwrap();
    assert_eq!(rows.len(), grid.rows.len());
    for (a, g) in rows.iter().zip(&grid.rows) {
        assert_eq!(
            (&a.k_format, &a.v_format, &a.plan),
            (&g.k_format, &g.v_format, &g.plan)
        );
        assert_eq!(a.summary.kld_max, 0.0, "{a:?}");
        assert_eq!(a.summary.top1, 1.0, "{a:?}");
        assert_eq!(a.ppl_first, a.summary.ppl, "{a:?}");
        assert!(
            (a.ppl_first / g.summary.ppl - 1.0).abs() < 1e-12,
            "{a:?} vs the grid's {g:?}"
        );
    }
}
