"""One small Prefect task per stage: launch it (torchrun or a process), track it, return its ref.

The heavy lifting is `nanochat_core.launch.run_stage`; each task here only says which stage runs, which
config sections its cache key covers, and how many processes it gets. A retry resumes from the
stage's latest checkpoint (`resume=True`), it does not start over.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.context import TaskRunContext

from flows.cache import StageCache
from nanochat_core import tracking
from nanochat_core.config import PipelineConfig, flatten
from nanochat_core.launch import run_stage
from nanochat_core.paths import base_dir, join

# The config sections each stage reads: they, and nothing else, enter its cache key.
SECTIONS: dict[str, list[str]] = {
    "corpus": ["corpus"],
    "download": ["download"],
    "tok_train": ["tok_train"],
    "tok_eval": ["tok_eval"],
    "eval_bundle": ["eval_bundle"],
    "base_train": ["base_train"],
    "base_eval": ["base_eval", "core"],
    "mid_train": ["mid_train"],
    "chat_sft": ["chat_sft"],
    "chat_rl": ["chat_rl"],
    "chat_eval": ["chat_eval"],
    "report": ["plan"],
}
# Stages that train from checkpoints: a retry continues from the latest one.
RESUMABLE = {"base_train"}
# Stages whose output is a model: registered as a version of the MLflow model `nanochat`.
CHECKPOINT_STAGES = {"base_train", "mid_train", "chat_sft", "chat_rl"}


def result_storage() -> Path | None:
    """Results and cache records live under the base dir: a fresh base dir never sees another's cache.

    For a remote base dir, Prefect's configured default storage (PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK).
    """
    root = base_dir()
    return None if "://" in root else Path(join(root, "prefect_results"))


def settings(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    return {section: getattr(cfg, section).model_dump(mode="json") for section in SECTIONS[stage]}


def _execute(stage: str, cfg: PipelineConfig, inputs: dict[str, dict], parent_run_id: str | None,
             nproc_per_node: int = 1, nnodes: int = 1) -> dict[str, Any]:
    logger = get_run_logger()
    attempt = TaskRunContext.get().task_run.run_count
    if attempt > 1 and stage in RESUMABLE:
        logger.info(f"attempt {attempt}: resuming {stage} from its latest checkpoint")
        section = getattr(cfg, stage)
        cfg = cfg.model_copy(update={stage: section.model_copy(update={"resume": True})})
    params = {k: v for k, v in flatten(cfg).items() if k.split(".")[0] in SECTIONS[stage]}
    run_id = tracking.start_stage_run(parent_run_id, stage, params) if parent_run_id else None
    env = {"NANOCHAT_MLFLOW_RUN_ID": run_id} if run_id else {}
    # System metrics (CPU, memory, GPU) only where they tell something: the long training stages.
    monitor = tracking.SystemMetrics(run_id) if run_id and stage in RESUMABLE else contextlib.nullcontext()
    try:
        with monitor:
            ref = run_stage(stage, cfg, logger.info, nproc_per_node, nnodes, env, inputs)
    except BaseException:
        if run_id:
            tracking.end_run(run_id, "FAILED")
        raise
    if run_id:
        if ref.get("metrics_path"):
            tracking.log_metric_rows(run_id, tracking.read_jsonl(ref["metrics_path"]))
        tracking.log_figures(run_id, ref)
        if stage in CHECKPOINT_STAGES:
            ref["model_uri"] = tracking.register_checkpoint(run_id, ref["path"], {"stage": stage})
            logger.info(f"registered {ref['path']} as {ref['model_uri']}")
        tracking.end_run(run_id)
        ref["run_id"] = run_id
    return ref


def stage_task(stage: str, retries: int = 0):
    """The Prefect task for `stage`: cached by StageCache, results persisted under the base dir."""

    def adapter(stage: str, settings: dict, inputs: dict, cfg: PipelineConfig,
                parent_run_id: str | None, nproc_per_node: int = 1, nnodes: int = 1) -> dict:
        return _execute(stage, cfg, inputs, parent_run_id, nproc_per_node, nnodes)

    adapter.__name__ = adapter.__qualname__ = stage
    return task(
        adapter,
        name=stage,
        task_run_name=stage,
        cache_policy=StageCache(),
        persist_result=True,
        result_storage=result_storage(),
        retries=retries,
        retry_delay_seconds=5,
    )
