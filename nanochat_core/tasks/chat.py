"""General conversations: SmolTalk (parquet), the chatterbot corpus (packaged), users' own JSONL,
and the identity conversations we ship (who the model is)."""

from __future__ import annotations

import functools

import yaml

from nanochat_core.chat_format import ConversationError, messages_of
from nanochat_core.errors import UserError
from nanochat_core.tasks import sources
from nanochat_core.tasks.base import Conversation, Task


class SmolTalk(Task):
    """SmolTalk-format rows (a `messages` column of {role, content}) from a parquet path or URL.

    Default: the public smol-smoltalk split nanochat trains on (needs internet once; then cached).
    """

    def __init__(self, split: str = "train", source: str | None = None, **slice_args):
        super().__init__(**slice_args)
        self.source = source or sources.SMOLTALK_URL.format(split=split)
        self.rows = [r["messages"] for r in sources.parquet_rows(self.source, ["messages"])]

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in self.rows[index]]}


@functools.lru_cache(maxsize=1)
def chatterbot_conversations() -> tuple[tuple[str, ...], ...]:
    """The 2,026 English conversations of chatterbot-corpus 1.3.3, file by file in name order."""
    archive = sources.wheel(sources.CHATTERBOT)
    out = []
    for name in sorted(archive.names):
        if not (name.startswith("chatterbot_corpus/data/english/") and name.endswith(".yml")):
            continue
        doc = yaml.load(archive.read(name), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
        for conv in doc.get("conversations") or []:
            out.append(tuple(str(turn).strip() for turn in conv))
    return tuple(out)


class Chatterbot(Task):
    """chatterbot-corpus turns as user/assistant alternation; a single-line entry gets no reply and is
    dropped, a trailing unanswered user turn is cut."""

    def __init__(self, **slice_args):
        super().__init__(**slice_args)
        self.convs = [c[: len(c) // 2 * 2] for c in chatterbot_conversations() if len(c) >= 2]

    def num_examples(self) -> int:
        return len(self.convs)

    def get_example(self, index: int) -> Conversation:
        turns = self.convs[index]
        roles = ["user", "assistant"]
        return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


class CustomJSON(Task):
    """A JSONL file of conversations: each line `{"messages": [...]}` or a bare list of messages.

    Every line is validated when the file is loaded, so a malformed line is reported with its number
    before any training starts.
    """

    def __init__(self, source: str, **slice_args):
        super().__init__(**slice_args)
        self.source = source
        self.convs: list[Conversation] = []
        for n, record in sources.jsonl_records(source):
            try:
                messages = messages_of(record)
            except ConversationError as e:
                raise UserError(f"{source} line {n}: {e}") from None
            if len(messages) < 2:
                # Training learns from assistant tokens only: a file of user turns trains at loss 0 and
                # writes a checkpoint that learned nothing, so say so at the first such line.
                raise UserError(f"{source} line {n}: the conversation has no assistant turn, so there is nothing "
                                "to learn from; add the assistant's reply")
            self.convs.append({"messages": messages})
        if not self.convs:
            raise UserError(f"{source} holds no conversations; add lines like {{\"messages\": [...]}}")

    def num_examples(self) -> int:
        return len(self.convs)

    def get_example(self, index: int) -> Conversation:
        return self.convs[index]


class Identity(CustomJSON):
    """Who the model is: the conversations in tasks/data/identity.jsonl (ours, shipped with the code)."""

    def __init__(self, **slice_args):
        super().__init__(sources.packaged_data("identity.jsonl"), **slice_args)
