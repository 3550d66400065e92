//! llama.cpp's ggml (vendored by `llama-cpp-sys-2`) behind the C ABI of `../ggml_shim.rs`, as a
//! shared library that `rotq-peers` loads at run time. Built alone in its own `.so`, its ggml
//! symbols stay local and cannot collide with ik_llama.cpp's (which has the same names).

use llama_cpp_sys_2 as sys;

#[path = "../../ggml_shim.rs"]
mod shim;

pub use shim::{RqpFaDesc, RqpRotDesc};

/// What differs in llama.cpp's ggml: the CPU backend's init, thread pools, type traits.
mod compat {
    use super::sys;

    pub const NAME: &str = "llama.cpp (llama-cpp-sys-2 0.1.161)";
    pub const HAS_HADAMARD_HINT: bool = true;
    pub const HAS_HADAMARD_OP: bool = false;

    /// Initializes the CPU backend's tables (idempotent).
    pub fn init() {
        // SAFETY: no arguments; ggml guards repeated calls.
        unsafe { sys::ggml_cpu_init() }
    }

    /// A persistent thread pool, as llama.cpp keeps one per context. Its workers do not poll
    /// for work between graphs (`poll = 0`): a polling worker would spin for milliseconds
    /// after each run and take a core from the kernel timed next.
    pub struct Pool(*mut sys::ggml_threadpool);

    impl Pool {
        pub fn new(n_threads: i32) -> Result<Self, String> {
            // SAFETY: plain constructor calls with a valid parameter struct.
            let tp = unsafe {
                let mut p = sys::ggml_threadpool_params_default(n_threads);
                p.poll = 0;
                sys::ggml_threadpool_new(&mut p)
            };
            if tp.is_null() {
                return Err("ggml_threadpool_new failed".into());
            }
            Ok(Self(tp))
        }
    }

    impl Drop for Pool {
        fn drop(&mut self) {
            // SAFETY: made by ggml_threadpool_new, freed once (after the plan that used it).
            unsafe { sys::ggml_threadpool_free(self.0) }
        }
    }

    /// # Safety
    /// `graph` is a live graph.
    pub unsafe fn plan(
        graph: *mut sys::ggml_cgraph,
        n_threads: i32,
        pool: &Pool,
    ) -> sys::ggml_cplan {
        // SAFETY: per this function's contract; the pool outlives the plan (both in Compute).
        unsafe { sys::ggml_graph_plan(graph, n_threads, pool.0) }
    }

    pub fn from_float(t: sys::ggml_type) -> sys::ggml_from_float_t {
        // SAFETY: a table lookup for a valid type.
        unsafe { (*sys::ggml_get_type_traits_cpu(t)).from_float }
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
        unsafe { sys::ggml_quantize_chunk(t, x, y, 0, 1, n, std::ptr::null()) };
    }

    /// # Safety
    /// Never called: llama.cpp has no `ggml_hadamard` (HAS_HADAMARD_OP is false).
    pub unsafe fn hadamard(
        _: *mut sys::ggml_context,
        _: *mut sys::ggml_tensor,
        _: i32,
    ) -> *mut sys::ggml_tensor {
        unreachable!("llama.cpp has no ggml_hadamard")
    }

    /// # Safety
    /// `t` is a live `ggml_mul_mat` result.
    pub unsafe fn set_hadamard_hint(t: *mut sys::ggml_tensor) {
        // SAFETY: per this function's contract.
        unsafe { sys::ggml_mul_mat_set_hint(t, sys::GGML_HINT_SRC0_IS_HADAMARD) }
    }
}
