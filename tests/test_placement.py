"""Placement: which devices each stage gets, presets named in flow parameters, and (on the session
speedrun) that torch stages never share the cores and each takes about its standalone time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from nanochat_core.presets import PRESETS, d12, d20, from_parameters, tiny
from nanochat_core.registry import STAGES

TORCH_STAGES = [s for s, r in STAGES.items() if r.devices == "node"]


def test_gpu_presets_run_every_torch_stage_on_all_devices_of_the_node():
    assert {s: d20().nproc(s) for s in TORCH_STAGES} == {s: 8 for s in TORCH_STAGES}
    assert {s: d12().nproc(s) for s in TORCH_STAGES} == {s: 1 for s in TORCH_STAGES}
    cfg = d20()
    # ... with the batch sizes that keep each stage's total batch: everything divides on 8 processes.
    assert cfg.mid_train.total_batch_size % (cfg.mid_train.device_batch_size * cfg.mid_train.max_seq_len * 8) == 0
    assert cfg.chat_sft.examples_per_step % (cfg.chat_sft.device_batch_size * 8) == 0
    assert cfg.chat_rl.examples_per_step % 8 == 0
    # A stage's own setting wins over the node's.
    one = cfg.model_copy(update={"base_eval": cfg.base_eval.model_copy(update={"nproc_per_node": 2})})
    assert one.nproc("base_eval") == 2 and one.nproc("mid_train") == 8


def test_a_preset_named_in_the_flow_parameters_is_that_preset():
    from flows.nanochat import nanochat

    def validated(cfg):
        return nanochat.validate_parameters({"cfg": cfg})["cfg"]

    assert validated({"preset": "tiny"}) == tiny()
    ten = validated({"preset": "d12", "base_train": {"depth": 10}})
    assert ten.preset == "d12" and ten.base_train.depth == 10 and ten.download == d12().download
    assert ten.base_train.model_dump(exclude={"depth"}) == d12().base_train.model_dump(exclude={"depth"})
    # Without a preset, the declared defaults, as before.
    assert validated({"base_train": {"depth": 4}}).base_train.depth == 4
    with pytest.raises(Exception, match=r"unknown preset 'd13'; choose one of " + ", ".join(PRESETS)):
        validated({"preset": "d13"})
    assert from_parameters(tiny()) == tiny()  # a config object passes through


def test_torch_stages_get_the_node_and_light_ones_nothing(monkeypatch):
    from flows.tasks import device_tags, processes

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # a pipeline pinned to half of an 8-GPU node
    cfg = PRESETS["d20"]().model_copy(update={"devices_per_node": None})
    assert processes(cfg, "mid_train") == (4, 1) and processes(cfg, "download") == (1, 1)
    tag = device_tags("base_train")[0]
    assert tag.endswith(":gpus=4+5+6+7") and device_tags("tok_train") == [] and device_tags("report") == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert device_tags("base_train") != [tag]  # the other half is other devices: both pipelines run at once
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: torch and CPU-bound stages share the cores
    assert processes(tiny(), "base_train") == (1, 1)
    assert device_tags("tok_train") == device_tags("base_train") and device_tags("download") == []


@pytest.mark.slow
def test_no_two_torch_stages_hold_the_cores_at_once(config_reads):
    """On CPU the node's devices are its cores: torch stages, and the CPU-bound tokenizer and corpus
    stages, run one at a time (the processes' own start and end times)."""
    held = sorted((r["started"], r["ended"], r["stage"]) for r in config_reads if STAGES[r["stage"]].devices != "none")
    assert len(held) >= len(TORCH_STAGES)
    for (_, end, stage), (start, _, following) in zip(held, held[1:]):
        assert start >= end - 0.05, f"{following} started {end - start:.1f}s before {stage} ended"


@pytest.mark.slow
def test_each_stage_in_the_flow_takes_about_its_standalone_time(first_run, tmp_path):
    """Reported time in the flow within 1.5x (+3 s) of the same stage run alone with `nanochat <stage>`
    on (a copy of) the same base dir: waiting for devices is not counted, sharing them never happens."""
    base, out, _ = first_run
    from flows.speedrun import read_summary

    in_flow = {name: seconds for name, (_, seconds) in read_summary(out.stdout).items()}
    copy = tmp_path / "base"
    shutil.copytree(base, copy, ignore=shutil.ignore_patterns("prefect", "prefect_results", "mlflow.db"))
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(copy)}
    for name, seconds in in_flow.items():
        stage, _, family = name.partition("[")
        if stage not in TORCH_STAGES:
            continue
        argv = [sys.executable, "-m", "nanochat_core.cli", *STAGES[stage].command.split(), "--preset", "tiny"]
        argv += {"chat_eval": ["--source", family.rstrip("]")], "base_eval": ["--core"]}.get(stage, [])
        t0 = time.perf_counter()
        alone = subprocess.run(argv, env=env, capture_output=True, text=True)
        standalone = time.perf_counter() - t0
        assert alone.returncode == 0, alone.stderr[-2000:]
        assert seconds <= 1.5 * standalone + 3, f"{name}: {seconds:.1f}s in the flow, {standalone:.1f}s alone"
