//! The decode modules (`cuda/decode.cu`, and `cuda/decode_mma.cu` for the tensor cores): what
//! one module is compiled for ([`Shape`]), its shared-memory layout and launch bounds
//! ([`DecodeLayout`], computed here only: the launch sizes its shared memory from it and the
//! source carries it as the `DecodeTraits` struct), and its source.

use crate::attention::{DecodeConfig, MAX_GROUP, TENSOR_CORE_K_FORMATS, TENSOR_CORE_V_FORMATS};
use crate::attention_module::{self, format_defines, odd_units, widest_copy};
use crate::error::{CudaError, Result};
use crate::kernel::Traits;
use rotq_reference::{Error, KvFormat};

const DECODE: &str = include_str!("cuda/decode.cu");
const DECODE_MMA: &str = include_str!("cuda/decode_mma.cu");

/// The shape of one compiled decode module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    /// The queries' and output's element type (`GpuElement::ELEM`).
    pub elem: u32,
    pub k_format: KvFormat,
    pub v_format: KvFormat,
    pub d: usize,
    pub d_v: usize,
    pub group: usize,
    pub warps: usize,
    pub tensor_cores: bool,
    /// Query rows per thread block of the tensor-core kernel (1 for decode).
    pub rows: usize,
    /// A block of the tensor-core kernel takes two KV heads, whose rows of a token are
    /// adjacent and copied together (see [`Shape::pairs`]).
    pub pair: bool,
    /// The tensor-core kernel stages one tile of V rows per stream instead of two.
    pub split_v: bool,
}

/// What decides a decode module's shape besides its configuration: the element type of the
/// queries, the caches' formats and head dimensions, the group, the KV heads and whether the
/// rows share one cache (prefill through the decode kernel).
#[derive(Clone, Copy, Debug)]
pub(crate) struct DecodeCall {
    pub elem: u32,
    pub k_format: KvFormat,
    pub v_format: KvFormat,
    pub d: usize,
    pub d_v: usize,
    pub group: usize,
    pub h_kv: usize,
    pub shared: bool,
}

/// Shared memory and launch bounds of a decode module, in bytes unless named otherwise. The
/// f32 kernel's rows in shared memory are an odd number of 4-byte words apart, the
/// tensor-core kernel's (the block's heads' rows of a token) an odd number of 16-byte units, so
/// that lanes reading the same offset of consecutive rows hit different banks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DecodeLayout {
    /// One KV head's K and V rows in the cache.
    pub k_row: usize,
    pub v_row: usize,
    /// The f32 kernel: staged K and V rows apart, in 4-byte words; one stage (32 tokens' K
    /// then V rows) and a warp's share (two stages and the tile's weights), in words.
    pub k_stride_words: usize,
    pub v_stride_words: usize,
    pub stage_words: usize,
    pub warp_words: usize,
    /// The tensor-core kernel: KV heads per block and streams of tiles per head.
    pub heads: usize,
    pub streams: usize,
    /// Its staged K and V rows apart (the block's heads' rows of one token each), one stage
    /// of 32 tokens' K and V rows, and a stream's stages.
    pub k_stage_stride: usize,
    pub v_stage_stride: usize,
    pub tile_bytes: usize,
    pub stream_bytes: usize,
    /// Its widest copy both staged row sizes allow (16, 8, 4 or 2).
    pub copy_bytes: usize,
    /// Its blocks per multiprocessor in the launch bounds.
    pub min_blocks: usize,
    /// The block's queries (f32), at the start of the shared memory.
    pub query_bytes: usize,
    /// The dynamic shared memory the launched kernel takes.
    pub smem: usize,
    /// Floats of one partial result: d_v outputs, then m, l, seen.
    pub part_floats: usize,
    /// The dynamic shared memory of `decode_combine` (one merged f32 row).
    pub combine_smem: usize,
}

impl Shape {
    /// The module `config` asks for on `call`, with fewer warps where their buffers do not fit
    /// `max_smem` bytes of shared memory.
    pub(crate) fn fit(config: DecodeConfig, call: DecodeCall, max_smem: usize) -> Result<Self> {
        let tensor_cores = config.tensor_cores
            && call.elem != 0
            && TENSOR_CORE_K_FORMATS.contains(&call.k_format)
            && TENSOR_CORE_V_FORMATS.contains(&call.v_format);
        // Rows over one shared cache (prefill) go up to 16 query-head columns per block on the
        // tensor cores, so each K/V tile is read and dequantized once for all of them.
        let rows = if call.shared && tensor_cores {
            (MAX_GROUP / call.group).clamp(1, 8)
        } else {
            1
        };
        // Warps: as configured, fewer if their buffers do not fit the shared memory.
        let mut shape = Shape {
            elem: call.elem,
            k_format: call.k_format,
            v_format: call.v_format,
            d: call.d,
            d_v: call.d_v,
            group: call.group,
            warps: config.warps.clamp(1, 16),
            tensor_cores,
            rows,
            pair: false,
            split_v: tensor_cores && config.split_v,
        };
        // (Pairing depends on the warp count: decided again at each.)
        loop {
            shape.pair = config.pairs && shape.pairs(call.h_kv)?;
            if shape.smem()? <= max_smem || shape.warps == 1 {
                break;
            }
            shape.warps /= 2;
        }
        if shape.smem()? > max_smem {
            return Err(Error::UnsupportedDim {
                n: call.d.max(call.d_v),
                what: "CUDA decode attention head",
                hint: "one warp's staged K/V rows must fit the shared memory",
            }
            .into());
        }
        Ok(shape)
    }

    /// Whether the tensor-core kernel can take KV heads in pairs with `h_kv` heads: an even
    /// number of heads and of warps (two per stream of tiles), and two heads' rows a whole
    /// number of 16-byte copies (so each row is 8-byte aligned). Then a token's two rows move
    /// as 16-byte copies, where one q4_0 row (72 bytes) alone takes twice as many 8-byte
    /// copies.
    fn pairs(&self, h_kv: usize) -> Result<bool> {
        let (k_row, v_row) = (
            self.k_format.row_bytes(self.d)?,
            self.v_format.row_bytes(self.d_v)?,
        );
        Ok(self.tensor_cores
            && h_kv.is_multiple_of(2)
            && self.warps.is_multiple_of(2)
            && (2 * k_row).is_multiple_of(16)
            && (2 * v_row).is_multiple_of(16))
    }

    /// KV heads per thread block (2 with pairs).
    pub(crate) fn heads(&self) -> usize {
        if self.pair {
            2
        } else {
            1
        }
    }

    /// Streams of tiles per KV head in a block (each leaves its own partials).
    pub(crate) fn streams(&self) -> usize {
        self.warps / self.heads()
    }

    /// How the visible tokens are split over the grid's y dimension: `(splits, split_tokens)`
    /// for rows whose longest visible range is `longest` tokens, `splits` asked for (0:
    /// [`crate::auto_splits`] over `units` blocks of `multiprocessors`). Slices are whole
    /// tiles of the block's streams, and no slice is empty.
    pub(crate) fn splits(
        &self,
        asked: usize,
        multiprocessors: usize,
        units: usize,
        longest: usize,
    ) -> (usize, usize) {
        let tile = 32 * self.streams();
        let most = longest.div_ceil(32).max(1);
        let splits = match asked {
            0 => crate::auto_splits(multiprocessors, units, longest),
            s => s,
        }
        .clamp(1, most.min(1024));
        let split_tokens = longest.div_ceil(splits).div_ceil(tile).max(1) * tile;
        (longest.div_ceil(split_tokens).max(1), split_tokens)
    }

    /// The module's layout: the block's heads' queries (f32), then per stream of tiles its
    /// staged raw K and V rows (two stages, or with `split_v` two of K and one of V; for the
    /// f32 kernel, two stages and the tile's weights).
    pub(crate) fn layout(&self) -> Result<DecodeLayout> {
        let (k_row, v_row) = (
            self.k_format.row_bytes(self.d)?,
            self.v_format.row_bytes(self.d_v)?,
        );
        let (heads, streams) = (self.heads(), self.streams());
        let k_stride_words = odd_units(k_row, 4) / 4;
        let v_stride_words = odd_units(v_row, 4) / 4;
        let stage_words = 32 * (k_stride_words + v_stride_words);
        let warp_words = 2 * stage_words + 32 * self.group;
        let (staged_k, staged_v) = (heads * k_row, heads * v_row);
        let k_stage_stride = odd_units(staged_k, 16);
        let v_stage_stride = odd_units(staged_v, 16);
        let tile_bytes = 32 * (k_stage_stride + v_stage_stride);
        let stream_bytes = if self.split_v {
            32 * (2 * k_stage_stride + v_stage_stride)
        } else {
            2 * tile_bytes
        };
        let copy_bytes = widest_copy(staged_k, staged_v);
        // Enough blocks per multiprocessor to keep at least 16 warps resident (128 registers
        // per thread), where that needs no spills: one column tile of 8 query heads and head
        // dimensions up to 128.
        let one_column_tile = self.group * self.rows <= 8;
        let min_blocks = if one_column_tile && self.d <= 128 && self.d_v <= 128 && self.warps <= 16
        {
            16 / self.warps
        } else {
            1
        };
        let query_bytes = 4 * heads * self.group * self.rows * self.d;
        let staging = if self.tensor_cores {
            streams * stream_bytes
        } else {
            self.warps * 4 * warp_words
        };
        let overflow = || CudaError::Input(Error::Overflow("decode shared memory"));
        Ok(DecodeLayout {
            k_row,
            v_row,
            k_stride_words,
            v_stride_words,
            stage_words,
            warp_words,
            heads,
            streams,
            k_stage_stride,
            v_stage_stride,
            tile_bytes,
            stream_bytes,
            copy_bytes,
            min_blocks,
            query_bytes,
            smem: query_bytes.checked_add(staging).ok_or_else(overflow)?,
            part_floats: self.d_v + 3,
            combine_smem: 4 * self.d_v,
        })
    }

    /// The dynamic shared memory of the launched kernel.
    pub(crate) fn smem(&self) -> Result<usize> {
        Ok(self.layout()?.smem)
    }

    /// The module's cache key and source: the element type and formats as defines (the
    /// preprocessor picks types and functions by them), the shape and layout as `DecodeTraits`.
    pub(crate) fn source(&self) -> Result<(String, String)> {
        self.source_for(false)
    }

    /// [`Self::source`], with `masked`: `decode_attention` takes the batch API's additive
    /// mask (`RQ_MASK`; the f32 kernel only). Unmasked modules are as they were.
    pub(crate) fn source_for(&self, masked: bool) -> Result<(String, String)> {
        if masked && self.tensor_cores {
            return Err(CudaError::Input(Error::InvalidParameter {
                name: "mask",
                reason: "the tensor-core decode kernel takes no mask".into(),
            }));
        }
        let l = self.layout()?;
        let mut t = Traits::new(
            "DecodeTraits",
            "decode_module.rs: this module's shape, shared-memory layout and launch bounds",
        );
        t.int("kHeadDim", self.d, "K head dimension (a multiple of 32)")
            .int("kHeadDimV", self.d_v, "V head dimension (a multiple of 32)")
            .int("kGroup", self.group, "query heads per KV head")
            .int("kWarps", self.warps, "warps per thread block")
            .int(
                "kQueryRows",
                self.rows,
                "query rows per block (tensor cores)",
            )
            .flag(
                "kTensorCores",
                self.tensor_cores,
                "the launched kernel is decode_attention_mma",
            )
            .flag(
                "kPairs",
                self.pair,
                "a tensor-core block takes two KV heads",
            )
            .flag("kSplitV", self.split_v, "one stage of V rows per stream")
            .int("kKRowBytes", l.k_row, "one KV head's K row in the cache")
            .int("kVRowBytes", l.v_row, "one KV head's V row in the cache")
            .int(
                "kKStrideWords",
                l.k_stride_words,
                "f32 kernel: staged K rows apart",
            )
            .int(
                "kVStrideWords",
                l.v_stride_words,
                "f32 kernel: staged V rows apart",
            )
            .int(
                "kStageWords",
                l.stage_words,
                "f32 kernel: one stage of K and V rows",
            )
            .int(
                "kWarpWords",
                l.warp_words,
                "f32 kernel: a warp's stages and weights",
            )
            .int("kHeads", l.heads, "tensor cores: KV heads per block")
            .int(
                "kStreams",
                l.streams,
                "tensor cores: streams of tiles per head",
            )
            .int(
                "kKStageStride",
                l.k_stage_stride,
                "tensor cores: staged K rows apart",
            )
            .int(
                "kVStageStride",
                l.v_stage_stride,
                "tensor cores: staged V rows apart",
            )
            .int(
                "kTileBytes",
                l.tile_bytes,
                "tensor cores: one stage of K and V rows",
            )
            .int(
                "kStreamBytes",
                l.stream_bytes,
                "tensor cores: a stream's stages",
            )
            .int("kCopyBytes", l.copy_bytes, "tensor cores: bytes per copy")
            .int(
                "kMinBlocks",
                l.min_blocks,
                "tensor cores: launch bounds' blocks per SM",
            )
            .int(
                "kQueryBytes",
                l.query_bytes,
                "the queries, first in shared memory",
            )
            .int(
                "kSmemBytes",
                l.smem,
                "the launched kernel's dynamic shared memory",
            )
            .int(
                "kPartFloats",
                l.part_floats,
                "one partial: outputs, m, l, seen",
            )
            .int(
                "kCombineBytes",
                l.combine_smem,
                "decode_combine's dynamic shared memory",
            );
        let (k_row, v_row) = (self.k_format.is_row(), self.v_format.is_row());
        let defines = format!(
            "{}#define RQ_TENSOR_CORES {}\n#define RQ_TQ_K {}\n#define RQ_TQ_V {}\n",
            format_defines(self.elem, self.k_format, self.v_format),
            self.tensor_cores as u32,
            k_row as u32,
            v_row as u32,
        );
        // The row formats' code and tables, each format once (its row length in its name's
        // defines: one format for K and V needs one length).
        let mut formats = String::new();
        if k_row || v_row {
            if self.k_format == self.v_format && self.d != self.d_v {
                return Err(CudaError::Input(Error::InvalidParameter {
                    name: "head dimensions",
                    reason: format!(
                        "{} for both K and V takes one head dimension on CUDA, not {} and {}",
                        self.k_format, self.d, self.d_v
                    ),
                }));
            }
            formats += crate::turbo::TURBO;
            formats += &crate::turbo::tables(self.k_format, self.d);
            if self.v_format != self.k_format {
                formats += &crate::turbo::tables(self.v_format, self.d_v);
            }
        }
        let (defines, key) = match masked {
            true => (
                defines + "#define RQ_MASK 1\n",
                format!("decode {self:?} masked"),
            ),
            false => (defines, format!("decode {self:?}")),
        };
        let mma = if self.tensor_cores { DECODE_MMA } else { "" };
        Ok((
            key,
            attention_module::source_with(&defines, &t.finish(), &formats, &[DECODE, mma]),
        ))
    }
}
