"""Fencing (nanochat_core/fencing.py) against a real `prefect server start`: a stage writes its checkpoint
only while its attempt owns the flow run, and never asks anything when it runs alone. The attempt
bookkeeping of flows/recovery.py is checked on the same states."""

from __future__ import annotations

import os
import subprocess

import pytest

from test_deploy_server import PREFECT, free_port, stop, wait_healthy

from nanochat_core import fencing


def test_a_stage_alone_is_never_fenced(monkeypatch):
    for var in (fencing.FLOW_RUN_ID_ENV, fencing.ATTEMPT_ENV, "PREFECT_API_URL"):
        monkeypatch.delenv(var, raising=False)
    fencing.check_owner("checkpoint step 1")  # no API to ask: nothing happens
    monkeypatch.setenv(fencing.FLOW_RUN_ID_ENV, "00000000-0000-0000-0000-000000000000")
    monkeypatch.setenv(fencing.ATTEMPT_ENV, "1")
    fencing.check_owner("checkpoint step 1")  # still no API URL


def test_an_unreachable_api_fences_after_the_wait(monkeypatch):
    monkeypatch.setenv(fencing.FLOW_RUN_ID_ENV, "00000000-0000-0000-0000-000000000000")
    monkeypatch.setenv(fencing.ATTEMPT_ENV, "1")
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")
    monkeypatch.setattr(fencing, "UNREACHABLE_S", 1.5)
    with pytest.raises(fencing.Fenced, match="did not answer"):
        fencing.check_owner("checkpoint step 7")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-fencing")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"}
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(f"{url}/health", proc)
        yield url
    finally:
        stop(proc)


@pytest.mark.slow
def test_only_the_attempt_that_owns_the_run_writes(server, monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import State, StateType
    from prefect.states import AwaitingRetry, Cancelling, Crashed, Pending, Running, Scheduled

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import recovery

    monkeypatch.setenv("PREFECT_API_URL", server)  # what the stage reads

    @flow(name="fencing-probe")
    def probe():
        pass

    with temporary_settings({PREFECT_API_URL: server}), get_client(sync_client=True) as client:
        run = client.create_flow_run(probe, state=Scheduled())
        monkeypatch.setenv(fencing.FLOW_RUN_ID_ENV, str(run.id))

        def goes(state: State) -> None:
            client.set_flow_run_state(run.id, state, force=True)

        def owner(attempt: int) -> bool:
            monkeypatch.setenv(fencing.ATTEMPT_ENV, str(attempt))
            try:
                fencing.check_owner("checkpoint step 5")
                return True
            except fencing.Fenced as e:
                assert "\n" not in str(e)
                return False

        goes(Pending())
        goes(Running())  # attempt 1
        assert owner(1) and not owner(2)
        goes(AwaitingRetry(message="notice"))  # its supervisor put it back in the pool on SIGTERM
        assert owner(1)  # ... and its stage is checkpointing on notice
        goes(Pending())  # a worker took it; the next attempt has not started: the notice checkpoint may finish
        assert owner(1)
        goes(Running())  # attempt 2 started: attempt 1 is fenced
        assert client.read_flow_run(run.id).run_count == 2
        assert not owner(1) and owner(2)
        goes(Cancelling())
        assert owner(2)  # a person stops it: its checkpoint on the way down is still a good one
        goes(Crashed(message="no heartbeat"))  # cut off (or killed while cancelling): fenced at once
        assert not owner(2)
        goes(State(type=StateType.SCHEDULED, name=recovery.RECOVERING))
        assert not owner(2)
        goes(Pending())  # taken again after the automation recovered it, not after a notice
        assert not owner(2)
        goes(Running())

        states = client.read_flow_run_states(run.id)
        assert recovery.attempts(states) == ["AwaitingRetry (notice)", "Crashed (no heartbeat)"]
        assert recovery.cancelled_by_a_person(states)  # attempt 2 was being cancelled when it crashed
        goes(Crashed(message="again"))
        goes(Running())
        assert not recovery.cancelled_by_a_person(client.read_flow_run_states(run.id))


def test_the_bound_reads_the_deployment_setting(monkeypatch):
    from flows import recovery
    from nanochat_core.errors import UserError

    monkeypatch.delenv(recovery.MAX_ATTEMPTS_ENV, raising=False)
    assert recovery.max_attempts() == 3
    monkeypatch.setenv(recovery.MAX_ATTEMPTS_ENV, "5")
    assert recovery.max_attempts() == 5
    for bad in ("0", "three"):
        monkeypatch.setenv(recovery.MAX_ATTEMPTS_ENV, bad)
        with pytest.raises(UserError, match="1 or more"):
            recovery.max_attempts()
    assert recovery.gave_up(3, ["Crashed (a)", "Crashed (b)", "Failed (c)"]) == (
        "gave up after 3 attempts, the most NANOCHAT_MAX_ATTEMPTS=3 allows: "
        "attempt 1 Crashed (a); attempt 2 Crashed (b); attempt 3 Failed (c)")
