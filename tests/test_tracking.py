"""MLflow in a SQLite file under the base dir: a parent run per pipeline, a child per stage, metrics by step."""

import os
from pathlib import Path

from mlflow.tracking import MlflowClient

from nanochat_core import tracking


def test_parent_child_runs_and_metrics(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = Path(os.environ["NANOCHAT_BASE_DIR"]).resolve()  # conftest gives every test its own base dir
    assert tracking.tracking_uri() == f"sqlite:///{base}/mlflow.db"
    parent = tracking.start_pipeline_run("tiny-test", {"base_train.depth": 2}, {"preset": "tiny"})
    child = tracking.start_stage_run(parent, "base_train", {"base_train.depth": 2})
    rows = [{"step": s, "train/loss": 5.0 - s, "train/tok_per_sec": 1000.0} for s in range(3)]
    assert tracking.log_metric_rows(child, rows) == 6
    tracking.log_figures(child, {"val/bpb": 1.5, "path": "/x"})
    tracking.end_run(child)
    tracking.end_run(parent)

    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["preset"] == "tiny"
    assert run.data.params["base_train.depth"] == "2"
    assert [m.value for m in client.get_metric_history(child, "train/loss")] == [5.0, 4.0, 3.0]
    assert run.data.metrics["val/bpb"] == 1.5
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).data.tags["git_sha"]


def test_metrics_log_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')
    assert tracking.read_jsonl(str(path)) == [{"step": 1, "train/loss": 2.0}]


def test_a_checkpoint_registers_in_place_as_a_model_version(tmp_path):
    ckpt = tmp_path / "base_checkpoints" / "d2"
    ckpt.mkdir(parents=True)
    (ckpt / "model_000010.pt").write_bytes(b"weights")
    run = tracking.start_pipeline_run("tiny-test", {}, {})
    first = tracking.register_checkpoint(run, str(ckpt), {"stage": "base_train"})
    second = tracking.register_checkpoint(run, str(ckpt))
    assert first == "models:/nanochat/1" and second == "models:/nanochat/2"
    assert tracking.resolve_model_uri(first) == str(ckpt)
    assert tracking.resolve_model_uri("models:/nanochat/latest") == str(ckpt)


def test_metric_names_mlflow_rejects_are_made_legal():
    assert tracking.metric_name("train/pass@4") == "train/pass_at_4"
    assert tracking.metric_name("eval/ARC-Easy") == "eval/ARC-Easy"
    run = tracking.start_pipeline_run("t", {}, {})
    assert tracking.log_metric_rows(run, [{"step": 1, "train/pass@4": 0.5, "odd#key": 1}]) == 2
