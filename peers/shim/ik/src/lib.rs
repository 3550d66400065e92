//! ik_llama.cpp's ggml (vendored by `ik-llama-cpp-sys`) behind the C ABI of `../ggml_shim.rs`,
//! as a shared library that `rotq-peers` loads at run time. Built alone in its own `.so`, its
//! ggml symbols stay local and cannot collide with llama.cpp's (which has the same names).

use ik_llama_cpp_sys as sys;

#[path = "../../ggml_shim.rs"]
mod shim;

pub use shim::{RqpFaDesc, RqpRotDesc};

/// What differs in ik_llama.cpp's ggml (an older API: no thread pool object, type traits
/// through `ggml_internal_get_type_traits`, `ggml_hadamard`).
mod compat {
    use super::sys;

    pub const NAME: &str = "ik_llama.cpp (ik-llama-cpp-sys 0.1.7)";
    pub const HAS_HADAMARD_HINT: bool = false;
    pub const HAS_HADAMARD_OP: bool = true;

    /// ggml initializes its tables in `ggml_init`.
    pub fn init() {}

    /// ik_llama.cpp's ggml starts and joins its worker threads in every `ggml_graph_compute`
    /// (no thread pool object).
    pub struct Pool;

    impl Pool {
        pub fn new(_n_threads: i32) -> Result<Self, String> {
            Ok(Self)
        }
    }

    /// # Safety
    /// `graph` is a live graph.
    pub unsafe fn plan(graph: *mut sys::ggml_cgraph, n_threads: i32, _: &Pool) -> sys::ggml_cplan {
        // SAFETY: per this function's contract.
        unsafe { sys::ggml_graph_plan(graph, n_threads) }
    }

    pub fn from_float(t: sys::ggml_type) -> sys::ggml_from_float_t {
        // SAFETY: a table lookup for a valid type.
        unsafe { sys::ggml_internal_get_type_traits(t).from_float }
    }

    /// # Safety
    /// `x` holds `n` values and `y` one row of `n` values of `t`.
    pub unsafe fn quantize_chunk(
        t: sys::ggml_type,
        x: *const f32,
        y: *mut std::ffi::c_void,
        n: i64,
    ) {
        // SAFETY: per this function's contract; q4_0/q8_0 take no importance matrix.
        unsafe { sys::ggml_quantize_chunk(t, x, y, 0, 1, n, std::ptr::null(), std::ptr::null()) };
    }

    /// # Safety
    /// `a` is a live f32 tensor of `ctx` whose rows are a multiple of `n` (a power of two).
    pub unsafe fn hadamard(
        ctx: *mut sys::ggml_context,
        a: *mut sys::ggml_tensor,
        n: i32,
    ) -> *mut sys::ggml_tensor {
        // SAFETY: per this function's contract.
        unsafe { sys::ggml_hadamard(ctx, a, n) }
    }

    /// # Safety
    /// Never called: ik_llama.cpp has no mul_mat hint (HAS_HADAMARD_HINT is false).
    pub unsafe fn set_hadamard_hint(_: *mut sys::ggml_tensor) {
        unreachable!("ik_llama.cpp has no GGML_HINT_SRC0_IS_HADAMARD")
    }
}
