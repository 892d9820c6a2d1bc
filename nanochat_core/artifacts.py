"""Artifact references: what a stage hands to the next one, and how a cache hit is checked.

A stage's result is a small dict (a "ref"): `path` (its output directory, local or fsspec URL), the
figures it measured, and a `manifest` of the files it produced with their sizes and content hashes.
`digest` is a hash of that manifest, so a downstream cache key changes exactly when an input artifact's
content changes (a stage re-run that reproduces its output byte for byte leaves its dependents cached);
`verify` checks that every listed file is still there with that content, so a cached ref whose artifact
was deleted, truncated or overwritten is recomputed rather than trusted.

On an object store the manifest also records each object's ETag, read back from a listing after the
upload, and `verify` compares sizes and ETags from one listing instead of downloading every file to hash
it (a d20 checkpoint and its eight optimizer files are gigabytes): any new upload of a key gets a new
ETag, so another config's output written to the same directory is still told apart.
`NANOCHAT_CACHE_VERIFY=full` (`nanochat speedrun --verify full`) hashes the content there too; a local
base dir is always hashed, which is cheap on a local disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from nanochat_core import storage

RESULT_FILE = "result.json"
VERIFY_ENV = "NANOCHAT_CACHE_VERIFY"  # "full": hash object-store files on a cache lookup instead of comparing ETags
# The launcher sets this; a stage's main() writes its ref there for the parent process to read.
RESULT_PATH_ENV = "NANOCHAT_RESULT_PATH"
INPUTS_PATH_ENV = "NANOCHAT_INPUTS_PATH"


def manifest(root: str, files: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of `files` under `root` (default: every file below it but result.json)."""
    fs, base = storage.filesystem(root)
    if files is None:
        found = fs.find(base) if fs.exists(base) else []
        files = [p[len(base.rstrip("/")) + 1 :] for p in found]
    tags = storage.object_tags(root)  # after the upload: what the store itself reports
    sizes = {}
    for rel in sorted(files):
        if rel == RESULT_FILE or ".tmp-" in rel:
            continue
        url = _url(root, rel)
        sizes[rel] = {"size": storage.size(url), "sha256": storage.sha256(url)}
        if rel in tags and tags[rel]["size"] == sizes[rel]["size"]:
            sizes[rel]["etag"] = tags[rel]["etag"]
    return sizes


def _url(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}"


def digest_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_ref(stage: str, path: str, figures: dict[str, Any] | None = None,
             files: list[str] | None = None) -> dict[str, Any]:
    """The ref of a finished stage; also written as `<path>/result.json` (atomically)."""
    ref: dict[str, Any] = {"stage": stage, "path": path, **(figures or {})}
    ref["manifest"] = manifest(path, files)
    ref["digest"] = digest_of(ref["manifest"])
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


def inputs() -> dict[str, dict[str, Any]] | None:
    """The upstream refs the launcher handed to this stage (None when run by hand)."""
    path = os.environ.get(INPUTS_PATH_ENV)
    return json.loads(storage.read_text(path)) if path and storage.exists(path) else None


def verify(ref: dict[str, Any], full: bool | None = None) -> bool:
    """True if every file in the ref's manifest is still there with the same content.

    Content, not just size: two configs of one stage can write the same directory (base_checkpoints/d20),
    so a size check alone would trust the other config's output. On a local disk the content is hashed
    (seconds for a d20 checkpoint, against hours to retrain it). On an object store, where hashing means
    downloading, the ETags recorded at write time are compared from one listing, unless `full` (default:
    $NANOCHAT_CACHE_VERIFY == "full").
    """
    full = os.environ.get(VERIFY_ENV) == "full" if full is None else full
    entries = ref.get("manifest", {})
    try:
        if not full and entries and all("etag" in e for e in entries.values()):
            listed = storage.object_tags(ref["path"])
            return all(listed.get(rel) == {"size": e["size"], "etag": e["etag"]} for rel, e in entries.items())
        for rel, entry in entries.items():
            url = _url(ref["path"], rel)
            if not storage.exists(url) or storage.size(url) != entry["size"] or storage.sha256(url) != entry["sha256"]:
                return False
        return True
    except (KeyError, OSError, ValueError, TypeError):
        return False
