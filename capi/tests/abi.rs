//! The C API's bad calls: null pointers, unknown names and codes, lengths that do not match,
//! ranges outside the cache. Each is a status and a message, the cache unchanged.

use rotq_capi::*;
use std::ffi::CStr;
use std::ptr::{null, null_mut};

fn last_error() -> String {
    // SAFETY: rotq_last_error returns a NUL-terminated string valid until the next call.
    unsafe { CStr::from_ptr(rotq_last_error()) }
        .to_string_lossy()
        .into_owned()
}

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
    }
}

#[test]
fn bad_calls_are_statuses_with_messages() {
    let mut cache = null_mut();
    // SAFETY (every call below): the pointers are valid or deliberately null, the lengths
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
