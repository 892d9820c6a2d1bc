#!/usr/bin/env bash
# Assemble a directory that runs base_train on a GPU machine with no package registry, given that the
# machine already has Python and torch (e.g. Python 3.12 + torch 2.11) but not the rest:
#
#   bash scripts/gpu_bundle.sh OUT_DIR [--python-version 3.12] [--base BASE_DIR] [--shards N]
#                                      [--skip FILE] [--serve]
#   rsync -a OUT_DIR gpu-host:nanochat-bundle/
#   ssh gpu-host 'cd nanochat-bundle && bash run.sh --preset d12 --num-iterations 300'
#
# OUT_DIR gets:
#   wheels/           the library's dependency closure from uv.lock (pydantic, tiktoken, pyarrow, fsspec,
#                     s3fs, numpy, ...) as wheels for the target Python, the abi3 tokenizer_rs wheel
#                     (built here by maturin through `uv build`) and the nanochat-flow wheel. Not torch,
#                     triton or nvidia-*: the GPU machine's own torch is used. Not prefect / mlflow /
#                     fastapi either: a stage run by hand needs neither (--serve adds fastapi and uvicorn
#                     for `nanochat serve`). --skip FILE leaves out the packages it names, one a line, and
#                     what only they need: what the target machine already has (scripts/gpu_check.sh).
#   requirements.txt  what wheels/ holds, pinned as in uv.lock
#   base/             tokenizer/ and base_data/ copied from BASE_DIR (--base), the first N training
#                     shards plus the val shard (--shards N, default all)
#   run.sh            installs wheels/ into OUT_DIR/site (offline, once) and launches
#                     `torchrun --standalone --nproc_per_node=$NPROC -m nanochat_core.stages.base_train`
#                     with NANOCHAT_BASE_DIR=OUT_DIR/base and the flags given to it
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

usage() { echo "usage: bash scripts/gpu_bundle.sh OUT_DIR [--python-version X.Y] [--base BASE_DIR] [--shards N] [--skip FILE] [--serve]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
PYV=3.12
BASE=""
SHARDS=""
SKIP=""
SERVE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYV=${2:?}; shift 2 ;;
    --base) BASE=${2:?}; shift 2 ;;
    --shards) SHARDS=${2:?}; shift 2 ;;
    --skip) SKIP=$(cd "$(dirname "${2:?}")" && pwd)/$(basename "$2"); shift 2 ;;
    --serve) SERVE=1; shift ;;
    *) usage ;;
  esac
done
[[ "$PYV" =~ ^3\.[0-9]+$ ]] || { echo "error: --python-version takes X.Y (e.g. 3.12), not $PYV" >&2; exit 2; }
if [ -n "$BASE" ] && { [ ! -d "$BASE/tokenizer" ] || [ ! -d "$BASE/base_data" ]; }; then
  echo "error: $BASE has no tokenizer/ and base_data/; run \`nanochat tok-train\` there first or pass another --base" >&2
  exit 2
fi
[ -x .venv/bin/python ] || { echo "error: no .venv here; run \`bash scripts/setup.sh\` first" >&2; exit 2; }

# pip downloads wheels for another Python; uv has no download-only mode. The project venv has no pip.
if python3 -m pip --version >/dev/null 2>&1; then PIP=(python3 -m pip); else PIP=(uvx pip); fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -rf "$OUT/wheels" "$OUT/site"
mkdir -p "$OUT/wheels"

echo "gpu_bundle: dependency closure for Python $PYV from uv.lock"
.venv/bin/python - "$PYV" "$SKIP" "$SERVE" > "$OUT/requirements.txt" <<'EOF'
"""The locked dependency closure of the library, minus torch's stack and the orchestration packages."""
import re
import sys
import tomllib

from packaging.markers import Marker

# What a stage needs that the GPU machine lacks: the project's direct dependencies except the ones it
# has (torch) or that only the orchestrator imports (prefect, mlflow and their web servers).
LEAVE_OUT = {"torch", "prefect", "mlflow", "fastapi", "uvicorn"}
THEIRS = ("torch", "triton", "nvidia-", "cuda-")  # torch's own stack, already on the GPU machine

py, skip_file, serve = sys.argv[1:4]
if serve:
    LEAVE_OUT -= {"fastapi", "uvicorn"}
# Packages named in --skip (normalized as uv.lock spells names), and the dependencies only they bring.
SKIP = set()
if skip_file:
    SKIP = {re.sub(r"[-_.]+", "-", line.split("#")[0].strip()).lower() for line in open(skip_file)} - {""}
env = {"python_version": py, "python_full_version": py + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
lock = tomllib.load(open("uv.lock", "rb"))
packages = {}
for p in lock["package"]:
    packages.setdefault(p["name"], []).append(p)


def applies(dep):
    return "marker" not in dep or Marker(dep["marker"]).evaluate(env)


def resolve(dep):
    candidates = packages[dep["name"]]
    if "version" in dep:
        candidates = [p for p in candidates if p["version"] == dep["version"]]
    assert len(candidates) == 1, f"{dep['name']}: ambiguous in uv.lock"
    return candidates[0]


root = packages["nanochat-flow"][0]
todo = [d for d in root["dependencies"] if d["name"] not in LEAVE_OUT and applies(d)]
seen = {}
while todo:
    dep = todo.pop()
    if dep["name"].startswith(THEIRS) or dep["name"] in SKIP:
        continue
    pkg = resolve(dep)
    if pkg["name"] in seen:
        continue
    seen[pkg["name"]] = pkg
    extras = [d for e in dep.get("extra", []) for d in pkg.get("optional-dependencies", {}).get(e, [])]
    todo += [d for d in pkg.get("dependencies", []) + extras if applies(d)]
for name, pkg in sorted(seen.items()):
    if "registry" in pkg["source"]:
        print(f"{name}=={pkg['version']}")
EOF
echo "gpu_bundle: $(wc -l < "$OUT/requirements.txt") wheels to download"
"${PIP[@]}" download --quiet --no-deps --only-binary=:all: --dest "$OUT/wheels" \
  --python-version "$PYV" --implementation cp --abi "cp${PYV/./}" \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -r "$OUT/requirements.txt"

echo "gpu_bundle: building the tokenizer_rs (abi3) and nanochat-flow wheels"
uv build --quiet --wheel --package tokenizer-rs --out-dir "$OUT/wheels"
uv build --quiet --wheel --package nanochat-flow --out-dir "$OUT/wheels"
# The project's own wheels are installed with --no-deps, so list them without pins.
echo "tokenizer-rs" >> "$OUT/requirements.txt"
echo "nanochat-flow" >> "$OUT/requirements.txt"

if [ -n "$BASE" ]; then
  echo "gpu_bundle: tokenizer and shards from $BASE"
  rm -rf "$OUT/base" && mkdir -p "$OUT/base/base_data"
  cp -R "$BASE/tokenizer" "$OUT/base/tokenizer"
  mapfile -t shards < <(cd "$BASE/base_data" && ls shard_*.parquet | sort)
  [ ${#shards[@]} -ge 2 ] || { echo "error: $BASE/base_data needs at least two shards (train + val)" >&2; exit 2; }
  val=${shards[-1]}
  train=("${shards[@]:0:${#shards[@]}-1}")
  [ -z "$SHARDS" ] || train=("${train[@]:0:$SHARDS}")
  for f in "${train[@]}" "$val"; do cp "$BASE/base_data/$f" "$OUT/base/base_data/"; done
fi

cat > "$OUT/run.sh" <<'EOF'
#!/usr/bin/env bash
# Pretrain from this bundle with the machine's own Python and torch, offline:
#   bash run.sh --preset d12 --num-iterations 300            # NPROC GPUs (default: all that nvidia-smi lists)
#   PYTHON=/opt/conda/bin/python NPROC=8 bash run.sh --preset d20
# Flags after run.sh go to `nanochat base-train` (see --help). Artifacts go to NANOCHAT_BASE_DIR
# (default: base/ beside this script, which holds the tokenizer and shards this bundle came with).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "$NPROC" -gt 0 ] || NPROC=1
fi
"$PYTHON" -c "import torch" 2>/dev/null || { echo "error: $PYTHON has no torch; set PYTHON to the interpreter that has it" >&2; exit 2; }
if [ ! -f "$here/site/.complete" ]; then
  # --no-deps: the wheels are the exact closure; torch and its stack come from the machine.
  "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$here/site" "$here"/wheels/*.whl
  touch "$here/site/.complete"
fi
export PYTHONPATH="$here/site${PYTHONPATH:+:$PYTHONPATH}"
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$here/base}
export PYTHONUNBUFFERED=1
"$PYTHON" -c "import torch; print(f'torch {torch.__version__}, cuda {torch.cuda.is_available()}, {torch.cuda.device_count()} GPUs, nproc {$NPROC}')"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  -m nanochat_core.stages.base_train "$@"
EOF
chmod +x "$OUT/run.sh"
echo "gpu_bundle: $OUT ($(du -sh "$OUT" | cut -f1)); on the GPU machine: bash run.sh --preset d12 --num-iterations 300"
