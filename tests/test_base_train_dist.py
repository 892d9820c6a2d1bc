"""base_train under a real torchrun with 2 CPU processes (gloo) against the 1-process run."""

import json
import os
import subprocess
import sys

import pytest

from nanochat_core import checkpoint
from pretrain_data import make_pretraining_inputs
from test_base_train import STEP_LINE, config, metrics

pytestmark = pytest.mark.slow


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    make_pretraining_inputs(str(tmp_path))
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    results = {}
    for world in (1, 2):
        # Same global batch: 1 process accumulates 2 micro-steps, 2 processes do one each.
        cfg = config(tmp_path, nproc_per_node=world, out=str(tmp_path / f"ckpt{world}"), num_iterations=6,
                     eval_every=3, save_every=3)
        cfg_file = tmp_path / f"cfg{world}.json"
        cfg_file.write_text(cfg.model_dump_json())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "nanochat_core.stages.base_train", "--config", str(cfg_file)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        step_lines = [line for line in proc.stdout.splitlines() if STEP_LINE.match(line)]
        assert len(step_lines) == 6, proc.stdout  # rank 0 alone prints
        results[world] = metrics(tmp_path / f"ckpt{world}" / "metrics.jsonl")

    two = tmp_path / "ckpt2"
    names = set(os.listdir(two))
    assert {"optim_000006_rank0.pt", "optim_000006_rank1.pt", "model_000006.pt", "meta_000006.json"} <= names
    assert not [n for n in names if n.startswith("model_") and "rank" in n]
    assert len([r for r in results[2] if "train/loss" in r]) == 6  # one log line per step: rank 0's
    # The ranks read different row groups.
    pos = [checkpoint.load_rank_state(str(two), 6, r)["loader"]["position"] for r in (0, 1)]
    assert pos[0] != pos[1]
    assert checkpoint.read_meta(str(two), 6)["world_size"] == 2

    loss1 = [r["train/loss"] for r in results[1] if "train/loss" in r]
    loss2 = [r["train/loss"] for r in results[2] if "train/loss" in r]
    bpb1 = [r["val/bpb"] for r in results[1] if "val/bpb" in r]
    bpb2 = [r["val/bpb"] for r in results[2] if "val/bpb" in r]
    # Identical initialisation, but the runs see the same documents in a different order (and the
    # one-row-group val shard is split differently): at init the loss is near ln(vocab) on any batch, so the
    # first step agrees to 1e-3 (CI measured them 1.2e-4 apart), and the curves within a tolerance.
    assert loss1[0] == pytest.approx(loss2[0], rel=1e-3)
    assert bpb1[0] == pytest.approx(bpb2[0], rel=0.05)
    for a, b in zip(loss1, loss2):
        assert a == pytest.approx(b, rel=0.05)
    assert bpb2[-1] == pytest.approx(bpb1[-1], rel=0.05)
    assert bpb2[-1] < bpb2[0]
    result = json.loads((two / "result.json").read_text())
    assert result["step"] == 6
