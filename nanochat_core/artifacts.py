"""Artifact references: what a stage hands to the next one, and how a cache hit is checked.

A stage's result is a small dict (a "ref"): `path` (its output directory, local or fsspec URL), the
figures it measured, and a `manifest` of the files it produced with their sizes. `digest` is a hash of
that manifest plus the figures, so a downstream cache key changes whenever an input artifact changes;
`verify` checks that every listed file is still there with its size, so a cached ref whose artifact was
deleted or truncated is recomputed rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from nanochat_core import storage

RESULT_FILE = "result.json"
# The launcher sets this; a stage's main() writes its ref there for the parent process to read.
RESULT_PATH_ENV = "NANOCHAT_RESULT_PATH"
INPUTS_PATH_ENV = "NANOCHAT_INPUTS_PATH"


def manifest(root: str, files: list[str] | None = None) -> dict[str, int]:
    """{relative path: size} of `files` under `root` (default: every file below it but result.json)."""
    fs, base = storage.filesystem(root)
    if files is None:
        found = fs.find(base) if fs.exists(base) else []
        files = [p[len(base.rstrip("/")) + 1 :] for p in found]
    sizes = {}
    for rel in sorted(files):
        if rel == RESULT_FILE or ".tmp-" in rel:
            continue
        sizes[rel] = fs.size(f"{base.rstrip('/')}/{rel}")
    return sizes


def digest_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_ref(stage: str, path: str, figures: dict[str, Any] | None = None,
             files: list[str] | None = None) -> dict[str, Any]:
    """The ref of a finished stage; also written as `<path>/result.json` (atomically)."""
    ref: dict[str, Any] = {"stage": stage, "path": path, **(figures or {})}
    ref["manifest"] = manifest(path, files)
    ref["digest"] = digest_of({k: v for k, v in ref.items() if k not in ("run_id",)})
    run_id = os.environ.get("NANOCHAT_MLFLOW_RUN_ID")
    if run_id:
        ref["run_id"] = run_id
    storage.write_text(f"{path.rstrip('/')}/{RESULT_FILE}", json.dumps(ref, indent=2, default=str))
    return ref


def emit(ref: dict[str, Any]) -> None:
    """Hand the ref to the launcher (if one started this process); rank 0 only."""
    target = os.environ.get(RESULT_PATH_ENV)
    if target and int(os.environ.get("RANK", "0")) == 0:
        storage.write_text(target, json.dumps(ref, default=str))


def inputs() -> dict[str, dict[str, Any]]:
    """The upstream refs the launcher handed to this stage ({} when run by hand)."""
    path = os.environ.get(INPUTS_PATH_ENV)
    return json.loads(storage.read_text(path)) if path and storage.exists(path) else {}


def verify(ref: dict[str, Any]) -> bool:
    """True if every file in the ref's manifest still exists with its recorded size."""
    try:
        fs, base = storage.filesystem(ref["path"])
        return all(
            fs.exists(f"{base.rstrip('/')}/{rel}") and fs.size(f"{base.rstrip('/')}/{rel}") == size
            for rel, size in ref.get("manifest", {}).items()
        )
    except (KeyError, OSError, ValueError):
        return False
