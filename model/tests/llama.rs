//! The llama runner against a plain f64 forward pass written here (dense attention, no
//! cache), on small random models: one-shot prefill, chunked prefill and token-by-token
//! decode must all give its logits, and a rotated f32 cache the unrotated one's.

use rotq::cache::CacheSpec;
use rotq::{KvFormat, Rotation, RotationPlan};
use rotq_model::llama::{Config, Llama, Matrix};

fn small() -> Config {
    Config {
        n_layers: 3,
        dim: 128,
        ffn_dim: 192,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 32,
        vocab: 97,
        rope_base: 10_000.0,
        ..Config::default()
    }
}

fn mat(m: &Matrix, x: &[f64]) -> Vec<f64> {
    let n = x.len() / m.cols;
    let mut y = vec![0.0; n * m.rows];
    for t in 0..n {
        for r in 0..m.rows {
            let w = &m.data[r * m.cols..(r + 1) * m.cols];
            y[t * m.rows + r] = w
                .iter()
                .zip(&x[t * m.cols..])
                .map(|(&w, &x)| f64::from(w) * x)
                .sum();
        }
    }
    y
}

fn norm(x: &[f64], w: &[f32], eps: f32) -> Vec<f64> {
    x.chunks(w.len())
        .flat_map(|r| {
            let s = 1.0
                / (r.iter().map(|v| v * v).sum::<f64>() / r.len() as f64 + f64::from(eps)).sqrt();
            r.iter().zip(w).map(move |(v, &w)| v * s * f64::from(w))
        })
        .collect()
}

/// RoPE with adjacent pairs, in f64, at position `p`.
fn rope(head: &mut [f64], p: usize, base: f64) {
    let d = head.len();
    for i in 0..d / 2 {
        let a = p as f64 * base.powf(-2.0 * i as f64 / d as f64);
        let (x0, x1) = (head[2 * i], head[2 * i + 1]);
        head[2 * i] = x0 * a.cos() - x1 * a.sin();
        head[2 * i + 1] = x0 * a.sin() + x1 * a.cos();
    }
}

/// The logits of `tokens` at positions 0.., computed densely in f64.
fn reference(m: &Llama, tokens: &[u32]) -> Vec<f64> {
    let c = &m.config;
    let (n, d, hd) = (tokens.len(), c.dim, c.head_dim);
    let mut x: Vec<f64> = tokens
        .iter()
        .flat_map(|&t| {
            m.embeddings.data[t as usize * d..][..d]
                .iter()
                .map(|&v| f64::from(v))
        })
        .collect();
    for l in &m.layers {
        let h = norm(&x, &l.attn_norm, c.rms_eps);
        let (mut q, mut k, v) = (mat(&l.wq, &h), mat(&l.wk, &h), mat(&l.wv, &h));
        for t in 0..n {
            for head in q[t * d..(t + 1) * d].chunks_mut(hd) {
                rope(head, t, f64::from(c.rope_base));
            }
            for head in k[t * c.kv_dim()..(t + 1) * c.kv_dim()].chunks_mut(hd) {
                rope(head, t, f64::from(c.rope_base));
            }
        }
        let mut attn = vec![0.0; n * d];
        let group = c.n_heads / c.n_kv_heads;
        for t in 0..n {
            for hq in 0..c.n_heads {
                let qh = &q[t * d + hq * hd..][..hd];
                let kvh = hq / group;
                let s: Vec<f64> = (0..=t)
                    .map(|u| {
                        let kh = &k[u * c.kv_dim() + kvh * hd..][..hd];
                        qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|s| (s - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for (u, e) in e.iter().enumerate() {
                    for i in 0..hd {
                        attn[t * d + hq * hd + i] += e / z * v[u * c.kv_dim() + kvh * hd + i];
                    }
                }
            }
        }
        for (x, o) in x.iter_mut().zip(mat(&l.wo, &attn)) {
            *x += o;
        }
        let h = norm(&x, &l.ffn_norm, c.rms_eps);
        let (g, u) = (mat(&l.w_gate, &h), mat(&l.w_up, &h));
        let a: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        for (x, o) in x.iter_mut().zip(mat(&l.w_down, &a)) {
            *x += o;
        }
    }
    let h = norm(&x, &m.out_norm, c.rms_eps);
    mat(m.output.as_ref().unwrap_or(&m.embeddings), &h)
}

fn f32_cache() -> CacheSpec {
    CacheSpec {
        k_format: KvFormat::F32,
        v_format: KvFormat::F32,
        ..Default::default()
    }
}

fn max_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&a, b)| (f64::from(a) - b).abs())
        .fold(0.0, f64::max)
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 7) % 97)
        .collect()
}

#[test]
fn prefill_matches_a_dense_f64_forward_pass() {
    for seed in 0..3 {
        let m = Llama::random(small(), seed).unwrap();
        let toks = tokens(40, seed as u32);
        let want = reference(&m, &toks);
        let mut caches = m.caches(&f32_cache(), 64).unwrap();
        let got = m.forward(&toks, &mut caches, None).unwrap();
        let scale = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
        assert!(scale > 0.5, "logits of order one, got {scale}");
        let err = max_diff(&got, &want);
        assert!(
            err < 1e-4 * scale.max(1.0),
            "seed {seed}: max error {err:e}"
        );
    }
}

#[test]
fn chunked_prefill_and_decode_match_one_shot() {
    let m = Llama::random(small(), 11).unwrap();
    let toks = tokens(29, 5);
    let want = reference(&m, &toks);
    for chunk in [1, 4, 7, 29] {
        let mut caches = m.caches(&f32_cache(), 32).unwrap();
        let mut got = Vec::new();
        for c in toks.chunks(chunk) {
            got.extend(m.forward(c, &mut caches, None).unwrap());
        }
        let err = max_diff(&got, &want);
        assert!(err < 1e-4, "chunks of {chunk}: max error {err:e}");
        assert_eq!(caches[2].positions(), (0..29).collect::<Vec<_>>());
    }
}

#[test]
fn a_rotated_f32_cache_gives_the_unrotated_logits() {
    let m = Llama::random(small(), 3).unwrap();
    let toks = tokens(24, 9);
    let want = reference(&m, &toks);
    for plan in [
        RotationPlan {
            qk: Some(Rotation::hadamard(32).unwrap()),
            v: None,
        },
        RotationPlan {
            qk: Some(Rotation::randomized(32, 7).unwrap()),
            v: Some(Rotation::block_hadamard(32, 16).unwrap()),
        },
    ] {
        let mut caches = m
            .caches(
                &CacheSpec {
                    plan,
                    ..f32_cache()
                },
                24,
            )
            .unwrap();
        let got = m.forward(&toks, &mut caches, None).unwrap();
        let err = max_diff(&got, &want);
        assert!(err < 1e-4, "max error {err:e}");
    }
}

#[test]
fn bad_tokens_and_cache_counts_are_errors() {
    let m = Llama::random(small(), 1).unwrap();
    let mut caches = m.caches(&f32_cache(), 4).unwrap();
    assert!(m.forward(&[97], &mut caches, None).is_err());
    assert!(m.forward(&[1; 5], &mut caches, None).is_err()); // over capacity
    assert!(m.forward(&[1], &mut caches[..2], None).is_err());
}

#[test]
fn chunk_scores_do_not_depend_on_the_prefill_batch() {
    use rotq_model::perplexity::chunk_log_probs;
    let m = Llama::random(small(), 4).unwrap();
    let toks = tokens(30, 2);
    let want = chunk_log_probs(&m, &toks, &f32_cache(), 30).unwrap();
    assert_eq!(want.targets, &toks[16..]);
    assert_eq!(want.log_probs.len(), 14 * 97);
    // Rows of a probability distribution: log-probabilities that sum to one.
    for row in want.log_probs.chunks(97) {
        let total: f64 = row.iter().map(|&l| f64::from(l).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
    }
    for batch in [1, 3, 15, 16, 17] {
        let got = chunk_log_probs(&m, &toks, &f32_cache(), batch).unwrap();
        assert_eq!(got.targets, want.targets);
        let err = got
            .log_probs
            .iter()
            .zip(&want.log_probs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-4, "batch {batch}: {err:e}");
    }
}

/// A run that broke (NaN logits) scores NaN, never a perfect agreement.
#[test]
fn nan_log_probs_are_not_perfect_scores() {
    use rotq_model::perplexity::{ChunkLogProbs, Tally};
    let good = ChunkLogProbs {
        log_probs: vec![-0.1, -2.4, -3.0, -1.0],
        targets: vec![0, 1],
        vocab: 2,
    };
    let broken = ChunkLogProbs {
        log_probs: vec![f32::NAN; 4],
        ..good.clone()
    };
    let mut t = Tally::default();
    t.add(&good, &broken).unwrap();
    let s = t.summary(None);
    assert!(s.kld_mean.is_nan() && s.ppl.is_nan(), "{s:?}");
    assert_eq!(s.top1, 0.0);
    let mut same = Tally::default();
    same.add(&good, &good).unwrap();
    assert_eq!(
        (same.summary(None).kld_max, same.summary(None).top1),
        (0.0, 1.0)
    );
}

/// Running configurations side by side (`jobs`) changes nothing in the scores: each has its
/// own caches, and the tallies are added in the grid's order.
#[test]
fn grid_jobs_do_not_change_the_scores() {
    use rotq_model::grid::{run, GridOptions};
    let m = Llama::random(small(), 5).unwrap();
    let tokens: Vec<u32> = (0..96u32).map(|i| (i * 31 + 7) % 97).collect();
    let opts = |jobs| GridOptions {
        ctx: 48,
        chunks: None,
        batch: 16,
        k_formats: vec![KvFormat::Q4_0, KvFormat::Q8_0],
        v_formats: vec![KvFormat::Q4_0],
        plans: vec!["none".parse().unwrap(), "hadamard".parse().unwrap()],
        jobs,
        ..GridOptions::default()
    };
    let scores = |jobs| {
        let r = run(&m, &tokens, &opts(jobs), |_, _| {}).unwrap();
        r.rows
            .iter()
            .map(|r| {
                (
                    r.k_format.clone(),
                    r.plan.clone(),
                    r.summary.kld_mean.to_bits(),
                )
            })
            .collect::<Vec<_>>()
    };
    let one = scores(1);
    assert_eq!(one.len(), 2 + 4);
    assert!(one.iter().skip(2).all(|r| f64::from_bits(r.2) > 0.0));
    assert_eq!(scores(3), one);
    assert!(run(&m, &tokens, &opts(0), |_, _| {}).is_err());
}
