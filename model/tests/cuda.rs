//! The runner with its caches on a GPU (`rotq eval --model --device cuda:0`): the logits of a
//! chunked prefill and of decode steps on CUDA caches match those on CPU caches of the same
//! formats and plan. Where no GPU opens it prints `skipped: no CUDA device` and passes, unless
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

#[test]
fn cuda_caches_give_the_cpu_caches_logits() {
    let Some(gpu) = cuda() else { return };
    // SmolLM2's head layout (head dim 64, 3 query heads per KV head), fewer layers.
    let config = Config {
        n_layers: 4,
        dim: 192,
        ffn_dim: 256,
        n_heads: 3,
        n_kv_heads: 1,
        vocab: 300,
        ..Config::default()
    };
    let model = Llama::random(config, 3).unwrap();
    let tokens: Vec<u32> = (0..96u32).map(|i| (i * 37 + 11) % 300).collect();
    for (k, v, plan) in [
        (KvFormat::F32, KvFormat::F32, RotationPlan::none()),
        (
            KvFormat::Q4_0,
            KvFormat::Q8_0,
            RotationPlan {
                qk: Some(Rotation::hadamard(64).unwrap()),
                v: Some(Rotation::block_hadamard(64, 32).unwrap()),
            },
        ),
    ] {
        let spec = CacheSpec {
            k_format: k,
            v_format: v,
            plan,
            ..Default::default()
        };
        let run = |backend: &Backend| {
            let mut caches = model.caches_on(&spec, tokens.len(), backend).unwrap();
            let mut logits = Vec::new();
            for piece in tokens[..64].chunks(32) {
                logits.extend(model.forward(piece, &mut caches, None).unwrap());
            }
            for &t in &tokens[64..] {
                logits.extend(model.forward(&[t], &mut caches, None).unwrap());
            }
            logits
        };
        let (cpu, gpu) = (run(&Backend::Cpu), run(&gpu));
        let scale = cpu.iter().map(|x| x.abs()).fold(0f32, f32::max);
        let err = cpu
            .iter()
            .zip(&gpu)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{k:?}/{v:?}: max |logit| {scale}, max difference {err:e}");
        assert!(
            err <= 2e-3 * scale.max(1.0),
            "{k:?}/{v:?}: max difference {err:e}"
        );
    }
}
