//! Criterion benches of the batch engine API (`rotq::pool`) beside the one-sequence cache on
//! the same bytes: a decode step of 16 sequences of 4k tokens through one planned `run`
//! against 16 `RotatedKvCache::attention` calls (the pool must cost nothing), the `plan` of
//! that step, and one batch append of 16 × 1 new tokens against 16 single-sequence appends.
//! The copy ceiling is `cargo bench --bench cpu -- ceiling`.
//!
//!     cargo bench -p rotq-cli --bench pool

// criterion_group! and criterion_main! define public items without docs.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rotq::cache::{CacheSpec, Paging, RotatedKvCache};
use rotq::pool::{Batch, KvPool, PageTables, PoolSpec};
use rotq::{AttentionParams, KvFormat, Rotation, RotationPlan};
use rotq_cli::bench::random;
use std::time::{Duration, Instant};

const SEQS: usize = 16;
const TOKENS: usize = 4096;
const H_KV: usize = 8;
const H_Q: usize = 32;
const D: usize = 128;
const PAGE: usize = 16;

fn plan() -> RotationPlan {
    RotationPlan {
        qk: Some(Rotation::hadamard(D).unwrap()),
        v: None,
    }
}

fn pool_spec(format: KvFormat, n_pages: usize) -> PoolSpec {
    PoolSpec {
        k_format: format,
        v_format: format,
        plan: plan(),
        n_kv_heads: H_KV,
        head_dim: D,
        v_dim: D,
        n_pages,
        page_tokens: PAGE,
        query: rotq::QueryMode::Auto,
    }
}

fn cache_spec(format: KvFormat, capacity: usize) -> CacheSpec {
    CacheSpec {
        k_format: format,
        v_format: format,
        plan: plan(),
        n_heads: H_KV,
        head_dim: D,
        v_dim: D,
        capacity,
        paging: Paging::Paged { page_tokens: PAGE },
        query: rotq::QueryMode::Auto,
    }
}

fn decode(c: &mut Criterion) {
    let pages_per_seq = TOKENS / PAGE;
    for format in [KvFormat::Q4_0, KvFormat::Q8_0] {
        // Sequence b holds pages b·256 .. (b+1)·256 of the pool; each cache the same rows.
        let mut pool = KvPool::new(pool_spec(format, SEQS * pages_per_seq)).unwrap();
        let mut caches = Vec::new();
        for b in 0..SEQS {
            let k = random(TOKENS * H_KV * D, 2 * b as u64);
            let v = random(TOKENS * H_KV * D, 2 * b as u64 + 1);
            let slots: Vec<i64> = (0..TOKENS).map(|t| (b * TOKENS + t) as i64).collect();
            let pos: Vec<u64> = (0..TOKENS as u64).collect();
            pool.append(&k, &v, &slots, &pos).unwrap();
            let mut cache = RotatedKvCache::new(cache_spec(format, TOKENS)).unwrap();
            cache.append(&k, &v).unwrap();
            caches.push(cache);
        }
        let table: Vec<i32> = (0..(SEQS * pages_per_seq) as i32).collect();
        let lens = vec![TOKENS as u32; SEQS];
        let loc: Vec<u32> = (0..=SEQS as u32).collect();
        let tables = PageTables::Block {
            table: &table,
            max_blocks: pages_per_seq,
            seq_lens: &lens,
        };
        let batch = Batch::new(&loc, tables, H_Q);
        let q = random(SEQS * H_Q * D, 99);
        let step = pool.plan(&batch).unwrap();
        let mut ws = vec![0f32; step.workspace_len()];
        let mut out = vec![0f32; step.out_len()];
        let params = AttentionParams {
            causal: true,
            pos_offset: TOKENS - 1,
            ..Default::default()
        };

        let mut g = c.benchmark_group(format!("batch_decode_{format}_16x4k"));
        g.throughput(Throughput::Bytes((pool.k().len() + pool.v().len()) as u64));
        g.measurement_time(Duration::from_secs(8));
        g.bench_function("pool_run", |bch| {
            bch.iter(|| {
                pool.run(&step, &batch, &q, &mut ws, &mut out, None)
                    .unwrap()
            })
        });
        g.bench_function("per_sequence_cache", |bch| {
            bch.iter(|| {
                for (b, cache) in caches.iter().enumerate() {
                    let qb = &q[b * H_Q * D..(b + 1) * H_Q * D];
                    std::hint::black_box(cache.attention(qb, 1, H_Q, &params).unwrap());
                }
            })
        });
        g.bench_function("plan", |bch| bch.iter(|| pool.plan(&batch).unwrap()));
        g.finish();
    }
}

fn append(c: &mut Criterion) {
    let format = KvFormat::Q4_0;
    // 16 sequences, one new token each, in 16 different pages.
    let mut pool = KvPool::new(pool_spec(format, SEQS * 4)).unwrap();
    let k = random(SEQS * H_KV * D, 7);
    let v = random(SEQS * H_KV * D, 8);
    let slots: Vec<i64> = (0..SEQS).map(|b| (b * 4 * PAGE + 5) as i64).collect();
    let pos = vec![5u64; SEQS];
    let room = 1 << 12;
    let mut caches: Vec<RotatedKvCache> = (0..SEQS)
        .map(|_| RotatedKvCache::new(cache_spec(format, room)).unwrap())
        .collect();
    let row = H_KV * D;

    let mut g = c.benchmark_group("batch_append_q4_0_16x1");
    g.throughput(Throughput::Elements(SEQS as u64));
    g.bench_function("pool_append", |bch| {
        bch.iter(|| pool.append(&k, &v, &slots, &pos).unwrap())
    });
    // Timed appends only: full caches are emptied outside the clock.
    g.bench_function("per_sequence_append", |bch| {
        bch.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                if caches[0].len() == room {
                    for cache in &mut caches {
                        cache.remove(0..room).unwrap();
                    }
                }
                let t0 = Instant::now();
                for (b, cache) in caches.iter_mut().enumerate() {
                    let (kb, vb) = (&k[b * row..(b + 1) * row], &v[b * row..(b + 1) * row]);
                    cache.append(kb, vb).unwrap();
                }
                spent += t0.elapsed();
            }
            spent
        })
    });
    g.finish();
}

criterion_group!(benches, decode, append);
criterion_main!(benches);
