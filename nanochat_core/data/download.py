"""Fetching pretraining shards through fsspec: https, s3:// (s3fs) or local paths alike.

A source is a URL template with `{index}` (`.../shard_{index:05d}.parquet`). Each shard is streamed
to a temp file, verified (size and, where the source offers one, checksum; parquet footer and row
count readable) and only then renamed to its canonical name, so a crash or a kill never leaves a
file that `list_shards` would read as a shard. Transient failures are retried with backoff; a shard
already present and valid is skipped; a missing source is one clear error naming the URL.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, TypeVar

import tenacity
from tqdm.auto import tqdm

from nanochat_core import storage
from nanochat_core.config import FINEWEB_EDU_URL
from nanochat_core.data.shards import shard_name, shard_problem, shard_rows
from nanochat_core.errors import UserError
from nanochat_core.paths import join

FINEWEB_EDU_VAL_INDEX = 1822  # shards 00000-01822; the last one is nanochat's validation shard
MANIFEST = "manifest.json"
RETRIES = 5
BACKOFF_SECONDS = 0.5  # doubled after each failed attempt, plus up to this much jitter
CHUNK = 1 << 20


T = TypeVar("T")


class ShardInvalid(Exception):
    """A fetched file is not the shard the source holds (truncated, corrupt, wrong checksum)."""

    def __init__(self, message: str, at_source: bool = True):
        super().__init__(message)
        # False when the bytes differ from what the source announced (a cut transfer): the network's fault.
        # True when all the announced bytes arrived and they are bad: retrying fetches the same bad file.
        self.at_source = at_source


def resolve_template(source: str) -> str:
    """A URL template with `{index}`; a directory (no `{index}`) means its canonical shard names."""
    if "{index" not in source:
        if source.endswith(".parquet") or source.startswith(("http://", "https://")):
            # One file or a URL cannot be listed as a directory of shards: the user forgot {index}.
            raise UserError(f"--url-template {source!r} has no {{index}}; write e.g. "
                            ".../shard_{index:05d}.parquet, or name a directory of shard_NNNNN.parquet files")
        source = join(source, "shard_{index:05d}.parquet")
    if "://" not in source:
        source = os.path.abspath(os.path.expanduser(source))
    try:
        source.format(index=0)
    except (KeyError, IndexError, ValueError):
        raise UserError(
            f"source {source!r} is not a URL template with only {{index}} in it; "
            "write e.g. s3://bucket/prefix/shard_{index:05d}.parquet"
        ) from None
    return source


def find_val_index(template: str) -> int:
    """The highest shard index at the source: by listing for local and object-store sources."""
    if template == FINEWEB_EDU_URL:
        return FINEWEB_EDU_VAL_INDEX
    if template.startswith(("http://", "https://")):
        raise UserError(f"cannot list shards at {template}; pass --val-index with the last shard's index")
    parent, _, pattern = template.rpartition("/")
    name_re = re.compile(
        "^" + re.sub(r"\\\{index[^}]*\\\}", r"(\\d+)", re.escape(pattern)) + "$"
    )
    fs, path = storage.filesystem(parent)
    fs.invalidate_cache(path)  # a listing cached earlier in this process may predate new shards
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        raise UserError(f"source {parent} does not exist; check --url-template (bucket, prefix or path)") from None
    except PermissionError as e:
        raise UserError(f"source {parent} cannot be listed ({e}); check credentials or pass --val-index") from None
    indices = [int(m.group(1)) for n in names if (m := name_re.match(n.rstrip("/").rsplit("/", 1)[-1]))]
    if not indices:
        raise UserError(f"no files matching {pattern} in {parent}; check --url-template")
    return max(indices)


def source_checksums(template: str) -> dict[int, str]:
    """sha256 per index from the sample corpus's manifest.json next to the source shards, if any."""
    parent = template.rpartition("/")[0]
    try:
        manifest = json.loads(storage.read_text(join(parent, MANIFEST)))
        return {int(s["index"]): s["sha256"] for s in manifest.get("shards", [])}
    except Exception:  # no manifest, or not ours: checksums are a bonus, sizes still verify
        return {}


@dataclass
class Expected:
    """What the source says about a shard: its size, a checksum from the corpus manifest (sha256,
    authoritative), and a digest-looking ETag (a hint: see `verify`)."""

    size: int | None = None
    sha256: str | None = None
    etag: str | None = None
    etag_mismatch: str | None = None  # sha256 of an earlier download whose digest differed from the ETag

    def etag_matches(self, sha256: str, md5: str) -> bool:
        return self.etag is None or self.etag in (sha256, md5)


def stat_source(url: str, checksums: dict[int, str], index: int) -> Expected:
    fs, path = storage.filesystem(url)
    try:
        info = fs.info(path)
    except FileNotFoundError as e:
        # fsspec's http `info` reports any failed HEAD/GET as FileNotFoundError: only a 404/410 is.
        status = getattr(e.__cause__, "status", None)
        if url.startswith(("http://", "https://")) and status not in (404, 410):
            raise ConnectionError(f"{url}: {e.__cause__ or e}") from e
        raise
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"').lower()
    # An S3 single-part upload's ETag is its MD5; LFS-backed https hosts send the sha256.
    digest_like = re.fullmatch(r"[0-9a-f]{32}|[0-9a-f]{64}", etag) is not None
    return Expected(size=info.get("size"), sha256=checksums.get(index), etag=etag if digest_like else None)


def verify(path: str, sha256: str, md5: str, exp: Expected) -> int:
    """Check a downloaded file against the source's figures and parquet's footer; returns its rows.

    An ETag that looks like a digest usually is one, but not always (S3 objects encrypted with
    SSE-KMS have opaque 32-hex ETags). So a mismatch is retried, and only a download that differs
    from the previous one is called corrupt: the same bytes twice mean the ETag is no digest.
    """
    size = os.path.getsize(path)
    if exp.size is not None and size != exp.size:
        raise ShardInvalid(f"got {size} bytes, the source has {exp.size}", at_source=False)
    if exp.sha256 and sha256 != exp.sha256:
        raise ShardInvalid(f"sha256 {sha256} does not match the source's {exp.sha256}")
    if not exp.etag_matches(sha256, md5) and exp.etag_mismatch != sha256:
        exp.etag_mismatch = sha256
        raise ShardInvalid(f"content digest does not match the source's ETag {exp.etag}", at_source=False)
    # The file was just written here, so its row groups come from the page cache, not the network:
    # decoding every one now is what lets tok_train and base_train trust an accepted shard.
    problem = shard_problem(path)
    if problem:
        raise ShardInvalid(problem)
    return shard_rows(path)


def present_and_valid(dest: str, prior: dict | None, exp: Expected | None) -> dict | None:
    """The manifest entry for a shard already at `dest` if it is intact, else None (fetch it again)."""
    if not storage.exists(dest):
        return None
    try:
        size = storage.size(dest)
        rows = shard_rows(dest)
    except (UserError, OSError):
        return None
    if prior and (prior["bytes"], prior["rows"]) == (size, rows):
        if exp is None or exp.size in (None, size):
            return prior
    if exp is not None and exp.size is not None and exp.size != size:
        return None
    sha, md5 = _digests(dest)
    if exp is not None and ((exp.sha256 and exp.sha256 != sha) or not exp.etag_matches(sha, md5)):
        return None
    return {"bytes": size, "rows": rows, "sha256": sha}


def _digests(url: str) -> tuple[str, str]:
    """(sha256, md5) of a file in one read: sha256 for our manifest, md5 to compare with S3 ETags."""
    fs, path = storage.filesystem(url)
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with fs.open(path, "rb") as f:
        while block := f.read(CHUNK):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def fetch_one(url: str, dest: str, exp: Expected, on_bytes: Callable[[int], None]) -> dict:
    """Stream `url` to a temp file, verify it, publish it as `dest`; returns its manifest entry."""
    fs, path = storage.filesystem(url)
    tmp = storage.local_temp_for(dest)
    sha, md5, done = hashlib.sha256(), hashlib.md5(), 0
    try:
        with fs.open(path, "rb", block_size=4 * CHUNK) as src, open(tmp, "wb") as out:
            while block := src.read(CHUNK):
                out.write(block)
                sha.update(block)
                md5.update(block)
                done += len(block)
                on_bytes(len(block))
            out.flush()
            os.fsync(out.fileno())
        rows = verify(tmp, sha.hexdigest(), md5.hexdigest(), exp)
        storage.publish_file(tmp, dest)
        return {"bytes": done, "rows": rows, "sha256": sha.hexdigest()}
    except BaseException:
        on_bytes(-done)  # the retry starts this shard over
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def transient(e: BaseException) -> bool:
    """Network resets, 5xx, throttling, truncated or mismatched transfers: worth another attempt.
    A missing or unreadable file, a user error or Ctrl-C is final."""
    return isinstance(e, Exception) and not isinstance(e, (FileNotFoundError, PermissionError, UserError))


def with_retries(what: str, fn: Callable[[], T], retries: int | None = None) -> T:
    """Run `fn`, retrying transient failures with exponential backoff; a missing file is final."""
    retries = retries or RETRIES
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(transient),
        stop=tenacity.stop_after_attempt(retries),
        wait=tenacity.wait_exponential_jitter(multiplier=BACKOFF_SECONDS, jitter=BACKOFF_SECONDS),
        reraise=True,
    )
    try:
        return retrying(fn)
    except FileNotFoundError:
        raise UserError(f"{what} does not exist; check --url-template and --val-index") from None
    except PermissionError as e:
        raise UserError(f"{what} is not readable ({e}); check credentials or anonymous access") from None
    except UserError:
        raise
    except ShardInvalid as e:
        if not e.at_source:
            raise UserError(f"fetching {what} failed after {retries} attempts (last: {e}); rerun `nanochat "
                            "download` later, shards already fetched are kept") from None
        # All the bytes the source announced, bad every time: the fault is at the source.
        raise UserError(f"{what} is not a usable shard at the source ({e}, in {retries} downloads); "
                        "repair or replace the source file, or point --url-template at another copy") from None
    except Exception as e:  # the last transient failure, `retries` attempts in
        raise UserError(
            f"fetching {what} failed after {retries} attempts (last: {type(e).__name__}: {e}); "
            "rerun `nanochat download` later, shards already fetched are kept"
        ) from None


def download_shards(
    template: str,
    indices: list[int],
    dest_dir: str,
    workers: int = 4,
    val_index: int | None = None,
    progress: bool = True,
) -> dict:
    """Fetch `indices` from `template` into `dest_dir`; returns (and writes) the download manifest."""
    storage.makedirs(dest_dir)
    removed = storage.remove_stale_temps(dest_dir)
    manifest_url = join(dest_dir, MANIFEST)
    prior_manifest = storage.read_json(manifest_url) or {}  # one cut short: every shard is checked again
    prior = {e["index"]: e for e in prior_manifest.get("shards", [])}
    if prior_manifest.get("source") != template:
        # Shards from another source would mix into this one (and its val shard could outrank
        # ours): drop those this run does not replace; the rest are re-checked against the new source.
        for i, e in prior.items():
            if i not in indices:
                storage.remove(join(dest_dir, e["file"]))
        prior = {}
    checksums = source_checksums(template) if not template.startswith(("http://", "https://")) else {}

    start = time.perf_counter()
    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="shards 0/%d" % len(indices),
               disable=not progress, mininterval=0.5)
    fetched_bytes = [0]

    lock = threading.Lock()

    def on_bytes(n: int) -> None:
        with lock:
            fetched_bytes[0] += n
            bar.update(n)

    def one(index: int) -> tuple[dict, bool]:
        url = template.format(index=index)
        dest = join(dest_dir, shard_name(index))
        entry = present_and_valid(dest, prior.get(index), None) if index in prior else None
        if entry is not None:
            return entry, False
        exp = with_retries(url, lambda: stat_source(url, checksums, index))
        if exp.size:
            with lock:
                bar.total += exp.size
                bar.refresh()
        entry = present_and_valid(dest, None, exp)
        if entry is not None:
            return entry, False
        return with_retries(url, lambda: fetch_one(url, dest, exp, on_bytes)), True

    results: dict[int, dict] = {}
    fetched = 0
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(one, i): i for i in indices}
            errors: list[Exception] = []
            try:
                # A failed shard does not stop the others: fetch all that can be, then report.
                for n, fut in enumerate(as_completed(futures), 1):
                    i = futures[fut]
                    try:
                        entry, was_fetched = fut.result()
                    except Exception as e:
                        errors.append(e)
                        continue
                    results[i] = {"index": i, "file": shard_name(i), "source_url": template.format(index=i),
                                  **{k: entry[k] for k in ("bytes", "rows", "sha256")}}
                    fetched += was_fetched
                    bar.set_description(f"shards {n}/{len(indices)}")
            except BaseException:  # Ctrl-C: stop queued shards; running ones finish their temp files
                for f in futures:
                    f.cancel()
                raise
            finally:
                bar.close()
            if errors:
                raise errors[0]
    finally:
        # Written even when a shard failed, so a rerun skips what did arrive without re-hashing it.
        manifest = _write_manifest(manifest_url, template, results, prior, dest_dir, val_index)
    seconds = time.perf_counter() - start
    return {
        **manifest,
        "fetched": fetched,
        "skipped": len(indices) - fetched,
        "fetched_bytes": fetched_bytes[0],
        "seconds": round(seconds, 3),
        "stale_temps_removed": removed,
    }


def _write_manifest(url: str, template: str, results: dict[int, dict], prior: dict[int, dict],
                    dest_dir: str, val_index: int | None) -> dict:
    """The download manifest: one entry per shard in the directory, and a digest over them all."""
    entries = dict(results)
    for i, e in prior.items():  # shards of an earlier, larger -n from the same source stay listed
        if i not in entries and storage.exists(join(dest_dir, e["file"])):
            entries[i] = e
    if not entries:
        return {"source": template, "val_index": val_index, "digest": None, "shards": []}
    val = val_index if val_index is not None else max(entries)
    shards = [{**entries[i], "split": "val" if i == val else "train"} for i in sorted(entries)]
    digest = hashlib.sha256(json.dumps([(e["index"], e["sha256"]) for e in shards]).encode()).hexdigest()
    manifest = {"source": template, "val_index": val, "digest": digest, "shards": shards}
    storage.write_text(url, json.dumps(manifest, indent=1) + "\n")
    return manifest
