"""The tiny speedrun against a real tracking stack: `mlflow server` on 127.0.0.1 (SQLite backend) proxying
artifacts to moto's S3 server. One speedrun for the module (`server_run`); every test reads it.

What a user does with it: compare pipeline runs by the parent's headline figures, find every stage
under every parent (cached ones too), and load a registered model by alias after the checkpoint
directories it came from are gone: through `nanochat serve` and through `mlflow.pyfunc`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import httpx
import pytest
from mlflow.tracking import MlflowClient

from conftest import EXPECTED, rerun_states, speedrun
from download_fixtures import free_port, start_moto

pytestmark = pytest.mark.slow

BUCKET = "mlflow"
KEY = "sk-tracking-server-test"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until_up(url: str, proc: subprocess.Popen, log, what: str, path: str = "/health", timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read()[-4000:]}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    pytest.fail(f"{what} did not answer within {timeout:.0f} s")


def s3(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """moto's S3 with a bucket, and `mlflow server` storing artifacts there: {"url", "endpoint", "log"}."""
    moto, moto_port = start_moto()
    endpoint = f"http://127.0.0.1:{moto_port}"
    mlflow_proc = None
    try:
        s3(endpoint).create_bucket(Bucket=BUCKET)
        root = tmp_path_factory.mktemp("mlflow_server")
        port = free_port()
        env = {**os.environ, **S3_ENV, "MLFLOW_S3_ENDPOINT_URL": endpoint,
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(root / "server.log", "w+")
        mlflow_proc = subprocess.Popen(
            [os.path.join(sys.prefix, "bin", "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--artifacts-destination", f"s3://{BUCKET}/artifacts"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, mlflow_proc, log, "mlflow server")
        yield {"url": url, "endpoint": endpoint, "log": root / "server.log"}
    finally:
        if mlflow_proc is not None:
            stop(mlflow_proc)
        stop(moto)


@pytest.fixture(scope="module")
def server_run(stack, tmp_path_factory):
    """The module's tiny speedrun, tracked by the server: (base dir, stdout, parent run id, client)."""
    base = tmp_path_factory.mktemp("speedrun_server")
    out, table = speedrun(base, env={"MLFLOW_TRACKING_URI": stack["url"]})
    (base / "speedrun.log").write_text(out.stdout + out.stderr)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert sorted(table) == sorted(EXPECTED) and set(table.values()) == {"Completed"}, table
    assert "registering its checkpoint failed" not in out.stderr, out.stderr[-4000:]
    parent = re.search(r"MLflow parent run: (\w+)", out.stdout).group(1)
    return base, out, parent, MlflowClient(stack["url"])


@pytest.fixture
def tracked_by_server(stack, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack["url"])


def children(client, parent: str) -> list:
    return client.search_runs([client.get_run(parent).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent}'", max_results=100)


def test_the_parent_holds_the_headline_figures(server_run):
    base, _, parent, client = server_run
    run = client.get_run(parent)
    metrics = run.data.metrics
    for key in ("base/val_bpb", "base/core", "mid/chatcore", "sft/chatcore", "rl/chatcore", "sft/ARC-Easy",
                "sft/GSM8K", "time/base_train_s", "time/chat_sft_s", "time/total_s", "cost/est_usd"):
        assert key in metrics, f"{key} missing from {sorted(metrics)}"
    assert metrics["time/total_s"] >= metrics["time/base_train_s"] > 0
    assert run.data.tags["prefect.flow_run_id"] and run.data.tags["mlflow.user"]
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    report = [f.path for f in client.list_artifacts(parent, "report")]
    assert "report/report.md" in report and any(p.endswith("_loss.png") for p in report)


def test_every_stage_has_a_child_with_its_live_curve_and_lineage(server_run):
    _, _, parent, client = server_run
    runs = children(client, parent)
    assert sorted(r.data.tags["prefect.task_run"] for r in runs) == sorted(EXPECTED)
    train = next(r for r in runs if r.info.run_name == "base_train")
    history = client.get_metric_history(train.info.run_id, "train/loss")
    steps = [m.step for m in history]
    assert steps == sorted(set(steps)) and len(steps) > 1  # each step once
    assert [m.timestamp for m in history] == sorted(m.timestamp for m in history)
    (shards,) = train.inputs.dataset_inputs
    assert shards.dataset.name == "pretraining-shards" and "{index:05d}" in shards.dataset.source
    sft = next(r for r in runs if r.info.run_name == "chat_sft")
    assert sft.inputs.dataset_inputs[0].dataset.name == "chat_sft-mixture"


def test_versions_live_in_the_artifact_store_under_moving_aliases(server_run, stack):
    _, _, _, client = server_run
    model = client.get_registered_model("nanochat")
    assert set(model.aliases) == {"base", "mid", "sft", "rl", "champion"}
    sft = client.get_model_version_by_alias("nanochat", "sft")
    assert sft.tags["family"] == "sft" and not sft.source.startswith(("file:", "/"))
    champion = client.get_model_version_by_alias("nanochat", "champion")
    assert champion.tags["family"] in ("mid", "sft", "rl") and float(champion.tags["chatcore"]) == max(
        float(client.get_model_version_by_alias("nanochat", f).tags["chatcore"]) for f in ("mid", "sft", "rl"))
    keys = [o["Key"] for o in s3(stack["endpoint"]).list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert any("/artifacts/checkpoint/meta_" in k for k in keys)
    assert any(k.endswith("artifacts/tokenizer/tokenizer.pkl") for k in keys)


def test_a_rerun_lists_its_cached_stages_as_comparable_rows(server_run, stack):
    base, _, first_parent, client = server_run
    out, table = speedrun(base, env={"MLFLOW_TRACKING_URI": stack["url"]})
    expected = rerun_states(base)
    assert out.returncode == 0 and table == expected, out.stderr[-3000:]
    parent = re.search(r"MLflow parent run: (\w+)", out.stdout).group(1)
    runs = children(client, parent)
    assert sorted(r.data.tags["prefect.task_run"] for r in runs) == sorted(EXPECTED)
    cached = [r for r in runs if expected[r.data.tags["prefect.task_run"]] == "Cached"]
    assert all(r.data.tags["cached"] == "true" and r.data.tags["source_run_id"] for r in cached)
    train = next(r for r in runs if r.info.run_name == "base_train")
    assert client.get_run(train.data.tags["source_run_id"]).data.tags["mlflow.parentRunId"] == first_parent
    before, after = client.get_run(first_parent).data.metrics, client.get_run(parent).data.metrics
    assert after["sft/chatcore"] == before["sft/chatcore"] and after["base/core"] == before["base/core"]


def test_the_sft_version_loads_after_its_checkpoints_are_gone(server_run, stack, tracked_by_server):
    """Move the checkpoint families aside and prune them, drop the tokenizer: the version still serves."""
    import mlflow.pyfunc

    base, _, _, _ = server_run
    for family in ("base_checkpoints", "mid_checkpoints", "chatsft_checkpoints", "chatrl_checkpoints"):
        shutil.move(base / family, base / f"{family}.aside")
        shutil.rmtree(base / f"{family}.aside")
    shutil.rmtree(base / "tokenizer")

    model = mlflow.pyfunc.load_model("models:/nanochat@sft")
    conversation = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0.0}
    reply = model.predict(conversation)
    assert isinstance(reply, str)
    replies = model.predict([conversation, {**conversation, "seed": 1, "temperature": 1.0}])
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies) and replies[0] == reply

    port = free_port()
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "NANOCHAT_API_KEY": KEY, "PYTHONUNBUFFERED": "1",
           "MLFLOW_TRACKING_URI": stack["url"]}
    log = open(base / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "nanochat_core.cli", "serve", "--port", str(port),
                             "--checkpoint", "models:/nanochat@sft", "--max-tokens", "8"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc, log, "nanochat serve")
        deadline = time.time() + 60
        while not httpx.get(url + "/health", timeout=2).json()["ready"] and time.time() < deadline:
            time.sleep(0.5)
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                       json={"model": "nanochat", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["choices"][0]["message"]["content"], str)
    finally:
        stop(proc)
        log.close()
