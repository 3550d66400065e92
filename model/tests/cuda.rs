//! The runner with its caches on a GPU (`rotq eval --model --device cuda:0`): the logits of a
//! chunked prefill and of decode steps on CUDA caches match those on CPU caches of the same
//! formats and plan: to the attention's tolerance in one layer, within the quantization's own
//! error deeper (see the tests). Where no GPU opens it prints `skipped: no CUDA device` and passes, unless
//! `ROTQ_REQUIRE_CUDA` is set (the GPU bundle's run.sh sets it).

use std::io::Write;

use rotq::cache::{Backend, CacheSpec};
use rotq::cuda::CudaError;
use rotq::{Error, KvFormat, Rotation, RotationPlan};
use rotq_model::llama::{Config, Llama};

fn cuda() -> Option<Backend> {
    match Backend::open("cuda:0") {
        Ok(b) => Some(b),
        Err(Error::Cuda(e @ (CudaError::NoDriver | CudaError::NoDevice { .. }))) => {
            if std::env::var_os("ROTQ_REQUIRE_CUDA").is_some() {
                panic!("ROTQ_REQUIRE_CUDA is set but there is no CUDA device: {e}");
            }
            let _ = writeln!(std::io::stderr(), "skipped: no CUDA device");
            None
        }
        Err(e) => panic!("a CUDA device is present but could not be opened: {e}"),
    }
}

fn quantized() -> CacheSpec {
    CacheSpec {
        k_format: KvFormat::Q4_0,
        v_format: KvFormat::Q8_0,
        plan: RotationPlan {
            qk: Some(Rotation::hadamard(64).unwrap()),
            v: Some(Rotation::block_hadamard(64, 32).unwrap()),
        },
        // The same arithmetic on both backends (the CUDA kernels take f32 queries).
        query: rotq::QueryMode::Exact,
        ..Default::default()
    }
}

fn f32_cache() -> CacheSpec {
    CacheSpec {
        k_format: KvFormat::F32,
        v_format: KvFormat::F32,
        ..Default::default()
    }
}

/// A model of SmolLM2's head layout (head dim 64, 3 query heads per KV head).
fn model(n_layers: usize) -> Llama {
    let config = Config {
        n_layers,
        dim: 192,
        ffn_dim: 256,
        n_heads: 3,
        n_kv_heads: 1,
        vocab: 300,
        ..Config::default()
    };
    Llama::random(config, 3).unwrap()
}

/// The logits of a chunked prefill of 64 tokens and 32 decode steps.
fn logits(model: &Llama, spec: &CacheSpec, backend: &Backend) -> Vec<f32> {
    let tokens: Vec<u32> = (0..96u32).map(|i| (i * 37 + 11) % 300).collect();
    let mut caches = model.caches_on(spec, tokens.len(), backend).unwrap();
    let mut out = Vec::new();
    for piece in tokens[..64].chunks(32) {
        out.extend(model.forward(piece, &mut caches, None).unwrap());
    }
    for &t in &tokens[64..] {
        out.extend(model.forward(&[t], &mut caches, None).unwrap());
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

/// One layer: its keys and values come from the embeddings alone, so both backends cache the
/// same bytes (their quantizers agree byte for byte) and only the attention's arithmetic
/// differs: the logits agree to within its tolerance, quantized or not.
#[test]
fn in_one_layer_cuda_caches_give_the_cpu_caches_logits() {
    let Some(gpu) = cuda() else { return };
    let m = model(1);
    for spec in [f32_cache(), quantized()] {
        let (cpu, on_gpu) = (logits(&m, &spec, &Backend::Cpu), logits(&m, &spec, &gpu));
        let scale = cpu.iter().map(|x| x.abs()).fold(0f32, f32::max);
        let err = max_diff(&cpu, &on_gpu);
        eprintln!(
            "{:?}: max |logit| {scale}, max difference {err:e}",
            spec.k_format
        );
        assert!(
            err <= 1e-4 * scale.max(1.0),
            "{:?}: max difference {err:e}",
            spec.k_format
        );
    }
}

/// Deeper, a difference in the last bits of a layer's output can move a later layer's key
/// across a q4_0 rounding boundary, so quantized caches on the two backends drift apart; but
/// by far less than the quantization's own error (a twentieth on an H100), and f32 caches
/// stay together.
#[test]
fn deeper_cuda_caches_stay_within_the_quantization_error() {
    let Some(gpu) = cuda() else { return };
    let m = model(4);
    let exact = logits(&m, &f32_cache(), &Backend::Cpu);
    let f32_gpu = logits(&m, &f32_cache(), &gpu);
    assert!(
        max_diff(&exact, &f32_gpu) <= 1e-4,
        "{:e}",
        max_diff(&exact, &f32_gpu)
    );
    let (cpu, on_gpu) = (
        logits(&m, &quantized(), &Backend::Cpu),
        logits(&m, &quantized(), &gpu),
    );
    let (err_cpu, err_gpu) = (max_diff(&cpu, &exact), max_diff(&on_gpu, &exact));
    let apart = max_diff(&cpu, &on_gpu);
    eprintln!("quantization error: cpu {err_cpu:e}, cuda {err_gpu:e}; apart {apart:e}");
    assert!(err_cpu > 0.0 && err_gpu <= 2.0 * err_cpu && apart <= 0.25 * err_cpu);
}

/// The matrix products on the GPU (cuBLAS, full f32) give the host GEMM's logits to f32
/// rounding, with f32 caches on either backend; moving the products back to the CPU restores
/// the host's result exactly.
#[test]
fn products_on_the_gpu_give_the_cpu_products_logits() {
    let Some(gpu) = cuda() else { return };
    let mut m = model(4);
    let exact = logits(&m, &f32_cache(), &Backend::Cpu);
    m.products_on(&gpu).unwrap();
    assert_eq!(m.products_device(), "cuda:0");
    for caches in [&Backend::Cpu, &gpu] {
        let on_gpu = logits(&m, &f32_cache(), caches);
        let err = max_diff(&exact, &on_gpu);
        eprintln!(
            "products on cuda:0, caches on {}: max difference {err:e}",
            caches.name()
        );
        assert!(err <= 1e-4, "{err:e}");
    }
    m.products_on(&Backend::Cpu).unwrap();
    assert_eq!(m.products_device(), "cpu");
    assert_eq!(logits(&m, &f32_cache(), &Backend::Cpu), exact);
}
