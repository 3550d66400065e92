//! The C ABI v2: stateless calls on memory the engine owns ([`rotq::pool`] from C).
//!
//! A server keeps, per layer, a K pool and a V pool of pages shared by every sequence, in its
//! own memory (host memory it allocated, a pinned arena, a memory-mapped file). rotq keeps none
//! of it: every call takes the buffers (`uint8_t*` and a byte length, exactly
//! [`rotq_pool_bytes`]), so the engine decides where pools live, how many there are, and when
//! they go away. What rotq does keep, in opaque handles, is what costs to build:
//!
//! * a **codec** ([`rotq_codec_new`]): what a layer's pool holds ([`RotqPoolSpec`]: formats,
//!   rotation, heads, dimensions, pages) and its kernels. One codec serves every layer of that
//!   spec, or one per layer when the rotations differ ([`rotq_checkpoint_codecs`]).
//! * a **plan** ([`rotq_plan_new`]): one step's batch attention, planned once and run for each
//!   layer ([`rotq_attention_run`]), with the sizes of the buffers the run takes
//!   ([`rotq_plan_sizes`]).
//!
//! A step: [`rotq_pool_append`] writes the step's new keys and values through vLLM's slot
//! mapping (`slot = page · page_tokens + offset`, −1 skips a padded token), then
//! [`rotq_plan_new`] once, then [`rotq_attention_run`] per layer. [`rotq_pool_shift`] is the
//! context shift (llama.cpp's `seq_add`). The pool layout is [`rotq::pool`]'s (docs/formats.md
//! gives every format's bytes), so an engine may move or copy whole slots itself.
//!
//! **Positions are the engine's.** rotq records none: a sequence's key `j` sits at position
//! `j` (its place in the page table), its query rows at [`RotqBatch::q_positions`] (else its
//! newest tokens), and a shift takes a delta. So the calls take no positions, and an engine
//! that checks shifts (no slot moved below position 0) does it on the positions it holds.
//!
//! **Structs** the engine fills start with `size_t struct_size`, which the caller sets to
//! `sizeof` the struct it was compiled with. rotq refuses a size below its v2.0 size (an error
//! that says so) and reads only the fields it knows, so a later minor version can append
//! fields and still read a struct from a program built against 2.0. Zero is the default of
//! every option, so `struct X x = {.struct_size = sizeof(struct X)};` is a valid start. The v1 structs reused here
//! ([`RotqAttentionParams`], [`RotqRope`]) are frozen as they are.
//!
//! **Errors.** Every malformed input (a null pointer, a short struct, a table naming a page
//! outside the pool or twice, a slot outside the pool or twice, a mask of the wrong shape, a
//! buffer of the wrong length, buffers that overlap where one is written) is a status and a
//! message ([`rotq_last_error`](super::rotq_last_error), per thread) found before any work: a failed call leaves the
//! engine's pool bytes, and its output buffers, as they were.
//!
//! **Threads.** A codec and a plan are shared freely: any call may run on any thread, several
//! at once on one codec and one plan (a codec keeps a small free list of its kernels' working
//! state, so concurrent calls never wait on each other beyond taking one from the list). The
//! memory is the engine's, and so is the rule for it, as for `memcpy`: a call that writes a
//! pool ([`rotq_pool_append`], [`rotq_pool_shift`]) must not overlap another call on the same
//! pool buffers; calls that only read them ([`rotq_plan_new`], [`rotq_attention_run`]) may
//! overlap each other. Free a handle once no call on it runs or will start.
//!
//! ```
//! use rotq_capi::*;
//! use std::ptr::{null, null_mut};
//! // 2 KV heads of 64, q8_0 keys and values, 8 pages of 4 tokens; rotq's default rotation.
//! let spec = RotqPoolSpec {
//!     struct_size: size_of::<RotqPoolSpec>(), k_format: c"q8_0".as_ptr(),
//!     v_format: c"q8_0".as_ptr(), rotation: null(), n_kv_heads: 2, head_dim: 64, v_dim: 64,
//!     n_pages: 8, page_tokens: 4, query: null(), // null: "auto"
//! };
//! let (mut kb, mut vb) = (0, 0);
//! let mut codec = null_mut();
//! // SAFETY: valid spec and out pointers, NUL-terminated names.
//! unsafe {
//!     assert_eq!(rotq_pool_bytes(&spec, &mut kb, &mut vb), RotqStatus::Ok);
//!     assert_eq!(rotq_codec_new(&spec, &mut codec), RotqStatus::Ok);
//! }
//! // The engine's memory.
//! let (mut k_pool, mut v_pool) = (vec![0u8; kb], vec![0u8; vb]);
//! // Sequence 0 has 3 tokens in page 6; sequence 1 has 1 in page 2: one append writes all 4.
//! let rows: Vec<f32> = (0..4 * 2 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
//! let slots = [24i64, 25, 26, 8];
//! // SAFETY: a live codec, pools of the lengths given, 4 tokens of keys, values and slots.
//! let status = unsafe {
//!     rotq_pool_append(codec, k_pool.as_mut_ptr(), kb, v_pool.as_mut_ptr(), vb,
//!                      rows.as_ptr(), rows.as_ptr(), 4, slots.as_ptr())
//! };
//! assert_eq!(status, RotqStatus::Ok);
//! // One decode row each, 4 query heads (GQA 2): a block table of one page per sequence.
//! let (loc, table, lens) = ([0u32, 1, 2], [6i32, 2], [3u32, 1]);
//! let batch = RotqBatch {
//!     struct_size: size_of::<RotqBatch>(), n_seqs: 2, query_start_loc: loc.as_ptr(), h_q: 4,
//!     tables: ROTQ_TABLES_BLOCK, block_table: table.as_ptr(), max_blocks: 1,
//!     seq_lens: lens.as_ptr(), ..RotqBatch::default()
//! };
//! let mut plan = null_mut();
//! let (mut ws, mut out_len, mut lse_len) = (0, 0, 0);
//! // SAFETY: live handles, the batch's arrays as long as it says, pools of their lengths.
//! unsafe {
//!     assert_eq!(rotq_plan_new(codec, &batch, k_pool.as_ptr(), kb, v_pool.as_ptr(), vb,
//!                              &mut plan), RotqStatus::Ok);
//!     assert_eq!(rotq_plan_sizes(plan, &mut ws, &mut out_len, &mut lse_len), RotqStatus::Ok);
//! }
//! assert_eq!((out_len, lse_len), (2 * 4 * 64, 2 * 4));
//! let q = vec![0.25f32; 2 * 4 * 64];
//! let (mut workspace, mut out) = (vec![0f32; ws], vec![0f32; out_len]);
//! // SAFETY: as above; q holds the batch's 2 rows of 4 heads of 64.
//! let status = unsafe {
//!     rotq_attention_run(codec, plan, &batch, k_pool.as_ptr(), kb, v_pool.as_ptr(), vb,
//!                        q.as_ptr(), workspace.as_mut_ptr(), ws, out.as_mut_ptr(), out_len,
//!                        null_mut(), 0)
//! };
//! assert_eq!(status, RotqStatus::Ok);
//! // SAFETY: live handles, each freed once.
//! unsafe { rotq_plan_free(plan); rotq_codec_free(codec) };
//! ```

use super::{format_of, guard, invalid, params_of, refused, rope_of, slice};
use super::{RotqAttentionParams, RotqRope, RotqStatus};
use rotq::checkpoint::TransformConfig;
use rotq::cpu::{CacheCodec, Isa};
use rotq::pool::{AttentionPlan, Batch, KvPool, Mask, PageTables, PoolSpec};
use rotq::{KvFormat, Rotation, RotationPlan};
use std::ffi::{c_char, CStr};
use std::ops::Range;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Mutex, PoisonError};

/// What a failed call reports.
type Failure = (RotqStatus, String);

/// The major version of the ABI (a change of it breaks programs built against an older one).
pub const ROTQ_ABI_VERSION_MAJOR: u32 = 2;

/// The minor version of the ABI (functions, constants and struct fields added at the end).
pub const ROTQ_ABI_VERSION_MINOR: u32 = 4;

/// The ABI version this header describes, packed as `major << 16 | minor`: compare it with
/// [`rotq_abi_version`] at start-up (same major, and a library minor at least the header's).
pub const ROTQ_ABI_VERSION: u32 = (ROTQ_ABI_VERSION_MAJOR << 16) | ROTQ_ABI_VERSION_MINOR;

/// [`RotqRotation::qk`]: rotq's default, `rotq::defaults::plan` (the Hadamard transform of
/// `head_dim`; none when the environment variable `ROTQ_DISABLE_ROTATION` is set to anything
/// but empty or `0` when the codec is made). The value of a zeroed field.
pub const ROTQ_QK_DEFAULT: u32 = 0;
/// [`RotqRotation::qk`]: Q and K are not rotated.
pub const ROTQ_QK_NONE: u32 = 1;
/// [`RotqRotation::qk`]: the normalized Hadamard transform of `head_dim` (a power of two, or
/// 12, 20, 28 or 40 times one).
pub const ROTQ_QK_HADAMARD: u32 = 2;
/// [`RotqRotation::qk`]: block-diagonal Hadamard transforms of [`RotqRotation::qk_block`]
/// values (a power of two dividing `head_dim`).
pub const ROTQ_QK_BLOCK_HADAMARD: u32 = 3;
/// [`RotqRotation::qk`]: the Hadamard transform after random signs, `H (s ⊙ x)`, the signs
/// drawn by SplitMix64 from [`RotqRotation::seed`].
pub const ROTQ_QK_RANDOMIZED: u32 = 4;
/// [`RotqRotation::qk`]: an explicit orthogonal `head_dim × head_dim` matrix `R`, row-major,
/// rows the outputs (`k ← R k`), from [`RotqRotation::matrix_f64`] or
/// [`RotqRotation::matrix_f32`] (exactly one set); `max |R Rᵀ − I| ≤ 1e-4`, else an error.
pub const ROTQ_QK_MATRIX: u32 = 5;

/// [`RotqRotation::v`]: rotq's default for V (`rotq::defaults::plan`: V is not rotated). The
/// value of a zeroed field.
pub const ROTQ_V_DEFAULT: u32 = 0;
/// [`RotqRotation::v`]: V is not rotated.
pub const ROTQ_V_NONE: u32 = 1;
/// [`RotqRotation::v`]: block-diagonal Hadamard transforms of [`RotqRotation::v_block`] values
/// (a power of two dividing `v_dim`), undone on the attention's output.
pub const ROTQ_V_BLOCK_HADAMARD: u32 = 2;
/// [`RotqRotation::v`]: the Hadamard transform of `v_dim`, undone on the attention's output.
pub const ROTQ_V_HADAMARD: u32 = 3;

/// [`RotqBatch::tables`]: vLLM's block table (`block_table`, `max_blocks`, `seq_lens`).
pub const ROTQ_TABLES_BLOCK: u32 = 1;
/// [`RotqBatch::tables`]: FlashInfer's CSR tables (`indptr`, `indices`, `last_page_len`).
pub const ROTQ_TABLES_CSR: u32 = 2;

/// Which rotations a pool's rows get: Q and K by one (`qk`, scores unchanged), V by another
/// (`v`, undone on the output). A zeroed struct (with its size set) is rotq's default. Only
/// the fields the chosen kinds name are read.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RotqRotation {
    /// `sizeof(struct RotqRotation)`.
    pub struct_size: usize,
    /// Rotation of Q and K: a `ROTQ_QK_*` constant.
    pub qk: u32,
    /// Rotation of V: a `ROTQ_V_*` constant.
    pub v: u32,
    /// Block length of [`ROTQ_QK_BLOCK_HADAMARD`].
    pub qk_block: usize,
    /// Seed of [`ROTQ_QK_RANDOMIZED`].
    pub seed: u64,
    /// [`ROTQ_QK_MATRIX`]: `head_dim²` doubles, row-major (or null, with `matrix_f32` set).
    pub matrix_f64: *const f64,
    /// [`ROTQ_QK_MATRIX`]: `head_dim²` floats, row-major (or null, with `matrix_f64` set).
    pub matrix_f32: *const f32,
    /// Block length of [`ROTQ_V_BLOCK_HADAMARD`].
    pub v_block: usize,
}

impl Default for RotqRotation {
    /// rotq's default rotation, the struct's size set.
    fn default() -> Self {
        Self {
            struct_size: size_of::<Self>(),
            qk: ROTQ_QK_DEFAULT,
            v: ROTQ_V_DEFAULT,
            qk_block: 0,
            seed: 0,
            matrix_f64: std::ptr::null(),
            matrix_f32: std::ptr::null(),
            v_block: 0,
        }
    }
}

/// What one layer's pool holds and how much: `n_pages` pages of `page_tokens` tokens, each
/// token `n_kv_heads` rows of K (`head_dim` values in `k_format`) and of V (`v_dim` values in
/// `v_format`), rotated as `rotation` says. Formats are registry names ("f32", "f16", "q8_0",
/// "q4_0", "iq4_nl", …).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RotqPoolSpec {
    /// `sizeof(struct RotqPoolSpec)`.
    pub struct_size: usize,
    /// Format of the K rows (a NUL-terminated name).
    pub k_format: *const c_char,
    /// Format of the V rows (a NUL-terminated name).
    pub v_format: *const c_char,
    /// The rotations (null: rotq's default, as a zeroed [`RotqRotation`]).
    pub rotation: *const RotqRotation,
    /// KV heads per token.
    pub n_kv_heads: usize,
    /// Values per K row.
    pub head_dim: usize,
    /// Values per V row.
    pub v_dim: usize,
    /// Pages in the pool.
    pub n_pages: usize,
    /// Tokens per page (at least 1).
    pub page_tokens: usize,
    /// ABI 2.1: the arithmetic of the attention's `K·Q`, a NUL-terminated name: "auto" (null,
    /// and a 2.0 struct without this field, mean it: q8_0 queries over rotated q4_0 and q8_0 K
    /// caches, exact f32 queries elsewhere), "exact" (what the oracle computes) or "q8_0".
    pub query: *const c_char,
}

impl Default for RotqPoolSpec {
    /// No formats yet, zero sizes, the default rotation and query mode, the struct's size set.
    fn default() -> Self {
        Self {
            struct_size: size_of::<Self>(),
            k_format: std::ptr::null(),
            v_format: std::ptr::null(),
            rotation: std::ptr::null(),
            n_kv_heads: 0,
            head_dim: 0,
            v_dim: 0,
            n_pages: 0,
            page_tokens: 0,
            query: std::ptr::null(),
        }
    }
}

/// One step's batch: `n_seqs` sequences, each with its query rows (decode rows, prefill or
/// chunked-prefill rows, mixed) and its pages. Arrays are the engine's, read during the call.
///
/// Semantics (rotq's batch attention, sequence by sequence): sequence `b`'s query rows are
/// rows `query_start_loc[b] .. query_start_loc[b + 1]` of Q (`[rows, h_q, head_dim]`); its
/// keys are its `len` tokens, key `j` at position `j`; its first query row is at position
/// `q_positions[b]`, or (null `q_positions`) at `len − n_q`: the rows are its newest tokens,
/// appended before the attention, as vLLM does. Scale, causality, window and soft-cap come from
/// `params` (its `pos_offset` must be 0: the positions are `q_positions`'); the mask value for
/// the batch's row `r` and its sequence's key `j` is `mask[r · mask_row_stride + j]`, added to
/// the score after the soft-cap (−∞ hides the key).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RotqBatch {
    /// `sizeof(struct RotqBatch)`.
    pub struct_size: usize,
    /// Sequences in the batch (`B`).
    pub n_seqs: usize,
    /// `B + 1` offsets of the sequences' query rows: from 0, never decreasing; the last is the
    /// batch's row count.
    pub query_start_loc: *const u32,
    /// Query heads (a multiple of the pool's KV heads).
    pub h_q: usize,
    /// Which tables follow: [`ROTQ_TABLES_BLOCK`] or [`ROTQ_TABLES_CSR`].
    pub tables: u32,
    /// Block tables: `[B, max_blocks]` page numbers (`int32_t`, as vLLM passes them); entries
    /// past a sequence's last page are padding, never read (e.g. −1).
    pub block_table: *const i32,
    /// Block tables: columns of `block_table`.
    pub max_blocks: usize,
    /// Block tables: tokens of each sequence (`B` values).
    pub seq_lens: *const u32,
    /// CSR: `B + 1` offsets into `indices`, from 0, never decreasing.
    pub indptr: *const u32,
    /// CSR: page numbers; sequence `b`'s are `indices[indptr[b] .. indptr[b + 1]]`.
    pub indices: *const u32,
    /// CSR: length of `indices`.
    pub n_indices: usize,
    /// CSR: tokens in each sequence's last page (1 to `page_tokens`; `B` values).
    pub last_page_len: *const u32,
    /// Scale, causality, window and soft-cap, for every sequence (`pos_offset` must be 0).
    pub params: RotqAttentionParams,
    /// Position of each sequence's first query row (`B` values), or null: `len − n_q`.
    pub q_positions: *const u32,
    /// An additive mask `[rows, mask_row_stride]`, or null: none.
    pub mask: *const f32,
    /// Values per mask row, at least the longest sequence's length.
    pub mask_row_stride: usize,
    /// Length of `mask` (at least `rows · mask_row_stride`).
    pub mask_len: usize,
}

impl Default for RotqBatch {
    /// An empty, causal batch with the struct's size set, block tables, no mask.
    fn default() -> Self {
        Self {
            struct_size: size_of::<Self>(),
            n_seqs: 0,
            query_start_loc: std::ptr::null(),
            h_q: 0,
            tables: ROTQ_TABLES_BLOCK,
            block_table: std::ptr::null(),
            max_blocks: 0,
            seq_lens: std::ptr::null(),
            indptr: std::ptr::null(),
            indices: std::ptr::null(),
            n_indices: 0,
            last_page_len: std::ptr::null(),
            params: super::causal_params(),
            q_positions: std::ptr::null(),
            mask: std::ptr::null(),
            mask_row_stride: 0,
            mask_len: 0,
        }
    }
}

/// An opaque codec handle: a pool spec and its kernels, no memory of the engine's. Make it
/// with [`rotq_codec_new`] (or [`rotq_checkpoint_codecs`]), free it with [`rotq_codec_free`].
/// Shared freely between threads (see the module docs).
pub struct RotqCodec {
    spec: PoolSpec,
    k_bytes: usize,
    v_bytes: usize,
    /// K's codec, for the shift (which needs no pool).
    k_codec: CacheCodec,
    /// Pools built for earlier calls, each left over the buffers that call lent (never read
    /// again: a call takes one and rebinds it to its own buffers first). One per call that ran
    /// at once; building one costs the codecs and 8 bytes a slot of positions (which the
    /// stateless calls do not use), so it is done once, not per call.
    parked: Mutex<Vec<KvPool<Lent>>>,
}

/// An opaque plan handle: a batch's attention planned by [`rotq_plan_new`] (the kernels' work
/// partition and the buffer sizes, [`rotq_plan_sizes`]); valid for every codec of the same
/// pool layout (formats, heads, dimensions, pages; any rotations) and the same batch shape.
/// Free it with [`rotq_plan_free`]; shared freely between threads.
pub struct RotqPlan {
    plan: AttentionPlan,
    /// The layout it was planned for: the spec, rotations left out.
    layout: PoolSpec,
}

// Both handles may be used from several threads at once: checked when this crate builds.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<RotqCodec>();
    shared::<RotqPlan>();
};

/// Pool memory a C caller lends for one call: an address and a length.
struct Lent {
    ptr: NonNull<u8>,
    len: usize,
    /// Whether the caller lent it for writing (a `const uint8_t*` pool is not).
    writable: bool,
}

// SAFETY: a `Lent` is an address and a length. The memory behind it is dereferenced only while
// the call that lent it runs (by that call's thread and the workers it waits for), which is
// what the caller guarantees it for; a parked pool's stale `Lent` is never dereferenced (every
// use rebinds the pool first, and rebinding reads only the new buffers).
unsafe impl Send for Lent {}

impl Lent {
    /// # Safety
    /// `ptr` is null only when `len` is 0; else it points to `len` bytes, readable (and, when
    /// `writable`, writable, with no other access during the call) until the call returns.
    unsafe fn new(ptr: *const u8, len: usize, writable: bool, what: &str) -> Result<Self, Failure> {
        let ptr = match NonNull::new(ptr.cast_mut()) {
            Some(p) => p,
            None if len == 0 => NonNull::dangling(),
            None => return Err(invalid(format!("{what} is null"))),
        };
        Ok(Self { ptr, len, writable })
    }

    fn span(&self) -> Range<usize> {
        span(self.ptr.as_ptr().cast_const(), self.len)
    }
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` readable bytes for the call now running (`Lent::new`'s
        // contract); a stale `Lent` is never read (see `Send` above).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl AsMut<[u8]> for Lent {
    fn as_mut(&mut self) -> &mut [u8] {
        // Only appends write, and they lend writable pools: anything else is a bug, caught as
        // a panic (RotqStatus::Panic) rather than a write through a `const` pointer.
        assert!(
            self.writable,
            "rotq bug: a pool lent read-only is being written"
        );
        // SAFETY: writable: `ptr` points to `len` bytes the caller lent for writing, with no
        // other access during the call (`Lent::new`'s contract).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// The address range of `len` values at `ptr`.
fn span<T>(ptr: *const T, len: usize) -> Range<usize> {
    let start = ptr as usize;
    start..start.saturating_add(len.saturating_mul(size_of::<T>()))
}

/// Refuses buffers that overlap where one of them is written (a write would change what
/// another reads, and Rust's slices may not alias so).
fn no_overlap(
    written: &[(&str, Range<usize>)],
    read: &[(&str, Range<usize>)],
) -> Result<(), Failure> {
    for (i, (w, wr)) in written.iter().enumerate() {
        let others = written[i + 1..].iter().chain(read);
        for (o, or) in others {
            if !wr.is_empty() && !or.is_empty() && wr.start < or.end && or.start < wr.end {
                return Err(invalid(format!("{w} overlaps {o}")));
            }
        }
    }
    Ok(())
}

/// `len` writable values at `ptr` (an empty slice for `len` 0, whatever the pointer).
///
/// # Safety
/// `ptr` is null only when `len` is 0, and otherwise points to `len` writable, aligned values
/// that nothing else accesses during the call.
unsafe fn slice_mut<'a, T>(ptr: *mut T, len: usize, what: &str) -> Result<&'a mut [T], Failure> {
    if len == 0 {
        return Ok(&mut []);
    }
    if ptr.is_null() {
        return Err(invalid(format!("{what} is null")));
    }
    // SAFETY: non-null, and the caller guarantees `len` writable values, not otherwise in use.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// A struct the engine filled, whose first field is its `size_t struct_size`: refused when
/// null or smaller than this version's struct; read up to this version's fields.
///
/// # Safety
/// `ptr` is null or points to a struct of at least `struct_size` readable bytes that starts
/// with that size.
pub(crate) unsafe fn read_sized<T: Copy + Default>(
    ptr: *const T,
    arg: &str,
    name: &str,
) -> Result<T, Failure> {
    // SAFETY: the caller's guarantees, passed on; the whole struct is ABI 2.0's.
    unsafe { read_sized_from(ptr, ("2.0", size_of::<T>()), arg, name) }
}

/// [`read_sized`] of a struct that later minor versions extended: exactly `v2_0` bytes (its
/// size in `first`, the ABI version that brought it: 2.0, or 2.3 for the device structs) or at
/// least this version's size; the fields past the caller's `struct_size`
/// keep their defaults (the zeroed values that mean "rotq's default"). (Each minor version
/// that appends to it adds its own size here.)
///
/// # Safety
/// As [`read_sized`]; `v2_0` ends on a field boundary of `T`, whose first field is its
/// `size_t struct_size`.
pub(crate) unsafe fn read_sized_from<T: Copy + Default>(
    ptr: *const T,
    (first, v2_0): (&str, usize),
    arg: &str,
    name: &str,
) -> Result<T, Failure> {
    if ptr.is_null() {
        return Err(invalid(format!("{arg} is null")));
    }
    // SAFETY: non-null, and the caller guarantees a struct that starts with its size_t size.
    let size = unsafe { ptr.cast::<usize>().read() };
    if size < v2_0 {
        return Err(invalid(format!(
            "{arg}->struct_size is {size}, smaller than the {v2_0} bytes of a {name} of ABI \
             {first}: set it to sizeof(struct {name})"
        )));
    }
    // A size between two versions' ends would cut a field (a pointer) in two: refused.
    if size != v2_0 && size < size_of::<T>() {
        return Err(invalid(format!(
            "{arg}->struct_size is {size}: neither ABI {first}'s {v2_0} bytes nor at least this \
             version's {}: set it to sizeof(struct {name})",
            size_of::<T>()
        )));
    }
    let mut out = T::default();
    let n = size.min(size_of::<T>());
    // SAFETY: the caller's struct holds `size ≥ n` readable bytes, valid values of the fields
    // they cover (the caller's guarantee); `out` is a `T` of `size_of::<T>() ≥ n` bytes, not
    // overlapping it, whose fields past `n` keep their default values.
    unsafe { std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), (&raw mut out).cast::<u8>(), n) };
    Ok(out)
}

/// A handle behind a pointer, or an error naming it.
///
/// # Safety
/// `ptr` is null or points to a live handle.
unsafe fn handle<'a, T>(ptr: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: null or a live handle (the caller's guarantee).
    unsafe { ptr.as_ref() }.ok_or_else(|| invalid(format!("{what} is null")))
}

/// A C string as UTF-8.
///
/// # Safety
/// `s` is null or a NUL-terminated string.
pub(crate) unsafe fn text<'a>(s: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if s.is_null() {
        return Err(invalid(format!("{what} is null")));
    }
    // SAFETY: non-null, and the caller guarantees a NUL-terminated string.
    unsafe { CStr::from_ptr(s) }
        .to_str()
        .map_err(|_| invalid(format!("{what} is not UTF-8")))
}

/// The formats, heads, dimensions and pages of a spec (no rotation read).
///
/// # Safety
/// `spec` is null or a valid spec with NUL-terminated format names.
unsafe fn layout_of(spec: *const RotqPoolSpec) -> Result<(RotqPoolSpec, PoolSpec), Failure> {
    let v2_0 = std::mem::offset_of!(RotqPoolSpec, query);
    // SAFETY: the caller's guarantees, passed on; `query` is the first field 2.1 appended.
    let s = unsafe { read_sized_from(spec, ("2.0", v2_0), "spec", "RotqPoolSpec")? };
    let query = if s.query.is_null() {
        rotq::QueryMode::Auto
    } else {
        // SAFETY: non-null, and the caller guarantees a NUL-terminated name.
        unsafe { text(s.query, "spec->query")? }
            .parse()
            .map_err(|e| invalid(format!("spec->query: {e}")))?
    };
    // SAFETY: the caller guarantees NUL-terminated names (or null, refused).
    let (k_format, v_format): (KvFormat, KvFormat) = unsafe {
        (
            format_of(s.k_format, "spec->k_format")?,
            format_of(s.v_format, "spec->v_format")?,
        )
    };
    let layout = PoolSpec {
        k_format,
        v_format,
        plan: RotationPlan::none(),
        n_kv_heads: s.n_kv_heads,
        head_dim: s.head_dim,
        v_dim: s.v_dim,
        n_pages: s.n_pages,
        page_tokens: s.page_tokens,
        query,
    };
    Ok((s, layout))
}

/// The rotation plan a [`RotqRotation`] asks for (null: the default), for heads of
/// `head_dim` (K) and `v_dim` (V). With `qk_from_checkpoint`, Q/K is that rotation instead.
///
/// # Safety
/// `rotation` is null or a valid struct whose matrix pointer, for [`ROTQ_QK_MATRIX`], points
/// to `head_dim²` values.
unsafe fn plan_of(
    rotation: *const RotqRotation,
    head_dim: usize,
    v_dim: usize,
    qk_from_checkpoint: Option<Rotation>,
) -> Result<RotationPlan, Failure> {
    let r = if rotation.is_null() {
        RotqRotation::default()
    } else {
        // SAFETY: non-null, a valid struct (the caller's guarantee).
        unsafe { read_sized(rotation, "spec->rotation", "RotqRotation")? }
    };
    let mut default = None;
    let mut default_plan = || -> Result<RotationPlan, Failure> {
        if default.is_none() {
            default = Some(rotq::defaults::plan(head_dim, v_dim).map_err(refused)?);
        }
        Ok(default.clone().unwrap_or_default())
    };
    let qk = match (qk_from_checkpoint, r.qk) {
        (Some(from_checkpoint), _) => Some(from_checkpoint),
        (None, ROTQ_QK_DEFAULT) => default_plan()?.qk,
        (None, ROTQ_QK_NONE) => None,
        (None, ROTQ_QK_HADAMARD) => Some(Rotation::hadamard(head_dim).map_err(refused)?),
        (None, ROTQ_QK_BLOCK_HADAMARD) => {
            Some(Rotation::block_hadamard(head_dim, r.qk_block).map_err(refused)?)
        }
        (None, ROTQ_QK_RANDOMIZED) => {
            Some(Rotation::randomized(head_dim, r.seed).map_err(refused)?)
        }
        (None, ROTQ_QK_MATRIX) => {
            let n = head_dim
                .checked_mul(head_dim)
                .ok_or_else(|| invalid("head_dim² overflows"))?;
            let values: Vec<f64> = match (r.matrix_f64.is_null(), r.matrix_f32.is_null()) {
                // SAFETY: non-null, and the caller guarantees head_dim² values.
                (false, true) => unsafe { slice(r.matrix_f64, n, "matrix_f64")? }.to_vec(),
                // SAFETY: non-null, and the caller guarantees head_dim² values.
                (true, false) => unsafe { slice(r.matrix_f32, n, "matrix_f32")? }
                    .iter()
                    .map(|&x| f64::from(x))
                    .collect(),
                _ => {
                    return Err(invalid(
                        "ROTQ_QK_MATRIX needs exactly one of matrix_f64 and matrix_f32",
                    ))
                }
            };
            let m = ndarray::Array2::from_shape_vec((head_dim, head_dim), values)
                .map_err(|e| invalid(e.to_string()))?;
            Some(Rotation::matrix(m).map_err(refused)?)
        }
        (None, other) => {
            return Err(invalid(format!(
                "rotation->qk {other} is not a ROTQ_QK_* kind (0 to 5)"
            )))
        }
    };
    let v = match r.v {
        ROTQ_V_DEFAULT => default_plan()?.v,
        ROTQ_V_NONE => None,
        ROTQ_V_BLOCK_HADAMARD => Some(Rotation::block_hadamard(v_dim, r.v_block).map_err(refused)?),
        ROTQ_V_HADAMARD => Some(Rotation::hadamard(v_dim).map_err(refused)?),
        other => {
            return Err(invalid(format!(
                "rotation->v {other} is not a ROTQ_V_* kind (0 to 3)"
            )))
        }
    };
    Ok(RotationPlan { qk, v })
}

impl RotqCodec {
    /// The pool's spec (its rotations included).
    #[cfg(feature = "cuda")]
    pub(crate) fn spec(&self) -> &PoolSpec {
        &self.spec
    }

    /// A codec of `spec`, checked as [`KvPool::over`] checks it.
    fn new(spec: PoolSpec) -> Result<Self, Failure> {
        // The checks and codecs of a pool, on a pool of no pages (no memory, no positions).
        KvPool::over(
            PoolSpec {
                n_pages: 0,
                ..spec.clone()
            },
            Vec::new(),
            Vec::new(),
        )
        .map_err(refused)?;
        let (k_bytes, v_bytes) = (
            spec.k_bytes().map_err(refused)?,
            spec.v_bytes().map_err(refused)?,
        );
        let k_codec = CacheCodec::new(
            spec.k_format,
            spec.head_dim,
            spec.plan.qk.as_ref(),
            Isa::best(),
        )
        .map_err(refused)?;
        Ok(Self {
            spec,
            k_bytes,
            v_bytes,
            k_codec,
            parked: Mutex::new(Vec::new()),
        })
    }

    /// The pools' lengths checked against the spec, with messages that name the arguments.
    fn check_lengths(&self, k_len: usize, v_len: usize) -> Result<(), Failure> {
        for (what, len, want) in [
            ("k_len", k_len, self.k_bytes),
            ("v_len", v_len, self.v_bytes),
        ] {
            if len != want {
                return Err(invalid(format!(
                    "{what} is {len}, the pool is {want} bytes (rotq_pool_bytes)"
                )));
            }
        }
        Ok(())
    }

    /// Runs `f` on a pool of this codec over the lent buffers: a parked one rebound, or (when
    /// every parked one is in use) a new one, parked after.
    fn with_pool<R>(
        &self,
        k: Lent,
        v: Lent,
        f: impl FnOnce(&mut KvPool<Lent>) -> Result<R, Failure>,
    ) -> Result<R, Failure> {
        // The list is whole after any panic (a push or a pop), so a poisoned lock is usable.
        let parked = self
            .parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut pool = match parked {
            Some(mut pool) => match pool.rebind(k, v) {
                Ok(_stale) => pool,
                Err(e) => {
                    self.park(pool);
                    return Err(refused(e));
                }
            },
            None => KvPool::over(self.spec.clone(), k, v).map_err(refused)?,
        };
        let result = f(&mut pool);
        self.park(pool);
        result
    }

    fn park(&self, pool: KvPool<Lent>) {
        self.parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(pool);
    }

    /// The spec without its rotations: what a plan depends on.
    fn layout(&self) -> PoolSpec {
        PoolSpec {
            plan: RotationPlan::none(),
            ..self.spec.clone()
        }
    }
}

/// A C batch as rotq's, its arrays borrowed for the call.
///
/// # Safety
/// `batch` is null or a valid struct whose arrays hold the lengths its fields say.
unsafe fn batch_of<'a>(batch: *const RotqBatch) -> Result<Batch<'a>, Failure> {
    // SAFETY: the caller's guarantees, passed on.
    let b = unsafe { read_sized(batch, "batch", "RotqBatch")? };
    let n = b.n_seqs;
    let n1 = n
        .checked_add(1)
        .ok_or_else(|| invalid("batch->n_seqs overflows"))?;
    // SAFETY: the caller guarantees each array holds the length its fields say (a null array
    // is refused unless its length is 0); so for every `slice` below.
    let query_start_loc = unsafe { slice(b.query_start_loc, n1, "batch->query_start_loc")? };
    let tables = match b.tables {
        ROTQ_TABLES_BLOCK => {
            let cells = n
                .checked_mul(b.max_blocks)
                .ok_or_else(|| invalid("batch->n_seqs × max_blocks overflows"))?;
            // SAFETY: see above.
            unsafe {
                PageTables::Block {
                    table: slice(b.block_table, cells, "batch->block_table")?,
                    max_blocks: b.max_blocks,
                    seq_lens: slice(b.seq_lens, n, "batch->seq_lens")?,
                }
            }
        }
        // SAFETY: see above.
        ROTQ_TABLES_CSR => unsafe {
            PageTables::Csr {
                indptr: slice(b.indptr, n1, "batch->indptr")?,
                indices: slice(b.indices, b.n_indices, "batch->indices")?,
                last_page_len: slice(b.last_page_len, n, "batch->last_page_len")?,
            }
        },
        other => {
            return Err(invalid(format!(
                "batch->tables {other} is neither ROTQ_TABLES_BLOCK (1) nor ROTQ_TABLES_CSR (2)"
            )))
        }
    };
    if b.params.pos_offset != 0 {
        return Err(invalid(
            "batch->params.pos_offset is not read in a batch (it must be 0): the query \
             positions are batch->q_positions",
        ));
    }
    let q_positions = match b.q_positions.is_null() {
        true => None,
        // SAFETY: see above.
        false => Some(unsafe { slice(b.q_positions, n, "batch->q_positions")? }),
    };
    let mask = match b.mask.is_null() {
        true => None,
        false => Some(Mask {
            // SAFETY: see above.
            values: unsafe { slice(b.mask, b.mask_len, "batch->mask")? },
            row_stride: b.mask_row_stride,
        }),
    };
    Ok(Batch {
        query_start_loc,
        tables,
        h_q: b.h_q,
        params: params_of(&b.params),
        q_positions,
        mask,
    })
}

/// The address ranges a batch reads (for the overlap check of the buffers a run writes).
fn batch_spans<'a>(b: &Batch<'a>) -> Vec<(&'static str, Range<usize>)> {
    let mut spans = vec![(
        "batch->query_start_loc",
        span(b.query_start_loc.as_ptr(), b.query_start_loc.len()),
    )];
    match b.tables {
        PageTables::Block {
            table, seq_lens, ..
        } => {
            spans.push(("batch->block_table", span(table.as_ptr(), table.len())));
            spans.push(("batch->seq_lens", span(seq_lens.as_ptr(), seq_lens.len())));
        }
        PageTables::Csr {
            indptr,
            indices,
            last_page_len,
        } => {
            spans.push(("batch->indptr", span(indptr.as_ptr(), indptr.len())));
            spans.push(("batch->indices", span(indices.as_ptr(), indices.len())));
            spans.push((
                "batch->last_page_len",
                span(last_page_len.as_ptr(), last_page_len.len()),
            ));
        }
    }
    if let Some(p) = b.q_positions {
        spans.push(("batch->q_positions", span(p.as_ptr(), p.len())));
    }
    if let Some(m) = b.mask {
        spans.push(("batch->mask", span(m.values.as_ptr(), m.values.len())));
    }
    spans
}

/// The ABI version of this library, packed as `major << 16 | minor` (2.1: `0x20001`). A
/// program built against a header of [`ROTQ_ABI_VERSION`] runs with a library of the same
/// major version and a minor version at least the header's.
///
/// Threads: any thread.
#[no_mangle]
pub extern "C" fn rotq_abi_version() -> u32 {
    ROTQ_ABI_VERSION
}

/// The bytes of a K pool and of a V pool of `spec` (its formats, heads, dimensions and pages;
/// the rotation is not read), into `*k_bytes` and `*v_bytes`: the lengths every call takes.
/// An unknown format, a dimension the format cannot hold, or sizes that overflow are errors.
///
/// Threads: any thread.
///
/// # Safety
/// `spec` is a valid spec (its format names NUL-terminated); `k_bytes` and `v_bytes` are valid
/// pointers.
#[no_mangle]
pub unsafe extern "C" fn rotq_pool_bytes(
    spec: *const RotqPoolSpec,
    k_bytes: *mut usize,
    v_bytes: *mut usize,
) -> RotqStatus {
    guard(|| {
        if k_bytes.is_null() || v_bytes.is_null() {
            return Err(invalid("k_bytes and v_bytes must not be null"));
        }
        // SAFETY: the caller's guarantees, passed on.
        let (_, layout) = unsafe { layout_of(spec)? };
        let (k, v) = (
            layout.k_bytes().map_err(refused)?,
            layout.v_bytes().map_err(refused)?,
        );
        // SAFETY: non-null, and the caller guarantees they are writable.
        unsafe { (*k_bytes, *v_bytes) = (k, v) };
        Ok(())
    })
}

/// Makes a codec of `spec` and stores its handle in `*out` (null on failure). The spec is
/// checked whole here (formats, sizes, the rotation against the dimensions, an explicit
/// matrix's orthogonality), so the calls that use the codec fail only on their own inputs. A
/// default rotation reads `ROTQ_DISABLE_ROTATION` now, once. Memory: the codec holds its
/// kernels and, for each call that ran at the same time as others on it, a pool's working
/// state of 8 bytes a slot, built by the first such call and kept for the next ones (none of
/// the engine's pool bytes).
///
/// Threads: any thread, several at once.
///
/// # Safety
/// `spec` is a valid spec (its format names NUL-terminated, its rotation null or valid, an
/// explicit matrix `head_dim²` values); `out` is a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn rotq_codec_new(
    spec: *const RotqPoolSpec,
    out: *mut *mut RotqCodec,
) -> RotqStatus {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is null"));
        }
        // SAFETY: non-null, and the caller guarantees it is writable.
        unsafe { *out = std::ptr::null_mut() };
        // SAFETY: the caller's guarantees, passed on.
        let (s, mut spec) = unsafe { layout_of(spec)? };
        // SAFETY: the caller guarantees a null or valid rotation.
        spec.plan = unsafe { plan_of(s.rotation, s.head_dim, s.v_dim, None)? };
        let codec = RotqCodec::new(spec)?;
        // SAFETY: non-null, and the caller guarantees it is writable.
        unsafe { *out = Box::into_raw(Box::new(codec)) };
        Ok(())
    })
}

/// Frees a codec (null is ignored). Plans made with it stay valid.
///
/// Threads: any thread, once no other call on this codec runs or will start.
///
/// # Safety
/// `codec` is null or a handle from [`rotq_codec_new`] or [`rotq_checkpoint_codecs`] not yet
/// freed, which no other call uses now or later.
#[no_mangle]
pub unsafe extern "C" fn rotq_codec_free(codec: *mut RotqCodec) {
    if !codec.is_null() {
        // SAFETY: a live handle (the caller's guarantee), freed once.
        drop(unsafe { Box::from_raw(codec) });
    }
}

/// One codec per attention layer of a compressed-tensors checkpoint (llm-compressor,
/// SpinQuant's R3): `config_json_path` is the model's `config.json`; where its
/// `quantization_config.transform_config` rotates Q and K (`q_attn` and `k_cache`), layer
/// `i`'s Q/K rotation is that transform (a Hadamard built here; a random Hadamard's or a
/// random matrix's weights read from `weights_path`, a `.safetensors` file or a folder of
/// them, null if there are none); elsewhere (no transform config, or none on attention) it is
/// what `spec->rotation` says. V's rotation is always `spec->rotation`'s (the format has no V
/// location). The other fields of `spec` (formats, sizes) apply to every layer, `head_dim`
/// being the model's. `codecs` receives `n_layers` handles (each freed with
/// [`rotq_codec_free`]); `*from_checkpoint` (if not null) whether the checkpoint set Q/K.
/// Anything the checkpoint asks that rotq cannot do (an unknown transform type, a scheme on
/// `q_attn` only, a missing or non-orthogonal matrix, …) is an error naming the field or
/// tensor at fault, and then no codec is made (`codecs` all null).
///
/// Threads: any thread, several at once.
///
/// # Safety
/// `config_json_path` is a NUL-terminated path; `weights_path` null or one; `spec` as for
/// [`rotq_codec_new`]; `codecs` points to `n_layers` writable handle pointers;
/// `from_checkpoint` is null or a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn rotq_checkpoint_codecs(
    config_json_path: *const c_char,
    weights_path: *const c_char,
    spec: *const RotqPoolSpec,
    n_layers: usize,
    codecs: *mut *mut RotqCodec,
    from_checkpoint: *mut bool,
) -> RotqStatus {
    guard(|| {
        // SAFETY: the caller guarantees `n_layers` writable pointers (null refused).
        let out = unsafe { slice_mut(codecs, n_layers, "codecs")? };
        out.fill(std::ptr::null_mut());
        // SAFETY: the caller's guarantees, passed on.
        let config = unsafe { text(config_json_path, "config_json_path")? };
        let weights = match weights_path.is_null() {
            true => None,
            // SAFETY: non-null, a NUL-terminated string (the caller's guarantee).
            false => Some(Path::new(unsafe { text(weights_path, "weights_path")? })),
        };
        // SAFETY: the caller's guarantees, passed on.
        let (s, layout) = unsafe { layout_of(spec)? };
        let plans = match TransformConfig::from_config_file(Path::new(config)).map_err(refused)? {
            Some(cfg) => cfg.plans(n_layers, s.head_dim, weights).map_err(refused)?,
            None => vec![RotationPlan::none(); n_layers],
        };
        // Whether the checkpoint rotates any layer (the others take the spec's rotation).
        let set = plans.iter().any(|p| p.qk.is_some());
        let mut made = Vec::with_capacity(n_layers);
        for plan in plans {
            // SAFETY: the caller guarantees a null or valid rotation.
            let plan = unsafe { plan_of(s.rotation, s.head_dim, s.v_dim, plan.qk)? };
            made.push(RotqCodec::new(PoolSpec {
                plan,
                ..layout.clone()
            })?);
        }
        for (slot, codec) in out.iter_mut().zip(made) {
            *slot = Box::into_raw(Box::new(codec));
        }
        if !from_checkpoint.is_null() {
            // SAFETY: non-null, and the caller guarantees it is writable.
            unsafe { *from_checkpoint = set };
        }
        Ok(())
    })
}

/// The Q/K rotation that the checkpoint in `model_dir` (its `config.json` and `.safetensors`
/// files) gives attention layer `layer` of `n_layers`, whose heads are `head_dim` values,
/// written into `out` (`out_len` bytes) as a NUL-terminated description: `"none"` where the
/// checkpoint's `transform_config` does not rotate that layer (or there is none), else rotq's
/// name of the rotation (`"hadamard(128)"`, `"block-hadamard(128, block 64)"`,
/// `"matrix(128x128)"`). Layers are selected as compressed-tensors selects modules (`targets`,
/// `ignore`, `re:` patterns; docs/integration.md). What `rotq checkpoint MODEL_DIR` prints, for
/// an engine to log or check; [`rotq_checkpoint_codecs`] makes the codecs. A description
/// longer than `out_len − 1` bytes, a layer past `n_layers` or a checkpoint that rotq cannot
/// follow is an error (naming the field or tensor at fault) and leaves `out` empty.
///
/// Threads: any thread, several at once.
///
/// # Safety
/// `model_dir` is a NUL-terminated path; `out` points to `out_len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn rotq_checkpoint_plan(
    model_dir: *const c_char,
    n_layers: usize,
    head_dim: usize,
    layer: usize,
    out: *mut c_char,
    out_len: usize,
) -> RotqStatus {
    guard(|| {
        // SAFETY: the caller guarantees `out_len` writable bytes (null refused).
        let out = unsafe { slice_mut(out, out_len, "out")? };
        if let Some(first) = out.first_mut() {
            *first = 0;
        }
        // SAFETY: the caller's guarantee, passed on.
        let dir = Path::new(unsafe { text(model_dir, "model_dir")? });
        if layer >= n_layers {
            return Err(invalid(format!("layer {layer} of {n_layers} layers")));
        }
        let config = dir.join("config.json");
        let qk = match TransformConfig::from_config_file(&config).map_err(refused)? {
            Some(cfg) => {
                let mut plans = cfg.plans(n_layers, head_dim, Some(dir)).map_err(refused)?;
                plans.swap_remove(layer).qk
            }
            None => None,
        };
        let text = qk.map_or("none".to_string(), |r| r.to_string());
        if text.len() + 1 > out.len() {
            return Err(invalid(format!(
                "out holds {} bytes; `{text}` needs {}",
                out.len(),
                text.len() + 1
            )));
        }
        for (o, b) in out.iter_mut().zip(text.bytes().chain([0])) {
            *o = b as c_char;
        }
        Ok(())
    })
}

/// Rotates and quantizes the keys `k` (`n_tokens × n_kv_heads × head_dim` floats) and values
/// `v` (`n_tokens × n_kv_heads × v_dim`) of `n_tokens` tokens, of any sequences, into their
/// slots of the engine's pools: token `i` into slot `slot_mapping[i]` (`page · page_tokens +
/// offset`; −1 skips the token, as vLLM pads), as vLLM's `reshape_and_cache_flash`. The pools
/// are `k_len` and `v_len` bytes, exactly [`rotq_pool_bytes`]. A slot outside the pool or named
/// twice, pools of other lengths, or buffers that overlap are errors before any byte is
/// written. Only the named slots' bytes change.
///
/// Threads: any thread, at once with any call on this codec; no other call may use these pool
/// buffers while it runs (it writes them).
///
/// # Safety
/// `codec` is a live handle; `k_pool` and `v_pool` point to `k_len` and `v_len` writable
/// bytes; `k`, `v` and `slot_mapping` to the lengths above.
#[no_mangle]
pub unsafe extern "C" fn rotq_pool_append(
    codec: *const RotqCodec,
    k_pool: *mut u8,
    k_len: usize,
    v_pool: *mut u8,
    v_len: usize,
    k: *const f32,
    v: *const f32,
    n_tokens: usize,
    slot_mapping: *const i64,
) -> RotqStatus {
    guard(|| {
        // SAFETY: null or a live handle (the caller's guarantee).
        let c = unsafe { handle(codec, "codec")? };
        c.check_lengths(k_len, v_len)?;
        let s = &c.spec;
        let floats = |dim: usize| {
            n_tokens
                .checked_mul(s.n_kv_heads)
                .and_then(|x| x.checked_mul(dim))
                .ok_or_else(|| invalid("n_tokens overflows"))
        };
        let (kn, vn) = (floats(s.head_dim)?, floats(s.v_dim)?);
        // SAFETY: the caller guarantees these lengths (null refused unless empty).
        let (keys, values, slots) = unsafe {
            (
                slice(k, kn, "k")?,
                slice(v, vn, "v")?,
                slice(slot_mapping, n_tokens, "slot_mapping")?,
            )
        };
        // SAFETY: the caller guarantees writable pools of these lengths (null refused).
        let (kp, vp) = unsafe {
            (
                Lent::new(k_pool, k_len, true, "k_pool")?,
                Lent::new(v_pool, v_len, true, "v_pool")?,
            )
        };
        no_overlap(
            &[("k_pool", kp.span()), ("v_pool", vp.span())],
            &[
                ("k", span(keys.as_ptr(), keys.len())),
                ("v", span(values.as_ptr(), values.len())),
                ("slot_mapping", span(slots.as_ptr(), slots.len())),
            ],
        )?;
        // Positions are the engine's (module docs): the pool records zeros, never read.
        let positions = vec![0u64; n_tokens];
        c.with_pool(kp, vp, |pool| {
            pool.append(keys, values, slots, &positions)
                .map_err(refused)
        })
    })
}

/// The context shift of the keys in `slots` (`n_slots` of them; −1 skips): each K row of
/// those slots is turned by the RoPE angle of `delta` positions (`rope`; `dims` 0 is the whole
/// `head_dim`) inside its rotation and quantized again, as llama.cpp's `seq_add` does to its
/// cells. V is not touched, so only the K pool is taken. The positions are the engine's: it
/// adds `delta` to its own (and refuses a shift below 0 itself). A slot outside the pool or
/// named twice, a RoPE that does not fit the heads, or a pool of another length is an error
/// before any row changes.
///
/// Threads: as [`rotq_pool_append`] (it writes the K pool).
///
/// # Safety
/// `codec` is a live handle; `k_pool` points to `k_len` writable bytes; `slots` to `n_slots`
/// values; `rope` is a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn rotq_pool_shift(
    codec: *const RotqCodec,
    k_pool: *mut u8,
    k_len: usize,
    slots: *const i64,
    n_slots: usize,
    delta: i64,
    rope: *const RotqRope,
) -> RotqStatus {
    guard(|| {
        // SAFETY: null or a live handle / a valid rope (the caller's guarantee).
        let (c, r) = unsafe { (handle(codec, "codec")?, handle(rope, "rope")?) };
        c.check_lengths(k_len, c.v_bytes)?;
        let rope = rope_of(r, c.spec.head_dim)?;
        rope.check(c.spec.head_dim).map_err(refused)?;
        // SAFETY: the caller guarantees `n_slots` values (null refused unless empty).
        let slots = unsafe { slice(slots, n_slots, "slots")? };
        // SAFETY: the caller guarantees `k_len` writable bytes (null refused unless empty).
        let mut kp = unsafe { Lent::new(k_pool, k_len, true, "k_pool")? };
        no_overlap(
            &[("k_pool", kp.span())],
            &[("slots", span(slots.as_ptr(), slots.len()))],
        )?;
        let n = c.spec.slots().map_err(refused)?;
        let mut sorted = Vec::with_capacity(slots.len());
        for (i, &s) in slots.iter().enumerate() {
            if s < -1 || s >= n as i64 {
                return Err(refused(format!(
                    "slots[{i}] = {s} is outside the pool's {n} slots (-1 skips an entry)"
                )));
            }
            if s >= 0 {
                sorted.push(s);
            }
        }
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(refused(format!("slot {} is named twice", w[0])));
        }
        let token_bytes = c.spec.n_kv_heads * c.k_codec.row_bytes();
        let bytes = kp.as_mut();
        // Runs of consecutive slots, one codec call each (it spreads a run over the threads).
        let mut i = 0;
        while i < sorted.len() {
            let mut j = i + 1;
            while j < sorted.len() && sorted[j] == sorted[j - 1] + 1 {
                j += 1;
            }
            let first = sorted[i] as usize;
            let run = &mut bytes[first * token_bytes..(first + j - i) * token_bytes];
            c.k_codec.shift(run, &rope, delta).map_err(refused)?;
            i = j;
        }
        Ok(())
    })
}

/// Checks a step's batch against a codec's pool (pages inside it, none twice in a sequence,
/// lengths within the tables; the rows, the mask's shape, the parameters, `h_q` against the
/// heads) and plans its attention; stores the plan's handle in `*plan` (null on failure). The
/// pools are any one layer's (read, not written: the kernels' views are checked against their
/// lengths; no byte is read). The plan serves every layer's run of this step, on any codec of
/// the same layout. Everything wrong with the batch is an error here, before any run.
///
/// Threads: any thread, at once with any call on this codec and with other reads of the pools.
///
/// # Safety
/// `codec` is a live handle; `batch` a valid batch whose arrays hold the lengths its fields
/// say; `k_pool` and `v_pool` point to `k_len` and `v_len` readable bytes; `plan` is a valid
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn rotq_plan_new(
    codec: *const RotqCodec,
    batch: *const RotqBatch,
    k_pool: *const u8,
    k_len: usize,
    v_pool: *const u8,
    v_len: usize,
    plan: *mut *mut RotqPlan,
) -> RotqStatus {
    guard(|| {
        if plan.is_null() {
            return Err(invalid("plan is null"));
        }
        // SAFETY: non-null, and the caller guarantees it is writable.
        unsafe { *plan = std::ptr::null_mut() };
        // SAFETY: null or a live handle (the caller's guarantee).
        let c = unsafe { handle(codec, "codec")? };
        // SAFETY: the caller guarantees a valid batch.
        let b = unsafe { batch_of(batch)? };
        c.check_lengths(k_len, v_len)?;
        // SAFETY: the caller guarantees readable pools of these lengths (null refused).
        let (kp, vp) = unsafe {
            (
                Lent::new(k_pool, k_len, false, "k_pool")?,
                Lent::new(v_pool, v_len, false, "v_pool")?,
            )
        };
        let planned = c.with_pool(kp, vp, |pool| pool.plan(&b).map_err(refused))?;
        let handle = RotqPlan {
            plan: planned,
            layout: c.layout(),
        };
        // SAFETY: non-null, and the caller guarantees it is writable.
        unsafe { *plan = Box::into_raw(Box::new(handle)) };
        Ok(())
    })
}

/// The lengths, in floats, of the buffers [`rotq_attention_run`] takes for this plan: the
/// workspace (at least this many), the output (`rows × h_q × v_dim`, exactly) and the
/// log-sum-exp (`rows × h_q`, exactly, if asked). Each out pointer may be null (not wanted).
///
/// Threads: any thread, at once with any call on this plan.
///
/// # Safety
/// `plan` is a live handle; each out pointer is null or valid.
#[no_mangle]
pub unsafe extern "C" fn rotq_plan_sizes(
    plan: *const RotqPlan,
    workspace_floats: *mut usize,
    out_floats: *mut usize,
    lse_floats: *mut usize,
) -> RotqStatus {
    guard(|| {
        // SAFETY: null or a live handle (the caller's guarantee).
        let p = unsafe { handle(plan, "plan")? };
        for (ptr, value) in [
            (workspace_floats, p.plan.workspace_len()),
            (out_floats, p.plan.out_len()),
            (lse_floats, p.plan.lse_len()),
        ] {
            if !ptr.is_null() {
                // SAFETY: non-null, and the caller guarantees it is writable.
                unsafe { *ptr = value };
            }
        }
        Ok(())
    })
}

/// Frees a plan (null is ignored).
///
/// Threads: any thread, once no other call on this plan runs or will start.
///
/// # Safety
/// `plan` is null or a handle from [`rotq_plan_new`] not yet freed, which no other call uses
/// now or later.
#[no_mangle]
pub unsafe extern "C" fn rotq_plan_free(plan: *mut RotqPlan) {
    if !plan.is_null() {
        // SAFETY: a live handle (the caller's guarantee), freed once.
        drop(unsafe { Box::from_raw(plan) });
    }
}

/// Runs a planned batch's attention on one layer's pools: `q` holds `rows × h_q × head_dim`
/// floats (unrotated; `rows` the batch's last `query_start_loc`, as planned); `out` receives
/// `rows × h_q × v_dim` (V's rotation undone) and `lse`, if not null, the natural log-sum-exp
/// of each row's scores, `rows × h_q` (−∞ for a row that sees no key). `workspace` holds at
/// least [`rotq_plan_sizes`]'s floats (its contents are scratch). The batch must have the
/// shapes it was planned with, and the codec the plan's layout. Lengths that do not match,
/// buffers that overlap where one is written, or another batch are errors before `out` and
/// `lse` are written.
///
/// Threads: any thread; several at once on one codec, one plan and the same pools (which it
/// only reads), each with its own `workspace`, `out` and `lse`.
///
/// # Safety
/// `codec` and `plan` are live handles; `batch` a valid batch whose arrays hold the lengths
/// its fields say; `k_pool` and `v_pool` point to `k_len` and `v_len` readable bytes; `q` to
/// the floats above; `workspace`, `out` and `lse` (null or) to `workspace_len`, `out_len` and
/// `lse_len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn rotq_attention_run(
    codec: *const RotqCodec,
    plan: *const RotqPlan,
    batch: *const RotqBatch,
    k_pool: *const u8,
    k_len: usize,
    v_pool: *const u8,
    v_len: usize,
    q: *const f32,
    workspace: *mut f32,
    workspace_len: usize,
    out: *mut f32,
    out_len: usize,
    lse: *mut f32,
    lse_len: usize,
) -> RotqStatus {
    guard(|| {
        // SAFETY: null or live handles (the caller's guarantee).
        let (c, p) = unsafe { (handle(codec, "codec")?, handle(plan, "plan")?) };
        if p.layout != c.layout() {
            return Err(refused(
                "the plan was made for a codec of another layout (formats, heads, dimensions \
                 or pages)",
            ));
        }
        // SAFETY: the caller guarantees a valid batch.
        let b = unsafe { batch_of(batch)? };
        c.check_lengths(k_len, v_len)?;
        // The queries' length from the plan (`rows × h_q` as checked when planned), not from
        // the batch, which the run checks against the plan only after the slice is made.
        let q_len = p
            .plan
            .lse_len()
            .checked_mul(c.spec.head_dim)
            .ok_or_else(|| invalid("rows × h_q × head_dim overflows"))?;
        if lse.is_null() && lse_len != 0 {
            return Err(invalid("lse is null but lse_len is not 0"));
        }
        // SAFETY: the caller guarantees these lengths (null refused unless empty).
        let (qs, ws, o) = unsafe {
            (
                slice(q, q_len, "q")?,
                slice_mut(workspace, workspace_len, "workspace")?,
                slice_mut(out, out_len, "out")?,
            )
        };
        let l = match lse.is_null() {
            true => None,
            // SAFETY: non-null, `lse_len` writable floats (the caller's guarantee).
            false => Some(unsafe { slice_mut(lse, lse_len, "lse")? }),
        };
        // SAFETY: the caller guarantees readable pools of these lengths (null refused).
        let (kp, vp) = unsafe {
            (
                Lent::new(k_pool, k_len, false, "k_pool")?,
                Lent::new(v_pool, v_len, false, "v_pool")?,
            )
        };
        let mut read = batch_spans(&b);
        read.extend([
            ("k_pool", kp.span()),
            ("v_pool", vp.span()),
            ("q", span(qs.as_ptr(), qs.len())),
        ]);
        let mut written = vec![
            ("workspace", span(ws.as_ptr(), ws.len())),
            ("out", span(o.as_ptr(), o.len())),
        ];
        if let Some(l) = &l {
            written.push(("lse", span(l.as_ptr(), l.len())));
        }
        no_overlap(&written, &read)?;
        c.with_pool(kp, vp, |pool| {
            pool.run(&p.plan, &b, qs, ws, o, l).map_err(refused)
        })
    })
}
