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
from nanochat_core.data import shards, user_files
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


def _cached_manifest(out: str, key: str) -> dict | None:
    """The existing manifest if it describes this exact build and every shard is still there."""
    manifest = storage.read_json(join(out, MANIFEST))
    if manifest is None or manifest.get("key") != key:
        return None
    for entry in manifest["shards"]:
        shard = join(out, entry["file"])
        if not storage.exists(shard) or storage.size(shard) != entry["bytes"]:
            return None
    return manifest


def _shard_entries(urls: list[str]) -> list[dict]:
    """The manifest's record of each shard written: its index, file name, rows, bytes and digest."""
    return [{"index": i, "file": shards.shard_name(i), "rows": shards.shard_rows(url), "bytes": storage.size(url),
             "sha256": storage.sha256(url)} for i, url in enumerate(urls)]


def _publish(out: str, manifest: dict, start: float) -> dict:
    """Write the manifest last (a build without one is unfinished) and return it with the build's figures."""
    storage.write_text(join(out, MANIFEST), json.dumps(manifest, indent=1) + "\n")
    return {**manifest, "cached": False, "build_seconds": round(time.perf_counter() - start, 2)}


def _drop_shards_from(out: str, count: int) -> None:
    """Remove shards numbered `count` and up: those of an earlier, larger build would pose as val."""
    for name in storage.listdir(out):
        index = shards.shard_index(name)
        if index is not None and index >= count:
            storage.remove(join(out, name))


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


def _tier_sources(selected: list[Source], out: str) -> tuple[list[tuple[Source, Path]], dict[str, str]]:
    """`_available`, failing when a whole tier is gone (a tier asked for must hold some text)."""
    present, skipped = _available(selected, (storage.read_json(join(out, MANIFEST)) or {}).get("skipped", {}))
    if lost := sorted({s.tier for s in selected} - {s.tier for s, _ in present}):
        raise UserError(f"no text for tier {', '.join(lost)}: {'; '.join(skipped.values())}; "
                        "choose other tiers with --tiers, or put the archives into the package cache by hand")
    return present, skipped


def _source_entry(s: Source, docs: list[str], archive: Path) -> dict:
    """The manifest's record of one packaged source: where its text came from, under what license."""
    return {"name": s.name, "tier": s.tier, "package": s.package.kind + ":" + s.package.name,
            "package_file": archive.name, "license": s.license, "docs": len(docs), "chars": sum(map(len, docs))}


def build_corpus(
    tiers: list[str], shard_chars: int, out: str, sources: list[Source] | None = None
) -> dict:
    """Build (or find cached) the sample corpus in `out`; returns its manifest."""
    selected = sources if sources is not None else sources_for(tiers)
    if not selected:
        raise UserError(f"no corpus sources in tiers {tiers}; choose from lit, docs, ref")
    start = time.perf_counter()
    present, skipped = _tier_sources(selected, out)
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
    _drop_shards_from(out, len(urls))

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
        "sources": [_source_entry(s, source_docs, archive) for s, source_docs, archive in loaded],
        "skipped": skipped,
        "shards": _shard_entries(urls),
    }
    return _publish(out, manifest, start)


def files_key(files: list, text_field: str, shard_chars: int, packaged: list[str] = ()) -> str:
    """The key of a corpus built from files: each file's path, size and version from the listing, so a
    re-run decides without reading gigabytes (digests go in the manifest, not the key), and the package
    files of any tiers added to them."""
    blob = json.dumps([CORPUS_VERSION, "files", user_files.listing_key(files), text_field, shard_chars,
                       *([list(packaged)] if packaged else [])])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_from_files(specs: list[str], text_field: str, shard_chars: int, out: str, tiers: list[str] = ()) -> dict:
    """Build (or find cached) a corpus from the user's files in `out`, with the packaged `tiers` first if
    any are given; returns its manifest.

    Documents go into the shards in file order, unshuffled: a global shuffle would hold the whole
    input in memory. The val shard is therefore the last documents of the last files."""
    start = time.perf_counter()
    files = user_files.list_files(specs)
    present, skipped_sources = _tier_sources(sources_for(list(tiers)), out) if tiers else ([], {})
    key = files_key(files, text_field, shard_chars, [f"{s.name}:{a.name}" for s, a in present])
    cached = _cached_manifest(out, key)
    if cached is not None:
        return {**cached, "cached": True, "build_seconds": round(time.perf_counter() - start, 2)}
    storage.remove(join(out, MANIFEST))
    read, skipped, packaged = [], [], []

    def documents():
        for s, archive in present:  # the sample's few MB: shuffled as the sample corpus is
            docs = source_documents(s)[0]
            packaged.append(_source_entry(s, docs, archive))
            yield from random.Random(SHUFFLE_SEED).sample(docs, len(docs))
        for f in files:
            if reason := user_files.skip_reason(f):
                skipped.append({"file": f.url, "bytes": f.size, "reason": reason})
                continue
            stats, error = user_files.FileStats(), None
            try:
                yield from user_files.read_documents(f, text_field, stats)
            except user_files.Skip as e:
                skipped.append({"file": f.url, "bytes": f.size, "reason": e.reason})
                continue
            except user_files.UNREADABLE as e:  # a truncated or corrupt archive: what came before it stays
                error = f"unreadable after {stats.docs} documents ({type(e).__name__}: {e})"
            entry = {"file": f.url, "bytes": f.size, "version": f.version, "sha256": stats.sha256,
                     "docs": stats.docs, "chars": stats.chars, "dropped_lines": stats.dropped}
            if error:
                entry["error"] = error
            if stats.docs == 0:
                skipped.append({**entry, "reason": error or "no documents" + (f" ({stats.dropped})" if stats.dropped else "")})
            else:
                read.append(entry)

    urls = shards.write_shards(documents(), out, shard_chars)
    if len(urls) == 1:
        urls = _split_in_two(urls[0], out)
    _drop_shards_from(out, len(urls))
    manifest = {
        "version": CORPUS_VERSION,
        "key": key,
        "from": list(specs),
        "text_field": text_field,
        "tiers": sorted({s.tier for s, _ in present}),
        "shard_chars": shard_chars,
        "shuffle_seed": None,
        "note": "documents in file order, not shuffled (memory stays flat); the val shard holds the last documents",
        "total_docs": sum(e["docs"] for e in read + packaged),
        "total_chars": sum(e["chars"] for e in read + packaged),
        "num_shards": len(urls),
        "val_shard": shards.shard_name(len(urls) - 1),
        "files": read,
        "sources": packaged,
        "skipped": skipped_sources,
        "skipped_files": skipped,
        "shards": _shard_entries(urls),
    }
    return _publish(out, manifest, start)


def _split_in_two(url: str, out: str) -> list[str]:
    """An input smaller than a shard made one shard; the corpus needs a training shard and the val shard,
    so its documents are cut in two by characters (the later half is val)."""
    docs = pq.read_table(url).column("text").to_pylist()
    if len(docs) < 2:
        raise UserError(f"the --from files gave {len(docs)} document(s); a corpus needs at least 2 (a training "
                        "and a val shard): add text, or see the manifest's skipped_files for what was left out")
    total, chars, cut = sum(map(len, docs)), 0, 1
    for cut, doc in enumerate(docs[:-1], 1):
        chars += len(doc)
        if chars >= total / 2:
            break
    urls = [join(out, shards.shard_name(0)), join(out, shards.shard_name(1))]
    shards.write_shard(docs[:cut], urls[0])
    shards.write_shard(docs[cut:], urls[1])
    return urls
