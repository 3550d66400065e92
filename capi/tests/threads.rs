//! One cache handle used from 8 threads at once through the C API: appends and attention
//! race, and every result is checked. Keys and values are f32 (lossless) under a Hadamard
//! rotation of Q and K, so attention is exact up to f32 rounding. While appends race, the rows
//! a thread's attention sees are unknown, but its output is a weighted mean of the values held:
//! each output value lies within the range of that column over every row appended. Once every
//! append is done, the cache holds every thread's rows in some order, and non-causal attention
//! does not depend on the order: each thread's attention, run at once with the others', equals
//! the oracle's over all the rows.

mod common;
use common::last_error;

use ndarray::Array3;
use rotq::reference::attention::attention_f64;
use rotq::reference::tolerance::{tolerance, Op, Precision};
use rotq::AttentionParams;
use rotq_capi::*;
use rotq_testkit::data::Rows;
use std::sync::Barrier;

const THREADS: usize = 8;
const ROUNDS: usize = 200;
/// Tokens per append.
const CHUNK: usize = 2;
const H_KV: usize = 2;
const H_Q: usize = 4;
const D: usize = 64;
const TOKEN: usize = H_KV * D;

/// A cache handle shared by the threads.
#[derive(Clone, Copy)]
struct Shared(*mut RotqCache);
// SAFETY: the C API documents every cache call as safe from several threads at once (the
// handle serialises what changes it); the handle outlives the threads (scoped, freed after).
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

fn random(len: usize, seed: u64) -> Vec<f32> {
    Rows::uniform(1.0).f32s(len, seed)
}

fn params() -> RotqAttentionParams {
    RotqAttentionParams {
        causal: false,
        pos_offset: 0,
        window: 0,
        softcap: 0.0,
        scale: 0.0,
    }
}

/// One query row of `H_Q` heads against the cache.
fn attend(cache: Shared, q: &[f32]) -> Result<Vec<f32>, String> {
    let mut out = vec![0f32; H_Q * D];
    let p = params();
    // SAFETY: a live handle, `q` of 1 x H_Q x D floats, `out` of as many.
    let status = unsafe {
        rotq_cache_attention(cache.0, q.as_ptr(), 1, H_Q, &p, out.as_mut_ptr(), out.len())
    };
    match status {
        RotqStatus::Ok => Ok(out),
        _ => Err(format!("attention: {status:?}: {}", last_error())),
    }
}

/// Thread `t`'s appends of its rows `k` and `v`, CHUNK tokens at a time, each followed by an
/// attention of `q` whose every value must lie within `range(kv_head, column)` of V.
fn append_and_attend(
    cache: Shared,
    t: usize,
    k: &[f32],
    v: &[f32],
    q: &[f32],
    range: impl Fn(usize, usize) -> (f32, f32),
) -> Result<(), String> {
    let mut seen = 0;
    for (kc, vc) in k.chunks(CHUNK * TOKEN).zip(v.chunks(CHUNK * TOKEN)) {
        // SAFETY: a live handle, CHUNK tokens' floats for K and V.
        let status = unsafe { rotq_cache_append(cache.0, kc.as_ptr(), vc.as_ptr(), CHUNK) };
        if status != RotqStatus::Ok {
            return Err(format!("thread {t}: append: {status:?}: {}", last_error()));
        }
        // SAFETY: a live handle.
        let len = unsafe { rotq_cache_len(cache.0) };
        if len <= seen || len % CHUNK != 0 {
            return Err(format!("thread {t}: {len} tokens held after {seen}"));
        }
        seen = len;
        let out = attend(cache, q).map_err(|e| format!("thread {t}: {e}"))?;
        for (i, &o) in out.iter().enumerate() {
            let (lo, hi) = range(i / D / (H_Q / H_KV), i % D);
            let slack = 1e-5 * (hi - lo).abs().max(1.0);
            if !(o >= lo - slack && o <= hi + slack) {
                return Err(format!("thread {t}: output {i} = {o} outside [{lo}, {hi}]"));
            }
        }
    }
    Ok(())
}

/// The oracle: exact attention of `q` over tokens `k` and `v` (`[n, H_KV, D]`), in any order.
fn exact(q: &[f32], k: &[f32], v: &[f32]) -> Vec<f64> {
    let n = k.len() / TOKEN;
    let a = |x: &[f32], rows: usize, heads: usize| {
        Array3::from_shape_vec((rows, heads, D), x.iter().map(|&v| f64::from(v)).collect()).unwrap()
    };
    let out = attention_f64(
        a(q, 1, H_Q).view(),
        a(k, n, H_KV).view(),
        a(v, n, H_KV).view(),
        &AttentionParams::default(),
    )
    .unwrap();
    out.output.iter().copied().collect()
}

#[test]
fn one_handle_from_eight_threads_at_once() {
    let spec = RotqCacheSpec {
        k_format: c"f32".as_ptr(),
        v_format: c"f32".as_ptr(),
        qk_rotation: 1,
        v_block: 0,
        seed: 0,
        n_heads: H_KV,
        head_dim: D,
        v_dim: D,
        capacity: THREADS * ROUNDS * CHUNK,
        page_tokens: 16,
    };
    let mut cache = std::ptr::null_mut();
    // SAFETY: a valid spec with NUL-terminated names and a valid out pointer.
    assert_eq!(unsafe { rotq_cache_new(&spec, &mut cache) }, RotqStatus::Ok);
    let cache = Shared(cache);
    let rows: Vec<(Vec<f32>, Vec<f32>)> = (0..THREADS as u64)
        .map(|t| {
            let n = ROUNDS * CHUNK * TOKEN;
            (random(n, 2 * t + 1), random(n, 2 * t + 2))
        })
        .collect();
    let (all_k, all_v) = (
        rows.iter().flat_map(|r| r.0.clone()).collect::<Vec<_>>(),
        rows.iter().flat_map(|r| r.1.clone()).collect::<Vec<_>>(),
    );
    // Each V column's range over every row, per KV head.
    let range = |head: usize, j: usize| {
        all_v
            .chunks(D)
            .skip(head)
            .step_by(H_KV)
            .map(|row| row[j])
            .fold((f32::MAX, f32::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)))
    };
    let barrier = Barrier::new(THREADS);
    let failures: Vec<String> = std::thread::scope(|s| {
        let threads: Vec<_> = rows
            .iter()
            .enumerate()
            .map(|(t, (k, v))| {
                let (barrier, range, all) = (&barrier, &range, (&all_k, &all_v));
                s.spawn(move || {
                    let q = random(H_Q * D, 100 + t as u64);
                    // Every thread reaches the barrier, failed or not: none waits for ever.
                    let racing = append_and_attend(cache, t, k, v, &q, range);
                    barrier.wait();
                    racing?;
                    // SAFETY: a live handle.
                    let len = unsafe { rotq_cache_len(cache.0) };
                    if len != THREADS * ROUNDS * CHUNK {
                        return Err(format!("thread {t}: {len} tokens held"));
                    }
                    let got: Vec<f64> = attend(cache, &q)?.iter().map(|&x| f64::from(x)).collect();
                    let want = exact(&q, all.0, all.1);
                    tolerance(Op::Attention, Precision::F32)
                        .check(&got, &want)
                        .map_err(|m| format!("thread {t}: {m}"))
                })
            })
            .collect();
        threads
            .into_iter()
            .filter_map(|h| match h.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some("a thread panicked".into()),
            })
            .collect()
    });
    assert!(failures.is_empty(), "{failures:#?}");
    // SAFETY: a live handle, freed once, after every thread.
    unsafe { rotq_cache_free(cache.0) };
}
