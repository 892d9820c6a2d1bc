"""MLflow tracking: one parent run per pipeline run, one child run per executed stage.

Embedded default: `sqlite:///<base>/mlflow.db` with artifacts in `<base>/mlartifacts`; a server when
`MLFLOW_TRACKING_URI` is set. Only the orchestrating process talks to MLflow: stages write JSON-lines
metrics (rank 0 only) that are forwarded here, so no training rank ever blocks on the tracking store.

    mlflow ui --backend-store-uri sqlite:///<base>/mlflow.db --workers 1
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Iterable

from nanochat_core.paths import base_dir, join

EXPERIMENT_ENV = "NANOCHAT_EXPERIMENT"
DEFAULT_EXPERIMENT = "nanochat"
MODEL_NAME = "nanochat"

# Offline defaults (DESIGN.md §11): MLflow must not phone home.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the SQLite file under the base dir (always absolute)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = base_dir()
    if "://" in root:
        raise RuntimeError(
            f"the base dir {root} is remote, so MLflow needs a server; set MLFLOW_TRACKING_URI"
        )
    return f"sqlite:///{root}/mlflow.db"


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def experiment_id(client=None) -> str:
    client = client or _client()
    name = os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else join(base_dir(), "mlartifacts")
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except Exception:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _params(params: dict[str, Any]):
    from mlflow.entities import Param

    # MLflow caps a param value at 6,000 characters; ours are short, but a URL template could be long.
    return [Param(k, str(v)[:6000]) for k, v in params.items()]


def start_pipeline_run(run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """The parent run of one pipeline run; returns its id."""
    client = _client()
    run = client.create_run(experiment_id(client), run_name=run_name,
                            tags={"git_sha": git_sha(), **tags})
    client.log_batch(run.info.run_id, params=_params(params))
    return run.info.run_id


def start_stage_run(parent_run_id: str, stage: str, params: dict[str, Any]) -> str:
    """A child run for one executed stage under the pipeline's parent run."""
    client = _client()
    parent = client.get_run(parent_run_id)
    run = client.create_run(parent.info.experiment_id, run_name=stage,
                            tags={"mlflow.parentRunId": parent_run_id, "stage": stage,
                                  **{k: v for k, v in parent.data.tags.items() if not k.startswith("mlflow.")}})
    client.log_batch(run.info.run_id, params=_params(params))
    return run.info.run_id


def metric_name(key: str) -> str:
    """A metric key MLflow accepts: `train/pass@4` -> `train/pass_at_4`; other odd characters -> `_`."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", key.replace("@", "_at_"))


def log_metric_rows(run_id: str, rows: Iterable[dict[str, Any]]) -> int:
    """Forward JSON-lines metric rows (`{"step": N, "train/loss": x, ...}`) to a run; returns the count."""
    import time

    from mlflow.entities import Metric

    client = _client()
    now = int(time.time() * 1000)
    batch: list[Metric] = []
    count = 0
    for row in rows:
        step = int(row.get("step", 0))
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            batch.append(Metric(metric_name(key), float(value), int(row.get("time_ms", now)), step))
        if len(batch) >= 900:  # MLflow's log_batch takes at most 1,000 metrics
            client.log_batch(run_id, metrics=batch)
            count += len(batch)
            batch = []
    if batch:
        client.log_batch(run_id, metrics=batch)
        count += len(batch)
    return count


def read_jsonl(path: str) -> list[dict[str, Any]]:
    from nanochat_core import storage

    if not storage.exists(path):
        return []
    rows = []
    for line in storage.read_text(path).splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash; the rest still counts
    return rows


def log_figures(run_id: str, figures: dict[str, Any]) -> None:
    """Scalar figures of a stage's ref as step-0 metrics (e.g. eval/core, val/bpb)."""
    log_metric_rows(run_id, [{"step": 0, **{k: v for k, v in figures.items() if isinstance(v, (int, float))}}])


def log_artifact(run_id: str, local_path: str, artifact_path: str | None = None) -> None:
    client = _client()
    if os.path.isdir(local_path):
        client.log_artifacts(run_id, local_path, artifact_path)
    else:
        client.log_artifact(run_id, local_path, artifact_path)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    _client().set_terminated(run_id, status=status)


def register_checkpoint(run_id: str, checkpoint_dir: str, tags: dict[str, str] | None = None) -> str:
    """Register a checkpoint directory, where it lies, as a new version of the `nanochat` model.

    The version's source is the directory itself (a path or fsspec URL), so a multi-GB checkpoint is not
    copied into the artifact store. Returns the model URI (`models:/nanochat/<version>`).
    """
    client = _client()
    try:
        client.get_registered_model(MODEL_NAME)
    except Exception:
        try:
            client.create_registered_model(MODEL_NAME)
        except Exception:  # registered concurrently
            pass
    source = checkpoint_dir if "://" in checkpoint_dir else f"file://{checkpoint_dir}"
    version = client.create_model_version(MODEL_NAME, source=source, run_id=run_id, tags=tags or {})
    return f"models:/{MODEL_NAME}/{version.version}"


def resolve_model_uri(uri: str) -> str:
    """`models:/nanochat/3` (or `models:/nanochat/latest`) -> the checkpoint directory it was registered from."""
    _, _, rest = uri.partition("models:/")
    name, _, version = rest.partition("/")
    client = _client()
    if version in ("", "latest"):
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise LookupError(f"no versions of model {name!r} in {tracking_uri()}")
        version = str(max(int(v.version) for v in versions))
    source = client.get_model_version(name, version).source
    return source[len("file://"):] if source.startswith("file://") else source


class SystemMetrics:
    """CPU, memory and (where present) GPU utilisation logged to a run while a stage trains."""

    def __init__(self, run_id: str, interval_s: float = 10):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=tracking_uri())

    def __enter__(self):
        self.monitor.start()
        return self

    def __exit__(self, *exc):
        self.monitor.finish()
