"""storage.py: atomic writes and the small file API, on local paths, file:// URLs and an fsspec
in-memory filesystem (the S3 case runs against a real server in test_download_s3.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from nanochat_core import storage


@pytest.fixture(params=["path", "file-url", "memory"])
def root(request, tmp_path):
    if request.param == "path":
        yield str(tmp_path / "art")
    elif request.param == "file-url":
        yield "file://" + str(tmp_path / "art")
    else:
        import fsspec

        fs = fsspec.filesystem("memory")
        prefix = f"/t{os.getpid()}-{id(request)}"
        yield f"memory://{prefix}"
        if fs.exists(prefix):
            fs.rm(prefix, recursive=True)


def test_round_trip_and_listing(root):
    storage.write_text(f"{root}/b/report.md", "héllo\n")
    storage.write_bytes(f"{root}/b/model.pt", b"\x00\x01")
    assert storage.read_text(f"{root}/b/report.md") == "héllo\n"
    assert storage.read_bytes(f"{root}/b/model.pt") == b"\x00\x01"
    assert storage.exists(f"{root}/b/model.pt") and not storage.exists(f"{root}/b/nope")
    assert storage.listdir(f"{root}/b") == ["model.pt", "report.md"]
    assert storage.listdir(f"{root}/missing") == []
    assert storage.size(f"{root}/b/model.pt") == 2
    assert storage.sha256(f"{root}/b/model.pt") == hashlib.sha256(b"\x00\x01").hexdigest()
    storage.rename(f"{root}/b/model.pt", f"{root}/c/model.pt")
    assert storage.listdir(f"{root}/b") == ["report.md"] and storage.exists(f"{root}/c/model.pt")
    storage.remove(f"{root}/c", recursive=True)
    assert not storage.exists(f"{root}/c/model.pt")


def test_failed_write_keeps_the_old_artifact_and_leaves_no_temp(root):
    url = f"{root}/ckpt/meta.json"
    storage.write_text(url, "old")
    with pytest.raises(ZeroDivisionError):
        with storage.atomic_open(url, "w") as f:
            f.write("new but unfinished")
            1 / 0
    assert storage.read_text(url) == "old"
    assert storage.listdir(f"{root}/ckpt") == ["meta.json"]


def test_text_mode_writes_utf8(root):
    with storage.atomic_open(f"{root}/t.txt", "w") as f:
        f.write("ünïcode")
    assert storage.read_bytes(f"{root}/t.txt") == "ünïcode".encode()


def test_stale_temps_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f"shard_00001.parquet.tmp-{dead_pid}-0123abcd").write_bytes(b"partial")
    live = tmp_path / f"shard_00002.parquet.tmp-{os.getpid()}-0123abcd"
    live.write_bytes(b"still being written")
    (tmp_path / "shard_00000.parquet").write_bytes(b"whole")
    removed = storage.remove_stale_temps(str(tmp_path))
    assert removed == [f"shard_00001.parquet.tmp-{dead_pid}-0123abcd"]
    assert sorted(os.listdir(tmp_path)) == ["shard_00000.parquet", live.name]
