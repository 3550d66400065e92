//! The C ABI that `rotq-peers` loads from each peer's shared library: ggml graphs built once
//! (flash attention over a llama.cpp-layout KV cache, a rotation of f32 rows optionally
//! followed by a quantizing copy) and run many times, plus ggml's row quantizers.
//!
//! This file is compiled twice, once into each shim crate, with `sys` the crate's bindings
//! (llama-cpp-sys-2 or ik-llama-cpp-sys) and `compat` its few version-specific calls. Every
//! input is checked here before ggml sees it: a ggml assertion would abort the process.
//!
//! The ABI (kept in step with `rotq-peers`' `ffi` module; [`rqp_abi_version`] guards it):
//! * `rqp_info(buf, len)`: the peer's name and the CPU features its ggml was built with;
//! * `rqp_fa_new(desc, err, err_len)` / `rqp_fa_run(h, q, q_len, out, out_len)` /
//!   `rqp_fa_free(h)`: flash attention ([`RqpFaDesc`]);
//! * `rqp_rot_new(desc, err, err_len)` / `rqp_rot_run(h)` / `rqp_rot_free(h)`: rotation
//!   ([`RqpRotDesc`]);
//! * `rqp_quantize(ty, path, x, n, out, out_len)`: one row of ggml's quantization.

use crate::{compat, sys};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ffi::c_char;
use std::ptr;

/// Version of this ABI; `rotq-peers` refuses a library with another.
pub const ABI_VERSION: u32 = 1;

/// Element types of the ABI (not ggml's numbers, which differ between versions).
const TY_F32: i32 = 0;
const TY_F16: i32 = 1;
const TY_Q4_0: i32 = 2;
const TY_Q8_0: i32 = 3;

/// Rotation kinds of [`RqpRotDesc::kind`].
const ROT_DENSE: i32 = 0;
const ROT_DENSE_HINTED: i32 = 1;
const ROT_HADAMARD_OP: i32 = 2;

/// A flash-attention problem: `n_seq` sequences, each with `n_q` query rows of `h_q` heads and
/// a K and V cache of `n_kv` tokens × `h_kv` heads × `d` values, laid out as llama.cpp lays
/// its cache: sequence `s`, token `t`, head `h` at row `(s · n_kv + t) · h_kv + h`.
#[repr(C)]
pub struct RqpFaDesc {
    /// K element type (ABI code).
    pub k_type: i32,
    /// V element type (ABI code).
    pub v_type: i32,
    /// Sequences (each its own cache and its own ggml_flash_attn_ext node).
    pub n_seq: i64,
    /// Cached tokens per sequence.
    pub n_kv: i64,
    /// KV heads.
    pub h_kv: i64,
    /// Head dimension.
    pub d: i64,
    /// Query heads (a multiple of `h_kv`).
    pub h_q: i64,
    /// Query rows per sequence.
    pub n_q: i64,
    /// 0: no mask; 1: all keys visible (a zero mask); 2: causal, query `i` at position
    /// `pos_offset + i`.
    pub mask: i32,
    /// Position of query row 0 for the causal mask.
    pub pos_offset: i64,
    /// Score scale.
    pub scale: f32,
    /// Threads for the graph.
    pub n_threads: i32,
    /// The K cache (`n_seq · n_kv · h_kv` rows), read in place; outlives the handle.
    pub k: *const u8,
    /// Its length in bytes.
    pub k_len: usize,
    /// The V cache, as K.
    pub v: *const u8,
    /// Its length in bytes.
    pub v_len: usize,
}

/// A rotation of `rows` f32 rows of `n` values (`x`, read in place), written to `out` as
/// `out_type` rows (f32: the rotated rows; q4_0/q8_0: a quantizing `ggml_cpy` of them, as
/// llama.cpp writes its cache).
#[repr(C)]
pub struct RqpRotDesc {
    /// 0: `ggml_mul_mat` by the dense `n × n` Hadamard matrix; 1: the same with llama.cpp's
    /// `GGML_HINT_SRC0_IS_HADAMARD`; 2: ik_llama.cpp's `ggml_hadamard`.
    pub kind: i32,
    /// Row length (a power of two).
    pub n: i64,
    /// Rows.
    pub rows: i64,
    /// Output element type (ABI code: f32, q4_0 or q8_0).
    pub out_type: i32,
    /// Threads for the graph.
    pub n_threads: i32,
    /// The input rows; outlive the handle.
    pub x: *const f32,
    /// Their count of values.
    pub x_len: usize,
    /// The output; outlives the handle and is written by every run.
    pub out: *mut u8,
    /// Its length in bytes.
    pub out_len: usize,
}

fn ggml_type_of(code: i32) -> Option<sys::ggml_type> {
    Some(match code {
        TY_F32 => sys::GGML_TYPE_F32,
        TY_F16 => sys::GGML_TYPE_F16,
        TY_Q4_0 => sys::GGML_TYPE_Q4_0,
        TY_Q8_0 => sys::GGML_TYPE_Q8_0,
        _ => return None,
    })
}

/// Bytes of `n` values of `code` (`n` a multiple of 32 for the block formats).
fn row_bytes(code: i32, n: i64) -> Option<usize> {
    let n = usize::try_from(n).ok()?;
    match code {
        TY_F32 => n.checked_mul(4),
        TY_F16 => n.checked_mul(2),
        TY_Q4_0 if n % 32 == 0 => Some(n / 32 * 18),
        TY_Q8_0 if n % 32 == 0 => Some(n / 32 * 34),
        _ => None,
    }
}

/// A zeroed, 64-byte aligned allocation.
struct Buf {
    ptr: *mut u8,
    layout: Layout,
}

impl Buf {
    fn new(len: usize) -> Result<Self, String> {
        let layout = Layout::from_size_align(len.max(64), 64).map_err(|e| e.to_string())?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(format!("out of memory ({len} bytes)"));
        }
        Ok(Self { ptr, layout })
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// A ggml context of tensor metadata only (`no_alloc`): every tensor's data is set by hand.
struct Ctx(*mut sys::ggml_context);

impl Ctx {
    fn new(n_tensors: usize, graph_size: usize) -> Result<Self, String> {
        // SAFETY: plain size queries.
        let mem_size = unsafe {
            n_tensors * sys::ggml_tensor_overhead()
                + sys::ggml_graph_overhead_custom(graph_size, false)
                + (1 << 16)
        };
        let params = sys::ggml_init_params {
            mem_size,
            mem_buffer: ptr::null_mut(),
            no_alloc: true,
        };
        // SAFETY: valid parameters; ggml allocates the metadata buffer itself.
        let ctx = unsafe { sys::ggml_init(params) };
        if ctx.is_null() {
            return Err("ggml_init failed".into());
        }
        Ok(Self(ctx))
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: made by ggml_init, freed once.
        unsafe { sys::ggml_free(self.0) }
    }
}

/// A graph and its plan, with the work buffer and thread pool that compute it.
struct Compute {
    graph: *mut sys::ggml_cgraph,
    cplan: sys::ggml_cplan,
    _work: Buf,
    _pool: compat::Pool,
}

impl Compute {
    /// Plans `graph` for `n_threads`.
    ///
    /// # Safety
    /// `graph` is a graph of a live context whose tensors all have data.
    unsafe fn new(graph: *mut sys::ggml_cgraph, n_threads: i32) -> Result<Self, String> {
        let pool = compat::Pool::new(n_threads)?;
        // SAFETY: per this function's contract.
        let mut cplan = unsafe { compat::plan(graph, n_threads, &pool) };
        let work = Buf::new(cplan.work_size)?;
        cplan.work_data = work.ptr;
        Ok(Self {
            graph,
            cplan,
            _work: work,
            _pool: pool,
        })
    }

    /// # Safety
    /// Every buffer the graph's tensors point to is alive and not otherwise borrowed.
    unsafe fn run(&mut self) -> i32 {
        // SAFETY: per this function's contract; the plan's work buffer is ours.
        let status = unsafe { sys::ggml_graph_compute(self.graph, &mut self.cplan) };
        status as i32
    }
}

fn write_err(err: *mut c_char, err_len: usize, msg: &str) {
    if err.is_null() || err_len == 0 {
        return;
    }
    let n = msg.len().min(err_len - 1);
    // SAFETY: the caller gave `err_len` writable bytes at `err`; n + 1 <= err_len.
    unsafe {
        ptr::copy_nonoverlapping(msg.as_ptr(), err.cast::<u8>(), n);
        *err.add(n) = 0;
    }
}

/// This ABI's version.
#[no_mangle]
pub extern "C" fn rqp_abi_version() -> u32 {
    ABI_VERSION
}

/// Writes `name; cpu features` (nul-terminated, truncated to `len`) to `buf`.
///
/// # Safety
/// `buf` holds `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn rqp_info(buf: *mut c_char, len: usize) {
    compat::init();
    // SAFETY: feature queries without arguments.
    let (avx2, avx512, f16c, fma) = unsafe {
        (
            sys::ggml_cpu_has_avx2(),
            sys::ggml_cpu_has_avx512(),
            sys::ggml_cpu_has_f16c(),
            sys::ggml_cpu_has_fma(),
        )
    };
    let info = format!(
        "{}; ggml built with avx2={avx2} avx512={avx512} f16c={f16c} fma={fma}",
        compat::NAME
    );
    write_err(buf, len, &info);
}

/// Flash-attention state: the graph over the caller's caches, and buffers for Q, the mask and
/// the output.
pub struct Fa {
    _ctx: Ctx,
    compute: Compute,
    q: Buf,
    out: Buf,
    _mask: Buf,
    q_len: usize,
    out_len: usize,
}

fn fa_new(d: &RqpFaDesc) -> Result<Box<Fa>, String> {
    let pos = |x: i64, what: &str| -> Result<usize, String> {
        usize::try_from(x)
            .ok()
            .filter(|&x| x > 0)
            .ok_or(format!("{what} must be positive, got {x}"))
    };
    let (n_seq, n_kv, h_kv) = (
        pos(d.n_seq, "n_seq")?,
        pos(d.n_kv, "n_kv")?,
        pos(d.h_kv, "h_kv")?,
    );
    let (dim, h_q, n_q) = (pos(d.d, "d")?, pos(d.h_q, "h_q")?, pos(d.n_q, "n_q")?);
    if h_q % h_kv != 0 {
        return Err(format!("h_q {h_q} is not a multiple of h_kv {h_kv}"));
    }
    if d.n_threads < 1 {
        return Err(format!("n_threads must be positive, got {}", d.n_threads));
    }
    if !(d.scale.is_finite()) {
        return Err("scale must be finite".into());
    }
    let kt = ggml_type_of(d.k_type)
        .filter(|_| d.k_type != TY_F32)
        .ok_or("K type must be f16, q4_0 or q8_0")?;
    let vt = ggml_type_of(d.v_type)
        .filter(|_| d.v_type != TY_F32)
        .ok_or("V type must be f16, q4_0 or q8_0")?;
    let k_row = row_bytes(d.k_type, d.d).ok_or("d must be a multiple of 32")?;
    let v_row = row_bytes(d.v_type, d.d).ok_or("d must be a multiple of 32")?;
    let rows = n_seq
        .checked_mul(n_kv)
        .and_then(|r| r.checked_mul(h_kv))
        .ok_or("cache size overflows")?;
    for (what, row, len, p) in [("K", k_row, d.k_len, d.k), ("V", v_row, d.v_len, d.v)] {
        let want = rows.checked_mul(row).ok_or("cache size overflows")?;
        if len != want {
            return Err(format!("{what} cache is {len} bytes, expected {want}"));
        }
        if p.is_null() {
            return Err(format!("{what} cache pointer is null"));
        }
    }
    if !matches!(d.mask, 0..=2) {
        return Err(format!("mask kind {} is not 0, 1 or 2", d.mask));
    }
    if d.pos_offset < 0 {
        return Err("pos_offset must not be negative".into());
    }
    compat::init();

    let q_len = n_seq * n_q * h_q * dim;
    let out_len = q_len;
    let mask_rows = n_q.div_ceil(16) * 16; // GGML_KQ_MASK_PAD of ik_llama.cpp (16)
    let q = Buf::new(q_len * 4)?;
    let out = Buf::new(out_len * 4)?;
    let mask = Buf::new(n_kv * mask_rows * 2)?;
    {
        // SAFETY: `mask` holds n_kv · mask_rows halves, 64-byte aligned.
        let m = unsafe { std::slice::from_raw_parts_mut(mask.ptr.cast::<u16>(), n_kv * mask_rows) };
        for (i, row) in m.chunks_exact_mut(n_kv).enumerate() {
            for (t, x) in row.iter_mut().enumerate() {
                let visible = d.mask != 2 || (t as i64) <= d.pos_offset + i as i64;
                *x = if visible { 0x0000 } else { 0xFC00 }; // f16 0 and -inf
            }
        }
    }
    let ctx = Ctx::new(8 + 8 * n_seq, 16 + 8 * n_seq)?;
    let c = ctx.0;
    // SAFETY: every tensor is made in `ctx` (no_alloc) and given data before any view of it is
    // made; the caches outlive the handle (the caller's contract); the shapes and strides were
    // checked above, so ggml's asserts hold.
    let compute = unsafe {
        let ne0_k = (dim * h_kv) as i64;
        let kc = sys::ggml_new_tensor_2d(c, kt, ne0_k, (n_seq * n_kv) as i64);
        (*kc).data = d.k as *mut _;
        let vc = sys::ggml_new_tensor_2d(c, vt, ne0_k, (n_seq * n_kv) as i64);
        (*vc).data = d.v as *mut _;
        let qt = sys::ggml_new_tensor_4d(
            c,
            sys::GGML_TYPE_F32,
            dim as i64,
            h_q as i64,
            n_q as i64,
            n_seq as i64,
        );
        (*qt).data = q.ptr.cast();
        let mt = if d.mask == 0 {
            ptr::null_mut()
        } else {
            let mt = sys::ggml_new_tensor_2d(c, sys::GGML_TYPE_F16, n_kv as i64, mask_rows as i64);
            (*mt).data = mask.ptr.cast();
            mt
        };
        let graph = sys::ggml_new_graph_custom(c, 16 + 8 * n_seq, false);
        for s in 0..n_seq {
            // llama.cpp's view of one layer's cache: [d, h_kv, n_kv], permuted to [d, n_kv, h_kv].
            let view = |cache: *mut sys::ggml_tensor, ty: sys::ggml_type| {
                let nb1 = sys::ggml_row_size(ty, dim as i64);
                let nb2 = sys::ggml_row_size(ty, (dim * h_kv) as i64);
                let v = sys::ggml_view_3d(
                    c,
                    cache,
                    dim as i64,
                    h_kv as i64,
                    n_kv as i64,
                    nb1,
                    nb2,
                    s * n_kv * nb2,
                );
                sys::ggml_permute(c, v, 0, 2, 1, 3)
            };
            let k = view(kc, kt);
            let v = view(vc, vt);
            // Q of this sequence: [d, h_q, n_q] permuted to [d, n_q, h_q].
            let qs = sys::ggml_view_3d(
                c,
                qt,
                dim as i64,
                h_q as i64,
                n_q as i64,
                (*qt).nb[1],
                (*qt).nb[2],
                s * (*qt).nb[3],
            );
            let qp = sys::ggml_permute(c, qs, 0, 2, 1, 3);
            let o = sys::ggml_flash_attn_ext(c, qp, k, v, mt, d.scale, 0.0, 0.0);
            // The result is [d, h_q, n_q]: this sequence's part of the output buffer.
            (*o).data = out.ptr.add(s * n_q * h_q * dim * 4).cast();
            sys::ggml_build_forward_expand(graph, o);
        }
        Compute::new(graph, d.n_threads)?
    };
    Ok(Box::new(Fa {
        _ctx: ctx,
        compute,
        q,
        out,
        _mask: mask,
        q_len,
        out_len,
    }))
}

/// Builds flash attention over the caches of `desc` (read in place); null with a message in
/// `err` on bad input.
///
/// # Safety
/// `desc` is valid; its caches stay alive and unchanged until [`rqp_fa_free`]; `err` holds
/// `err_len` writable bytes (or is null).
#[no_mangle]
pub unsafe extern "C" fn rqp_fa_new(
    desc: *const RqpFaDesc,
    err: *mut c_char,
    err_len: usize,
) -> *mut Fa {
    // SAFETY: per this function's contract.
    let Some(d) = (unsafe { desc.as_ref() }) else {
        write_err(err, err_len, "null descriptor");
        return ptr::null_mut();
    };
    match fa_new(d) {
        Ok(h) => Box::into_raw(h),
        Err(e) => {
            write_err(err, err_len, &e);
            ptr::null_mut()
        }
    }
}

/// Runs attention for queries `q` (`[n_seq, n_q, h_q, d]` f32) into `out` (same shape).
/// Returns 0, or -1 for wrong lengths, or ggml's status.
///
/// # Safety
/// `h` came from [`rqp_fa_new`] and is not used by another thread; `q` and `out` hold `q_len`
/// and `out_len` values.
#[no_mangle]
pub unsafe extern "C" fn rqp_fa_run(
    h: *mut Fa,
    q: *const f32,
    q_len: usize,
    out: *mut f32,
    out_len: usize,
) -> i32 {
    // SAFETY: per this function's contract.
    let Some(h) = (unsafe { h.as_mut() }) else {
        return -1;
    };
    if q_len != h.q_len || out_len != h.out_len || q.is_null() || out.is_null() {
        return -1;
    }
    // SAFETY: lengths checked; our buffers hold q_len and out_len f32s.
    unsafe {
        ptr::copy_nonoverlapping(q, h.q.ptr.cast::<f32>(), q_len);
        let status = h.compute.run();
        ptr::copy_nonoverlapping(h.out.ptr.cast::<f32>(), out, out_len);
        status
    }
}

/// Frees a handle of [`rqp_fa_new`] (null is a no-op).
///
/// # Safety
/// `h` came from [`rqp_fa_new`] and is freed once.
#[no_mangle]
pub unsafe extern "C" fn rqp_fa_free(h: *mut Fa) {
    if !h.is_null() {
        // SAFETY: per this function's contract.
        drop(unsafe { Box::from_raw(h) });
    }
}

/// Rotation state: the graph over the caller's rows and output, the Hadamard matrix and the
/// f32 intermediate where there is one.
pub struct Rot {
    _ctx: Ctx,
    compute: Compute,
    _bufs: Vec<Buf>,
}

fn rot_new(d: &RqpRotDesc) -> Result<Box<Rot>, String> {
    let n = usize::try_from(d.n)
        .ok()
        .filter(|n| n.is_power_of_two() && *n >= 2)
        .ok_or(format!("n must be a power of two >= 2, got {}", d.n))?;
    let rows = usize::try_from(d.rows)
        .ok()
        .filter(|&r| r > 0)
        .ok_or(format!("rows must be positive, got {}", d.rows))?;
    if d.n_threads < 1 {
        return Err(format!("n_threads must be positive, got {}", d.n_threads));
    }
    let len = n.checked_mul(rows).ok_or("size overflows")?;
    if d.x_len != len || d.x.is_null() {
        return Err(format!("input holds {} values, expected {len}", d.x_len));
    }
    let ot = ggml_type_of(d.out_type)
        .filter(|_| d.out_type != TY_F16)
        .ok_or("output type must be f32, q4_0 or q8_0")?;
    let row = row_bytes(d.out_type, d.n).ok_or("n must be a multiple of 32 for a block format")?;
    let want = rows.checked_mul(row).ok_or("size overflows")?;
    if d.out_len != want || d.out.is_null() {
        return Err(format!("output is {} bytes, expected {want}", d.out_len));
    }
    match d.kind {
        ROT_DENSE => {}
        ROT_DENSE_HINTED if compat::HAS_HADAMARD_HINT => {}
        ROT_HADAMARD_OP if compat::HAS_HADAMARD_OP => {}
        k => {
            return Err(format!(
                "rotation kind {k} is not available in {}",
                compat::NAME
            ))
        }
    }
    compat::init();
    let mut bufs = Vec::new();
    let ctx = Ctx::new(16, 16)?;
    let c = ctx.0;
    // SAFETY: every tensor is made in `ctx` (no_alloc) and given data (the caller's rows and
    // output, which outlive the handle, or buffers kept in `bufs`) before any view of it; the
    // shapes were checked above.
    let compute = unsafe {
        let x = sys::ggml_new_tensor_2d(c, sys::GGML_TYPE_F32, n as i64, rows as i64);
        (*x).data = d.x as *mut _;
        let y = if d.kind == ROT_HADAMARD_OP {
            compat::hadamard(c, x, n as i32)
        } else {
            // llama.cpp's rotation: ggml_mul_mat(H, x), y_j = H x_j (H is symmetric).
            let hb = Buf::new(n * n * 4)?;
            let hv = std::slice::from_raw_parts_mut(hb.ptr.cast::<f32>(), n * n);
            let s = 1.0 / (n as f32).sqrt();
            for i in 0..n {
                for j in 0..n {
                    hv[i * n + j] = if (i & j).count_ones() % 2 == 0 { s } else { -s };
                }
            }
            let h = sys::ggml_new_tensor_2d(c, sys::GGML_TYPE_F32, n as i64, n as i64);
            (*h).data = hb.ptr.cast();
            bufs.push(hb);
            let y = sys::ggml_mul_mat(c, h, x);
            if d.kind == ROT_DENSE_HINTED {
                compat::set_hadamard_hint(y);
            }
            y
        };
        let last = if d.out_type == TY_F32 {
            (*y).data = d.out.cast();
            y
        } else {
            let tmp = Buf::new(len * 4)?;
            (*y).data = tmp.ptr.cast();
            bufs.push(tmp);
            let dst = sys::ggml_new_tensor_2d(c, ot, n as i64, rows as i64);
            (*dst).data = d.out.cast();
            sys::ggml_cpy(c, y, dst)
        };
        let graph = sys::ggml_new_graph_custom(c, 16, false);
        sys::ggml_build_forward_expand(graph, last);
        Compute::new(graph, d.n_threads)?
    };
    Ok(Box::new(Rot {
        _ctx: ctx,
        compute,
        _bufs: bufs,
    }))
}

/// Builds a rotation of `desc`; null with a message in `err` on bad input or a kind this
/// peer does not have.
///
/// # Safety
/// `desc` is valid; its rows and output stay alive (and the output unread by others) until
/// [`rqp_rot_free`]; `err` holds `err_len` writable bytes (or is null).
#[no_mangle]
pub unsafe extern "C" fn rqp_rot_new(
    desc: *const RqpRotDesc,
    err: *mut c_char,
    err_len: usize,
) -> *mut Rot {
    // SAFETY: per this function's contract.
    let Some(d) = (unsafe { desc.as_ref() }) else {
        write_err(err, err_len, "null descriptor");
        return ptr::null_mut();
    };
    match rot_new(d) {
        Ok(h) => Box::into_raw(h),
        Err(e) => {
            write_err(err, err_len, &e);
            ptr::null_mut()
        }
    }
}

/// Runs the rotation (rows → output). Returns 0, -1 for a null handle, or ggml's status.
///
/// # Safety
/// `h` came from [`rqp_rot_new`] and is not used by another thread.
#[no_mangle]
pub unsafe extern "C" fn rqp_rot_run(h: *mut Rot) -> i32 {
    // SAFETY: per this function's contract.
    match unsafe { h.as_mut() } {
        // SAFETY: the buffers of the graph are alive (the contract of rqp_rot_new).
        Some(h) => unsafe { h.compute.run() },
        None => -1,
    }
}

/// Frees a handle of [`rqp_rot_new`] (null is a no-op).
///
/// # Safety
/// `h` came from [`rqp_rot_new`] and is freed once.
#[no_mangle]
pub unsafe extern "C" fn rqp_rot_free(h: *mut Rot) {
    if !h.is_null() {
        // SAFETY: per this function's contract.
        drop(unsafe { Box::from_raw(h) });
    }
}

/// Quantizes `n` values of `x` to `ty` (q4_0 or q8_0) into `out` (`out_len` bytes): with
/// `path` 0 through `ggml_quantize_chunk` (the reference rows ggml writes model files with),
/// with 1 through the CPU backend's `from_float` (what a quantizing copy into the KV cache
/// calls). Returns 0, or -1 on bad input.
///
/// # Safety
/// `x` holds `n` values and `out` `out_len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn rqp_quantize(
    ty: i32,
    path: i32,
    x: *const f32,
    n: i64,
    out: *mut u8,
    out_len: usize,
) -> i32 {
    let Some(t) = ggml_type_of(ty).filter(|_| ty == TY_Q4_0 || ty == TY_Q8_0) else {
        return -1;
    };
    if row_bytes(ty, n) != Some(out_len) || x.is_null() || out.is_null() || n <= 0 {
        return -1;
    }
    compat::init();
    match path {
        // SAFETY: sizes checked: one row of n values into out_len bytes.
        0 => unsafe {
            compat::quantize_chunk(t, x, out.cast(), n);
        },
        1 => match compat::from_float(t) {
            // SAFETY: as above.
            Some(f) => unsafe { f(x, out.cast(), n) },
            None => return -1,
        },
        _ => return -1,
    }
    0
}
