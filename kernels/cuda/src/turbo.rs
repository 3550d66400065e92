//! The TurboQuant-MSE row formats (`tq2`, `tq3`, `tq4`) in a module's source: `cuda/turbo.cuh`
//! and, per format, the codebook of the module's row length as constants (NVRTC compiles a
//! module per head dimension anyway, so the levels, their squares and the midpoints are
//! literals, exactly the oracle's: shortest round-trip decimals of the f32 and f64 values).

use rotq_reference::turboquant::formats::RowFormat;
use rotq_reference::turboquant::Mse;
use rotq_reference::KvFormat;

/// The device code of the row formats.
pub(crate) const TURBO: &str = include_str!("cuda/turbo.cuh");

/// What a module holding `format` at rows of `d` values needs after the formats' source:
/// nothing for a block format; for a TurboQuant-MSE format its sizes, codebook tables and
/// functions (`RQ_TQ_DEFINE`). A length the codebook does not take (callers check lengths
/// first) gives an `#error` line, which NVRTC reports as a compile error.
pub(crate) fn tables(format: KvFormat, d: usize) -> String {
    let Some(RowFormat::Mse { bits }) = format.row_format() else {
        return String::new();
    };
    let name = format.name();
    let (Ok(bytes), Ok(mse)) = (format.row_bytes(d), Mse::new(d, bits, true)) else {
        return format!("#error \"{name} takes no rows of {d} values\"\n");
    };
    let list = |v: Vec<String>| v.join(", ");
    let levels = list(
        (0..16)
            .map(|i| format!("{:?}f", mse.levels().get(i).map_or(0.0, |&l| l as f32)))
            .collect(),
    );
    let squares = list(
        (0..16)
            .map(|i| {
                format!(
                    "{:?}f",
                    mse.levels().get(i).map_or(0.0, |&l| (l * l) as f32)
                )
            })
            .collect(),
    );
    let mut mids = mse.midpoints();
    mids.resize(15, 0.0);
    let mids = list(mids.iter().map(|m| format!("{m:?}")).collect());
    format!(
        "#define RQ_BLOCK_SIZE_{name} {d}\n#define RQ_BLOCK_BYTES_{name} {bytes}\n\
         #define RQ_TQ_BITS_{name} {bits}\n\
         __device__ const float RQ_TQ_LEVELS_{name}[16] = {{{levels}}};\n\
         __device__ const float RQ_TQ_SQUARES_{name}[16] = {{{squares}}};\n\
         __device__ const double RQ_TQ_MIDS_{name}[15] = {{{mids}}};\n\
         RQ_TQ_DEFINE({name})\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The literals read back as the oracle's values, bit for bit (Rust's `{:?}` prints the
    /// shortest decimal that round-trips, which C++ reads back the same).
    #[test]
    fn tables_hold_the_oracles_codebook() {
        let src = tables(KvFormat::Tq4, 128);
        let mse = Mse::new(128, 4, true).unwrap();
        let line = |prefix: &str| -> Vec<String> {
            let l = src.lines().find(|l| l.contains(prefix)).unwrap();
            let inner = &l[l.find('{').unwrap() + 1..l.rfind('}').unwrap()];
            inner
                .split(", ")
                .map(|s| s.trim_end_matches('f').to_string())
                .collect()
        };
        let levels: Vec<f32> = line("LEVELS").iter().map(|s| s.parse().unwrap()).collect();
        let mids: Vec<f64> = line("MIDS").iter().map(|s| s.parse().unwrap()).collect();
        for (a, b) in levels.iter().zip(mse.levels()) {
            assert_eq!(a.to_bits(), (*b as f32).to_bits());
        }
        for (a, b) in mids.iter().zip(mse.midpoints()) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
        assert!(src.contains("#define RQ_BLOCK_BYTES_tq4 66"));
        assert!(tables(KvFormat::Q4_0, 128).is_empty());
        assert!(tables(KvFormat::Tq4, 100).starts_with("#error"));
    }
}
