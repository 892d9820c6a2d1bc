//! Byte-level BPE training for nanochat-flow: a pure Rust core.
//!
//! The Python bindings live in `py.rs` behind the `python` feature, so `cargo test` exercises
//! this crate without a Python interpreter.

#[cfg(feature = "python")]
mod py;

/// The crate version, as Cargo knows it (also exposed to Python as `tokenizer_rs.version()`).
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_is_the_manifest_version() {
        assert_eq!(super::version(), "0.1.0");
    }
}
