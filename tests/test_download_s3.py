"""Shard download and artifact storage against a real S3 server (moto's standalone server) on 127.0.0.1."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
import s3fs

from nanochat_core import storage
from nanochat_core.data.shards import Position, iter_row_groups, list_shards, shard_name, write_shards
from nanochat_core.errors import UserError
from nanochat_core.stages import download as download_stage
from download_fixtures import FaultProxy, moto_port, point_s3_at  # noqa: F401 (moto_port: a fixture)
from nanochat_core.stage_args import parse
from nanochat_core.paths import output_dir

BUCKET = "shards"






def docs(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "shard", "token"]
    return [f"doc {seed}-{i}: " + " ".join(rng.choices(words, k=rng.randint(5, 60))) for i in range(n)]


@pytest.fixture
def s3(moto_port, monkeypatch):
    """A fresh bucket holding 6 small shards (5 train + val) written through storage.py."""
    point_s3_at(monkeypatch, f"http://127.0.0.1:{moto_port}")
    fs = s3fs.S3FileSystem()
    if fs.exists(BUCKET):
        fs.rm(BUCKET, recursive=True)
    fs.mkdir(BUCKET)
    source_docs = docs(3000, seed=1)
    urls = write_shards(source_docs, f"s3://{BUCKET}/corpus", shard_chars=40_000)
    assert len(urls) >= 6
    yield {"fs": fs, "urls": urls, "docs": source_docs, "port": moto_port}
    s3fs.S3FileSystem.clear_instance_cache()


def run_download(*argv: str) -> dict:
    download_stage.main([*argv])
    return json.loads(open(os.path.join(output_dir("download", None), "result.json")).read())


TEMPLATE = f"s3://{BUCKET}/corpus/shard_{{index:05d}}.parquet"


def test_storage_round_trip_on_s3(s3):
    url = f"s3://{BUCKET}/artifacts/report/report.md"
    storage.write_text(url, "# report\n")
    assert storage.exists(url) and storage.read_text(url) == "# report\n"
    assert storage.listdir(f"s3://{BUCKET}/artifacts/report") == ["report.md"]
    assert storage.sha256(url) == __import__("hashlib").sha256(b"# report\n").hexdigest()


def test_failed_write_publishes_nothing_on_s3(s3):
    url = f"s3://{BUCKET}/artifacts/model.pt"
    storage.write_bytes(url, b"old")
    with pytest.raises(RuntimeError):
        with storage.atomic_open(url, "wb") as f:
            f.write(b"half a new checkpoint")
            raise RuntimeError("crash mid-write")
    assert storage.read_bytes(url) == b"old"
    with pytest.raises(RuntimeError):
        with storage.atomic_open(f"s3://{BUCKET}/artifacts/never.pt", "wb") as f:
            f.write(b"x")
            raise RuntimeError("crash")
    assert not storage.exists(f"s3://{BUCKET}/artifacts/never.pt")


def test_download_from_s3_fetches_and_verifies(s3):
    result = run_download("-n", "3", "--url-template", TEMPLATE, "--workers", "3")
    val_index = len(s3["urls"]) - 1
    assert result["val_index"] == val_index  # found by listing the bucket
    assert (result["fetched"], result["skipped"]) == (4, 0)
    shards = list_shards(output_dir("download", None))
    assert [os.path.basename(u) for u in shards.train] == [shard_name(i) for i in range(3)]
    assert os.path.basename(shards.val) == shard_name(val_index)
    for index in [0, 1, 2, val_index]:
        local = os.path.join(output_dir("download", None), shard_name(index))
        assert storage.sha256(local) == storage.sha256(s3["urls"][index])
        assert pq.read_table(local).column("text").to_pylist() == pq.read_table(
            s3["fs"].open(s3["urls"][index])).column("text").to_pylist()
    manifest = json.loads(open(os.path.join(output_dir("download", None), "manifest.json")).read())
    assert [e["index"] for e in manifest["shards"]] == [0, 1, 2, val_index]
    assert [e["split"] for e in manifest["shards"]] == ["train"] * 3 + ["val"]
    assert all(e["rows"] > 0 and e["bytes"] > 0 and len(e["sha256"]) == 64 for e in manifest["shards"])

    again = run_download("-n", "3", "--url-template", TEMPLATE)
    assert (again["fetched"], again["skipped"]) == (0, 4)
    assert again["digest"] == result["digest"]


def test_server_errors_are_retried(s3, monkeypatch):
    proxy = FaultProxy(s3["port"])
    try:
        point_s3_at(monkeypatch, proxy.url)
        # More consecutive failures than botocore's own retries absorb, so our retry loop must act.
        proxy.fail_first = {shard_name(1): 6, shard_name(2): 2}
        monkeypatch.setattr("nanochat_core.data.download.BACKOFF_SECONDS", 0.01)
        result = run_download("-n", "3", "--url-template", TEMPLATE, "--workers", "2")
        assert proxy.failures == 8
        assert result["fetched"] == 4
        for index in (1, 2):
            local = os.path.join(output_dir("download", None), shard_name(index))
            assert storage.sha256(local) == storage.sha256(s3["urls"][index])
    finally:
        proxy.close()


def test_persistent_server_errors_give_one_clear_error(s3, monkeypatch, capsys):
    proxy = FaultProxy(s3["port"])
    try:
        point_s3_at(monkeypatch, proxy.url)
        proxy.fail_first = {shard_name(0): 10_000}
        monkeypatch.setattr("nanochat_core.data.download.BACKOFF_SECONDS", 0.01)
        monkeypatch.setattr("nanochat_core.data.download.RETRIES", 2)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries would only add time
        with pytest.raises(SystemExit) as exc:
            download_stage.main(["-n", "2", "--url-template", TEMPLATE])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
        assert err.startswith("error: fetching s3://shards/corpus/shard_00000.parquet failed after 2 attempts")
        assert "Traceback" not in err
        # Nothing half-fetched poses as shard 0.
        assert not os.path.exists(os.path.join(output_dir("download", None), shard_name(0)))
    finally:
        proxy.close()


def test_truncated_shard_is_refetched(s3):
    run_download("-n", "2", "--url-template", TEMPLATE)
    local = os.path.join(output_dir("download", None), shard_name(1))
    good = storage.sha256(local)
    with open(local, "r+b") as f:
        f.truncate(os.path.getsize(local) // 2)
    result = run_download("-n", "2", "--url-template", TEMPLATE)
    assert (result["fetched"], result["skipped"]) == (1, 2)
    assert storage.sha256(local) == good


def test_shard_corrupted_without_manifest_is_refetched(s3):
    run_download("-n", "2", "--url-template", TEMPLATE)
    os.remove(os.path.join(output_dir("download", None), "manifest.json"))
    local = os.path.join(output_dir("download", None), shard_name(0))
    good = storage.sha256(local)
    with open(local, "r+b") as f:  # same size, different bytes: only the ETag (MD5) can tell
        f.seek(10)
        f.write(b"\x00" * 8)
    result = run_download("-n", "2", "--url-template", TEMPLATE)
    assert result["fetched"] == 1
    assert storage.sha256(local) == good


def test_missing_bucket_is_one_clear_error(s3, capsys):
    with pytest.raises(SystemExit):
        download_stage.main(["-n", "1", "--url-template", "s3://no-such-bucket/fineweb/shard_{index:05d}.parquet"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: source s3://no-such-bucket/fineweb does not exist")
    assert "Traceback" not in err


def test_missing_object_is_one_clear_error(s3):
    with pytest.raises(UserError, match=r"s3://shards/corpus/shard_00500\.parquet does not exist"):
        cfg, inputs = parse("download", ["--num-shards", "1", "--url-template", TEMPLATE, "--val-index", "500"])
        download_stage.run(cfg, inputs, progress=False)


def test_download_into_an_s3_base_dir(s3, monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", f"s3://{BUCKET}/base")
    monkeypatch.setenv("NANOCHAT_FLOW_CACHE", str(tmp_path / "cache"))  # the shard read cache, not ~/.cache
    result = run_download_remote("-n", "2", "--url-template", TEMPLATE)
    shards = list_shards(f"s3://{BUCKET}/base/base_data")
    assert len(shards.train) == 2 and shards.val.endswith(shard_name(len(s3["urls"]) - 1))
    assert storage.sha256(shards.train[1]) == storage.sha256(s3["urls"][1])
    assert result["fetched"] == 3
    # The loader's iterator reads shards from the object store (through the local read cache).
    assert pq.ParquetFile(s3["fs"].open(s3["urls"][0])).metadata.num_row_groups == 1
    texts, pos = next(iter_row_groups(shards.train, rank=1, world=2))  # global row group 1 = shard 1's first
    assert texts == pq.read_table(s3["fs"].open(s3["urls"][1])).column("text").to_pylist()
    assert pos == Position(1, 0, 2)  # 2 single-group files: rank 1 reads shard 1 again, next epoch


def run_download_remote(*argv: str) -> dict:
    download_stage.main([*argv])
    return json.loads(storage.read_text(output_dir("download", None) + "/result.json"))


def test_eval_bundle_downloads_from_s3(s3, tmp_path):
    """The eval bundle zip comes through fsspec like the shards: an s3:// --url works as https does."""
    import io
    import zipfile

    from nanochat_core.evaluation.bundle import CORE_TASKS, core_yaml, download_bundle, jsonl, load_examples, load_tasks, meta_csv

    boolq = next(t for t in CORE_TASKS if t.label == "boolq")
    rows = [{"query": f"Passage: p{i}\nQuestion: q?", "choices": ["no", "yes"], "gold": i % 2} for i in range(3)]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("eval_bundle/core.yaml", core_yaml([boolq]))
        z.writestr("eval_bundle/eval_meta_data.csv", meta_csv([boolq]))
        z.writestr(f"eval_bundle/eval_data/{boolq.dataset_uri}", jsonl(rows))
    s3["fs"].pipe(f"{BUCKET}/bundles/eval_bundle.zip", buf.getvalue())

    out = str(tmp_path / "bundle")
    assert download_bundle(f"s3://{BUCKET}/bundles/eval_bundle.zip", out)["downloaded"]
    tasks = load_tasks(out)
    assert [t.label for t in tasks] == ["boolq"] and load_examples(out, tasks[0]) == rows
    with pytest.raises(UserError, match=r"could not download the eval bundle from s3://shards/bundles/nope\.zip \(not found\)"):
        download_bundle(f"s3://{BUCKET}/bundles/nope.zip", str(tmp_path / "other"))
