"""One small Prefect task per stage: launch it (torchrun or a process), track it, return its ref.

The heavy lifting is `nanochat_core.launch.run_stage`; what each stage's task needs to know (the config
sections its cache key covers, whether it produces a model) is its record in nanochat_core.registry.
A retry of a resumable stage, like a new flow run of the same config, continues from the latest
checkpoint of the unfinished attempt (the stage matches its checkpoints' run key), it does not start over.

Placement: a stage that occupies the node's devices (its record's `devices`) carries the tag
`nanochat-devices:<node>`, whose Prefect concurrency limit is 1, so the server lets one such task run
enter Running at a time on a node; the others wait in Pending (shown so in the UI) and their run time,
and their MLflow child runs, start when they get the devices. At launch the stage gets every device
of the node (or its config's nproc_per_node) as torchrun processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path
from typing import Any

from prefect import get_client, get_run_logger, task
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterState, TaskRunFilterStateType, TaskRunFilterTags
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import TaskRunSort
from prefect.context import TaskRunContext
from prefect.filesystems import RemoteFileSystem
from prefect.results import get_result_store
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelled, Completed, Crashed

from flows.cache import StageCache
from nanochat_core import fencing, hardware, mlflow_model, tracking
from nanochat_core.artifacts import digest_of
from nanochat_core.config import PipelineConfig, flatten
from nanochat_core.data.user_files import list_files, listing_key
from nanochat_core.launch import StageStopped, run_stage
from nanochat_core.paths import base_dir, join
from nanochat_core.registry import STAGES
from nanochat_core.storage import is_local, local_path


def result_storage() -> Path | str:
    """Results and cache records live under the base dir, <base>/prefect_results: a fresh base dir never
    sees another's cache, and every worker that reaches the base dir sees this one's.

    Locally a path; for a remote base dir the name of the Remote File System block `claim_result_storage`
    saves (Prefect keeps a task's storage as a saved block, resolved by each task run).
    """
    root = base_dir()
    if is_local(root):
        return Path(join(local_path(root), "prefect_results"))
    return f"remote-file-system/{_result_block_name(root)}"


def _result_block_name(root: str) -> str:
    """One block per base dir, named after it (block names allow lowercase letters, digits, dashes)."""
    return "nanochat-results-" + hashlib.sha256(root.rstrip("/").encode()).hexdigest()[:12]


def claim_result_storage() -> str | None:
    """Save the block that `result_storage` names for a remote base dir (an upsert; the flow calls it once).

    The block holds the URL only: the store's endpoint and credentials come from each process's
    environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), so no secret lands on the Prefect server.
    """
    root = base_dir()
    if is_local(root):
        return None
    name = _result_block_name(root)
    RemoteFileSystem(basepath=join(root, "prefect_results")).save(name, overwrite=True)
    return name


def settings(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The config fields `stage` reads (its record's `reads`): they, and nothing else, enter its cache key."""
    fields = {name: cfg.model_dump(mode="json", include={name})[name] for name in STAGES[stage].reads}
    if stage == "corpus" and cfg.corpus.sources:
        # The files' listing (path, size, ETag or mtime; nothing read), so new or changed files re-run the
        # corpus and, through its ref's digest, every stage after it.
        fields["source_files"] = listing_key(list_files(cfg.corpus.sources))
    return fields


def device_tag() -> str:
    """This node's devices as a Prefect tag (the host, and its pinned GPUs when CUDA_VISIBLE_DEVICES says)."""
    return "nanochat-devices:" + hardware.node_id()


def device_tags(stage: str) -> list[str]:
    """The node-devices tag for a stage that occupies them: torch stages always, CPU-bound ones only on a
    node without GPUs (there they would take the torch stage's cores: two torch processes with 2 threads
    each on 2 cores run 10-40x slower than one, DESIGN.md §11)."""
    devices = STAGES[stage].devices
    if devices == "node" or (devices == "cores" and hardware.node_devices() == 0):
        return [device_tag()]
    return []


def claim_node_devices() -> str:
    """Make sure this node's devices tag has its concurrency limit of 1 (an upsert; the flow calls it once),
    and free the devices of runs that died with their node."""
    tag = device_tag()
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=tag, concurrency_limit=1)
        for name in release_orphaned_devices(client, tag):
            get_run_logger().warning(f"{name} was still Running on {tag} in a flow run (or attempt) that is over: "
                                     "marked Crashed")
    return tag


def release_orphaned_devices(client, tag: str) -> list[str]:
    """Crash the task runs that hold `tag` while their flow run is over; returns their names.

    When a node dies under a flow run, the zombie automation marks the flow run Crashed
    (flows/automations.py) but its task runs stay Running, and a task run's slot on a tag limit is only
    released when it leaves Running (the server's lease on it has a 100-year TTL, prefect 3.8.8's
    server/models/concurrency_limits.py): the devices would stay taken forever for the node's next run.
    A forced Crashed state releases it (Prefect's minimal policy still runs ReleaseTaskConcurrencySlots);
    the rehearsal's re-run logs the release and then gets the devices.
    """
    running = client.read_task_runs(
        task_run_filter=TaskRunFilter(tags=TaskRunFilterTags(all_=[tag]),
                                      state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING]))),
        sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=200,
    )
    orphans = [t for t in running if t.flow_run_id and _attempt_is_over(client, t)]
    for t in orphans:
        client.set_task_run_state(t.id, Crashed(message="its flow run ended while it ran (the node died)"), force=True)
    return [t.name for t in orphans]


def _attempt_is_over(client, task_run) -> bool:
    """The task run's flow run is over, or is running a later attempt (recovered by flows/recovery.py:
    the same flow-run id entered Running again after this task run started)."""
    flow_run = client.read_flow_run(task_run.flow_run_id)
    if flow_run.state.is_final():
        return True
    started = task_run.start_time or task_run.expected_start_time
    runs = [s.timestamp for s in client.read_flow_run_states(flow_run.id) if s.name == "Running"]
    return bool(started and runs and max(runs) > started)


def processes(cfg: PipelineConfig, stage: str) -> tuple[int, int]:
    """(nproc_per_node, nnodes) of a stage at launch: its setting (or devices_per_node), else every GPU
    this node reports; one process on CPU, where a process already uses every core."""
    if STAGES[stage].devices != "node":
        return 1, 1
    section = getattr(cfg, stage)
    nproc = cfg.nproc(stage)
    if nproc is None:
        gpus = hardware.node_devices()
        nproc = gpus if gpus and section.device_type != "cpu" else 1
    return nproc, getattr(section, "nnodes", 1)


def _execute(stage: str, cfg: PipelineConfig, inputs: dict[str, dict], parent_run_id: str | None):
    logger = get_run_logger()
    record = STAGES[stage]
    nproc_per_node, nnodes = processes(cfg, stage)
    task_run = TaskRunContext.get().task_run
    attempt = task_run.run_count
    if attempt > 1 and record.resumable:
        logger.info(f"attempt {attempt} of {stage}: it continues from the failed attempt's latest checkpoint")
    params = {k: v for k, v in flatten(cfg).items() if k.split(".")[0] in record.reads}
    run_id = tracking.start_stage_run(parent_run_id, stage, params, {"prefect.task_run": task_run.name}) if parent_run_id else None
    if run_id:
        _log_lineage(stage, cfg, inputs, run_id, logger)
    # Rank 0's metric rows reach the child run every ~2 s while the stage runs, and what is left when it
    # ends, fails or is stopped (so a failed run keeps its curve up to the failure).
    live = tracking.LiveMetrics(run_id) if run_id else None
    env = {"NANOCHAT_MLFLOW_RUN_ID": run_id, **live.env} if live else {}
    env.update(_fencing_env(task_run.flow_run_id))
    # System metrics (CPU, memory, GPU) only where they tell something: the long training stages.
    monitor = tracking.SystemMetrics(run_id) if run_id and record.resumable else contextlib.nullcontext()
    started = time.monotonic()
    try:
        with monitor, live or contextlib.nullcontext():
            ref = run_stage(stage, cfg, logger.info, nproc_per_node, nnodes, env, inputs)
    except StageStopped:
        if run_id:
            tracking.end_run(run_id, "KILLED")
        # Prefect persists a returned state's data under the task's cache key, which would replace a good
        # cached record with nothing (measured: the next run re-ran the stage). An unsaved record, kept
        # under another key, leaves the cache as it was.
        unsaved = get_result_store().create_result_record(None, key=f"cancelled-{task_run.id}")
        return Cancelled(message=f"{stage} was stopped: the flow run was cancelled", data=unsaved)
    except BaseException:
        if run_id:
            tracking.end_run(run_id, "FAILED")
        raise
    ref["stage_seconds"] = round(time.monotonic() - started, 3)
    if run_id:
        tracking.log_figures(run_id, ref)
        if record.family:
            _register(stage, ref, run_id, logger)
        if stage == "chat_eval":
            _crown(ref, inputs.get("model", {}), logger)
        tracking.end_run(run_id)
        ref["run_id"], ref["parent_run_id"] = run_id, parent_run_id
    if ref.get("unavailable_sources"):
        # Built without a source the registry refused (a withdrawn package): trusted for this run only.
        # No record under the cache key, so the next run runs the stage again, which asks the registry for
        # those sources alone (seconds) and rebuilds once one is back; the ref travels downstream in a
        # record under another key, as a cancelled stage's does.
        logger.warning(f"{stage} was built without {', '.join(ref['unavailable_sources'])}; "
                       "not cached: the next run asks the registry again")
        return Completed(data=get_result_store().create_result_record(ref, key=f"degraded-{task_run.id}"))
    return ref


def _fencing_env(flow_run_id) -> dict[str, str]:
    """Which flow run and attempt the stage works for, and the API that says whether it still does
    (nanochat_core/fencing.py asks before each checkpoint write). Environment only: no cache key sees it."""
    if flow_run_id is None:
        return {}
    with get_client(sync_client=True) as client:
        run_count = client.read_flow_run(flow_run_id).run_count
    env = {fencing.FLOW_RUN_ID_ENV: str(flow_run_id), fencing.ATTEMPT_ENV: str(run_count)}
    if url := PREFECT_API_URL.value():
        env["PREFECT_API_URL"] = url
    return env


def _register(stage: str, ref: dict, run_id: str, logger) -> None:
    """The final checkpoint as a new version of `nanochat`, alias @<family>. A failure is reported in the
    ref (`registration_error`) and the log; the trained stage still counts."""
    family = STAGES[stage].family
    try:
        ref["model_uri"] = mlflow_model.register_checkpoint(run_id, ref["path"], ref["step"], family, {"stage": stage})
        logger.info(f"registered {ref['path']} step {ref['step']} as {ref['model_uri']} (@{family})")
    except Exception as e:
        ref["registration_error"] = f"{type(e).__name__}: {e}"
        logger.warning(f"{stage} finished, but registering its checkpoint failed: {ref['registration_error']}")


def _crown(ref: dict, model: dict, logger) -> None:
    """Record a chat evaluation's ChatCORE on the version it scored; @champion moves if it is the best."""
    score, uri = ref.get("ChatCORE"), model.get("model_uri")
    if not isinstance(score, (int, float)) or not uri:
        return
    try:
        if mlflow_model.record_chatcore(uri, score):
            logger.info(f"{uri} is the champion now (ChatCORE {score:.4f})")
    except Exception as e:
        ref["registration_error"] = f"{type(e).__name__}: {e}"
        logger.warning(f"recording ChatCORE on {uri} failed: {ref['registration_error']}")


def _log_lineage(stage: str, cfg: PipelineConfig, inputs: dict[str, dict], run_id: str, logger) -> None:
    """What a training stage learned from, as MLflow dataset inputs: base_train the shard set (its files,
    hashes, row count, the URL template they came from), mid and SFT their task mixture."""
    try:
        if stage == "base_train" and "shards" in inputs:
            shards = inputs["shards"]
            files = [{"file": name, **entry} for name, entry in shards.get("manifest", {}).items()]
            tracking.log_dataset(run_id, "pretraining-shards", files, shards.get("url_template") or shards["path"],
                                 shards.get("digest"), tags={"rows": shards.get("total_rows"), "path": shards["path"]})
        elif stage in ("mid_train", "chat_sft"):
            specs = getattr(cfg, stage).tasks
            tracking.log_dataset(run_id, f"{stage}-mixture", [{"task": spec} for spec in specs], "nanochat_core.tasks",
                                 digest_of(specs)[:8])
    except Exception as e:  # lineage is a nicety; the stage runs without it
        logger.warning(f"logging the dataset inputs of {stage} failed: {e}")


def stage_task(stage: str, retries: int = 0):
    """The Prefect task for `stage`: cached by StageCache, results persisted under the base dir."""

    def adapter(stage: str, settings: dict, inputs: dict, cfg: PipelineConfig, parent_run_id: str | None) -> dict:
        return _execute(stage, cfg, inputs, parent_run_id)

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
        tags=device_tags(stage),
    )
