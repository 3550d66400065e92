//! rotq's errors as Python exceptions: `RotqError` and subclasses that are also the built-in
//! exception a Python user would catch (`ValueError` for bad input, `MemoryError` for sizes
//! that cannot be had), each carrying the same one-line message as the CLI.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyMemoryError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::PyErr;

create_exception!(
    rotq,
    RotqError,
    PyException,
    "Every error rotq raises (its message is the library's one-line description)."
);

/// Declares a subclass of `RotqError` and of a built-in exception.
macro_rules! subclass {
    ($name:ident, $builtin:ty, $doc:literal) => {
        #[doc = $doc]
        pub struct $name;
        impl $name {
            pub fn type_object(py: Python<'_>) -> PyResult<Bound<'_, pyo3::types::PyType>> {
                static CELL: pyo3::sync::PyOnceLock<Py<pyo3::types::PyType>> =
                    pyo3::sync::PyOnceLock::new();
                let t = CELL.get_or_try_init(py, || -> PyResult<_> {
                    let bases = (py.get_type::<RotqError>(), py.get_type::<$builtin>());
                    let t = py.get_type::<pyo3::types::PyType>().call1((
                        stringify!($name),
                        bases,
                        pyo3::types::PyDict::new(py),
                    ))?;
                    t.setattr("__module__", "rotq")?;
                    t.setattr("__doc__", $doc)?;
                    Ok(t.cast_into::<pyo3::types::PyType>()?.unbind())
                })?;
                Ok(t.bind(py).clone())
            }

            pub fn new_err(msg: String) -> PyErr {
                Python::attach(|py| match Self::type_object(py) {
                    Ok(t) => PyErr::from_type(t, msg),
                    Err(e) => e,
                })
            }
        }
    };
}

subclass!(
    InvalidInputError,
    PyValueError,
    "Bad input: a shape, dtype, format, rotation, size, table or parameter the call cannot take."
);
subclass!(
    CheckpointError,
    PyValueError,
    "A checkpoint's transform config or weights could not be read as rotations."
);
subclass!(
    RotqMemoryError,
    PyMemoryError,
    "A size that overflows or memory that cannot be had."
);
subclass!(
    DeviceError,
    PyRuntimeError,
    "A device (CUDA) failure: no driver or device, compile, launch."
);

/// A bad-input error with `msg`.
pub fn invalid(msg: String) -> PyErr {
    InvalidInputError::new_err(msg)
}

/// The Python exception of a library error.
pub fn to_py(e: rotq::Error) -> PyErr {
    match e {
        rotq::Error::Reference(r) => reference(r),
        rotq::Error::Checkpoint(c) => CheckpointError::new_err(c.to_string()),
        #[allow(unreachable_patterns)]
        other => DeviceError::new_err(other.to_string()),
    }
}

/// The Python exception of an oracle or kernel error.
pub fn reference(e: rotq_reference::Error) -> PyErr {
    match e {
        rotq_reference::Error::Overflow(_) => RotqMemoryError::new_err(e.to_string()),
        other => invalid(other.to_string()),
    }
}

/// Adds the exception classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("RotqError", py.get_type::<RotqError>())?;
    m.add("InvalidInputError", InvalidInputError::type_object(py)?)?;
    m.add("CheckpointError", CheckpointError::type_object(py)?)?;
    m.add("RotqMemoryError", RotqMemoryError::type_object(py)?)?;
    m.add("DeviceError", DeviceError::type_object(py)?)?;
    Ok(())
}
