//! A llama.cpp-style loop over rotq's batch engine API: per-layer pools whose slots are the
//! engine's KV cells, several sequences decoding together, a KQ mask built from the cells'
//! positions (as `llama_kv_cache` builds its mask: a cell is seen by a query of its sequence
//! at a later or equal position), and llama.cpp's context shift when a sequence runs out of
//! cells: keep the first `N_KEEP`, free half of the rest, move the later cells' keys back by
//! RoPE (`KvPool::shift`, inside the rotation) and reuse the freed cells for new tokens. Each
//! step's output is checked against exact attention over the unquantized keys (shifted the
//! same way) and values, with the same mask.
//!
//!     cargo run --release --example llama_loop

use ndarray::{Array2, Array3};
use rotq::pool::{Batch, KvPool, Mask, PageTables, PoolSpec};
use rotq::reference::attention::attention_f64_masked;
use rotq::reference::rope::{Rope, RopeVariant};
use rotq::{AttentionParams, KvFormat, Rotation, RotationPlan};
use rotq_testkit::data::Rows;

const LAYERS: usize = 2;
const SEQS: usize = 2;
const H_KV: usize = 2;
const H_Q: usize = 8;
const D: usize = 64;
const PAGE: usize = 16;
/// Cells per sequence (its context).
const N_CTX: usize = 48;
const N_KEEP: usize = 4;

/// One sequence's cells: each cell's position (`None`: free), and every layer's unquantized
/// keys and values per cell, kept to check the outputs.
struct Cells {
    pos: Vec<Option<u64>>,
    next_pos: u64,
    k: Vec<Vec<f64>>,
    v: Vec<Vec<f64>>,
}

fn main() -> Result<(), rotq::Error> {
    let spec = PoolSpec {
        k_format: KvFormat::Q4_0,
        v_format: KvFormat::Q8_0,
        plan: RotationPlan {
            qk: Some(Rotation::hadamard(D)?),
            v: None,
        },
        n_kv_heads: H_KV,
        head_dim: D,
        v_dim: D,
        n_pages: SEQS * N_CTX / PAGE,
        page_tokens: PAGE,
        query: rotq::QueryMode::Auto,
    };
    let mut pools = (0..LAYERS)
        .map(|_| KvPool::new(spec.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let rope = Rope::new(RopeVariant::Normal, D);
    // Sequence b owns pages b·3 .. b·3 + 3: its N_CTX cells.
    let per_seq = N_CTX / PAGE;
    let table: Vec<i32> = (0..(SEQS * per_seq) as i32).collect();
    let seq_lens = [N_CTX as u32; SEQS];
    let slot = |b: usize, cell: usize| ((b * per_seq + cell / PAGE) * PAGE + cell % PAGE) as i64;
    let mut seqs: Vec<Cells> = (0..SEQS)
        .map(|_| Cells {
            pos: vec![None; N_CTX],
            next_pos: 0,
            k: vec![vec![0.0; N_CTX * H_KV * D]; LAYERS],
            v: vec![vec![0.0; N_CTX * H_KV * D]; LAYERS],
        })
        .collect();
    let mut seed = 0u64;
    let mut draw = |n: usize| {
        seed += 1;
        Rows::uniform(1.0).every(D, 5, 6.0).f32s(n, seed)
    };

    let mut shifts = 0;
    // A prompt each, then decode steps: 30 + 50 positions for sequence 0 pass N_CTX twice.
    for step in 0..60 {
        let new = if step == 0 { [30, 20] } else { [1, 1] };
        // Cells for the new tokens: free ones, after a context shift if there are too few.
        let mut cells: Vec<Vec<usize>> = Vec::new();
        for (b, s) in seqs.iter_mut().enumerate() {
            if s.pos.iter().filter(|p| p.is_none()).count() < new[b] {
                context_shift(b, s, &mut pools, &rope, &slot)?;
                shifts += 1;
            }
            let free: Vec<usize> = (0..N_CTX)
                .filter(|&c| s.pos[c].is_none())
                .take(new[b])
                .collect();
            for &c in &free {
                s.pos[c] = Some(s.next_pos);
                s.next_pos += 1;
            }
            cells.push(free);
        }
        let slots: Vec<i64> = (0..SEQS)
            .flat_map(|b| cells[b].iter().map(move |&c| slot(b, c)))
            .collect();
        let positions: Vec<u64> = (0..SEQS)
            .flat_map(|b| {
                cells[b]
                    .iter()
                    .map(|&c| seqs[b].pos[c].unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        // The KQ mask: row r (a new token) sees the live cells of its sequence at positions
        // up to its own; every other cell is -inf.
        let rows = slots.len();
        let mut mask = vec![f32::NEG_INFINITY; rows * N_CTX];
        let mut r = 0;
        for (b, s) in seqs.iter().enumerate() {
            for &c in &cells[b] {
                let at = s.pos[c].unwrap();
                for (j, p) in s.pos.iter().enumerate() {
                    if p.is_some_and(|p| p <= at) {
                        mask[r * N_CTX + j] = 0.0;
                    }
                }
                r += 1;
            }
        }
        let loc = [0, new[0] as u32, (new[0] + new[1]) as u32];
        let tables = PageTables::Block {
            table: &table,
            max_blocks: per_seq,
            seq_lens: &seq_lens,
        };
        let batch = Batch {
            params: AttentionParams::default(), // not causal: the mask says what is seen
            mask: Some(Mask {
                values: &mask,
                row_stride: N_CTX,
            }),
            ..Batch::new(&loc, tables, H_Q)
        };
        let plan = pools[0].plan(&batch)?;
        let mut workspace = vec![0f32; plan.workspace_len()];
        let mut out = vec![0f32; plan.out_len()];
        let mut worst = 0f64;
        for (layer, pool) in pools.iter_mut().enumerate() {
            let (k, v) = (draw(rows * H_KV * D), draw(rows * H_KV * D));
            pool.append(&k, &v, &slots, &positions)?;
            let mut t = 0;
            for (b, s) in seqs.iter_mut().enumerate() {
                for &c in &cells[b] {
                    let row = H_KV * D;
                    for (dst, src) in [(&mut s.k[layer], &k), (&mut s.v[layer], &v)] {
                        for (x, &y) in dst[c * row..(c + 1) * row].iter_mut().zip(&src[t * row..]) {
                            *x = f64::from(y);
                        }
                    }
                    t += 1;
                }
            }
            let q = draw(rows * H_Q * D);
            pool.run(&plan, &batch, &q, &mut workspace, &mut out, None)?;
            for (b, s) in seqs.iter().enumerate() {
                let (r0, r1) = (loc[b] as usize, loc[b + 1] as usize);
                let up = |x: &[f64], n, h| Array3::from_shape_vec((n, h, D), x.to_vec()).unwrap();
                let qa: Vec<f64> = q[r0 * H_Q * D..r1 * H_Q * D]
                    .iter()
                    .map(|&x| f64::from(x))
                    .collect();
                let m = Array2::from_shape_fn((r1 - r0, N_CTX), |(i, j)| {
                    f64::from(mask[(r0 + i) * N_CTX + j])
                });
                let exact = attention_f64_masked(
                    up(&qa, r1 - r0, H_Q).view(),
                    up(&s.k[layer], N_CTX, H_KV).view(),
                    up(&s.v[layer], N_CTX, H_KV).view(),
                    &AttentionParams::default(),
                    Some(m.view()),
                )?;
                let got: Vec<f64> = out[r0 * H_Q * D..r1 * H_Q * D]
                    .iter()
                    .map(|&x| f64::from(x))
                    .collect();
                let want: Vec<f64> = exact.output.iter().copied().collect();
                worst = worst.max(rotq::reference::metrics::rel_l2(&got, &want));
            }
        }
        if step % 10 == 0 || step == 59 {
            println!(
                "step {step}: positions {} and {}, {shifts} context shifts so far; worst relative L2 error {worst:.3}",
                seqs[0].next_pos, seqs[1].next_pos
            );
        }
        assert!(
            worst < 0.2,
            "q4_0 K with the Hadamard stays near exact attention"
        );
    }
    assert!(shifts >= 2, "the loop went through context shifts");
    Ok(())
}

/// llama.cpp's context shift on one sequence: keep the first `N_KEEP` positions, free the
/// next half of the rest, and move the later cells back by that many positions (their keys
/// turned by RoPE in every layer's pool, and in the unquantized copy).
fn context_shift(
    b: usize,
    s: &mut Cells,
    pools: &mut [KvPool],
    rope: &Rope,
    slot: &impl Fn(usize, usize) -> i64,
) -> Result<(), rotq::Error> {
    let live = s.pos.iter().filter(|p| p.is_some()).count() as u64;
    let discard = (live - N_KEEP as u64) / 2;
    let (lo, hi) = (N_KEEP as u64, N_KEEP as u64 + discard);
    let mut moved = Vec::new();
    for (c, p) in s.pos.iter_mut().enumerate() {
        match *p {
            Some(q) if (lo..hi).contains(&q) => *p = None,
            Some(q) if q >= hi => {
                *p = Some(q - discard);
                moved.push(c);
            }
            _ => {}
        }
    }
    s.next_pos -= discard;
    let slots: Vec<i64> = moved.iter().map(|&c| slot(b, c)).collect();
    for (layer, pool) in pools.iter_mut().enumerate() {
        pool.shift(&slots, -(discard as i64), rope)?;
        for &c in &moved {
            rope.shift_rows_of(
                &mut s.k[layer][c * H_KV * D..(c + 1) * H_KV * D],
                D,
                -(discard as i64),
            )?;
        }
    }
    Ok(())
}
