#!/usr/bin/env bash
# Set up, then run every test: the Rust crate's own tests and the whole pytest suite, end-to-end
# (slow-marked) tests included. `.ci/run` calls this script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== cargo test (tokenizer_rs)"
cargo test --quiet --manifest-path tokenizer_rs/Cargo.toml
echo "== pytest"
./.venv/bin/python -m pytest -m "slow or not slow" "$@"
