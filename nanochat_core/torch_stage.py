"""The `main` of a torch stage, run by hand or as a torchrun rank. Its own module, not stage_args (which
every stage imports): it reaches the checkpoint and model code through `notice`, and a stage's cache key
covers what its imports reach (flows/cache.code_fingerprint), so tok_train's must not move with the model."""

from __future__ import annotations

import os
import signal
import sys
import threading

from nanochat_core import artifacts, launch, notice
from nanochat_core.config import PipelineConfig
from nanochat_core.stage_args import parse


def stage_main(stage: str, argv: list[str] | None, run, on_notice: bool = False) -> None:
    """A torch stage's `main`: parse, then run here (a torchrun rank, or the one process) and hand the ref
    to the launcher. Run by hand with several processes asked for (`nanochat base-train --nproc-per-node
    2`), it starts torchrun for them through the launcher instead and streams their lines. `on_notice`:
    the stage checkpoints and stops on SIGTERM (nanochat_core.notice); its record goes to the launcher,
    and the process exits with the status a shell gives a process SIGTERM ended (143).
    """
    cfg, inputs = parse(stage, argv)
    if artifacts.inputs() is None and "WORLD_SIZE" not in os.environ:  # by hand, not under torchrun
        section = getattr(cfg, stage)
        nproc, nnodes = section.nproc_per_node or 1, getattr(section, "nnodes", 1)
        if nproc > 1 or nnodes > 1:
            _torchrun_by_hand(stage, cfg, inputs, nproc, nnodes)
            return
    if on_notice:
        notice.install()
    ref = run(cfg, inputs)
    artifacts.emit(ref)
    if ref.get("stopped_at_step") is not None:
        raise SystemExit(notice.EXIT_STATUS)


def _torchrun_by_hand(stage: str, cfg: PipelineConfig, inputs: dict, nproc: int, nnodes: int) -> None:
    # torchrun runs in a session of its own, so neither a SIGTERM for this process nor a Ctrl-C in its
    # terminal reaches it: pass them on through stop_all (SIGTERM, torchrun's grace, then SIGKILL by PID),
    # off the signal handler's frame. The ranks finish their step and checkpoint there.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=launch.stop_all, daemon=True).start())
    try:
        launch.run_stage(stage, cfg, print, nproc, nnodes, inputs=inputs)
    except launch.StageFailed as e:
        # The ranks' own lines (an error's sentence, torchrun's report) were streamed above.
        print(f"error: {launch.stopped_line(e.record) if e.record else f'{stage} exited with status {e.returncode}'}",
              file=sys.stderr)
        raise SystemExit(notice.EXIT_STATUS if e.record else e.returncode or 1) from None
