"""scripts/gpu_check.sh in its dry mode (no CUDA here): every step runs on CPU at tiny shapes and the
reports are written as on a GPU, so the script that a GPU session runs cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["setup", "base_train", "ratios", "batch_probe", "post_train", "serve", "nccl"]


@pytest.mark.slow
def test_the_dry_mode_runs_every_step_and_writes_the_reports(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out)}
    env.pop("NANOCHAT_BASE_DIR", None)  # the check makes its own base dirs
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    doc = json.loads((out / "gpu_check.json").read_text())
    table = (out / "gpu_check.md").read_text()
    statuses = {e["name"]: e["status"] for e in doc["steps"]}
    assert proc.returncode == 0, (statuses, table, proc.stdout[-3000:], proc.stderr[-2000:])
    assert doc["mode"] == "dry" and [e["name"] for e in doc["steps"]] == STEPS
    assert statuses == {**dict.fromkeys(STEPS, "ok"), "nccl": "skipped"}, table
    steps = {e["name"]: e for e in doc["steps"]}
    assert steps["base_train"]["figures"]["tok_per_sec"] > 0 and steps["base_train"]["figures"]["mfu_measured_peak_pct"] > 0
    assert steps["ratios"]["figures"]["compile_gain"] > 0 and steps["ratios"]["figures"]["bf16_gain"] > 0
    assert steps["batch_probe"]["figures"]["largest_fitting"] > 0
    kv = steps["post_train"]["figures"]["kv_cache"]
    assert kv["bf16"]["max_abs_logit_diff"] <= 0.25 and kv["fp32"]["max_abs_logit_diff"] <= 1e-3
    assert set(steps["serve"]["figures"]["levels"]) == {"1", "4", "20"}
    for name in STEPS:
        assert f"| {name} | {statuses[name]} |" in table
    assert "gpu_check: " in (out / "gpu_check.log").read_text()
