//! Thin PyO3 bindings over the pure core in `lib.rs`: type conversion, batching the Python
//! iterator, releasing the GIL. No training logic lives here.

use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyIterator, PyString};

use crate::{ChunkCounter, Splitter, GPT4_SPLIT_PATTERN};

#[pyfunction]
fn version() -> &'static str {
    crate::version()
}

/// Texts pulled from the Python iterator, stored back to back in one buffer.
#[derive(Default)]
struct Batch {
    text: String,
    ends: Vec<usize>,
}

impl Batch {
    /// Refill with up to `max_texts` texts or about `max_bytes` bytes; `seen` numbers the items
    /// so a bad one can be named.
    fn fill(
        &mut self,
        iter: &Bound<'_, PyIterator>,
        max_texts: usize,
        max_bytes: usize,
        seen: &mut usize,
    ) -> PyResult<()> {
        self.text.clear();
        self.ends.clear();
        while self.ends.len() < max_texts && self.text.len() < max_bytes {
            let Some(item) = iter.clone().next() else {
                break;
            };
            let item = item?;
            let Ok(s) = item.cast::<PyString>() else {
                return Err(PyTypeError::new_err(format!(
                    "training texts must be str, but item {} is {}",
                    *seen,
                    item.get_type()
                )));
            };
            self.text.push_str(&s.to_cow()?);
            self.ends.push(self.text.len());
            *seen += 1;
        }
        Ok(())
    }

    fn views(&self) -> Vec<&str> {
        let mut start = 0;
        self.ends
            .iter()
            .map(|&end| {
                let s = &self.text[start..end];
                start = end;
                s
            })
            .collect()
    }
}

/// Learn a byte-level BPE from an iterable of str (see the stub for the full signature).
///
/// The iterator is consumed in batches: while the worker threads split and count one batch with
/// the GIL released, this thread pulls the next one from Python, so a slow reader (parquet) and
/// the counting overlap, and memory holds two batches, never the corpus.
#[pyfunction]
#[pyo3(signature = (texts, vocab_size, pattern = None, *, batch_texts = 8192, batch_bytes = 16 << 20, num_threads = None))]
fn train(
    py: Python<'_>,
    texts: &Bound<'_, PyAny>,
    vocab_size: usize,
    pattern: Option<String>,
    batch_texts: usize,
    batch_bytes: usize,
    num_threads: Option<usize>,
) -> PyResult<Bpe> {
    if vocab_size < 256 {
        return Err(PyValueError::new_err(format!(
            "vocab_size must be at least 256 (one token per byte), got {vocab_size}"
        )));
    }
    if texts.is_instance_of::<PyString>() {
        // Iterating a str yields its characters: almost certainly not what the caller meant.
        return Err(PyTypeError::new_err(
            "training texts must be an iterable of str, not a single str; wrap it in a list",
        ));
    }
    let pattern = pattern.unwrap_or_else(|| GPT4_SPLIT_PATTERN.to_string());
    let mut counter = ChunkCounter::new(&pattern, num_threads).map_err(PyValueError::new_err)?;
    let iter = texts.try_iter().map_err(|_| {
        PyTypeError::new_err(format!(
            "training texts must be an iterable of str, got {}",
            texts.get_type()
        ))
    })?;
    let (batch_texts, batch_bytes) = (batch_texts.max(1), batch_bytes.max(1));
    let mut seen = 0usize;
    let mut current = Batch::default();
    let mut next = Batch::default();
    current.fill(&iter, batch_texts, batch_bytes, &mut seen)?;
    while !current.ends.is_empty() {
        let (counted, pulled) = std::thread::scope(|scope| {
            let views = current.views();
            let counter = &mut counter;
            let worker = scope.spawn(move || counter.add(&views));
            let pulled = next.fill(&iter, batch_texts, batch_bytes, &mut seen);
            let counted = py.detach(move || worker.join());
            (counted, pulled)
        });
        counted
            .map_err(|_| PyRuntimeError::new_err("tokenizer_rs: a counting thread panicked"))?
            .map_err(PyValueError::new_err)?;
        pulled?;
        py.check_signals()?;
        std::mem::swap(&mut current, &mut next);
    }
    let (texts, bytes, unique_chunks) = counter.stats();
    let bpe = py
        .detach(move || counter.train(vocab_size))
        .map_err(PyValueError::new_err)?;
    Ok(Bpe {
        inner: bpe,
        texts,
        bytes,
        unique_chunks,
    })
}

/// Split `text` into chunks with `pattern` (`fast=False` forces the regex engine).
#[pyfunction]
#[pyo3(signature = (text, pattern = None, fast = true))]
fn split(text: String, pattern: Option<String>, fast: bool) -> PyResult<Vec<String>> {
    // Compiling the pattern costs milliseconds, far more than splitting a sentence: keep them.
    static SPLITTERS: Mutex<Vec<(String, bool, Arc<Splitter>)>> = Mutex::new(Vec::new());
    let pattern = pattern.as_deref().unwrap_or(GPT4_SPLIT_PATTERN);
    let splitter = {
        let mut cache = SPLITTERS.lock().unwrap_or_else(|e| e.into_inner());
        match cache.iter().find(|(p, f, _)| p == pattern && *f == fast) {
            Some((_, _, s)) => s.clone(),
            None => {
                let s = Arc::new(
                    if fast {
                        Splitter::new(pattern)
                    } else {
                        Splitter::regex_only(pattern)
                    }
                    .map_err(PyValueError::new_err)?,
                );
                if cache.len() >= 16 {
                    cache.remove(0);
                }
                cache.push((pattern.to_string(), fast, s.clone()));
                s
            }
        }
    };
    let chunks = splitter.split(&text).map_err(PyValueError::new_err)?;
    Ok(chunks.into_iter().map(String::from).collect())
}

/// A trained BPE: merges in order (merge i creates token 256 + i) and the split pattern.
#[pyclass(module = "tokenizer_rs", frozen)]
struct Bpe {
    inner: crate::Bpe,
    /// What training saw: texts, their UTF-8 bytes, and the unique chunks among them.
    #[pyo3(get)]
    texts: u64,
    #[pyo3(get)]
    bytes: u64,
    #[pyo3(get)]
    unique_chunks: usize,
}

#[pymethods]
impl Bpe {
    #[getter]
    fn merges(&self) -> Vec<(u32, u32)> {
        self.inner.merges().to_vec()
    }

    #[getter]
    fn pattern(&self) -> String {
        self.inner.pattern().to_string()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn token_bytes<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyBytes>> {
        self.inner
            .token_bytes()
            .iter()
            .map(|b| PyBytes::new(py, b))
            .collect()
    }

    fn mergeable_ranks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let ranks = PyDict::new(py);
        for (id, bytes) in self.inner.token_bytes().iter().enumerate() {
            ranks.set_item(PyBytes::new(py, bytes), id)?;
        }
        Ok(ranks)
    }

    fn encode(&self, py: Python<'_>, text: String) -> PyResult<Vec<u32>> {
        py.detach(|| self.inner.encode(&text))
            .map_err(PyValueError::new_err)
    }

    fn decode_bytes<'py>(&self, py: Python<'py>, ids: Vec<u32>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self
            .inner
            .decode_bytes(&ids)
            .map_err(PyValueError::new_err)?;
        Ok(PyBytes::new(py, &bytes))
    }

    fn __repr__(&self) -> String {
        format!(
            "Bpe(vocab_size={}, merges={})",
            self.inner.vocab_size(),
            self.inner.merges().len()
        )
    }
}

#[pymodule]
fn _tokenizer_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(split, m)?)?;
    m.add_class::<Bpe>()?;
    m.add("SPLIT_PATTERN", GPT4_SPLIT_PATTERN)?;
    Ok(())
}
