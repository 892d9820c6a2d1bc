"""One command that proves the GPU path: training, post-training, decoding and serving on CUDA, timed.

    bash scripts/gpu_check.sh --prepare          # here, once, with network: .gpu_check/ (what the GPU lacks)
    bash scripts/gpu_check.sh                    # CUDA: the check at preset shapes; no CUDA: the dry mode
    .venv/bin/python bench/gpu_check.py --dry --only setup,serve     # some steps, on CPU

Each step is a child process of this one under a hard timeout of its own (its whole process group is
killed when it runs over); the results are rewritten after every step, so a later failure or timeout
keeps the earlier ones. Written to $OUT when set, else the current directory (or --out):
gpu_check.json (one entry per step: name, status ok/failed/skipped/timeout, seconds, figures),
gpu_check.md (the table) and gpu_check.log (every line the steps printed). Exit status 1 if a step
failed or timed out.

    0 setup        the environment (torch, CUDA, card, packages) and the data: the carried tokenizer at
                   the train preset's vocabulary and a few shards (they repeat over epochs: step 1 says
                   how often), and a tiny-vocabulary tokenizer trained here by `tok_train` on them
    1 base_train   d12 (depth 12, seq 2048, device batch 32, vocab 65,536), torch.compile + bf16, a few
                   hundred steps of one micro-batch each: tok/s, MFU against the bf16 matmul peak measured
                   in the same run, peak memory next to the plan's estimate for the same device batch
    2 ratios       the same without compile, then in fp32 (no TF32: torch's default): compile and bf16 gains
    3 batch_probe  the largest device batch that fits at d20's shapes, bisected in a fixed number of
                   probes (fwd + bwd + optimizer step, no compile), against `nanochat plan`'s suggestion
    4 post_train   base_train → mid_train → chat_sft → chat_rl → chat_eval at the tiny preset's size, a
                   few steps each, on the device; then KV-cache decoding against the full forward in bf16
    5 serve        bench/serve_load.py's batched server (`nanochat serve`'s app) at 1/4/20 clients
    6 nccl         base_train under torchrun with 2 processes (NCCL) when the machine has 2 GPUs

Without CUDA (or with --dry) the same steps run at the tiny preset's shapes on CPU, step 6 skipped, so
the script cannot rot: tests/test_gpu_check.py runs it in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

GIB = 1024**3


@dataclass(frozen=True)
class Mode:
    """What one kind of run measures at: preset shapes on CUDA, tiny shapes on CPU."""

    name: str  # cuda | dry
    device_type: str
    train_preset: str  # steps 1-2
    probe_preset: str  # step 3
    steps: int  # step 1's optimizer steps
    ratio_steps: int  # step 2's steps per variant
    probes: int  # step 3's forward/backward/step probes
    serve_seconds: float  # step 5: seconds of requests per client count
    budget_s: int  # all steps together; each step's timeout is cut to what is left
    timeouts: dict[str, int] = field(default_factory=dict)


# CUDA: d12 at 65,536 tokens per step is ~6.8e13 FLOPs, ~0.2 s on an H100 at 40% MFU, so 200 steps
# are ~40 s after compiling. fp32 runs plain fp32 matmuls (~15x slower than bf16 on Hopper): 20 steps.
# The budget keeps the whole check inside the device tool's 10-minute command.
CUDA = Mode("cuda", "cuda", "d12", "d20", steps=200, ratio_steps=20, probes=5, serve_seconds=8.0, budget_s=540,
            timeouts={"setup": 60, "base_train": 200, "ratios": 150, "batch_probe": 90, "post_train": 150,
                      "serve": 120, "nccl": 90})
# Dry: the tiny preset on this project's 2-core CPU, all steps in <= 5 minutes (tests/test_gpu_check.py).
DRY = Mode("dry", "cpu", "tiny", "tiny", steps=20, ratio_steps=6, probes=3, serve_seconds=3.0, budget_s=300,
           timeouts={"setup": 60, "base_train": 90, "ratios": 60, "batch_probe": 45, "post_train": 150,
                     "serve": 90, "nccl": 30})

STATUSES = ("ok", "failed", "skipped", "timeout")


# --- the parent: steps as child processes, results written as each one ends ----------------------


@dataclass
class Step:
    name: str
    title: str
    run: Callable[["Context"], None]
    dry_skip: str | None = None  # why the dry mode skips it (no child process is started)


def run_step(step: Step, args, mode: Mode, work: Path, timeout: float, log) -> dict:
    """Run one step in its own process group; its entry for gpu_check.json."""
    result_path = work / f"{step.name}.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", step.name, "--work", str(work),
           "--mode", mode.name, "--bundle", str(args.bundle)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    tail: deque[str] = deque(maxlen=25)

    def pump() -> None:
        for line in proc.stdout:
            tail.append(line.rstrip())
            log(f"[{step.name}] {line.rstrip()}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=max(1.0, timeout))
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the step's group: torchrun ranks and servers with it
        proc.wait()
    reader.join(timeout=10)
    seconds = time.perf_counter() - t0
    entry = {"name": step.name, "title": step.title, "status": "failed", "seconds": round(seconds, 1),
             "figures": {}, "summary": ""}
    if result_path.exists():
        entry.update(json.loads(result_path.read_text()))
    if timed_out:
        entry["status"] = "timeout"
        entry["error"] = f"killed after {timeout:.0f} s"
    elif proc.returncode != 0:
        entry["status"] = "failed"
        entry["error"] = "\n".join(tail)
    entry["seconds"] = round(seconds, 1)
    return entry


def card_names() -> str:
    """The GPUs as nvidia-smi names them: asking torch would open a CUDA context in this parent process,
    memory the steps' children (the batch probe above all) should have."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.TimeoutExpired):
        return "CUDA"
    names = [n.strip() for n in names if n.strip()]
    return f"{len(names)} × {names[0]}" if names else "CUDA"


def write_reports(out: Path, header: dict, entries: list[dict]) -> None:
    doc = {**header, "steps": entries}
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(out / "gpu_check.json")
    (out / "gpu_check.md").write_text(markdown(doc))


def markdown(doc: dict) -> str:
    lines = [f"# gpu_check ({doc['mode']} mode) — {doc['date']}", "",
             f"{doc.get('device', '?')}; {doc.get('torch', '')}", "",
             f"carried: {doc.get('carried') or 'nothing prepared (bash scripts/gpu_check.sh --prepare)'}", "",
             "| step | status | seconds | figures |", "|---|---|---:|---|"]
    for e in doc["steps"]:
        text = e.get("summary") or ""
        if e.get("error"):
            text += (" — " if text else "") + "error: " + e["error"].strip().splitlines()[-1][:300]
        lines.append(f"| {e['name']} | {e['status']} | {e['seconds']:.0f} | {text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", help="the CPU dry mode even where CUDA is present")
    p.add_argument("--only", default=None, help="comma-separated step names (default: all)")
    p.add_argument("--out", default=None, help="where the reports go (default: $OUT, else the current directory)")
    p.add_argument("--bundle", default=str(ROOT / ".gpu_check"), help="what `--prepare` made (wheels, base, cache)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.bundle = Path(args.bundle).resolve()
    if args.child:
        return child_main(args)

    import torch

    mode = DRY if args.dry or not torch.cuda.is_available() else CUDA
    out = Path(args.out or os.environ.get("OUT") or ".").resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = [s for s in STEPS if not args.only or s.name in args.only.split(",")]
    unknown = set(args.only.split(",")) - {s.name for s in STEPS} if args.only else set()
    if unknown:
        raise SystemExit(f"unknown step(s) {', '.join(sorted(unknown))}; steps are {', '.join(s.name for s in STEPS)}")
    carried = args.bundle / "carried.json"
    header = {"mode": mode.name, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "device": card_names() if mode is CUDA else f"CPU ({os.cpu_count()} cores)",
              "torch": f"torch {torch.__version__}, Python {sys.version.split()[0]}",
              "carried": json.loads(carried.read_text())["summary"] if carried.exists() else None}
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    log_file = open(out / "gpu_check.log", "w")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"gpu_check: {mode.name} mode on {header['device']}; work dir {work}; reports in {out}")
    entries: list[dict] = []
    start = time.perf_counter()
    for step in steps:
        left = mode.budget_s - (time.perf_counter() - start)
        if mode is DRY and step.dry_skip:
            entries.append({"name": step.name, "title": step.title, "status": "skipped", "seconds": 0.0,
                            "figures": {}, "summary": step.dry_skip})
        elif left < 5:
            entries.append({"name": step.name, "title": step.title, "status": "timeout", "seconds": 0.0,
                            "figures": {}, "summary": "", "error": f"not started: the {mode.budget_s} s budget is spent"})
        else:
            entries.append(run_step(step, args, mode, work, min(mode.timeouts[step.name], left), log))
        e = entries[-1]
        log(f"gpu_check: {e['name']} {e['status']} in {e['seconds']:.0f} s: {e.get('summary', '')}")
        write_reports(out, header, entries)
    total = time.perf_counter() - start
    header["total_seconds"] = round(total, 1)
    write_reports(out, header, entries)
    log(f"gpu_check: {total:.0f} s; " + ", ".join(f"{e['name']} {e['status']}" for e in entries))
    log_file.close()
    shutil.rmtree(work, ignore_errors=True)
    return 1 if any(e["status"] in ("failed", "timeout") for e in entries) else 0


# --- the children ------------------------------------------------------------------------------------


@dataclass
class Context:
    """What a step's child process knows: its mode, the shared work dir, the bundle; `record` saves figures."""

    step: str
    mode: Mode
    work: Path
    bundle: Path
    figures: dict = field(default_factory=dict)
    status: str = "ok"
    summary: str = ""

    def record(self, status: str | None = None, summary: str | None = None, **figures) -> None:
        """Write this step's result file now, so a timeout later in the step keeps what was measured."""
        self.figures.update(figures)
        self.status = status or self.status
        self.summary = summary if summary is not None else self.summary
        path = self.work / f"{self.step}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"status": self.status, "figures": self.figures, "summary": self.summary},
                                  indent=1, default=str))
        tmp.replace(path)

    def sibling(self, step: str) -> dict:
        """Another step's result file (its figures), or {} when it did not write one."""
        path = self.work / f"{step}.json"
        return json.loads(path.read_text())["figures"] if path.exists() else {}

    @property
    def cuda(self) -> bool:
        return self.mode.device_type == "cuda"


def child_main(args) -> int:
    mode = {"cuda": CUDA, "dry": DRY}[args.mode]
    ctx = Context(args.child, mode, Path(args.work), args.bundle)
    next(s for s in STEPS if s.name == args.child).run(ctx)
    return 0


def use_base(ctx: Context, name: str) -> str:
    """Point NANOCHAT_BASE_DIR (what the stages read by default) at the work dir's base `name`."""
    base = str(ctx.work / name)
    os.environ["NANOCHAT_BASE_DIR"] = base
    return base


def with_updates(cfg, **sections):
    """`cfg` with field updates per config section (a preset is a PipelineConfig)."""
    data = cfg.model_dump()
    for section, fields in sections.items():
        data[section].update(fields)
    return type(cfg).model_validate(data)


# --- 0 setup ------------------------------------------------------------------------------------------


def step_setup(ctx: Context) -> None:
    import importlib

    import torch

    from nanochat_core.data.shards import list_shards, write_shards
    from nanochat_core.data.stdlib_text import stdlib_docs
    from nanochat_core.paths import join
    from nanochat_core.presets import get_preset
    from nanochat_core.stage_args import resolve
    from nanochat_core.stages import tok_train

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "gpus": torch.cuda.device_count()}
    if ctx.cuda:
        if not torch.cuda.is_available():
            raise SystemExit("CUDA mode but torch sees no CUDA device")
        props = torch.cuda.get_device_properties(0)
        env.update(card=props.name, memory_gib=round(props.total_memory / GIB, 1), sms=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    for name in ("pydantic", "fastapi", "uvicorn", "tiktoken", "pyarrow", "fsspec", "numpy", "tokenizer_rs"):
        try:
            env[name] = getattr(importlib.import_module(name), "__version__", "present")
        except ImportError as e:
            env[name] = f"missing ({e})"
    ctx.record(**env)

    # Shards: the carried ones (the sample corpus, bash scripts/gpu_check.sh --prepare), else the standard
    # library's docstrings (real English wherever Python is, what tests/pretrain_data.py trains on).
    carried = ctx.bundle / "base"
    train_cfg = get_preset(ctx.mode.train_preset)
    for name in ("train", "tiny"):
        base = ctx.work / name
        (base / "base_data").mkdir(parents=True, exist_ok=True)
        if (carried / "base_data").is_dir():
            for f in (carried / "base_data").glob("shard_*.parquet"):
                shutil.copy(f, base / "base_data" / f.name)
            source = "carried sample-corpus shards"
        else:
            write_shards(stdlib_docs(), join(str(base), "base_data"), 120_000)
            source = "stdlib docstrings"
    shards = list_shards(str(ctx.work / "train" / "base_data"))
    ctx.record(shards=len(shards.train), shard_source=source,
               shard_mib=round(sum(os.path.getsize(u) for u in [*shards.train, shards.val]) / 2**20, 1))

    # The train preset's tokenizer: carried when its vocabulary matches (65,536 takes more text than the
    # docstrings hold: they stop at ~17,500), else trained here by the real stage.
    vocab = train_cfg.tok_train.vocab_size
    carried_tok = carried / "tokenizer"
    if (carried_tok / "tokenizer.pkl").exists() and read_vocab(carried_tok) == vocab:
        shutil.copytree(carried_tok, ctx.work / "train" / "tokenizer")
        tok_source = "carried"
    else:
        use_base(ctx, "train")
        tok_train.run(train_cfg, resolve("tok_train", train_cfg), progress=False)
        tok_source = "tok_train here"
    use_base(ctx, "tiny")
    tiny = get_preset("tiny")
    tok_train.run(tiny, resolve("tok_train", tiny), progress=False)
    ctx.record(train_vocab=read_vocab(ctx.work / "train" / "tokenizer"), train_tokenizer=tok_source,
               tiny_vocab=read_vocab(ctx.work / "tiny" / "tokenizer"))
    f = ctx.figures
    ctx.record(summary=f"{f.get('card', 'CPU')}, torch {f['torch']} (CUDA {f['cuda']}), {f['gpus']} GPU(s); "
                       f"{f['shards']} train shards ({f['shard_source']}, {f['shard_mib']} MiB), tokenizer "
                       f"{f['train_vocab']:,} ({tok_source}) and {f['tiny_vocab']:,}")


def read_vocab(tok_dir: Path) -> int:
    from nanochat_core.tokenizer import Tokenizer

    return Tokenizer.load(str(tok_dir)).vocab_size


# --- 1 and 2: base_train at the train preset's shapes -----------------------------------------------


def train_run(ctx: Context, label: str, steps: int, compile: bool, dtype: str) -> dict:
    """base_train (the stage itself, in this process) for `steps` steps of one micro-batch each; its figures."""
    import torch

    from nanochat_core.plan import make_plan
    from nanochat_core.presets import get_preset
    from nanochat_core.stage_args import resolve
    from nanochat_core.stages import base_train

    use_base(ctx, "train")
    cfg = get_preset(ctx.mode.train_preset)
    B, T = cfg.base_train.device_batch_size, cfg.base_train.max_seq_len
    out = ctx.work / "runs" / label
    # One micro-batch per step (total = B x T): the preset's shapes, a step ~8x shorter than d12's
    # 524,288-token step on one GPU, so a few hundred fit the budget; the end eval reads one batch.
    cfg = with_updates(cfg, base_train={
        "device_type": ctx.mode.device_type, "nproc_per_node": 1, "num_iterations": steps, "total_batch_size": B * T,
        "eval_every": -1, "eval_tokens": B * T, "sample_every": -1, "save_every": -1, "keep_last": 1,
        "compile": compile, "dtype": dtype, "out": str(out)})
    inputs = resolve("base_train", cfg)
    from nanochat_core.tokenizer import Tokenizer

    vocab = Tokenizer.load(inputs["tokenizer"]["path"]).vocab_size
    plan = make_plan(cfg.base_train, vocab, cfg.download.num_shards, cfg.plan)
    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        result = base_train.run(cfg, inputs)
    except torch.OutOfMemoryError as e:
        return {"label": label, "oom": str(e).splitlines()[0], "device_batch_size": B}
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in rows if "train/loss" in r]
    # The first steps pay for compilation, autotuning and the allocator's warm-up.
    timed = train[max(1, len(train) // 10):] or train
    tok_s = statistics.median(r["train/tok_per_sec"] for r in timed)
    figures = {
        "label": label, "steps": len(train), "device_batch_size": B, "seq_len": T, "compile": compile,
        "dtype": dtype, "tok_per_sec": round(tok_s), "ms_per_step": round(1000 * B * T / tok_s, 1),
        "first_step_s": round(train[0]["train/dt_ms"] / 1000, 1), "wall_s": round(wall, 1),
        "flops_per_token": result["flops_per_token"], "mfu_table_pct": round(statistics.median(r["train/mfu"] for r in timed), 1),
        "loss_first": round(train[0]["train/loss"], 3), "loss_last": round(train[-1]["train/loss"], 3),
        "val_bpb": result["val_bpb"], "epochs": train[-1]["train/epoch"],
        "plan_peak_mem_gib": round(plan.est_peak_mem_gb, 1),
    }
    if ctx.cuda:
        figures["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 1)
        figures["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 1)
    shutil.rmtree(out, ignore_errors=True)  # d12's final checkpoint is ~2 GB of disk
    return figures


def matmul_peak(ctx: Context) -> float:
    """bf16 FLOP/s of a large square matmul on this device, measured now (bench/pretrain.py's on CPU)."""
    import torch

    from pretrain import matmul_peak as cpu_peak

    if not ctx.cuda:
        return cpu_peak(torch.bfloat16, seconds=1.0)
    n = 8192  # KINDS.md: 769-798 TFLOP/s on an H100 and H200 at this size
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    reps, t0 = 50, time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def step_base_train(ctx: Context) -> None:
    peak = matmul_peak(ctx)
    ctx.record(matmul_peak_tflops=round(peak / 1e12, 1))
    r = train_run(ctx, "compiled-bf16", ctx.mode.steps, compile=True, dtype="bfloat16")
    if "oom" in r:
        ctx.record(status="failed", summary=f"out of memory at device batch {r['device_batch_size']}", **r)
        raise SystemExit(1)
    mfu = 100 * r["flops_per_token"] * r["tok_per_sec"] / peak
    mem = f"peak {r['peak_mem_gib']} GiB vs plan {r['plan_peak_mem_gib']} GiB" if ctx.cuda else \
        f"plan {r['plan_peak_mem_gib']} GiB (CPU: no allocator peak)"
    ctx.record(**r, mfu_measured_peak_pct=round(mfu, 1), summary=(
        f"{ctx.mode.train_preset} B={r['device_batch_size']}×{r['seq_len']}, {r['steps']} steps: "
        f"{r['tok_per_sec']:,} tok/s, MFU {mfu:.1f}% of the measured {peak / 1e12:.1f} TFLOP/s bf16 peak "
        f"({r['mfu_table_pct']}% of the table's); {mem}; loss {r['loss_first']} → {r['loss_last']}; "
        f"shards read {r['epochs']} times (epochs); first step {r['first_step_s']} s"))


def step_ratios(ctx: Context) -> None:
    compiled = ctx.sibling("base_train")
    runs = {}
    for label, dtype in (("eager-bf16", "bfloat16"), ("eager-fp32", "float32")):
        runs[label] = train_run(ctx, label, ctx.mode.ratio_steps, compile=False, dtype=dtype)
        ctx.record(**{label: runs[label]})
    eager, fp32 = runs["eager-bf16"], runs["eager-fp32"]
    parts = []
    for name, r in runs.items():
        mem = f", peak {r['peak_mem_gib']} GiB" if "peak_mem_gib" in r else ""
        parts.append(f"{name} OOM" if "oom" in r else f"{name} {r['tok_per_sec']:,} tok/s{mem}")
    if "tok_per_sec" in eager and "tok_per_sec" in compiled:
        gain = compiled["tok_per_sec"] / eager["tok_per_sec"]
        ctx.record(compile_gain=round(gain, 2))
        parts.append(f"compile {gain:.2f}×")
    if "tok_per_sec" in eager and "tok_per_sec" in fp32:
        gain = eager["tok_per_sec"] / fp32["tok_per_sec"]
        ctx.record(bf16_gain=round(gain, 2))
        parts.append(f"bf16 over fp32 {gain:.2f}× (both eager)")
    ctx.record(status="failed" if "oom" in eager else "ok", summary="; ".join(parts))


# --- 3: the largest device batch at d20's shapes -------------------------------------------------------


def bisect_largest(fits: Callable[[int], bool], first: int, cap: int, probes: int) -> tuple[int, list]:
    """The largest b in [1, cap] with fits(b), by bisection in at most `probes` calls starting at `first`
    (fits is taken to be monotone: a batch that fits means every smaller one does). 0 if none fit."""
    lo, hi, tried = 0, cap + 1, []
    b = min(max(first, 1), cap)
    for _ in range(probes):
        if not lo < b < hi:
            break
        ok = fits(b)
        tried.append((b, ok))
        lo, hi = (b, hi) if ok else (lo, b)
        b = (lo + hi) // 2
    return lo, tried


def step_batch_probe(ctx: Context) -> None:
    import gc

    import torch

    from nanochat_core import hardware
    from nanochat_core.model.gpt import GPTConfig, build_model
    from nanochat_core.model.optim import Optimizers
    from nanochat_core.plan import estimate_peak_mem_gb, make_plan
    from nanochat_core.presets import get_preset

    cfg = get_preset(ctx.mode.probe_preset)
    tc = cfg.base_train.model_copy(update={"nproc_per_node": 1})
    vocab = cfg.tok_train.vocab_size  # random tokens: the model's shape is all a probe needs
    device = torch.device(ctx.mode.device_type)
    gpu = card_key() if ctx.cuda else "cpu"
    # What `nanochat plan --preset d20 --nproc-per-node 1 --gpu <this card>` suggests.
    plan = make_plan(tc, vocab, cfg.download.num_shards, cfg.plan.model_copy(update={"gpu": gpu}))
    suggested = plan.suggested_device_batch_size
    mcfg = GPTConfig.from_depth(tc.depth, vocab, tc.max_seq_len, tc.aspect_ratio, tc.head_dim, tc.kv_head_ratio)

    def plan_gib(batch: int) -> float:  # the plan's formula at any batch, dividing the total batch or not
        return estimate_peak_mem_gb(plan.num_params, plan.wte_params, mcfg.n_layer, mcfg.n_embd,
                                    mcfg.padded_vocab_size, batch, tc.max_seq_len)

    torch.manual_seed(0)
    model = build_model(mcfg, device)
    opt = Optimizers(model, tc.embedding_lr, tc.unembedding_lr, tc.matrix_lr, tc.weight_decay)
    autocast = hardware.autocast("auto", device)
    measured: dict[int, dict] = {}

    def fits(batch: int) -> bool:
        """One training step at this device batch (optimizer state included, as in a run)."""
        entry = {"plan_gib": round(plan_gib(batch), 1)}
        if ctx.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            x = torch.randint(0, vocab, (batch, tc.max_seq_len + 1), device=device)
            with autocast():
                loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step(tc.grad_clip)
            if ctx.cuda:
                torch.cuda.synchronize()
            entry["fits"] = True
        except torch.OutOfMemoryError:
            entry["fits"] = False
        finally:
            loss = x = None
            opt.zero_grad()
            gc.collect()
        if ctx.cuda:
            entry["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 1)
        measured[batch] = entry
        ctx.record(probes={str(k): v for k, v in measured.items()})
        return entry["fits"]

    cap = max(2 * suggested, 16)
    # The plan's own bound for any batch (its suggestion is further held to powers of two dividing the total).
    from nanochat_core.plan import USABLE_MEMORY

    formula = max((b for b in range(1, cap + 1) if plan_gib(b) <= USABLE_MEMORY * plan.device_memory_gb), default=0)
    largest, tried = bisect_largest(fits, suggested or cap // 2, cap, ctx.mode.probes)
    power = max((b for b, e in measured.items() if e["fits"] and b & (b - 1) == 0), default=0)
    at = measured.get(suggested, {})
    ratio = at["peak_gib"] / at["plan_gib"] if at.get("fits") and "peak_gib" in at else None
    ctx.record(preset=ctx.mode.probe_preset, gpu=gpu, plan_suggested=suggested, largest_fitting=largest,
               probed=[b for b, _ in tried], cap=cap, largest_power_of_two=power, plan_formula_largest=formula,
               measured_over_plan_at_suggested=round(ratio, 2) if ratio else None)
    bound = "of those probed (CPU: nothing runs out of memory)" if not ctx.cuda else \
        ("(the cap: all probes fit)" if largest == cap else f"(OOM at {min(b for b, ok in tried if not ok)})"
         if any(not ok for _, ok in tried) else "")
    mem = f"; measured {at.get('peak_gib')} GiB vs plan {at.get('plan_gib')} GiB at {suggested}" if ratio else ""
    ctx.record(summary=f"{ctx.mode.probe_preset} seq {tc.max_seq_len}: largest device batch {largest} {bound}, "
                       f"probed {[b for b, _ in tried]}; plan suggests {suggested} (its formula allows {formula}){mem}")


def card_key() -> str:
    """The plan's --gpu name for this CUDA card (hardware.DEVICES), by the card's name; h100 if unknown."""
    import torch

    from nanochat_core.hardware import DEVICES

    name = torch.cuda.get_device_name().lower()
    for key in sorted(DEVICES, key=len, reverse=True):
        if key != "cpu" and key.replace("-", " ") in name:
            return key
    return "h100"


# --- 4: post-training at tiny size, and the KV cache ----------------------------------------------------


def tiny_config(ctx: Context):
    """The tiny preset on this mode's device, cut to a few steps per stage."""
    from nanochat_core.presets import tiny

    return with_updates(
        tiny(),
        base_train={"device_type": ctx.mode.device_type, "num_iterations": 10, "eval_every": -1, "eval_tokens": 4096},
        mid_train={"device_type": ctx.mode.device_type, "num_iterations": 4},
        chat_sft={"device_type": ctx.mode.device_type, "num_iterations": 4},
        chat_rl={"device_type": ctx.mode.device_type, "num_iterations": 2, "eval_examples": 4},
        chat_eval={"device_type": ctx.mode.device_type, "source": "rl", "max_problems": 4, "max_new_tokens": 32},
    )


# bf16 keeps 8 bits of mantissa (relative error ~0.4% per rounding); softcapped logits lie in ±15, so one
# rounding of a logit is ~0.06, and the cached and uncached paths round differently along 2 layers.
# 0.25 is ~4 such roundings (the dry mode measured 0.03 on CPU); a KV-cache bug (a stale or misplaced
# key) moves logits by whole units.
KV_TOL_BF16 = 0.25
KV_TOL_FP32 = 1e-3


def kv_cache_gap(model, prompt: list[int], new_tokens: int) -> dict:
    """Greedy decoding with the KV cache against the full forward over the same prefix at every step."""
    import torch

    from nanochat_core.model.gpt import KVCache

    c, device = model.config, model.transformer.wte.weight.device
    cache = KVCache(1, c.n_kv_head, len(prompt) + new_tokens, c.head_dim, c.n_layer)
    seq, worst, agree = list(prompt), 0.0, 0
    with torch.inference_mode():
        cached = model(torch.tensor([seq], device=device), kv_cache=cache)[0, -1]
        for _ in range(new_tokens):
            full = model(torch.tensor([seq], device=device))[0, -1]
            worst = max(worst, float((cached - full).abs().max()))
            agree += int(cached.argmax() == full.argmax())
            seq.append(int(full.argmax()))
            cached = model(torch.tensor([[seq[-1]]], device=device), kv_cache=cache)[0, -1]
    return {"max_abs_logit_diff": worst, "argmax_agreement": agree / new_tokens}


def step_post_train(ctx: Context) -> None:
    import torch

    from nanochat_core.chat_format import render_for_completion
    from nanochat_core.checkpoint import load_model
    from nanochat_core.stage_args import resolve
    from nanochat_core.stages import base_train, chat_eval, chat_rl, chat_sft, mid_train

    use_base(ctx, "tiny")
    if ctx.cuda and (ctx.bundle / "cache").is_dir():
        os.environ["NANOCHAT_FLOW_CACHE"] = str(ctx.bundle / "cache")  # the carried task data (offline there)
    cfg = tiny_config(ctx)
    refs, seconds = {}, {}
    for name, module in (("base_train", base_train), ("mid_train", mid_train), ("chat_sft", chat_sft),
                         ("chat_rl", chat_rl), ("chat_eval", chat_eval)):
        t0 = time.perf_counter()
        refs[name] = module.run(cfg, resolve(name, cfg))
        seconds[name] = round(time.perf_counter() - t0, 1)
        ctx.record(stage_seconds=seconds)
    ev = refs["chat_eval"]
    scores = {k: ev[k] for k in ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE")}
    ctx.record(chat_eval=scores, problems=ev["problems"], rl_step=refs["chat_rl"]["step"])

    device = torch.device(ctx.mode.device_type)
    model, tokenizer, _ = load_model(refs["chat_rl"]["path"], device=device)
    prompt = render_for_completion(tokenizer, {"messages": [{"role": "user", "content": "What is 12 times 7?"}]})
    gaps = {"fp32": kv_cache_gap(model, prompt, 32), "bf16": kv_cache_gap(model.to(torch.bfloat16), prompt, 32)}
    ok = gaps["bf16"]["max_abs_logit_diff"] <= KV_TOL_BF16 and gaps["fp32"]["max_abs_logit_diff"] <= KV_TOL_FP32
    ctx.record(kv_cache=gaps, kv_tolerance={"bf16": KV_TOL_BF16, "fp32": KV_TOL_FP32}, status="ok" if ok else "failed",
               summary=(f"tiny on {ctx.mode.device_type}: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
                        + f"; {ev['problems']} chat_eval problems, ChatCORE {scores['ChatCORE']:.3f}; KV cache vs full "
                        f"forward: max |Δlogit| bf16 {gaps['bf16']['max_abs_logit_diff']:.3f} (tol {KV_TOL_BF16}), fp32 "
                        f"{gaps['fp32']['max_abs_logit_diff']:.1e} (tol {KV_TOL_FP32}), argmax agreement bf16 "
                        f"{gaps['bf16']['argmax_agreement']:.0%}"))
    if not ok:
        raise SystemExit(1)


# --- 5: the batched server under load ----------------------------------------------------------------------


def step_serve(ctx: Context) -> None:
    import serve_load
    from serve_fixtures import make_tiny_checkpoint

    from nanochat_core.serve.pool import MAX_BATCH

    base = str(ctx.work / "serve")
    make_tiny_checkpoint(base, seq_len=256, depth=2, dim=128)
    levels = [1, 4, 20]
    # serve_load's own server process: `nanochat serve`'s app and uvicorn; its device is `auto` (cuda here).
    args = argparse.Namespace(source=None, checkpoint=None, max_tokens=32, duration=ctx.mode.serve_seconds)
    results, growth = serve_load.measure(args, base, "batched", MAX_BATCH, levels)
    lo, hi = results[levels[0]], results[levels[-1]]
    scale, ttft = hi["aggregate_tok_s"] / lo["aggregate_tok_s"], hi["ttft_p95_s"] / lo["ttft_p50_s"]
    errors = sum(r["errors"] for r in results.values())
    ctx.record(levels={str(k): v for k, v in results.items()}, rss_growth=round(growth, 3), errors=errors,
               aggregate_scale=round(scale, 2), ttft_p95_over_single_p50=round(ttft, 2),
               status="failed" if errors or growth > 1.2 else "ok",
               summary=(f"{ctx.mode.device_type}, max batch {MAX_BATCH}: aggregate tok/s "
                        + " / ".join(f"{results[n]['aggregate_tok_s']:.0f}" for n in levels)
                        + f" at {'/'.join(map(str, levels))} clients ({scale:.1f}× single: goal ≥ 5×); TTFT p95 at "
                        f"{levels[-1]} {hi['ttft_p95_s'] * 1000:.0f} ms = {ttft:.1f}× single p50 (goal ≤ 3×); "
                        f"{errors} errors; RSS end/start {growth:.2f}"))
    if errors or growth > 1.2:
        raise SystemExit(1)


# --- 6: two processes over NCCL ---------------------------------------------------------------------------


def step_nccl(ctx: Context) -> None:
    import torch

    if torch.cuda.device_count() < 2:
        ctx.record(status="skipped", gpus=torch.cuda.device_count(),
                   summary=f"{torch.cuda.device_count()} GPU: a 2-process NCCL run needs 2, so NCCL stays unverified")
        return
    base = use_base(ctx, "tiny")
    cfg = with_updates(tiny_config(ctx), base_train={"nproc_per_node": 2, "num_iterations": 6,
                                                     "out": str(ctx.work / "runs" / "nccl")})
    path = ctx.work / "nccl.json.cfg"
    path.write_text(cfg.model_dump_json())
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "nanochat_core.stages.base_train", "--config", str(path)],
                          env={**os.environ, "NANOCHAT_BASE_DIR": base}, capture_output=True, text=True)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    result = ctx.work / "runs" / "nccl" / "result.json"
    ok = proc.returncode == 0 and result.exists()
    ctx.record(status="ok" if ok else "failed", seconds=round(time.perf_counter() - t0, 1),
               summary="2 processes, NCCL: base_train tiny 6 steps " + ("finished" if ok else f"failed ({proc.returncode})"))
    if not ok:
        raise SystemExit(1)


STEPS = [
    Step("setup", "environment and data", step_setup),
    Step("base_train", "d12 base_train, compiled, bf16: tok/s, MFU, peak memory", step_base_train),
    Step("ratios", "without compile, and fp32: the gains as ratios", step_ratios),
    Step("batch_probe", "largest d20 device batch that fits vs the plan", step_batch_probe),
    Step("post_train", "mid/SFT/RL/chat_eval at tiny size; KV cache vs full forward in bf16", step_post_train),
    Step("serve", "batched decoder under the serving bench, 1/4/20 clients", step_serve),
    Step("nccl", "2-process NCCL base_train", step_nccl, dry_skip="dry mode: no CUDA, so no NCCL"),
]


if __name__ == "__main__":
    sys.exit(main())
