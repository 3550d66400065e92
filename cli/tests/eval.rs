//! The synthetic quality table reproduces the seeds' finding: rotation cuts the q4_0 K-cache
//! error on data with LLM-like outlier channels in K.

use rotq::KvFormat;
use rotq_cli::eval::{evaluate, Scope, Synthetic};

#[test]
fn rotation_cuts_q4_0_k_cache_error_at_least_twofold() {
    let acts = Synthetic::default().generate();
    let rows = evaluate(&acts, &[KvFormat::Q4_0, KvFormat::Q8_0]).unwrap();
    let q4 = rows
        .iter()
        .find(|r| r.format == KvFormat::Q4_0 && r.scope == Scope::KOnly)
        .unwrap();
    assert!(
        q4.rel_l2_gain() >= 2.0,
        "attention-output error gain {:.2}",
        q4.rel_l2_gain()
    );
    assert!(q4.kld_gain() >= 2.0, "KLD gain {:.2}", q4.kld_gain());
    let q8 = rows
        .iter()
        .find(|r| r.format == KvFormat::Q8_0 && r.scope == Scope::KOnly)
        .unwrap();
    assert!(q8.rel_l2_rotated < q4.rel_l2_rotated / 5.0);
    // V rotation is undone exactly: K+V with an error no smaller than K alone.
    let q4kv = rows
        .iter()
        .find(|r| r.format == KvFormat::Q4_0 && r.scope == Scope::KAndV)
        .unwrap();
    assert!(q4kv.rel_l2_rotated >= q4.rel_l2_rotated);
    assert_eq!(q4kv.kld_rotated, q4.kld_rotated); // V does not change the probabilities
}

#[test]
fn without_outliers_rotation_changes_little() {
    // The gain comes from the outliers: on Gaussian K it is close to 1.
    let acts = Synthetic {
        outlier_channels: 0,
        n_kv: 256,
        ..Default::default()
    }
    .generate();
    let rows = evaluate(&acts, &[KvFormat::Q4_0]).unwrap();
    let gain = rows[0].rel_l2_gain();
    assert!((0.6..1.6).contains(&gain), "{gain}");
}
