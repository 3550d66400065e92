//! Runtime dispatch: which instruction set the kernels use, chosen once per process.
//!
//! Every kernel has a portable path (plain Rust, which the compiler vectorizes where it can),
//! an AVX2+FMA+F16C path on x86-64 and a NEON path on aarch64, selected at run time with
//! `is_x86_feature_detected!` / `is_aarch64_feature_detected!`. Tests run every path the
//! machine has, so each is checked against the oracle (CI runs the aarch64 build under QEMU).

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
    /// aarch64 Advanced SIMD.
    Neon,
}

impl Isa {
    /// Whether this machine can run `self`.
    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            Isa::Avx2 => avx2_available(),
            Isa::Neon => neon_available(),
        }
    }

    /// The best instruction set of this machine, detected once.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            [Isa::Avx2, Isa::Neon]
                .into_iter()
                .find(|i| i.available())
                .unwrap_or(Isa::Portable)
        })
    }

    /// Every instruction set this machine can run (tests check each).
    pub fn all_available() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Neon]
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
            Isa::Neon => "neon",
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

#[cfg(target_arch = "aarch64")]
fn neon_available() -> bool {
    std::arch::is_aarch64_feature_detected!("neon")
}

#[cfg(not(target_arch = "aarch64"))]
fn neon_available() -> bool {
    false
}
