//! The row formats in a module's source: `cuda/turbo.cuh` and, per format, the tables of the
//! module's row length as constants (NVRTC compiles a module per head dimension anyway, so
//! codebooks are literals, exactly the oracle's: shortest round-trip decimals of the f32 and f64
//! values). rotq's TurboQuant-MSE formats (`tq2`..`tq4`) and QJL formats (`tq*_qjl`), and the
//! parts of vLLM's slots (`vllm_*`). The QJL formats' `d × d` sketch is a module global, too
//! large for a literal: [`fill_sketches`] writes it when the module is loaded.

use crate::error::{Context, Result};
use cudarc::driver::{CudaModule, CudaStream};
use rotq_reference::format::RowCodec;
use rotq_reference::turboquant::formats::{RowFormat, QJL_SEED};
use rotq_reference::turboquant::vllm::{self, Part};
use rotq_reference::turboquant::{sketch_matrix, Mse};
use rotq_reference::KvFormat;
use std::sync::Arc;

/// The device code of the row formats.
pub(crate) const TURBO: &str = include_str!("cuda/turbo.cuh");

/// The longest vLLM key row the CUDA codec takes: it transforms a row in f64 in one thread's
/// local memory (`d` doubles), which the driver reserves for every resident thread.
pub const MAX_VLLM_KEY_DIM_CUDA: usize = 1024;

/// The name of the QJL sketch global of rows of `d` values.
fn sketch_global(d: usize) -> String {
    format!("rq_qjl_sketch_{d}")
}

/// A comma-separated list of `n` entries of `v` (zeros past its end), each written by `f`.
fn list<T: Copy + Default>(v: &[T], n: usize, f: impl Fn(T) -> String) -> String {
    (0..n)
        .map(|i| f(v.get(i).copied().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a module holding `format` at rows of `d` values needs after the formats' source:
/// nothing for a block format; for a row format its sizes, tables and functions (turbo.cuh's
/// `RQ_*_DEFINE`). A length the format does not take (callers check lengths first) gives an
/// `#error` line, which NVRTC reports as a compile error.
pub(crate) fn tables(format: KvFormat, d: usize) -> String {
    let Some(codec) = format.info().row else {
        return String::new();
    };
    let name = format.name();
    let Ok(bytes) = format.row_bytes(d) else {
        return format!("#error \"{name} takes no rows of {d} values\"\n");
    };
    let f32s = |v: &[f32], n| list(v, n, |x| format!("{x:?}f"));
    let f64s = |v: &[f64], n| list(v, n, |x| format!("{x:?}"));
    let mut src =
        format!("#define RQ_BLOCK_SIZE_{name} {d}\n#define RQ_BLOCK_BYTES_{name} {bytes}\n");
    let body = match codec {
        RowCodec::TurboQuant(RowFormat::Mse { bits }) => {
            let Ok(mse) = Mse::new(d, bits, true) else {
                return format!("#error \"{name} has no codebook for {d} values\"\n");
            };
            let levels: Vec<f32> = mse.levels().iter().map(|&l| l as f32).collect();
            let squares: Vec<f32> = mse.levels().iter().map(|&l| (l * l) as f32).collect();
            format!(
                "#define RQ_TQ_BITS_{name} {bits}\n\
                 __device__ const float RQ_TQ_LEVELS_{name}[16] = {{{}}};\n\
                 __device__ const float RQ_TQ_SQUARES_{name}[16] = {{{}}};\n\
                 __device__ const double RQ_TQ_MIDS_{name}[15] = {{{}}};\n\
                 RQ_TQ_DEFINE({name})\n",
                f32s(&levels, 16),
                f32s(&squares, 16),
                f64s(&mse.midpoints(), 15)
            )
        }
        RowCodec::TurboQuant(RowFormat::Prod { bits }) => {
            let Ok(mse) = Mse::new(d, bits - 1, false) else {
                return format!("#error \"{name} has no codebook for {d} values\"\n");
            };
            let g = sketch_global(d);
            format!(
                "#define RQ_TQ_BITS_{name} {}\n\
                 __device__ const double RQ_TQ_LEVELS64_{name}[16] = {{{}}};\n\
                 __device__ const double RQ_TQ_MIDS_{name}[15] = {{{}}};\n\
                 #ifndef RQ_QJL_HAS_{d}\n#define RQ_QJL_HAS_{d} 1\n\
                 __device__ double {g}[{d} * {d}];\n#endif\n\
                 #ifndef RQ_QJL_ROOT\n#define RQ_QJL_ROOT {:?}\n#endif\n\
                 #define RQ_QJL_SKETCH_{name} {g}\n\
                 RQ_QJL_DEFINE({name})\n",
                bits - 1,
                f64s(mse.levels(), 16),
                f64s(&mse.midpoints(), 15),
                (std::f64::consts::PI / 2.0).sqrt(),
            )
        }
        RowCodec::Vllm(Part::Fp8Key) => format!("RQ_VLLM_FP8_DEFINE({name})\n"),
        RowCodec::Vllm(Part::Value { bits }) => {
            format!("#define RQ_TQ_BITS_{name} {bits}\nRQ_VLLM_VALUE_DEFINE({name})\n")
        }
        RowCodec::Vllm(Part::Key { bits }) => {
            if d > MAX_VLLM_KEY_DIM_CUDA {
                return format!(
                    "#error \"{name} on CUDA takes rows of at most {MAX_VLLM_KEY_DIM_CUDA} values\"\n"
                );
            }
            let Ok(levels) = vllm::codebook(d, bits) else {
                return format!("#error \"{name} has no codebook for {d} values\"\n");
            };
            format!(
                "#define RQ_TQ_BITS_{name} {bits}\n\
                 __device__ const float RQ_VK_LEVELS_{name}[16] = {{{}}};\n\
                 __device__ const float RQ_VK_MIDS_{name}[15] = {{{}}};\n\
                 RQ_VLLM_KEY_DEFINE({name})\n",
                f32s(&levels, 16),
                f32s(&vllm::midpoints(&levels), 15)
            )
        }
    };
    src += &body;
    src
}

/// The row lengths whose QJL sketch a module's source declares (see [`tables`]).
fn sketch_dims(source: &str) -> Vec<usize> {
    let mut dims: Vec<usize> = source
        .lines()
        .filter_map(|l| l.strip_prefix("__device__ double rq_qjl_sketch_"))
        .filter_map(|rest| rest.split('[').next()?.parse().ok())
        .collect();
    dims.sort_unstable();
    dims.dedup();
    dims
}

/// Writes the QJL sketch of every row length `source` declares one for into the loaded
/// `module` (the oracle's `sketch_matrix(d, QJL_SEED)`, f64), and waits for the copies: a
/// module is used only once this returns.
pub(crate) fn fill_sketches(
    module: &Arc<CudaModule>,
    source: &str,
    stream: &Arc<CudaStream>,
) -> Result<()> {
    for d in sketch_dims(source) {
        let s = sketch_matrix(d, QJL_SEED).map_err(crate::CudaError::Input)?;
        let bytes: Vec<u8> = s.iter().flat_map(|v| v.to_le_bytes()).collect();
        let what = || format!("writing the QJL sketch of {d} values");
        let mut global = module.get_global(&sketch_global(d), stream).context(what)?;
        stream.memcpy_htod(&bytes, &mut global).context(what)?;
        stream.synchronize().context(what)?;
    }
    Ok(())
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

    /// The QJL tables hold the f64 levels of the `bits − 1` MSE part; a module with QJL rows of
    /// two lengths declares both sketches, once each; vLLM's keys carry vLLM's codebook and are
    /// refused past the CUDA limit and off powers of two.
    #[test]
    fn qjl_and_vllm_tables() {
        let src = tables(KvFormat::Tq3Qjl, 128);
        assert!(src.contains("#define RQ_TQ_BITS_tq3_qjl 2\n"));
        let line = src.lines().find(|l| l.contains("LEVELS64")).unwrap();
        let inner = &line[line.find('{').unwrap() + 1..line.rfind('}').unwrap()];
        let levels: Vec<f64> = inner.split(", ").map(|x| x.parse().unwrap()).collect();
        let mse = Mse::new(128, 2, false).unwrap();
        assert_eq!(&levels[..4], mse.levels());
        let both = [
            tables(KvFormat::Tq3Qjl, 128),
            tables(KvFormat::Tq4Qjl, 128),
            tables(KvFormat::Tq2Qjl, 64),
        ]
        .concat();
        assert_eq!(sketch_dims(&both), [64, 128]);
        assert!(sketch_dims(&tables(KvFormat::Tq4, 128)).is_empty());

        let k4 = tables(KvFormat::VllmK4, 128);
        let line = k4.lines().find(|l| l.contains("RQ_VK_LEVELS")).unwrap();
        let inner = &line[line.find('{').unwrap() + 1..line.rfind('}').unwrap()];
        let got: Vec<f32> = inner
            .split(", ")
            .map(|x| x.trim_end_matches('f').parse().unwrap())
            .collect();
        assert_eq!(got, vllm::codebook(128, 4).unwrap());
        assert!(tables(KvFormat::VllmK4, 96).starts_with("#error"));
        assert!(tables(KvFormat::VllmK3, 2048).starts_with("#error"));
        assert!(tables(KvFormat::VllmV3, 96).contains("RQ_VLLM_VALUE_DEFINE(vllm_v3)"));
    }
}
