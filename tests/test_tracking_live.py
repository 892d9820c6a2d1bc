"""Live metrics: a real base_train process's rank-0 rows reach its MLflow run while it trains, each at
the wall time it was measured, and a stage that fails half-way leaves its curve so far.

What flows/tasks._execute does around a stage, without Prefect: `tracking.LiveMetrics` around
`launch.run_stage`, the run marked FAILED only after the curve is in."""

from __future__ import annotations

import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from nanochat_core import tracking
from nanochat_core.launch import StageFailed, run_stage
from nanochat_core.stage_args import resolve
from pretrain_data import make_pretraining_inputs
from test_base_train import config


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    make_pretraining_inputs(str(tmp_path))
    return tmp_path


def launch(cfg, run_id: str, outcome: dict) -> threading.Thread:
    """base_train in a child process, as the flow runs it, on a thread; `outcome` gets its ref or error."""
    def body():
        try:
            with tracking.LiveMetrics(run_id, interval_s=0.5) as live:
                outcome["ref"] = run_stage("base_train", cfg, lambda line: None, env=live.env,
                                           inputs=resolve("base_train", cfg))
        except StageFailed as e:
            outcome["error"] = e
            tracking.end_run(run_id, "FAILED")

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def test_the_loss_curve_grows_while_the_stage_runs(base):
    run_id = tracking.start_pipeline_run("live", {}, {})
    cfg = config(base, num_iterations=400, eval_every=-1, save_every=-1)
    outcome: dict = {}
    thread = launch(cfg, run_id, outcome)
    client = MlflowClient(tracking.tracking_uri())
    seen: list[int] = []  # points in MLflow at each poll while the process was still running
    while thread.is_alive():
        points = len(client.get_metric_history(run_id, "train/loss"))
        if thread.is_alive():
            seen.append(points)
        time.sleep(0.5)
    assert "ref" in outcome, outcome.get("error")
    during = sorted(set(p for p in seen if p))
    assert len(during) >= 3 and during[0] < 400, f"points seen while it ran: {seen}"  # it grew, live
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 401))  # each step once: nothing logged twice at the end
    stamps = [m.timestamp for m in history]
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] > 0  # measured times, not the time of logging
    assert "time_ms" not in client.get_run(run_id).data.metrics


def test_a_stage_that_fails_half_way_keeps_its_curve(base):
    run_id = tracking.start_pipeline_run("live-fail", {}, {})
    cfg = config(base, num_iterations=50, save_every=-1, eval_every=-1, grad_clip=0.0,
                 matrix_lr=1e30, embedding_lr=1e30, unembedding_lr=1e30)  # the loss turns nan: a UserError
    outcome: dict = {}
    launch(cfg, run_id, outcome).join(timeout=300)
    assert "loss became nan" in str(outcome["error"])
    client = MlflowClient(tracking.tracking_uri())
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps and steps == list(range(1, len(steps) + 1)) and len(steps) < 50
    assert client.get_run(run_id).info.status == "FAILED"
