"""Run one stage as a child process and return its ref. No Prefect here: the flow passes a `log` callback.

    torchrun --nnodes 1 --nproc_per_node N -m nanochat_core.stages.<stage> --config cfg.json
    python -m nanochat_core.stages.<stage> --config cfg.json      (one process / CPU-only stages)

Every line the child prints is handed to `log` as it comes (PYTHONUNBUFFERED, so torchrun's ranks
stream too); on a non-zero exit, the last lines are raised in a `StageFailed`. Each child runs in a
process group of its own (torchrun and all its ranks), so `stop_all()` (what the flow calls when its run
is cancelled or interrupted) takes every stage process down at once, whatever it is doing: a stage that
prints nothing for minutes (evaluating, saving, waiting in a collective) must not keep its GPUs. The child learns where
to write its ref (NANOCHAT_RESULT_PATH), the tracking run it belongs to (NANOCHAT_MLFLOW_RUN_ID) and the
artifact root (NANOCHAT_BASE_DIR) from its environment.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from nanochat_core.artifacts import INPUTS_PATH_ENV, RESULT_PATH_ENV
from nanochat_core.config import PipelineConfig
from nanochat_core.paths import BASE_DIR_ENV, base_dir

TAIL_LINES = 40
STOP_GRACE_S = 10  # SIGTERM, then SIGKILL whatever is left of a process group after this long

_running: set[subprocess.Popen] = set()  # the stage processes of this (flow) process, now
_lock = threading.Lock()
_stopping = threading.Event()


class StageFailed(RuntimeError):
    """The child exited non-zero; the message carries its last lines."""

    def __init__(self, stage: str, returncode: int, tail: list[str]):
        self.stage, self.returncode, self.tail = stage, returncode, tail
        last = "\n".join(tail)
        super().__init__(f"stage {stage} exited with status {returncode}; its last lines:\n{last}")


class StageStopped(StageFailed):
    """The child was stopped by `stop_all()` (the run was cancelled), not by a failure of its own."""


def stop_all() -> None:
    """Stop every stage process this process started (and their ranks), and any it would start next."""
    _stopping.set()
    with _lock:
        procs = list(_running)
    for proc in procs:
        _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)


def command(stage: str, config_path: str, nproc_per_node: int = 1, nnodes: int = 1,
            rdzv_endpoint: str | None = None) -> list[str]:
    """The argv that runs `stage`: torchrun for several processes or nodes, else plain python."""
    module = ["-m", f"nanochat_core.stages.{stage}", "--config", config_path]
    if nproc_per_node == 1 and nnodes == 1:
        return [sys.executable, *module]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}"]
    if nnodes == 1:
        launcher.append("--standalone")
    else:
        # Multi-node: torchrun's c10d rendezvous; every node runs this same command.
        launcher += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}",
                     # one rendezvous per stage, so nodes waiting for different stages never meet
                     f"--rdzv_id={os.environ.get('NANOCHAT_RDZV_ID', 'nanochat')}-{stage}"]
    return [*launcher, *module]


def run_stage(
    stage: str,
    cfg: PipelineConfig,
    log: Callable[[str], None] = print,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    env: dict[str, str] | None = None,
    inputs: dict[str, dict] | None = None,
) -> dict[str, Any]:
    """Run `stage` with `cfg` in a child process (or torchrun), stream its lines to `log`, return its ref.

    `inputs` (upstream refs by name) reach the child as a JSON file named by NANOCHAT_INPUTS_PATH.
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"nanochat-{stage}-"))
    config_path, result_path = workdir / "config.json", workdir / "result.json"
    inputs_path = workdir / "inputs.json"
    config_path.write_text(cfg.model_dump_json(indent=2))
    inputs_path.write_text(json.dumps(inputs or {}, default=str))
    child_env = {
        **os.environ,
        **(env or {}),
        "PYTHONUNBUFFERED": "1",
        RESULT_PATH_ENV: str(result_path),
        INPUTS_PATH_ENV: str(inputs_path),
        BASE_DIR_ENV: os.environ.get(BASE_DIR_ENV) or base_dir(),
    }
    argv = command(stage, str(config_path), nproc_per_node, nnodes, child_env.get("NANOCHAT_RDZV_ENDPOINT"))
    log(f"$ {' '.join(argv)}")
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    with _lock:
        if _stopping.is_set():
            raise StageStopped(stage, -signal.SIGTERM, ["(not started: the run is being stopped)"])
        # A new session: the child and its ranks are one process group that stop_all() signals at once,
        # and a Ctrl-C meant for the flow reaches them only through it (after the flow records it).
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env,
                                text=True, bufsize=1, start_new_session=True)
        _running.add(proc)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log(line)
        returncode = proc.wait()
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        with _lock:
            _running.discard(proc)
    if returncode != 0:
        raise (StageStopped if _stopping.is_set() else StageFailed)(stage, returncode, list(tail))
    if not result_path.exists():
        raise StageFailed(stage, 0, [*tail, f"(the stage wrote no result to {result_path})"])
    ref = json.loads(result_path.read_text())
    for path in (config_path, result_path, inputs_path):
        path.unlink(missing_ok=True)
    workdir.rmdir()
    return ref


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left after a grace period."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
