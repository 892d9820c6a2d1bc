"""`nanochat speedrun`: the `nanochat` flow on this machine with embedded defaults.

    nanochat speedrun --preset tiny
    nanochat speedrun --preset d4-cpu --set base_train.num_iterations=200 --refresh base_train

Embedded defaults: Prefect's local (ephemeral) API with its database in <base>/prefect, analytics off;
MLflow in sqlite:///<base>/mlflow.db; shards from the sample corpus. Set PREFECT_API_URL or
MLFLOW_TRACKING_URI to use servers instead. Ends with each stage's final state and time, where the
report is, and the commands that open both UIs on these stores.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import TaskRunSort

from nanochat_core import storage
from nanochat_core.artifacts import VERIFY_ENV
from nanochat_core.config import stage_names
from nanochat_core.data.packages import cache_root
from nanochat_core.errors import UserError, exit_on_user_error
from nanochat_core.flags import CommandParser, set_dotted
from nanochat_core.paths import base_dir
from nanochat_core.presets import PRESETS, get_preset
from nanochat_core.registry import STAGES
from nanochat_core.stage_args import refuse_gpu_preset_on_cpu
from nanochat_core.tracking import tracking_uri


def embedded_defaults(root: str) -> dict[str, str]:
    """Environment for a self-contained run: nothing leaves the machine, nothing lands in ~."""
    local = root if "://" not in root else str(cache_root())
    env = {
        "PREFECT_HOME": str(Path(local) / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",  # MLflow wants the word `true`
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # A fresh ephemeral database takes ~14 s to start here; the default 20 s is too tight on a busy CI box.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        # A stage waiting for the node's devices asks again after at most this long (default 30 s, which
        # would leave the devices idle between a tiny run's stages).
        "PREFECT_SERVER_TASKS_TAG_CONCURRENCY_SLOT_WAIT_SECONDS": "1",
    }
    return {k: v for k, v in env.items() if k not in os.environ}


def parse(argv: list[str] | None):
    parser = CommandParser(prog="nanochat speedrun", description="Run the whole pipeline as the `nanochat` Prefect flow.")
    parser.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)} (default: tiny)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                        help="override one config field, e.g. --set base_train.num_iterations=100 (repeatable)")
    parser.add_argument("--refresh", action="append", default=[], metavar="STAGE",
                        help=f"re-run this stage even if cached (repeatable); stages: {', '.join(stage_names())}")
    parser.add_argument("--skip", action="append", default=[], metavar="STAGE",
                        help="leave this stage out on purpose (repeatable); a stage name or its command (rl, base-eval)")
    parser.add_argument("--verify", choices=("etag", "full"), default="etag",
                        help="how a cache hit on an object-store base dir is checked: etag (sizes and ETags from one "
                             "listing, the default) or full (download and hash every file); a local base dir is always hashed")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    ns = parse(argv)
    cfg = get_preset(ns.preset)
    for assignment in ns.sets:
        cfg = set_dotted(cfg, assignment)
    torch_stages = [s for s in STAGES if STAGES[s].devices == "node"]
    refuse_gpu_preset_on_cpu(cfg, torch_stages, " ".join(f"--set {s}.device_type=cpu" for s in torch_stages))
    storage.check_writable(base_dir())  # every stage writes there, and Prefect's home sits under it
    os.environ.update(embedded_defaults(base_dir()))  # before Prefect is imported: it reads settings at import
    if ns.verify == "full":
        os.environ[VERIFY_ENV] = "full"  # read by every cache lookup (artifacts.verify)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)

    from flows.nanochat import nanochat, stage_list

    # Checked here too, before the flow starts: inside it a bad name would end in Prefect's traceback.
    skip, refresh = stage_list(ns.skip, "skip"), stage_list(ns.refresh, "refresh")
    started = time.time()
    state = nanochat(cfg, skip=skip, refresh=refresh, return_state=True)
    wall = time.time() - started
    # After a failure, downstream runs stay NotReady (never final): don't wait for them.
    rows = stage_summary(state.state_details.flow_run_id, 60 if state.is_completed() else 5)
    print(format_summary(rows, wall))
    if state.is_failed():
        print(f"\nthe run failed: {_failure(state)}", file=sys.stderr)
        raise SystemExit(1)
    result = state.result()
    report = result["refs"].get("report", {}).get("path")
    print(f"\nreport: {report}/report.md" if report else "\nreport: skipped")
    print(f"MLflow parent run: {result['mlflow_run_id']}")
    print("\nopen the UIs on these stores:")
    print(f"  PREFECT_HOME={os.environ['PREFECT_HOME']} {sys.prefix}/bin/prefect server start")

    print(f"  {sys.prefix}/bin/mlflow ui --backend-store-uri {tracking_uri()} --workers 1")


def stage_summary(flow_run_id, settle_s: float = 60) -> list[dict]:
    """Each task run of the flow run: name, final state (Completed / Cached / Failed) and seconds.

    Prefect 3 records task-run states through events the API applies a moment later, so right after the
    flow returns some runs can still read Pending / Running: wait (bounded) until every one is final.
    """
    deadline = time.time() + settle_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                         sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
            if all(r.state and r.state.is_final() for r in runs) or time.time() > deadline:
                break
            time.sleep(0.5)
    rows = []
    for run in sorted(runs, key=lambda r: r.expected_start_time or r.created):
        seconds = run.total_run_time.total_seconds() if run.total_run_time else 0.0
        rows.append({"stage": run.name, "state": run.state.name if run.state else "?", "seconds": seconds})
    return rows


def format_summary(rows: list[dict], wall: float) -> str:
    width = max([len(r["stage"]) for r in rows] + [5])
    lines = [f"{'stage':<{width}}  {'state':<10} {'time':>9}"]
    lines += [f"{r['stage']:<{width}}  {r['state']:<10} {r['seconds']:>8.1f}s" for r in rows]
    staged = sum(r["seconds"] for r in rows)
    # Stages overlap (downloads beside the tokenizer, evals beside training), so the sum can exceed the wall time.
    lines.append(f"{'total':<{width}}  {'':<10} {wall:>8.1f}s  (summed stage time {staged:.1f}s)")
    return "\n".join(lines)


def read_summary(stdout: str) -> dict[str, tuple[str, float]]:
    """{task run name: (state, seconds)} back from the table `format_summary` printed (tests, bench)."""
    rows, inside = {}, False
    for line in stdout.splitlines():
        parts = line.split()
        if parts[:2] == ["stage", "state"]:
            inside = True
        elif inside and (not parts or parts[0] == "total"):
            break
        elif inside:
            rows[parts[0]] = (parts[1], float(parts[-1].rstrip("s")))
    return rows


def _failure(state) -> str:
    try:
        state.result()
    except UserError as e:
        return str(e)
    except Exception as e:  # the stage's own message already carries its last lines
        return str(e).splitlines()[0]
    return state.message or "unknown error"
