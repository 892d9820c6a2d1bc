"""Orchestration overhead: the tiny speedrun's wall time against the sum of its stages run alone, measured
in the same run on the same base dir (the standalone sum is the reference, so the ratio is what to read).

    .venv/bin/python bench/speedrun.py [--preset tiny]

1. `nanochat speedrun --preset P` from an empty base dir: wall time and each stage's reported time.
2. Each stage again with `nanochat <command> --preset P` on that base dir, one after another: wall times.
Prints both per stage, the sums, and speedrun wall / standalone sum. Nothing else may run meanwhile:
on 2 cores a second torch process slows both 10-40x. Stages that only find their output in place when
run alone (corpus, download, eval_bundle: cached packages, shards already there) cost less alone than in
the flow; the table shows them apart.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from flows.speedrun import read_summary  # noqa: E402
from nanochat_core.registry import FAMILIES, STAGES  # noqa: E402

NANOCHAT = [sys.executable, "-m", "nanochat_core.cli"]


def timed(argv: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    out = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return seconds, out


def standalone_commands(preset: str) -> dict[str, list[str]]:
    """Task run name -> the command that runs that stage alone."""
    commands = {}
    for stage in STAGES.values():
        base = [*NANOCHAT, *stage.command.split(), "--preset", preset]
        if stage.name == "chat_eval":
            for family in list(FAMILIES)[1:]:
                commands[f"chat_eval[{family}]"] = [*base, "--source", family]
        elif stage.name == "base_eval":
            commands["base_eval"] = [*base, "--core"]  # the flow scores CORE when the bundle is there
        else:
            commands[stage.name] = base
    return commands


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="bench-speedrun-")
    env = {**os.environ, "NANOCHAT_BASE_DIR": base}

    wall, out = timed([*NANOCHAT, "speedrun", "--preset", args.preset], env)
    in_flow = {name: seconds for name, (_, seconds) in read_summary(out.stdout).items()}
    alone = {}
    for name, argv in standalone_commands(args.preset).items():
        if any(row.split("[")[0] == name.split("[")[0] for row in in_flow):
            alone[name], _ = timed(argv, env)

    width = max(map(len, in_flow))
    print(f"{'stage':<{width}}  {'in flow':>8}  {'alone':>8}  ratio")
    for name, seconds in in_flow.items():
        key = name if name in alone else name.split("[")[0]
        ref = alone.get(key)
        ratio = f"{seconds / ref:5.2f}" if ref else "    -"
        print(f"{name:<{width}}  {seconds:7.1f}s  {ref if ref is not None else float('nan'):7.1f}s  {ratio}")
    total_alone = sum(alone.values())
    print(f"\nspeedrun wall time {wall:.1f}s; summed stage time in the flow {sum(in_flow.values()):.1f}s; "
          f"stages run alone, summed {total_alone:.1f}s")
    print(f"wall / standalone sum: {wall / total_alone:.2f}")


if __name__ == "__main__":
    main()
