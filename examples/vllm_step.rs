//! A vLLM-style serving loop over rotq's batch engine API: one K/V pool per layer shared by
//! every sequence, a page allocator and block tables kept by the engine, each step's new
//! tokens written into every layer's pool in one call through a slot mapping, the step's
//! attention planned once and run per layer. Steps mix decode rows with prefill and chunked
//! prefill rows; each sequence's output is checked against exact f64 attention over the
//! unquantized keys and values.
//!
//!     cargo run --release --example vllm_step

use rotq::pool::{Batch, KvPool, PageTables, PoolSpec};
use rotq::reference::attention::attention_f64;
use rotq::{AttentionParams, KvFormat, Rotation, RotationPlan};
use rotq_testkit::data::Rows;

const LAYERS: usize = 2;
const H_KV: usize = 2;
const H_Q: usize = 8;
const D: usize = 128;
const PAGE: usize = 16;
const N_PAGES: usize = 64;

/// A sequence as the engine tracks it: its pages, its length, and (to check the outputs)
/// every layer's unquantized keys and values.
#[derive(Default)]
struct Seq {
    pages: Vec<u32>,
    len: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

fn main() -> Result<(), rotq::Error> {
    let spec = PoolSpec {
        k_format: KvFormat::Q8_0,
        v_format: KvFormat::Q8_0,
        // The engine's choice; rotq::defaults::plan(D, D) honours ROTQ_DISABLE_ROTATION.
        plan: RotationPlan {
            qk: Some(Rotation::hadamard(D)?),
            v: None,
        },
        n_kv_heads: H_KV,
        head_dim: D,
        v_dim: D,
        n_pages: N_PAGES,
        page_tokens: PAGE,
        query: rotq::QueryMode::Auto,
    };
    let mut pools = (0..LAYERS)
        .map(|_| KvPool::new(spec.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut free: Vec<u32> = (0..N_PAGES as u32).rev().collect();
    let mut seqs: Vec<Seq> = Vec::new();
    let mut seed = 0u64;
    let mut draw = |n: usize| {
        seed += 1;
        Rows::uniform(1.0).every(D, 7, 8.0).f32s(n, seed)
    };

    // Each step: new tokens per sequence (a new sequence joins when its index is reached).
    let steps: [&[usize]; 5] = [
        &[40, 7, 23],
        &[1, 1, 30, 5],
        &[1, 1, 1, 1],
        &[1, 1, 1, 9],
        &[1, 1, 1, 1],
    ];
    for (step, new) in steps.iter().enumerate() {
        while seqs.len() < new.len() {
            seqs.push(Seq {
                k: vec![Vec::new(); LAYERS],
                v: vec![Vec::new(); LAYERS],
                ..Default::default()
            });
        }
        // The engine's bookkeeping: pages for the new tokens, their slots, the tables.
        let mut slots = Vec::new();
        let mut loc = vec![0u32];
        for (s, &n) in seqs.iter_mut().zip(new.iter()) {
            for t in s.len..s.len + n {
                if t % PAGE == 0 {
                    s.pages.push(free.pop().expect("the pool has pages left"));
                }
                slots.push((s.pages[t / PAGE] as usize * PAGE + t % PAGE) as i64);
            }
            s.len += n;
            loc.push(loc.last().unwrap() + n as u32);
        }
        let max_blocks = seqs.iter().map(|s| s.pages.len()).max().unwrap_or(0);
        let mut table = vec![-1i32; seqs.len() * max_blocks];
        for (row, s) in table.chunks_mut(max_blocks).zip(&seqs) {
            for (cell, &p) in row.iter_mut().zip(&s.pages) {
                *cell = p as i32;
            }
        }
        let seq_lens: Vec<u32> = seqs.iter().map(|s| s.len as u32).collect();
        let positions: Vec<u64> = seqs
            .iter()
            .zip(new.iter())
            .flat_map(|(s, &n)| (s.len - n..s.len).map(|p| p as u64))
            .collect();
        let tables = PageTables::Block {
            table: &table,
            max_blocks,
            seq_lens: &seq_lens,
        };
        let batch = Batch::new(&loc, tables, H_Q);
        let rows = slots.len();

        // Plan once per step (every layer's pool has the same spec and tables) ...
        let plan = pools[0].plan(&batch)?;
        let mut workspace = vec![0f32; plan.workspace_len()];
        let mut out = vec![0f32; plan.out_len()];
        let mut worst = 0f64;
        for (layer, pool) in pools.iter_mut().enumerate() {
            // ... write the step's keys and values in one call ...
            let (k, v) = (draw(rows * H_KV * D), draw(rows * H_KV * D));
            pool.append(&k, &v, &slots, &positions)?;
            let mut at = 0;
            for (s, &n) in seqs.iter_mut().zip(new.iter()) {
                s.k[layer].extend_from_slice(&k[at * H_KV * D..(at + n) * H_KV * D]);
                s.v[layer].extend_from_slice(&v[at * H_KV * D..(at + n) * H_KV * D]);
                at += n;
            }
            // ... and run per layer, allocating nothing.
            let q = draw(rows * H_Q * D);
            pool.run(&plan, &batch, &q, &mut workspace, &mut out, None)?;
            for (b, s) in seqs.iter().enumerate() {
                let (r0, r1) = (loc[b] as usize, loc[b + 1] as usize);
                let exact = exact(&q[r0 * H_Q * D..r1 * H_Q * D], s, layer, r1 - r0);
                let got = &out[r0 * H_Q * D..r1 * H_Q * D];
                worst = worst.max(rel_l2(got, &exact));
            }
        }
        println!(
            "step {step}: {} sequences, {rows} query rows ({} decode), {} pages in use, workspace {} floats; worst relative L2 error {worst:.4}",
            seqs.len(),
            new.iter().filter(|&&n| n == 1).count(),
            N_PAGES - free.len(),
            plan.workspace_len()
        );
        assert!(
            worst < 0.02,
            "q8_0 with the Hadamard stays within 2% of exact attention"
        );
    }
    Ok(())
}

/// Exact attention of sequence `s`'s newest `n_q` rows in `layer`, in f64.
fn exact(q: &[f32], s: &Seq, layer: usize, n_q: usize) -> Vec<f64> {
    let up = |x: &[f32], n: usize, h: usize| {
        ndarray::Array3::from_shape_vec((n, h, D), x.iter().map(|&v| f64::from(v)).collect())
            .expect("whole rows")
    };
    let params = AttentionParams {
        causal: true,
        pos_offset: s.len - n_q,
        ..Default::default()
    };
    let a = attention_f64(
        up(q, n_q, H_Q).view(),
        up(&s.k[layer], s.len, H_KV).view(),
        up(&s.v[layer], s.len, H_KV).view(),
        &params,
    )
    .expect("valid shapes");
    a.output.iter().copied().collect()
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    let got: Vec<f64> = got.iter().map(|&v| f64::from(v)).collect();
    rotq::reference::metrics::rel_l2(&got, want)
}
