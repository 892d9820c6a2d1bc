"""The deployment path for real: `prefect server start` on 127.0.0.1, a process work pool and worker,
`prefect deploy` from deployments/prefect.yaml, `prefect deployment run nanochat/smoke`, and the run's
logs through `prefect flow-run logs`. The worker shares the session's speedrun base dir, so the smoke
run finds every stage cached and this test costs a server start, not a second speedrun."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


def stop(proc: subprocess.Popen, signals: int = 1) -> None:
    """SIGTERM (a worker needs two) and then SIGKILL if it lingers; the whole process group."""
    for _ in range(signals):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for(probe, timeout: float, every: float = 0.2):
    """probe()'s first truthy value within `timeout` seconds, else None."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(every)
    return None


def run_processes(flow_run_id: str) -> list[tuple[int, bytes]]:
    """(pid, command line) of every process on the machine that belongs to that flow run: the flow-run
    process and all it started carry PREFECT__FLOW_RUN_ID in their environment, even when re-parented."""
    mark = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if mark not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found.append((int(entry), f.read().replace(b"\0", b" ")))
        except OSError:
            continue
    return found


def test_smoke_deployment_runs_on_a_process_worker(first_run, tmp_path):
    base = first_run[0]
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "NANOCHAT_BASE_DIR": str(base),
        "NANOCHAT_FLOW_ROOT": str(REPO),
        # The venv activated, as the README starts a worker: the smoke deployment's command is
        # `prefect flow-run execute`, found on the worker's PATH.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }

    def prefect(*args: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if check:
            assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out

    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    worker = None
    try:
        wait_healthy(f"http://127.0.0.1:{port}/api/health", server)
        prefect("work-pool", "create", "local", "--type", "process")
        prefect("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "smoke")
        prefect("deployment", "inspect", "nanochat/smoke")
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "local"], env=env, cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        run = prefect("deployment", "run", "nanochat/smoke", "--watch", "--watch-timeout", "600", timeout=660)
        assert "Completed" in run.stdout, run.stdout[-3000:]
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)
        logs = prefect("flow-run", "logs", flow_run_id, "--num-logs", "200").stdout
        # every stage was cached from the session's speedrun; the flow logs where the report is
        assert "Finished in state Cached" in logs and "report.md" in logs

        # Cancel a run while a stage works quietly (base_eval scoring CORE): every process of the run,
        # torchrun's or not, is gone within 30 s, and the run ends Cancelled.
        started = prefect("deployment", "run", "nanochat/smoke", "--param", 'refresh=["base_eval"]')
        cancelled_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)
        stage = wait_for(lambda: [p for p in run_processes(cancelled_id) if b"nanochat_core.stages.base_eval" in p[1]],
                         timeout=300)
        assert stage, "base_eval never started"
        time.sleep(2)
        prefect("flow-run", "cancel", cancelled_id)
        cancelled_at = time.time()
        assert wait_for(lambda: not run_processes(cancelled_id), timeout=30), \
            f"left running 30 s after the cancel: {[p[1][:120] for p in run_processes(cancelled_id)]}"
        gone_after = time.time() - cancelled_at
        state = wait_for(lambda: (lambda s: s if "CANCELLED" in s else None)(
            prefect("flow-run", "inspect", cancelled_id).stdout), timeout=60)
        assert state, prefect("flow-run", "inspect", cancelled_id).stdout[-2000:]
        print(f"cancelled run's processes gone {gone_after:.1f}s after `prefect flow-run cancel`")
    finally:
        if worker is not None:
            stop(worker, signals=2)
        stop(server)
