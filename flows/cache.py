"""The stage cache policy: config + input artifact digests + code fingerprint + a version constant.

A re-run with nothing changed hits the cache for every stage; changing one stage's config changes its
key and, through its output digest, the keys of everything downstream, nothing upstream. A cache hit
is only trusted while its artifact is intact: if the cached ref's files are gone or resized, the key
moves on to a successor derived from the stale record, so the stage recomputes and the next run hits
the fresh record (one link per invalidation, deterministic).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

import nanochat_core
from nanochat_core.artifacts import digest_of, verify

# Bump to invalidate every cached stage (e.g. after a change in what a ref means).
CACHE_VERSION = "2"  # 2: stages read their inputs from refs (shards refs list their files)
PACKAGE = "nanochat_core"


def _module_file(root: Path, name: str) -> Path | None:
    """The source of module `name` (nanochat_core.x.y) under the package root, without importing it."""
    parts = name.split(".")[1:]
    if not parts:
        return root / "__init__.py"
    rel = Path(*parts)
    for candidate in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, name: str) -> set[str]:
    """Every module `path` imports (module level and inside functions: lazy imports run too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


@functools.cache
def code_fingerprint(stage: str) -> str:
    """A hash of the sources `stage` runs: its module, the library modules it imports (transitively,
    read with `ast`, so the flow process imports no torch), their packages' __init__ files, and the
    tokenizer extension when they use it (a change in the Rust code alone counts too). Editing serve/
    or the report leaves a cached pretraining Cached. The same on a worker image: it hashes the sources
    it carries, so two images with the same code share their cache records."""
    root = Path(nanochat_core.__file__).parent
    todo, seen, files, external = [f"{PACKAGE}.stages.{stage}"], set(), {}, set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        for i in range(1, len(parts)):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            todo.append(".".join(parts[:i]))
        path = _module_file(root, name) if parts[0] == PACKAGE else None
        if path is None:
            external.add(parts[0])
            continue
        files[str(path.relative_to(root))] = path
        todo.extend(m for m in _imports(path, name) if m.split(".")[0] in (PACKAGE, "tokenizer_rs"))
    h = hashlib.sha256()
    for rel, path in sorted(files.items()):
        h.update(rel.encode())
        h.update(path.read_bytes())
    if "tokenizer_rs" in external:
        spec = importlib.util.find_spec("tokenizer_rs")  # locates the package without running it
        for path in sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".so", ".pyd"):
                h.update(path.name.encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class StageCache(CachePolicy):
    """Key = the task's `key_inputs` (stage name, the config sections it reads, upstream refs' digests)."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any],
                    flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        upstream = {name: ref["digest"] for name, ref in sorted(inputs.get("inputs", {}).items())}
        key = digest_of([CACHE_VERSION, code_fingerprint(inputs["stage"]), inputs["stage"], inputs["settings"], upstream])
        store = task_ctx.result_store if task_ctx else None
        while store is not None and store.exists(key):
            ref = store.read(key).result
            if isinstance(ref, dict) and verify(ref):
                break
            key = digest_of([key, ref.get("digest") if isinstance(ref, dict) else None])
        return key
