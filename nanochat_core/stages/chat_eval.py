"""Chat evaluation: ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee, and ChatCORE.

    nanochat chat-eval --preset tiny --source sft
    nanochat chat-eval --preset d4-cpu --source rl --tasks GSM8K,HumanEval --max-problems 100
    torchrun --standalone --nproc_per_node=8 -m nanochat_core.stages.chat_eval --config cfg.json

Multiple choice (ARC, MMLU): one forward pass per prompt, the logits at the answer position restricted
to the choices' letters, argmax. Generative (GSM8K, HumanEval, SpellingBee): greedy decoding with the
calculator tool on, then the task's own check (`#### N`, unit tests in the sandbox). Problems are
striped over ranks and the counts summed. ChatCORE = mean over the tasks of (acc − baseline) /
(1 − baseline), baselines 0.25 for the letter tasks and 0 for the generative ones (nanochat's).
Scores its `model` input (run by hand: the latest checkpoints of the --source family (sft|mid|rl), or --model).
The ref is stage `<source>_eval` (mid_eval / sft_eval / rl_eval: the report's MID / SFT / RL
columns) and is written to `<base>/chat_eval/<source>/result.json`.
"""

from __future__ import annotations

import json
import time

import torch

from nanochat_core import artifacts, dist, hardware, storage
from nanochat_core.chat_format import render_for_completion
from nanochat_core.config import PipelineConfig
from nanochat_core.data.packages import PackageUnavailable
from nanochat_core.engine import Engine
from nanochat_core.errors import exit_on_user_error, with_reasons
from nanochat_core.paths import join, output_dir
from nanochat_core.post_train import load_start
from nanochat_core.registry import eval_ref_name
from nanochat_core.torch_stage import stage_main
from nanochat_core.tasks.code import HumanEval
from nanochat_core.tasks.math import GSM8K
from nanochat_core.tasks.multiple_choice import ARC, MMLU
from nanochat_core.tasks.spelling import SpellingBee

BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}
SPELLING_BEE_SIZE = 256  # test-word questions when --max-problems is -1


def build_eval_task(name: str, max_problems: int):
    """The task, spread evenly over its examples when capped (MMLU's first 100 are all one subject)."""
    if name == "SpellingBee":
        return SpellingBee(max_problems if max_problems > 0 else SPELLING_BEE_SIZE, "test", seed=0)
    full = {"ARC-Easy": lambda **s: ARC("ARC-Easy", **s), "ARC-Challenge": lambda **s: ARC("ARC-Challenge", **s),
            "MMLU": lambda **s: MMLU("test", **s), "GSM8K": lambda **s: GSM8K("test", **s),
            "HumanEval": lambda **s: HumanEval(**s)}[name]
    task = full()
    if 0 < max_problems < len(task):
        stride = len(task) // max_problems
        task = full(step=stride, stop=stride * max_problems)
    return task


@torch.no_grad()
def run_categorical(model, tokenizer, task, rt: dist.Runtime, batch_size: int, autocast) -> tuple[int, int]:
    """(correct, total) for a letter-answer task on this rank's share of the problems."""
    correct = total = 0
    mine = list(range(rt.rank, len(task), rt.world))
    for start in range(0, len(mine), batch_size):
        convs = [task[i] for i in mine[start: start + batch_size]]
        prompts = [render_for_completion(tokenizer, c) for c in convs]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), tokenizer.bos_token_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        with autocast():
            logits = model(ids.to(rt.device))
        for i, (conv, prompt) in enumerate(zip(convs, prompts)):
            letter_ids = [tokenizer.encode(letter)[0] for letter in conv["letters"]]
            scores = logits[i, len(prompt) - 1, letter_ids]
            predicted = conv["letters"][int(scores.argmax())]
            correct += task.evaluate(conv, predicted)
            total += 1
    return correct, total


def run_generative(engine, tokenizer, task, rt: dist.Runtime, max_new_tokens: int, samples: list) -> tuple[int, int]:
    correct = total = 0
    for i in range(rt.rank, len(task), rt.world):
        conv = task[i]
        prompt = render_for_completion(tokenizer, conv)
        completion = engine.complete(prompt, max_tokens=max_new_tokens, temperature=0.0)
        ok = task.evaluate(conv, completion)
        correct += ok
        total += 1
        if sum(s["task"] == task.name for s in samples) < 2:
            samples.append({"task": task.name, "prompt": conv["messages"][0]["content"][:300],
                            "completion": completion[:500], "correct": ok})
    return correct, total


def chatcore(accuracies: dict[str, float]) -> float:
    centered = [(acc - BASELINES[name]) / (1 - BASELINES[name]) for name, acc in accuracies.items()]
    return sum(centered) / len(centered)


def run(cfg: PipelineConfig, inputs: dict[str, dict]) -> dict:
    with dist.session(cfg.chat_eval.device_type) as rt:
        return evaluate(cfg, inputs, rt)


def evaluate(cfg: PipelineConfig, inputs: dict[str, dict], rt: dist.Runtime) -> dict:
    ec = cfg.chat_eval
    started = time.time()
    say = dist.Console(rt.master)
    src = inputs["model"]["path"]
    out = output_dir("chat_eval", cfg, source=ec.source)
    model, tokenizer, meta = load_start("chat_eval", src, ec.step, rt.device)
    model.eval()
    engine = Engine(model, tokenizer)
    autocast = hardware.autocast(ec.dtype, rt.device)
    accuracies, counts, seconds, samples, missing = {}, {}, {}, [], {}
    for name in ec.tasks:
        t0 = time.time()
        try:
            task = build_eval_task(name, ec.max_problems)
        except PackageUnavailable as e:  # the registry no longer serves its data: scored without it, and said so
            missing[name] = e.reason
            say(f"chat-eval {ec.source}: {name} missing: {e.reason}")
            continue
        if task.eval_type == "categorical":
            correct, total = run_categorical(model, tokenizer, task, rt, ec.batch_size, autocast)
        else:
            with autocast():
                correct, total = run_generative(engine, tokenizer, task, rt, ec.max_new_tokens, samples)
        summed = dist.all_reduce_sum(torch.tensor([correct, total], dtype=torch.float64, device=rt.device))
        accuracies[name] = float(summed[0] / summed[1].clamp(min=1))
        counts[name] = int(summed[1])
        seconds[name] = time.time() - t0
        say(f"chat-eval {ec.source}: {name} {accuracies[name]:.4f} ({int(summed[0])}/{int(summed[1])}) "
            f"in {seconds[name]:.0f}s")
    score = chatcore(accuracies) if accuracies else None
    coverage = f"over {len(accuracies)} of {len(ec.tasks)} tasks" + (
        f"; missing: {with_reasons(missing)}" if missing else "")
    say(f"chat-eval {ec.source}: ChatCORE {score:.4f} {coverage}" if score is not None else
        f"chat-eval {ec.source}: no ChatCORE, {coverage}")
    figures = {"source": ec.source, "checkpoint": src, "step": meta["step"], **accuracies, "ChatCORE": score,
               "chatcore_tasks": len(accuracies), "chatcore_of": len(ec.tasks), "chatcore_coverage": coverage,
               "missing_tasks": list(missing), "missing_reasons": missing,
               "problems": sum(counts.values()), "seconds": time.time() - started,
               "tasks": {**accuracies, "chatcore": score}, "per_task": {"problems": counts, "seconds": seconds}}
    if not rt.master:
        return {"path": out, **figures}
    storage.makedirs(out)
    storage.write_text(join(out, "samples.json"), json.dumps(samples, indent=2))
    return artifacts.make_ref(eval_ref_name(ec.source), out, figures)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    stage_main("chat_eval", argv, run)  # with --nproc-per-node N > 1 by hand: torchrun for the N processes


if __name__ == "__main__":
    main()
