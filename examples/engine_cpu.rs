//! An engine's flow over one layer's rotated, quantized, paged KV cache: a prompt at its
//! positions, a few decode steps, then a context shift (the oldest tokens dropped, the rest moved down), each step's
//! output compared with exact attention over the unquantized keys and values.
//!
//! The backend comes from `--device` (`cpu`, the default, or `cuda:N`); the calls are the same
//! on both.
//!
//!     cargo run --release --example engine_cpu
//!     cargo run --release --example engine_cpu -- --device cuda:0

use rotq::cache::{Backend, CacheSpec, Paging, RotatedKvCache};
use rotq::reference::rope::{Rope, RopeVariant};
use rotq::{AttentionParams, KvFormat, Rotation, RotationPlan};
use rotq_testkit::data::Rows;

const H_KV: usize = 4;
const H_Q: usize = 16;
const D: usize = 128;

/// Test data: each call draws from the next seed.
struct Data(u64);

impl Data {
    fn next(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }
}

/// Rows with an outlier channel 8 times larger than the others, as LLM keys have.
fn rows(n: usize, g: &mut Data) -> Vec<f32> {
    Rows::uniform(1.0)
        .every(D, 7, 8.0)
        .f32s(n * H_KV * D, g.next())
}

/// A decode query of `H_Q` heads at the newest of `len` positions.
fn decode_query(g: &mut Data, len: usize) -> (Vec<f32>, AttentionParams) {
    let q = Rows::uniform(1.0).f32s(H_Q * D, g.next());
    let p = AttentionParams {
        causal: true,
        pos_offset: len - 1,
        ..Default::default()
    };
    (q, p)
}

/// Relative L2 distance between the cache's attention and exact f64 attention over `k`, `v`.
fn error(cache: &RotatedKvCache, q: &[f32], k: &[f32], v: &[f32], p: &AttentionParams) -> f64 {
    let n = k.len() / (H_KV * D);
    let arr = |x: &[f32], rows: usize, heads: usize| {
        ndarray::Array3::from_shape_vec((rows, heads, D), x.to_vec()).expect("shape")
    };
    let exact = rotq::attention(
        arr(q, 1, H_Q).view(),
        arr(k, n, H_KV).view(),
        arr(v, n, H_KV).view(),
        p,
    )
    .expect("valid problem");
    let got = cache.attention(q, 1, H_Q, p).expect("valid problem");
    let want: Vec<f64> = exact.output.iter().copied().collect();
    let got: Vec<f64> = got.iter().map(|&x| f64::from(x)).collect();
    rotq::reference::metrics::rel_l2(&got, &want)
}

/// The value of `--device NAME` (or `--device=NAME`), else `cpu`.
fn device_arg() -> Result<String, String> {
    let mut args = std::env::args().skip(1);
    let mut device = "cpu".to_string();
    while let Some(arg) = args.next() {
        if arg == "--device" {
            device = args.next().ok_or("--device needs a value")?;
        } else if let Some(value) = arg.strip_prefix("--device=") {
            device = value.into();
        } else {
            return Err(format!("unknown argument {arg:?}"));
        }
    }
    Ok(device)
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("engine_cpu: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let backend = Backend::open(&device_arg()?)?;
    let mut g = Data(2026);
    let spec = CacheSpec {
        k_format: KvFormat::Q4_0,
        v_format: KvFormat::Q8_0,
        plan: RotationPlan {
            qk: Some(Rotation::hadamard(D)?),
            v: None,
        },
        n_heads: H_KV,
        head_dim: D,
        v_dim: D,
        capacity: 256,
        // Pages of 16 tokens in a pool, as a paged server keeps them (Paging::Contiguous: one
        // buffer); the calls and results are the same.
        paging: Paging::Paged { page_tokens: 16 },
        query: rotq::QueryMode::Auto,
    };
    let mut cache = RotatedKvCache::on(spec.clone(), &backend)?;
    // The unquantized keys and values, kept beside the cache to measure its error.
    let (mut k_all, mut v_all) = (rows(200, &mut g), rows(200, &mut g));
    let prompt: Vec<usize> = (0..200).collect();
    cache.append_at(&k_all, &v_all, &prompt)?;
    println!(
        "{}: prompt of {} tokens, K q4_0 (Hadamard-rotated), V q8_0",
        backend.name(),
        cache.len()
    );

    for step in 0..3 {
        let (k, v) = (rows(1, &mut g), rows(1, &mut g));
        cache.append(&k, &v)?; // at the next position
        k_all.extend(&k);
        v_all.extend(&v);
        let (q, p) = decode_query(&mut g, cache.len());
        let e = error(&cache, &q, &k_all, &v_all, &p);
        println!(
            "decode step {step}: {} tokens, relative L2 error {e:.2e}",
            cache.len()
        );
    }

    // Context shift: drop the 64 oldest tokens (4 whole pages, given back without moving a
    // token); the rest move down by 64 positions, so their keys are shifted by -64 under the
    // model's RoPE (the unquantized copy the same way), and the cache's positions start at 0
    // again.
    let rope = Rope::new(RopeVariant::Neox, D);
    let drop = 64;
    cache.remove(0..drop)?;
    cache.shift(0..cache.len(), -(drop as i64), &rope)?;
    assert_eq!(cache.positions().first(), Some(&0));
    let mut k64: Vec<f64> = k_all[drop * H_KV * D..]
        .iter()
        .map(|&x| f64::from(x))
        .collect();
    rope.shift_rows_of(&mut k64, D, -(drop as i64))?;
    k_all = k64.iter().map(|&x| x as f32).collect();
    v_all.drain(..drop * H_KV * D);
    let (q, p) = decode_query(&mut g, cache.len());
    let shifted = error(&cache, &q, &k_all, &v_all, &p);
    // The same tokens quantized once at their new positions, for comparison.
    let mut fresh = RotatedKvCache::on(spec, &backend)?;
    fresh.append(&k_all, &v_all)?;
    let once = error(&fresh, &q, &k_all, &v_all, &p);
    println!(
        "after the context shift: {} tokens, relative L2 error {shifted:.2e} \
         (quantized once at the new positions: {once:.2e})",
        cache.len()
    );
    assert!(
        shifted <= 2.0 * once + 1e-3,
        "a shift re-quantizes once more: its error should stay near one quantization's"
    );
    Ok(())
}
