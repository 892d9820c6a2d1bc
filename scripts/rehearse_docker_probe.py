"""What scripts/rehearse_docker.py asks inside the stack: run in a container of the worker image with
`docker exec -i <container> python - <command> [args]` (this file on stdin), it reads Prefect, MLflow and
the stack's S3 as any node does and prints one JSON value. Never run on the host.

    wait-checkpoint DIR TIMEOUT       first complete checkpoint step in DIR (null on timeout)
    wait-state FLOW_RUN TIMEOUT KIND  the flow run's state once it is KIND (crashed | final | settled: final
                                      but not Crashed), task-run states
    run-info FLOW_RUN                 its state and task-run states
    losses DIR                        train/loss per step from DIR/metrics.jsonl, and DIR/result.json
    objects DIR                       every object under DIR: name -> [LastModified (epoch s), size]
    verify DIR                        each complete checkpoint loads (model, meta, every rank's optimizer)
    tracking FLOW_RUN                 the MLflow parent of the flow run, its children and registered aliases
"""

from __future__ import annotations

import json
import sys
import time


def wait_checkpoint(ckpt: str, timeout: str):
    from nanochat_core import checkpoint, storage

    deadline = time.time() + float(timeout)
    while time.time() < deadline:
        if storage.exists(ckpt) and (step := checkpoint.latest_step(ckpt)):
            return step
        time.sleep(1)
    return None


def _client():
    from prefect import get_client

    return get_client(sync_client=True)


def _info(client, flow_run_id: str) -> dict:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    run = client.read_flow_run(flow_run_id)
    tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200)
    return {"state": run.state.name if run.state else None, "type": run.state.type.value if run.state else None,
            "message": (run.state.message or "")[:300] if run.state else "", "run_count": run.run_count,
            "tasks": {t.name: t.state.name if t.state else "?" for t in tasks}}


def wait_state(flow_run_id: str, timeout: str, kind: str):
    deadline = time.time() + float(timeout)
    with _client() as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            # settled: final and not Crashed (the recovery automation takes a Crashed run back to the pool)
            # crashed: ever Crashed (the recovery automation moves it on within a second)
            done = run.state and (any(st.is_crashed() for st in client.read_flow_run_states(flow_run_id))
                                  if kind == "crashed" else
                                  run.state.is_final() and not (kind == "settled" and run.state.is_crashed()))
            if done or time.time() > deadline:
                return {**_info(client, flow_run_id), "reached": bool(done)}
            time.sleep(1)


def run_info(flow_run_id: str):
    with _client() as client:
        return _info(client, flow_run_id)


def losses(ckpt: str):
    from nanochat_core import storage

    storage.exists(ckpt)  # drops a cached listing
    rows = [json.loads(line) for line in storage.read_text(f"{ckpt}/metrics.jsonl").splitlines() if line.strip()]
    result = json.loads(storage.read_text(f"{ckpt}/result.json")) if storage.exists(f"{ckpt}/result.json") else {}
    return {"losses": [r["train/loss"] for r in rows if "train/loss" in r],
            "resumed_from": result.get("resumed_from"), "has_result": bool(result)}


def objects(prefix: str):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    out = {}
    for path, info in fs.find(prefix.removeprefix("s3://"), detail=True).items():
        out[path.rsplit("/", 1)[-1]] = [info["LastModified"].timestamp(), info["size"]]
    return out


def verify(ckpt: str):
    from nanochat_core import checkpoint

    steps, report = checkpoint.complete_steps(ckpt), {}
    for step in steps:
        meta = checkpoint.read_meta(ckpt, step)
        checkpoint.load_model_state(ckpt, step)
        for rank in range(meta["world_size"]):
            checkpoint.load_rank_state(ckpt, step, rank)
        report[step] = meta["world_size"]
    return {"steps": steps, "loaded": report, "unreadable": checkpoint.unreadable_metas(ckpt, None)}


def tracking(flow_run_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name("nanochat")
    parents = client.search_runs([exp.experiment_id],
                                 f"tags.`prefect.flow_run_id` = '{flow_run_id}' and tags.mlflow.parentRunId IS NULL")
    if len(parents) != 1:
        return {"parents": len(parents)}
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    aliases = {}
    for alias in ("base", "mid", "sft", "rl", "champion"):
        try:
            aliases[alias] = client.get_model_version_by_alias("nanochat", alias).source
        except Exception as e:  # a missing alias is the finding, not a crash of the probe
            aliases[alias] = f"missing: {type(e).__name__}"
    return {"parents": 1, "children": sorted(c.info.run_name for c in children),
            "metrics": sorted(parents[0].data.metrics), "aliases": aliases}


COMMANDS = {"wait-checkpoint": wait_checkpoint, "wait-state": wait_state, "run-info": run_info, "losses": losses,
            "objects": objects, "verify": verify, "tracking": tracking}

if __name__ == "__main__":
    try:
        value = COMMANDS[sys.argv[1]](*sys.argv[2:])
    except Exception as e:  # the driver prints it as a failed check
        value = {"error": f"{type(e).__name__}: {e}"}
    print("PROBE " + json.dumps(value), flush=True)
