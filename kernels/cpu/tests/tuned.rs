//! Kernels made without an explicit configuration take the tuning cache's (one process, so
//! one scenario: the cache is read once).

use rotq_cpu::tuned::{decode_bucket, device_identity, fwht_bucket, quantize_bucket, source_hash};
use rotq_cpu::{
    AttentionConfig, CacheCodec, CpuAttention, CpuRotation, FwhtConfig, Isa, KvCacheView,
    QuantizeConfig,
};
use rotq_reference::tuned::{CacheFile, Ignored, Loaded, TuneFile, TunedEntry};
use rotq_reference::{KvFormat, Rotation, RotationPlan};

/// An entry of `config` for `kernel`, tuned for its current sources.
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
fn kernels_use_the_tuned_configuration_of_their_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.json");
    let mut file = TuneFile::new(device_identity());
    let fwht = FwhtConfig::search_space(64)[0];
    assert_ne!(fwht, FwhtConfig::for_dim(64));
    file.insert("fwht_f32", &fwht_bucket(64), entry("fwht_f32", fwht));
    let att = AttentionConfig {
        block_n: 32,
        block_m: 4,
        kv_splits: 4,
        heads_per_task: 1,
    };
    assert!(AttentionConfig::search_space().contains(&att));
    let bucket = decode_bucket(64, 2, 4, 100);
    file.insert(
        "decode_attention_q8_0",
        &bucket,
        entry("decode_attention_q8_0", att),
    );
    let quant = QuantizeConfig { rows_per_task: 16 };
    assert!(QuantizeConfig::search_space().contains(&quant));
    let qb = quantize_bucket(96);
    file.insert(
        "rotate_quantize_q4_0",
        &qb,
        entry("rotate_quantize_q4_0", quant),
    );
    // A value outside the search space (say, edited by hand) is not trusted.
    let odd = FwhtConfig { rows_per_task: 7 };
    file.insert("fwht_f32", &fwht_bucket(512), entry("fwht_f32", odd));
    // An entry tuned for other sources of the rotation (since edited) is stale: ignored,
    // while the other families' entries stay in force.
    let mut stale = entry("fwht_f32", FwhtConfig::search_space(256)[0]);
    stale.source_hash = "0123456789abcdef".into();
    file.insert("fwht_f32", &fwht_bucket(256), stale);
    // (The tuner's writer is rotq-autotune's; the file's text is the schema's.)
    std::fs::write(&path, CacheFile::new(vec![file.clone()]).to_json()).unwrap();
    std::env::set_var("ROTQ_TUNE_CACHE", &path);

    assert!(matches!(rotq_cpu::tuned::cache().loaded, Loaded::Usable(_)));
    // What reports say of each entry is what the kernels below do with it.
    let status = |key: &str| rotq_cpu::tuned::entry_status(key, &file.entries[key]);
    assert_eq!(status("fwht_f32/n=64"), Ok(()));
    assert_eq!(status(&format!("decode_attention_q8_0/{bucket}")), Ok(()));
    assert_eq!(status(&format!("rotate_quantize_q4_0/{qb}")), Ok(()));
    assert_eq!(status("fwht_f32/n=512"), Err(Ignored::OutsideSpace));
    assert!(matches!(
        status("fwht_f32/n=256"),
        Err(Ignored::Stale { .. })
    ));
    let r = Rotation::hadamard(64).unwrap();
    assert_eq!(CpuRotation::new(&r, Isa::best()).config(), fwht);
    let r512 = Rotation::hadamard(512).unwrap();
    assert_eq!(
        CpuRotation::new(&r512, Isa::best()).config(),
        FwhtConfig::for_dim(512)
    );
    let r256 = Rotation::hadamard(256).unwrap();
    assert_ne!(FwhtConfig::search_space(256)[0], FwhtConfig::for_dim(256));
    assert_eq!(
        CpuRotation::new(&r256, Isa::best()).config(),
        FwhtConfig::for_dim(256)
    );
    // Another length, or an explicit configuration, is not affected.
    let r128 = Rotation::hadamard(128).unwrap();
    assert_eq!(
        CpuRotation::new(&r128, Isa::best()).config(),
        FwhtConfig::for_dim(128)
    );
    let explicit = FwhtConfig { rows_per_task: 9 };
    assert_eq!(
        CpuRotation::new(&r, Isa::best())
            .with_config(explicit)
            .config(),
        explicit
    );

    // Rotate-quantize: for its format and row length (96 rounds up to 128) only.
    let codec = |f, n| CacheCodec::new(f, n, None, Isa::best()).unwrap().config();
    assert_eq!(codec(KvFormat::Q4_0, 96), quant);
    assert_eq!(codec(KvFormat::Q8_0, 96), QuantizeConfig::default());
    assert_eq!(codec(KvFormat::Q4_0, 256), QuantizeConfig::default());

    // Decode at a shape of the bucket (100 tokens round up to 128) takes the tuned config.
    let bytes = vec![0u8; 100 * 2 * KvFormat::Q8_0.row_bytes(64).unwrap()];
    let k = KvCacheView::new(KvFormat::Q8_0, &bytes, 100, 2, 64).unwrap();
    let kernel = CpuAttention::new(&RotationPlan::none(), Isa::best());
    assert_eq!(kernel.config_for(8, &k), att);
    assert_eq!(kernel.config_for(2, &k), AttentionConfig::default()); // another group size
    let fixed = kernel.with_config(AttentionConfig::default());
    assert_eq!(fixed.config_for(8, &k), AttentionConfig::default());
}
