"""Spelling tasks from a packaged word list (Debian wamerican): the tokenizer hides letters inside
tokens, so "how many r in strawberry" needs the model to spell the word out first.

    SimpleSpelling(size=2000)              # "Spell the word: apple" -> "apple:a,p,p,l,e"
    SpellingBee(size=500, split="test")    # count a letter: spell it out, check with python, `#### N`

Words are split once into train and test by a hash of the word, so the test words are never trained on.
"""

from __future__ import annotations

import random
import string
import zlib

from nanochat_core.errors import UserError
from nanochat_core.tasks import sources
from nanochat_core.tasks.base import Conversation, Task
from nanochat_core.tasks.math import evaluate_answer

TEST_FRACTION = 10  # one word in 10 is a test word

QUESTIONS = [
    "How many {letter} are in the word {word}?",
    "How many {letter}s are in {word}?",
    "Count the letter {letter} in {word}.",
    "how many times does {letter} appear in {word}",
    "In the word '{word}', how many '{letter}' are there?",
]


def split_words(split: str, words_path: str | None = None) -> list[str]:
    if split not in ("train", "test"):
        raise UserError(f"spelling split {split!r} does not exist; use train or test")
    words = sources.word_list(words_path)
    is_test = lambda w: zlib.crc32(w.encode()) % TEST_FRACTION == 0  # noqa: E731
    return [w for w in words if is_test(w) == (split == "test")]


class _WordTask(Task):
    def __init__(self, size: int, split: str = "train", seed: int = 0, words_path: str | None = None, **slice_args):
        super().__init__(**slice_args)
        self.size, self.split, self.seed = size, split, seed
        self.words = split_words(split, words_path)
        if not self.words:
            raise UserError(f"the word list has no {split} words; pass a longer list")

    def num_examples(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        return random.Random(f"{type(self).__name__}:{self.split}:{self.seed}:{index}")


class SimpleSpelling(_WordTask):
    def get_example(self, index: int) -> Conversation:
        word = self._rng(index).choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": f"{word}:{','.join(word)}"}]}


def spelling_bee_answer(word: str, letter: str) -> list[dict]:
    """Spell, count by hand, confirm with a python `.count`, answer with `#### N`."""
    count = word.count(letter)
    lines = [f"We are asked how many times '{letter}' appears in '{word}'. Let me spell it out first.", "",
             f"{word}:{','.join(word)}", "", f"Now count the '{letter}':"]
    running = 0
    for i, ch in enumerate(word, 1):
        if ch == letter:
            running += 1
            lines.append(f"{i}:{ch} hit! count={running}")
        else:
            lines.append(f"{i}:{ch}")
    lines += ["", f"That gives {count}. Let me double check with Python:", "", ""]
    return [
        {"type": "text", "text": "\n".join(lines)},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nPython gives {count} as well.\n\n#### {count}"},
    ]


class SpellingBee(_WordTask):
    """Letter counting, scored like GSM8K by the `#### N` in the reply."""

    def get_example(self, index: int) -> Conversation:
        r = self._rng(index)
        word = r.choice(self.words)
        # Half the time a letter of the word, else any letter (the answer can be 0).
        letter = r.choice(word) if r.random() < 0.5 else r.choice(string.ascii_lowercase)
        question = r.choice(QUESTIONS).format(letter=letter, word=word)
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": spelling_bee_answer(word, letter)}],
                "word": word, "letter": letter}

    def evaluate(self, conversation: Conversation, completion: str) -> int:
        return evaluate_answer(conversation, completion)
