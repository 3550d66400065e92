//! The committed C header `capi/include/rotq.h` is what cbindgen makes of `capi/src/lib.rs`
//! today (regenerate it with `ROTQ_BLESS=1 cargo test -p rotq-capi --test header`).

use std::path::Path;

#[test]
fn the_header_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen reads the crate")
        .write(&mut generated);
    let path = dir.join("include/rotq.h");
    if std::env::var_os("ROTQ_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("writing the header");
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "capi/include/rotq.h is stale: run ROTQ_BLESS=1 cargo test -p rotq-capi --test header"
    );
}
