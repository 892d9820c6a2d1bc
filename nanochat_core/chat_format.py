"""Conversations as token ids: the chat format every post-training stage and the engine share.

    ids, mask = render_conversation(tokenizer, {"messages": [{"role": "user", "content": "2+2?"},
                                                            {"role": "assistant", "content": "4"}]})
    prompt = render_for_completion(tokenizer, conversation)   # ... <|assistant_start|>, ready to sample

Layout (nanochat's): `<|bos|>`, then per turn `<|user_start|> text <|user_end|>` or
`<|assistant_start|> content <|assistant_end|>`. Assistant content is a string or a list of parts
`{"type": "text" | "python" | "python_output", "text": ...}`; python parts are wrapped in
`<|python_start|>…<|python_end|>`, tool outputs in `<|output_start|>…<|output_end|>`.
The mask says which positions the model is trained to produce: 1 on assistant text, python calls and
`<|assistant_end|>`; 0 on BOS, user turns, `<|assistant_start|>` and tool outputs (the engine forces
those at inference, so learning to predict them would only teach the model to hallucinate results).
A leading system message is merged into the first user turn (the format has no system role).
Kept out of tokenizer.py on purpose: rendering is a post-training concern (the lead notes the split).
"""

from __future__ import annotations

from typing import Any

from nanochat_core.errors import UserError

PART_TYPES = ("text", "python", "python_output")


class ConversationError(UserError):
    """A conversation that cannot be rendered: bad roles, order or content."""


def messages_of(conversation: dict | list) -> list[dict]:
    """The message list of `{"messages": [...]}` or of a bare list, system turn merged, validated."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else conversation
    if not isinstance(messages, list) or not messages:
        raise ConversationError("a conversation needs a non-empty \"messages\" list; write {\"messages\": [...]}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConversationError(f"message {i} is not an object with \"role\" and \"content\"; fix that message")
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ConversationError("a system message must be followed by a user message; add the user turn")
        system, first = messages[0], messages[1]
        if not isinstance(system["content"], str) or not isinstance(first["content"], str):
            raise ConversationError("system and user messages must have string content; fix the first two turns")
        merged = {"role": "user", "content": f"{system['content']}\n\n{first['content']}"}
        messages = [merged, *messages[2:]]
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ConversationError(
                f"message {i} has role {m['role']!r} where {expected!r} was expected; roles must alternate "
                "user, assistant, user, ... (an optional system message first)"
            )
        if m["role"] == "user" and not isinstance(m["content"], str):
            raise ConversationError(f"message {i} (user) must have string content; fix that message")
        if m["role"] == "assistant":
            _check_parts(i, m["content"])
    return messages


def _check_parts(i: int, content: Any) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ConversationError(f"message {i} (assistant) content must be a string or a list of parts; fix it")
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
            raise ConversationError(
                f"message {i} has a part {part!r} that is not {{\"type\": one of {', '.join(PART_TYPES)}, "
                "\"text\": string}; fix that part"
            )


def render_conversation(tokenizer, conversation: dict | list, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
    """(ids, mask) of a whole conversation, both cropped to `max_tokens`."""
    messages = messages_of(conversation)
    special = tokenizer.encode_special
    ids: list[int] = []
    mask: list[int] = []

    def add(tokens: int | list[int], m: int) -> None:
        tokens = [tokens] if isinstance(tokens, int) else tokens
        ids.extend(tokens)
        mask.extend([m] * len(tokens))

    add(tokenizer.bos_token_id, 0)
    for m in messages:
        if m["role"] == "user":
            add(special("<|user_start|>"), 0)
            add(tokenizer.encode(m["content"]), 0)
            add(special("<|user_end|>"), 0)
            continue
        add(special("<|assistant_start|>"), 0)
        parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        for part in parts:
            body = tokenizer.encode(part["text"])
            if part["type"] == "text":
                add(body, 1)
            elif part["type"] == "python":
                add(special("<|python_start|>"), 1)
                add(body, 1)
                add(special("<|python_end|>"), 1)
            else:  # python_output: produced by the tool, never learned
                add(special("<|output_start|>"), 0)
                add(body, 0)
                add(special("<|output_end|>"), 0)
        add(special("<|assistant_end|>"), 1)
    return ids[:max_tokens], mask[:max_tokens]


def render_for_completion(tokenizer, conversation: dict | list) -> list[int]:
    """Ids of the conversation up to a fresh `<|assistant_start|>`, for sampling the assistant's reply.

    A trailing assistant message (the reference answer of an eval example) is dropped first.
    """
    messages = messages_of(conversation)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    ids, _ = render_conversation(tokenizer, {"messages": messages}, max_tokens=1 << 62)
    return ids + [tokenizer.encode_special("<|assistant_start|>")]


def visualize(tokenizer, ids: list[int], mask: list[int]) -> str:
    """The rendered text with trained spans in [brackets]: a debugging aid for masks."""
    out, open_ = [], False
    for i, m in zip(ids, mask):
        if m and not open_:
            out.append("[")
        if not m and open_:
            out.append("]")
        open_ = bool(m)
        out.append(tokenizer.decode([i]))
    return "".join(out) + ("]" if open_ else "")
