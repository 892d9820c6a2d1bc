"""The Prefect automations of a nanochat server: dead nodes' runs become Crashed, and Crashed runs go
back to the pool.

    python -m flows.automations            # against PREFECT_API_URL, once per server (idempotent)

A flow run whose node dies (spot preemption, a kernel panic, SIGKILL of the worker and all under it)
cannot report its own end: the server would show it Running forever. Flow runs send a heartbeat event
every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (the deployments set 30, Prefect's minimum; the default
is 180); the first automation marks a run Crashed when neither a heartbeat nor any other event of the
run (a state change: a final state, or AwaitingRetry when it went back to the pool on notice) followed
its last heartbeat within MISSED_AFTER_S. A preempted run therefore shows Crashed 60-90 s after its node
died. Its task runs are left Running by the server; the node's next flow run crashes them and so frees
the node's devices (flows/tasks.release_orphaned_devices).

The second automation recovers: every Crashed run of the `nanochat` flow (dead node, a crash, or an
attempt whose stage failed: flows/recovery.py) is set to Scheduled (named `Recovering`, forced, since
Crashed is final), keeping its flow-run id; whichever worker of its pool is free runs the next attempt,
which finds the finished stages Cached and continues training from the latest checkpoint. Automations
count nothing: the flow ends Failed (which no automation answers) past NANOCHAT_MAX_ATTEMPTS.
"""

from __future__ import annotations

from datetime import timedelta

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

from flows.recovery import RECOVERING

NAME = "nanochat: crash flow runs whose node stopped beating"
RECOVERY_NAME = "nanochat: run crashed flow runs again"
FLOW = "nanochat"  # flows/nanochat.py's flow name
HEARTBEAT_S = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY in deployments/prefect.yaml
MISSED_AFTER_S = 60  # two heartbeats missed


def zombie_detection() -> Automation:
    return Automation(
        name=NAME,
        description=f"A flow run with no heartbeat for {MISSED_AFTER_S} s after its last one is marked Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            # Any event of the run: a heartbeat, a final state, or AwaitingRetry / Recovering (back in the
            # pool: the next attempt's heartbeats start when a worker takes it, possibly minutes later).
            expect={"prefect.flow-run.*"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=MISSED_AFTER_S),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message="no heartbeat: its node died or was preempted")],
    )


def recovery() -> Automation:
    return Automation(
        name=RECOVERY_NAME,
        description="A Crashed nanochat flow run is scheduled again (same flow-run id); the flow bounds the attempts.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "flow", "prefect.resource.name": FLOW}),
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, name=RECOVERING, force=True,
                                    message="recovering: the run goes back to its pool (flows/recovery.py)")],
    )


def ensure(automation: Automation) -> Automation:
    """`automation` on the server PREFECT_API_URL names: created once, brought up to date afterwards."""
    try:
        existing = Automation.read(name=automation.name)
    except ValueError:  # no automation of that name yet
        return automation.create()
    automation.id = existing.id
    automation.update()
    return automation


def ensure_zombie_detection() -> Automation:
    return ensure(zombie_detection())


def ensure_recovery() -> Automation:
    return ensure(recovery())


if __name__ == "__main__":
    for automation in (ensure_zombie_detection(), ensure_recovery()):
        print(f"automation {automation.name!r}: {automation.id}")
