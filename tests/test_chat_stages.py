"""The post-training stages end to end on a tiny model: mid → SFT → RL → chat_eval in-process on CPU,
each stage's ref and checkpoint, the report's summary table, and the pieces the loops rely on
(SFT batch masking, the direction of the policy gradient)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from chat_fixtures import single_thread, tiny_model  # noqa: F401 (autouse fixture)
from nanochat_core.checkpoint import load_model, save_checkpoint
from nanochat_core.errors import UserError
from nanochat_core.paths import join
from nanochat_core.post_train import sft_batch
from nanochat_core.presets import tiny
from nanochat_core.stages import chat_eval, chat_rl, chat_sft, mid_train, report
from nanochat_core.tasks.chat import Identity
from nanochat_core.tasks.math import SyntheticMath
from nanochat_core.tokenizer import Tokenizer
from conftest import run_alone

SUMMARY_KEYS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"]


def make_base(base: str) -> None:
    """A tokenizer trained on our own chat text and an untrained depth-2 GPT saved as base_train would."""
    texts = [json.dumps(c) for c in Identity()] + [json.dumps(SyntheticMath(200)[i]) for i in range(200)]
    tok = Tokenizer.train(texts, vocab_size=512)
    tok_dir = join(base, "tokenizer")
    tok.save(tok_dir)
    model = tiny_model(tok.vocab_size, seq_len=128)
    meta = {"step": 0, "model_config": model.config.to_dict(), "tokenizer_dir": tok_dir}
    save_checkpoint(join(base, "base_checkpoints", "d2"), 0, 0, model.state_dict(), {}, meta)


def small_config():
    return type(tiny()).model_validate({
        **tiny().model_dump(),
        "mid_train": {**tiny().mid_train.model_dump(), "tasks": ["identity", "math:40", "spelling:30"],
                      "max_seq_len": 64, "device_batch_size": 4, "total_batch_size": 512, "num_iterations": 3,
                      "val_examples": 10},
        "chat_sft": {**tiny().chat_sft.model_dump(), "tasks": ["identity", "math:30", "spellingbee:10"],
                     "max_seq_len": 128, "device_batch_size": 4, "examples_per_step": 8, "num_iterations": 3,
                     "val_examples": 8},
        "chat_rl": {**tiny().chat_rl.model_dump(), "tasks": ["math:8"], "examples_per_step": 2, "num_samples": 2,
                    "max_new_tokens": 12, "num_iterations": 2, "eval_examples": 2},
        "chat_eval": {**tiny().chat_eval.model_dump(), "max_problems": 2, "max_new_tokens": 12},
    })


def test_mid_sft_rl_chat_eval_in_process(_isolated_base_dir):
    base = str(_isolated_base_dir)
    make_base(base)
    cfg = small_config()
    refs = {}
    for module, stage in ((mid_train, "mid_train"), (chat_sft, "chat_sft"), (chat_rl, "chat_rl")):
        ref = run_alone(module, cfg)
        refs[stage] = ref
        assert ref["stage"] == stage and ref["step"] > 0 and ref["manifest"]
        saved = json.loads(open(join(ref["path"], "result.json")).read())
        assert saved["digest"] == ref["digest"]
        model, tokenizer, meta = load_model(ref["path"])
        assert tokenizer is not None and meta["stage"] == stage and model.config.n_layer == 2
    assert refs["chat_sft"]["started_from"] == refs["mid_train"]["path"]
    assert refs["chat_rl"]["started_from"] == refs["chat_sft"]["path"]
    assert os.path.basename(os.path.dirname(refs["chat_rl"]["path"])) == "chatrl_checkpoints"
    assert "GSM8K pass@2" in refs["chat_rl"]
    metrics = [json.loads(line) for line in open(join(refs["chat_sft"]["path"], "metrics.jsonl"))]
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2, 3] and "val/loss" in metrics[-1]

    for source in ("mid", "rl"):
        ev_cfg = cfg.model_copy(update={"chat_eval": cfg.chat_eval.model_copy(update={"source": source})})
        ref = run_alone(chat_eval, ev_cfg)
        refs[ref["stage"]] = ref
        assert ref["stage"] == f"{source}_eval" and ref["source"] == source
        for key in SUMMARY_KEYS:
            assert 0.0 <= ref[key] <= 1.0 or key == "ChatCORE"
        assert ref["problems"] == 12
    table = "\n".join(report.summary_table(refs))
    for row in ["CORE", *SUMMARY_KEYS]:
        assert f"| {row} |" in table
    mid_column = [line.split("|")[3].strip() for line in table.splitlines() if line.startswith("| ARC-Easy")]
    assert mid_column != ["-"]

    # A second run never overwrites the first one's checkpoints: they are moved aside.
    again = run_alone(mid_train, cfg)
    siblings = os.listdir(os.path.dirname(again["path"]))
    assert any(name.startswith("d2.") for name in siblings)


def test_stage_errors_are_one_sentence(_isolated_base_dir):
    cfg = small_config()
    with pytest.raises(UserError, match="no complete checkpoint.*run `nanochat base-train` first"):
        run_alone(mid_train, cfg)
    make_base(str(_isolated_base_dir))
    bad = cfg.model_copy(update={"mid_train": cfg.mid_train.model_copy(update={"total_batch_size": 500})})
    with pytest.raises(UserError, match="is not a multiple of"):
        run_alone(mid_train, bad)
    bad = cfg.model_copy(update={"mid_train": cfg.mid_train.model_copy(update={"tasks": ["nonsense"]})})
    with pytest.raises(UserError, match="unknown task"):
        run_alone(mid_train, bad)


def test_sft_batch_masks_prompt_tool_output_and_padding():
    rows = [([1, 2, 3, 4, 5], [0, 0, 1, 0, 1]), ([6, 7, 8], [0, 1, 1])]
    x, y = sft_batch(rows, pad_id=0, device="cpu")
    assert x.tolist() == [[1, 2, 3, 4], [6, 7, 0, 0]]
    assert y.tolist() == [[-1, 3, -1, 5], [7, 8, -1, -1]]


def test_policy_gradient_raises_the_log_prob_of_rewarded_samples():
    model = tiny_model(64, seed=4, seq_len=32).train()
    good, bad = [1, 5, 9, 13, 17], [1, 6, 10, 14, 18]
    masks = [[0, 1, 1, 1, 1]] * 2

    def logp(seq):
        with torch.no_grad():
            return -float(model(torch.tensor([seq[:-1]]), torch.tensor([seq[1:]]), loss_reduction="sum"))

    before = logp(good), logp(bad)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss, tokens = chat_rl.policy_gradient_loss(model, [good, bad], masks, [0.5, -0.5], "cpu", contextlib.nullcontext)
    assert tokens == 8
    (loss / tokens).backward()
    opt.step()
    after = logp(good), logp(bad)
    assert after[0] > before[0] and after[1] < before[1]


@pytest.mark.slow
def test_post_training_under_torchrun_with_two_processes(_isolated_base_dir, tmp_path):
    base = str(_isolated_base_dir)
    make_base(base)
    cfg = small_config()
    cfg = cfg.model_copy(update={"chat_eval": cfg.chat_eval.model_copy(update={"source": "mid", "max_problems": 4})})
    path = tmp_path / "cfg.json"
    path.write_text(cfg.model_dump_json())
    env = {**os.environ, "NANOCHAT_BASE_DIR": base, "OMP_NUM_THREADS": "1"}
    for stage in ("mid_train", "chat_sft", "chat_rl", "chat_eval"):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", f"nanochat_core.stages.{stage}", "--config", str(path)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(open(join(base, "chat_eval", "mid", "result.json")).read())
    assert result["problems"] == 24 and result["stage"] == "mid_eval"
    rl = json.loads(open(join(base, "chatrl_checkpoints", "d2", "result.json")).read())
    assert rl["step"] == 2 and rl["started_from"] == join(base, "chatsft_checkpoints", "d2")
