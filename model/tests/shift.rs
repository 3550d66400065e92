//! The context shift on small random models. In a one-layer model the cached keys and values
//! depend on their token and position alone, so a shifted f32 cache must score exactly what a
//! recomputed one scores; deeper, the kept tokens' keys also remember the dropped context, so
//! the two differ, but far less than after a shift with the wrong RoPE pairing.

use rotq::cache::CacheSpec;
use rotq::reference::rope::RopeVariant;
use rotq::{KvFormat, Rotation, RotationPlan};
use rotq_model::llama::{Config, Llama};
use rotq_model::shift::{compare, ShiftOptions};

fn model_of(n_layers: usize, seed: u64) -> Llama {
    let config = Config {
        n_layers,
        dim: 128,
        ffn_dim: 192,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 32,
        vocab: 61,
        rope_base: 10_000.0,
        ..Config::default()
    };
    Llama::random(config, seed).unwrap()
}

fn text(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + i / 3) % 61).collect()
}

fn opts() -> ShiftOptions {
    ShiftOptions {
        ctx: 64,
        keep: 4,
        batch: 8,
        rope: None,
    }
}

#[test]
fn in_one_layer_a_shifted_f32_cache_scores_as_a_recomputed_one() {
    let spec = CacheSpec {
        k_format: KvFormat::F32,
        v_format: KvFormat::F32,
        ..Default::default()
    };
    for seed in 0..3 {
        let r = compare(&model_of(1, seed), &text(120), &spec, &opts()).unwrap();
        assert!(r.scored >= 16 && r.dropped == 30, "{r:?}");
        assert!(
            (r.ppl_shifted / r.ppl_recomputed - 1.0).abs() < 1e-4,
            "{r:?}"
        );
        assert!(r.kld_mean < 1e-6, "{r:?}");
    }
}

#[test]
fn in_one_layer_a_rotated_q8_0_shift_stays_close_and_a_wrong_one_does_not() {
    let spec = CacheSpec {
        k_format: KvFormat::Q8_0,
        v_format: KvFormat::Q8_0,
        plan: RotationPlan {
            qk: Some(Rotation::hadamard(32).unwrap()),
            v: None,
        },
        ..Default::default()
    };
    let m = model_of(1, 5);
    let wrong_rope = rotq::reference::rope::Rope {
        variant: RopeVariant::Neox,
        ..m.config.rope()
    };
    // One layer: the rotated q8_0 shift is off by its requantization only.
    let right = compare(&m, &text(120), &spec, &opts()).unwrap();
    let wrong = compare(
        &m,
        &text(120),
        &spec,
        &ShiftOptions {
            rope: Some(wrong_rope),
            ..opts()
        },
    )
    .unwrap();
    eprintln!("one layer: right {right:?}\nwrong {wrong:?}");
    assert!(right.kld_mean < 1e-3, "{right:?}");
    assert!(
        wrong.kld_mean > 100.0 * right.kld_mean.max(1e-6),
        "right {right:?}, wrong {wrong:?}"
    );
}

#[test]
fn too_short_a_text_is_an_error() {
    let spec = CacheSpec::default();
    assert!(compare(&model_of(2, 1), &text(64), &spec, &opts()).is_err());
    assert!(compare(
        &model_of(2, 1),
        &text(100),
        &spec,
        &ShiftOptions { batch: 0, ..opts() }
    )
    .is_err());
}
