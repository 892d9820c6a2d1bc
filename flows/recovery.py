"""Recovery without a person, bounded: a run that crashed, was preempted, or whose stage failed runs again
by itself on whichever worker of the pool is free, at most NANOCHAT_MAX_ATTEMPTS times (default 3).

    NANOCHAT_MAX_ATTEMPTS=3     a deployment's job variable (deployments/prefect.yaml), or the worker's env

Two Prefect 3.8.8 mechanisms put the run back in the pool, both keeping its flow-run id, so the attempts
are one run in the UI and its `run_count` (incremented each time it enters Running) counts them:
- Notice: `PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR=reschedule` (deployments/prefect.yaml). A SIGTERMed
  `prefect flow-run execute` (the command of docker and kubernetes jobs; the process pools run it too)
  proposes AwaitingRetry, then SIGTERMs the flow process and waits 30 s before SIGKILL (prefect's
  cli/flow_run.py and runner/_process_manager.py: `kill(grace_seconds=30)`). The flow's interruption
  handler stops its stages with launch.stop_all, which gives a torch stage its grace to write a
  checkpoint on notice. The run is back in the pool before that checkpoint is written (Prefect's order):
  a free worker took it 4 s after AwaitingRetry and its attempt was Running 14 s after, while the old
  flow was still stopping (a probe flow with an 8 s stop, this machine, Dec 2026). Fencing
  (nanochat_core/fencing.py) lets the old attempt write until the new one is Running; a notice checkpoint
  that comes later is refused and the new attempt continues from the periodic one before it.
- Death: the heartbeat automation marks Crashed a run whose node stopped beating; the recovery
  automation (flows/automations.py) answers every Crashed nanochat run with a forced Scheduled state
  named `Recovering`. A stage that fails ends its attempt Crashed too, with the failure as message:
  on a pool the fault may be the node's (a bad GPU, a full disk), and a deterministic one costs only
  its own stage again, everything before it being Cached (Ray Train's FailureConfig(max_failures) counts
  failures the same way).
Automations count nothing, so the flow enforces the bound: at start it reads its `run_count`, and past
the bound it ends Failed (not Crashed, which would trigger the automation again) with one line naming
every attempt. A stage failing in the last allowed attempt ends the run Failed the same way.

A cancel by a person is never recovered. A stage cannot tell a cancel from a preemption by its signal,
so the flow decides from its own state on the API: Cancelling means a person asked, and a run that was
Cancelling since its last attempt began ends Cancelled instead of running again.
"""

from __future__ import annotations

import os
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import State
from prefect.exceptions import UnfinishedRun
from prefect.states import Cancelled, Crashed, Failed

from nanochat_core.errors import UserError
from nanochat_core.launch import StageFailed

MAX_ATTEMPTS_ENV = "NANOCHAT_MAX_ATTEMPTS"
DEFAULT_MAX_ATTEMPTS = 3
RECOVERING = "Recovering"  # the name of the Scheduled state the recovery automation sets


def max_attempts() -> int:
    raw = os.environ.get(MAX_ATTEMPTS_ENV, str(DEFAULT_MAX_ATTEMPTS))
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{MAX_ATTEMPTS_ENV}={raw!r} is not a number of attempts; set it to 1 or more (default "
                        f"{DEFAULT_MAX_ATTEMPTS}) in the deployment's job variables")
    return value


def attempts(states: list[State]) -> list[str]:
    """`Crashed (why)` for each attempt that ended, oldest first: an attempt begins at a Running state and
    ends at the first state after it that is neither Running nor Cancelling."""
    ended, running = [], False
    for state in sorted(states, key=lambda s: s.timestamp):
        if state.name == "Running":
            running = True
        elif running and state.name != "Cancelling":
            reason = " ".join((state.message or "no message").split())
            ended.append(f"{state.name} ({reason[:160]})")
            running = False
    return ended


def cancelled_by_a_person(states: list[State]) -> bool:
    """A Cancelling state during the previous attempt (between the last two Running states): someone
    asked the run to stop, and whatever ended it afterwards (a crash on the way down) is no preemption."""
    names = [s.name for s in sorted(states, key=lambda s: s.timestamp)]
    starts = [i for i, n in enumerate(names) if n == "Running"]
    return len(starts) >= 2 and "Cancelling" in names[starts[-2]:starts[-1]]


def begin_attempt(flow_run_id: UUID) -> tuple[int, State | None]:
    """(this attempt's number, None) to run, or (number, the final state to end in) when the run is past
    its bound or a person cancelled it before it was recovered."""
    bound = max_attempts()
    with get_client(sync_client=True) as client:
        attempt = client.read_flow_run(flow_run_id).run_count
        states = client.read_flow_run_states(flow_run_id)
    if cancelled_by_a_person(states):
        return attempt, Cancelled(message="cancelled by a person during the previous attempt: not run again")
    if attempt > bound:
        return attempt, Failed(message=gave_up(bound, attempts(states)))
    return attempt, None


def gave_up(bound: int, ended: list[str]) -> str:
    listed = "; ".join(f"attempt {i} {what}" for i, what in enumerate(ended, 1))
    return f"gave up after {len(ended)} attempts, the most {MAX_ATTEMPTS_ENV}={bound} allows: {listed}"


def after_failure(flow_run_id: UUID, attempt: int, error: Exception, since: float) -> State:
    """The state a failed attempt ends in: Crashed (the automation runs it again) while attempts are
    left, else Failed with the line naming every attempt. `since`: when this attempt began (epoch s)."""
    reason = one_line(error)
    if isinstance(error, UnfinishedRun):  # a stage that never ran because one before it failed: name that one
        reason = first_failed_task(flow_run_id, since) or reason
    bound = max_attempts()
    if attempt < bound:
        return Crashed(message=f"attempt {attempt} of {bound}: {reason}; the run goes back to the pool")
    with get_client(sync_client=True) as client:
        ended = attempts(client.read_flow_run_states(flow_run_id))
    return Failed(message=gave_up(bound, [*ended, f"Failed ({reason})"]))


def first_failed_task(flow_run_id: UUID, since: float) -> str | None:
    """`<task>: <last line of its failure>` for the first task run of this attempt that failed."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200)
    failed = sorted((t for t in runs if t.state and t.state.is_failed() and t.state.timestamp.timestamp() >= since),
                    key=lambda t: t.state.timestamp)
    if not failed:
        return None
    lines = [line.strip() for line in (failed[0].state.message or "").splitlines() if line.strip()]
    return f"{failed[0].name}: {lines[-1][:200] if lines else 'failed'}"


def one_line(error: BaseException) -> str:
    if isinstance(error, StageFailed):
        last = next((line.strip() for line in reversed(error.tail) if line.strip()), "no output")
        return f"{error.stage} exited with status {error.returncode}: {last[:200]}"
    return " ".join(f"{type(error).__name__}: {error}".split())[:240]


def interrupted_by_a_person(flow_run_id: UUID) -> bool:
    """Whether the run being interrupted now is Cancelling (a person) rather than preempted."""
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
    except Exception:  # the API is what we would ask; without it, treat the stop as a preemption
        return False
    return state is not None and state.name == "Cancelling"
