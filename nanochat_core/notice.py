"""Checkpoint on notice: a training stage that gets SIGTERM finishes its optimizer step, saves there, stops.

Cloud spot nodes and Kubernetes give notice before they kill (a pod's terminationGracePeriodSeconds,
GCP ~30 s, AWS 2 min) by sending SIGTERM; without this a torch stage died at once and the run lost
everything since its last periodic checkpoint (d20: up to 1,555 steps, ~15 min). Now:

    notice.install()                          # in a training stage's main(): for the process's whole life
    loss, stop = notice.reduce_with_loss(loss_sum / accum, rt)   # the per-step all-reduce, one tensor
    ...optimizer step...
    if stop: return notice.stop_here(...)   # checkpoint at this step if it fits, the record; main exits 143

The signal reaches ranks at different moments (torchrun forwards it to each rank's own session in turn;
on several nodes each node's platform decides), so no rank stops on its own: the flag travels with the
loss through the all-reduce every step already does, and every rank stops after the same step.
The handler only records the time; it stays installed until the process exits, so a second SIGTERM
(or one that reaches a rank while it is already saving) cannot kill a checkpoint write half-way.

The notice is the platform's, not ours: NANOCHAT_NOTICE_S (default 30, Kubernetes' default grace and
GCP's notice). A stage does not start a write it cannot finish in what is left of it (the checkpoint's
size over the write rate its own periodic saves measured, or NANOCHAT_CHECKPOINT_GBPS before the first):
it says so in one line and the run falls back to its last periodic checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as tdist

from nanochat_core import dist, launch
from nanochat_core.errors import UserError

NOTICE_ENV = launch.NOTICE_ENV  # parsed by launch.notice_seconds, which sizes torchrun's waits from it too
WRITE_RATE_ENV = "NANOCHAT_CHECKPOINT_GBPS"  # a recorded write rate, used until a periodic save measures one
EXIT_STATUS = 128 + signal.SIGTERM  # what a shell reports for a process SIGTERM ended: the stage did not finish

_received_at: float | None = None  # time.monotonic() of the first SIGTERM, None until one comes
_measured_gbps: float | None = None  # the last periodic save's bytes / seconds in this process


def notice_seconds() -> float:
    """The platform's notice between SIGTERM and SIGKILL ($NANOCHAT_NOTICE_S, default 30)."""
    return launch.notice_seconds(strict=True)


def recorded_gbps() -> float | None:
    text = os.environ.get(WRITE_RATE_ENV)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{WRITE_RATE_ENV}={text!r} is not a positive rate in GB/s; set it to what "
                        "bench/checkpoint_write.py measured for your checkpoint store, or unset it")
    return value


def install() -> None:
    """Record SIGTERM instead of dying of it, for the rest of the process (a stage's main thread only)."""
    global _received_at, _measured_gbps
    _received_at, _measured_gbps = None, None
    notice_seconds(), recorded_gbps()  # a bad setting fails now, in one sentence, not at the notice
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    global _received_at
    if _received_at is None:
        _received_at = time.monotonic()


def received() -> bool:
    return _received_at is not None


def reduce_with_loss(loss: torch.Tensor, rt) -> tuple[float, bool]:
    """(mean of `loss` over ranks, whether any rank has had notice): the step's one all-reduce, which
    every rank makes at the same step, so all of them stop after the same optimizer step."""
    both = torch.stack([loss.detach().float().reshape(()),
                        torch.tensor(1.0 if received() else 0.0, device=loss.device)])
    dist.all_reduce_sum(both)
    loss_sum, flags = both.tolist()
    return loss_sum / rt.world, flags > 0


def state_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state dict: what torch.save writes, to within its headers."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def checkpoint_bytes(model, opt, world: int) -> int:
    """One checkpoint's bytes: the model file plus every rank's optimizer file (each rank holds the whole
    optimizer state, so `world` copies of this rank's)."""
    return state_bytes(model.state_dict()) + world * state_bytes(opt.state_dict())


def timed_save(save, nbytes: int) -> None:
    """Run a periodic save (it ends in a barrier, so every rank times the same write) and keep its rate."""
    global _measured_gbps
    t0 = time.perf_counter()
    save()
    seconds = time.perf_counter() - t0
    if seconds > 0:
        _measured_gbps = nbytes / seconds / 1e9


def write_fits(nbytes: int, rt, label: str, step: int, fallback: int | None) -> bool:
    """Whether the checkpoint at `step` can be written before the notice runs out. The ranks agree on the
    slowest expected write and the least time left (the rank that had notice first), so they decide alike;
    when it does not fit, rank 0 says why in one line and no rank starts the write."""
    gbps, source = (_measured_gbps, "measured by this run's last periodic save") if _measured_gbps else (
        recorded_gbps(), f"${WRITE_RATE_ENV}")
    left = notice_seconds() - (time.monotonic() - _received_at if _received_at is not None else 0.0)
    need = nbytes / (gbps * 1e9) if gbps else 0.0  # no rate known yet: try; a cut-off write commits nothing
    worst = torch.tensor([need, -left], dtype=torch.float64, device=rt.device)
    if tdist.is_available() and tdist.is_initialized():
        tdist.all_reduce(worst, op=tdist.ReduceOp.MAX)
    need, left = worst[0].item(), -worst[1].item()
    if need <= left:
        return True
    if rt.master:
        then = (f"a re-run continues from step {fallback}, the last periodic checkpoint" if fallback is not None
                else "no checkpoint exists, a re-run starts over")
        print(f"{label}: notice at step {step}, but writing its checkpoint ({nbytes / 1e9:.2f} GB) takes ~{need:.0f} s"
              f"{f' at {gbps:.3g} GB/s ({source})' if gbps else ''}, more than the {max(left, 0):.0f} s left of the "
              f"{notice_seconds():.0f} s notice (${NOTICE_ENV}); not starting it: {then}", flush=True)
    return False


def stop_here(stage: str, ckpt_dir: str, step: int, model, opt, rt, save, say) -> dict:
    """The end of a training stage that had notice, after optimizer step `step` (every rank calls this):
    `save()` the checkpoint there if the write fits in what is left of the notice, say so, and return the
    record the launcher reads (launch.stopped_record) in place of the stage's ref."""
    from nanochat_core.checkpoint import latest_step

    kept = latest_step(ckpt_dir)
    saved = write_fits(checkpoint_bytes(model, opt, rt.world), rt, stage, step, kept)
    if saved:
        save()
    record = launch.stopped_record(stage, ckpt_dir, step, saved, kept)
    say(launch.stopped_line(record))
    return record
