"""The tiny speedrun end to end through the real flow: Prefect's ephemeral API, torchrun-style child
processes, MLflow in SQLite. One run per test session (the `speedrun` fixture); every test reuses it."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

from conftest import EXPECTED, rerun_states, speedrun, states
from nanochat_core.artifacts import verify

pytestmark = pytest.mark.slow


def test_every_stage_completes(first_run):
    _, out, table = first_run
    assert sorted(table) == sorted(EXPECTED)
    assert set(table.values()) == {"Completed"}
    assert "report: " in out.stdout and "prefect server start" in out.stdout and "mlflow ui" in out.stdout


def test_mlflow_has_a_parent_and_a_child_per_stage(first_run):
    base, out, table = first_run
    parent = re.search(r"MLflow parent run: (\w+)", out.stdout).group(1)
    db = sqlite3.connect(base / "mlflow.db")
    children = db.execute(
        "select r.run_uuid, r.name, r.status from runs r join tags t on t.run_uuid = r.run_uuid "
        "where t.key = 'mlflow.parentRunId' and t.value = ?", (parent,)).fetchall()
    assert sorted(name for _, name, _ in children) == sorted(s.split("[")[0] for s in table)
    assert all(status == "FINISHED" for _, _, status in children)
    assert db.execute("select status from runs where run_uuid = ?", (parent,)).fetchone() == ("FINISHED",)
    train = next(run_id for run_id, name, _ in children if name == "base_train")
    losses = db.execute("select count(*) from metrics where run_uuid = ? and key = 'train/loss'", (train,)).fetchone()
    assert losses[0] > 1
    params = dict(db.execute("select key, value from params where run_uuid = ?", (train,)).fetchall())
    assert params["base_train.depth"] == "2"


def test_the_serving_key_reaches_neither_the_flow_parameters_nor_mlflow(first_run):
    from conftest import SERVING_KEY

    base, _, _ = first_run
    db = sqlite3.connect(base / "mlflow.db")
    params = db.execute("select key, value from params").fetchall()
    assert params and not [k for k, v in params if k.split(".")[0] in ("serve", "chat", "inference")]
    assert not [k for k, v in params if SERVING_KEY in str(v)]
    for store in [base / "mlflow.db", *(base / "prefect").glob("prefect.db*")]:  # the flow run's parameters live here
        assert SERVING_KEY.encode() not in store.read_bytes(), store


def test_report_has_the_summary_table(first_run):
    base, _, _ = first_run
    report = (base / "report" / "report.md").read_text()
    assert "| metric | BASE | MID | SFT | RL |" in report
    core = next(line for line in report.splitlines() if line.startswith("| CORE |"))
    # CORE says over how many of its 22 tasks it is (winograd and agi_eval_lsat_ar ship in no package).
    assert re.fullmatch(r"-?\d\.\d{4} \(\d+ of 22 tasks\)", core.split("|")[2].strip()), core


def test_cache_and_result_records_live_under_the_base_dir(first_run):
    base, _, _ = first_run
    assert any((base / "prefect_results").iterdir())
    assert (base / "prefect" ).is_dir()


def test_rerun_with_nothing_changed_is_fully_cached(first_run):
    base, _, _ = first_run
    out, table = speedrun(base)
    assert out.returncode == 0, out.stderr[-3000:]
    assert table == rerun_states(base), table


def test_changing_one_stage_reruns_it_and_its_dependents_only(first_run):
    base, _, _ = first_run
    out, table = speedrun(base, "--set", "tok_eval.max_docs=50")
    assert out.returncode == 0, out.stderr[-3000:]
    assert table == {**rerun_states(base), "tok_eval": "Completed", "report": "Completed"}, table


def test_a_deleted_artifact_is_recomputed_not_trusted(first_run):
    base, _, _ = first_run
    (base / "report" / "report.md").unlink()
    out, table = speedrun(base)
    assert out.returncode == 0, out.stderr[-3000:]
    assert table["report"] == "Completed" and (base / "report" / "report.md").exists()
    # The re-made report is what its new ref describes, so the next run trusts it again.
    ref = json.loads((base / "report" / "result.json").read_text())
    assert verify(ref) and "report.md" in ref["manifest"]


def test_a_killed_stage_is_retried_and_resumes_from_its_checkpoint(first_run):
    """Kill base_train's process after its first checkpoint: the task retries and resumes, not restarts.

    Runs last: it retrains base_train with another config in the shared base dir."""
    import os
    import signal
    import subprocess
    import sys
    import time

    base, _, _ = first_run
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base)}
    args = ["--set", "base_train.save_every=20", "--set", "base_train.num_iterations=80"]
    proc = subprocess.Popen([sys.executable, "-m", "nanochat_core.cli", "speedrun", "--preset", "tiny", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    checkpoint = base / "base_checkpoints" / "d2" / "model_000020.pt"
    deadline, killed = time.time() + 600, False
    while not killed and time.time() < deadline and proc.poll() is None:
        if checkpoint.exists():
            # Only inside the process tree this test started: never another run's base_train on the machine.
            for pid in descendants(proc.pid):
                try:
                    cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
                except OSError:
                    continue
                if b"nanochat_core.stages.base_train" in cmdline:
                    os.kill(pid, signal.SIGKILL)
                    killed = True
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=900)
    assert killed, "base_train finished before it could be killed"
    assert proc.returncode == 0, stderr[-3000:]
    assert states(stdout)["base_train"] == "Completed"
    assert "attempt 2 of base_train: it continues" in stderr
    resumed = stderr[stderr.index("attempt 2 of base_train"):]
    assert re.search(r"resumed from step (20|40|60) of ", resumed)
    assert re.search(r"step 000[2-9]\d/00080", resumed) and not re.search(r"step 00001/00080", resumed)


def descendants(root: int) -> list[int]:
    """Every process below `root` (children, their children, ...), from /proc's parent links."""
    import os

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and ')'
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
