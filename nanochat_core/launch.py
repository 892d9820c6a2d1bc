"""Run one stage as a child process and return its ref. No Prefect here: the flow passes a `log` callback.

    torchrun --nnodes 1 --nproc_per_node N -m nanochat_core.stages.<stage> --config cfg.json
    python -m nanochat_core.stages.<stage> --config cfg.json      (one process / CPU-only stages)

Every line the child prints is handed to `log` as it comes (PYTHONUNBUFFERED, so torchrun's ranks
stream too); on a non-zero exit, the last lines are raised in a `StageFailed`. The child learns where
to write its ref (NANOCHAT_RESULT_PATH), the tracking run it belongs to (NANOCHAT_MLFLOW_RUN_ID) and the
artifact root (NANOCHAT_BASE_DIR) from its environment.

Stopping. The child runs in a session of its own, but torchrun (torch 2.15, elastic's
SubprocessHandler) starts every rank in a session of its own too, so no one process group holds
torchrun and its ranks: signalling the child's group reaches torchrun alone. torchrun forwards SIGTERM
to each rank's group and SIGKILLs them `--shutdown-timeout` seconds later; a training stage uses that
time to finish its step and checkpoint there (nanochat_core.notice). So the grace applies at both
levels: torchrun gets the platform's notice (NANOCHAT_NOTICE_S) plus a margin, and `stop_all()` (what the
flow calls when its run is cancelled or interrupted) waits longer than that before it SIGKILLs torchrun
and every process it started, found by PID in /proc while torchrun still lives (never by name): a
stage that prints nothing for minutes (evaluating, saving, waiting in a collective) must not keep its
GPUs, and a killed torchrun must not leave orphaned ranks holding them.

A stage stopped on notice writes `stopped_at_step` in its result (and its checkpoint's meta) and the
launcher raises `StagePreempted` with one line saying so: torchrun's exit status is 1 whatever its ranks
return, so the record decides, not the status.
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
from nanochat_core.errors import UserError
from nanochat_core.paths import BASE_DIR_ENV, base_dir

TAIL_LINES = 40
NOTICE_ENV, DEFAULT_NOTICE_S = "NANOCHAT_NOTICE_S", 30.0  # read by nanochat_core.notice in the ranks too
# torchrun waits this much past the notice before it SIGKILLs its ranks: a rank stops only after the step
# it is in (d20: ~0.6 s on 8xH100 by the plan's estimate; longer if the notice came during an evaluation)
# and then exits.
SHUTDOWN_MARGIN_S = 15
# stop_all / _kill_group wait this much past torchrun's own timeout (its SIGKILL, reaping, its exit) before
# they SIGKILL what is left; a one-process stage gets the same grace.
STOP_MARGIN_S = 10

_running: set[subprocess.Popen] = set()  # the stage processes of this (flow) process, now
_lock = threading.Lock()
_stopping = threading.Event()


class StageFailed(RuntimeError):
    """The child exited non-zero; the message carries its last lines."""

    record: dict | None = None  # the stage's record of a stop on SIGTERM (stopped_record), when it wrote one

    def __init__(self, stage: str, returncode: int, tail: list[str]):
        self.stage, self.returncode, self.tail = stage, returncode, tail
        last = "\n".join(tail)
        super().__init__(f"stage {stage} exited with status {returncode}; its last lines:\n{last}")

    @property
    def stopped_at_step(self) -> int | None:
        return self.record["stopped_at_step"] if self.record else None


class StageStopped(StageFailed):
    """The child was stopped by `stop_all()` (the run was cancelled), not by a failure of its own."""


class StagePreempted(StageFailed):
    """The stage got notice (SIGTERM from the platform, not from `stop_all()`), finished its optimizer step,
    saved a checkpoint there when the write fit in the notice, and stopped; a re-run continues from it."""

    def __init__(self, stage: str, returncode: int, tail: list[str], record: dict):
        super().__init__(stage, returncode, tail)
        self.record = record
        self.args = (stopped_line(record),)


def stopped_record(stage: str, path: str, step: int, saved: bool, fallback: int | None) -> dict:
    """What a stage stopped on notice hands the launcher instead of its ref (in its result file)."""
    return {"stage": stage, "path": path, "stopped_at_step": step, "signal": "SIGTERM",
            "checkpoint_step": step if saved else fallback}


def stopped_line(record: dict) -> str:
    """One sentence for a stopped stage's record."""
    stage, step, kept = record["stage"], record["stopped_at_step"], record.get("checkpoint_step")
    head = f"{stage} stopped on {record.get('signal', 'SIGTERM')} at step {step}"
    if kept == step:
        return f"{head} and saved a checkpoint there; a re-run continues from it"
    if kept is not None:
        return f"{head} without saving (the write would not fit in the notice); a re-run continues from step {kept}"
    return f"{head} without saving (the write would not fit in the notice) and no earlier checkpoint; a re-run starts over"


def notice_seconds(strict: bool = False) -> float:
    """$NANOCHAT_NOTICE_S, what the platform gives between SIGTERM and SIGKILL. A bad value is a UserError
    when `strict` (the stages, which read it first), else the default (the launcher just sizes its waits)."""
    text = os.environ.get(NOTICE_ENV)
    try:
        value = float(text) if text else DEFAULT_NOTICE_S
    except ValueError:
        value = -1.0
    if value > 0:
        return value
    if strict:
        raise UserError(f"{NOTICE_ENV}={text!r} is not a positive number of seconds; set it to the platform's "
                        "notice (terminationGracePeriodSeconds, 30 on GCP, 120 on AWS) or unset it")
    return DEFAULT_NOTICE_S


def shutdown_timeout() -> int:
    """torchrun's --shutdown-timeout: the notice plus the step a rank finishes first."""
    return int(notice_seconds() + SHUTDOWN_MARGIN_S + 0.999)


def stop_grace() -> float:
    """How long stop_all waits after SIGTERM before SIGKILL: longer than torchrun's own timeout."""
    return shutdown_timeout() + STOP_MARGIN_S


def stop_all() -> None:
    """Stop every stage process this process started (and their ranks), and any it would start next."""
    _stopping.set()
    with _lock:
        procs = list(_running)
    threads = [threading.Thread(target=_kill_group, args=(proc,), daemon=True) for proc in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def command(stage: str, config_path: str, nproc_per_node: int = 1, nnodes: int = 1,
            rdzv_endpoint: str | None = None) -> list[str]:
    """The argv that runs `stage`: torchrun for several processes or nodes, else plain python."""
    module = ["-m", f"nanochat_core.stages.{stage}", "--config", config_path]
    if nproc_per_node == 1 and nnodes == 1:
        return [sys.executable, *module]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}",
                f"--shutdown-timeout={shutdown_timeout()}"]
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
    ref = _read_result(result_path)
    if ref is not None and ref.get("stopped_at_step") is not None:
        # Stopped on SIGTERM: torchrun says 1 (or 0 when the signal reached the ranks alone); the record says what.
        if _stopping.is_set():
            stopped = StageStopped(stage, returncode, [*tail, stopped_line(ref)])
            stopped.record = ref
            raise stopped
        raise StagePreempted(stage, returncode, list(tail), ref)
    if returncode != 0:
        raise (StageStopped if _stopping.is_set() else StageFailed)(stage, returncode, list(tail))
    if ref is None:
        raise StageFailed(stage, 0, [*tail, f"(the stage wrote no result to {result_path})"])
    for path in (config_path, result_path, inputs_path):
        path.unlink(missing_ok=True)
    workdir.rmdir()
    return ref


def _read_result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group (torchrun forwards it to its ranks), wait `stop_grace()`, then
    SIGKILL the group and every process the child started that is still alive, ranks included."""
    started = descendants(proc.pid)  # the ranks, while torchrun is their parent (they are reparented after)
    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + stop_grace()
    while time.monotonic() < deadline:
        try:
            proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            started |= descendants(proc.pid)  # ranks torchrun (re)started meanwhile
    else:
        started |= descendants(proc.pid)
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
    for pid, start in started:
        if _start_time(pid) == start:  # the same process, not a new one that got the PID since
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def descendants(pid: int) -> set[tuple[int, str]]:
    """(PID, start time) of every living process below `pid`, read from /proc (empty where there is none).
    The start time tells a process from a later one that reuses its PID."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return set()
    for entry in entries:
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                children.setdefault(int(stat[1]), []).append(int(entry))
    found, todo = set(), list(children.get(pid, []))
    while todo:
        child = todo.pop()
        start = _start_time(child)
        if start is not None:
            found.add((child, start))
        todo.extend(children.get(child, []))
    return found


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state, ppid, ...): the command name, which may hold spaces, cut off."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), None once it is gone or a zombie."""
    stat = _stat(pid)
    if stat is None or stat[0] == "Z":
        return None
    return stat[19]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
