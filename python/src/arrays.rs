//! Arrays in through DLPack: NumPy arrays and torch CPU tensors become typed slices without a
//! copy, or a clear error (device, dtype, layout, read-only).
//!
//! Every array the package reads or writes comes in here, so the rules live in one place: CPU
//! memory, C-contiguous (compact row-major strides), a dtype the call takes, writable where the
//! call writes. The import keeps the producer's buffer alive (its DLPack deleter runs when the
//! [`Array`] drops), and the slices borrow the [`Array`], so no slice outlives the memory.

use crate::errors::invalid;
use dlpark::ffi::{DLDataTypeCode, DLDeviceType};
use dlpark::python::{from_dlpack, ImportedDlpack};
use dlpark::DlpackFlags;
use half::{bf16, f16};
use pyo3::prelude::*;

/// The element types the package reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// `float32`.
    F32,
    /// `float64` (explicit rotation matrices and the oracle).
    F64,
    /// `float16`.
    F16,
    /// `bfloat16` (torch; NumPy has none).
    Bf16,
    /// `uint8` (cache bytes).
    U8,
    /// `int32` (block tables, as vLLM passes them).
    I32,
    /// `int64` (slot mappings, as vLLM passes them).
    I64,
}

impl DType {
    /// Its name as NumPy and torch print it.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::Bf16 => "bfloat16",
            DType::U8 => "uint8",
            DType::I32 => "int32",
            DType::I64 => "int64",
        }
    }

    fn of(code: DLDataTypeCode, bits: u8) -> Option<Self> {
        Some(match (code, bits) {
            (DLDataTypeCode::FLOAT, 32) => DType::F32,
            (DLDataTypeCode::FLOAT, 64) => DType::F64,
            (DLDataTypeCode::FLOAT, 16) => DType::F16,
            (DLDataTypeCode::BFLOAT, 16) => DType::Bf16,
            (DLDataTypeCode::UINT, 8) => DType::U8,
            (DLDataTypeCode::INT, 32) => DType::I32,
            (DLDataTypeCode::INT, 64) => DType::I64,
            _ => return None,
        })
    }
}

/// A Rust element type that matches one [`DType`].
pub trait Elem: Copy + Send + Sync + 'static {
    /// Its dtype.
    const DTYPE: DType;
}

macro_rules! elem {
    ($($t:ty => $d:ident),*) => {$(impl Elem for $t { const DTYPE: DType = DType::$d; })*};
}
elem!(f32 => F32, f64 => F64, f16 => F16, bf16 => Bf16, u8 => U8, i32 => I32, i64 => I64);

/// An imported array: its producer's memory, shape and dtype.
pub struct Array {
    // Dropped last: releases the producer's buffer (its DLPack deleter).
    _owner: Owner,
    ptr: *mut u8,
    bytes: usize,
    shape: Vec<usize>,
    dtype: DType,
    read_only: bool,
    /// In CPU memory (else a device's: no slice of it may be made).
    cpu: bool,
    what: &'static str,
}

/// The imported tensor, kept only to be dropped.
struct Owner(#[allow(dead_code)] ImportedDlpack);

// SAFETY: the managed tensor is only dropped (its deleter run) by whichever thread drops the
// `Array`; the DLPack protocol lets the consumer call the deleter from any thread, and the
// producers this package takes (NumPy, torch) hold the GIL in their deleters themselves.
unsafe impl Send for Owner {}
// SAFETY: `Owner` has no methods: a shared reference to it can do nothing.
unsafe impl Sync for Owner {}
// SAFETY: `ptr` points at memory owned by the producer and kept alive by `_owner` (a device
// array's is never dereferenced on the host: its slices are refused); the
// slices handed out borrow the `Array` (shared for reading, exclusive for writing), so moving
// or sharing the `Array` between threads cannot make two writers.
unsafe impl Send for Array {}
// SAFETY: as above; `&Array` only gives out shared slices.
unsafe impl Sync for Array {}

/// What an import gives, before the device is checked.
pub(crate) struct Imported {
    owner: ImportedDlpack,
    ptr: *mut u8,
    bytes: usize,
    shape: Vec<usize>,
    dtype: DType,
    read_only: bool,
    device: dlpark::ffi::DLDevice,
}

impl Imported {
    /// The DLPack device the producer reported.
    pub(crate) fn device(&self) -> dlpark::ffi::DLDevice {
        self.device
    }
}

/// Whether `strides` (elements) lay `shape` out compactly in row-major order. An axis of
/// length 1 may have any stride (torch calls such a tensor contiguous and exports it as it
/// is: a one-row slice of a wider matrix keeps the matrix's row stride); none is given for a
/// compact tensor.
fn compact(shape: &[i64], strides: Option<&[i64]>) -> bool {
    let Some(strides) = strides else {
        return true;
    };
    if shape.contains(&0) {
        return true;
    }
    let mut expected = 1i64;
    for (&n, &s) in shape.iter().zip(strides).rev() {
        if n != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(n);
    }
    shape.len() == strides.len()
}

/// Imports `obj` (anything with `__dlpack__`) on any device: C-contiguous, one of `dtypes`.
/// `stream` is the consumer's stream for a device tensor (the producer orders its work
/// before it; `None` on the CPU). `what` names the argument in errors.
pub(crate) fn import_any(
    obj: &Bound<'_, PyAny>,
    what: &'static str,
    dtypes: &[DType],
    stream: Option<&dyn dlpark::python::DlpackStream>,
) -> PyResult<Imported> {
    if !obj.hasattr("__dlpack__")? {
        return Err(invalid(format!(
            "{what}: expected a NumPy array or a torch tensor (an object with __dlpack__), got {}",
            obj.get_type().name()?
        )));
    }
    // A producer's refusal can carry a C++ backtrace: its first line says why.
    let imported = from_dlpack(obj.as_borrowed(), stream, None).map_err(|e| {
        let msg = e.to_string();
        invalid(format!(
            "{what}: {}",
            msg.lines().next().unwrap_or_default()
        ))
    })?;
    let read_only = imported.flags().contains(DlpackFlags::READ_ONLY);
    let t = imported
        .validate()
        .map_err(|e| invalid(format!("{what}: not a valid DLPack tensor: {e}")))?;
    let device = t.device();
    let dt = t.dtype();
    let known = DType::of(dt.code, dt.bits).filter(|_| dt.lanes == 1);
    let dtype = known.filter(|d| dtypes.contains(d)).ok_or_else(|| {
        let names: Vec<_> = dtypes.iter().map(|d| d.name()).collect();
        let got = match known {
            Some(d) => d.name().to_string(),
            None => format!("DLPack type code {}, {} bits", dt.code.0, dt.bits),
        };
        invalid(format!(
            "{what}: dtype {got} is not one of {}",
            names.join(", ")
        ))
    })?;
    if !compact(t.shape(), t.strides()) {
        return Err(invalid(format!(
            "{what}: the array is not C-contiguous (use numpy.ascontiguousarray or \
             tensor.contiguous())"
        )));
    }
    let shape: Vec<usize> = t.shape().iter().map(|&s| s.max(0) as usize).collect();
    let bytes = t.num_bytes();
    // SAFETY: the tensor was validated; its adjusted pointer lies in its allocation (the
    // DLPack contract), which the returned owner keeps alive. (Only an address: it is not
    // dereferenced here.)
    let ptr =
        unsafe { t.offset_bytes_ptr() }.map_err(|e| invalid(format!("{what}: {e}")))? as *mut u8;
    Ok(Imported {
        owner: imported,
        ptr,
        bytes,
        shape,
        dtype,
        read_only,
        device,
    })
}

impl Array {
    /// Imports `obj` (anything with `__dlpack__`): CPU memory, C-contiguous, one of `dtypes`.
    /// `what` names the argument in errors.
    pub fn import(obj: &Bound<'_, PyAny>, what: &'static str, dtypes: &[DType]) -> PyResult<Self> {
        let i = import_any(obj, what, dtypes, None)?;
        if i.device.device_type != DLDeviceType::CPU {
            return Err(invalid(format!(
                "{what}: the array is on a device (DLPack device type {}); this call runs on \
                 the CPU: move it with .cpu() (the torch ops, torch.ops.rotq.*, also take \
                 CUDA tensors)",
                i.device.device_type.0
            )));
        }
        Ok(Self::of(i, what))
    }

    /// The array of an import (on any device: a device array's slices are refused).
    pub(crate) fn of(i: Imported, what: &'static str) -> Self {
        Self {
            _owner: Owner(i.owner),
            ptr: i.ptr,
            bytes: i.bytes,
            shape: i.shape,
            dtype: i.dtype,
            read_only: i.read_only,
            cpu: i.device.device_type == DLDeviceType::CPU,
            what,
        }
    }

    /// The data's address (a device address for a device array), for the device calls.
    pub(crate) fn address(&self) -> u64 {
        self.ptr as u64
    }

    /// Whether the array is read-only.
    pub(crate) fn read_only(&self) -> bool {
        self.read_only
    }

    /// The argument's name in errors.
    pub(crate) fn what(&self) -> &'static str {
        self.what
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Elements in the array.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// The last axis' length (the row length), 1 for a 0-d array.
    pub fn last_dim(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// The elements, read-only.
    pub fn slice<T: Elem>(&self) -> PyResult<&[T]> {
        self.check::<T>()?;
        if self.bytes == 0 {
            return Ok(&[]);
        }
        // SAFETY: `ptr` holds `bytes` initialized bytes of `T` (dtype checked) in memory that
        // lives as long as `self`; DLPack producers align elements to their type.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr as *const T, self.len()) })
    }

    /// The elements, writable; a read-only array is an error.
    pub fn slice_mut<T: Elem>(&mut self) -> PyResult<&mut [T]> {
        self.check::<T>()?;
        if self.read_only {
            return Err(invalid(format!(
                "{}: the array is read-only; pass a writable one",
                self.what
            )));
        }
        if self.bytes == 0 {
            return Ok(&mut []);
        }
        // SAFETY: as in `slice`; `&mut self` makes this the only slice of this import.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut T, self.len()) })
    }

    fn check<T: Elem>(&self) -> PyResult<()> {
        if !self.cpu {
            return Err(invalid(format!(
                "{}: the array is in device memory; this call reads it on the CPU",
                self.what
            )));
        }
        if self.dtype != T::DTYPE {
            return Err(invalid(format!(
                "{}: expected {}, got {}",
                self.what,
                T::DTYPE.name(),
                self.dtype.name()
            )));
        }
        if self.bytes > 0 && !(self.ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return Err(invalid(format!(
                "{}: the data is not aligned to its element type",
                self.what
            )));
        }
        Ok(())
    }

    /// Writes `values` into the array (f64, its length checked by the caller): the oracle's
    /// results into the caller's output.
    pub fn fill_f64<'v>(&mut self, values: impl IntoIterator<Item = &'v f64>) -> PyResult<()> {
        self.slice_mut::<f64>()?
            .iter_mut()
            .zip(values)
            .for_each(|(d, s)| *d = *s);
        Ok(())
    }

    /// Whether two arrays' bytes overlap (an input that is also the output).
    pub fn overlaps(&self, other: &Array) -> bool {
        let (a, b) = (self.ptr as usize, other.ptr as usize);
        self.bytes > 0 && other.bytes > 0 && a < b + other.bytes && b < a + self.bytes
    }

    /// Whether two arrays are the same bytes (an in-place call).
    pub fn same_memory(&self, other: &Array) -> bool {
        self.ptr == other.ptr && self.bytes == other.bytes
    }

    /// The bytes of the array (any dtype), for copies between arrays of one dtype.
    pub fn raw(&self) -> (*const u8, usize) {
        (self.ptr, self.bytes)
    }

    /// Refuses a shape other than `expected` (`what` says what it should be).
    pub fn expect_shape(&self, expected: &[usize], what: &str) -> PyResult<()> {
        if self.shape != expected {
            return Err(invalid(format!(
                "{}: shape {:?}, expected {:?} ({what})",
                self.what, self.shape, expected
            )));
        }
        Ok(())
    }

    /// Refuses another element count than `expected` (`what` says what it should be).
    pub fn expect_len(&self, expected: usize, what: &str) -> PyResult<()> {
        if self.len() != expected {
            return Err(invalid(format!(
                "{}: {} elements (shape {:?}), expected {expected} ({what})",
                self.what,
                self.len(),
                self.shape
            )));
        }
        Ok(())
    }
}

/// Runs `$body` with the type `$t` standing for a float dtype's Rust type (f32, f16 or bf16):
/// one generic call instead of a branch per dtype.
macro_rules! with_float {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            $crate::arrays::DType::F32 => {
                type $t = f32;
                $body
            }
            $crate::arrays::DType::F16 => {
                type $t = half::f16;
                $body
            }
            _ => {
                type $t = half::bf16;
                $body
            }
        }
    };
}
pub(crate) use with_float;

/// Imports an optional array argument.
pub fn import_opt(
    obj: Option<&Bound<'_, PyAny>>,
    what: &'static str,
    dtypes: &[DType],
) -> PyResult<Option<Array>> {
    obj.filter(|o| !o.is_none())
        .map(|o| Array::import(o, what, dtypes))
        .transpose()
}

/// Copies `src`'s elements into `dst` (same dtype and length), unless they are the same bytes.
pub fn copy_into(src: &Array, dst: &mut Array) -> PyResult<()> {
    if !src.cpu || !dst.cpu {
        return Err(invalid(format!(
            "{}: a device array cannot be copied on the CPU",
            dst.what
        )));
    }
    if src.dtype != dst.dtype || src.bytes != dst.bytes {
        return Err(invalid(format!(
            "{}: expected the dtype and size of {} ({} {:?}), got {} {:?}",
            dst.what,
            src.what,
            src.dtype.name(),
            src.shape,
            dst.dtype.name(),
            dst.shape
        )));
    }
    if dst.read_only {
        return Err(invalid(format!(
            "{}: the array is read-only; pass a writable one",
            dst.what
        )));
    }
    if !src.same_memory(dst) && src.bytes > 0 {
        // SAFETY: both spans are `bytes` long in live allocations; `ptr::copy` allows overlap.
        unsafe { std::ptr::copy(src.ptr, dst.ptr, src.bytes) };
    }
    Ok(())
}
