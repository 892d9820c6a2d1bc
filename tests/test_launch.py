"""The launcher runs a real stage process, streams its lines, returns its ref, and reports failures."""

import json
import sys

import pytest

from nanochat_core import artifacts
from nanochat_core.launch import StageFailed, command, run_stage
from nanochat_core.presets import get_preset


def test_runs_a_stage_and_returns_its_ref(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    lines = []
    ref = run_stage("report", get_preset("tiny"), lines.append, inputs={"tok_train": {"stage": "tok_train", "path": "/x", "vocab_size": 4096}})
    assert ref["stage"] == "report" and ref["path"] == f"{tmp_path}/report"
    assert lines[0].startswith("$ ") and "nanochat_core.stages.report" in lines[0]
    assert any(line.startswith("report: ") for line in lines)
    # the inputs reached the child: the report lists the stage it was handed
    assert "tok_train" in (tmp_path / "report" / "report.md").read_text()
    assert artifacts.verify(ref)
    assert json.loads((tmp_path / "report" / "result.json").read_text())["digest"] == ref["digest"]


def test_failure_carries_the_last_lines():
    with pytest.raises(StageFailed) as failed:
        run_stage("no_such_stage", get_preset("tiny"), lambda line: None)
    assert failed.value.returncode != 0
    assert "No module named nanochat_core.stages.no_such_stage" in str(failed.value)


def test_torchrun_only_for_several_processes():
    assert command("base_train", "c.json") == [sys.executable, "-m", "nanochat_core.stages.base_train", "--config", "c.json"]
    two = command("base_train", "c.json", nproc_per_node=2)
    assert two[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=2"] and "--standalone" in two
    multi = command("base_train", "c.json", nproc_per_node=8, nnodes=2, rdzv_endpoint="10.0.0.1:29500")
    assert "--nnodes=2" in multi and "--rdzv_backend=c10d" in multi and "--rdzv_endpoint=10.0.0.1:29500" in multi


def test_a_modified_artifact_fails_verification(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"weights")
    ref = artifacts.make_ref("base_train", str(tmp_path))
    assert artifacts.verify(ref)
    (tmp_path / "model.pt").write_bytes(b"WEIGHTS")  # same size, other content
    assert not artifacts.verify(ref)
    (tmp_path / "model.pt").write_bytes(b"wei")
    assert not artifacts.verify(ref)
    (tmp_path / "model.pt").unlink()
    assert not artifacts.verify(ref)
