"""MLflow tracking: one parent run per pipeline run, one child run per stage, curves forwarded live.

Embedded default: `sqlite:///<base>/mlflow.db` with artifacts in `<base>/mlartifacts`; a server when
`MLFLOW_TRACKING_URI` is set. Only the orchestrating process talks to MLflow: rank 0 of a stage writes
JSON-lines metrics, and `LiveMetrics` forwards them from a local copy while the stage runs, so no
training rank ever blocks on the tracking store. Models: nanochat_core.mlflow_model.

    mlflow ui --backend-store-uri sqlite:///<base>/mlflow.db --workers 1
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from nanochat_core.paths import base_dir, join

EXPERIMENT_ENV = "NANOCHAT_EXPERIMENT"
DEFAULT_EXPERIMENT = "nanochat"
MODEL_NAME = "nanochat"
# MLflow 3's experiment type; `mlflow ui` opens a custom_model_development experiment on its training
# runs (the other kind, genai_development, opens on traces).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# The launcher names a local file here; rank 0's MetricsLog appends every row to it as well (dist.py).
METRICS_TAIL_ENV = "NANOCHAT_METRICS_TAIL"
# Bookkeeping fields of a metrics row, not metrics.
ROW_FIELDS = ("step", "time_ms")

log = logging.getLogger(__name__)

# Offline defaults (DESIGN.md §11): MLflow must not phone home.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# Progress bars of artifact transfers would fill the stage logs with carriage returns.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


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


def client():
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    # The registry is the same store: left out, MlflowClient takes the process's fluent registry URI,
    # which mlflow keeps from the last set_registry_uri (another store, when the base dir changed).
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(c=None) -> str:
    c = c or client()
    name = os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        # A server keeps its own artifact root; a database file beside a local base dir keeps them there
        # (MLflow's default would be ./mlruns, wherever the process happens to run).
        server = tracking_uri().startswith(("http://", "https://"))
        artifacts = None if server or "://" in base_dir() else join(base_dir(), "mlartifacts")
        try:
            exp = c.get_experiment(c.create_experiment(name, artifact_location=artifacts))
        except Exception:  # created concurrently by another process
            exp = c.get_experiment_by_name(name)
    if exp.tags.get(EXPERIMENT_KIND[0]) is None:
        c.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


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


def context_tags(flow_run_id: str | None = None) -> dict[str, str]:
    """MLflow's standard tags (user, source, git commit where it finds one) from its context providers,
    the git sha of this code, and the Prefect flow run (its id; its page when PREFECT_UI_URL is set)."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = {"git_sha": git_sha()}
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
        ui = os.environ.get("PREFECT_UI_URL")
        if ui:
            tags["prefect.flow_run_url"] = f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}"
    return resolve_tags(tags)


def start_pipeline_run(run_name: str, params: dict[str, Any], tags: dict[str, str],
                       flow_run_id: str | None = None) -> str:
    """The parent run of one pipeline run; returns its id."""
    c = client()
    run = c.create_run(experiment_id(c), run_name=run_name, tags={**context_tags(flow_run_id), **tags})
    c.log_batch(run.info.run_id, params=_params(params))
    return run.info.run_id


def start_stage_run(parent_run_id: str, stage: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> str:
    """A child run for one stage under the pipeline's parent run (it inherits the parent's own tags)."""
    c = client()
    parent = c.get_run(parent_run_id)
    inherited = {k: v for k, v in parent.data.tags.items() if not k.startswith("mlflow.")}
    run = c.create_run(parent.info.experiment_id, run_name=stage,
                       tags={**inherited, **context_tags(), "mlflow.parentRunId": parent_run_id, "stage": stage,
                             **(tags or {})})
    c.log_batch(run.info.run_id, params=_params(params))
    return run.info.run_id


def record_cached_stage(parent_run_id: str, stage: str, ref: dict[str, Any], name: str | None = None) -> str:
    """A cached stage under a new parent: a FINISHED child tagged `cached=true` with the ref's figures,
    pointing at the run that produced them (`source_run_id`), so every parent lists every stage."""
    tags = {"cached": "true", "prefect.task_run": name or stage}
    if ref.get("run_id"):
        tags["source_run_id"] = ref["run_id"]
    if ref.get("model_uri"):
        tags["model_uri"] = ref["model_uri"]
    run_id = start_stage_run(parent_run_id, stage, {}, tags)
    log_figures(run_id, ref)
    end_run(run_id)
    return run_id


def metric_name(key: str) -> str:
    """A metric key MLflow accepts: `train/pass@4` -> `train/pass_at_4`; other odd characters -> `_`."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", key.replace("@", "_at_"))


def log_metric_rows(run_id: str, rows: Iterable[dict[str, Any]]) -> int:
    """Forward JSON-lines metric rows (`{"step": N, "time_ms": t, "train/loss": x, ...}`) to a run, each
    point at the wall time it was measured (`time_ms`, else now); returns the count."""
    from mlflow.entities import Metric

    c = client()
    now = int(time.time() * 1000)
    batch: list[Metric] = []
    count = 0
    for row in rows:
        step = int(row.get("step", 0))
        stamp = int(row.get("time_ms", now))
        for key, value in row.items():
            if key in ROW_FIELDS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            batch.append(Metric(metric_name(key), float(value), stamp, step))
        if len(batch) >= 900:  # MLflow's log_batch takes at most 1,000 metrics
            c.log_batch(run_id, metrics=batch)
            count += len(batch)
            batch = []
    if batch:
        c.log_batch(run_id, metrics=batch)
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
    """Scalar figures of a stage's ref as step-0 metrics (e.g. eval/core, val_bpb)."""
    log_metric_rows(run_id, [{"step": 0, **{k: v for k, v in figures.items() if isinstance(v, (int, float))}}])


class LiveMetrics:
    """Forward a stage's metric rows to its run while it runs: every `interval_s`, the rows rank 0 has
    appended since to a local file (`path`; the stage learns it from METRICS_TAIL_ENV, see `env`).

    The stage's own metrics.jsonl is no source: on an object store it is only rewritten at checkpoints.
    Leaving the block (the stage finished, failed or was stopped) forwards what is left, so a failed
    run keeps its curve up to the failure; each row is forwarded once. A tracking store that does not
    answer costs a warning, never the stage.
    """

    def __init__(self, run_id: str, interval_s: float = 2.0):
        self.run_id, self.interval_s = run_id, interval_s
        fd, self.path = tempfile.mkstemp(prefix="nanochat-metrics-", suffix=".jsonl")
        os.close(fd)
        self.offset, self.forwarded = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"live-metrics-{run_id[:8]}", daemon=True)

    @property
    def env(self) -> dict[str, str]:
        return {METRICS_TAIL_ENV: self.path}

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.drain()
        os.unlink(self.path)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.drain()

    def drain(self) -> None:
        """Forward the complete lines appended since the last call (a line still being written waits)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            end = chunk.rfind(b"\n") + 1
            rows = []
            for line in chunk[:end].splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
            if rows:
                self.forwarded += log_metric_rows(self.run_id, rows)
            self.offset += end
        except Exception as e:  # the store may be down for a moment; the rows stay in the file
            log.warning(f"live metrics for run {self.run_id}: {e}")


def log_dataset(run_id: str, name: str, records: list[dict[str, Any]], source: str, digest: str | None = None,
                context: str = "train", tags: dict[str, str] | None = None) -> None:
    """`records` (one row each: a shard, a task spec) as an MLflow dataset input of the run (its lineage)."""
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    dataset = mlflow.data.from_pandas(pd.DataFrame.from_records(records), source=source, name=name, digest=digest)
    input_tags = [InputTag("mlflow.data.context", context), *(InputTag(k, str(v)) for k, v in (tags or {}).items())]
    client().log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), input_tags)])


def log_artifact(run_id: str, local_path: str, artifact_path: str | None = None) -> None:
    c = client()
    if os.path.isdir(local_path):
        c.log_artifacts(run_id, local_path, artifact_path)
    else:
        c.log_artifact(run_id, local_path, artifact_path)


def log_dir(run_id: str, url: str, artifact_path: str) -> None:
    """A directory (local, or any fsspec URL: fetched through the storage layer first) as run artifacts."""
    from nanochat_core import storage

    if storage.is_local(url):
        log_artifact(run_id, storage.local_path(url), artifact_path)
        return
    with tempfile.TemporaryDirectory(prefix="nanochat-artifacts-") as tmp:
        for name in storage.listdir(url):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(storage.read_bytes(join(url, name)))
        log_artifact(run_id, tmp, artifact_path)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)


def stage_seconds(ref: dict[str, Any]) -> float | None:
    """How long a stage ran: what the orchestrator measured, else what the stage reported."""
    for key in ("stage_seconds", "seconds", "total_training_time_s", "train_seconds"):
        if isinstance(ref.get(key), (int, float)):
            return float(ref[key])
    return None


def eval_family(name: str) -> str | None:
    """The family a chat evaluation's ref name stands for (mid_eval -> mid); None for any other name."""
    from nanochat_core.registry import FAMILIES, eval_ref_name

    return next((f for f in FAMILIES if f != "base" and eval_ref_name(f) == name), None)


def headline_metrics(refs: dict[str, dict[str, Any]], wall_s: float | None = None,
                     usd_per_device_hour: float = 0.0, devices: int = 1) -> dict[str, float]:
    """The parent run's figures, one row per pipeline run in `mlflow ui`'s table:
    base/val_bpb, base/core and base/core_tasks; <family>/chatcore, <family>/chatcore_tasks and
    <family>/<task> per chat evaluation (mid_eval ->
    mid/...); time/<stage>_s per stage; time/total_s; cost/est_usd = the device stages' hours x devices
    x the price of a device-hour (plan.usd_per_gpu_hour)."""
    from nanochat_core.registry import STAGES

    out: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[metric_name(key)] = float(value)

    base_eval, base_train = refs.get("base_eval", {}), refs.get("base_train", {})
    put("base/val_bpb", base_eval.get("val_bpb", base_train.get("val_bpb")))
    put("base/core", base_eval.get("core"))
    put("base/core_tasks", base_eval.get("core_tasks"))  # how many CORE tasks the figure averages
    for name, ref in refs.items():
        family = eval_family(name)
        if family:
            put(f"{family}/chatcore", ref.get("ChatCORE"))
            put(f"{family}/chatcore_tasks", ref.get("chatcore_tasks"))
            for task, acc in (ref.get("tasks") or {}).items():
                if task != "chatcore":
                    put(f"{family}/{task}", acc)
    device_seconds = 0.0
    for name, ref in refs.items():
        seconds = stage_seconds(ref)
        put(f"time/{name}_s", seconds)
        stage = "chat_eval" if eval_family(name) else name
        if seconds is not None and stage in STAGES and STAGES[stage].devices == "node":
            device_seconds += seconds
    put("time/total_s", wall_s)
    if usd_per_device_hour:
        put("cost/est_usd", device_seconds / 3600 * max(1, devices) * usd_per_device_hour)
    return out


def log_headline(run_id: str, metrics: dict[str, float]) -> None:
    log_metric_rows(run_id, [{"step": 0, **metrics}])


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
