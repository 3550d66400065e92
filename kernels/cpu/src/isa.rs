//! Runtime dispatch: which instruction set the kernels use, chosen once per process.
//!
//! Every kernel has a portable path (plain Rust, which the compiler vectorizes where it can)
//! and, on x86-64, an AVX2+FMA+F16C path selected at run time with `is_x86_feature_detected!`.
//! Tests run both, so each is checked against the oracle on every x86-64 machine. On other
//! architectures (aarch64 included) the portable path runs: it compiles to NEON there through
//! the compiler's auto-vectorization, without hand-written intrinsics.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::OnceLock;

/// An instruction set a kernel can run on.
///
/// ```
/// use rotq_cpu::Isa;
/// assert!(Isa::Portable.available());
/// assert!(Isa::best().available());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isa {
    /// Plain Rust, every architecture.
    Portable,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
}

impl Isa {
    /// Whether this machine can run `self`.
    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            Isa::Avx2 => avx2_available(),
        }
    }

    /// The best instruction set of this machine, detected once.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            if Isa::Avx2.available() {
                Isa::Avx2
            } else {
                Isa::Portable
            }
        })
    }

    /// Every instruction set this machine can run (tests check each).
    pub fn all_available() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2]
            .into_iter()
            .filter(|i| i.available())
            .collect()
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
        })
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_available() -> bool {
    false
}
