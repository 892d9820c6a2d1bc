"""The Prefect automation that turns a dead node's flow run from Running into Crashed.

    python -m flows.automations            # against PREFECT_API_URL, once per server (idempotent)

A flow run whose node dies (spot preemption, a kernel panic, SIGKILL of the worker and all under it)
cannot report its own end: the server would show it Running forever. Flow runs send a heartbeat event
every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (the deployments set 30, Prefect's minimum; the default
is 180); this automation marks a run Crashed when no heartbeat and no final state followed its last
heartbeat within MISSED_AFTER_S. A preempted run therefore shows Crashed 60-90 s after its node died.
Its task runs are left Running by the server; the node's next flow run crashes them and so frees the
node's devices (flows/tasks.release_orphaned_devices). Re-running is one command, on purpose not an
automation (a run that crashes every time would loop): `prefect deployment run nanochat/<name>`; the
new run finds the finished stages Cached and the training stage continues from its latest checkpoint.
"""

from __future__ import annotations

from datetime import timedelta

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

NAME = "nanochat: crash flow runs whose node stopped beating"
HEARTBEAT_S = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY in deployments/prefect.yaml
MISSED_AFTER_S = 60  # two heartbeats missed


def zombie_detection() -> Automation:
    return Automation(
        name=NAME,
        description=f"A flow run with no heartbeat for {MISSED_AFTER_S} s after its last one is marked Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=MISSED_AFTER_S),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message="no heartbeat: its node died or was preempted")],
    )


def ensure_zombie_detection() -> Automation:
    """The automation on the server PREFECT_API_URL names, created once (found by name afterwards)."""
    try:
        return Automation.read(name=NAME)
    except ValueError:  # no automation of that name yet
        return zombie_detection().create()


if __name__ == "__main__":
    automation = ensure_zombie_detection()
    print(f"automation {automation.name!r}: {automation.id}")
