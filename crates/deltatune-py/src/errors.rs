//! Library errors and Rust panics → Python exceptions of `deltatune.errors` (a `DeltaTuneError`
//! hierarchy whose members also derive from `FileNotFoundError`, `ValueError`, …).

use deltatune::error::Error;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What a guarded call can end with besides a value.
pub enum Failure {
    Lib(Error),
    /// A Rust panic, caught before it reaches Python.
    Panic(String),
    /// A Python exception raised by a callback (progress, Ctrl-C), re-raised as is.
    Py(PyErr),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Lib(e)
    }
}

impl From<PyErr> for Failure {
    fn from(e: PyErr) -> Self {
        Failure::Py(e)
    }
}

pub type Outcome<T> = std::result::Result<T, Failure>;

/// Runs `f`, turning a panic into [`Failure::Panic`].
pub fn guarded<T>(f: impl FnOnce() -> Outcome<T>) -> Outcome<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Failure::Panic(msg))
        }
    }
}

/// The `deltatune.errors` class for a library error.
fn class_name(e: &Error) -> &'static str {
    match e {
        Error::Io { err, .. } if err.kind() == std::io::ErrorKind::NotFound => "DeltaTuneFileNotFoundError",
        Error::NotFound { .. } => "DeltaTuneFileNotFoundError",
        Error::Io { .. } => "DeltaTuneIOError",
        Error::InvalidArg { .. } => "InvalidArgumentError",
        Error::Delta(_) | Error::NoMatch { .. } | Error::Config { .. } | Error::Json { .. } | Error::MissingField { .. } => "ConfigError",
        Error::Data { .. } | Error::DataFile { .. } | Error::Text { .. } | Error::Metric { .. } => "DataError",
        Error::Safetensors { .. }
        | Error::Gguf { .. }
        | Error::MissingTensor { .. }
        | Error::ShapeMismatch { .. }
        | Error::DtypeMismatch { .. }
        | Error::Tokenizer { .. } => "FormatError",
        Error::Asset(_) => "AssetError",
        Error::NonFinite(_) => "NonFiniteError",
        Error::Cancelled(_) => "CancelledError",
        _ => "InternalError",
    }
}

/// An instance of `deltatune.errors.<class>(msg)`, or a RuntimeError if that module is missing.
pub fn py_error(py: Python<'_>, class: &str, msg: String) -> PyErr {
    let made = py
        .import("deltatune.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.call1((msg.clone(),)))
        .map(PyErr::from_value);
    match made {
        Ok(e) => e,
        Err(_) => PyRuntimeError::new_err(msg),
    }
}

pub fn to_py(py: Python<'_>, f: Failure) -> PyErr {
    match f {
        Failure::Lib(e) => {
            let class = class_name(&e);
            let e = py_error(py, class, e.to_string());
            e
        }
        Failure::Panic(msg) => py_error(
            py,
            "InternalError",
            format!("internal error (a bug in deltatune; please report it): {msg}"),
        ),
        Failure::Py(e) => e,
    }
}

/// Runs `f` with the GIL released and any panic caught; errors become Python exceptions.
pub fn run<T: Send>(py: Python<'_>, f: impl FnOnce() -> Outcome<T> + Send) -> PyResult<T> {
    py.detach(|| guarded(f)).map_err(|e| to_py(py, e))
}

/// Panics inside a guarded call (for the test that no panic reaches Python).
#[pyfunction]
pub fn raise_test_panic(py: Python<'_>) -> PyResult<()> {
    run(py, || -> Outcome<()> {
        let v: Vec<u8> = Vec::new();
        let i = v.len() + 3;
        if i > 2 {
            panic!("test panic: index {i} out of range");
        }
        Ok(())
    })
}
