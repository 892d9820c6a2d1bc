"""CORE: DCLM's in-context-learning suite, scored the way DCLM and nanochat score it.

Three task types, one forward pass per example (its options batched, padded with BOS):
- multiple_choice: one shared context, one continuation per choice; the choice whose continuation
  tokens have the lowest mean loss wins.
- schema: one context per option, one shared continuation; the context under which the shared
  continuation has the lowest mean loss wins.
- language_modeling: correct only if greedy (argmax) prediction reproduces every continuation token.
Few-shot examples are drawn per example with `random.Random(1234 + index)`; each task's rows are
shuffled with `random.Random(1337)` before `max_per_task`, so a 500-example run scores the same 500
rows every time. Under torch.distributed rank r scores examples r, r+W, ... and the per-example
results are summed across ranks, so 1 and N processes give the same numbers.

centered = (accuracy - baseline) / (1 - baseline), baseline = chance (0 for generative tasks);
CORE = mean of centered over the tasks present. A random model scores ~0, give or take a few
hundredths: BoolQ's baseline is its majority class (62% "yes"), so a random model that happens to
prefer "no" scores -0.7 there, -0.035 on CORE (measured: -0.047 and -0.023 for two seeds of the
tiny preset, 100 examples per task).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat_core.errors import with_reasons
from nanochat_core.evaluation.bundle import CORE_LABELS, TaskSpec, load_examples, load_tasks, read_manifest

SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234


@dataclass
class Encoded:
    """An example's token rows and, per row, the [start, end) token span that is scored."""

    rows: list[list[int]]
    starts: list[int]
    ends: list[int]
    gold: int = 0


# --- prompts ----------------------------------------------------------------------------------
# Few-shot examples are rendered like the question, with their gold answer, separated by a blank line.


def render_multiple_choice(item: dict, delim: str, shots: list[dict]) -> list[str]:
    prefix = "".join(f"{s['query']}{delim}{s['choices'][s['gold']]}\n\n" for s in shots)
    return [f"{prefix}{item['query']}{delim}{choice}" for choice in item["choices"]]


def render_schema(item: dict, delim: str, shots: list[dict]) -> list[str]:
    prefix = "".join(f"{s['context_options'][s['gold']]}{delim}{s['continuation']}\n\n" for s in shots)
    return [f"{prefix}{context}{delim}{item['continuation']}" for context in item["context_options"]]


def render_language_modeling(item: dict, delim: str, shots: list[dict]) -> tuple[str, str]:
    """(prompt without the continuation, prompt with it)."""
    prefix = "".join(f"{s['context'].strip()}{delim}{s['continuation']}\n\n" for s in shots)
    without = f"{prefix}{item['context'].strip()}{delim}"
    # Strip the prompt: a trailing space would merge into the continuation's first token in the
    # full prompt, and the short prompt's tokens would then not be a prefix of the long one's.
    return without.strip(), without + item["continuation"]


# --- tokens -----------------------------------------------------------------------------------


def common_length(rows: list[list[int]], from_end: bool = False) -> int:
    """Tokens all rows share at the start (or the end)."""
    n = min(len(r) for r in rows)
    for i in range(n):
        column = {r[-1 - i] if from_end else r[i] for r in rows}
        if len(column) > 1:
            return i
    return n


def encode_example(item: dict, task: TaskSpec, shots: list[dict], tokenizer) -> Encoded:
    bos = tokenizer.bos_token_id
    delim = task.continuation_delimiter
    if task.task_type == "multiple_choice":
        rows = tokenizer.encode(render_multiple_choice(item, delim, shots), prepend=bos)
        start = common_length(rows)
        # A choice that is a prefix of another would leave nothing to score: keep at least one token.
        start = min(start, min(len(r) for r in rows) - 1)
        return Encoded(rows, [start] * len(rows), [len(r) for r in rows], item["gold"])
    if task.task_type == "schema":
        rows = tokenizer.encode(render_schema(item, delim, shots), prepend=bos)
        suffix = common_length(rows, from_end=True)
        suffix = max(1, min(suffix, min(len(r) for r in rows) - 1))
        return Encoded(rows, [len(r) - suffix for r in rows], [len(r) for r in rows], item["gold"])
    without, with_ = tokenizer.encode(list(render_language_modeling(item, delim, shots)), prepend=bos)
    # Normally `without` is a prefix of `with_`; if the tokenizer merged across the boundary, score
    # from where they diverge so every continuation token is still checked.
    start = min(common_length([without, with_]), len(with_) - 1)
    return Encoded([with_], [start], [len(with_)])


def crop_left(enc: Encoded, max_len: int | None) -> Encoded:
    """Drop tokens from the left of rows longer than the model's context (few-shot prefix first)."""
    if not max_len or all(len(r) <= max_len for r in enc.rows):
        return enc
    rows, starts, ends = [], [], []
    for row, s, e in zip(enc.rows, enc.starts, enc.ends):
        cut = max(0, len(row) - max_len)
        rows.append(row[cut:])
        starts.append(max(1, s - cut))  # position 0 has no prediction; never score it
        ends.append(e - cut)
    return Encoded(rows, starts, ends, enc.gold)


# --- scoring ----------------------------------------------------------------------------------


@torch.no_grad()
def score_example(model, enc: Encoded, task_type: str, pad_id: int, device) -> bool:
    """One forward over the example's rows (right-padded); is the model's answer the gold one?"""
    width = max(len(r) for r in enc.rows)
    ids = torch.full((len(enc.rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(enc.rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    ids = ids.to(device)
    logits = model(ids).float()  # (B, T, V)
    # Position t predicts token t+1, so the span [s, e) is scored by the logits at [s-1, e-1).
    if task_type == "language_modeling":
        s, e = enc.starts[0], enc.ends[0]
        predicted = logits[0, s - 1 : e - 1].argmax(dim=-1)
        return bool(torch.equal(predicted, ids[0, s:e]))
    mean_losses = torch.stack(
        [F.cross_entropy(logits[i, s - 1 : e - 1], ids[i, s:e]) for i, (s, e) in enumerate(zip(enc.starts, enc.ends))]
    )
    return int(mean_losses.argmin().item()) == enc.gold


def task_examples(bundle: str, task: TaskSpec, max_per_task: int = -1) -> list[dict]:
    """The rows a run scores: all rows shuffled with the fixed seed, then the first `max_per_task`."""
    rows = load_examples(bundle, task)
    random.Random(SHUFFLE_SEED).shuffle(rows)
    return rows[:max_per_task] if max_per_task > 0 else rows


def fewshot_for(rows: list[dict], idx: int, num_fewshot: int) -> list[dict]:
    if num_fewshot <= 0:
        return []
    others = [i for i in range(len(rows)) if i != idx]
    return [rows[i] for i in random.Random(FEWSHOT_SEED + idx).sample(others, min(num_fewshot, len(others)))]


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_task(model, tokenizer, rows: list[dict], task: TaskSpec, device="cpu", max_len: int | None = None) -> float:
    """Accuracy on `rows`: this rank scores rows rank, rank+W, ...; the counts are summed over ranks."""
    rank, world = dist_info()
    correct = torch.zeros(len(rows), dtype=torch.float32, device=device)
    for idx in range(rank, len(rows), world):
        enc = crop_left(encode_example(rows[idx], task, fewshot_for(rows, idx, task.num_fewshot), tokenizer), max_len)
        correct[idx] = float(score_example(model, enc, task.task_type, tokenizer.bos_token_id, device))
    if world > 1:
        dist.all_reduce(correct)
    return correct.mean().item()


def centered(accuracy: float, baseline_fraction: float) -> float:
    """Accuracy rescaled so chance is 0 and perfect is 1."""
    return (accuracy - baseline_fraction) / (1.0 - baseline_fraction)


def model_context_length(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "sequence_len", None)


def evaluate_core(model, tokenizer, bundle_dir: str, max_per_task: int = -1, device="cpu") -> dict:
    """Score every task of the bundle; returns per-task accuracy / centered accuracy and "core".

    `model(ids)` must return logits (B, T, V); `tokenizer` needs `.encode(list, prepend=id)` and
    `.bos_token_id`. Prompts longer than the model's `config.sequence_len` are cropped from the left.
    """
    tasks = load_tasks(bundle_dir)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    max_len = model_context_length(model)
    results: dict[str, dict] = {}
    t0 = time.time()
    try:
        for task in tasks:
            t_task = time.time()
            rows = task_examples(bundle_dir, task, max_per_task)
            accuracy = evaluate_task(model, tokenizer, rows, task, device, max_len)
            results[task.label] = {
                "type": task.task_type,
                "num_fewshot": task.num_fewshot,
                "examples": len(rows),
                "baseline": task.baseline_fraction,
                "accuracy": accuracy,
                "centered": centered(accuracy, task.baseline_fraction),
                "seconds": round(time.time() - t_task, 3),
            }
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    manifest = read_manifest(bundle_dir)
    core = sum(r["centered"] for r in results.values()) / len(results)
    return {
        "core": core,
        "core_stderr": core_stderr(results),
        "tasks": results,
        "num_tasks": len(results),
        "missing_tasks": manifest.get("missing", []),
        "missing_reasons": manifest.get("missing_reasons", {}),
        "max_per_task": max_per_task,
        "bundle": bundle_dir,
        "seconds": round(time.time() - t0, 3),
    }


def core_stderr(results: dict[str, dict]) -> float:
    """Sampling standard error of CORE (binomial per task, tasks independent): how far apart two
    runs on different examples would land, the yardstick for "a random model scores ~0"."""
    variance = sum(
        r["accuracy"] * (1 - r["accuracy"]) / r["examples"] / (1 - r["baseline"]) ** 2 for r in results.values()
    )
    return math.sqrt(variance) / len(results)


def format_core_table(result: dict) -> str:
    """A per-task table for the console; the last line is exactly `CORE: 0.1234`."""
    width = max([len("task"), *map(len, result["tasks"])])
    lines = [f"{'task':<{width}}  {'type':<17}  {'shots':>5}  {'n':>6}  {'accuracy':>8}  {'centered':>8}"]
    for label, r in result["tasks"].items():
        lines.append(
            f"{label:<{width}}  {r['type']:<17}  {r['num_fewshot']:>5}  {r['examples']:>6}  "
            f"{r['accuracy']:>8.4f}  {r['centered']:>8.4f}"
        )
    if "core_stderr" in result:
        lines.append(f"sampling standard error of CORE: {result['core_stderr']:.4f}")
    lines.append(core_coverage(result))  # the line above the last, which stays exactly `CORE: 0.1234`
    lines.append(f"CORE: {result['core']:.4f}")
    return "\n".join(lines)


def core_coverage(result: dict) -> str:
    """`over 14 of 22 tasks; missing: a, b (why); ...`: what a CORE figure averages over."""
    line = f"over {len(result['tasks'])} of {len(CORE_LABELS)} tasks"
    missing = result.get("missing_tasks") or []
    if missing:
        reasons = result.get("missing_reasons") or {}
        named = with_reasons({label: reasons.get(label, "no reason recorded") for label in missing})
        line += f"; missing: {named}; not comparable to published CORE"
    return line


def core_metrics(result: dict) -> dict[str, float]:
    """MLflow metric names for a result: `eval/core`, `eval/core_tasks` (how many it averages) and
    `eval/<task>` (centered accuracy)."""
    return {"eval/core": result["core"], "eval/core_tasks": len(result["tasks"]),
            **{f"eval/{k}": r["centered"] for k, r in result["tasks"].items()}}


def format_core_csv(result: dict) -> str:
    """The per-task results as CSV (task, accuracy, centered), CORE as the last row."""
    lines = ["task,type,num_fewshot,examples,accuracy,centered"]
    for label, r in result["tasks"].items():
        lines.append(f"{label},{r['type']},{r['num_fewshot']},{r['examples']},{r['accuracy']:.6f},{r['centered']:.6f}")
    lines.append(f"CORE,,,,,{result['core']:.6f}")
    return "\n".join(lines) + "\n"
