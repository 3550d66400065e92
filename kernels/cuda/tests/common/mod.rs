//! What the CUDA test files share: the device (or the skip line), the test data, the element
//! types.

#![allow(dead_code)] // each test file uses its own part

use half::{bf16, f16};
use rotq_cuda::{CudaError, Device, GpuElement};
use rotq_reference::tolerance::Precision;
use rotq_testkit::data::Rows;
use std::io::Write;
use std::sync::OnceLock;

/// The first device, opened once; `None` where there is none, after printing the skip line
/// once (straight to stderr, which the test harness does not capture).
pub fn device() -> Option<&'static Device> {
    static DEVICE: OnceLock<Option<Device>> = OnceLock::new();
    DEVICE
        .get_or_init(|| match Device::open("cuda:0") {
            Ok(d) => Some(d),
            Err(e @ (CudaError::NoDriver | CudaError::NoDevice { .. })) => {
                // On a GPU machine (the bundle's run.sh sets this) a missing device is a failure.
                if std::env::var_os("ROTQ_REQUIRE_CUDA").is_some() {
                    panic!("ROTQ_REQUIRE_CUDA is set but there is no CUDA device: {e}");
                }
                let _ = writeln!(std::io::stderr(), "skipped: no CUDA device ({e})");
                None
            }
            Err(e) => panic!("a CUDA device is present but could not be opened: {e}"),
        })
        .as_ref()
}

/// The test data: uniform in [-1, 1) with an outlier 20 times larger every 37 values (what
/// rotation is for), never all zero.
pub const ROWS: Rows = Rows::uniform(1.0).every(37, 5, 20.0);

pub trait Elem: GpuElement {
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    const PRECISION: Precision;
}
impl Elem for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
    const PRECISION: Precision = Precision::F32;
}
impl Elem for f16 {
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    const PRECISION: Precision = Precision::F16;
}
impl Elem for bf16 {
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    const PRECISION: Precision = Precision::Bf16;
}

pub fn upload<T: Elem>(dev: &Device, x: &[f32]) -> cudarc::driver::CudaSlice<T> {
    let v: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
    dev.stream().clone_htod(&v).unwrap()
}

pub fn download<T: Elem>(dev: &Device, x: &cudarc::driver::CudaSlice<T>) -> Vec<f32> {
    let v = dev.stream().clone_dtoh(x).unwrap();
    v.into_iter().map(T::to_f32).collect()
}
