"""Artifacts by path or fsspec URL, with atomic writes.

Every stage reads and writes through here, so an artifact root on `s3://` behaves like a local one.
A write goes to a temporary file and is published under its name only when complete: locally the
temp sits next to the target and `os.replace` moves it in (atomic on POSIX); for object stores the
temp is a local file uploaded with one `put` (a single PUT or a multipart upload that the store
completes only at the end), so a crash never leaves a half object that a later stage would trust.

A remote file read whole, again and again (a training shard), is fetched once per node into a local
cache and read from there (`local_copy`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import tempfile
import uuid
from typing import IO, Iterator

import fsspec
from filelock import FileLock
from fsspec.core import url_to_fs

# Temp names carry the writer's pid, so a rerun can tell a dead writer's leftovers from a live one's.
TEMP_MARK = ".tmp-"
_TEMP_RE = re.compile(r"\.tmp-(\d+)-[0-9a-f]{8}$")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or an fsspec URL."""
    return url_to_fs(url)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """A local path or file:// URL as a plain path."""
    return url[len("file://"):] if url.startswith("file://") else url


def _fresh(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and path with any cached listing dropped: another process may have written since."""
    fs, path = filesystem(url)
    if not is_local(url):
        fs.invalidate_cache(path)
    return fs, path


def exists(url: str) -> bool:
    fs, path = _fresh(url)
    return fs.exists(path)


def size(url: str) -> int:
    fs, path = _fresh(url)
    return int(fs.size(path))


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def check_writable(url: str) -> None:
    """A UserError unless files can be written at `url`, checked before a stage spends any work (tok_train
    once trained for minutes and then failed to save). Locally a probe file in the nearest existing
    directory, so nothing is left behind (root passes os.access even where the kernel refuses, /proc);
    on an object store a probe object written and removed, which also proves the credentials and endpoint."""
    from nanochat_core.errors import UserError

    try:
        if is_local(url):
            existing = os.path.abspath(local_path(url))
            while not os.path.exists(existing):
                existing = os.path.dirname(existing)
            if not os.path.isdir(existing):
                raise UserError(f"cannot write to {url}: {existing} is a file, not a directory; "
                                "choose another location (NANOCHAT_BASE_DIR or --out)")
            with tempfile.NamedTemporaryFile(dir=existing, prefix=TEMP_MARK):
                pass
        else:
            probe = url.rstrip("/") + f"/{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            fs, path = filesystem(probe)
            fs.pipe_file(path, b"")
            fs.rm_file(path)
    except OSError as e:
        raise UserError(f"cannot write to {url} ({e.strerror or e}); choose a location you can write "
                        "(NANOCHAT_BASE_DIR or --out)") from None


def listdir(url: str) -> list[str]:
    """Base names in a directory, sorted; empty if it does not exist."""
    fs, path = _fresh(url)
    try:
        entries = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in entries)


def file_sizes(url: str) -> dict[str, int]:
    """{base name: size} of the files directly in a directory, from one listing; empty if it does not exist."""
    fs, path = _fresh(url)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries if e.get("type") == "file"}


def object_tags(url: str) -> dict[str, dict]:
    """{relative path: {size, etag}} of every file below a directory on an object store, from one
    recursive listing (the store sends each object's ETag with it, no body is read); {} on a local disk
    or where the store gives no ETag."""
    if is_local(url):
        return {}
    fs, path = _fresh(url)
    root = path.rstrip("/") + "/"
    try:
        entries = fs.find(path, detail=True)
    except FileNotFoundError:
        return {}
    tags = {}
    for name, info in entries.items():
        etag = info.get("ETag") or info.get("etag")
        if name.startswith(root) and etag:
            tags[name[len(root):]] = {"size": int(info.get("size") or 0), "etag": str(etag).strip('"')}
    return tags


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_json(url: str):
    """The JSON document at `url`; None when there is none or it does not parse (a write cut short, a
    stranger's file): a manifest or record read this way counts as absent, and what it described is
    checked or built again."""
    if not exists(url):
        return None
    try:
        return json.loads(read_text(url))
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError from bytes that are no text at all
        return None


def temp_name(path: str) -> str:
    return f"{path}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[IO]:
    """Open `url` for writing; the content becomes visible under `url` only if the block succeeds."""
    assert mode in ("wb", "w"), "atomic_open is for writing"
    encoding = "utf-8" if mode == "w" else None
    tmp = local_temp_for(url)
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        publish_file(tmp, url)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def publish_file(tmp: str, url: str) -> None:
    """Move a finished local temp file to `url` in one step (local rename, or one upload)."""
    if is_local(url):
        os.replace(tmp, local_path(url))
        return
    fs, path = filesystem(url)
    fs.put_file(tmp, path)
    fs.invalidate_cache(path)
    os.remove(tmp)


def local_temp_for(url: str) -> str:
    """A temp path to write `url`'s content to before `publish_file`: beside it when local (same
    filesystem, so the rename is atomic), in the system temp dir when remote."""
    if is_local(url):
        path = local_path(url)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return temp_name(path)
    fd, tmp = tempfile.mkstemp(prefix="nanochat-upload-")
    os.close(fd)
    return tmp


def write_bytes(url: str, data: bytes) -> None:
    with atomic_open(url, "wb") as f:
        f.write(data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def remove(url: str, recursive: bool = False) -> None:
    fs, path = _fresh(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def rename(src: str, dst: str) -> None:
    """Move `src` to `dst`; locally an atomic `os.replace` (files), on object stores copy + delete."""
    if is_local(src) and is_local(dst):
        os.makedirs(os.path.dirname(os.path.abspath(local_path(dst))), exist_ok=True)
        os.replace(local_path(src), local_path(dst))
        return
    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    fs.mv(src_path, dst_path, recursive=True)


def copy(src: str, dst: str) -> None:
    """Copy a file or a directory tree within one filesystem (server-side on object stores)."""
    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    fs.copy(src_path, dst_path, recursive=True)
    if not is_local(dst):
        fs.invalidate_cache(dst_path)


def local_copy(url: str, cache_dir: str) -> str:
    """A local path with `url`'s content: the path itself when local, else a copy in `cache_dir`.

    The copy is fetched once per node and named after the URL and the object's size and ETag (one HEAD
    per call), so a rewritten object is fetched again rather than served stale. The fetch runs under a
    file lock into a temp file renamed at the end: ranks on one node download it once, and a killed
    fetch never leaves a partial copy that poses as the object. Delete `cache_dir` any time to free disk.
    """
    if is_local(url):
        return local_path(url)
    fs, path = _fresh(url)
    info = fs.info(path)
    tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
    key = hashlib.sha256(f"{url}\n{info.get('size')}\n{tag}".encode()).hexdigest()[:20]
    target = os.path.join(cache_dir, f"{key}-{posixpath.basename(path)}")
    if os.path.exists(target):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    with FileLock(target + ".lock"):
        if not os.path.exists(target):  # another rank may have fetched it while we waited
            tmp = temp_name(target)
            try:
                fs.get_file(path, tmp)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    return target


def sha256(url: str, chunk: int = 1 << 20) -> str:
    """Content digest of one file, streamed."""
    fs, path = filesystem(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def remove_stale_temps(dir_url: str) -> list[str]:
    """Delete temp files in a local directory whose writer process is gone; returns their names.

    A writer killed mid-write leaves `<name>.tmp-<pid>-<id>`; nothing ever reads those as artifacts,
    and a live writer's temp (another process still downloading) is left alone.
    """
    if not is_local(dir_url):
        return []  # remote writes stage their temps locally, in the system temp dir
    removed = []
    for name in listdir(dir_url):
        m = _TEMP_RE.search(name)
        if m and not _pid_alive(int(m.group(1))):
            os.remove(os.path.join(local_path(dir_url), name))
            removed.append(name)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
