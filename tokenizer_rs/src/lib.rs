//! Byte-level BPE training for nanochat-flow: a pure Rust core.
//!
//! - [`split`]: pre-splitting text into chunks with the (GPT-4-style) split pattern;
//! - [`train`]: counting unique chunks in parallel and learning merges incrementally.
//!
//! The Python bindings live in `py.rs` behind the `python` feature, so `cargo test` exercises
//! this crate without a Python interpreter.

pub mod split;
pub mod train;

#[cfg(feature = "python")]
mod py;

pub use split::{Splitter, GPT4_SPLIT_PATTERN};
pub use train::{learn_merges, Bpe, ChunkCounter};

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
