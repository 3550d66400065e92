//! What the attention modules, decode ([`crate::decode_module`]) and flash prefill
//! ([`crate::flash_module`]), share: the defines that pick the queries' element type, the
//! caches' formats and how their codes become f16/bf16, the layout rules of staged cache rows,
//! and the assembly of a module's source around `cuda/common.cuh`.

use crate::kernel::{ELEM, FORMATS};
use rotq_reference::KvFormat;

const COMMON: &str = include_str!("cuda/common.cuh");

/// How the tensor-core kernels turn a format's codes into f16/bf16 pairs (`RQ_K_CODES`,
/// `RQ_V_CODES` in their sources): 1 q4_0's nibbles, 2 q8_0's bytes (f16 only: a byte needs 8
/// mantissa bits), 0 the format's accessor.
pub(crate) fn code_path(format: KvFormat, elem: u32) -> u32 {
    match (format, elem) {
        (KvFormat::Q4_0, _) => 1,
        (KvFormat::Q8_0, 1) => 2,
        _ => 0,
    }
}

/// The defines the preprocessor picks types and functions by: the queries' and output's
/// element type (`ELEM`, as `GpuElement::ELEM`), the K and V formats (`KFMT`, `VFMT`) and
/// their [`code_path`]s (`RQ_K_CODES`, `RQ_V_CODES`), a line each.
pub(crate) fn format_defines(elem: u32, k_format: KvFormat, v_format: KvFormat) -> String {
    format!(
        "#define ELEM {elem}\n#define KFMT {}\n#define VFMT {}\n#define RQ_K_CODES {}\n\
         #define RQ_V_CODES {}\n",
        k_format.name(),
        v_format.name(),
        code_path(k_format, elem),
        code_path(v_format, elem),
    )
}

/// The widest copy, in bytes (16, 8, 4 or 2), that rows of `a` and of `b` bytes both allow:
/// the largest of 16, 8 and 4 dividing both, else 2 (every row is a whole number of 2-byte
/// values).
pub(crate) fn widest_copy(a: usize, b: usize) -> usize {
    [16, 8, 4]
        .into_iter()
        .find(|&w| a.is_multiple_of(w) && b.is_multiple_of(w))
        .unwrap_or(2)
}

/// `row` bytes rounded up to an odd number of `unit`s: staged rows that far apart put the
/// lanes reading the same offset of consecutive rows in different banks.
pub(crate) fn odd_units(row: usize, unit: usize) -> usize {
    unit * (row.div_ceil(unit) | 1)
}

/// A module's source: its `defines` and `traits`, then the formats, the element type, what the
/// attention kernels share (`cuda/common.cuh`) and the `kernels`' sources, in order.
pub(crate) fn source(defines: &str, traits: &str, kernels: &[&str]) -> String {
    source_with(defines, traits, "", kernels)
}

/// [`source`] with `formats` (the row formats' code and tables) after the block formats'.
pub(crate) fn source_with(defines: &str, traits: &str, formats: &str, kernels: &[&str]) -> String {
    format!(
        "{defines}{traits}{FORMATS}\n{formats}{ELEM}{COMMON}{}",
        kernels.concat()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_widest_copy_divides_both_rows() {
        // q8_0 (34 bytes), q4_0 (18), f16 (2 per value) rows of 32, 64 and 128 values.
        assert_eq!(widest_copy(34, 34), 2);
        assert_eq!(widest_copy(68, 36), 4);
        assert_eq!(widest_copy(136, 72), 8);
        assert_eq!(widest_copy(256, 128), 16);
        assert_eq!(widest_copy(256, 72), 8);
    }

    #[test]
    fn odd_units_are_odd_and_hold_the_row() {
        for unit in [4, 8, 16] {
            for row in 1..300 {
                let s = odd_units(row, unit);
                assert!(
                    s >= row && s.is_multiple_of(unit) && !(s / unit).is_multiple_of(2),
                    "{row} {unit}"
                );
                assert!(s < row + 2 * unit, "{row} {unit}: no more than needed");
            }
        }
    }
}
