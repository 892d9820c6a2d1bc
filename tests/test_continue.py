"""Runs that survive: a training stage killed with SIGKILL after a checkpoint and started again with the
same settings continues from that checkpoint and ends where an uninterrupted run ends, loss for loss;
started with other settings it starts fresh and moves the old checkpoints aside.

Each stage runs as its own process (`python -m nanochat_core.stages.<stage> --config ...`), as the
launcher runs it, on one thread so that the three runs of a stage do the same arithmetic.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chat_fixtures import tiny_model
from nanochat_core import checkpoint
from nanochat_core.paths import join
from nanochat_core.presets import tiny
from nanochat_core.tasks.chat import Identity
from nanochat_core.tasks.math import SyntheticMath
from nanochat_core.tokenizer import Tokenizer
from pretrain_data import make_pretraining_inputs

STEPS = 30


def pretrain_config(out: Path, **fields):
    cfg = tiny()
    train = dict(depth=2, aspect_ratio=32, head_dim=16, max_seq_len=64, device_batch_size=4, total_batch_size=512,
                 num_iterations=STEPS, eval_every=-1, save_every=3, sample_every=-1, compile=False, out=str(out))
    return cfg.model_copy(update={"base_train": cfg.base_train.model_copy(update={**train, **fields})})


def post_config(stage: str, out: Path):
    cfg = tiny()
    fields = {
        "mid_train": dict(tasks=["identity", "math:120", "spelling:60"], max_seq_len=64, device_batch_size=2,
                          total_batch_size=128, val_examples=10, eval_every=-1),
        "chat_sft": dict(tasks=["identity", "math:120", "spellingbee:40"], max_seq_len=128, device_batch_size=2,
                         examples_per_step=2, val_examples=8, eval_every=-1),
    }[stage]
    section = getattr(cfg, stage).model_copy(update={**fields, "num_iterations": STEPS, "save_every": 3, "out": str(out)})
    return cfg.model_copy(update={stage: section})


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


def start(stage: str, cfg, base: Path, *args: str) -> subprocess.Popen:
    path = base / f"{stage}-{time.monotonic_ns()}.json"
    path.write_text(cfg.model_dump_json())
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1"}
    env.pop("NANOCHAT_INPUTS_PATH", None)
    return subprocess.Popen([sys.executable, "-m", f"nanochat_core.stages.{stage}", "--config", str(path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def kill_after_first_checkpoint(proc: subprocess.Popen, ckpt_dir: Path) -> int:
    """SIGKILL the stage as soon as a checkpoint is complete; returns the latest complete step then."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt_dir.is_dir() and checkpoint.complete_steps(str(ckpt_dir)):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the stage finished before it could be killed"
    step = checkpoint.latest_step(str(ckpt_dir))
    assert step is not None and step < STEPS
    return step


def losses(ckpt_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def killed_and_continued(stage: str, cfg_of, base: Path, *args: str) -> tuple[dict, dict, str]:
    """(uninterrupted result, continued result, the continued run's output) of `stage`."""
    straight_dir, ckpt_dir = base / f"{stage}-straight", base / f"{stage}-ckpt"
    straight = start(stage, cfg_of(straight_dir), base, *args)
    finish(straight)
    killed = kill_after_first_checkpoint(start(stage, cfg_of(ckpt_dir), base, *args), ckpt_dir)
    out = finish(start(stage, cfg_of(ckpt_dir), base, *args))
    assert f"resumed from step {killed} of {ckpt_dir}" in out
    result = json.loads((ckpt_dir / "result.json").read_text())
    assert result["resumed_from"] == killed and result["step"] == STEPS
    assert losses(ckpt_dir) == losses(straight_dir)  # each step once, bit for bit
    return json.loads((straight_dir / "result.json").read_text()), result, out


@pytest.mark.slow
def test_base_train_killed_after_a_checkpoint_continues_to_the_same_loss(base):
    make_pretraining_inputs(str(base))
    straight, continued, _ = killed_and_continued("base_train", pretrain_config, base)
    assert straight["resumed_from"] is None and continued["val_bpb"] == straight["val_bpb"]


def make_start_model(base: Path) -> Path:
    """A tokenizer trained on chat text and an untrained depth-2 GPT saved as base_train saves one."""
    texts = [json.dumps(c) for c in Identity()] + [json.dumps(SyntheticMath(200)[i]) for i in range(200)]
    tok = Tokenizer.train(texts, vocab_size=512)
    tok.save(join(str(base), "tokenizer"))
    model = tiny_model(tok.vocab_size, seq_len=128)
    meta = {"step": 0, "model_config": model.config.to_dict(), "tokenizer_dir": join(str(base), "tokenizer")}
    start_dir = base / "start"
    checkpoint.save_checkpoint(str(start_dir), 0, 0, model.state_dict(), {}, meta)
    return start_dir


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["mid_train", "chat_sft"])
def test_post_training_killed_after_a_checkpoint_continues_to_the_same_loss(base, stage):
    start_dir = make_start_model(base)
    straight, continued, _ = killed_and_continued(stage, lambda out: post_config(stage, out), base,
                                                  "--model", str(start_dir))
    assert continued["train_loss"] == straight["train_loss"] and continued["val_loss"] == straight["val_loss"]


def test_other_settings_start_fresh_and_move_the_unfinished_run_aside(base, capsys):
    from conftest import run_alone
    from nanochat_core.stages import base_train

    make_pretraining_inputs(str(base))
    ckpt_dir = base / "ckpt"
    cfg = pretrain_config(ckpt_dir, num_iterations=4, save_every=2)
    run_alone(base_train, cfg)
    for name in os.listdir(ckpt_dir):  # as if killed between step 2's checkpoint and step 4's
        if "_000004" in name:
            os.remove(ckpt_dir / name)
    changed = cfg.model_copy(update={"base_train": cfg.base_train.model_copy(update={"matrix_lr": 0.01})})
    result = run_alone(base_train, changed)
    out = capsys.readouterr().out
    aside = [p for p in base.iterdir() if p.name.startswith("ckpt.")]
    assert result["resumed_from"] is None and "resumed from" not in out
    assert len(aside) == 1 and f"moved them to {aside[0]}" in out
    assert checkpoint.complete_steps(str(aside[0])) == [2] and checkpoint.complete_steps(str(ckpt_dir)) == [2, 4]
    # Settings that only say when to save or evaluate are not "other settings": the run continues.
    for name in os.listdir(ckpt_dir):
        if "_000004" in name:
            os.remove(ckpt_dir / name)
    cadence = changed.base_train.model_copy(update={"save_every": 1, "eval_every": 2, "keep_last": 3})
    result = run_alone(base_train, changed.model_copy(update={"base_train": cadence}))
    assert result["resumed_from"] == 2 and "resumed from step 2" in capsys.readouterr().out
