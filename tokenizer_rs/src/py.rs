//! Thin PyO3 bindings over the pure core in `lib.rs`.

use pyo3::prelude::*;

#[pyfunction]
fn version() -> &'static str {
    crate::version()
}

#[pymodule]
fn _tokenizer_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(version, m)?)?;
    Ok(())
}
