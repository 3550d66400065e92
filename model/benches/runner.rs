//! Criterion benches of the model runner at SmolLM2-135M's shape (random weights: the speed
//! does not depend on their values): a prefill of 128 tokens and one decode step at a
//! context of 384 tokens, on an f32 cache and on a Hadamard-rotated q4_0 one. The share of
//! the forward pass spent in rotq's cache calls is printed beside (the runner's own
//! accounting), and `rotq eval --model` reports both for a whole grid.

// criterion_group! and criterion_main! define public items without docs.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rotq::cache::CacheSpec;
use rotq::{KvFormat, Rotation, RotationPlan};
use rotq_model::llama::{Config, Llama};
use std::time::Duration;

fn specs() -> [(&'static str, CacheSpec); 2] {
    [
        (
            "f32",
            CacheSpec {
                k_format: KvFormat::F32,
                v_format: KvFormat::F32,
                ..Default::default()
            },
        ),
        (
            "q4_0_hadamard",
            CacheSpec {
                k_format: KvFormat::Q4_0,
                v_format: KvFormat::Q4_0,
                plan: RotationPlan {
                    qk: Some(Rotation::hadamard(64).unwrap()),
                    v: None,
                },
                ..Default::default()
            },
        ),
    ]
}

fn runner(c: &mut Criterion) {
    let model = Llama::random(Config::default(), 1).unwrap();
    let tokens: Vec<u32> = (0..384u32).map(|i| (i * 7919) % 49152).collect();
    let mut g = c.benchmark_group("smollm2_shape_prefill_128");
    g.throughput(Throughput::Elements(128));
    for (name, spec) in specs() {
        let before = model.timings();
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut caches = model.caches(&spec, 128).unwrap();
                model.forward(&tokens[..128], &mut caches, None).unwrap()
            })
        });
        share(&model, before, name);
    }
    g.finish();
    let mut g = c.benchmark_group("smollm2_shape_decode_at_384");
    g.throughput(Throughput::Elements(1));
    for (name, spec) in specs() {
        let mut caches = model.caches(&spec, 385).unwrap();
        model.forward(&tokens, &mut caches, None).unwrap();
        let before = model.timings();
        // Each step appends token 384, then drops it again (the tail: nothing moves).
        g.bench_function(name, |b| {
            b.iter(|| {
                let logits = model.forward(&[1], &mut caches, None).unwrap();
                for cache in caches.iter_mut() {
                    cache.remove(384..385).unwrap();
                }
                logits
            })
        });
        share(&model, before, name);
    }
    g.finish();
}

fn share(model: &Llama, before: rotq_model::llama::Timings, name: &str) {
    let t = model.timings();
    let (attn, total) = (t.attention - before.attention, t.total - before.total);
    eprintln!(
        "{name}: {:.1}% of the forward passes in rotq's append and attention calls",
        100.0 * attn.as_secs_f64() / total.as_secs_f64().max(1e-9)
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(8))
        .warm_up_time(Duration::from_secs(2));
    targets = runner
}
criterion_main!(benches);
