"""The sample pretraining corpus: packaged text, shuffled with a fixed seed, written as canonical shards.

On these machines no hub is reachable, so the pipeline's first shards come from text that package
registries ship (sources.py). The result has the FineWeb-Edu layout, and `nanochat download` reads it
through a `file://` source exactly as it would read S3 or https.

A source whose package the registry no longer serves is skipped with a warning naming it; the
manifest lists what went in (`sources`) and what did not (`skipped`, with the registry's answer), and
the build fails only when a tier yields no text. The next build asks the registry again for the
skipped packages; when that question gets no answer, the build it would redo is kept.

Two caches keep a rebuild to seconds: each source's converted documents (one parquet file per
source, package version and converter version, beside the package cache), and the corpus itself (a
build whose manifest key matches and whose shards are all present is not redone).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat_core import storage
from nanochat_core.data import shards
from nanochat_core.data.packages import IndexUnreachable, PackageUnavailable, cache_root, fetch
from nanochat_core.data.sources import Source, sources_for
from nanochat_core.errors import UserError, warn
from nanochat_core.paths import join

# Bump when a converter or the shuffle changes: it invalidates the per-source and the corpus caches.
CORPUS_VERSION = 1
SHUFFLE_SEED = 1337
MANIFEST = "manifest.json"


def source_documents(source: Source) -> tuple[list[str], Path]:
    """The source's documents (cached per package file and converter version) and its package file."""
    archive = fetch(source.package)
    cached = cache_root() / "sources" / f"{source.name}--{archive.name}--v{CORPUS_VERSION}.parquet"
    if cached.exists():
        return pq.read_table(cached).column("text").to_pylist(), archive
    docs = [d for d in source.read(archive) if d.strip()]
    if not docs:
        raise UserError(f"source {source.name} gave no text from {archive}; the package layout changed")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with storage.atomic_open(str(cached), "wb") as f:
        pq.write_table(pa.table({"text": docs}), f, compression="zstd")
    return docs, archive


def _key(source_names: list[str], shard_chars: int, archives: list[str]) -> str:
    blob = json.dumps([CORPUS_VERSION, SHUFFLE_SEED, sorted(source_names), shard_chars, archives])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_manifest(out: str) -> dict | None:
    url = join(out, MANIFEST)
    if not storage.exists(url):
        return None
    try:
        return json.loads(storage.read_text(url))
    except ValueError:
        return None


def _cached_manifest(out: str, key: str) -> dict | None:
    """The existing manifest if it describes this exact build and every shard is still there."""
    manifest = _read_manifest(out)
    if manifest is None or manifest.get("key") != key:
        return None
    for entry in manifest["shards"]:
        shard = join(out, entry["file"])
        if not storage.exists(shard) or storage.size(shard) != entry["bytes"]:
            return None
    return manifest


def _available(selected: list[Source], skipped_before: dict[str, str]) -> tuple[list[tuple[Source, Path]], dict[str, str]]:
    """([(source, package file)] for the sources at hand, {name: why} for those the registry refused).

    A source skipped by the last build whose registry does not answer now stays skipped (the build is
    kept: an offline re-run finishes); any other unanswered question fails the stage."""
    present, skipped = [], {}
    for s in selected:
        try:
            present.append((s, fetch(s.package)))  # from the package cache after the first run
        except PackageUnavailable as e:
            skipped[s.name] = e.reason
            warn(f"{e.reason}: corpus source {s.name} is skipped")
        except IndexUnreachable as e:
            if s.name not in skipped_before:
                raise
            skipped[s.name] = skipped_before[s.name]
            warn(f"corpus source {s.name} stays skipped: {e}")
    return present, skipped


def build_corpus(
    tiers: list[str], shard_chars: int, out: str, sources: list[Source] | None = None
) -> dict:
    """Build (or find cached) the sample corpus in `out`; returns its manifest."""
    selected = sources if sources is not None else sources_for(tiers)
    if not selected:
        raise UserError(f"no corpus sources in tiers {tiers}; choose from lit, docs, ref")
    start = time.perf_counter()
    present, skipped = _available(selected, (_read_manifest(out) or {}).get("skipped", {}))
    tiers_left = {s.tier for s, _ in present}
    if lost := sorted({s.tier for s in selected} - tiers_left):
        raise UserError(f"no text for tier {', '.join(lost)}: {'; '.join(skipped.values())}; "
                        "choose other tiers with --tiers, or put the archives into the package cache by hand")
    key = _key([s.name for s, _ in present], shard_chars, [a.name for _, a in present])
    cached = _cached_manifest(out, key)
    if cached is not None:
        return {**cached, "cached": True, "build_seconds": round(time.perf_counter() - start, 2)}
    loaded = [(s, *source_documents(s)) for s, _ in present]

    # A rebuild first drops the old manifest, so a crash halfway is never mistaken for a finished build.
    storage.remove(join(out, MANIFEST))
    docs = [d for _, source_docs, _ in loaded for d in source_docs]
    random.Random(SHUFFLE_SEED).shuffle(docs)
    urls = shards.write_shards(docs, out, shard_chars)
    for name in storage.listdir(out):  # shards of an earlier, larger build would pose as val
        index = shards.shard_index(name)
        if index is not None and index >= len(urls):
            storage.remove(join(out, name))

    manifest = {
        "version": CORPUS_VERSION,
        "key": key,
        "tiers": sorted({s.tier for s, _ in present}),
        "shard_chars": shard_chars,
        "shuffle_seed": SHUFFLE_SEED,
        "total_docs": len(docs),
        "total_chars": sum(map(len, docs)),
        "num_shards": len(urls),
        "val_shard": shards.shard_name(len(urls) - 1),
        "sources": [
            {
                "name": s.name,
                "tier": s.tier,
                "package": s.package.kind + ":" + s.package.name,
                "package_file": archive.name,
                "license": s.license,
                "docs": len(source_docs),
                "chars": sum(map(len, source_docs)),
            }
            for s, source_docs, archive in loaded
        ],
        "skipped": skipped,
        "shards": [
            {
                "index": i,
                "file": shards.shard_name(i),
                "rows": shards.shard_rows(url),
                "bytes": storage.size(url),
                "sha256": storage.sha256(url),
            }
            for i, url in enumerate(urls)
        ],
    }
    storage.write_text(join(out, MANIFEST), json.dumps(manifest, indent=1) + "\n")
    return {**manifest, "cached": False, "build_seconds": round(time.perf_counter() - start, 2)}
