"""The stage cache policy: config + input artifact digests + code fingerprint + a version constant.

A re-run with nothing changed hits the cache for every stage; changing one stage's config changes its
key and, through its output digest, the keys of everything downstream, nothing upstream. A cache hit
is only trusted while its artifact is intact: if the cached ref's files are gone or resized, the key
moves on to a successor derived from the stale record, so the stage recomputes and the next run hits
the fresh record (one link per invalidation, deterministic).
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from nanochat_core.artifacts import digest_of, verify

# Bump to invalidate every cached stage (e.g. after a change in what a ref means).
CACHE_VERSION = "2"  # 2: stages read their inputs from refs (shards refs list their files)
CODE_VERSION_ENV = "NANOCHAT_CODE_VERSION"  # the image's git sha on GPU workers


@functools.cache
def code_fingerprint() -> str:
    """NANOCHAT_CODE_VERSION if set (the worker image's git sha), else a hash of the library sources
    and of the compiled tokenizer extension (so a change in the Rust code alone counts too)."""
    if os.environ.get(CODE_VERSION_ENV):
        return os.environ[CODE_VERSION_ENV]
    import nanochat_core
    from tokenizer_rs import _tokenizer_rs

    h = hashlib.sha256(Path(_tokenizer_rs.__file__).read_bytes())
    root = Path(nanochat_core.__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class StageCache(CachePolicy):
    """Key = the task's `key_inputs` (stage name, the config sections it reads, upstream refs' digests)."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any],
                    flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        upstream = {name: ref["digest"] for name, ref in sorted(inputs.get("inputs", {}).items())}
        key = digest_of([CACHE_VERSION, code_fingerprint(), inputs["stage"], inputs["settings"], upstream])
        store = task_ctx.result_store if task_ctx else None
        while store is not None and store.exists(key):
            ref = store.read(key).result
            if isinstance(ref, dict) and verify(ref):
                break
            key = digest_of([key, ref.get("digest") if isinstance(ref, dict) else None])
        return key
