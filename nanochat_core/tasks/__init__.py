"""Tasks: datasets of conversations for training mixtures and chat evaluation.

    from nanochat_core.tasks import build_task, TaskMixture
    mixture = TaskMixture([build_task(s) for s in ["chatterbot", "identity", "math:2000", "spelling:1000"]])

A task spec is `name[:size][@source]`: the stages' configs list their mixtures as specs, so a user can
swap in `smoltalk` (public parquet), `custom@/path/convs.jsonl` or `gsm8k@s3://bucket/train.parquet`
from the command line. Names:
    chatterbot, identity, smoltalk, custom@PATH            conversations
    math[:N]                                               generated GSM8K-style tool-use problems
    gsm8k-train@PATH, mmlu-aux[@PATH], arc-easy-train[@PATH], arc-challenge-train[@PATH]
    spelling[:N], spellingbee[:N]                          from the packaged word list
Benchmark test splits (ARC/MMLU/GSM8K/HumanEval/SpellingBee test words) are built only by chat_eval.
"""

from __future__ import annotations

from nanochat_core.errors import UserError
from nanochat_core.tasks.base import Task, TaskMixture, TaskSequence, extract_answer, render_mc

__all__ = ["Task", "TaskMixture", "TaskSequence", "build_task", "extract_answer", "render_mc", "TASK_NAMES"]

TASK_NAMES = ("chatterbot", "identity", "smoltalk", "custom", "math", "gsm8k-train", "mmlu-aux",
              "arc-easy-train", "arc-challenge-train", "spelling", "spellingbee")


def build_task(spec: str, seed: int = 0, words_path: str | None = None) -> Task:
    """The training task a spec names (see the module docstring); a UserError for an unknown spec."""
    head, _, source = spec.partition("@")
    name, _, size_text = head.partition(":")
    name, source = name.strip().lower(), source.strip() or None
    try:
        size = int(size_text) if size_text else None
    except ValueError:
        raise UserError(f"task spec {spec!r}: {size_text!r} is not a number of examples; write e.g. math:2000") from None
    from nanochat_core.tasks.chat import Chatterbot, CustomJSON, Identity, SmolTalk
    from nanochat_core.tasks.math import GSM8K, SyntheticMath
    from nanochat_core.tasks.multiple_choice import ARC, MMLU
    from nanochat_core.tasks.spelling import SimpleSpelling, SpellingBee

    sliced = {"stop": size} if size is not None else {}
    if name == "chatterbot":
        return Chatterbot(**sliced)
    if name == "identity":
        return Identity(**sliced)
    if name == "smoltalk":
        return SmolTalk("train", source, **sliced)
    if name == "custom":
        if not source:
            raise UserError(f"task spec {spec!r} needs a file: write custom@/path/to/conversations.jsonl")
        return CustomJSON(source, **sliced)
    if name == "math":
        return SyntheticMath(size or 10_000, seed=seed)
    if name == "gsm8k-train":
        return GSM8K("train", source, **sliced)
    if name == "mmlu-aux":
        return MMLU("auxiliary_train", source=source, **sliced)
    if name in ("arc-easy-train", "arc-challenge-train"):
        subset = "ARC-Easy" if name.startswith("arc-easy") else "ARC-Challenge"
        return ARC(subset, "train", source, **sliced)
    if name == "spelling":
        return SimpleSpelling(size or 10_000, "train", seed, words_path)
    if name == "spellingbee":
        return SpellingBee(size or 10_000, "train", seed, words_path)
    raise UserError(f"unknown task {name!r} in spec {spec!r}; known tasks: {', '.join(TASK_NAMES)}")
