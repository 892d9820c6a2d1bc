"""The Task interface shared by training mixtures and evaluation, and the two ways to combine tasks.

    task = GSM8K(split="test", start=0, stop=100)        # a slice: examples 0..99
    conversation = task[3]                              # {"messages": [...], ...}
    task.evaluate(conversation, completion_text)        # 1 correct, 0 wrong
    mixture = TaskMixture([SmolTalk(), SpellingBee(size=1000)], seed=42)   # shuffled once, deterministic

A task is a sequence of conversations (the chat_format dicts). `eval_type` says how chat_eval scores it:
"categorical" (restrict the logits at the answer position to `conversation["letters"]`) or
"generative" (sample a reply, then `evaluate`). Slicing is `start/stop/step` on the constructor, so a
stage can take "the first 500 of MMLU" or "every 4th example" without copying data.
"""

from __future__ import annotations

import random
import re
from typing import Any, Sequence

Conversation = dict[str, Any]

LETTERS = "ABCDEFGHIJ"
ANSWER_RE = re.compile(r"####\s*(-?[0-9][0-9.,]*)")


class Task:
    """A slice of a dataset of conversations; subclasses define `num_examples` and `get_example`."""

    eval_type = "generative"

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"bad slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> Conversation:
        raise NotImplementedError

    def evaluate(self, conversation: Conversation, completion: str) -> int:
        raise NotImplementedError(f"{type(self).__name__} is not scored")

    def reward(self, conversation: Conversation, completion: str) -> float:
        """RL reward: the evaluation as a float."""
        return float(self.evaluate(conversation, completion))

    def _range(self) -> range:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return range(self.start, max(self.start, stop), self.step)

    def __len__(self) -> int:
        return len(self._range())

    def __getitem__(self, i: int) -> Conversation:
        r = self._range()
        if not -len(r) <= i < len(r):
            raise IndexError(f"{type(self).__name__} has {len(r)} examples; index {i} is out of range")
        return self.get_example(r[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def name(self) -> str:
        return type(self).__name__


class TaskSequence(Task):
    """Tasks one after another (curricula: all of A, then all of B)."""

    def __init__(self, tasks: Sequence[Task], **slice_args):
        super().__init__(**slice_args)
        self.tasks = list(tasks)
        self.offsets = []
        total = 0
        for t in self.tasks:
            self.offsets.append(total)
            total += len(t)
        self.total = total

    def num_examples(self) -> int:
        return self.total

    def get_example(self, index: int) -> Conversation:
        for task, offset in zip(reversed(self.tasks), reversed(self.offsets)):
            if index >= offset:
                return task[index - offset]
        raise IndexError(index)


class TaskMixture(Task):
    """Every example of every task, shuffled once with a fixed seed: the same order on every rank and
    every run. Repeat a task in the list to oversample it (nanochat lists identity twice)."""

    def __init__(self, tasks: Sequence[Task], seed: int = 42, **slice_args):
        super().__init__(**slice_args)
        self.tasks = list(tasks)
        self.index = [(ti, ei) for ti, t in enumerate(self.tasks) for ei in range(len(t))]
        random.Random(seed).shuffle(self.index)

    def num_examples(self) -> int:
        return len(self.index)

    def get_example(self, index: int) -> Conversation:
        ti, ei = self.index[index]
        return self.tasks[ti][ei]


# --- shared formats ---------------------------------------------------------------------------


def render_mc(question: str, letters: str, choices: list[str]) -> str:
    """nanochat's multiple-choice prompt: the letter comes *after* its choice, so a small model that
    attends to the choice text finds the letter right next to it."""
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "\n".join(lines)


def mc_conversation(question: str, choices: list[str], answer: int, **extra) -> Conversation:
    letters = LETTERS[: len(choices)]
    return {
        "messages": [
            {"role": "user", "content": render_mc(question, letters, choices)},
            {"role": "assistant", "content": letters[answer]},
        ],
        "letters": list(letters),
        **extra,
    }


def evaluate_letter(conversation: Conversation, completion: str) -> int:
    return int(completion.strip()[:1] == conversation["messages"][-1]["content"])


def extract_answer(text: str) -> str | None:
    """The number after the last `####` (GSM8K's marker), commas removed; None if there is none."""
    found = ANSWER_RE.findall(text)
    if not found:
        return None
    return found[-1].replace(",", "").rstrip(".")


def assistant_text(conversation: Conversation) -> str:
    """The reference answer: the last assistant message's text, parts joined."""
    content = conversation["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content)
