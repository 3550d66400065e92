//! The CUDA kernels as [`Tunable`]s: the rotation of f16 rows, fused rotate-quantize from f16
//! rows, decode attention and prefill attention with f16 queries. Each `run` only launches its
//! kernel, on two input buffers used in turn; the tuner times them with CUDA events on the
//! device's stream ([`crate::timing::EventClock`]).

use crate::cpu::random;
use crate::{err, Tunable};
use cudarc::driver::CudaSlice;
use half::f16;
use ndarray::Array3;
use rotq_cuda::{
    CacheLayout, CacheTarget, CudaAttention, CudaCodec, CudaKvCache, CudaRotation, DecodeConfig,
    DecodeSeq, Device, PrefillConfig, RowConfig,
};
use rotq_reference::tolerance::{tolerance, Op, Precision};
use rotq_reference::{attention_f64, AttentionParams, KvFormat, Rotation, RotationPlan};

/// `x` as f16 rows on the device.
fn upload(dev: &Device, x: &[f32]) -> Result<CudaSlice<f16>, String> {
    let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    dev.stream().clone_htod(&h).map_err(err)
}

/// The Hadamard rotation of f16 rows of `n`.
pub struct Fwht<'d> {
    dev: &'d Device,
    n: usize,
    rotation: Rotation,
    kernel: CudaRotation,
    bufs: [CudaSlice<f16>; 2],
}

impl<'d> Fwht<'d> {
    /// Rows of `n` filling `bytes` (per buffer).
    pub fn new(dev: &'d Device, n: usize, bytes: usize) -> Result<Self, String> {
        let rotation = Rotation::hadamard(n).map_err(err)?;
        let len = (bytes / 2 / n).max(1) * n;
        Ok(Self {
            dev,
            n,
            kernel: CudaRotation::new(dev, &rotation).map_err(err)?,
            rotation,
            bufs: [upload(dev, &random(len, 1))?, upload(dev, &random(len, 2))?],
        })
    }
}

impl Tunable for Fwht<'_> {
    type Config = RowConfig;

    fn kernel(&self) -> String {
        rotq_cuda::tuned::fwht_kernel(1)
    }

    fn bucket(&self) -> String {
        rotq_cuda::tuned::fwht_bucket(self.n)
    }

    fn default_config(&self) -> RowConfig {
        RowConfig::default()
    }

    fn candidates(&self) -> Vec<RowConfig> {
        RowConfig::search_space()
    }

    fn gate(&mut self, config: &RowConfig) -> Result<(), String> {
        let x = random(37 * self.n, 3);
        let mut buf = upload(self.dev, &x)?;
        let kernel = self.kernel.clone().with_config(*config);
        kernel.forward(self.dev, &mut buf).map_err(err)?;
        let got: Vec<f64> = self
            .dev
            .stream()
            .clone_dtoh(&buf)
            .map_err(err)?
            .into_iter()
            .map(|v| f64::from(v.to_f32()))
            .collect();
        let mut want: Vec<f64> = x
            .iter()
            .map(|&v| f64::from(f16::from_f32(v).to_f32()))
            .collect();
        self.rotation.rotate_rows(&mut want, false).map_err(err)?;
        tolerance(Op::Rotation, Precision::F16)
            .check(&got, &want)
            .map_err(err)
    }

    fn run(&mut self, config: &RowConfig, i: usize) -> Result<(), String> {
        let kernel = self.kernel.clone().with_config(*config);
        kernel.forward(self.dev, &mut self.bufs[i % 2]).map_err(err)
    }
}

/// Fused rotate-quantize of f16 rows of `dim` (Hadamard) into `format`.
pub struct Quantize<'d> {
    dev: &'d Device,
    format: KvFormat,
    dim: usize,
    codec: CudaCodec,
    rotation: CudaRotation,
    bufs: [CudaSlice<f16>; 2],
    cache: CudaSlice<u8>,
}

impl<'d> Quantize<'d> {
    /// Rows of `dim` filling `bytes` (per buffer).
    pub fn new(
        dev: &'d Device,
        format: KvFormat,
        dim: usize,
        bytes: usize,
    ) -> Result<Self, String> {
        let r = Rotation::hadamard(dim).map_err(err)?;
        let codec = CudaCodec::new(dev, format, dim, Some(&r)).map_err(err)?;
        let len = (bytes / 2 / dim).max(1) * dim;
        let cache = dev
            .stream()
            .alloc_zeros::<u8>(len / dim * codec.row_bytes())
            .map_err(err)?;
        Ok(Self {
            dev,
            format,
            dim,
            codec,
            rotation: CudaRotation::new(dev, &r).map_err(err)?,
            bufs: [upload(dev, &random(len, 5))?, upload(dev, &random(len, 6))?],
            cache,
        })
    }
}

impl Tunable for Quantize<'_> {
    type Config = RowConfig;

    fn kernel(&self) -> String {
        format!("rotate_quantize_{}", self.format)
    }

    fn bucket(&self) -> String {
        rotq_cuda::tuned::quantize_bucket(self.dim)
    }

    fn default_config(&self) -> RowConfig {
        RowConfig::codec_default()
    }

    fn candidates(&self) -> Vec<RowConfig> {
        RowConfig::search_space()
    }

    /// The bytes must be the oracle's quantizer applied to the rotation kernel's own rows.
    fn gate(&mut self, config: &RowConfig) -> Result<(), String> {
        let rows = 53;
        let x = random(rows * self.dim, 7);
        let input = upload(self.dev, &x)?;
        let s = self.dev.stream();
        let mut got = s
            .alloc_zeros::<u8>(rows * self.codec.row_bytes())
            .map_err(err)?;
        let codec = self.codec.clone().with_config(*config);
        codec
            .quantize(self.dev, &input, &mut got, CacheTarget::contiguous(1, 0))
            .map_err(err)?;
        let widened: Vec<f32> = x.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        let mut rotated = s.clone_htod(&widened).map_err(err)?;
        self.rotation.forward(self.dev, &mut rotated).map_err(err)?;
        let want = self
            .format
            .quantize_row(&s.clone_dtoh(&rotated).map_err(err)?)
            .map_err(err)?;
        let got = s.clone_dtoh(&got).map_err(err)?;
        match got.iter().zip(&want).position(|(a, b)| a != b) {
            None if got.len() == want.len() => Ok(()),
            at => Err(format!("bytes differ from the oracle's at {at:?}")),
        }
    }

    fn run(&mut self, config: &RowConfig, i: usize) -> Result<(), String> {
        let codec = self.codec.clone().with_config(*config);
        let target = CacheTarget::contiguous(1, 0);
        codec
            .quantize(self.dev, &self.bufs[i % 2], &mut self.cache, target)
            .map_err(err)
    }
}

/// Query heads per KV head in the attention problems.
pub const GROUP: usize = 4;
/// Head dimension of the attention problems.
pub const D: usize = 128;

/// Decode attention: `batch` sequences of `n_kv` tokens, `h_kv` KV heads × 128, four query
/// heads per KV head, f16 queries, K (Hadamard-rotated) and V in `format`, a contiguous cache.
pub struct Decode<'d> {
    dev: &'d Device,
    format: KvFormat,
    n_kv: usize,
    h_kv: usize,
    batch: usize,
    attn: CudaAttention,
    codec_k: CudaCodec,
    codec_v: CudaCodec,
    k: CudaSlice<u8>,
    v: CudaSlice<u8>,
    qs: [CudaSlice<f16>; 2],
    out: CudaSlice<f16>,
    /// The gate problem, built on first use: caches, queries, the oracle's output.
    gate: Option<GateProblem>,
}

/// A gate problem (decode: two sequences of 333 tokens; prefill: a prompt): its caches and
/// queries, and what the oracle makes of them.
struct GateProblem {
    k: CudaSlice<u8>,
    v: CudaSlice<u8>,
    q: CudaSlice<f16>,
    want: Vec<f64>,
}

impl GateProblem {
    /// The kernel's f16 output against the oracle's, within the attention tolerance of f16.
    fn check(&self, dev: &Device, out: &CudaSlice<f16>) -> Result<(), String> {
        let got: Vec<f64> = dev
            .stream()
            .clone_dtoh(out)
            .map_err(err)?
            .into_iter()
            .map(|x| f64::from(x.to_f32()))
            .collect();
        tolerance(Op::Attention, Precision::F16)
            .check(&got, &self.want)
            .map_err(err)
    }
}

/// Sequences and tokens of the gate problem.
const GATE: (usize, usize) = (2, 333);

impl<'d> Decode<'d> {
    /// The problem; its caches are filled by the rotate-quantize kernel.
    pub fn new(
        dev: &'d Device,
        format: KvFormat,
        n_kv: usize,
        h_kv: usize,
        batch: usize,
    ) -> Result<Self, String> {
        let Setup {
            attn,
            codec_k,
            codec_v,
        } = Setup::new(dev, format)?;
        let (k, v) = caches(dev, &codec_k, &codec_v, batch * n_kv, h_kv, 10)?;
        let h_q = h_kv * GROUP;
        let s = dev.stream();
        Ok(Self {
            dev,
            format,
            n_kv,
            h_kv,
            batch,
            attn,
            qs: [
                upload(dev, &random(batch * h_q * D, 30))?,
                upload(dev, &random(batch * h_q * D, 31))?,
            ],
            out: s.alloc_zeros::<f16>(batch * h_q * D).map_err(err)?,
            codec_k,
            codec_v,
            k,
            v,
            gate: None,
        })
    }

    /// The gate problem: caches quantized by the kernels, the oracle on their bytes.
    fn gate_problem(&self) -> Result<GateProblem, String> {
        let ((batch, n), h_kv) = (GATE, self.h_kv);
        let h_q = h_kv * GROUP;
        let (k, v) = caches(self.dev, &self.codec_k, &self.codec_v, batch * n, h_kv, 40)?;
        let q = random(batch * h_q * D, 41);
        let s = self.dev.stream();
        let (kh, vh) = (
            s.clone_dtoh(&k).map_err(err)?,
            s.clone_dtoh(&v).map_err(err)?,
        );
        let r = Rotation::hadamard(D).map_err(err)?;
        let mut want = Vec::new();
        for b in 0..batch {
            let deq = |bytes: &[u8], row: usize| -> Result<Array3<f64>, String> {
                let seq = &bytes[b * n * h_kv * row..][..n * h_kv * row];
                let vals = self.format.dequantize_row(seq).map_err(err)?;
                Array3::from_shape_vec((n, h_kv, D), vals.into_iter().map(f64::from).collect())
                    .map_err(err)
            };
            let mut qr: Vec<f64> = q[b * h_q * D..][..h_q * D]
                .iter()
                .map(|&x| f64::from(f16::from_f32(x).to_f32()))
                .collect();
            r.rotate_rows(&mut qr, false).map_err(err)?;
            let qa = Array3::from_shape_vec((1, h_q, D), qr).map_err(err)?;
            let params = AttentionParams {
                pos_offset: n - 1,
                ..causal()
            };
            let a = attention_f64(
                qa.view(),
                deq(&kh, self.codec_k.row_bytes())?.view(),
                deq(&vh, self.codec_v.row_bytes())?.view(),
                &params,
            )
            .map_err(err)?;
            want.extend(a.output.iter().copied());
        }
        Ok(GateProblem {
            k,
            v,
            q: upload(self.dev, &q)?,
            want,
        })
    }

    fn seqs(batch: usize, n_kv: usize) -> Vec<DecodeSeq> {
        vec![
            DecodeSeq {
                n_tokens: n_kv,
                pos: n_kv - 1,
            };
            batch
        ]
    }
}

/// K and V caches of `tokens` tokens, quantized from random rows a chunk at a time.
fn caches(
    dev: &Device,
    ck: &CudaCodec,
    cv: &CudaCodec,
    tokens: usize,
    h_kv: usize,
    seed: u64,
) -> Result<(CudaSlice<u8>, CudaSlice<u8>), String> {
    let s = dev.stream();
    let chunk = 1024usize;
    let mut k = s
        .alloc_zeros::<u8>(tokens * h_kv * ck.row_bytes())
        .map_err(err)?;
    let mut v = s
        .alloc_zeros::<u8>(tokens * h_kv * cv.row_bytes())
        .map_err(err)?;
    for start in (0..tokens).step_by(chunk) {
        let n = chunk.min(tokens - start);
        let rows_k = upload(dev, &random(n * h_kv * D, seed + start as u64))?;
        let rows_v = upload(dev, &random(n * h_kv * D, seed + 7 + start as u64))?;
        let at = CacheTarget::contiguous(h_kv, start);
        ck.quantize(dev, &rows_k, &mut k, at).map_err(err)?;
        cv.quantize(dev, &rows_v, &mut v, at).map_err(err)?;
    }
    Ok((k, v))
}

/// Causal attention, no window or soft-cap: the problems' parameters.
fn causal() -> AttentionParams {
    AttentionParams {
        causal: true,
        ..Default::default()
    }
}

/// The attention under tuning: K rotated by the Hadamard transform, V not, and the codecs that
/// fill its caches.
struct Setup {
    attn: CudaAttention,
    codec_k: CudaCodec,
    codec_v: CudaCodec,
}

impl Setup {
    fn new(dev: &Device, format: KvFormat) -> Result<Self, String> {
        let r = Rotation::hadamard(D).map_err(err)?;
        let codec_k = CudaCodec::new(dev, format, D, Some(&r)).map_err(err)?;
        let codec_v = CudaCodec::new(dev, format, D, None).map_err(err)?;
        let plan = RotationPlan {
            qk: Some(r),
            v: None,
        };
        Ok(Self {
            attn: CudaAttention::new(dev, &plan).map_err(err)?,
            codec_k,
            codec_v,
        })
    }
}

/// Contiguous K and V caches of `h_kv` heads × [`D`] in `format`, `n` tokens per sequence.
fn views<'a>(
    format: KvFormat,
    h_kv: usize,
    k: &'a CudaSlice<u8>,
    v: &'a CudaSlice<u8>,
    n: usize,
) -> [CudaKvCache<'a>; 2] {
    let layout = CacheLayout::Contiguous { tokens_per_seq: n };
    let kc = CudaKvCache {
        format,
        bytes: k,
        n_heads: h_kv,
        dim: D,
        layout,
    };
    [kc, CudaKvCache { bytes: v, ..kc }]
}

impl Tunable for Decode<'_> {
    type Config = DecodeConfig;

    fn kernel(&self) -> String {
        format!("decode_attention_{}", self.format)
    }

    fn bucket(&self) -> String {
        rotq_cuda::tuned::decode_bucket(D, self.h_kv, GROUP, self.n_kv, self.batch)
    }

    fn default_config(&self) -> DecodeConfig {
        DecodeConfig::default()
    }

    fn candidates(&self) -> Vec<DecodeConfig> {
        DecodeConfig::search_space()
    }

    /// The winners measured on an H100 (16 x 32k and 1 x 4k tokens, 8 KV heads x 128, q4_0
    /// and q8_0): paired blocks of 4, 6 or 16 warps, with and without split V, and 8
    /// single-head warps.
    fn leads(&self) -> Vec<DecodeConfig> {
        let c = |warps, splits, pairs, split_v| DecodeConfig {
            warps,
            splits,
            tensor_cores: true,
            pairs,
            split_v,
        };
        vec![
            c(6, 4, true, true),
            c(6, 2, true, true),
            c(16, 4, true, false),
            c(16, 2, true, true),
            c(8, 1, false, false),
            c(4, 8, true, true),
        ]
    }

    /// Two sequences of 333 tokens against the oracle on the same cache bytes.
    fn gate(&mut self, config: &DecodeConfig) -> Result<(), String> {
        if self.gate.is_none() {
            self.gate = Some(self.gate_problem()?);
        }
        let g = self.gate.as_ref().expect("built above");
        let ((batch, n), h_q) = (GATE, self.h_kv * GROUP);
        let s = self.dev.stream();
        let mut out = s.alloc_zeros::<f16>(batch * h_q * D).map_err(err)?;
        let [k, v] = views(self.format, self.h_kv, &g.k, &g.v, n);
        let attn = self.attn.clone().with_config(*config);
        let seqs = Self::seqs(batch, n);
        attn.decode(self.dev, &g.q, h_q, &k, &v, &seqs, &causal(), &mut out)
            .map_err(err)?;
        g.check(self.dev, &out)
    }

    fn run(&mut self, config: &DecodeConfig, i: usize) -> Result<(), String> {
        let attn = self.attn.clone().with_config(*config);
        let [k, v] = views(self.format, self.h_kv, &self.k, &self.v, self.n_kv);
        let seqs = Self::seqs(self.batch, self.n_kv);
        let (q, h_q) = (&self.qs[i % 2], self.h_kv * GROUP);
        attn.decode(self.dev, q, h_q, &k, &v, &seqs, &causal(), &mut self.out)
            .map_err(err)
    }
}

/// Query rows and cached tokens of the prefill gate problem: a causal prompt of 150 tokens.
const PREFILL_GATE: usize = 150;

/// Prefill attention: one sequence of `n` tokens, its whole prompt as query rows (query `i` at
/// position `i`, causal), `h_kv` KV heads × 128, four query heads per KV head, f16 queries, K
/// (Hadamard-rotated) and V in `format`, a contiguous cache.
pub struct Prefill<'d> {
    dev: &'d Device,
    format: KvFormat,
    n: usize,
    h_kv: usize,
    attn: CudaAttention,
    codec_k: CudaCodec,
    codec_v: CudaCodec,
    k: CudaSlice<u8>,
    v: CudaSlice<u8>,
    qs: [CudaSlice<f16>; 2],
    out: CudaSlice<f16>,
    /// The gate problem, built on first use: caches, queries, the oracle's output.
    gate: Option<GateProblem>,
}

impl<'d> Prefill<'d> {
    /// The problem; its caches are filled by the rotate-quantize kernel.
    pub fn new(dev: &'d Device, format: KvFormat, n: usize, h_kv: usize) -> Result<Self, String> {
        let Setup {
            attn,
            codec_k,
            codec_v,
        } = Setup::new(dev, format)?;
        let (k, v) = caches(dev, &codec_k, &codec_v, n, h_kv, 60)?;
        let rows = n * h_kv * GROUP * D;
        Ok(Self {
            dev,
            format,
            n,
            h_kv,
            attn,
            qs: [
                upload(dev, &random(rows, 70))?,
                upload(dev, &random(rows, 71))?,
            ],
            out: dev.stream().alloc_zeros::<f16>(rows).map_err(err)?,
            codec_k,
            codec_v,
            k,
            v,
            gate: None,
        })
    }

    /// The gate problem: a prompt of [`PREFILL_GATE`] tokens quantized by the kernels, the
    /// oracle on the same cache bytes.
    fn gate_problem(&self) -> Result<GateProblem, String> {
        let (n, h_kv) = (PREFILL_GATE, self.h_kv);
        let h_q = h_kv * GROUP;
        let (k, v) = caches(self.dev, &self.codec_k, &self.codec_v, n, h_kv, 80)?;
        let q = random(n * h_q * D, 81);
        let s = self.dev.stream();
        let deq = |bytes: &CudaSlice<u8>| -> Result<Array3<f64>, String> {
            let vals = self
                .format
                .dequantize_row(&s.clone_dtoh(bytes).map_err(err)?)
                .map_err(err)?;
            Array3::from_shape_vec((n, h_kv, D), vals.into_iter().map(f64::from).collect())
                .map_err(err)
        };
        let mut qr: Vec<f64> = q
            .iter()
            .map(|&x| f64::from(f16::from_f32(x).to_f32()))
            .collect();
        Rotation::hadamard(D)
            .map_err(err)?
            .rotate_rows(&mut qr, false)
            .map_err(err)?;
        let qa = Array3::from_shape_vec((n, h_q, D), qr).map_err(err)?;
        let a =
            attention_f64(qa.view(), deq(&k)?.view(), deq(&v)?.view(), &causal()).map_err(err)?;
        Ok(GateProblem {
            k,
            v,
            q: upload(self.dev, &q)?,
            want: a.output.iter().copied().collect(),
        })
    }
}

impl Tunable for Prefill<'_> {
    type Config = PrefillConfig;

    fn kernel(&self) -> String {
        format!("prefill_attention_{}", self.format)
    }

    fn bucket(&self) -> String {
        rotq_cuda::tuned::prefill_bucket(D, self.h_kv, GROUP, self.n, self.n)
    }

    fn default_config(&self) -> PrefillConfig {
        PrefillConfig::default()
    }

    fn candidates(&self) -> Vec<PrefillConfig> {
        PrefillConfig::search_space()
    }

    /// A causal prompt of 150 tokens against the oracle on the same cache bytes.
    ///
    /// `prefill` takes the flash kernel only when `h_kv · ⌈rows · group / (16 · m_tiles ·
    /// warps)⌉` thread blocks reach `min_blocks` (0: the device's multiprocessor count). The
    /// gate's 150 rows make 24 to 80 blocks at 8 KV heads, fewer than a large GPU's
    /// multiprocessors (132 on an H100), so with the candidate as it is the call would run the
    /// decode kernel and the gate would not check the flash kernel at all. It runs the
    /// candidate with `min_blocks: 1` instead: the same kernel (warps, row tiles, tile,
    /// specialized or not) that the timed problem, thousands of blocks, runs, on a problem
    /// small enough for the f64 oracle, with partial row blocks (600 rows per KV head) and a
    /// partial last tile (150 tokens). A candidate with `flash: false` runs the decode kernel
    /// either way.
    fn gate(&mut self, config: &PrefillConfig) -> Result<(), String> {
        if self.gate.is_none() {
            self.gate = Some(self.gate_problem()?);
        }
        let g = self.gate.as_ref().expect("built above");
        let (n, h_q) = (PREFILL_GATE, self.h_kv * GROUP);
        let s = self.dev.stream();
        let mut out = s.alloc_zeros::<f16>(n * h_q * D).map_err(err)?;
        let [k, v] = views(self.format, self.h_kv, &g.k, &g.v, n);
        let attn = self.attn.clone().with_prefill_config(PrefillConfig {
            min_blocks: 1,
            ..*config
        });
        attn.prefill(self.dev, &g.q, n, h_q, &k, &v, n, &causal(), &mut out)
            .map_err(err)?;
        g.check(self.dev, &out)
    }

    fn run(&mut self, config: &PrefillConfig, i: usize) -> Result<(), String> {
        let attn = self.attn.clone().with_prefill_config(*config);
        let [k, v] = views(self.format, self.h_kv, &self.k, &self.v, self.n);
        let (q, n, h_q) = (&self.qs[i % 2], self.n, self.h_kv * GROUP);
        attn.prefill(self.dev, q, n, h_q, &k, &v, n, &causal(), &mut self.out)
            .map_err(err)
    }
}
