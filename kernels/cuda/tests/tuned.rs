//! What reports say of a GPU's tuning cache entries (no GPU needed): in force exactly when
//! tuned for the kernel's current sources and one of its configurations.

use rotq_cuda::tuned::{entry_status, source_hash};
use rotq_cuda::{DecodeConfig, PrefillConfig, RowConfig};
use rotq_reference::tuned::{Ignored, TunedEntry};

fn entry(kernel: &str, config: impl serde::Serialize) -> TunedEntry {
    TunedEntry {
        config: serde_json::to_value(config).unwrap(),
        source_hash: source_hash(kernel),
        default_ms: 1.0,
        tuned_ms: 0.5,
        tried: 3,
        rejected: 0,
    }
}

#[test]
fn entries_are_in_force_only_inside_their_kernels_space() {
    let row = RowConfig::search_space()[1];
    let decode = DecodeConfig::search_space()[1];
    let prefill = PrefillConfig::search_space()[1];
    let cases = [
        ("fwht_f16/n=128", entry("fwht_f16", row)),
        (
            "rotate_quantize_q4_0/dim=128",
            entry("rotate_quantize_q4_0", row),
        ),
        (
            "decode_attention_q8_0/d=128",
            entry("decode_attention_q8_0", decode),
        ),
        (
            "prefill_attention_q8_0/d=128",
            entry("prefill_attention_q8_0", prefill),
        ),
    ];
    for (key, e) in &cases {
        assert_eq!(entry_status(key, e), Ok(()), "{key}");
        let mut stale = e.clone();
        stale.source_hash = "0123456789abcdef".into();
        assert!(
            matches!(entry_status(key, &stale), Err(Ignored::Stale { .. })),
            "{key}"
        );
    }
    // Outside the space: 3 values per thread is not a power of two the kernels run.
    let odd = RowConfig {
        elems_per_thread: 3,
        rows_per_block: 0,
    };
    assert_eq!(
        entry_status("fwht_f32/n=128", &entry("fwht_f32", odd)),
        Err(Ignored::OutsideSpace)
    );
    // Another kernel's configuration does not parse as this one's.
    assert!(matches!(
        entry_status(
            "decode_attention_q4_0/d=128",
            &entry("decode_attention_q4_0", row)
        ),
        Err(Ignored::Unparsable { .. })
    ));
    // Keys no kernel looks up.
    for key in ["fwht_f8/n=128", "decode_attention_q9_9/d=128", "no slash"] {
        assert_eq!(
            entry_status(key, &entry("x", row)),
            Err(Ignored::UnknownKey),
            "{key}"
        );
    }
}
