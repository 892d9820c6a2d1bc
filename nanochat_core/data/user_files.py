"""A user's own files as corpus documents: listing `--from` specs and streaming each file's documents.

    files, skipped = list_files(["~/zh/", "s3://me/zh/*.jsonl.zst", "https://host/a.txt"])
    for doc in read_documents(files[0], text_field="text", stats=stats): ...

A spec is a path, a glob or an fsspec URL; a directory is read recursively; `https://` takes explicit
file URLs only (a web server has no listing to glob). Formats go by the name: `.txt`/`.md` (split into
documents the way the sample corpus splits its texts, `textconv.split_document`, so no document is
longer than its MAX_DOC_CHARS cap), `.jsonl`/`.json` (one JSON object per line, the text in
`text_field`; a `.json` that is one array is read whole), `.parquet` (the `text_field` column), each
also as `.gz` or `.zst`. Everything streams: a file is read line by line (parquet: batch by batch), so
memory stays flat in the input size. A line that is not UTF-8 or not JSON is dropped and counted; a
file that is empty, binary or of another type is skipped with the reason, never a crash.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import zlib
from dataclasses import dataclass, field
from typing import IO, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat_core import storage
from nanochat_core.data import textconv
from nanochat_core.errors import UserError

TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
COMPRESSED = (".gz", ".zst")
# A text file is flushed into documents at the first blank line past this many characters: paragraphs
# are never cut, and a 1 GB file holds at most this much (plus one paragraph) in memory at a time.
TEXT_BUFFER_CHARS = 64 * 1024
# NUL bytes in the first 8 KiB mark a binary file, the test git and grep use.
SNIFF_BYTES = 8192
# What a truncated or corrupt .gz / .zst / .parquet raises while it is read.
UNREADABLE = (OSError, EOFError, pa.ArrowInvalid, zlib.error)


@dataclass
class SourceFile:
    """One file a spec listed: its URL, and size and version (ETag or mtime) from the listing."""

    url: str
    size: int
    version: str


@dataclass
class FileStats:
    """What reading one file gave: documents, characters, and the lines dropped, by reason."""

    docs: int = 0
    chars: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    sha256: str = ""

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def _format(url: str) -> tuple[str | None, str | None]:
    """(format, compression) from the name: ('text'|'json'|'parquet'|None, '.gz'|'.zst'|None)."""
    name = url.rsplit("/", 1)[-1].lower()
    compression = next((c for c in COMPRESSED if name.endswith(c)), None)
    if compression:
        name = name[: -len(compression)]
    if name.endswith(TEXT_SUFFIXES):
        return "text", compression
    if name.endswith(JSON_SUFFIXES):
        return "json", compression
    if name.endswith(".parquet"):
        return "parquet", compression
    return None, compression


def _version(info: dict) -> str:
    for k in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(k) is not None:
            return str(info[k]).strip('"')
    return ""


def list_files(specs: list[str]) -> list[SourceFile]:
    """Every file the specs name, in sorted order per spec, each once; a spec that matches nothing is an error."""
    found: dict[str, SourceFile] = {}
    for spec in specs:
        if spec.startswith(("http://", "https://")):
            if any(c in spec for c in "*?["):
                raise UserError(f"--from {spec}: an https:// source has no listing to glob; name each file")
            fs, path = storage.filesystem(spec)
            try:
                info = fs.info(spec)
            except FileNotFoundError as e:
                # fsspec reports every failed HEAD and GET so; only a 404 or 410 says the file is not there.
                why = e.__cause__
                if why is None or getattr(why, "status", None) in (404, 410):
                    raise UserError(f"--from {spec}: no such file at that URL") from None
                raise UserError(f"--from {spec}: cannot read it ({str(why).splitlines()[0]}); check the URL and "
                                "the network, and for a server with a private CA point SSL_CERT_FILE at its "
                                "certificate") from None
            found[spec] = SourceFile(spec, int(info.get("size") or 0), _version(info))
            continue
        fs, path = storage.filesystem(spec)
        if not storage.is_local(spec):
            fs.invalidate_cache()
        if any(c in path for c in "*?["):
            entries = fs.glob(path, detail=True)
        elif fs.isdir(path):
            entries = fs.find(path, detail=True)
        elif fs.exists(path):
            entries = {path: fs.info(path)}
        else:
            raise UserError(f"--from {spec}: no such file or directory; check the path, bucket or glob")
        files = {p: i for p, i in entries.items() if i.get("type") != "directory"}
        if not files:
            raise UserError(f"--from {spec}: matched no files")
        for p in sorted(files):
            url = fs.unstrip_protocol(p) if not storage.is_local(spec) else p
            found.setdefault(url, SourceFile(url, int(files[p].get("size") or 0), _version(files[p])))
    return list(found.values())


def listing_key(files: list[SourceFile]) -> list[list]:
    """What a cache key needs of the files: path, size and version from the listing (no content read)."""
    return [[f.url, f.size, f.version] for f in files]


class _Hashing(io.RawIOBase):
    """A raw stream that hashes the bytes read through it: the digest comes with the one read."""

    def __init__(self, f: IO[bytes]):
        self.f, self.h = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        self.h.update(data)
        b[: len(data)] = data
        return len(data)


def skip_reason(source: SourceFile) -> str | None:
    """Why the file cannot be read as documents (from its name, size and first bytes), or None."""
    kind, compression = _format(source.url)
    if kind is None:
        return "unsupported type (read are .txt, .md, .jsonl, .json and .parquet, also as .gz or .zst)"
    if source.size == 0:
        return "empty file"
    if kind == "parquet" or compression:
        return None
    fs, path = storage.filesystem(source.url)
    with fs.open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if b"\x00" in head:
        return "binary (NUL bytes in the first 8 KiB)"
    return None


def read_documents(source: SourceFile, text_field: str, stats: FileStats) -> Iterator[str]:
    """The file's documents, streamed; `stats` counts them and the dropped lines, and gets the digest."""
    kind, compression = _format(source.url)
    fs, path = storage.filesystem(source.url)
    if kind == "parquet" and not compression:
        yield from _parquet_docs(source.url, fs.open(path, "rb"), text_field, stats)
        stats.sha256 = storage.sha256(source.url)  # parquet is read by row group, not in order: hash apart
        return
    with fs.open(path, "rb") as raw:
        hashed = _Hashing(raw)
        stream: IO[bytes] = io.BufferedReader(hashed, 1 << 20)
        if compression == ".gz":
            stream = gzip.GzipFile(fileobj=stream)
        elif compression == ".zst":
            stream = io.BufferedReader(pa.CompressedInputStream(pa.PythonFile(stream, mode="r"), "zstd"), 1 << 20)
        try:
            if kind == "text":
                yield from _text_docs(stream, stats)
            elif kind == "json":
                yield from _json_docs(stream, text_field, stats)
            else:  # parquet.gz / .zst: parquet needs random access, so it is read whole here
                yield from _parquet_docs(source.url, io.BytesIO(stream.read()), text_field, stats)
        finally:
            while hashed.read(1 << 20):  # the digest covers the whole file even when reading stopped early
                pass
            stats.sha256 = hashed.h.hexdigest()


def _lines(stream: IO[bytes], stats: FileStats) -> Iterator[str]:
    for raw in stream:
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.drop("not UTF-8")


def _emit(doc: str, stats: FileStats) -> Iterator[str]:
    stats.docs += 1
    stats.chars += len(doc)
    yield doc


def _text_docs(stream: IO[bytes], stats: FileStats) -> Iterator[str]:
    buffer: list[str] = []
    size = 0
    for line in _lines(stream, stats):
        buffer.append(line)
        size += len(line)
        if size >= TEXT_BUFFER_CHARS and not line.strip():
            for doc in textconv.split_document("".join(buffer)):
                yield from _emit(doc, stats)
            buffer, size = [], 0
    for doc in textconv.split_document("".join(buffer)):
        yield from _emit(doc, stats)


def _text_of(obj, text_field: str, stats: FileStats) -> str | None:
    text = obj.get(text_field) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        stats.drop(f"no string field {text_field!r}")
        return None
    return text if text.strip() else None


def _json_docs(stream: IO[bytes], text_field: str, stats: FileStats) -> Iterator[str]:
    first = True
    for line in _lines(stream, stats):
        if first and line.lstrip().startswith("["):
            # One JSON array: it has no line structure to stream by, so it is read whole.
            try:
                items = json.loads(line + b"".join(stream).decode("utf-8", errors="strict"))
            except (ValueError, UnicodeDecodeError):
                stats.drop("not JSON")
                return
            for obj in items:
                if (text := _text_of(obj, text_field, stats)) is not None:
                    yield from _emit(text, stats)
            return
        first = False
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            stats.drop("not JSON")
            continue
        if (text := _text_of(obj, text_field, stats)) is not None:
            yield from _emit(text, stats)


def _parquet_docs(url: str, f: IO[bytes], text_field: str, stats: FileStats) -> Iterator[str]:
    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowInvalid, OSError) as e:
        raise Skip(f"not a readable parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise Skip(f"no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield from _emit(text, stats)


class Skip(Exception):
    """A file found unreadable only once opened (a parquet file without the column): skipped, with why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason

