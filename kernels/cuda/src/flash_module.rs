//! The flash prefill modules (`cuda/flash.cu`): what one module is compiled for
//! ([`FlashShape`]), its shared-memory layout, launch bounds and register budgets
//! ([`FlashLayout`], computed here only: the launch sizes its shared memory and checks the
//! kernel's registers from it, and the source carries it as the `FlashTraits` struct), and its
//! source.

use crate::attention::PrefillConfig;
use crate::attention_module::{self, format_defines, odd_units, widest_copy};
use crate::device::SM90A;
use crate::error::{CudaError, Result};
use crate::kernel::Traits;
use rotq_reference::{Error, KvFormat};

const FLASH: &str = include_str!("cuda/flash.cu");

/// The producer warps of a warp-specialized flash block.
pub(crate) const PRODUCER_WARPS: usize = 4;

/// Registers per thread of a producer warp of warp-specialized blocks after `setmaxnreg` (they
/// copy and convert, which needs few).
const PRODUCER_REGISTERS: usize = 40;

/// The shape of one compiled prefill (flash) module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FlashShape {
    /// The queries' and output's element type (`GpuElement::ELEM`).
    pub elem: u32,
    pub k_format: KvFormat,
    pub v_format: KvFormat,
    pub d: usize,
    pub d_v: usize,
    pub group: usize,
    /// Computing warps per block.
    pub warps: usize,
    /// Tokens per K/V tile.
    pub block_n: usize,
    /// Row tiles of 16 per warp.
    pub m_tiles: usize,
    /// Warp-specialized: a producer warpgroup besides the `warps` consumers.
    pub ws: bool,
}

/// Shared memory, launch bounds and registers of a flash module, in bytes unless named
/// otherwise. The tiles' region holds two stages of raw K and V rows, then the code
/// buffers (one, or two with a producer warpgroup filling one while the other is read), each
/// with K codes, V codes, K scales (f32), V scales (f16 for f16 queries, else f32), a word of
/// bad-V token bits per converting warp and, warp-specialized, two flags. The queries (before
/// the loop) and the outputs (after it) are f32 rows over the same space; blocks of 8 warps,
/// of two row tiles per warp or warp-specialized keep their queries as elements after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FlashLayout {
    /// One KV head's K and V rows in the cache, and the bytes per copy of them.
    pub k_row: usize,
    pub v_row: usize,
    pub copy_bytes: usize,
    /// Raw rows apart in a stage: an odd number of 16-byte units for 16-byte copies, else of
    /// 8-byte units (lanes reading the same word of consecutive rows meet at most two to a
    /// bank); one stage.
    pub k_raw_stride: usize,
    pub v_raw_stride: usize,
    pub stage_bytes: usize,
    /// Code rows apart, in elements: d + 8 and d_v + 8, an odd number of 16-byte units
    /// (conflict-free ldmatrix).
    pub k_code_stride: usize,
    pub v_code_stride: usize,
    /// Code buffers, and one buffer's codes, K scales and V scales.
    pub code_buffers: usize,
    pub code_buffer_bytes: usize,
    pub k_scales_bytes: usize,
    pub v_scales_bytes: usize,
    /// Words of bad-V bits per buffer (one per converting warp).
    pub bad_words: usize,
    /// Offsets of the codes, K scales, V scales, bad-V words and flags.
    pub codes_at: usize,
    pub k_scales_at: usize,
    pub v_scales_at: usize,
    pub bad_at: usize,
    pub flags_at: usize,
    /// The tiles' region, and the f32 rows of the queries and outputs over it.
    pub tiles_bytes: usize,
    pub rows_bytes: usize,
    /// Whether the queries stay in shared memory (as elements, rows of `k_code_stride`), and
    /// where (16-byte aligned, after the larger of the tiles and the rows).
    pub queries_in_smem: bool,
    pub queries_at: usize,
    /// The dynamic shared memory.
    pub smem: usize,
    /// Blocks per multiprocessor in the launch bounds.
    pub min_blocks: usize,
    /// Threads of the producer warpgroup (0 unless warp-specialized).
    pub producer_threads: usize,
    /// Warp-specialized: registers per thread at the launch (the launch bound's share of the
    /// multiprocessor's 65,536, in units of 8), and after `setmaxnreg` for the producers and
    /// the consumers.
    pub registers: usize,
    pub producer_registers: usize,
    pub consumer_registers: usize,
}

impl FlashShape {
    /// The plain blocks `config` asks for: queries of `elem`, K and V in `k_format` and
    /// `v_format` of `d` and `d_v` dimensions, `group` query heads per KV head.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn asked(
        config: PrefillConfig,
        elem: u32,
        k_format: KvFormat,
        v_format: KvFormat,
        d: usize,
        d_v: usize,
        group: usize,
    ) -> Self {
        FlashShape {
            elem,
            k_format,
            v_format,
            d,
            d_v,
            group,
            warps: config.warps.clamp(1, 8),
            block_n: if config.block_n <= 32 { 32 } else { 64 },
            m_tiles: config.m_tiles_for(d, d_v, false),
            ws: false,
        }
    }

    /// The warp-specialized blocks of the same call.
    pub(crate) fn specialized(&self, config: PrefillConfig) -> Self {
        FlashShape {
            ws: true,
            m_tiles: config.m_tiles_for(self.d, self.d_v, true),
            ..*self
        }
    }

    /// These plain blocks with smaller tiles, one row tile, then fewer warps until they fit
    /// `max_smem` bytes of shared memory.
    pub(crate) fn fit(mut self, max_smem: usize) -> Result<Self> {
        while self.smem()? > max_smem && self.block_n > 32 {
            self.block_n = 32;
        }
        if self.smem()? > max_smem {
            self.m_tiles = 1;
        }
        while self.smem()? > max_smem && self.warps > 1 {
            self.warps /= 2;
        }
        if self.smem()? > max_smem {
            return Err(Error::UnsupportedDim {
                n: self.d.max(self.d_v),
                what: "CUDA prefill attention head",
                hint: "a K/V tile of 32 tokens and 16 query rows must fit the shared memory",
            }
            .into());
        }
        Ok(self)
    }

    /// Query rows per block: 16 per row tile of each computing warp.
    pub(crate) fn block_rows(&self) -> usize {
        16 * self.m_tiles * self.warps
    }

    /// Threads per block (the producers too).
    pub(crate) fn threads(&self) -> usize {
        32 * (self.warps + PRODUCER_WARPS * self.ws as usize)
    }

    /// The module's layout (see [`FlashLayout`]).
    pub(crate) fn layout(&self) -> Result<FlashLayout> {
        let (k_row, v_row) = (
            self.k_format.row_bytes(self.d)?,
            self.v_format.row_bytes(self.d_v)?,
        );
        let copy_bytes = widest_copy(k_row, v_row);
        let unit = if copy_bytes == 16 { 16 } else { 8 };
        let (k_raw_stride, v_raw_stride) = (odd_units(k_row, unit), odd_units(v_row, unit));
        let n = self.block_n;
        let stage_bytes = n * (k_raw_stride + v_raw_stride);
        let (k_code_stride, v_code_stride) = (self.d + 8, self.d_v + 8);
        let code_buffers = if self.ws { 2 } else { 1 };
        let code_buffer_bytes = 2 * n * (k_code_stride + v_code_stride);
        let k_scales_bytes = 4 * n * (self.d / 32);
        let v_scale = if self.elem == 1 { 2 } else { 4 };
        let v_scales_bytes = v_scale * n * (self.d_v / 32);
        let bad_words = if self.ws { PRODUCER_WARPS } else { self.warps };
        let codes_at = 2 * stage_bytes;
        let k_scales_at = codes_at + code_buffers * code_buffer_bytes;
        let v_scales_at = k_scales_at + code_buffers * k_scales_bytes;
        let bad_at = v_scales_at + code_buffers * v_scales_bytes;
        let flags_at = bad_at + code_buffers * 8 * bad_words;
        let tiles_bytes = flags_at + if self.ws { 8 } else { 0 };
        let block_rows = self.block_rows();
        let rows_bytes = 4 * block_rows * self.d.max(self.d_v);
        // Blocks of 8 warps (and of two row tiles per warp) keep the queries in shared memory
        // and take 128 registers per thread, for two blocks (16 warps) per multiprocessor;
        // blocks of 4 warps and one row tile hold them in registers. Measured on an H100, 8k
        // tokens causal, q8_0: 8 warps x tiles of 64 this way 188-191 TFLOP/s; 4 warps
        // 149-157; two row tiles 154-158; 8 warps with 255 registers and one block per
        // multiprocessor 148. Warp-specialized blocks (one per multiprocessor, 232 registers
        // per computing thread) keep them in shared memory too.
        let queries_in_smem = self.warps >= 8 || self.m_tiles >= 2 || self.ws;
        let queries_at = tiles_bytes.max(rows_bytes).next_multiple_of(16);
        let query_bytes = if queries_in_smem {
            2 * block_rows * k_code_stride
        } else {
            0
        };
        // Enough blocks per multiprocessor for 12 or 16 warps where the registers allow it;
        // two row tiles per warp hold twice the scores and outputs (up to 255 registers).
        // Warp-specialized blocks: one of 12 warps.
        let min_blocks = if self.ws || self.d > 128 || self.d_v > 128 {
            1
        } else if self.m_tiles >= 2 {
            if self.warps >= 8 {
                1
            } else {
                2
            }
        } else {
            match self.warps {
                4 => 3,
                w if w >= 8 => 2,
                _ => 1,
            }
        };
        let threads = self.threads();
        let producer_threads = threads - 32 * self.warps;
        // The pool the roles divide holds threads · registers only when the kernel uses all
        // of them, which the host checks (with fewer, the consumers' request could never be
        // met).
        let registers = 65536 / threads / 8 * 8;
        let consumer_registers = (registers * threads)
            .saturating_sub(producer_threads * PRODUCER_REGISTERS)
            / (32 * self.warps)
            / 8
            * 8;
        let overflow = || CudaError::Input(Error::Overflow("flash shared memory"));
        Ok(FlashLayout {
            k_row,
            v_row,
            copy_bytes,
            k_raw_stride,
            v_raw_stride,
            stage_bytes,
            k_code_stride,
            v_code_stride,
            code_buffers,
            code_buffer_bytes,
            k_scales_bytes,
            v_scales_bytes,
            bad_words,
            codes_at,
            k_scales_at,
            v_scales_at,
            bad_at,
            flags_at,
            tiles_bytes,
            rows_bytes,
            queries_in_smem,
            queries_at,
            smem: queries_at.checked_add(query_bytes).ok_or_else(overflow)?,
            min_blocks,
            producer_threads,
            registers,
            producer_registers: PRODUCER_REGISTERS,
            consumer_registers,
        })
    }

    /// The dynamic shared memory.
    pub(crate) fn smem(&self) -> Result<usize> {
        Ok(self.layout()?.smem)
    }

    /// This shape as what a prefill call with `asked` ran.
    pub(crate) fn config(&self, asked: PrefillConfig) -> PrefillConfig {
        PrefillConfig {
            warps: self.warps,
            block_n: self.block_n,
            m_tiles: self.m_tiles,
            flash: true,
            specialized: self.ws,
            ..asked
        }
    }

    /// The module's cache key and source: the element type, formats and code paths as
    /// defines (the preprocessor picks types, functions and paths by them), the shape and
    /// layout as `FlashTraits`.
    pub(crate) fn source(&self) -> Result<(String, String)> {
        let l = self.layout()?;
        let mut t = Traits::new(
            "FlashTraits",
            "flash_module.rs: this module's shape, shared-memory layout, launch bounds and registers",
        );
        t.int("kHeadDim", self.d, "K head dimension (a multiple of 32)")
            .int("kHeadDimV", self.d_v, "V head dimension (a multiple of 32)")
            .int("kGroup", self.group, "query heads per KV head")
            .int("kWarps", self.warps, "computing warps per block")
            .int("kBlockN", self.block_n, "tokens per K/V tile")
            .int(
                "kRowTiles",
                self.m_tiles,
                "row tiles of 16 per computing warp",
            )
            .flag(
                "kWarpSpecialized",
                self.ws,
                "a producer warpgroup copies and converts",
            )
            .int(
                "kProducerThreads",
                l.producer_threads,
                "the producer warpgroup's threads",
            )
            .int("kKRowBytes", l.k_row, "one KV head's K row in the cache")
            .int("kVRowBytes", l.v_row, "one KV head's V row in the cache")
            .int("kCopyBytes", l.copy_bytes, "bytes per copy of raw rows")
            .int("kKRawStride", l.k_raw_stride, "raw K rows apart in a stage")
            .int("kVRawStride", l.v_raw_stride, "raw V rows apart in a stage")
            .int(
                "kStageBytes",
                l.stage_bytes,
                "one stage of raw K and V rows",
            )
            .int(
                "kKCodeStride",
                l.k_code_stride,
                "K code rows apart, in elements",
            )
            .int(
                "kVCodeStride",
                l.v_code_stride,
                "V code rows apart, in elements",
            )
            .int(
                "kCodeBuffers",
                l.code_buffers,
                "buffers of codes, scales and flags",
            )
            .int(
                "kCodeBufferBytes",
                l.code_buffer_bytes,
                "one buffer's K and V codes",
            )
            .int("kKScalesBytes", l.k_scales_bytes, "one buffer's K scales")
            .int("kVScalesBytes", l.v_scales_bytes, "one buffer's V scales")
            .int("kBadWords", l.bad_words, "bad-V words per buffer")
            .int("kCodesAt", l.codes_at, "offset of the code buffers")
            .int("kKScalesAt", l.k_scales_at, "offset of the K scales")
            .int("kVScalesAt", l.v_scales_at, "offset of the V scales")
            .int("kBadAt", l.bad_at, "offset of the bad-V words")
            .int("kFlagsAt", l.flags_at, "offset of the wild-tile flags")
            .int("kTilesBytes", l.tiles_bytes, "the tiles' region")
            .int(
                "kRowsBytes",
                l.rows_bytes,
                "f32 query and output rows over it",
            )
            .flag(
                "kQueriesInSmem",
                l.queries_in_smem,
                "queries as elements in smem",
            )
            .int("kQueriesAt", l.queries_at, "offset of those queries")
            .int("kSmemBytes", l.smem, "the dynamic shared memory")
            .int("kMinBlocks", l.min_blocks, "launch bounds' blocks per SM")
            .int(
                "kRegisters",
                l.registers,
                "registers per thread at the launch",
            )
            .int(
                "kProducerRegisters",
                l.producer_registers,
                "a producer's, after setmaxnreg",
            )
            .int(
                "kConsumerRegisters",
                l.consumer_registers,
                "a consumer's, after setmaxnreg",
            );
        let defines = format!(
            "{}#define RQ_TENSOR_CORES 1\n#define RQ_WARP_SPECIALIZED {}\n\
             #define RQ_QUERIES_IN_SMEM {}\n{}",
            format_defines(self.elem, self.k_format, self.v_format),
            self.ws as u32,
            l.queries_in_smem as u32,
            if self.ws { SM90A } else { "" },
        );
        let key = format!("flash {self:?}");
        Ok((
            key,
            attention_module::source(&defines, &t.finish(), &[FLASH]),
        ))
    }
}
