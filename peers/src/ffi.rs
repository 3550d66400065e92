//! The FFI boundary: the shim's C ABI (`shim/ggml_shim.rs`), loaded with `libloading`. Every
//! `unsafe` block of the crate is here; the callers in `lib.rs` have checked the sizes.

use crate::{c_message, FlashAttnSpec, MaskKind, PeerError, Result};
use libloading::Library;
use std::ffi::{c_char, c_void};
use std::path::{Path, PathBuf};

/// The ABI version this crate speaks (the shim's `ABI_VERSION`).
const ABI_VERSION: u32 = 1;

/// Mirror of the shim's `RqpFaDesc`.
#[repr(C)]
struct FaDesc {
    k_type: i32,
    v_type: i32,
    n_seq: i64,
    n_kv: i64,
    h_kv: i64,
    d: i64,
    h_q: i64,
    n_q: i64,
    mask: i32,
    pos_offset: i64,
    scale: f32,
    n_threads: i32,
    k: *const u8,
    k_len: usize,
    v: *const u8,
    v_len: usize,
}

/// Mirror of the shim's `RqpRotDesc`.
#[repr(C)]
struct RotDesc {
    kind: i32,
    n: i64,
    rows: i64,
    out_type: i32,
    n_threads: i32,
    x: *const f32,
    x_len: usize,
    out: *mut u8,
    out_len: usize,
}

type FaNew = unsafe extern "C" fn(*const FaDesc, *mut c_char, usize) -> *mut c_void;
type FaRun = unsafe extern "C" fn(*mut c_void, *const f32, usize, *mut f32, usize) -> i32;
type Free = unsafe extern "C" fn(*mut c_void);
type RotNew = unsafe extern "C" fn(*const RotDesc, *mut c_char, usize) -> *mut c_void;
type RotRun = unsafe extern "C" fn(*mut c_void) -> i32;
type Quantize = unsafe extern "C" fn(i32, i32, *const f32, i64, *mut u8, usize) -> i32;
type Info = unsafe extern "C" fn(*mut c_char, usize);
type Version = unsafe extern "C" fn() -> u32;

/// A handle of `rqp_fa_new` (null once freed).
pub(crate) struct FaHandle(*mut c_void);
/// A handle of `rqp_rot_new` (null once freed).
pub(crate) struct RotHandle(*mut c_void);

/// The loaded library and its entry points.
pub(crate) struct Api {
    fa_new: FaNew,
    fa_run: FaRun,
    fa_free: Free,
    rot_new: RotNew,
    rot_run: RotRun,
    rot_free: Free,
    quantize: Quantize,
    info: Info,
    /// Kept loaded for as long as the entry points above are used (dropped last).
    _lib: Library,
}

fn i64_of(x: usize) -> Result<i64> {
    i64::try_from(x).map_err(|_| PeerError::Invalid(format!("{x} does not fit an i64")))
}

fn i32_of(x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| PeerError::Invalid(format!("{x} does not fit an i32")))
}

impl Api {
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let err = |reason: String| PeerError::Load {
            path: PathBuf::from(path),
            reason,
        };
        // SAFETY: the library is one of our shims; loading runs only its static initializers
        // (ggml's and the C++ runtime's), which have no preconditions.
        let lib = unsafe { Library::new(path) }.map_err(|e| err(e.to_string()))?;
        // SAFETY: each symbol is a function the shim exports with exactly this signature
        // (shim/ggml_shim.rs; the ABI version below guards against a stale library), and the
        // pointers are used only while `_lib` keeps the library loaded.
        unsafe {
            let version = *lib
                .get::<Version>(b"rqp_abi_version\0")
                .map_err(|e| err(e.to_string()))?;
            let found = version();
            if found != ABI_VERSION {
                return Err(PeerError::Abi {
                    path: path.into(),
                    found,
                    expected: ABI_VERSION,
                });
            }
            macro_rules! sym {
                ($name:literal) => {
                    *lib.get(concat!($name, "\0").as_bytes())
                        .map_err(|e| err(e.to_string()))?
                };
            }
            Ok(Self {
                fa_new: sym!("rqp_fa_new"),
                fa_run: sym!("rqp_fa_run"),
                fa_free: sym!("rqp_fa_free"),
                rot_new: sym!("rqp_rot_new"),
                rot_run: sym!("rqp_rot_run"),
                rot_free: sym!("rqp_rot_free"),
                quantize: sym!("rqp_quantize"),
                info: sym!("rqp_info"),
                _lib: lib,
            })
        }
    }

    pub(crate) fn info(&self) -> String {
        let mut buf = [0 as c_char; 256];
        // SAFETY: the buffer holds the 256 bytes we pass.
        unsafe { (self.info)(buf.as_mut_ptr(), buf.len()) };
        c_message(&buf)
    }

    /// `spec` was checked against the caches' lengths.
    pub(crate) fn fa_new(&self, spec: &FlashAttnSpec, k: &[u8], v: &[u8]) -> Result<FaHandle> {
        let (mask, pos_offset) = match spec.mask {
            MaskKind::None => (0, 0),
            MaskKind::AllVisible => (1, 0),
            MaskKind::Causal { pos_offset } => (2, pos_offset),
        };
        let desc = FaDesc {
            k_type: spec.k_type.code(),
            v_type: spec.v_type.code(),
            n_seq: i64_of(spec.n_seq)?,
            n_kv: i64_of(spec.n_kv)?,
            h_kv: i64_of(spec.h_kv)?,
            d: i64_of(spec.d)?,
            h_q: i64_of(spec.h_q)?,
            n_q: i64_of(spec.n_q)?,
            mask,
            pos_offset: i64_of(pos_offset)?,
            scale: spec.scale,
            n_threads: i32_of(spec.n_threads)?,
            k: k.as_ptr(),
            k_len: k.len(),
            v: v.as_ptr(),
            v_len: v.len(),
        };
        let mut msg = [0 as c_char; 512];
        // SAFETY: `desc` points at the caller's caches with their true lengths; the handle
        // that comes back borrows them, and `FlashAttn` keeps the borrows for its lifetime.
        let h = unsafe { (self.fa_new)(&desc, msg.as_mut_ptr(), msg.len()) };
        if h.is_null() {
            return Err(PeerError::Invalid(c_message(&msg)));
        }
        Ok(FaHandle(h))
    }

    /// `q` and `out` have the spec's length (checked by the caller; the shim checks again).
    pub(crate) fn fa_run(&self, h: &mut FaHandle, q: &[f32], out: &mut [f32]) -> Result<()> {
        // SAFETY: a live handle used through `&mut` (one thread at a time); the slices' true
        // lengths are passed.
        let status =
            unsafe { (self.fa_run)(h.0, q.as_ptr(), q.len(), out.as_mut_ptr(), out.len()) };
        match status {
            0 => Ok(()),
            -1 => Err(PeerError::Invalid("query or output length".into())),
            s => Err(PeerError::Compute(s)),
        }
    }

    pub(crate) fn fa_free(&self, h: &mut FaHandle) {
        // SAFETY: a handle of rqp_fa_new, freed once (nulled after).
        unsafe { (self.fa_free)(h.0) };
        h.0 = std::ptr::null_mut();
    }

    /// The caller checked `x` (whole rows of `n`) and `out`'s length.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rot_new(
        &self,
        kind: i32,
        n: usize,
        rows: usize,
        out_type: i32,
        n_threads: usize,
        x: &[f32],
        out: &mut [u8],
    ) -> Result<RotHandle> {
        let desc = RotDesc {
            kind,
            n: i64_of(n)?,
            rows: i64_of(rows)?,
            out_type,
            n_threads: i32_of(n_threads)?,
            x: x.as_ptr(),
            x_len: x.len(),
            out: out.as_mut_ptr(),
            out_len: out.len(),
        };
        let mut msg = [0 as c_char; 512];
        // SAFETY: `desc` points at the caller's buffers with their true lengths; `Rotate`
        // keeps both borrowed (the output mutably) for the handle's lifetime.
        let h = unsafe { (self.rot_new)(&desc, msg.as_mut_ptr(), msg.len()) };
        if h.is_null() {
            return Err(PeerError::Invalid(c_message(&msg)));
        }
        Ok(RotHandle(h))
    }

    pub(crate) fn rot_run(&self, h: &mut RotHandle) -> Result<()> {
        // SAFETY: a live handle used through `&mut`; its buffers are borrowed by `Rotate`.
        match unsafe { (self.rot_run)(h.0) } {
            0 => Ok(()),
            s => Err(PeerError::Compute(s)),
        }
    }

    pub(crate) fn rot_free(&self, h: &mut RotHandle) {
        // SAFETY: a handle of rqp_rot_new, freed once (nulled after).
        unsafe { (self.rot_free)(h.0) };
        h.0 = std::ptr::null_mut();
    }

    /// `out` holds exactly the encoded size of `x` (checked by the caller).
    pub(crate) fn quantize(&self, ty: i32, path: i32, x: &[f32], out: &mut [u8]) -> Result<()> {
        // SAFETY: the slices' true lengths are passed; the shim checks them against the type.
        let rc = unsafe {
            (self.quantize)(
                ty,
                path,
                x.as_ptr(),
                i64_of(x.len())?,
                out.as_mut_ptr(),
                out.len(),
            )
        };
        if rc != 0 {
            return Err(PeerError::Invalid(format!(
                "quantize type {ty} path {path} refused"
            )));
        }
        Ok(())
    }
}
