"""Fencing: a stage whose flow run has moved on writes no more checkpoints.

The heartbeat automation (flows/automations.py) marks Crashed a node that is alive but cut off, and the
recovery automation puts its run back in the pool; once another worker runs the next attempt, two
writers would share one checkpoint directory. So before every checkpoint write a stage asks the Prefect
API whether its attempt still owns the run (`check_owner`, called by checkpoint.save_checkpoint):

    NANOCHAT_FLOW_RUN_ID, NANOCHAT_FLOW_RUN_ATTEMPT   set by the flow's task adapter (flows/tasks.py)
    PREFECT_API_URL (PREFECT_API_KEY or PREFECT_API_AUTH_STRING when the server wants one)

The attempt owns the run while the run's `run_count` is that attempt and the run is Running, Cancelling
(a person stops it: the checkpoint is still a good one), or AwaitingRetry, or Pending right after
AwaitingRetry: its own supervisor put it back in the pool on SIGTERM (PREFECT_FLOW_RUN_EXECUTE_SIGTERM_
BEHAVIOR=reschedule proposes AwaitingRetry *before* it signals the flow, prefect 3.8.8's cli/flow_run.py),
and the stage is writing its checkpoint on notice. Anything else (Crashed, the recovery automation's
`Recovering`, a final state, a later attempt Running) stops the stage with `Fenced` before it writes.
A stage run alone (no flow-run id, or no API URL: the CLI, `nanochat speedrun`'s ephemeral API) is never
fenced. The check is one GET (~10 ms on loopback) per rank per checkpoint; the library imports no prefect.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.request

from nanochat_core.errors import UserError

FLOW_RUN_ID_ENV = "NANOCHAT_FLOW_RUN_ID"
ATTEMPT_ENV = "NANOCHAT_FLOW_RUN_ATTEMPT"
# How long an unreachable API is retried before the stage stops: the heartbeat automation marks a run
# Crashed after 60 s without a heartbeat, so a stage that cannot reach the server for that long may
# already have a successor; a server restart (~10-20 s for `prefect server start` here) passes within it.
UNREACHABLE_S = 60.0
OWNING_STATES = {"Running", "Cancelling", "AwaitingRetry"}


class Fenced(UserError):
    """This attempt no longer owns its flow run: another attempt may be writing the same checkpoints."""


def check_owner(what: str) -> None:
    """Return if this process may write `what` (a checkpoint); raise `Fenced` with one sentence if not."""
    run_id, attempt = os.environ.get(FLOW_RUN_ID_ENV), os.environ.get(ATTEMPT_ENV)
    api = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if not (run_id and attempt and api):
        return
    run = _get(api, f"/flow_runs/{run_id}", what)
    state = run.get("state") or {}
    name, run_count = state.get("name", "?"), run.get("run_count")
    if run_count != int(attempt):
        raise Fenced(f"not writing {what}: flow run {run_id} is on attempt {run_count} now and this is attempt "
                     f"{attempt}, whose node was given up for dead; the newer attempt owns the directory")
    if name in OWNING_STATES or (name == "Pending" and _came_back_on_notice(api, run_id, what)):
        return
    raise Fenced(f"not writing {what}: flow run {run_id} is {name} ({state.get('message') or 'no message'}), "
                 f"so attempt {attempt} no longer owns it; a recovered attempt continues from the last checkpoint")


def _came_back_on_notice(api: str, run_id: str, what: str) -> bool:
    """A Pending run is owned by the attempt that wrote it back as AwaitingRetry (its stage may still be
    checkpointing on notice); not by one the automation recovered from Crashed."""
    states = sorted(_get(api, f"/flow_run_states/?flow_run_id={run_id}", what), key=lambda s: s["timestamp"])
    before = [s["name"] for s in states if s["name"] != "Pending"]
    return bool(before) and before[-1] == "AwaitingRetry"


def _get(api: str, path: str, what: str):
    request = urllib.request.Request(api + path, headers=_auth_headers())
    deadline = time.monotonic() + UNREACHABLE_S
    delay = 1.0
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code < 500:  # 404: the run is gone (deleted); 401/403: no rights. Neither passes with time.
                raise Fenced(f"not writing {what}: the Prefect API answered {e.code} for {path}") from None
            error = f"HTTP {e.code}"
        except (OSError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
        if time.monotonic() + delay > deadline:
            raise Fenced(f"not writing {what}: the Prefect API at {api} did not answer for {UNREACHABLE_S:.0f} s "
                         f"({error}), so this attempt may have been given up for dead") from None
        time.sleep(delay)
        delay = min(delay * 2, 10.0)


def _auth_headers() -> dict[str, str]:
    if key := os.environ.get("PREFECT_API_KEY"):
        return {"Authorization": f"Bearer {key}"}
    if auth := os.environ.get("PREFECT_API_AUTH_STRING"):
        return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
    return {}
