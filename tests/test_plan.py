"""`nanochat plan` reproduces the source document's worked examples (DESIGN.md §4)."""

import json
import subprocess
import sys

import pytest
import torch

from nanochat_core.config import BaseTrainConfig, PlanConfig
from nanochat_core.model.gpt import GPTConfig, build_model
from nanochat_core.plan import main, make_plan


@pytest.fixture
def plan_json(capsys):
    def run(*args):
        main([*args, "--json"])
        return json.loads(capsys.readouterr().out)

    return run


def test_console_script_prints_json():
    out = subprocess.run([sys.executable, "-m", "nanochat_core.cli", "plan", "--preset", "tiny", "--json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["depth"] == 2


def test_d20_speedrun_worked_example(plan_json):
    p = plan_json("--preset", "d20", "--nproc-per-node", "8")
    assert (p["depth"], p["device_batch_size"], p["max_seq_len"]) == (20, 32, 2048)
    assert (p["total_batch_size"], p["vocab_size"]) == (524_288, 65_536)
    assert p["model_dim"] == 1280 and p["num_heads"] == 10 and p["num_kv_heads"] == 10
    assert p["grad_accum_steps"] == 1
    assert 555e6 < p["num_params"] < 565e6
    assert 21_300 <= p["num_iterations"] <= 21_500
    assert 11.1e9 < p["total_tokens"] < 11.3e9
    assert 214 <= p["shards_needed"] <= 218
    required = """model_dim num_heads num_kv_heads num_params tokens_per_fwdbwd world_tokens_per_fwdbwd
        grad_accum_steps num_iterations total_tokens shards_needed flops_per_token total_flops est_hours
        est_cost_usd est_peak_mem_gb suggested_device_batch_size""".split()
    assert set(required) <= set(p)


def test_flops_per_token_counts_everything_but_the_token_embedding(plan_json):
    p = plan_json("--preset", "d20")
    attention = 12 * 20 * 10 * 128 * 2048
    assert p["flops_per_token"] == 6 * (p["num_params"] - p["wte_params"]) + attention
    assert p["total_flops"] == pytest.approx(p["flops_per_token"] * p["total_tokens"])


def test_d26_and_d12_batches(plan_json):
    d26 = plan_json("--preset", "d26", "--device-batch-size", "16", "--nproc-per-node", "8")
    assert d26["model_dim"] == 1664 and d26["grad_accum_steps"] == 2
    d12 = plan_json("--preset", "d12", "--nproc-per-node", "1", "--device-batch-size", "8")
    assert d12["grad_accum_steps"] == 32


def test_cost_and_time_follow_the_assumptions(plan_json):
    a = plan_json("--preset", "d20", "--mfu", "0.4", "--usd-per-gpu-hour", "3")
    b = plan_json("--preset", "d20", "--mfu", "0.2", "--usd-per-gpu-hour", "6")
    assert b["est_hours"] == pytest.approx(2 * a["est_hours"])
    assert b["est_cost_usd"] == pytest.approx(4 * a["est_cost_usd"])
    assert a["est_hours"] == pytest.approx(a["total_flops"] / (989e12 * 8 * 0.4) / 3600)


def test_suggested_batch_shrinks_with_device_memory(plan_json):
    big = plan_json("--preset", "d20", "--gpu", "h100")["suggested_device_batch_size"]
    small = plan_json("--preset", "d20", "--gpu", "4090")["suggested_device_batch_size"]
    assert big == 32 and 1 <= small < big


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_meta_count_equals_the_instantiated_model(depth):
    train = BaseTrainConfig(depth=depth, aspect_ratio=32, head_dim=32, max_seq_len=64, device_batch_size=1,
                            total_batch_size=64, num_iterations=1)
    p = make_plan(train, vocab_size=300, num_shards=1, assume=PlanConfig(gpu="cpu"))
    model = build_model(GPTConfig.from_depth(depth, 300, 64, 32, 32), device="cpu")
    assert p.num_params == sum(t.numel() for t in model.parameters())
    assert model.transformer.wte.weight.device == torch.device("cpu")


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--device-batch-size", "3"], "is not a multiple of"),
        (["--depth", "0"], "--depth"),
        (["--preset", "d99"], "unknown preset"),
        (["--gpu", "tpu"], "unknown device"),
        (["--depth", "3", "--aspect-ratio", "43"], "does not split"),
        (["--num-iterations", "-1", "--target-param-data-ratio", "-1"], "no training horizon"),
    ],
)
def test_bad_input_is_one_sentence_with_exit_code_2(args, phrase, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and phrase in err and "Traceback" not in err and "\n" not in err


def test_epoch_warning_when_downloaded_shards_are_too_few(capsys):
    main(["--preset", "d20", "--num-shards", "100"])
    out = capsys.readouterr().out
    assert "warning: 100 shards" in out and "repeats" in out
