"""torch.distributed set-up and tear-down, and the rank-0-only side effects (STYLE.md principle 9).

One code path for 1 and N processes: without torchrun's environment nothing is initialised and
`Runtime.world == 1`; under torchrun the process group is NCCL on CUDA and gloo on CPU.

    torchrun --standalone --nproc_per_node=2 -m nanochat_core.stages.base_train --config cfg.json
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import IO, Iterator

import torch
import torch.distributed as dist

from nanochat_core import storage
from nanochat_core.hardware import keep_freed_memory, resolve_device_type


@dataclass(frozen=True)
class Runtime:
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init(device_type: str = "auto") -> Runtime:
    """Initialise the process group if torchrun launched us; pick this rank's device."""
    device_type = resolve_device_type(device_type)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if device_type == "cpu":
        keep_freed_memory()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device_type == "cuda" else None)
    return Runtime(rank, local_rank, world, device)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


class Console:
    """print() on rank 0, nothing elsewhere; flushed so torchrun streams it line by line."""

    def __init__(self, enabled: bool, stream: IO | None = None):
        self.enabled, self.stream = enabled, stream

    def __call__(self, *args) -> None:
        if self.enabled:
            print(*args, file=self.stream or sys.stdout, flush=True)


class MetricsLog:
    """JSON lines `{"step": N, "time_ms": t, "train/loss": ...}` written by rank 0; a null sink elsewhere
    (path None). `time_ms` is the wall time the row was measured at (what MLflow plots against).

    Local files are appended line by line so a crash loses nothing; on an object store (no append)
    the lines are kept and the whole file is rewritten atomically at each `flush()`. On resume,
    `truncate_after(step)` drops what a crashed run logged past its checkpoint, so each step appears once.
    Every row also goes to the local file NANOCHAT_METRICS_TAIL names when the launcher sets it: the
    orchestrator forwards it to MLflow as it grows (tracking.LiveMetrics), wherever the base dir is.
    """

    def __init__(self, path: str | None):
        self.path = path
        self.local = path is not None and storage.is_local(path)
        self.lines: list[str] = []
        self.tail = os.environ.get("NANOCHAT_METRICS_TAIL") if path is not None else None

    def truncate_after(self, step: int) -> None:
        if self.path is None or not storage.exists(self.path):
            return
        self.lines = [
            line + "\n" for line in storage.read_text(self.path).splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        storage.write_text(self.path, "".join(self.lines))
        self._append_tail("".join(self.lines))  # a resumed run's new MLflow run gets the curve so far

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        line = json.dumps({**record, "time_ms": record.get("time_ms", int(time.time() * 1000))}) + "\n"
        self.lines.append(line)
        if self.local:
            path = self.path.removeprefix("file://")
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "a") as f:
                f.write(line)
        self._append_tail(line)

    def _append_tail(self, text: str) -> None:
        if self.tail and text:
            with open(self.tail, "a") as f:
                f.write(text)

    def flush(self) -> None:
        if self.path is not None and not self.local:
            storage.write_text(self.path, "".join(self.lines))


@contextlib.contextmanager
def session(device_type: str = "auto") -> Iterator[Runtime]:
    """init() … teardown(), even when the body raises."""
    rt = init(device_type)
    try:
        yield rt
        # Ranks tear down together: gloo aborted a rank (SIGABRT, "terminate called without an active
        # exception") that destroyed its group while another was still at work: chat_eval under torchrun
        # in one of three full suites here. Not after an error: the other ranks may never come.
        barrier()
    finally:
        teardown()
