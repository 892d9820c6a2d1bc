"""A base dir on an object store (moto's standalone S3 server on 127.0.0.1): checkpoints that a kill or a
cut-off move never leaves half-counted, shards read through the local read cache, and Prefect's cache
records under the base dir, seen by a second run with an empty local disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import s3fs
import torch

from download_fixtures import FaultProxy, moto_port, point_s3_at  # noqa: F401 (moto_port: a fixture)
from nanochat_core import checkpoint, storage
from nanochat_core.artifacts import make_ref, verify
from nanochat_core.checkpoint import meta_file, model_file, optim_file
from nanochat_core.data.shards import iter_row_groups, write_shards

BUCKET = "base"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))






@pytest.fixture
def s3(moto_port, monkeypatch):
    """An empty bucket; yields its s3:// root."""
    point_s3_at(monkeypatch, f"http://127.0.0.1:{moto_port}")
    fs = s3fs.S3FileSystem()
    if fs.exists(BUCKET):
        fs.rm(BUCKET, recursive=True)
    fs.mkdir(BUCKET)
    yield f"s3://{BUCKET}"
    s3fs.S3FileSystem.clear_instance_cache()


def save_step(ckpt: str, step: int, world: int = 2, numel: int = 64) -> None:
    """A checkpoint of `world` ranks as save_checkpoint writes it (ranks in turn; rank 0 last commits)."""
    for rank in reversed(range(world)):
        checkpoint.save_checkpoint(ckpt, step, rank, {"w": torch.full((numel,), float(step))} if rank == 0 else None,
                                   {"rank": rank}, {"step": step, "run_key": "k", "num_iterations": 10} if rank == 0 else None)


def assert_whole(ckpt: str, world: int = 2) -> list[int]:
    """Every step that counts as complete has its meta, model and every rank's file, non-empty."""
    sizes = storage.file_sizes(ckpt)
    steps = checkpoint.complete_steps(ckpt)
    for step in steps:
        for name in [meta_file(step), model_file(step), *(optim_file(step, r) for r in range(world))]:
            assert sizes.get(name, 0) > 0, f"step {step} counts as complete in {ckpt} without {name}"
    return steps


# --- checkpoints --------------------------------------------------------------------------------


def test_a_step_missing_a_rank_file_is_not_the_latest(s3):
    ckpt = f"{s3}/base_checkpoints/d2"
    save_step(ckpt, 2)
    save_step(ckpt, 4)
    assert checkpoint.latest_step(ckpt) == 4
    assert checkpoint.read_meta(ckpt, 4)["files"] == [model_file(4), optim_file(4, 0), optim_file(4, 1)]
    storage.remove(f"{ckpt}/{optim_file(4, 1)}")  # model and meta of step 4 there, rank 1's file not
    assert checkpoint.latest_step(ckpt) == 2 and checkpoint.complete_steps(ckpt) == [2]
    say = []
    assert checkpoint.continue_or_start(ckpt, "k", True, lambda: None, say.append) == 2


KILLED_SAVE = textwrap.dedent("""
    import sys, torch
    from nanochat_core import checkpoint, storage
    ckpt, marker = sys.argv[1:3]
    checkpoint.save_checkpoint(ckpt, 2, 0, {"w": torch.zeros(8)}, {"s": 2}, {"step": 2})
    publish = storage.publish_file
    def announce(tmp, url):
        if url.endswith("model_000004.pt"):
            open(marker, "w").close()  # the parent kills us now, while the 64 MB model uploads
        publish(tmp, url)
    storage.publish_file = announce
    checkpoint.save_checkpoint(ckpt, 4, 0, {"w": torch.randn(16_000_000)}, {"s": 4}, {"step": 4})
    print("saved step 4 before the kill", flush=True)
""")


def test_a_save_killed_mid_upload_leaves_the_previous_step_latest(s3, tmp_path):
    ckpt, marker = f"{s3}/base_checkpoints/d2", tmp_path / "uploading"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, ckpt, str(marker)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])})
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.exists(), proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    assert "saved step 4" not in out
    names = storage.listdir(ckpt)
    assert optim_file(4, 0) in names and meta_file(4) not in names  # killed half-way through step 4
    assert checkpoint.latest_step(ckpt) == 2
    assert torch.equal(checkpoint.load_model_state(ckpt, 2)["w"], torch.zeros(8))


class Cut(Exception):
    pass


def cut_after(monkeypatch, ops: int) -> None:
    """storage.copy and storage.remove raise Cut once `ops` of them have run (a kill mid-move)."""
    done = [0]
    for name in ("copy", "remove"):
        real = getattr(storage, name)

        def counted(*args, _real=real, **kwargs):
            if done[0] >= ops:
                raise Cut
            done[0] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(storage, name, counted)


def test_a_move_aside_cut_off_anywhere_counts_no_step_that_misses_files(monkeypatch, tmp_path):
    """Cut the object-by-object move after every possible number of operations (memory:// takes the
    object-store path): in source and destination, every step that counts is whole, and none is lost."""
    root = f"memory:///moves-{os.getpid()}"
    ops, n = 0, 0
    while True:
        src, dst = f"{root}/{n}/d2", f"{root}/{n}/d2.aside"
        save_step(src, 2)
        save_step(src, 4)
        storage.write_text(f"{src}/metrics.jsonl", "{}\n")
        with monkeypatch.context() as m:
            cut_after(m, ops)
            try:
                checkpoint._move_commits_last(src, dst)
                finished = True
            except Cut:
                finished = False
        counted = set(assert_whole(src)) | set(assert_whole(dst))
        assert counted == {2, 4}, f"cut after {ops} operations lost steps: {counted}"
        if finished:
            break
        ops, n = ops + 1, n + 1
    assert ops == 18  # 9 files copied, 9 removed: every cut point was tried
    assert storage.listdir(src) == [] and checkpoint.complete_steps(dst) == [2, 4]
    storage.remove(root, recursive=True)


def test_move_aside_on_s3_moves_every_file(s3):
    ckpt = f"{s3}/chatsft_checkpoints/d2"
    save_step(ckpt, 2)
    storage.write_text(f"{ckpt}/metrics.jsonl", "{}\n")
    aside = checkpoint.move_aside(ckpt)
    assert aside.startswith(ckpt + ".")
    assert storage.listdir(ckpt) == [] and checkpoint.latest_step(ckpt) is None
    assert storage.listdir(aside) == sorted([meta_file(2), "metrics.jsonl", model_file(2), optim_file(2, 0), optim_file(2, 1)])
    assert assert_whole(aside) == [2]


# --- shards -------------------------------------------------------------------------------------


def test_remote_shards_are_fetched_once_into_the_read_cache(s3, moto_port, monkeypatch, tmp_path):
    docs = [f"document {i} " + "word " * (i % 50) for i in range(1200)]
    urls = write_shards(docs, f"{s3}/base_data", shard_chars=60_000)
    assert len(urls) >= 3
    proxy = FaultProxy(moto_port)
    try:
        point_s3_at(monkeypatch, proxy.url)
        monkeypatch.setenv("NANOCHAT_FLOW_CACHE", str(tmp_path / "cache"))
        for _ in range(3):  # three passes, as epochs or a resumed run would read them
            texts = [t for group, _ in iter_row_groups(urls) for t in group]
            assert texts == docs
        gets = [r for r in proxy.requests if r.startswith("GET ") and r.endswith(".parquet")]
        assert sorted(gets) == sorted(f"GET /{BUCKET}/base_data/{u.rsplit('/', 1)[-1]}" for u in urls)  # once each
        cached = [n for n in os.listdir(tmp_path / "cache" / "shards") if n.endswith(".parquet")]
        assert len(cached) == len(urls)
        write_shards(["a rewritten shard"], f"{s3}/base_data", shard_chars=10)  # shard 0 replaced
        assert next(iter_row_groups(urls[:1]))[0] == ["a rewritten shard"]  # a new ETag is fetched again
    finally:
        proxy.close()


def test_a_cache_lookup_on_s3_reads_no_artifact_body(s3, moto_port, monkeypatch):
    """verify() compares sizes and ETags from one listing; a rewrite of a key (same size) is caught;
    --verify full still hashes the bodies."""
    ckpt = f"{s3}/base_checkpoints/d2"
    save_step(ckpt, 5, numel=4096)
    ref = make_ref("base_train", ckpt)
    assert ref["manifest"] and all(len(e["etag"]) >= 32 for e in ref["manifest"].values())
    proxy = FaultProxy(moto_port)
    direct, counted = f"http://127.0.0.1:{moto_port}", proxy.url  # writes go direct (the proxy buffers no chunked PUT)
    try:
        point_s3_at(monkeypatch, counted)
        assert verify(ref)
        bodies = [r for r in proxy.requests if r.startswith(("GET ", "HEAD ")) and r.split(" ", 1)[1].startswith(f"/{BUCKET}/")]
        assert bodies == [] and len(proxy.requests) <= 2, proxy.requests  # one listing (plus a page, at most)
        model = f"{ckpt}/{model_file(5)}"
        point_s3_at(monkeypatch, direct)
        data = storage.read_bytes(model)
        storage.write_bytes(model, data[:-1] + bytes([data[-1] ^ 1]))  # same size, other content
        assert not verify(ref)
        storage.write_bytes(model, data)  # the same bytes again: verifies (moto's ETag is the content's MD5)
        point_s3_at(monkeypatch, counted)
        proxy.requests.clear()
        assert verify(ref, full=True)
        assert f"GET /{BUCKET}/base_checkpoints/d2/{model_file(5)}" in proxy.requests
    finally:
        proxy.close()


# --- Prefect's cache records --------------------------------------------------------------------

# A flow with the project's real stage task (cache policy, result storage, claim) around a stage that
# writes one file: what the `nanochat` flow does for every stage, minus the stage process.
ONE_STAGE_FLOW = textwrap.dedent("""
    from prefect import flow
    import flows.tasks as tasks
    from nanochat_core import storage
    from nanochat_core.artifacts import make_ref
    from nanochat_core.config import PipelineConfig
    from nanochat_core.paths import base_dir, join

    def execute(stage, cfg, inputs, parent_run_id):
        print("EXECUTED", flush=True)
        storage.write_text(join(base_dir(), "one_stage", "out.txt"), "made once")
        return make_ref(stage, join(base_dir(), "one_stage"))

    tasks._execute = execute

    @flow
    def one_stage():
        tasks.claim_result_storage()
        state = tasks.stage_task("report")("report", {"x": 1}, {}, PipelineConfig(), None, return_state=True)
        print("STATE", state.name, state.result()["digest"], flush=True)

    one_stage()
""")


@pytest.mark.slow
def test_a_fresh_worker_sees_the_cache_records_under_the_base_dir(s3, tmp_path):
    """Two flow runs in fresh processes, each with its own empty PREFECT_HOME (its own ephemeral API and
    database) and local result path: the second finds the first's cache record on S3 and is Cached."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": f"{s3}/prefix", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "true", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    lines = []
    for worker in ("first", "second"):
        (tmp_path / worker / "home").mkdir(parents=True)
        local = {"PREFECT_HOME": str(tmp_path / worker / "home"), "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / worker / "results")}
        out = subprocess.run([sys.executable, "-c", ONE_STAGE_FLOW], env={**env, **local}, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        lines.append([line for line in out.stdout.splitlines() if line.startswith(("EXECUTED", "STATE"))])
        assert not os.path.exists(local["PREFECT_LOCAL_STORAGE_PATH"])  # nothing landed on the worker's disk
    (first_state, digest), (second_state, again) = (line.split()[1:] for line in (lines[0][-1], lines[1][-1]))
    assert lines[0][0] == "EXECUTED" and first_state == "Completed"
    assert lines[1] == [f"STATE Cached {digest}"] and second_state == "Cached" and again == digest
    records = storage.listdir(f"{s3}/prefix/prefect_results")
    assert len(records) == 1  # the cache record, under the base dir


# A whole speedrun on S3 seen Cached by a worker with an empty disk: scripts/rehearse.sh (tests/test_rehearsal.py).
