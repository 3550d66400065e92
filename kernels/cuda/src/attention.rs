//! Decode and prefill attention straight from a rotated, quantized KV cache (`cuda/decode.cu`,
//! `cuda/decode_mma.cu`, `cuda/flash.cu`; their modules are built by `decode_module.rs` and
//! `flash_module.rs`).
//!
//! One query row per sequence, many sequences of different lengths at once, K and V in any
//! registry format, contiguous or paged, GQA/MQA, causal, sliding window, soft-cap; Q is rotated
//! and the output rotated back inside the kernels. The semantics are the oracle's
//! (`rotq_reference::attention`), including its NaN/Inf rules; arithmetic is f32, so the scale
//! and soft-cap must be normal f32 numbers.
//!
//! With f16/bf16 queries and K/V formats whose values are a scale times a small code (see
//! [`TENSOR_CORE_K_FORMATS`]), the products run on the tensor cores (`mma.sync` m16n8k16 with
//! 16 tokens as the rows and the group's query heads as the columns, so a thread's scores are
//! of the tokens whose codes it read; q4_0 and q8_0 codes become f16 with the exponent-bias
//! trick, a couple of instructions per pair): Q and the softmax weights are rounded to f16/bf16 once,
//! as in flash attention, within the f16/bf16 tolerance of the oracle. A weight below the
//! element type's smallest subnormal (a score about 17 below the row's maximum in f16) rounds
//! to 0, so a NaN or ±Inf in V at such a key gives NaN where the oracle's f64 gives ±Inf (the
//! f32 kernel has the same rule at f32's underflow, about 87 below).
//!
//! The work is split over the cache (flash-decoding): each thread block takes one
//! (sequence, KV head, slice of the visible tokens) for every query head of the group, and a
//! second kernel merges the slices. With [`DecodeConfig::pairs`] a tensor-core block takes two
//! adjacent KV heads, so that a token's two rows are copied together in 16-byte units. Raw K/V
//! rows are staged in shared memory with `cp.async` and dequantized in registers; no
//! dequantized copy of the cache is ever written.
//!
//! Prefill ([`CudaAttention::prefill`]) has a flash-attention kernel of its own: a thread block
//! takes 64 to 256 (position, query head) rows of one KV head and walks the visible tokens in
//! tiles of 32 or 64; all its threads copy each tile's raw rows into shared memory once
//! (`cp.async`, double-buffered) and turn them into f16/bf16 values (scale × code, rounded
//! once) in shared memory, which every warp then reads with `ldmatrix` for S = Q Kᵀ and
//! O += P V on the tensor cores. The online softmax keeps a row's running maximum until a
//! tile's exceeds it by more than 8 in log₂ units, so weights reach at most 2⁸ (well inside
//! f16) and most tiles rescale nothing. A tile whose values f16 cannot hold to its precision (a
//! scale far outside the usual range) takes exact codes and f32 scales instead, as the decode
//! kernel does; a V value that is not finite reaches only the rows that see its token. See
//! [`PrefillConfig`] for its knobs.

use crate::decode_module::{DecodeCall, Shape};
use crate::device::Device;
use crate::error::{Context, CudaError, Result};
use crate::flash_module::FlashShape;
use crate::kernel::{self, Transform};
use crate::matrix::DeviceMatrix;
use crate::rotation::{CudaRotation, GpuElement};
use crate::turbo::MAX_VLLM_KEY_DIM_CUDA;
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchArgs, LaunchConfig, PushKernelArg};
use rotq_reference::hadamard::base_sign;
use rotq_reference::{AttentionParams, Error, KvFormat, RotationPlan};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

const FLASH_KERNEL: &str = "prefill_attention_flash";

/// The largest query-head group (query heads per KV head) the decode kernel takes.
pub const MAX_GROUP: usize = 16;

/// The largest head dimension (K or V) the attention kernels take.
pub const MAX_HEAD_DIM: usize = 4096;

/// The attention kernels take head dimensions (K and V) that are multiples of this: a warp's
/// lanes split a row evenly.
pub const HEAD_DIM_STEP: usize = 32;

/// Refuses a head dimension the attention kernels cannot take (0, not a multiple of
/// [`HEAD_DIM_STEP`], or over [`MAX_HEAD_DIM`]); `what` names it in the error. The one test,
/// run by the kernels before a launch and by a cache when it is made.
///
/// ```
/// assert!(rotq_cuda::check_head_dim(128, "K head").is_ok());
/// assert!(rotq_cuda::check_head_dim(100, "K head").is_err());
/// assert!(rotq_cuda::check_head_dim(8192, "K head").is_err());
/// ```
pub fn check_head_dim(dim: usize, what: &'static str) -> std::result::Result<(), Error> {
    if dim == 0 || !dim.is_multiple_of(HEAD_DIM_STEP) || dim > MAX_HEAD_DIM {
        return Err(Error::UnsupportedDim {
            n: dim,
            what,
            hint: "the CUDA attention kernels take head dimensions that are multiples of 32, \
                   from 32 to 4096",
        });
    }
    Ok(())
}

/// Refuses a format at a row length the CUDA kernels do not take: the registry's own limits
/// (`KvFormat::check_row_len`), and vLLM's codebook keys (`vllm_k3`, `vllm_k4`) above
/// [`crate::MAX_VLLM_KEY_DIM_CUDA`] values (the codec transforms such a row in f64 in one
/// thread's local memory). Every format of the registry runs on CUDA; the TurboQuant QJL
/// formats and vLLM's codebook keys decode in attention with O(d) work per value (a sketch
/// column, a Hadamard row): correct, and slow. The one test, run by the codec, the attention
/// kernels and a cache when it is made.
///
/// ```
/// use rotq_reference::KvFormat;
/// assert!(rotq_cuda::check_format(KvFormat::Q4_0, 128).is_ok());
/// assert!(rotq_cuda::check_format(KvFormat::Tq4Qjl, 128).is_ok());
/// assert!(rotq_cuda::check_format(KvFormat::VllmK4, 96).is_err()); // a power of two only
/// assert!(rotq_cuda::check_format(KvFormat::VllmK4, 2048).is_err());
/// ```
pub fn check_format(format: KvFormat, dim: usize) -> std::result::Result<(), Error> {
    format.check_row_len(dim)?;
    if matches!(format, KvFormat::VllmK3 | KvFormat::VllmK4) && dim > MAX_VLLM_KEY_DIM_CUDA {
        return Err(Error::InvalidParameter {
            name: "head dimension",
            reason: format!(
                "{format} on CUDA takes rows of at most {MAX_VLLM_KEY_DIM_CUDA} values, not {dim}"
            ),
        });
    }
    Ok(())
}

/// K formats the tensor-core kernel reads: values are a per-block scale times a code that
/// f16 and bf16 hold exactly (the scale is applied to the f32 products).
pub const TENSOR_CORE_K_FORMATS: [KvFormat; 8] = [
    KvFormat::Q8_0,
    KvFormat::Q4_0,
    KvFormat::Q5_0,
    KvFormat::Iq4Nl,
    KvFormat::Q6_0,
    KvFormat::Int4,
    KvFormat::Fp8E4m3,
    KvFormat::F16,
];

/// V formats the tensor-core kernel reads: as for K, with scales that f16 holds (the scale
/// times the weight is rounded once to the element type).
pub const TENSOR_CORE_V_FORMATS: [KvFormat; 7] = [
    KvFormat::Q8_0,
    KvFormat::Q4_0,
    KvFormat::Q5_0,
    KvFormat::Iq4Nl,
    KvFormat::Q6_0,
    KvFormat::Int4,
    KvFormat::F16,
];

/// Tuning knobs of the decode kernel.
///
/// ```
/// let c = rotq_cuda::DecodeConfig::default();
/// assert!(rotq_cuda::DecodeConfig::search_space().contains(&c));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DecodeConfig {
    /// Warps per thread block; each streams its own tiles of 32 tokens (1 to 16, fewer when
    /// their staging buffers do not fit the shared memory). With [`Self::pairs`] in effect,
    /// the two warps of each pair stream the same tiles, one KV head each.
    pub warps: usize,
    /// Slices of the cache per (sequence, KV head); 0 picks them from the call's shape: about
    /// two thread blocks per multiprocessor, slices of at least [`MIN_AUTO_SPLIT_TOKENS`]
    /// tokens, a power of two (see [`auto_splits`]).
    pub splits: usize,
    /// Use the tensor cores where the call allows it (f16/bf16 queries and K/V formats of
    /// [`TENSOR_CORE_K_FORMATS`] and [`TENSOR_CORE_V_FORMATS`]); else, and when false, the
    /// f32 kernel.
    #[serde(default = "yes")]
    pub tensor_cores: bool,
    /// Let a block of the tensor-core kernel take two KV heads, its warps alternating
    /// between them, where the call allows it (an even number of KV heads and of warps, and
    /// rows whose pairs are whole 16-byte units, as q4_0's and q8_0's at 128 dimensions): a
    /// token's two adjacent rows then move as 16-byte copies, the K rows by one warp of each
    /// pair and the V rows by the other, where one q4_0 row takes 8-byte copies. Each tile
    /// then waits for both warps of its pair. (Absent in a saved configuration: false, single
    /// heads.)
    #[serde(default)]
    pub pairs: bool,
    /// Stage one tile of V rows per stream of tiles instead of two (the tensor-core kernel):
    /// a tile's V rows are copied when it starts and waited for before its weighted sum, one
    /// more barrier per tile, and three quarters of the staging memory where K and V rows are
    /// the same size, which leaves more of the shared memory to L1 or lets more warps fit.
    /// (Absent in a saved configuration: false.)
    #[serde(default)]
    pub split_v: bool,
}

fn yes() -> bool {
    true
}

fn one() -> usize {
    1
}

impl Default for DecodeConfig {
    fn default() -> Self {
        // Paired blocks of 6 warps with split V, automatic splits: within 14% of the best
        // configuration of a sweep on an H100 (paired blocks of 2 to 8 warps, split V or not,
        // 1 to 64 splits; 1 to 128 sequences of 1k to 32k tokens, q4_0 and q8_0, 8 and 32 KV
        // heads) on every shape, 1.07-2.06x the previous default (4 warps, no split V) except
        // on many short sequences (256 x 512 tokens: 0.89-0.93x). docs/benchmarks.md, "The default
        // configuration: sweep and validation".
        Self {
            warps: 6,
            splits: 0,
            tensor_cores: true,
            pairs: true,
            split_v: true,
        }
    }
}

impl DecodeConfig {
    /// Every configuration the autotuner tries.
    pub fn search_space() -> Vec<Self> {
        let mut out = Vec::new();
        for (tensor_cores, pairs, split_v) in [
            (true, true, false),
            (true, true, true),
            (true, false, false),
            (false, false, false),
        ] {
            // Paired blocks also take 6, 12 and 16 warps (3, 6, 8 pairs): with one V stage
            // (split_v), 16 warps of q4_0 fit on a multiprocessor in one block or two, and
            // fewer splits then fill the device.
            let counts: &[usize] = if pairs {
                &[2, 4, 6, 8, 12, 16]
            } else {
                &[1, 2, 4, 8]
            };
            for &warps in counts {
                for splits in [0, 1, 2, 4, 8, 16, 32] {
                    out.push(Self {
                        warps,
                        splits,
                        tensor_cores,
                        pairs,
                        split_v,
                    });
                }
            }
        }
        out
    }
}

/// The tokens per slice below which [`auto_splits`] makes no more slices: shorter slices left
/// each stream of tiles too few tiles to keep its copies ahead (on an H100, with the default 6
/// warps, one sequence of 32k tokens ran best at 32 slices, about 0.75× that at 64). The
/// launch rounds slices up to whole tiles of its streams, so the last one may be shorter.
pub const MIN_AUTO_SPLIT_TOKENS: usize = 1024;

/// The slices per (sequence, KV head) that [`DecodeConfig::splits`] 0 stands for, for a device
/// of `multiprocessors`, a call of `units` thread blocks per slice of the cache (blocks of
/// rows × blocks of KV heads) and `longest` visible tokens: about two blocks per
/// multiprocessor (one wave at the default 6 warps; more blocks only shortened the slices,
/// fewer left bandwidth unused), no more slices than [`MIN_AUTO_SPLIT_TOKENS`] allows, rounded
/// down to a power of two. Fitted to the default configuration; other warp counts take the
/// same rule, and `autotune` (or explicit splits) fits them better.
///
/// ```
/// use rotq_cuda::auto_splits;
/// // 16 sequences x 32k tokens, 4 blocks of paired KV heads each, on 132 multiprocessors.
/// assert_eq!(auto_splits(132, 64, 32768), 4);
/// // One sequence of 4k tokens: slices of 1,024 tokens at least.
/// assert_eq!(auto_splits(132, 4, 4096), 4);
/// // Enough sequences to fill the device: one slice each.
/// assert_eq!(auto_splits(132, 512, 1024), 1);
/// ```
pub fn auto_splits(multiprocessors: usize, units: usize, longest: usize) -> usize {
    let blocks = multiprocessors.max(1).saturating_mul(2) / units.max(1);
    let most = longest / MIN_AUTO_SPLIT_TOKENS;
    let s = blocks.min(most).max(1);
    // (The largest power of two not above s.)
    1 << s.ilog2()
}

/// Tuning knobs of the prefill flash-attention kernel.
///
/// ```
/// let c = rotq_cuda::PrefillConfig::default();
/// assert!(rotq_cuda::PrefillConfig::search_space().contains(&c));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PrefillConfig {
    /// Warps per thread block, `16 · m_tiles` query rows each (a row is one query head of
    /// one position).
    pub warps: usize,
    /// Tokens per K/V tile (32 or 64): each tile is copied and turned into codes once for
    /// all the block's rows.
    pub block_n: usize,
    /// Row tiles of 16 per warp (1 or 2): with 2, each K/V fragment a warp reads from shared
    /// memory feeds two products and each tile's conversion serves twice the rows, at the
    /// cost of twice the registers for scores and outputs (head dimensions up to 128; larger
    /// ones take 1). Warp-specialized blocks always take 2.
    #[serde(default = "one")]
    pub m_tiles: usize,
    /// Use the flash kernel where the call allows it (f16/bf16 queries, tensor-core formats,
    /// enough row blocks to fill the device); else, and when false, the decode kernel takes
    /// the rows over the shared cache.
    #[serde(default = "yes")]
    pub flash: bool,
    /// The fewest thread blocks (row blocks × KV heads) for which the flash kernel runs; 0:
    /// the device's multiprocessor count (with fewer, the split decode kernel keeps more of
    /// the device busy).
    #[serde(default)]
    pub min_blocks: usize,
    /// Warp-specialized blocks where the device allows them (compute capability 9.0, 8 warps,
    /// head dimensions up to 128): the 8 warps only compute, two row tiles each, while a
    /// warpgroup of four more copies and converts the tiles into two buffers, and `setmaxnreg`
    /// moves registers from the converting warps to the computing ones. Elsewhere, and when
    /// false, every warp does both in turn. (Saved configurations without it keep their plain
    /// blocks.)
    ///
    /// Why: with every warp converting, a block's warps stop at a barrier each tile and hold
    /// 128 registers (two blocks per multiprocessor), too few to keep the next fragments'
    /// loads in flight; on an H100 (8k tokens causal, q8_0) the specialized blocks ran at
    /// 202–213 TFLOP/s against 182–190.
    #[serde(default)]
    pub specialized: bool,
}

impl Default for PrefillConfig {
    fn default() -> Self {
        Self {
            warps: 8,
            block_n: 64,
            m_tiles: 1,
            flash: true,
            min_blocks: 0,
            specialized: true,
        }
    }
}

impl PrefillConfig {
    /// Every configuration the autotuner tries.
    pub fn search_space() -> Vec<Self> {
        let plain = Self {
            specialized: false,
            ..Self::default()
        };
        let mut out = Vec::new();
        for warps in [4, 8] {
            for block_n in [32, 64] {
                out.push(Self {
                    warps,
                    block_n,
                    ..plain
                });
            }
            // (Two row tiles with tiles of 64 tokens spill registers.)
            out.push(Self {
                warps,
                block_n: 32,
                m_tiles: 2,
                ..plain
            });
        }
        // Warp-specialized blocks (on other devices, the plain blocks of 8 warps again).
        for block_n in [32, 64] {
            out.push(Self {
                block_n,
                ..Self::default()
            });
        }
        out
    }

    /// Whether the flash kernel takes warp-specialized blocks on a device of compute capability
    /// `cc` for head dimensions `d` (K) and `d_v` (V): where asked, on compute capability 9.0
    /// (`setmaxnreg` is sm_90a's), heads up to 128 and blocks of 8 warps (the registers are
    /// divided for two consumer warpgroups).
    pub(crate) fn specialized_on(&self, cc: (u32, u32), d: usize, d_v: usize) -> bool {
        self.specialized && cc == (9, 0) && d <= 128 && d_v <= 128 && self.warps == 8
    }

    /// The row tiles per warp the kernel takes for head dimensions `d` (K) and `d_v` (V):
    /// two where asked or in warp-specialized blocks (`ws`), and both are at most 128 (larger
    /// ones would not fit the registers).
    pub(crate) fn m_tiles_for(&self, d: usize, d_v: usize, ws: bool) -> usize {
        if (ws || self.m_tiles >= 2) && d <= 128 && d_v <= 128 {
            2
        } else {
            1
        }
    }
}

/// How sequences' tokens are laid out in a cache.
#[derive(Clone, Copy, Debug)]
pub enum CacheLayout<'a> {
    /// Sequence `b`'s token `t` is row block `b · tokens_per_seq + t`.
    Contiguous {
        /// Capacity of each sequence.
        tokens_per_seq: usize,
    },
    /// Sequence `b`'s token `t` lives in page `table[b · pages_per_seq + t / page_tokens]`,
    /// slot `t % page_tokens`; page `p` holds row blocks `p · page_tokens ..`.
    Paged {
        /// The block table, `pages_per_seq` entries per sequence.
        table: &'a [u32],
        /// Entries of the table per sequence.
        pages_per_seq: usize,
        /// Tokens per page.
        page_tokens: usize,
    },
}

/// One layer's K or V cache on the device: row `(slot, head)` of `dim` values in `format` at
/// byte `(slot · n_heads + head) · row_bytes`, where the slot of a token follows `layout`.
///
/// ```no_run
/// use rotq_cuda::{CacheLayout, CudaKvCache, Device};
/// use rotq_reference::KvFormat;
/// let dev = Device::open("cuda:0")?;
/// let bytes = dev.stream().alloc_zeros::<u8>(4 * 1024 * 8 * 72).unwrap();
/// let layout = CacheLayout::Contiguous { tokens_per_seq: 1024 };
/// let k = CudaKvCache { format: KvFormat::Q4_0, bytes: &bytes, n_heads: 8, dim: 128, layout };
/// # Ok::<(), rotq_cuda::CudaError>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct CudaKvCache<'a> {
    /// The cache format.
    pub format: KvFormat,
    /// The whole cache (or page pool).
    pub bytes: &'a CudaSlice<u8>,
    /// KV heads per token.
    pub n_heads: usize,
    /// Values per row (the head dimension).
    pub dim: usize,
    /// Where each sequence's tokens are.
    pub layout: CacheLayout<'a>,
}

/// One sequence of a decode batch.
///
/// ```
/// let s = rotq_cuda::DecodeSeq { n_tokens: 100, pos: 99 };
/// assert_eq!(s.n_tokens, 100);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeSeq {
    /// Tokens in its cache.
    pub n_tokens: usize,
    /// The position of its query (causal masking and the sliding window use it).
    pub pos: usize,
}

/// Decode attention for one rotation plan on one device.
///
/// ```no_run
/// use rotq_cuda::{CacheLayout, CudaAttention, CudaKvCache, DecodeSeq, Device};
/// use rotq_reference::{AttentionParams, KvFormat, Rotation, RotationPlan};
/// let dev = Device::open("cuda:0")?;
/// let plan = RotationPlan { qk: Some(Rotation::hadamard(128)?), v: None };
/// let attn = CudaAttention::new(&dev, &plan)?;
/// let s = dev.stream();
/// let (k_bytes, v_bytes) = (s.alloc_zeros::<u8>(1024 * 8 * 72).unwrap(), s.alloc_zeros::<u8>(1024 * 8 * 72).unwrap());
/// let layout = CacheLayout::Contiguous { tokens_per_seq: 1024 };
/// let k = CudaKvCache { format: KvFormat::Q4_0, bytes: &k_bytes, n_heads: 8, dim: 128, layout };
/// let v = CudaKvCache { bytes: &v_bytes, ..k };
/// let q = s.clone_htod(&vec![half::f16::from_f32(0.1); 32 * 128]).unwrap();
/// let mut out = s.alloc_zeros::<half::f16>(32 * 128).unwrap();
/// let seqs = [DecodeSeq { n_tokens: 1000, pos: 999 }];
/// let params = AttentionParams { causal: true, ..Default::default() };
/// attn.decode(&dev, &q, 32, &k, &v, &seqs, &params, &mut out)?;
/// # Ok::<(), rotq_cuda::CudaError>(())
/// ```
#[derive(Clone, Debug)]
pub struct CudaAttention {
    plan: RotationPlan,
    qk: Option<DeviceRotation>,
    v: Option<DeviceRotation>,
    config: DecodeConfig,
    prefill: PrefillConfig,
    /// Whether to look up the tuning cache (no explicit `with_config`).
    tuned: bool,
    /// Likewise for prefill (no explicit `with_prefill_config`).
    prefill_tuned: bool,
    ordinal: usize,
}

/// A rotation's kernel arguments: its transform, signs and base-matrix rows on the device; or
/// an explicit matrix, which the kernels do not fuse (the queries are rotated before them and
/// the output after them).
#[derive(Clone, Debug)]
pub(crate) struct DeviceRotation {
    log_p: i32,
    m: i32,
    base: Option<Arc<CudaSlice<u64>>>,
    signs: Option<Arc<CudaSlice<f32>>>,
    scale: f32,
    matrix: Option<DeviceMatrix>,
}

impl DeviceRotation {
    /// The explicit matrix, if the rotation is one (a pass outside the kernels).
    pub(crate) fn matrix(&self) -> Option<&DeviceMatrix> {
        self.matrix.as_ref()
    }

    fn new(dev: &Device, rotation: &rotq_reference::Rotation) -> Result<Self> {
        let r = CudaRotation::new(dev, rotation)?;
        if let Some(m) = r.matrix() {
            return Ok(Self {
                log_p: 0,
                m: 0,
                base: None,
                signs: None,
                scale: 1.0,
                matrix: Some(m.clone()),
            });
        }
        let t: &Transform = r.transform();
        let m = t.size.base;
        let base = if m > 1 {
            let rows: Vec<u64> = (0..m)
                .map(|a| {
                    (0..m)
                        .filter(|&b| base_sign(m, a, b) < 0.0)
                        .fold(0u64, |acc, b| acc | (1 << b))
                })
                .collect();
            Some(Arc::new(
                dev.stream()
                    .clone_htod(&rows)
                    .context(|| "uploading a base matrix".into())?,
            ))
        } else {
            None
        };
        Ok(Self {
            log_p: t.size.pow2.trailing_zeros() as i32,
            m: m as i32,
            base,
            signs: r.signs().cloned(),
            scale: r.scale(),
            matrix: None,
        })
    }
}

/// The kernel arguments of an optional rotation (m = 0: none), with null buffers standing in.
#[derive(Debug)]
pub(crate) struct RotArgs {
    log_p: i32,
    m: i32,
    base: Arc<CudaSlice<u64>>,
    signs: Arc<CudaSlice<f32>>,
    scale: f32,
}

impl RotArgs {
    /// Pushes the kernel's five `Rot` parameters (log_p, m, base, signs, scale), in the order
    /// the kernels declare them.
    fn push<'a>(&'a self, launch: &mut LaunchArgs<'a>) {
        launch
            .arg(&self.log_p)
            .arg(&self.m)
            .arg(self.base.as_ref())
            .arg(self.signs.as_ref())
            .arg(&self.scale);
    }

    /// The five parameters as raw values (log_p, m, base, signs, scale) for a launch through
    /// the driver (the batch API's); the buffers stay alive with `self`.
    pub(crate) fn raw(&self) -> (i32, i32, u64, u64, f32) {
        let (base, _b) = self.base.device_ptr(self.base.stream());
        let (signs, _s) = self.signs.device_ptr(self.signs.stream());
        (self.log_p, self.m, base, signs, self.scale)
    }

    pub(crate) fn of(dev: &Device, r: Option<&DeviceRotation>) -> Result<Self> {
        let stream = dev.stream();
        let null_u64 = || -> Result<Arc<CudaSlice<u64>>> {
            Ok(Arc::new(
                stream.null::<u64>().context(|| "a null pointer".into())?,
            ))
        };
        let null_f32 = || -> Result<Arc<CudaSlice<f32>>> {
            Ok(Arc::new(
                stream.null::<f32>().context(|| "a null pointer".into())?,
            ))
        };
        // An explicit matrix is applied outside the kernels: to them it is no rotation.
        Ok(match r.filter(|r| r.matrix.is_none()) {
            None => Self {
                log_p: 0,
                m: 0,
                base: null_u64()?,
                signs: null_f32()?,
                scale: 1.0,
            },
            Some(r) => Self {
                log_p: r.log_p,
                m: r.m,
                base: match &r.base {
                    Some(b) => b.clone(),
                    None => null_u64()?,
                },
                signs: match &r.signs {
                    Some(s) => s.clone(),
                    None => null_f32()?,
                },
                scale: r.scale,
            },
        })
    }
}

impl CudaAttention {
    /// Decode kernels for `plan` (its rotations uploaded). An explicit-matrix rotation runs as
    /// passes of its own: the queries rotated into a buffer before the kernels, the output
    /// rotated back after them.
    pub fn new(dev: &Device, plan: &RotationPlan) -> Result<Self> {
        Ok(Self {
            plan: plan.clone(),
            qk: plan
                .qk
                .as_ref()
                .map(|r| DeviceRotation::new(dev, r))
                .transpose()?,
            v: plan
                .v
                .as_ref()
                .map(|r| DeviceRotation::new(dev, r))
                .transpose()?,
            config: DecodeConfig::default(),
            prefill: PrefillConfig::default(),
            tuned: true,
            prefill_tuned: true,
            ordinal: dev.context().ordinal(),
        })
    }

    /// The device's ordinal.
    pub(crate) fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The rotation plan.
    pub(crate) fn rotation_plan(&self) -> &RotationPlan {
        &self.plan
    }

    /// The Q/K rotation's device arguments.
    pub(crate) fn qk_rotation(&self) -> Option<&DeviceRotation> {
        self.qk.as_ref()
    }

    /// The V rotation's device arguments.
    pub(crate) fn v_rotation(&self) -> Option<&DeviceRotation> {
        self.v.as_ref()
    }

    /// The same kernels with other tuning knobs (instead of the tuning cache's).
    pub fn with_config(mut self, config: DecodeConfig) -> Self {
        self.config = config;
        self.tuned = false;
        self
    }

    /// The same kernels with other prefill knobs (instead of the tuning cache's).
    pub fn with_prefill_config(mut self, config: PrefillConfig) -> Self {
        self.prefill = config;
        self.prefill_tuned = false;
        self
    }

    /// The prefill knobs for a call on `dev` with K in `k_format`, `d` dims, `h_kv` KV heads,
    /// `group` query heads per KV head, `n_q` query rows and `n_kv` cached tokens: the tuning
    /// cache's, unless [`Self::with_prefill_config`] set them, else the default.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_config_for(
        &self,
        dev: &Device,
        k_format: KvFormat,
        d: usize,
        h_kv: usize,
        group: usize,
        n_q: usize,
        n_kv: usize,
    ) -> PrefillConfig {
        let tuned = || {
            dev.tuned(
                &format!("prefill_attention_{k_format}"),
                &crate::tuned::prefill_bucket(d, h_kv, group, n_q, n_kv),
                &PrefillConfig::search_space(),
            )
        };
        self.prefill_tuned
            .then(tuned)
            .flatten()
            .unwrap_or(self.prefill)
    }

    /// The knobs for a call on `dev` with K in `k_format`, `d` dims, `h_kv` KV heads, `group`
    /// query heads per KV head, `batch` rows and at most `n_kv` visible tokens: the tuning
    /// cache's, unless [`Self::with_config`] set them, else the default.
    #[allow(clippy::too_many_arguments)]
    pub fn config_for(
        &self,
        dev: &Device,
        k_format: KvFormat,
        d: usize,
        h_kv: usize,
        group: usize,
        n_kv: usize,
        batch: usize,
    ) -> DecodeConfig {
        let tuned = || {
            dev.tuned(
                &format!("decode_attention_{k_format}"),
                &crate::tuned::decode_bucket(d, h_kv, group, n_kv, batch),
                &DecodeConfig::search_space(),
            )
        };
        self.tuned.then(tuned).flatten().unwrap_or(self.config)
    }

    /// Decode attention for a batch of sequences: `q` is `[seqs.len(), h_q, d]` (unrotated),
    /// `out` receives `[seqs.len(), h_q, d_v]`. Sequence `b` attends to its first
    /// `seqs[b].n_tokens` cached tokens (those visible from position `seqs[b].pos`); `k` and `v`
    /// share one layout. `params.pos_offset` must be 0: positions are per sequence.
    #[allow(clippy::too_many_arguments)]
    pub fn decode<T: GpuElement>(
        &self,
        dev: &Device,
        q: &CudaSlice<T>,
        h_q: usize,
        k: &CudaKvCache<'_>,
        v: &CudaKvCache<'_>,
        seqs: &[DecodeSeq],
        params: &AttentionParams,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        if params.pos_offset != 0 {
            return Err(Error::InvalidParameter {
                name: "pos_offset",
                reason: "decode takes each sequence's query position in DecodeSeq::pos".into(),
            }
            .into());
        }
        self.on_device(dev, q, k, v, out)?;
        let checked = self.check(q.len(), h_q, k, v, seqs, false, params, out.len())?;
        let rotated = self.matrix_queries(dev, q, k.dim)?;
        let q = rotated.as_ref().unwrap_or(q);
        self.attend(dev, q, h_q, k, v, seqs, false, params, checked, out)?;
        self.matrix_output(dev, out, v.dim)
    }

    /// The queries rotated by the Q/K plan's explicit matrix, if it has one (rows of `d`).
    fn matrix_queries<T: GpuElement>(
        &self,
        dev: &Device,
        q: &CudaSlice<T>,
        d: usize,
    ) -> Result<Option<CudaSlice<T>>> {
        let Some(m) = self.qk.as_ref().and_then(|r| r.matrix.as_ref()) else {
            return Ok(None);
        };
        let mut rotated = dev
            .stream()
            .alloc_zeros::<T>(q.len())
            .context(|| "a buffer of rotated queries".into())?;
        m.apply(dev, q, &mut rotated, q.len() / d, false)?;
        Ok(Some(rotated))
    }

    /// The output rotated back by the V plan's explicit matrix, if it has one (rows of `d_v`).
    fn matrix_output<T: GpuElement>(
        &self,
        dev: &Device,
        out: &mut CudaSlice<T>,
        d_v: usize,
    ) -> Result<()> {
        match self.v.as_ref().and_then(|r| r.matrix.as_ref()) {
            Some(m) => m.apply_in_place(dev, out, out.len() / d_v, true),
            None => Ok(()),
        }
    }

    /// Attention of `n_q` query rows of one sequence (prefill, or a chunk of it): `q` is
    /// `[n_q, h_q, d]` (unrotated), query `i` sits at position `params.pos_offset + i`, and the
    /// sequence's first `n_tokens` tokens are in `k` and `v` (a contiguous cache of this one
    /// sequence, or a paged cache whose table lists its pages). `out` receives `[n_q, h_q, d_v]`.
    ///
    /// With f16/bf16 queries and tensor-core formats, and enough query rows to give every
    /// multiprocessor a thread block, the rows run through the flash kernel: a block takes
    /// `16 · m_tiles · warps` (position, query head) rows of one KV head and walks the visible tokens in
    /// tiles of [`PrefillConfig::block_n`], each tile copied and turned into f16/bf16 codes once
    /// for all its rows, the products on the tensor cores. Otherwise (few rows, f32 queries,
    /// other formats, or [`PrefillConfig::flash`] false) they run through the decode kernel
    /// over the shared cache, split over the cache.
    ///
    /// ```no_run
    /// use rotq_cuda::{CacheLayout, CudaAttention, CudaKvCache, Device};
    /// use rotq_reference::{AttentionParams, KvFormat, RotationPlan};
    /// let dev = Device::open("cuda:0")?;
    /// let s = dev.stream();
    /// let bytes = s.alloc_zeros::<u8>(512 * 2 * 136).unwrap();
    /// let layout = CacheLayout::Contiguous { tokens_per_seq: 512 };
    /// let k = CudaKvCache { format: KvFormat::Q8_0, bytes: &bytes, n_heads: 2, dim: 128, layout };
    /// let q = s.clone_htod(&vec![half::f16::from_f32(0.1); 512 * 8 * 128]).unwrap();
    /// let mut out = s.alloc_zeros::<half::f16>(512 * 8 * 128).unwrap();
    /// let params = AttentionParams { causal: true, ..Default::default() };
    /// let attn = CudaAttention::new(&dev, &RotationPlan::none())?;
    /// attn.prefill(&dev, &q, 512, 8, &k, &k, 512, &params, &mut out)?;
    /// # Ok::<(), rotq_cuda::CudaError>(())
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn prefill<T: GpuElement>(
        &self,
        dev: &Device,
        q: &CudaSlice<T>,
        n_q: usize,
        h_q: usize,
        k: &CudaKvCache<'_>,
        v: &CudaKvCache<'_>,
        n_tokens: usize,
        params: &AttentionParams,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        params.validate()?;
        params
            .pos_offset
            .checked_add(n_q)
            .ok_or(CudaError::Input(Error::Overflow("query positions")))?;
        let rows: Vec<DecodeSeq> = (0..n_q)
            .map(|i| DecodeSeq {
                n_tokens,
                pos: params.pos_offset + i,
            })
            .collect();
        // One shared cache: a contiguous one is one page of the whole sequence.
        let one_page = [0u32];
        fn shared<'a>(c: &CudaKvCache<'a>, one_page: &'a [u32]) -> CudaKvCache<'a> {
            let layout = match c.layout {
                CacheLayout::Contiguous { tokens_per_seq } => CacheLayout::Paged {
                    table: one_page,
                    pages_per_seq: 1,
                    page_tokens: tokens_per_seq,
                },
                paged => paged,
            };
            CudaKvCache { layout, ..*c }
        }
        let (ks, vs) = (shared(k, &one_page), shared(v, &one_page));
        // Each row carries its position: the kernels' checks see no offset.
        let unshifted = AttentionParams {
            pos_offset: 0,
            ..params.clone()
        };
        // (Bad inputs are typed errors before any kernel is compiled.)
        self.on_device(dev, q, k, v, out)?;
        let checked = self.check(q.len(), h_q, &ks, &vs, &rows, true, &unshifted, out.len())?;
        let (_, flash) = self.route::<T>(dev, n_q, h_q, k, v, n_tokens, params.pos_offset)?;
        let rotated = self.matrix_queries(dev, q, k.dim)?;
        let q = rotated.as_ref().unwrap_or(q);
        if let Some(shape) = flash {
            let rows = (&ks, &vs, rows.as_slice());
            self.flash(dev, shape, q, h_q, k, rows, &unshifted, checked.scale, out)?;
        } else {
            self.attend(dev, q, h_q, &ks, &vs, &rows, true, &unshifted, checked, out)?;
        }
        self.matrix_output(dev, out, v.dim)
    }

    /// What [`Self::prefill`] runs for these arguments, as a configuration: `flash: false`
    /// for the decode kernel; else the flash kernel's warps, tile, row tiles and whether its
    /// blocks are warp-specialized, as the device's limits left them (a configuration asks;
    /// this says what ran, for benches and logs). It does not validate the arguments (that is
    /// [`Self::prefill`]'s first step) and may compile the flash kernel.
    ///
    /// ```no_run
    /// use rotq_cuda::{CacheLayout, CudaAttention, CudaKvCache, Device};
    /// use rotq_reference::{KvFormat, RotationPlan};
    /// let dev = Device::open("cuda:0")?;
    /// let bytes = dev.stream().alloc_zeros::<u8>(8192 * 8 * 136).unwrap();
    /// let layout = CacheLayout::Contiguous { tokens_per_seq: 8192 };
    /// let k = CudaKvCache { format: KvFormat::Q8_0, bytes: &bytes, n_heads: 8, dim: 128, layout };
    /// let attn = CudaAttention::new(&dev, &RotationPlan::none())?;
    /// let ran = attn.prefill_plan::<half::f16>(&dev, 8192, 32, &k, &k, 8192, 0)?;
    /// println!("{ran:?}");
    /// # Ok::<(), rotq_cuda::CudaError>(())
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_plan<T: GpuElement>(
        &self,
        dev: &Device,
        n_q: usize,
        h_q: usize,
        k: &CudaKvCache<'_>,
        v: &CudaKvCache<'_>,
        n_tokens: usize,
        pos_offset: usize,
    ) -> Result<PrefillConfig> {
        let (asked, flash) = self.route::<T>(dev, n_q, h_q, k, v, n_tokens, pos_offset)?;
        Ok(match flash {
            Some(shape) => shape.config(asked),
            None => PrefillConfig {
                flash: false,
                ..asked
            },
        })
    }

    /// [`Self::prefill`]'s route: the configuration asked for (with [`Self::with_prefill_config`]
    /// or from the tuning cache), and the flash kernel's shape as the device's limits leave
    /// it, or `None` for the decode kernel.
    #[allow(clippy::too_many_arguments)]
    fn route<T: GpuElement>(
        &self,
        dev: &Device,
        n_q: usize,
        h_q: usize,
        k: &CudaKvCache<'_>,
        v: &CudaKvCache<'_>,
        n_tokens: usize,
        pos_offset: usize,
    ) -> Result<(PrefillConfig, Option<FlashShape>)> {
        // (The flash kernel's token offsets are 32-bit.)
        let short = |x: usize| x <= (i32::MAX / 2) as usize;
        // (Its offsets within a tile of 64 tokens' rows of every head are 32-bit too.)
        let tile_fits = |c: &CudaKvCache<'_>| {
            c.format
                .row_bytes(c.dim)
                .is_ok_and(|r| c.n_heads.saturating_mul(r).saturating_mul(64) <= u32::MAX as usize)
        };
        // Bad head counts are left to `check` (through either kernel's path).
        let group = h_q.checked_div(k.n_heads).unwrap_or(1).max(1);
        let config = self.prefill_config_for(dev, k.format, k.dim, k.n_heads, group, n_q, n_tokens);
        // Thread blocks of plain or warp-specialized rows (twice as many rows per block), and
        // the fewest that take the flash kernel: the plain blocks decide whether it runs, the
        // specialized ones run only where they too reach that count.
        let blocks = |ws: bool| {
            let rows = 16 * config.warps.clamp(1, 8) * config.m_tiles_for(k.dim, v.dim, ws);
            k.n_heads * (n_q * group).div_ceil(rows)
        };
        let enough = match config.min_blocks {
            0 => dev.info().multiprocessors as usize,
            b => b,
        };
        let ws = config.specialized_on(dev.info().compute_capability, k.dim, v.dim)
            && blocks(true) >= enough;
        let flash = config.flash
            && T::ELEM != 0
            && k.dim.is_multiple_of(32)
            && v.dim.is_multiple_of(32)
            && short(n_tokens)
            && tile_fits(k)
            && tile_fits(v)
            && pos_offset.checked_add(n_q).is_some_and(short)
            && TENSOR_CORE_K_FORMATS.contains(&k.format)
            && TENSOR_CORE_V_FORMATS.contains(&v.format)
            && blocks(false) >= enough;
        if !flash {
            return Ok((config, None));
        }
        let shape = FlashShape::asked(config, T::ELEM, k.format, v.format, k.dim, v.dim, group);
        let max_smem = dev.info().max_shared_per_block;
        // Warp-specialized blocks where they fit, compile (NVRTC knows sm_90a) and the kernel
        // holds the registers its roles divide (else the consumers' share could never be
        // granted); the plain blocks else.
        if ws {
            let specialized = shape.specialized(config);
            let smem = specialized.smem()?;
            if smem <= max_smem {
                let (key, src) = specialized.source()?;
                let registers = kernel::function(dev, &key, &src, FLASH_KERNEL, smem)
                    .ok()
                    .and_then(|f| f.num_regs().ok());
                if registers == Some(specialized.layout()?.registers as i32) {
                    return Ok((config, Some(specialized)));
                }
            }
        }
        Ok((config, Some(shape.fit(max_smem)?)))
    }

    /// Prefill through the flash kernel (see [`Self::prefill`]): `(ks, vs, rows)` are the
    /// caches as one shared sequence and the query rows (consecutive positions) as
    /// [`Self::prefill`] built them (and checked, with `params` without the offset, giving
    /// `score_scale`); `k` is the caller's cache (whether it is contiguous).
    #[allow(clippy::too_many_arguments)]
    fn flash<T: GpuElement>(
        &self,
        dev: &Device,
        shape: FlashShape,
        q: &CudaSlice<T>,
        h_q: usize,
        k: &CudaKvCache<'_>,
        (ks, vs, rows): (&CudaKvCache<'_>, &CudaKvCache<'_>, &[DecodeSeq]),
        params: &AttentionParams,
        score_scale: f32,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        let Some(first) = rows.first() else {
            return Ok(());
        };
        let (n_q, n_tokens, pos_offset) = (rows.len(), first.n_tokens, first.pos);
        let h_kv = ks.n_heads;
        let group = h_q / h_kv;
        let stream = dev.stream();
        // The caller's paged cache through its table; a contiguous one (shared as one page)
        // without: token t is row block t.
        let (table, page_tokens) = match (k.layout, ks.layout) {
            (
                CacheLayout::Paged { .. },
                CacheLayout::Paged {
                    table,
                    pages_per_seq,
                    page_tokens,
                },
            ) => (
                stream
                    .clone_htod(&table[..pages_per_seq])
                    .context(|| "uploading the block table".into())?,
                page_tokens as i64,
            ),
            _ => (
                stream.null::<u32>().context(|| "a null pointer".into())?,
                1i64,
            ),
        };
        let (key, src) = shape.source()?;
        let smem = shape.smem()?;
        let name = FLASH_KERNEL;
        let kernel = kernel::function(dev, &key, &src, name, smem)?;
        let qrot = RotArgs::of(dev, self.qk.as_ref())?;
        let vrot = RotArgs::of(dev, self.v.as_ref())?;
        let blocks = (n_q * group).div_ceil(shape.block_rows());
        let grid_x =
            u32::try_from(blocks).map_err(|_| CudaError::Input(Error::Overflow("grid size")))?;
        let as_i64 = |x: usize| x as i64;
        let (n_tokens, pos_offset, n_q_i, n_heads) = (
            as_i64(n_tokens),
            as_i64(pos_offset),
            as_i64(n_q),
            as_i64(h_kv),
        );
        let causal = params.causal as i32;
        let window = params.window.map_or(0, |w| w as i64);
        let softcap = params.softcap.map_or(0.0, |c| c as f32);
        let mut launch = stream.launch_builder(&kernel);
        launch
            .arg(q)
            .arg(ks.bytes)
            .arg(vs.bytes)
            .arg(&table)
            .arg(&page_tokens)
            .arg(&n_tokens)
            .arg(&pos_offset)
            .arg(&n_q_i)
            .arg(&n_heads)
            .arg(&causal)
            .arg(&window)
            .arg(&softcap)
            .arg(&score_scale);
        qrot.push(&mut launch);
        vrot.push(&mut launch);
        launch.arg(out);
        let cfg = LaunchConfig {
            grid_dim: (grid_x, h_kv as u32, 1),
            block_dim: (shape.threads() as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: `check` verified that the sequence's tokens below `n_tokens` map to whole
        // rows inside both caches (through the table's first `pages_per_seq` entries when
        // paged; a contiguous cache's token t is row block t), that `q` holds [n_q, h_q, d] and
        // `out` [n_q, h_q, d_v], and that the rotations match d and d_v. The kernel reads only
        // tokens below the visible ranges' end (at most `n_tokens`) and writes only rows below
        // n_q · group of its KV head.
        unsafe { launch.launch(cfg) }.context(|| describe(name, &kernel, &key))?;
        Ok(())
    }

    /// Decode rows: `seqs[b]` against sequence b's cache, or, when `shared`, every row against
    /// the one sequence of a paged `k`/`v` (its table's first `pages_per_seq` entries), the
    /// call's buffers on this device and its inputs `checked` (see [`Self::check`]) by the
    /// caller.
    #[allow(clippy::too_many_arguments)]
    fn attend<T: GpuElement>(
        &self,
        dev: &Device,
        q: &CudaSlice<T>,
        h_q: usize,
        k: &CudaKvCache<'_>,
        v: &CudaKvCache<'_>,
        seqs: &[DecodeSeq],
        shared: bool,
        params: &AttentionParams,
        checked: Checked,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let (d, d_v, h_kv) = (k.dim, v.dim, k.n_heads);
        let group = h_q / h_kv;
        let batch = seqs.len();

        let config = self.config_for(dev, k.format, d, h_kv, group, checked.longest, batch);
        let call = DecodeCall {
            elem: T::ELEM,
            k_format: k.format,
            v_format: v.format,
            d,
            d_v,
            group,
            h_kv,
            shared,
        };
        let shape = Shape::fit(config, call, dev.info().max_shared_per_block)?;
        let layout = shape.layout()?;
        let rows = shape.rows;

        // Slices of the visible tokens (of the union of each block's rows' ranges).
        let longest = checked
            .ranges
            .chunks(rows)
            .map(|c| {
                let live = c.iter().filter(|r| r.1 > r.0);
                let lo = live.clone().map(|r| r.0).min().unwrap_or(0);
                live.map(|r| r.1).max().unwrap_or(0).saturating_sub(lo)
            })
            .max()
            .unwrap_or(0);
        let (splits, split_tokens) = shape.splits(
            config.splits,
            dev.info().multiprocessors as usize,
            (h_kv / shape.heads()) * batch.div_ceil(rows),
            longest,
        );

        let stream = dev.stream();
        let up = |what: &'static str, data: &[i64]| {
            stream
                .clone_htod(data)
                .context(|| format!("uploading {what}"))
        };
        // Lengths, then positions: one upload (each one is a few microseconds of a call).
        let meta = up(
            "sequence lengths and positions",
            &seqs
                .iter()
                .map(|s| s.n_tokens as i64)
                .chain(seqs.iter().map(|s| s.pos as i64))
                .collect::<Vec<_>>(),
        )?;
        let (lens, pos) = (meta.slice(..batch), meta.slice(batch..));
        let (table, table_stride, page_tokens) = match k.layout {
            CacheLayout::Contiguous { tokens_per_seq } => (
                stream.null::<u32>().context(|| "a null pointer".into())?,
                0i64,
                tokens_per_seq.max(1) as i64,
            ),
            CacheLayout::Paged {
                table,
                pages_per_seq,
                page_tokens,
            } => {
                let rows = if shared { 1 } else { batch };
                (
                    stream
                        .clone_htod(&table[..rows * pages_per_seq])
                        .context(|| "uploading the block table".into())?,
                    if shared { 0 } else { pages_per_seq as i64 },
                    page_tokens as i64,
                )
            }
        };
        let n_part = splits * shape.streams();
        let part_len = (batch * h_q)
            .checked_mul(n_part * layout.part_floats)
            .ok_or(CudaError::Input(Error::Overflow("partial results")))?;
        // SAFETY: left unset (zeroing it would be one more operation per call): the decode
        // kernel writes every partial of the grid (each block's streams, all their query
        // heads and rows below `n_rows`, outputs and m, l, seen) before `decode_combine`,
        // after it on the stream, reads any.
        let mut part = unsafe { stream.alloc::<f32>(part_len) }
            .context(|| "allocating the partial results".into())?;

        let (key, src) = shape.source()?;
        let smem = layout.smem;
        let name = if shape.tensor_cores {
            "decode_attention_mma"
        } else {
            "decode_attention"
        };
        let decode = kernel::function(dev, &key, &src, name, smem)?;
        let combine = kernel::function(dev, &key, &src, "decode_combine", layout.combine_smem)?;
        let qrot = RotArgs::of(dev, self.qk.as_ref())?;
        let vrot = RotArgs::of(dev, self.v.as_ref())?;
        let grid = |x: usize, y: usize, z: usize| -> Result<(u32, u32, u32)> {
            let c = |v: usize| {
                u32::try_from(v).map_err(|_| CudaError::Input(Error::Overflow("grid size")))
            };
            Ok((c(x)?, c(y)?, c(z)?))
        };
        let (n_heads, causal) = (h_kv as i64, params.causal as i32);
        let window = params.window.map_or(0, |w| w as i64);
        let softcap = params.softcap.map_or(0.0, |c| c as f32);
        let split_tokens = split_tokens as i64;
        let n_rows = batch as i64;
        // (Row tables are the batch API's; here row b reads table row b.)
        let no_row_table = 0u64;
        let mut launch = stream.launch_builder(&decode);
        launch
            .arg(q)
            .arg(k.bytes)
            .arg(v.bytes)
            .arg(&table)
            .arg(&table_stride)
            .arg(&no_row_table)
            .arg(&page_tokens)
            .arg(&lens)
            .arg(&pos)
            .arg(&n_heads)
            .arg(&causal)
            .arg(&window)
            .arg(&softcap)
            .arg(&checked.scale);
        qrot.push(&mut launch);
        launch.arg(&split_tokens).arg(&n_rows).arg(&mut part);
        let cfg = LaunchConfig {
            grid_dim: grid(h_kv / shape.heads(), splits, batch.div_ceil(rows))?,
            block_dim: (32 * shape.warps as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: `check` verified that every visible token of every sequence maps to whole
        // rows inside both caches (through the table's entries when paged), that `q` holds
        // [batch, h_q, d] and that the rotations match d and d_v; the partials buffer holds
        // [batch, h_q, splits · streams, d_v + 3] floats, the grid's shape (a block's rows past
        // `n_rows` are neither read nor written). With `rows` > 1 the rows share one cache
        // whose tokens below the rows' common length are all valid, so the union of their
        // visible ranges is too.
        unsafe { launch.launch(cfg) }.context(|| describe(name, &decode, &key))?;

        let n_part = n_part as i64;
        let mut launch = stream.launch_builder(&combine);
        launch.arg(&part).arg(&n_part);
        vrot.push(&mut launch);
        let no_lse = 0u64;
        launch.arg(out).arg(&no_lse);
        let cfg = LaunchConfig {
            grid_dim: grid(h_q, batch, 1)?,
            block_dim: (128, 1, 1),
            shared_mem_bytes: layout.combine_smem as u32,
        };
        // SAFETY: reads the partials written above and writes [batch, h_q, d_v] of `out`,
        // whose length `check` verified.
        unsafe { launch.launch(cfg) }.context(|| describe("decode_combine", &combine, &key))?;
        Ok(())
    }

    /// The device and every buffer of a call are this attention's device.
    fn on_device<T>(
        &self,
        dev: &Device,
        q: &CudaSlice<T>,
        k: &CudaKvCache<'_>,
        v: &CudaKvCache<'_>,
        out: &CudaSlice<T>,
    ) -> Result<()> {
        let ordinals = [
            dev.context().ordinal(),
            q.ordinal(),
            k.bytes.ordinal(),
            v.bytes.ordinal(),
            out.ordinal(),
        ];
        match ordinals.iter().find(|&&o| o != self.ordinal) {
            Some(&actual) => Err(CudaError::WrongDevice {
                expected: self.ordinal,
                actual,
            }),
            None => Ok(()),
        }
    }

    /// Validates a decode call; returns the f32 score scale and the longest visible range.
    #[allow(clippy::too_many_arguments)]
    fn check(
        &self,
        q_len: usize,
        h_q: usize,
        k: &CudaKvCache<'_>,
        v: &CudaKvCache<'_>,
        seqs: &[DecodeSeq],
        shared: bool,
        params: &AttentionParams,
        out_len: usize,
    ) -> Result<Checked> {
        params.validate()?;
        let shape = |m: String| -> Result<Checked> { Err(Error::Shape(m).into()) };
        // Sequences with a cache of their own (one when they share it).
        let caches = if shared { 1 } else { seqs.len() };
        let (d, d_v, h_kv) = (k.dim, v.dim, k.n_heads);
        if h_kv == 0 || h_q == 0 || !h_q.is_multiple_of(h_kv) {
            return shape(format!(
                "h_q {h_q} must be a positive multiple of h_kv {h_kv}"
            ));
        }
        if v.n_heads != h_kv {
            return shape(format!("V has {} heads but K has {h_kv}", v.n_heads));
        }
        let group = h_q / h_kv;
        if group > MAX_GROUP {
            return shape(format!(
                "{group} query heads per KV head; the CUDA decode kernel takes at most {MAX_GROUP}"
            ));
        }
        check_head_dim(d, "CUDA decode K head")?;
        check_head_dim(d_v, "CUDA decode V head")?;
        self.plan.check_dims(d, d_v)?;
        let batch = seqs.len();
        let overflow = |what| CudaError::Input(Error::Overflow(what));
        for (what, len, dim) in [
            ("queries [batch, h_q, d]", q_len, d),
            ("output [batch, h_q, d_v]", out_len, d_v),
        ] {
            let expected = batch
                .checked_mul(h_q)
                .and_then(|x| x.checked_mul(dim))
                .ok_or(overflow("query size"))?;
            if len != expected {
                return Err(Error::LengthMismatch {
                    what,
                    expected,
                    actual: len,
                }
                .into());
            }
        }
        // Every token of every sequence lies in whole rows of both caches.
        let fits = |x: usize| i64::try_from(x).is_ok();
        let (capacity, pages) = match (k.layout, v.layout) {
            (
                CacheLayout::Contiguous { tokens_per_seq: a },
                CacheLayout::Contiguous { tokens_per_seq: b },
            ) if a == b => (a, None),
            (
                CacheLayout::Paged {
                    table: ta,
                    pages_per_seq: pa,
                    page_tokens: ka,
                },
                CacheLayout::Paged {
                    table: tb,
                    pages_per_seq: pb,
                    page_tokens: kb,
                },
            ) if std::ptr::eq(ta, tb) && pa == pb && ka == kb => {
                if ka == 0 {
                    return Err(Error::InvalidParameter {
                        name: "page_tokens",
                        reason: "a page holds at least one token".into(),
                    }
                    .into());
                }
                let needed = caches.checked_mul(pa).ok_or(overflow("block table size"))?;
                if ta.len() < needed {
                    return Err(Error::LengthMismatch {
                        what: "block table entries (sequences × pages_per_seq)",
                        expected: needed,
                        actual: ta.len(),
                    }
                    .into());
                }
                (
                    pa.checked_mul(ka).ok_or(overflow("sequence capacity"))?,
                    Some((ta, pa, ka)),
                )
            }
            _ => {
                return shape("K and V must share one layout (the same table)".into());
            }
        };
        if !fits(capacity) {
            return Err(overflow("sequence capacity"));
        }
        // Before the pages are looked at: a sequence longer than its table would index past it.
        if let Some((b, s)) = seqs.iter().enumerate().find(|(_, s)| s.n_tokens > capacity) {
            return shape(format!(
                "sequence {b} has {} tokens but the cache holds {capacity} per sequence",
                s.n_tokens
            ));
        }
        for c in [k, v] {
            check_format(c.format, c.dim)?;
            let row_bytes = c.format.row_bytes(c.dim)?;
            let token_bytes = h_kv
                .checked_mul(row_bytes)
                .ok_or(overflow("bytes per token"))?;
            if !fits(c.bytes.len()) {
                return Err(overflow("cache size"));
            }
            match pages {
                None => {
                    let needed = caches
                        .checked_mul(capacity)
                        .and_then(|x| x.checked_mul(token_bytes))
                        .ok_or(overflow("cache size"))?;
                    if c.bytes.len() < needed {
                        return Err(Error::LengthMismatch {
                            what: "KV cache bytes (at least sequences × tokens_per_seq × heads × row bytes)",
                            expected: needed,
                            actual: c.bytes.len(),
                        }
                        .into());
                    }
                }
                Some((table, per_seq, page_tokens)) => {
                    let page_bytes = page_tokens
                        .checked_mul(token_bytes)
                        .ok_or(overflow("page size"))?;
                    let n_pages = c.bytes.len() / page_bytes;
                    for (b, s) in seqs.iter().enumerate() {
                        let used = s.n_tokens.div_ceil(page_tokens);
                        let row = if shared { 0 } else { b };
                        if let Some(bad) = table[row * per_seq..][..used]
                            .iter()
                            .find(|&&p| p as usize >= n_pages)
                        {
                            return Err(Error::InvalidParameter {
                                name: "block table",
                                reason: format!(
                                    "sequence {b} uses page {bad}, outside the cache's {n_pages} pages"
                                ),
                            }
                            .into());
                        }
                    }
                }
            }
        }
        let mut longest = 0usize;
        let mut ranges = Vec::with_capacity(seqs.len());
        for s in seqs {
            if !fits(s.pos.checked_add(1).ok_or(overflow("query position"))?) {
                return Err(overflow("query position"));
            }
            let hi = if params.causal {
                s.n_tokens.min(s.pos + 1)
            } else {
                s.n_tokens
            };
            let lo = params
                .window
                .map_or(0, |w| (s.pos + 1).saturating_sub(w))
                .min(hi);
            longest = longest.max(hi - lo);
            ranges.push((lo, hi));
        }
        let (scale, _) = params.f32_factors(d)?;
        Ok(Checked {
            scale,
            longest,
            ranges,
        })
    }
}

struct Checked {
    scale: f32,
    /// The longest visible range of one row.
    longest: usize,
    /// Each row's visible tokens [lo, hi).
    ranges: Vec<(usize, usize)>,
}

/// What a failed launch was.
pub(crate) fn describe(name: &str, f: &CudaFunction, key: &str) -> String {
    format!(
        "launching {name} ({} registers per thread; {key})",
        f.num_regs().unwrap_or(-1)
    )
}
