"""How fast a checkpoint is written, to local disk and to s3:// (moto's server on 127.0.0.1), in GB/s,
against the local disk's own rate measured in the same run (the reference), and what that means for a
d20 checkpoint and a platform's notice (nanochat_core.notice: a write that cannot finish is not started).

    .venv/bin/python bench/checkpoint_write.py [--mb 1024] [--ranks 8]

The checkpoint has d20's shape of files, `--mb` in all: one model file (half the bytes) and one optimizer
file per rank, written the way a stage writes them (torch.save, temp file + fsync + rename or upload).
Set NANOCHAT_CHECKPOINT_GBPS to the figure of the store your checkpoints go to, so a stage knows its
rate before its first periodic save measures one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import s3fs
import torch

from nanochat_core.checkpoint import _save_torch, model_file, optim_file
from nanochat_core.model.gpt import GPT, GPTConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from download_fixtures import start_moto  # noqa: E402


def d20_checkpoint_bytes(ranks: int = 8) -> tuple[int, int]:
    """(model file, one rank's optimizer file) of d20 in bytes, counted on the meta device: fp32 weights;
    Muon keeps one fp32 momentum per matrix, AdamW two fp32 moments per embedding / lm_head weight, and
    every rank holds the whole optimizer state."""
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(20, 65_536, 2048, 64, 128, 1))
    params = dict(model.named_parameters())
    weights = sum(p.numel() for p in params.values()) * 4
    adamw = sum(p.numel() for n, p in params.items() if n.startswith(("transformer.wte", "lm_head")))
    optim = (sum(p.numel() for p in params.values()) - adamw) * 4 + adamw * 8
    return weights, optim


def write_checkpoint(root: str, mb: int, ranks: int) -> float:
    """Seconds to write the model file and `ranks` optimizer files under `root`, `mb` in all."""
    sizes = {model_file(1): mb // 2, **{optim_file(1, r): mb // 2 // ranks for r in range(ranks)}}
    states = {name: {"w": torch.randn(n << 18)} for name, n in sizes.items()}  # n MB of fp32 (random: no compression)
    t0 = time.perf_counter()
    for name, state in states.items():
        _save_torch(f"{root}/{name}", state)
    return time.perf_counter() - t0


def raw_write(path: str, mb: int) -> float:
    """Seconds to write `mb` MB of bytes to one local file and fsync it: the disk's own rate."""
    data = os.urandom(mb << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=1024, help="total size of the checkpoint's files")
    ap.add_argument("--ranks", type=int, default=8, help="optimizer files, one per rank")
    args = ap.parse_args()
    gb = args.mb * (1 << 20) / 1e9

    local = tempfile.mkdtemp(prefix="ckpt-bench-")
    moto, port = start_moto()
    try:
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        s3fs.S3FileSystem().mkdir("bench")
        rates = {
            "reference: raw bytes + fsync, local": gb / raw_write(f"{local}/raw.bin", args.mb),
            "checkpoint, local disk": gb / write_checkpoint(f"{local}/ckpt", args.mb, args.ranks),
            "checkpoint, s3:// (moto, loopback)": gb / write_checkpoint("s3://bench/ckpt", args.mb, args.ranks),
        }
    finally:
        moto.terminate()
        moto.wait()
        shutil.rmtree(local, ignore_errors=True)

    reference = next(iter(rates.values()))
    print(f"{args.mb:,} MB in {1 + args.ranks} files (one model, {args.ranks} optimizer)")
    for name, rate in rates.items():
        print(f"  {name:38s} {rate:6.3f} GB/s   {rate / reference:5.2f}x the reference")
    model, optim = d20_checkpoint_bytes()
    total = model + 8 * optim
    print(f"d20 on 8 GPUs: model {model / 1e9:.2f} GB + 8 x optimizer {optim / 1e9:.2f} GB = {total / 1e9:.1f} GB per checkpoint")
    for name, rate in list(rates.items())[1:]:
        seconds = total / (rate * 1e9)
        fits = ", ".join(f"{'fits' if seconds < notice else 'does not fit'} a {notice} s notice" for notice in (30, 120))
        print(f"  at the {name} rate: {seconds:5.0f} s: {fits}")


if __name__ == "__main__":
    main()
