"""The Prefect CLI commands that README.md and docs/deploy.md give, each run as its own process against a real
`prefect server start` on 127.0.0.1: each exits 0 and prints no traceback. With fastapi >= 0.151 the
server refused the CLI's list calls (`limit: null` in the body) with 422; pyproject.toml bounds fastapi.

No worker runs here: the flow run stays Scheduled, gets one log line through the client and is cancelled."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid

import pytest

from test_deploy_server import PREFECT, REPO, free_port, stop, wait_healthy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """prefect(*args) -> CompletedProcess, against a server of this module's own."""
    home = tmp_path_factory.mktemp("prefect-cli")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "NANOCHAT_FLOW_ROOT": str(REPO),
        "COLUMNS": "250",  # rich's tables keep whole names and ids
    }
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def prefect(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        return subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    prefect.env = env
    try:
        wait_healthy(f"http://127.0.0.1:{port}/api/health", server)
        yield prefect
    finally:
        stop(server)


def ok(out: subprocess.CompletedProcess) -> str:
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "Traceback" not in text, \
        f"{' '.join(out.args[1:])} exited {out.returncode}:\n{text[-4000:]}"
    return text


def test_cli_commands_of_the_docs_run_cleanly(cli):
    ok(cli("work-pool", "create", "local", "--type", "process"))
    ok(cli("work-pool", "create", "gpu", "--type", "process"))
    # README's form, then the one in deployments/prefect.yaml's header; both end with the look-up of
    # the pool's online workers that used to be refused.
    assert "nanochat/smoke" in ok(cli("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml",
                                      "--name", "smoke"))
    ok(cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"))

    listed = ok(cli("deployment", "ls"))
    assert "nanochat/smoke" in listed and "nanochat/speedrun" in listed, listed
    pools = ok(cli("work-pool", "ls"))
    assert "local" in pools and "gpu" in pools, pools

    started = ok(cli("deployment", "run", "nanochat/smoke"))
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)
    assert flow_run_id in ok(cli("flow-run", "ls"))

    # One log line for the run, through the client, so `flow-run logs` (without --num-logs) has one to show.
    marker = f"cli-test-{uuid.uuid4().hex}"
    subprocess.run([sys.executable, "-c", f"""
import asyncio, datetime, uuid
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import LogCreate

async def main():
    async with get_client() as client:
        await client.create_logs([LogCreate(name="cli-test", level=20, message={marker!r},
                                            timestamp=datetime.datetime.now(datetime.timezone.utc),
                                            flow_run_id=uuid.UUID({flow_run_id!r}))])
asyncio.run(main())
"""], env=cli.env, check=True, timeout=60)
    assert marker in ok(cli("flow-run", "logs", flow_run_id))

    ok(cli("flow-run", "cancel", flow_run_id))
    assert "CANCELLED" in ok(cli("flow-run", "inspect", flow_run_id))
