//! The CPU kernels as [`Tunable`]s: the batched FWHT, rotate-quantize and decode attention.

use crate::{err, Tunable};
use ndarray::Array3;
use rotq_cpu::{
    AttentionConfig, CacheCodec, CpuAttention, CpuRotation, FwhtConfig, Isa, KvCacheView,
    QuantizeConfig, QueryMode,
};
use rotq_reference::attention::quantized_query;
use rotq_reference::tolerance::{tolerance, Op, Precision};
use rotq_reference::{attention_f64, AttentionParams, KvFormat, Rotation, RotationPlan};
use rotq_testkit::data::Rows;

/// `len` values in [−1, 1) with an outlier 8 times larger every 41 (never all zero).
pub(crate) fn random(len: usize, seed: u64) -> Vec<f32> {
    Rows::uniform(1.0).every(41, 3, 8.0).f32s(len, seed)
}

/// The batched f32 Hadamard rotation of rows of `n`.
pub struct Fwht {
    n: usize,
    kernel: CpuRotation,
    rotation: Rotation,
    /// Two buffers of rows, used in turn.
    bufs: [Vec<f32>; 2],
}

impl Fwht {
    /// Rows of `n` filling `bytes` (per buffer).
    pub fn new(n: usize, bytes: usize) -> Result<Self, rotq_reference::Error> {
        let rotation = Rotation::hadamard(n)?;
        let len = (bytes / 4 / n).max(1) * n;
        Ok(Self {
            n,
            kernel: CpuRotation::new(&rotation, Isa::best()),
            rotation,
            bufs: [random(len, 1), random(len, 2)],
        })
    }
}

impl Tunable for Fwht {
    type Config = FwhtConfig;

    fn kernel(&self) -> String {
        "fwht_f32".into()
    }

    fn bucket(&self) -> String {
        rotq_cpu::tuned::fwht_bucket(self.n)
    }

    fn default_config(&self) -> FwhtConfig {
        FwhtConfig::for_dim(self.n)
    }

    fn candidates(&self) -> Vec<FwhtConfig> {
        FwhtConfig::search_space(self.n)
    }

    fn gate(&mut self, config: &FwhtConfig) -> Result<(), String> {
        let x = random(37 * self.n, 3);
        let mut got = x.clone();
        self.kernel
            .clone()
            .with_config(*config)
            .forward_rows(&mut got)
            .map_err(|e| e.to_string())?;
        let mut want: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        self.rotation
            .rotate_rows(&mut want, false)
            .map_err(|e| e.to_string())?;
        let got: Vec<f64> = got.into_iter().map(f64::from).collect();
        tolerance(Op::Rotation, Precision::F32)
            .check(&got, &want)
            .map_err(|m| m.to_string())
    }

    fn run(&mut self, config: &FwhtConfig, i: usize) -> Result<(), String> {
        let kernel = self.kernel.clone().with_config(*config);
        kernel.forward_rows(&mut self.bufs[i % 2]).map_err(err)
    }
}

/// Decode attention: one query row, `h_kv` KV heads × 128, four query heads per KV head, K
/// (Hadamard-rotated) and V in `format`, over `n_kv` cached tokens, queries in `mode`.
pub struct Decode {
    format: KvFormat,
    mode: QueryMode,
    n_kv: usize,
    h_kv: usize,
    d: usize,
    kernel: CpuAttention,
    q: Vec<f32>,
    /// Two (K, V) cache pairs, used in turn, so that one call's cache is not the next one's.
    caches: [(Vec<u8>, Vec<u8>); 2],
    /// The gate problem: (n_kv, q, K bytes, V bytes).
    gate: (usize, Vec<f32>, Vec<u8>, Vec<u8>),
}

const GROUP: usize = 4;

impl Decode {
    /// The problem at `n_kv` tokens.
    pub fn new(
        format: KvFormat,
        n_kv: usize,
        h_kv: usize,
        mode: QueryMode,
    ) -> Result<Self, rotq_reference::Error> {
        let d = 128;
        let r = Rotation::hadamard(d)?;
        let kc = CacheCodec::new(format, d, Some(&r), Isa::best())?;
        let vc = CacheCodec::new(format, d, None, Isa::best())?;
        let caches = |n: usize, seed: u64| -> Result<(Vec<u8>, Vec<u8>), rotq_reference::Error> {
            let size = |row: usize| {
                n.checked_mul(h_kv)
                    .and_then(|r| r.checked_mul(row))
                    .ok_or(rotq_reference::Error::Overflow("decode cache size"))
            };
            let mut k = vec![0u8; size(kc.row_bytes())?];
            let mut v = vec![0u8; size(vc.row_bytes())?];
            kc.quantize(&random(n * h_kv * d, seed), &mut k, 0)?;
            vc.quantize(&random(n * h_kv * d, seed + 1), &mut v, 0)?;
            Ok((k, v))
        };
        let pairs = [caches(n_kv, 10)?, caches(n_kv, 12)?];
        let gate_n = 333;
        let (gk, gv) = caches(gate_n, 20)?;
        let plan = RotationPlan {
            qk: Some(r),
            v: None,
        };
        let mode = mode.resolve(format, true, d);
        Ok(Self {
            format,
            mode,
            n_kv,
            h_kv,
            d,
            kernel: CpuAttention::new(&plan, Isa::best()).with_query_mode(mode),
            q: random(h_kv * GROUP * d, 30),
            caches: pairs,
            gate: (gate_n, random(h_kv * GROUP * d, 31), gk, gv),
        })
    }

    fn params(n_kv: usize) -> AttentionParams {
        AttentionParams {
            causal: true,
            pos_offset: n_kv.saturating_sub(1),
            ..Default::default()
        }
    }
}

impl Tunable for Decode {
    type Config = AttentionConfig;

    fn kernel(&self) -> String {
        rotq_cpu::tuned::decode_kernel(self.format, self.mode)
    }

    fn bucket(&self) -> String {
        rotq_cpu::tuned::decode_bucket(self.d, self.h_kv, GROUP, self.n_kv)
    }

    fn default_config(&self) -> AttentionConfig {
        AttentionConfig::default()
    }

    /// The search space without configurations that behave alike at one query row: `block_m`
    /// plays no part, and `heads_per_task` of `h_kv` or more means all heads, as 0 does.
    fn candidates(&self) -> Vec<AttentionConfig> {
        let block_m = AttentionConfig::default().block_m;
        AttentionConfig::search_space()
            .into_iter()
            .filter(|c| c.block_m == block_m && c.heads_per_task < self.h_kv.max(1))
            .collect()
    }

    fn gate(&mut self, config: &AttentionConfig) -> Result<(), String> {
        let (n, q, kb, vb) = &self.gate;
        let (h_kv, d, h_q) = (self.h_kv, self.d, self.h_kv * GROUP);
        let k = KvCacheView::new(self.format, kb, *n, h_kv, d).map_err(err)?;
        let v = KvCacheView::new(self.format, vb, *n, h_kv, d).map_err(err)?;
        let params = Self::params(*n);
        let got = self
            .kernel
            .clone()
            .with_config(*config)
            .run(q, 1, h_q, &k, &v, &params)
            .map_err(err)?;
        // The oracle on the same cache: Q rotated like K (by the kernel's f32 rotation, then
        // through q8_0, for quantized queries: the mode's spec), dequantized K and V, f64.
        let r = Rotation::hadamard(d).map_err(err)?;
        let qr: Vec<f64> = if self.mode == QueryMode::Q8_0 {
            let mut q32 = q.clone();
            CpuRotation::new(&r, Isa::best())
                .forward_rows(&mut q32)
                .map_err(err)?;
            quantized_query(&q32, d)
                .map_err(err)?
                .into_iter()
                .map(f64::from)
                .collect()
        } else {
            let mut qr: Vec<f64> = q.iter().map(|&x| f64::from(x)).collect();
            r.rotate_rows(&mut qr, false).map_err(err)?;
            qr
        };
        let deq = |b: &[u8]| -> Result<Array3<f64>, String> {
            let vals = self.format.dequantize_rows(b, d).map_err(err)?;
            Array3::from_shape_vec((*n, h_kv, d), vals.into_iter().map(f64::from).collect())
                .map_err(|e| e.to_string())
        };
        let qa = Array3::from_shape_vec((1, h_q, d), qr).map_err(|e| e.to_string())?;
        let want =
            attention_f64(qa.view(), deq(kb)?.view(), deq(vb)?.view(), &params).map_err(err)?;
        let want: Vec<f64> = want.output.iter().copied().collect();
        let got: Vec<f64> = got.into_iter().map(f64::from).collect();
        tolerance(Op::Attention, Precision::F32)
            .check(&got, &want)
            .map_err(|m| m.to_string())
    }

    fn run(&mut self, config: &AttentionConfig, i: usize) -> Result<(), String> {
        let (h_kv, d) = (self.h_kv, self.d);
        let (kb, vb) = &self.caches[i % 2];
        let k = KvCacheView::new(self.format, kb, self.n_kv, h_kv, d).map_err(err)?;
        let v = KvCacheView::new(self.format, vb, self.n_kv, h_kv, d).map_err(err)?;
        let out = self
            .kernel
            .clone()
            .with_config(*config)
            .run(&self.q, 1, h_kv * GROUP, &k, &v, &Self::params(self.n_kv))
            .map_err(err)?;
        std::hint::black_box(out);
        Ok(())
    }
}

/// Fused rotate-quantize of f32 rows of `dim` (Hadamard) into `format`.
pub struct Quantize {
    format: KvFormat,
    dim: usize,
    codec: CacheCodec,
    rotation: CpuRotation,
    bufs: [Vec<f32>; 2],
    cache: Vec<u8>,
}

impl Quantize {
    /// Rows of `dim` filling `bytes` (per buffer).
    pub fn new(format: KvFormat, dim: usize, bytes: usize) -> Result<Self, rotq_reference::Error> {
        let r = Rotation::hadamard(dim)?;
        let codec = CacheCodec::new(format, dim, Some(&r), Isa::best())?;
        let len = (bytes / 4 / dim).max(1) * dim;
        let cache = vec![0u8; len / dim * codec.row_bytes()];
        Ok(Self {
            format,
            dim,
            codec,
            rotation: CpuRotation::new(&r, Isa::best()),
            bufs: [random(len, 5), random(len, 6)],
            cache,
        })
    }
}

impl Tunable for Quantize {
    type Config = QuantizeConfig;

    fn kernel(&self) -> String {
        format!("rotate_quantize_{}", self.format)
    }

    fn bucket(&self) -> String {
        rotq_cpu::tuned::quantize_bucket(self.dim)
    }

    fn default_config(&self) -> QuantizeConfig {
        QuantizeConfig::default()
    }

    fn candidates(&self) -> Vec<QuantizeConfig> {
        QuantizeConfig::search_space()
    }

    /// The bytes must be the oracle's quantizer applied to the kernel's own rotated rows.
    fn gate(&mut self, config: &QuantizeConfig) -> Result<(), String> {
        let rows = 53;
        let x = random(rows * self.dim, 7);
        let mut got = vec![0u8; rows * self.codec.row_bytes()];
        self.codec
            .clone()
            .with_config(*config)
            .quantize(&x, &mut got, 0)
            .map_err(|e| e.to_string())?;
        let mut rotated = x;
        self.rotation
            .forward_rows(&mut rotated)
            .map_err(|e| e.to_string())?;
        let want = self
            .format
            .quantize_rows(&rotated, self.dim)
            .map_err(|e| e.to_string())?;
        match got.iter().zip(&want).position(|(a, b)| a != b) {
            None if got.len() == want.len() => Ok(()),
            at => Err(format!("bytes differ from the oracle's at {at:?}")),
        }
    }

    fn run(&mut self, config: &QuantizeConfig, i: usize) -> Result<(), String> {
        let codec = self.codec.clone().with_config(*config);
        codec
            .quantize(&self.bufs[i % 2], &mut self.cache, 0)
            .map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gates pass the kernels' own results for block and row formats alike (their oracle
    /// reads and writes whole rows of the head dimension), and the timed runs work.
    #[test]
    fn the_gates_pass_for_block_and_row_formats() {
        for format in [KvFormat::Q4_0, KvFormat::Tq4, KvFormat::Tq3Qjl] {
            let mut quantize = Quantize::new(format, 128, 1 << 16).unwrap();
            for config in [
                QuantizeConfig::default(),
                QuantizeConfig { rows_per_task: 8 },
            ] {
                quantize
                    .gate(&config)
                    .unwrap_or_else(|e| panic!("{format}: {e}"));
                quantize.run(&config, 0).unwrap();
            }
            let mut decode = Decode::new(format, 100, 2, QueryMode::Auto).unwrap();
            let config = AttentionConfig::default();
            decode
                .gate(&config)
                .unwrap_or_else(|e| panic!("{format}: {e}"));
            decode.run(&config, 1).unwrap();
        }
    }
}
