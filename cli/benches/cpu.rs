//! Criterion benches of the CPU kernels, each group timing ours beside its peer on the same
//! data, with throughput in bytes read + written (see `rotq_cli::bench` for the conventions and
//! `rotq bench --device cpu` for the same comparisons as one table of ratios).

// criterion_group! and criterion_main! define public items without docs.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rotq::{KvFormat, Rotation, RotationPlan};
use rotq_cli::bench::{dense_rotation, parallel_copy, random};
use rotq_cpu::{CacheCodec, CpuAttention, CpuRotation, Isa, KvCacheView, QueryMode};
use std::time::Duration;

const BYTES: usize = 64 << 20;

fn copy(c: &mut Criterion) {
    let src = vec![1u8; BYTES];
    let mut dst = vec![0u8; BYTES];
    let mut g = c.benchmark_group("ceiling");
    g.throughput(Throughput::Bytes(2 * BYTES as u64));
    g.bench_function("parallel_memcpy_64MiB", |b| {
        b.iter(|| parallel_copy(&mut dst, &src))
    });
    g.finish();
}

fn fwht(c: &mut Criterion) {
    for n in [128usize, 4096] {
        let rotation = Rotation::hadamard(n).unwrap();
        let len = BYTES / 4 / n * n;
        let mut x = random(len, 1);
        let mut g = c.benchmark_group(format!("fwht_f32_n{n}"));
        g.throughput(Throughput::Bytes(8 * len as u64));
        for (name, isa) in [("ours", Isa::best()), ("portable_fwht", Isa::Portable)] {
            let k = CpuRotation::new(&rotation, isa);
            g.bench_function(name, |b| b.iter(|| k.forward_rows(&mut x).unwrap()));
        }
        // The dense product on fewer rows (its cost per row is fixed), throughput to match.
        let rows = (len / n).min(((1usize << 29) / (n * n)).max(8));
        let dense = dense_rotation(&rotation).unwrap();
        g.throughput(Throughput::Bytes(8 * (rows * n) as u64));
        g.bench_function(BenchmarkId::new("dense_matmul", rows), |b| {
            b.iter(|| dense.forward_rows(&mut x[..rows * n]).unwrap())
        });
        g.finish();
    }
}

fn rotate_quantize(c: &mut Criterion) {
    let n = 128;
    let len = BYTES / 4 / n * n;
    let rotation = Rotation::hadamard(n).unwrap();
    let x = random(len, 2);
    for format in [KvFormat::Q4_0, KvFormat::Q8_0] {
        let fused = CacheCodec::new(format, n, Some(&rotation), Isa::best()).unwrap();
        let plain = CacheCodec::new(format, n, None, Isa::best()).unwrap();
        let rotate = CpuRotation::new(&rotation, Isa::best());
        let mut cache = vec![0u8; len / n * fused.row_bytes()];
        let mut tmp = vec![0f32; len];
        let mut g = c.benchmark_group(format!("rotate_quantize_{format}"));
        g.throughput(Throughput::Bytes((4 * len + cache.len()) as u64));
        g.bench_function("fused", |b| {
            b.iter(|| fused.quantize(&x, &mut cache, 0).unwrap())
        });
        g.bench_function("two_pass", |b| {
            b.iter(|| {
                tmp.copy_from_slice(&x);
                rotate.forward_rows(&mut tmp).unwrap();
                plain.quantize(&tmp, &mut cache, 0).unwrap();
            })
        });
        g.finish();
    }
}

fn decode(c: &mut Criterion) {
    let (n_kv, h_kv, h_q, d) = (32 * 1024, 8, 32, 128);
    let rotation = Rotation::hadamard(d).unwrap();
    let plan = RotationPlan {
        qk: Some(rotation.clone()),
        v: None,
    };
    let kernel = CpuAttention::new(&plan, Isa::best());
    // The same kernel with q8_0 queries (integer products over q4_0 and q8_0 K).
    let int_kernel = kernel.clone().with_query_mode(QueryMode::Q8_0);
    let params = rotq::AttentionParams {
        causal: true,
        pos_offset: n_kv - 1,
        ..Default::default()
    };
    let q = random(h_q * d, 3);
    let rows = random(n_kv * h_kv * d, 4);
    let mut g = c.benchmark_group("decode_32k_8x128_gqa4");
    for format in [KvFormat::Q4_0, KvFormat::Q8_0, KvFormat::F16] {
        let kc = CacheCodec::new(format, d, Some(&rotation), Isa::best()).unwrap();
        let vc = CacheCodec::new(format, d, None, Isa::best()).unwrap();
        let mut kb = vec![0u8; n_kv * h_kv * kc.row_bytes()];
        let mut vb = vec![0u8; n_kv * h_kv * vc.row_bytes()];
        kc.quantize(&rows, &mut kb, 0).unwrap();
        vc.quantize(&rows, &mut vb, 0).unwrap();
        let k = KvCacheView::new(format, &kb, n_kv, h_kv, d).unwrap();
        let v = KvCacheView::new(format, &vb, n_kv, h_kv, d).unwrap();
        g.throughput(Throughput::Bytes((kb.len() + vb.len()) as u64));
        g.bench_function(format.name(), |b| {
            b.iter(|| kernel.run(&q, 1, h_q, &k, &v, &params).unwrap())
        });
        if format != KvFormat::F16 {
            g.bench_function(format!("{}_q8_0_query", format.name()), |b| {
                b.iter(|| int_kernel.run(&q, 1, h_q, &k, &v, &params).unwrap())
            });
        }
    }
    g.finish();
}

/// What a rotation plan costs a step, as the seeds measured it: decode with no rotation, with
/// Q/K rotated (Q rotated per step), and with V rotated too (the output rotated back); and one
/// decode step's append (16 sequences × 8 KV heads of 128) with and without the K rotation.
fn rotation_overhead(c: &mut Criterion) {
    let (n_kv, h_kv, h_q, d) = (32 * 1024, 8, 32, 128);
    let format = KvFormat::Q4_0;
    let h = Rotation::hadamard(d).unwrap();
    let codec = CacheCodec::new(format, d, None, Isa::best()).unwrap();
    let rows = random(n_kv * h_kv * d, 5);
    let mut kb = vec![0u8; n_kv * h_kv * codec.row_bytes()];
    codec.quantize(&rows, &mut kb, 0).unwrap();
    let k = KvCacheView::new(format, &kb, n_kv, h_kv, d).unwrap();
    let q = random(h_q * d, 6);
    let params = rotq::AttentionParams {
        causal: true,
        pos_offset: n_kv - 1,
        ..Default::default()
    };
    let mut g = c.benchmark_group("rotation_overhead_decode_32k_q4_0");
    g.throughput(Throughput::Bytes(2 * kb.len() as u64));
    for (name, plan) in [
        ("none", RotationPlan::none()),
        (
            "qk",
            RotationPlan {
                qk: Some(h.clone()),
                v: None,
            },
        ),
        (
            "qk_and_v",
            RotationPlan {
                qk: Some(h.clone()),
                v: Some(h.clone()),
            },
        ),
    ] {
        let kernel = CpuAttention::new(&plan, Isa::best());
        g.bench_function(name, |b| {
            b.iter(|| kernel.run(&q, 1, h_q, &k, &k, &params).unwrap())
        });
    }
    g.finish();
    let step = random(16 * h_kv * d, 7);
    let mut out = vec![0u8; 16 * h_kv * codec.row_bytes()];
    let mut g = c.benchmark_group("rotation_overhead_append_16x8x128_q4_0");
    g.throughput(Throughput::Bytes((step.len() * 4 + out.len()) as u64));
    for (name, rotation) in [("none", None), ("hadamard", Some(&h))] {
        let codec = CacheCodec::new(format, d, rotation, Isa::best()).unwrap();
        g.bench_function(name, |b| {
            b.iter(|| codec.quantize(&step, &mut out, 0).unwrap())
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    targets = copy, fwht, rotate_quantize, decode, rotation_overhead
}
criterion_main!(benches);
