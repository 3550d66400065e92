//! The C API's bad calls: null pointers, unknown names and codes, lengths that do not match,
//! ranges outside the cache, backends that are not there, positions that do not continue the
//! cache's. Each is a status and a message, the cache unchanged. And a paged cache answers as a
//! contiguous one.

mod common;
use common::last_error;

use rotq_capi::*;
use std::ptr::{null, null_mut};

fn spec() -> RotqCacheSpec {
    RotqCacheSpec {
        k_format: c"q4_0".as_ptr(),
        v_format: c"q8_0".as_ptr(),
        qk_rotation: 2,
        v_block: 32,
        seed: 7,
        n_heads: 2,
        head_dim: 64,
        v_dim: 64,
        capacity: 16,
        page_tokens: 0,
    }
}

#[test]
fn bad_calls_are_statuses_with_messages() {
    let mut cache = null_mut();
    // SAFETY: (every call below) the pointers are valid or deliberately null, the lengths
    // match the buffers passed, and the handle is live until freed at the end.
    unsafe {
        assert_eq!(
            rotq_cache_new(null(), &mut cache),
            RotqStatus::InvalidArgument
        );
        assert!(last_error().contains("null"));
        for bad in [
            RotqCacheSpec {
                k_format: null(),
                ..spec()
            },
            RotqCacheSpec {
                qk_rotation: 9,
                ..spec()
            },
        ] {
            assert_eq!(
                rotq_cache_new(&bad, &mut cache),
                RotqStatus::InvalidArgument
            );
            assert!(cache.is_null());
        }
        for bad in [
            RotqCacheSpec {
                v_format: c"q3_k".as_ptr(),
                ..spec()
            },
            RotqCacheSpec {
                v_block: 48,
                ..spec()
            },
            RotqCacheSpec {
                head_dim: 60,
                ..spec()
            },
        ] {
            assert_eq!(rotq_cache_new(&bad, &mut cache), RotqStatus::Error);
            assert!(!last_error().is_empty());
            assert!(cache.is_null());
        }
        assert_eq!(rotq_cache_new(&spec(), &mut cache), RotqStatus::Ok);
        assert_eq!(last_error(), "");
        let kv: Vec<f32> = (0..4 * 2 * 64).map(|i| (i as f32 * 0.3).sin()).collect();
        assert_eq!(
            rotq_cache_append(cache, kv.as_ptr(), kv.as_ptr(), 4),
            RotqStatus::Ok
        );
        assert_eq!(
            rotq_cache_append(cache, null(), kv.as_ptr(), 4),
            RotqStatus::InvalidArgument
        );
        assert_eq!(
            rotq_cache_append(null_mut(), kv.as_ptr(), kv.as_ptr(), 4),
            RotqStatus::InvalidArgument
        );
        assert_eq!(
            rotq_cache_append(cache, kv.as_ptr(), kv.as_ptr(), 0),
            RotqStatus::Ok
        );

        let q = vec![0.25f32; 4 * 64];
        let mut out = vec![0f32; 4 * 64];
        let p = RotqAttentionParams {
            causal: true,
            pos_offset: 3,
            window: 0,
            softcap: 0.0,
            scale: 0.0,
        };
        assert_eq!(
            rotq_cache_attention(cache, q.as_ptr(), 1, 4, &p, out.as_mut_ptr(), out.len()),
            RotqStatus::Ok
        );
        assert!(out.iter().all(|x| x.is_finite()) && out.iter().any(|&x| x != 0.0));
        assert_eq!(
            rotq_cache_attention(cache, q.as_ptr(), 1, 4, &p, out.as_mut_ptr(), 10),
            RotqStatus::InvalidArgument
        );
        assert!(last_error().contains("out_len"));
        assert_eq!(
            rotq_cache_attention(cache, q.as_ptr(), 1, 4, null(), out.as_mut_ptr(), out.len()),
            RotqStatus::InvalidArgument
        );
        assert_eq!(
            rotq_cache_attention(cache, q.as_ptr(), 1, 3, &p, out.as_mut_ptr(), 3 * 64),
            RotqStatus::Error
        );

        let rope = RotqRope {
            neox: 1,
            dims: 0,
            freq_base: 0.0,
            freq_scale: 0.0,
        };
        assert_eq!(rotq_cache_shift(cache, 0, 4, 3, &rope), RotqStatus::Ok);
        assert_eq!(rotq_cache_shift(cache, 0, 5, 3, &rope), RotqStatus::Error);
        assert_eq!(
            rotq_cache_shift(cache, 3, 1, 3, &rope),
            RotqStatus::InvalidArgument
        );
        assert_eq!(
            rotq_cache_shift(cache, 0, 4, 3, &RotqRope { neox: 2, ..rope }),
            RotqStatus::InvalidArgument
        );
        assert_eq!(
            rotq_cache_shift(cache, 0, 4, 3, &RotqRope { dims: 63, ..rope }),
            RotqStatus::Error
        );
        assert_eq!(rotq_cache_remove(cache, 2, 9), RotqStatus::Error);
        assert_eq!(rotq_cache_len(cache), 4);
        assert_eq!(rotq_cache_remove(cache, 1, 3), RotqStatus::Ok);
        assert_eq!(rotq_cache_len(cache), 2);
        assert_eq!(rotq_cache_len(null()), 0);
        rotq_cache_free(cache);
        rotq_cache_free(null_mut());
    }
}

/// Backends: "cpu" opens anywhere and makes caches like `rotq_cache_new`; a name that is no
/// backend, or a CUDA device that is not there, is a status and a message; caches outlive
/// the backend handle.
#[test]
fn backends_open_by_name() {
    let (mut backend, mut cache) = (null_mut(), null_mut());
    // SAFETY: (every call below) the pointers are valid or deliberately null, the lengths
    // match the buffers passed, and the handles are live until freed.
    unsafe {
        assert_eq!(
            rotq_backend_open(null(), &mut backend),
            RotqStatus::InvalidArgument
        );
        assert_eq!(
            rotq_backend_open(c"tpu:0".as_ptr(), &mut backend),
            RotqStatus::Error
        );
        assert!(last_error().contains("tpu:0") && backend.is_null());
        if !cuda_here() {
            assert_eq!(
                rotq_backend_open(c"cuda:0".as_ptr(), &mut backend),
                RotqStatus::Error
            );
            assert!(last_error().contains("CUDA"), "{}", last_error());
        }
        assert_eq!(
            rotq_backend_open(c"cpu".as_ptr(), &mut backend),
            RotqStatus::Ok
        );
        assert_eq!(
            rotq_cache_new_on(&spec(), backend, &mut cache),
            RotqStatus::Ok
        );
        rotq_backend_free(backend);
        rotq_backend_free(null_mut());
        let kv = vec![0.5f32; 3 * 2 * 64];
        assert_eq!(
            rotq_cache_append(cache, kv.as_ptr(), kv.as_ptr(), 3),
            RotqStatus::Ok
        );
        assert_eq!(rotq_cache_len(cache), 3);
        rotq_cache_free(cache);
        // A null backend is the CPU.
        assert_eq!(
            rotq_cache_new_on(&spec(), null(), &mut cache),
            RotqStatus::Ok
        );
        rotq_cache_free(cache);
    }
}

/// A paged cache (pages of 3 tokens) fed the same appends at the engine's positions gives the
/// contiguous cache's outputs; positions that do not continue the newest token's, or a null
/// positions pointer, are refused.
#[test]
fn paged_caches_and_positions() {
    let kv: Vec<f32> = (0..10 * 2 * 64).map(|i| (i as f32 * 0.7).cos()).collect();
    let q = vec![0.25f32; 4 * 64];
    let p = RotqAttentionParams {
        causal: true,
        pos_offset: 109,
        window: 0,
        softcap: 0.0,
        scale: 0.0,
    };
    let positions: Vec<usize> = (100..110).collect();
    let outputs = [0, 3].map(|page_tokens| {
        let mut cache = null_mut();
        let mut out = vec![0f32; 4 * 64];
        // SAFETY: (every call below) valid pointers or deliberately null ones, lengths that
        // match the buffers, a handle live until freed.
        unsafe {
            let spec = RotqCacheSpec {
                page_tokens,
                ..spec()
            };
            assert_eq!(rotq_cache_new(&spec, &mut cache), RotqStatus::Ok);
            let (first, rest) = (4 * 2 * 64, positions[4..].as_ptr());
            assert_eq!(
                rotq_cache_append_at(cache, kv.as_ptr(), kv.as_ptr(), 4, positions.as_ptr()),
                RotqStatus::Ok
            );
            for (bad, status) in [
                (positions.as_ptr(), RotqStatus::Error), // 100.. again, not 104..
                (null(), RotqStatus::InvalidArgument),
            ] {
                assert_eq!(
                    rotq_cache_append_at(cache, kv.as_ptr(), kv.as_ptr(), 6, bad),
                    status
                );
                assert!(last_error().contains("position"), "{}", last_error());
            }
            let (k, v) = (kv[first..].as_ptr(), kv[first..].as_ptr());
            assert_eq!(rotq_cache_append_at(cache, k, v, 6, rest), RotqStatus::Ok);
            assert_eq!(rotq_cache_len(cache), 10);
            assert_eq!(
                rotq_cache_attention(cache, q.as_ptr(), 1, 4, &p, out.as_mut_ptr(), out.len()),
                RotqStatus::Ok
            );
            rotq_cache_free(cache);
        }
        out
    });
    assert_eq!(outputs[0], outputs[1]);
}

/// Specs whose sizes wrap `usize` (a token's values or bytes, the capacity's bytes) are
/// refused by `rotq_cache_new` with `ERROR` and a message that says so, never a cache whose
/// calls then panic; so are head dimensions the attention kernels cannot take.
#[test]
fn specs_too_large_are_errors_not_panics() {
    let huge = [
        (1usize << 59, 64, 0),
        (1 << 58, 64, 0),
        (usize::MAX, 32, 0),
        (usize::MAX / 3, 64, 1),
        (1 << 40, 64, 1 << 30),
        (2, 64, usize::MAX),
    ];
    for (n_heads, head_dim, capacity) in huge {
        for page_tokens in [0, 16] {
            let spec = RotqCacheSpec {
                n_heads,
                head_dim,
                v_dim: head_dim,
                capacity,
                page_tokens,
                qk_rotation: 0,
                v_block: 0,
                ..spec()
            };
            let mut cache = null_mut();
            // SAFETY: a valid spec with NUL-terminated names and a valid out pointer.
            let status = unsafe { rotq_cache_new(&spec, &mut cache) };
            let what = format!("{n_heads} heads of {head_dim}, {capacity} tokens");
            assert_eq!(status, RotqStatus::Error, "{what}: {}", last_error());
            assert!(
                last_error().contains("overflow"),
                "{what}: {}",
                last_error()
            );
            assert!(cache.is_null());
        }
    }
    let mut cache = null_mut();
    for (head_dim, v_dim) in [(100_000, 64), (64, 100_000)] {
        let spec = RotqCacheSpec {
            k_format: c"f16".as_ptr(),
            v_format: c"f16".as_ptr(),
            qk_rotation: 0,
            v_block: 0,
            head_dim,
            v_dim,
            ..spec()
        };
        // SAFETY: a valid spec with NUL-terminated names and a valid out pointer.
        let status = unsafe { rotq_cache_new(&spec, &mut cache) };
        assert_eq!(status, RotqStatus::Error);
        assert!(last_error().contains("65536"), "{}", last_error());
        assert!(cache.is_null());
    }
}

/// Whether a CUDA device can be used here: never in a build without the `cuda` feature.
fn cuda_here() -> bool {
    #[cfg(feature = "cuda")]
    return rotq::cuda::cuda_available();
    #[cfg(not(feature = "cuda"))]
    return false;
}
