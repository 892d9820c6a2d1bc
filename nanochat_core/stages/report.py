"""The report card: one markdown file (+ loss-curve PNGs) gathering every stage's figures.

    nanochat report                       # from the result.json files under $NANOCHAT_BASE_DIR
    python -m nanochat_core.stages.report --config cfg.json     (what the flow runs; every ref comes as an input)

Written to <base>/report/report.md. The flow publishes it as a Prefect markdown artifact and logs it
to the MLflow parent run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import psutil
import torch

from nanochat_core import artifacts, storage
from nanochat_core.config import PipelineConfig
from nanochat_core.errors import exit_on_user_error
from nanochat_core.paths import base_dir, join, output_dir
from nanochat_core.registry import FAMILIES, STAGES, eval_ref_name
from nanochat_core.stage_args import parse
from nanochat_core.tracking import read_jsonl

# The summary table of the seed-era report card, spelled exactly so: a column per checkpoint family
# (BASE / MID / SFT / RL), filled from the evaluation of that family's model.
SUMMARY_ROWS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"]
SUMMARY_COLUMNS = {family.upper(): eval_ref_name(family) for family in FAMILIES}
# Sections in DAG order; each chat_eval ref goes by its family's evaluation name (mid_eval, ...).
STAGE_ORDER = [s for name in STAGES if name != "report"
               for s in ([eval_ref_name(f) for f in FAMILIES if f != "base"] if name == "chat_eval" else [name])]
# Keys of a ref that are bookkeeping, not figures.
HIDDEN = {"stage", "path", "manifest", "digest", "run_id", "metrics_path", "samples", "tasks", "per_task",
          "core_table", "missing_tasks", "missing_reasons"}


def find_refs(root: str) -> dict[str, dict]:
    """result.json files up to three levels below the base dir, by stage (the newest wins)."""
    fs, base = storage.filesystem(root)
    found: dict[str, tuple[float, dict]] = {}
    for depth in ("*", "*/*", "*/*/*"):
        for path in fs.glob(f"{base.rstrip('/')}/{depth}/{artifacts.RESULT_FILE}"):
            try:
                ref = json.loads(fs.cat_file(path))
                mtime = fs.info(path).get("mtime", 0) or 0
            except (OSError, ValueError):
                continue
            stage = ref.get("stage")
            if stage and stage != "report" and (stage not in found or mtime > found[stage][0]):
                found[stage] = (mtime, ref)
    return {stage: ref for stage, (_, ref) in found.items()}


def environment() -> list[str]:
    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                                 cwd=os.path.dirname(__file__))
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    dirty = bool(git("status", "--porcelain"))
    return [
        f"- git: {git('rev-parse', '--short', 'HEAD') or 'unknown'} on {git('rev-parse', '--abbrev-ref', 'HEAD') or '?'}"
        f"{' (dirty)' if dirty else ''}",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- hardware: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB memory, "
        f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''}{': ' + gpus[0] if gpus else ''}",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}"
        f"{', CUDA ' + torch.version.cuda if gpus and torch.version.cuda else ''}",
    ]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def stage_section(stage: str, ref: dict) -> list[str]:
    lines = [f"## {stage}", "", f"- artifact: `{ref.get('path')}`"]
    if ref.get("run_id"):
        lines.append(f"- MLflow run: `{ref['run_id']}`")
    for key, value in ref.items():
        # "eval/<task>" keys repeat the per-task table under their MLflow names
        if key not in HIDDEN and "/" not in key and isinstance(value, (int, float, str, bool)):
            lines.append(f"- {key}: {_fmt(value)}")
    return lines + [""]


def summary_table(refs: dict[str, dict]) -> list[str]:
    """Rows CORE … ChatCORE, columns BASE / MID / SFT / RL; '-' where a stage has not measured it."""
    def value(stage: str, row: str) -> str:
        ref = refs.get(stage, {})
        metrics = {**ref.get("tasks", {}), **ref}
        key = {"CORE": "core", "ChatCORE": "chatcore"}.get(row, row)
        found = metrics.get(key)
        if not isinstance(found, (int, float)):
            return "-"
        # A score over fewer tasks than its definition says so (a source the registry stopped serving).
        count, of = {"CORE": (ref.get("core_tasks"), ref.get("core_of")), "ChatCORE": (ref.get("chatcore_tasks"), ref.get("chatcore_of"))}.get(row, (None, None))
        return _fmt(float(found)) + (f" ({count} of {of} tasks)" if count is not None and of and count < of else "")

    header = "| metric | " + " | ".join(SUMMARY_COLUMNS) + " |"
    rule = "|---|" + "---|" * len(SUMMARY_COLUMNS)
    body = [f"| {row} | " + " | ".join(value(s, row) for s in SUMMARY_COLUMNS.values()) + " |" for row in SUMMARY_ROWS]
    return ["## Summary", "", header, rule, *body, ""]


def loss_plot(refs: dict[str, dict], out_dir: str) -> list[str]:
    """PNG of train loss and val bpb over steps for each stage with a metrics log; markdown lines."""
    matplotlib.use("Agg")

    lines = []
    for stage, ref in refs.items():
        rows = read_jsonl(ref["metrics_path"]) if ref.get("metrics_path") else []
        series = {key: [(r["step"], r[key]) for r in rows if key in r and "step" in r]
                  for key in ("train/loss", "val/bpb")}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
        for ax, (key, points) in zip(axes[0], series.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
            ax.set_xlabel("step")
            ax.set_title(f"{stage} {key}")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"{stage}_loss.png"
        with storage.atomic_open(join(out_dir, name), "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
        lines += [f"![{stage} loss]({name})", ""]
    return lines


def run(cfg: PipelineConfig, inputs: dict[str, dict] | None = None) -> dict:
    """The report from the refs the flow hands over (every stage's), else from the base dir's result.json files."""
    refs = inputs or find_refs(base_dir())
    out_dir = output_dir("report", cfg)
    storage.makedirs(out_dir)
    ordered = {s: refs[s] for s in [*STAGE_ORDER, *sorted(set(refs) - set(STAGE_ORDER))] if s in refs}
    seconds = sum(float(r.get("seconds", 0) or 0) for r in ordered.values())
    body = [
        "# nanochat report card", "",
        f"preset **{cfg.preset}**; stages: {', '.join(ordered) or 'none yet'}", "",
        *environment(),
        f"- stage time (sum): {seconds / 60:.1f} min", "",
        *summary_table(ordered),
        *loss_plot(ordered, out_dir),
    ]
    for stage, ref in ordered.items():
        body += stage_section(stage, ref)
        if ref.get("core_table"):
            body += ["```", ref["core_table"], "```", ""]
    storage.write_text(join(out_dir, "report.md"), "\n".join(body))
    return artifacts.make_ref("report", out_dir, {"stages": len(ordered)})


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg, inputs = parse("report", argv)
    ref = run(cfg, inputs)
    artifacts.emit(ref)
    print(f"report: {ref['path']}/report.md ({ref['stages']} stages)")


if __name__ == "__main__":
    main()
