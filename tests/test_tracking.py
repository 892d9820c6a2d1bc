"""MLflow in a SQLite file under the base dir: a parent run per pipeline, a child per stage, metrics by
step, models registered with their own files, headline figures and lineage."""

import json
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


def test_versions_own_their_files_and_aliases_move(tmp_path):
    """The embedded SQLite store: each version is a copy of one checkpoint step and its tokenizer; the
    family alias moves to the newest version, @champion only to a better ChatCORE."""
    import shutil

    from serve_fixtures import make_tiny_checkpoint

    from nanochat_core import mlflow_model

    ckpt = make_tiny_checkpoint(str(tmp_path), family="chatsft_checkpoints")
    (tmp_path / "chatsft_checkpoints" / "d2" / "optim_000000_rank0.pt").write_bytes(b"optimizer state")
    parent = tracking.start_pipeline_run("tiny-test", {}, {})
    first = mlflow_model.register_checkpoint(tracking.start_stage_run(parent, "chat_sft", {}), ckpt, 0, "sft")
    second = mlflow_model.register_checkpoint(tracking.start_stage_run(parent, "chat_sft", {}), ckpt, 0, "sft")
    assert (first, second) == ("models:/nanochat/1", "models:/nanochat/2")
    client = MlflowClient(tracking.tracking_uri())
    assert client.get_registered_model("nanochat").aliases == {"sft": 2}
    experiment = client.get_run(parent).info.experiment_id
    assert len(client.search_logged_models([experiment])) == 2  # the models sit beside their runs, not in Default
    assert mlflow_model.record_chatcore(first, 0.2) and not mlflow_model.record_chatcore(second, 0.1)
    assert client.get_model_version_by_alias("nanochat", "champion").version == 1
    assert mlflow_model.record_chatcore(second, 0.3)
    assert client.get_model_version_by_alias("nanochat", "champion").tags["chatcore"] == "0.3"

    shutil.rmtree(tmp_path / "chatsft_checkpoints")  # moved aside / pruned by a later run
    shutil.rmtree(tmp_path / "tokenizer")
    for uri in (first, "models:/nanochat@sft", "models:/nanochat/latest"):
        local = mlflow_model.resolve_model_uri(uri)
        assert sorted(os.listdir(local)) == ["meta_000000.json", "model_000000.pt"]  # no optimizer state
        meta = json.loads(Path(local, "meta_000000.json").read_text())
        assert Path(meta["tokenizer_dir"], "tokenizer.pkl").is_file()
        assert meta["trained_tokenizer_dir"] == str(tmp_path / "tokenizer")


def test_registering_leaves_the_process_s_mlflow_uris_as_they_were(tmp_path):
    """Registration and models:/ downloads point MLflow's fluent URIs at the pipeline's store only while
    they run: a client this process opens later on another store, and a process it starts, see that store
    (a registry URI left set once sent a test's client on a tracking server to another test's SQLite file)."""
    import mlflow
    from serve_fixtures import make_tiny_checkpoint

    from nanochat_core import mlflow_model

    before = mlflow.get_registry_uri(), mlflow.get_tracking_uri()
    run = tracking.start_pipeline_run("t", {}, {})
    uri = mlflow_model.register_checkpoint(run, make_tiny_checkpoint(str(tmp_path)), 0, "base")
    mlflow_model.resolve_model_uri(uri)
    assert (mlflow.get_registry_uri(), mlflow.get_tracking_uri()) == before
    assert not {"MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"} & set(os.environ)
    assert MlflowClient(f"sqlite:///{tmp_path}/other.db").search_registered_models() == []


def test_registration_without_the_tokenizer_fails_loudly(tmp_path):
    import shutil

    import pytest
    from serve_fixtures import make_tiny_checkpoint

    from nanochat_core import mlflow_model

    ckpt = make_tiny_checkpoint(str(tmp_path))
    shutil.rmtree(tmp_path / "tokenizer")
    run = tracking.start_pipeline_run("t", {}, {})
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        mlflow_model.register_checkpoint(run, ckpt, 0, "base")


def test_headline_metrics_compare_pipeline_runs():
    refs = {"base_train": {"stage": "base_train", "val_bpb": 2.0, "stage_seconds": 60.0},
            "base_eval": {"stage": "base_eval", "val_bpb": 1.9, "core": 0.05, "stage_seconds": 30.0},
            "sft_eval": {"stage": "sft_eval", "ChatCORE": 0.1, "tasks": {"ARC-Easy": 0.3, "chatcore": 0.1},
                         "stage_seconds": 30.0},
            "download": {"stage": "download", "seconds": 5.0},
            "tok_eval": {"stage": "tok_eval", "stage_seconds": 2.0, "tasks": {"x": 1.0}}}
    got = tracking.headline_metrics(refs, wall_s=200.0, usd_per_device_hour=3.0, devices=8)
    assert got == {"base/val_bpb": 1.9, "base/core": 0.05, "sft/chatcore": 0.1, "sft/ARC-Easy": 0.3,
                   "time/base_train_s": 60.0, "time/base_eval_s": 30.0, "time/sft_eval_s": 30.0,
                   "time/download_s": 5.0, "time/tok_eval_s": 2.0, "time/total_s": 200.0,
                   "cost/est_usd": 120 / 3600 * 8 * 3.0}  # neither the download nor tok_eval takes a device


def test_lineage_tags_and_cached_stages(monkeypatch):
    monkeypatch.setenv("PREFECT_UI_URL", "http://127.0.0.1:4200")
    parent = tracking.start_pipeline_run("tiny-test", {}, {"preset": "tiny"}, flow_run_id="f-1")
    client = MlflowClient(tracking.tracking_uri())
    tags = client.get_run(parent).data.tags
    assert tags["prefect.flow_run_url"] == "http://127.0.0.1:4200/runs/flow-run/f-1"
    assert tags["mlflow.source.type"] and tags["mlflow.user"]
    experiment = client.get_experiment(client.get_run(parent).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    child = tracking.start_stage_run(parent, "base_train", {})
    tracking.log_dataset(child, "pretraining-shards", [{"file": "shard_00000.parquet", "size": 10}],
                         "file:///x/shard_{index:05d}.parquet", "abc123", tags={"rows": 7})
    (inp,) = client.get_run(child).inputs.dataset_inputs
    assert inp.dataset.name == "pretraining-shards" and inp.dataset.digest == "abc123"
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "train", "rows": "7"}

    later = tracking.start_pipeline_run("tiny-test", {}, {})
    cached = tracking.record_cached_stage(later, "base_train", {"run_id": child, "val_bpb": 2.5, "path": "/x"})
    run = client.get_run(cached)
    assert run.data.tags["cached"] == "true" and run.data.tags["source_run_id"] == child
    assert run.data.tags["mlflow.parentRunId"] == later and run.data.metrics["val_bpb"] == 2.5


def test_metric_names_mlflow_rejects_are_made_legal():
    assert tracking.metric_name("train/pass@4") == "train/pass_at_4"
    assert tracking.metric_name("eval/ARC-Easy") == "eval/ARC-Easy"
    run = tracking.start_pipeline_run("t", {}, {})
    assert tracking.log_metric_rows(run, [{"step": 1, "train/pass@4": 0.5, "odd#key": 1}]) == 2


def test_live_metrics_forward_each_row_once_at_its_own_time():
    run = tracking.start_pipeline_run("t", {}, {})
    with tracking.LiveMetrics(run, interval_s=0.05) as live:
        with open(live.path, "a") as f:
            f.write('{"step": 1, "time_ms": 1000, "train/loss": 3.0}\n{"step": 2, "time_ms": 2000, "train/lo')
        live.drain()
        assert live.forwarded == 1  # the torn line waits for its end
        with open(live.path, "a") as f:
            f.write('ss": 2.5}\n')
    client = MlflowClient(tracking.tracking_uri())
    history = client.get_metric_history(run, "train/loss")
    assert [(m.step, m.value, m.timestamp) for m in history] == [(1, 3.0, 1000), (2, 2.5, 2000)]
    assert "time_ms" not in client.get_run(run).data.metrics and not os.path.exists(live.path)


def test_a_failed_registration_is_reported_not_raised(tmp_path):
    """The stage trained; a registry that refuses its model costs a warning and a note in the ref."""
    import logging

    from flows.tasks import _register

    ref = {"path": str(tmp_path / "missing"), "step": 3}
    run = tracking.start_pipeline_run("t", {}, {})
    warnings: list[str] = []
    logger = logging.getLogger("test-register")
    logger.warning = warnings.append  # type: ignore[method-assign]
    _register("chat_sft", ref, run, logger)
    assert "model_uri" not in ref and ref["registration_error"].startswith("FileNotFoundError")
    assert warnings and "registering its checkpoint failed" in warnings[0]
