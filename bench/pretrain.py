"""Pretraining throughput on this machine: `base_train` against a plain PyTorch loop of the same size.

    .venv/bin/python bench/pretrain.py                          # d4-cpu, 100 steps: B=1 and B=8 × fp32, bf16+compile
    .venv/bin/python bench/pretrain.py --steps 30 --variants fp32,fp32-compile --batches 8
    .venv/bin/python bench/pretrain.py --base-dir ~/.cache/nanochat   # the sample corpus and its tokenizer

Each run is its own process (so peak RSS is its own): the reference is a plain fp32 GPT-2-style loop
(LayerNorm, learned positions, GELU, AdamW) at d4-cpu's shape (depth 4, dim 128, seq 512, vocab 8,192,
4,096 tokens per step as device batch 8) on batches tokenized before the clock starts; ours is
`base_train.run` with the d4-cpu preset, data loading included. Printed: tokens/s, ms/step, peak RSS,
final loss, val bpb, MFU against the bf16 matmul peak measured at the start of this same run, and
each run's ratio to the mean of two reference runs (one first, one last); then the loss curves; then
an interleaved comparison in one process, the variants taking turns step by step (no data loading),
whose ratios hold even while other processes load the machine, which back-to-back runs' do not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nanochat_core.paths import join, output_dir, tokenizer_dir  # noqa: E402

VOCAB, DEPTH, DIM, SEQ, TOTAL_BATCH = 8192, 4, 128, 512, 4096


# --- data: the caller's base dir, else the standard library's docstrings ----------------------------


def prepare_base(base: str | None) -> str:
    """A base dir with a vocab-8192 tokenizer and shards: the given one if complete, else a temp one."""
    from nanochat_core import storage

    if base and storage.exists(join(tokenizer_dir(base), "tokenizer.pkl")) and storage.exists(output_dir("download", None, root=base)):
        return base
    from nanochat_core.data.shards import write_shards
    from nanochat_core.data.stdlib_text import stdlib_docs
    from nanochat_core.tokenizer import Tokenizer

    base = tempfile.mkdtemp(prefix="bench-pretrain-")
    docs = list(stdlib_docs())
    write_shards(docs, output_dir("download", None, root=base), 120_000)
    Tokenizer.train(docs, VOCAB).save(tokenizer_dir(base))
    return base


# --- the plain reference loop --------------------------------------------------------------------


class RefBlock(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.out = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)
        self.n_head = n_head

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class RefGPT(nn.Module):
    """GPT-2-style, the same depth, width, heads, context and vocabulary as d4-cpu."""

    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, DIM), nn.Embedding(SEQ, DIM)
        self.blocks = nn.ModuleList(RefBlock(DIM, DIM // 64) for _ in range(DEPTH))
        self.ln_f, self.lm_head = nn.LayerNorm(DIM), nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, idx, targets, loss_reduction="mean"):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x)).float()
        return F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1), reduction=loss_reduction)


def child_reference(base: str, steps: int, batch: int) -> dict:
    from nanochat_core.data.loader import shard_loader, val_files
    from nanochat_core.data.shards import list_shards
    from nanochat_core.model.bpb import evaluate_bpb
    from nanochat_core.tokenizer import Tokenizer, load_token_bytes

    tok = Tokenizer.load(tokenizer_dir(base))
    shards = list_shards(output_dir("download", None, root=base))
    accum = TOTAL_BATCH // (batch * SEQ)
    loader = shard_loader(shards.train, tok, batch, SEQ)
    data = [next(loader) for _ in range(steps * accum)]  # tokenized before the clock starts
    torch.manual_seed(42)
    model = RefGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    losses, dts = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        total = 0.0
        for micro in range(accum):
            x, y = data[step * accum + micro]
            loss = model(x, y)
            (loss / accum).backward()
            total += loss.item() / accum
        opt.step()
        opt.zero_grad(set_to_none=True)
        dts.append(time.perf_counter() - t0)
        losses.append(total)
    val = shard_loader(val_files(shards.val, 1), tok, batch, SEQ)
    model.eval()
    bpb = evaluate_bpb(model, val, max(1, 65_536 // (batch * SEQ)), load_token_bytes(tokenizer_dir(base)))
    num_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * (num_params - model.wte.weight.numel() - model.wpe.weight.numel()) + 12 * DEPTH * DIM * SEQ
    return {"losses": losses, "dts": dts, "val_bpb": bpb, "flops_per_token": flops_per_token}


def child_ours(base: str, steps: int, batch: int, variant: str) -> dict:
    from nanochat_core.presets import d4_cpu
    from nanochat_core.stage_args import resolve
    from nanochat_core.stages import base_train

    os.environ["NANOCHAT_BASE_DIR"] = base
    cfg = d4_cpu()
    out = tempfile.mkdtemp(prefix="bench-ckpt-")
    cfg = cfg.model_copy(update={"base_train": cfg.base_train.model_copy(update={
        "device_batch_size": batch, "num_iterations": steps, "eval_every": -1, "save_every": -1,
        "dtype": "bfloat16" if "bf16" in variant else "float32", "compile": "compile" in variant, "out": out,
    })})
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the one result line
        result = base_train.run(cfg, resolve("base_train", cfg))
    records = [json.loads(line) for line in open(join(out, "metrics.jsonl"))]
    train = [r for r in records if "train/loss" in r]
    return {"losses": [r["train/loss"] for r in train], "dts": [r["train/dt_ms"] / 1000 for r in train],
            "val_bpb": result["val_bpb"], "flops_per_token": result["flops_per_token"]}


# --- the parent ------------------------------------------------------------------------------------


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0)


def interleaved_rates(rounds: int, batch: int = 8) -> dict[str, float]:
    """Median tokens/s of one optimizer step (no data loading), the variants taking turns step by step.

    Taking turns exposes every variant to the same load from other processes, so these ratios hold
    even on a busy machine where back-to-back full runs do not.
    """
    import statistics

    from nanochat_core.model.gpt import GPTConfig, build_model
    from nanochat_core.model.optim import Optimizers

    x = torch.randint(0, VOCAB, (batch, SEQ + 1))
    cfg = GPTConfig.from_depth(DEPTH, VOCAB, SEQ, aspect_ratio=DIM // DEPTH, head_dim=64)
    variants = {}
    for name in ("plain fp32", "ours fp32", "ours bf16", "ours bf16-compile"):
        torch.manual_seed(0)
        if name == "plain fp32":
            model = RefGPT()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
        else:
            model = build_model(cfg)
            opt = Optimizers(model, 0.2, 0.004, 0.02)
        fwd = torch.compile(model, dynamic=False) if "compile" in name else model
        variants[name] = (fwd, opt, "bf16" in name)

    def step(fwd, opt, bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = fwd(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()

    for v in variants.values():  # warm-up and compilation
        step(*v)
        step(*v)
    times: dict[str, list[float]] = {n: [] for n in variants}
    for _ in range(rounds):
        for name, v in variants.items():
            t0 = time.perf_counter()
            step(*v)
            times[name].append(time.perf_counter() - t0)
    return {n: batch * SEQ / statistics.median(ts) for n, ts in times.items()}


def loader_rate(base: str, seconds: float = 5.0) -> float:
    """Tokens/s of the tokenizing loader alone (B=8, T=512), from a cold start: tokenizing included."""
    from nanochat_core.data.loader import shard_loader
    from nanochat_core.data.shards import list_shards
    from nanochat_core.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir(base))
    loader = shard_loader(list_shards(output_dir("download", None, root=base)).train, tok, 8, SEQ)
    batches, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(loader)
        batches += 1
    return batches * 8 * SEQ / (time.perf_counter() - t0)


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench child {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run (d4-cpu: 100; 0: interleaved only)")
    p.add_argument("--batches", default="1,8", help="device batch sizes of our runs")
    p.add_argument("--variants", default="fp32,bf16-compile", help="fp32, fp32-compile, bf16, bf16-compile")
    p.add_argument("--base-dir", default=os.environ.get("NANOCHAT_BASE_DIR"), help="tokenizer + shards to use")
    p.add_argument("--json", default=None, help="also write every figure and curve to this file")
    p.add_argument("--rounds", type=int, default=10, help="rounds of the interleaved step comparison (0: skip)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.child:
        t0 = time.perf_counter()
        out = child_reference(a.base_dir, a.steps, a.batch) if a.child == "ref" else \
            child_ours(a.base_dir, a.steps, a.batch, a.child)
        out["wall_s"] = time.perf_counter() - t0
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return

    if a.steps == 0:  # the interleaved comparison alone
        for name, rate in interleaved_rates(a.rounds).items():
            print(f"{name:20s} {rate:8.0f} tok/s")
        return
    base = prepare_base(a.base_dir)
    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"2048² matmul peak bf16 {peak_bf16 / 1e12:.3f} TFLOP/s, fp32 {peak_fp32 / 1e12:.3f} TFLOP/s")
    print(f"data: {base}; {a.steps} steps of {TOTAL_BATCH} tokens per run")
    print(f"loader alone: {loader_rate(base):,.0f} tokens/s (B=8, T={SEQ}, tokenizing included)", flush=True)
    # The reference runs first and last: with other work on the machine, their mean brackets ours.
    runs = {"plain fp32 loop B=8 (1st)": ["--child", "ref", "--batch", "8"]}
    for variant in a.variants.split(","):
        for batch in a.batches.split(","):
            runs[f"ours {variant} B={batch}"] = ["--child", variant, "--batch", batch]
    runs["plain fp32 loop B=8 (2nd)"] = ["--child", "ref", "--batch", "8"]
    results = {}
    for name, args in runs.items():
        r = run_child([*args, "--steps", str(a.steps), "--base-dir", base])
        # Skip the first step (compilation, allocator warm-up) in the rate.
        timed = r["dts"][1:] or r["dts"]
        r["tok_per_sec"] = TOTAL_BATCH * len(timed) / sum(timed)
        r["ms_per_step"] = 1000 * sum(timed) / len(timed)
        r["mfu_bf16_peak"] = 100 * r["flops_per_token"] * r["tok_per_sec"] / peak_bf16
        results[name] = r
        print(f"  finished {name}: {r['tok_per_sec']:.0f} tok/s", flush=True)

    ref = (results["plain fp32 loop B=8 (1st)"]["tok_per_sec"] + results["plain fp32 loop B=8 (2nd)"]["tok_per_sec"]) / 2
    print(f"\n{'run':28s} {'tok/s':>8s} {'× plain':>8s} {'ms/step':>8s} {'RSS MB':>7s} {'loss':>7s} "
          f"{'val bpb':>8s} {'MFU%':>6s} {'first step s':>12s}")
    for name, r in results.items():
        print(f"{name:28s} {r['tok_per_sec']:8.0f} {r['tok_per_sec'] / ref:8.2f} {r['ms_per_step']:8.0f} "
              f"{r['peak_rss_mb']:7.0f} {r['losses'][-1]:7.3f} {r['val_bpb']:8.4f} {r['mfu_bf16_peak']:6.2f} "
              f"{r['dts'][0]:12.1f}")
    print("\nloss curves (every 10 steps):")
    marks = list(range(0, a.steps, max(1, a.steps // 10))) + [a.steps - 1]
    print(f"{'step':28s} " + " ".join(f"{m + 1:>6d}" for m in marks))
    for name, r in results.items():
        print(f"{name:28s} " + " ".join(f"{r['losses'][m]:6.3f}" for m in marks))
    if a.rounds > 0:
        rates = interleaved_rates(a.rounds)
        plain = rates["plain fp32"]
        print(f"\ninterleaved optimizer steps, B=8, no data loading ({a.rounds} rounds, medians):")
        for name, rate in rates.items():
            print(f"  {name:20s} {rate:8.0f} tok/s  {rate / plain:5.2f}× plain")
        results["interleaved"] = rates
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"peak_bf16": peak_bf16, "peak_fp32": peak_fp32, "runs": results}, f, indent=1)
    if math.isnan(ref):
        raise SystemExit("the reference run produced no rate")


if __name__ == "__main__":
    main()
