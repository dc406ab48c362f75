//! `deltatune._native`: the Rust side of the Python package. Thin: every call maps Python values
//! onto the library's typed specs (`deltatune::api`), runs the job with the GIL released and maps
//! the result (JSON text, bytes for arrays) and errors back. The Python package
//! (`python/deltatune`) gives it PEFT's names, progress bars and exceptions.
//!
//! Built only with the `python` feature (maturin turns it on), so that `cargo build --workspace`
//! and `cargo test --workspace` never link libpython.

#[cfg(feature = "python")]
mod errors;
#[cfg(feature = "python")]
mod jobs;
#[cfg(feature = "python")]
mod model;
#[cfg(feature = "python")]
mod progress;

#[cfg(feature = "python")]
use pyo3::prelude::*;

#[cfg(feature = "python")]
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<model::Model>()?;
    m.add_class::<jobs::TextStream>()?;
    m.add_function(wrap_pyfunction!(model::load, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::method_defaults, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::methods, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::parse_spec, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::spec_from_json, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::train_defaults, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::search, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::generate, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::generate_stream, m)?)?;
    m.add_function(wrap_pyfunction!(errors::raise_test_panic, m)?)?;
    Ok(())
}
