"""base_train end to end on a tiny model: logs, checkpoints, exact resume, bad input, base_eval."""

import json
import os
import re
import shutil

import pytest
import torch

from nanochat_core import checkpoint
from nanochat_core.errors import UserError
from nanochat_core.model.samples import SAMPLE_PROMPTS
from nanochat_core.presets import tiny
from nanochat_core.stages import base_eval, base_train
from pretrain_data import make_pretraining_inputs
from conftest import run_alone

STEP_LINE = re.compile(
    r"^step (\d{5})/(\d{5}) \| loss (\d+\.\d{4}) \| lrm (\d\.\d\d) \| dt (\d+)ms \| tok/s (\d+) \| "
    r"mfu (\d+\.\d) \| epoch (\d+) \| eta (\d+\.\d)m$"
)


def config(base, **train):
    """A ~160K-parameter model that trains a step in well under a second on one core."""
    cfg = tiny()
    fields = dict(depth=2, aspect_ratio=32, head_dim=16, max_seq_len=64, device_batch_size=4,
                  total_batch_size=512, num_iterations=8, eval_every=4, eval_tokens=2048, save_every=4,
                  sample_every=-1, compile=False, out=str(base / "ckpt"))
    fields.update(train)
    return cfg.model_copy(update={
        "base_train": cfg.base_train.model_copy(update=fields),
        "base_eval": cfg.base_eval.model_copy(update={"split_tokens": 2048, "device_batch_size": 4, "sample_tokens": 4}),
    })


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    make_pretraining_inputs(str(tmp_path))
    return tmp_path


def metrics(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_trains_logs_and_keeps_the_last_checkpoints(base, capsys):
    result = run_alone(base_train, config(base, save_every=2, keep_last=2))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if STEP_LINE.match(line)]
    assert [int(STEP_LINE.match(line).group(1)) for line in lines] == list(range(1, 9))
    records = metrics(base / "ckpt" / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    val = [r["val/bpb"] for r in records if "val/bpb" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert len(val) == 3 and val[0] > val[1] > val[2]  # steps 0, 4, 8: bpb falls
    assert train[-1]["train/lr_mult"] < 1.0  # the warmdown ran
    assert checkpoint.complete_steps(str(base / "ckpt")) == [6, 8]
    assert not [n for n in os.listdir(base / "ckpt") if "_000002" in n or "_000004" in n]
    assert result["step"] == 8 and result["val_bpb"] == val[-1]
    assert json.loads((base / "ckpt" / "result.json").read_text()) == result
    meta = checkpoint.read_meta(str(base / "ckpt"), 8)
    assert meta["loader_position"]["epoch"] >= 1 and meta["plan"]["grad_accum_steps"] == 2


def test_resume_reproduces_the_uninterrupted_run_exactly(base, capsys):
    cfg = config(base)
    run_alone(base_train, cfg)
    straight = metrics(base / "ckpt" / "metrics.jsonl")
    final = checkpoint.load_model_state(str(base / "ckpt"), 8)
    # A crash after step 4's checkpoint: step 8's files never existed, and the log ran ahead to step 6.
    for name in os.listdir(base / "ckpt"):
        if "_000008" in name:
            os.remove(base / "ckpt" / name)
    with open(base / "ckpt" / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in straight if r["step"] <= 6)
    run_alone(base_train, cfg.model_copy(update={"base_train": cfg.base_train.model_copy(update={"resume": True})}))
    assert "resumed from" in capsys.readouterr().out
    resumed = metrics(base / "ckpt" / "metrics.jsonl")
    key = lambda rs: [(r["step"], r.get("train/loss"), r.get("train/grad_norm"), r.get("val/bpb")) for r in rs]
    assert key(resumed) == key(straight)  # the same losses, bit for bit, each step once
    for name, tensor in checkpoint.load_model_state(str(base / "ckpt"), 8).items():
        assert torch.equal(tensor, final[name]), name


def test_resuming_a_finished_run_prints_its_last_line(base, capsys):
    cfg = config(base, num_iterations=4, eval_every=-1)
    run_alone(base_train, cfg)
    last = [line for line in capsys.readouterr().out.splitlines() if STEP_LINE.match(line)][-1]
    files = sorted(os.listdir(base / "ckpt"))
    result = run_alone(base_train, cfg.model_copy(update={"base_train": cfg.base_train.model_copy(update={"resume": True})}))
    assert last in capsys.readouterr().out.splitlines()
    assert result["step"] == 4 and sorted(os.listdir(base / "ckpt")) == files


def test_a_fresh_run_moves_old_checkpoints_aside(base, capsys):
    cfg = config(base, num_iterations=2, eval_every=-1)
    run_alone(base_train, cfg)
    old = checkpoint.load_model_state(str(base / "ckpt"), 2)
    run_alone(base_train, cfg)
    out = capsys.readouterr().out
    aside = [p for p in base.iterdir() if p.name.startswith("ckpt.")]
    assert len(aside) == 1 and f"moved them to {aside[0]}" in out
    kept = checkpoint.load_model_state(str(aside[0]), 2)
    assert all(torch.equal(kept[k], old[k]) for k in old)


def test_cli_errors_are_one_sentence(base, capsys):
    shutil.rmtree(base / "tokenizer")
    with pytest.raises(SystemExit) as exc:
        base_train.main(["--preset", "tiny", "--out", str(base / "ckpt"), "--no-compile"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no trained tokenizer") and "nanochat tok-train" in err and "Traceback" not in err


def test_missing_shards_is_a_user_error(base):
    shutil.rmtree(base / "base_data")
    with pytest.raises(UserError, match="base_data"):
        run_alone(base_train, config(base))


def test_resume_with_another_depth_or_vocab_is_refused(base):
    cfg = config(base, num_iterations=2, eval_every=-1)
    run_alone(base_train, cfg)
    deeper = cfg.base_train.model_copy(update={"depth": 3, "resume": True})
    with pytest.raises(UserError, match="different model"):
        run_alone(base_train, cfg.model_copy(update={"base_train": deeper}))
    make_pretraining_inputs(str(base), vocab_size=600)  # a retrained tokenizer
    same_depth = cfg.base_train.model_copy(update={"resume": True})
    with pytest.raises(UserError, match="vocab 512"):
        run_alone(base_train, cfg.model_copy(update={"base_train": same_depth}))
    assert checkpoint.complete_steps(str(base / "ckpt")) == [2]


def test_a_corrupt_checkpoint_is_named_and_left_alone(base):
    cfg = config(base, num_iterations=4, save_every=2, eval_every=-1)
    run_alone(base_train, cfg)
    model_file = base / "ckpt" / "model_000004.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    with pytest.raises(UserError, match="model_000004.pt is corrupt"):
        run_alone(base_train, cfg.model_copy(update={"base_train": cfg.base_train.model_copy(update={"resume": True})}))
    with pytest.raises(UserError, match="corrupt"):
        checkpoint.load_model(str(base / "ckpt"))
    model, _, meta = checkpoint.load_model(str(base / "ckpt"), step=2)  # the earlier one still loads
    assert meta["step"] == 2 and model.config.n_layer == 2


def test_nan_loss_stops_with_the_last_checkpoint_intact(base):
    cfg = config(base, num_iterations=6, save_every=1, eval_every=-1, grad_clip=0.0,
                 matrix_lr=1e30, embedding_lr=1e30, unembedding_lr=1e30)
    with pytest.raises(UserError, match="loss became nan") as exc:
        run_alone(base_train, cfg)
    steps = checkpoint.complete_steps(str(base / "ckpt"))
    assert steps and f"checkpoint step {steps[-1]} is intact" in str(exc.value)
    checkpoint.load_model(str(base / "ckpt"))  # loads without error


def test_load_model_and_base_eval(base, capsys):
    cfg = config(base, num_iterations=4, eval_every=-1)
    run_alone(base_train, cfg)
    model, tokenizer, meta = checkpoint.load_model(str(base / "ckpt"))
    assert meta["step"] == 4 and tokenizer is not None and not model.training
    result = run_alone(base_eval, cfg)  # its model input defaults to where base_train wrote (base_train.out)
    assert result["step"] == 4 and 0 < result["train_bpb"] < 10 and 0 < result["val_bpb"] < 10
    assert len(result["samples"]) == len(SAMPLE_PROMPTS)
    assert json.loads(open(os.path.join(result["path"], "result.json")).read()) == result
