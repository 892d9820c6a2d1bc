"""Shard download over http (a real server on 127.0.0.1) and from local sources: retries, kills, errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from nanochat_core import storage
from nanochat_core.data.shards import list_shards, shard_name, write_shards
from nanochat_core.stages import download as download_stage
from download_fixtures import ShardServer
from nanochat_core.paths import output_dir


def make_docs(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [
        f"document {i}: " + " ".join(f"w{rng.randint(0, 50_000)}" for _ in range(rng.randint(20, 200)))
        for i in range(n)
    ]


@pytest.fixture
def served(tmp_path):
    """6 shards (5 train + val) in a directory, served over http."""
    root = tmp_path / "source"
    urls = write_shards(make_docs(4000, seed=7), str(root), shard_chars=400_000)
    server = ShardServer(str(root))
    yield {"root": root, "urls": urls, "server": server, "template": server.url + "/shard_{index:05d}.parquet"}
    server.close()


def data_dir() -> str:
    return output_dir("download", None)


def result() -> dict:
    return json.loads(open(os.path.join(data_dir(), "result.json")).read())


def test_http_download_with_transient_503s(served, monkeypatch):
    monkeypatch.setattr("nanochat_core.data.download.BACKOFF_SECONDS", 0.01)
    # fsspec's http stat tries HEAD then GET; 5 failures outlast that, so our retry loop must act.
    val = len(served["urls"]) - 1
    served["server"].fail_first = {shard_name(0): 5, shard_name(val): 1}
    download_stage.main(["-n", "2", "--url-template", served["template"], "--val-index", str(val), "--workers", "2"])
    assert served["server"].failures == 6 and not any(served["server"].fail_first.values())
    assert result()["fetched"] == 3
    for index in (0, 1, val):
        assert storage.sha256(os.path.join(data_dir(), shard_name(index))) == storage.sha256(served["urls"][index])


def test_http_needs_val_index(served, capsys):
    with pytest.raises(SystemExit):
        download_stage.main(["-n", "2", "--url-template", served["template"]])
    assert "pass --val-index" in capsys.readouterr().err


def test_missing_url_is_one_clear_error(served, capsys):
    with pytest.raises(SystemExit) as exc:
        download_stage.main(["-n", "1", "--url-template", served["server"].url + "/nope/shard_{index:05d}.parquet",
                             "--val-index", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(rf"error: {served['server'].url}/nope/shard_0000[03]\.parquet does not exist", err)


def test_killed_mid_download_then_rerun_completes(served, tmp_path):
    """SIGKILL while a shard streams in: no partial file is ever listed as a shard; a rerun finishes."""
    import threading

    release = threading.Event()
    served["server"].hold = {shard_name(1): release}  # shard 1's body stops halfway
    val = len(served["urls"]) - 1
    base = tmp_path / "base"
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base)}
    cmd = [sys.executable, "-m", "nanochat_core.stages.download", "-n", "4", "--workers", "1",
           "--url-template", served["template"], "--val-index", str(val)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = base / "base_data"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # shard 0 done, shard 1 stuck mid-body in its temp file
        names = os.listdir(out) if out.exists() else []
        if any(n.startswith(shard_name(1) + ".tmp-") for n in names) and shard_name(0) in names:
            break
        time.sleep(0.02)
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        release.set()
    names = os.listdir(out)
    assert any(n.startswith(shard_name(1) + ".tmp-") for n in names)  # the kill left a partial file
    shards = list_shards(str(out))
    assert [os.path.basename(u) for u in shards.train + [shards.val]] == [shard_name(0)]
    assert pq.ParquetFile(shards.val).metadata.num_rows > 0  # the one listed shard is whole

    served["server"].hold = {}
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    shards = list_shards(str(out))
    assert len(shards.train) == 4 and shards.val.endswith(shard_name(val))
    for index in (0, 1, 2, 3, val):
        assert storage.sha256(str(out / shard_name(index))) == storage.sha256(served["urls"][index])


def test_local_source_checks_the_corpus_manifest(tmp_path, monkeypatch, capsys):
    """A plain-path source whose manifest.json lists sha256s: a mismatch is caught, named, not kept."""
    monkeypatch.setattr("nanochat_core.data.download.BACKOFF_SECONDS", 0.01)
    root = tmp_path / "corpus"
    urls = write_shards(make_docs(2000, seed=3), str(root), shard_chars=200_000)
    entries = [{"index": i, "sha256": storage.sha256(u)} for i, u in enumerate(urls)]
    entries[1]["sha256"] = "0" * 64
    storage.write_text(str(root / "manifest.json"), json.dumps({"shards": entries}))

    download_stage.main(["-n", "1", "--url-template", str(root)])  # shard 0 and val match their checksums
    assert list_shards(data_dir()).val.endswith(shard_name(len(urls) - 1))
    with pytest.raises(SystemExit):
        download_stage.main(["-n", "2", "--url-template", str(root)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "shard_00001.parquet is not a usable shard at the source" in err and "does not match" in err
    assert not os.path.exists(os.path.join(data_dir(), shard_name(1)))


def test_a_download_manifest_cut_short_is_checked_again(tmp_path):
    """The download's own manifest.json cut short by a crash: the re-run checks the shards it finds and
    writes the manifest whole, instead of a JSON traceback."""
    root = tmp_path / "corpus"
    write_shards(make_docs(2000, seed=3), str(root), shard_chars=200_000)
    download_stage.main(["-n", "1", "--url-template", str(root)])
    manifest = os.path.join(data_dir(), "manifest.json")
    whole = json.loads(open(manifest).read())
    with open(manifest, "w") as f:
        f.write('{"source": "')
    download_stage.main(["-n", "1", "--url-template", str(root)])
    assert json.loads(open(manifest).read())["shards"] == whole["shards"]


def test_sample_source_without_a_corpus_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        download_stage.main(["--preset", "tiny"])
    err = capsys.readouterr().err
    assert err.startswith("error: no sample corpus; run `nanochat corpus build` first or pass --corpus")


def test_sample_source_reads_the_corpus_through_file_urls(tmp_path):
    """`--source sample` = the directory `nanochat corpus build` wrote (here a hand-made one)."""
    corpus = tmp_path / "corpus"
    urls = write_shards(make_docs(3000, seed=5), str(corpus), shard_chars=300_000)
    storage.write_text(str(corpus / "manifest.json"), json.dumps(
        {"shards": [{"index": i, "sha256": storage.sha256(u)} for i, u in enumerate(urls)]}))
    download_stage.main(["--preset", "tiny", "--corpus", str(corpus), "-n", "2"])
    res = result()
    assert res["url_template"] == f"file://{corpus}/shard_{{index:05d}}.parquet"
    assert res["val_index"] == len(urls) - 1 and res["fetched"] == 3
    shards = list_shards(data_dir())
    assert [pq.read_table(u).column("text").to_pylist() for u in shards.train] == [
        pq.read_table(u).column("text").to_pylist() for u in urls[:2]]


def test_too_many_shards_for_the_source(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    urls = write_shards(make_docs(1000, seed=2), str(corpus), shard_chars=100_000)
    with pytest.raises(SystemExit):
        download_stage.main(["--url-template", str(corpus), "-n", str(len(urls) + 3)])
    assert f"reaches the val shard (index {len(urls) - 1})" in capsys.readouterr().err


def test_cli_lists_and_parses_the_data_commands(capsys):
    from nanochat_core.cli import main as cli_main

    cli_main(["--help"])
    out = capsys.readouterr().out
    assert "corpus build" in out and "download" in out
    with pytest.raises(SystemExit) as exc:
        cli_main(["corpus", "build", "--tiers", "lit,poems"])
    assert exc.value.code == 2 and "'poems' is not one of lit, docs, ref" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["download", "--help"])
    assert exc.value.code == 0 and "--val-index" in capsys.readouterr().out


def test_etags_are_checked_but_an_opaque_one_does_not_block(served, monkeypatch):
    """A digest-looking ETag that matches passes at once; one that never matches (like an S3 SSE-KMS
    ETag) costs one more download, and identical bytes twice are accepted."""
    import hashlib

    monkeypatch.setattr("nanochat_core.data.download.BACKOFF_SECONDS", 0.01)
    val = len(served["urls"]) - 1
    md5 = hashlib.md5(open(served["urls"][0], "rb").read()).hexdigest()
    served["server"].etags = {shard_name(0): md5, shard_name(1): "0123456789abcdef" * 2}
    download_stage.main(["-n", "2", "--url-template", served["template"], "--val-index", str(val), "--workers", "1"])
    gets = served["server"].requests
    first_gets = [r for r in gets if r.startswith("GET") and r.endswith(shard_name(0))]
    opaque_gets = [r for r in gets if r.startswith("GET") and r.endswith(shard_name(1))]
    assert 0 < len(first_gets) < len(opaque_gets)  # shard 1 was fetched twice
    for index in (0, 1):
        assert storage.sha256(os.path.join(data_dir(), shard_name(index))) == storage.sha256(served["urls"][index])


def test_switching_sources_never_mixes_their_shards(tmp_path):
    a = write_shards(make_docs(3000, seed=11), str(tmp_path / "a"), shard_chars=100_000)
    b = write_shards(make_docs(1500, seed=12), str(tmp_path / "b"), shard_chars=100_000)
    assert len(a) > len(b)
    download_stage.main(["-n", "2", "--url-template", str(tmp_path / "a")])
    download_stage.main(["-n", "2", "--url-template", str(tmp_path / "b")])
    shards = list_shards(data_dir())
    assert shards.val.endswith(shard_name(len(b) - 1))  # a's higher val shard is gone
    for url, src in zip(shards.train + [shards.val], b[:2] + [b[-1]]):
        assert storage.sha256(url) == storage.sha256(src)
    manifest = json.loads(open(os.path.join(data_dir(), "manifest.json")).read())
    assert [e["index"] for e in manifest["shards"]] == [0, 1, len(b) - 1]


def test_a_failed_run_still_records_what_arrived(served, monkeypatch):
    monkeypatch.setattr("nanochat_core.data.download.BACKOFF_SECONDS", 0.01)
    monkeypatch.setattr("nanochat_core.data.download.RETRIES", 2)
    val = len(served["urls"]) - 1
    served["server"].fail_first = {shard_name(2): 10_000}
    with pytest.raises(SystemExit):
        download_stage.main(["-n", "3", "--url-template", served["template"], "--val-index", str(val), "--workers", "1"])
    manifest = json.loads(open(os.path.join(data_dir(), "manifest.json")).read())
    assert {e["index"] for e in manifest["shards"]} >= {0, 1} and 2 not in {e["index"] for e in manifest["shards"]}
    served["server"].fail_first = {}
    download_stage.main(["-n", "3", "--url-template", served["template"], "--val-index", str(val)])
    assert result()["fetched"] == 1 and result()["skipped"] == 3  # only shard 2 was missing


def test_retries_back_off_exponentially_and_stop_at_final_errors(monkeypatch):
    """The retry policy itself: each wait at least doubles; a missing file, a user error or Ctrl-C is
    never retried; the last transient failure is named in one sentence."""
    from nanochat_core.data.download import with_retries
    from nanochat_core.errors import UserError

    monkeypatch.setattr("nanochat_core.data.download.BACKOFF_SECONDS", 0.05)
    calls: list[float] = []

    def failing(error: BaseException, times: int = 10**6):
        def fn():
            calls.append(time.monotonic())
            if len(calls) <= times:
                raise error
            return "shard"

        calls.clear()
        return fn

    assert with_retries("s3://b/shard_00000.parquet", failing(ConnectionResetError("reset by peer"), times=3)) == "shard"
    waits = [b - a for a, b in zip(calls, calls[1:])]
    assert [w >= 0.05 * 2**i for i, w in enumerate(waits)] == [True, True, True]  # 0.05, 0.1, 0.2 s plus jitter

    for final, raised in ((FileNotFoundError("gone"), UserError), (UserError("bad"), UserError),
                          (KeyboardInterrupt(), KeyboardInterrupt)):
        with pytest.raises(raised):
            with_retries("x", failing(final))
        assert len(calls) == 1

    with pytest.raises(UserError, match=r"fetching x failed after 3 attempts \(last: TimeoutError: slow\)"):
        with_retries("x", failing(TimeoutError("slow")), retries=3)
    assert len(calls) == 3
