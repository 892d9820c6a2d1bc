"""Conversation rendering: exact ids and masks on hand-written conversations, tool calls included."""

from __future__ import annotations

import pytest

from chat_fixtures import tokenizer
from nanochat_core.chat_format import ConversationError, render_conversation, render_for_completion, visualize
from nanochat_core.errors import UserError


def sp(name):
    return tokenizer().encode_special(name)


def enc(text):
    return tokenizer().encode(text)


def test_simple_conversation_ids_and_mask():
    tok = tokenizer()
    conv = {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"},
                         {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    ids, mask = render_conversation(tok, conv)
    expected = ([tok.bos_token_id, sp("<|user_start|>"), *enc("Hello"), sp("<|user_end|>"), sp("<|assistant_start|>")],
                [*enc("Hi there"), sp("<|assistant_end|>")],
                [sp("<|user_start|>"), *enc("2+2?"), sp("<|user_end|>"), sp("<|assistant_start|>")],
                [*enc("4"), sp("<|assistant_end|>")])
    assert ids == [i for chunk in expected for i in chunk]
    assert mask == [m for chunk, m in zip(expected, (0, 1, 0, 1)) for _ in chunk]


def test_tool_call_parts_mask_output_only():
    tok = tokenizer()
    parts = [{"type": "text", "text": "16-3-4 = "}, {"type": "python", "text": "16-3-4"},
             {"type": "python_output", "text": "9"}, {"type": "text", "text": "9 eggs.\n#### 9"}]
    ids, mask = render_conversation(tok, {"messages": [{"role": "user", "content": "eggs?"},
                                                       {"role": "assistant", "content": parts}]})
    head = [tok.bos_token_id, sp("<|user_start|>"), *enc("eggs?"), sp("<|user_end|>"), sp("<|assistant_start|>")]
    trained = [*enc("16-3-4 = "), sp("<|python_start|>"), *enc("16-3-4"), sp("<|python_end|>")]
    forced = [sp("<|output_start|>"), *enc("9"), sp("<|output_end|>")]
    tail = [*enc("9 eggs.\n#### 9"), sp("<|assistant_end|>")]
    assert ids == head + trained + forced + tail
    assert mask == [0] * len(head) + [1] * len(trained) + [0] * len(forced) + [1] * len(tail)
    assert "[<|python_start|>" not in visualize(tok, ids, mask)  # the call is inside a trained span


def test_system_message_merged_into_first_user_turn():
    tok = tokenizer()
    with_system = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello"}]}
    merged = {"messages": [{"role": "user", "content": "Be brief.\n\nHi"}, {"role": "assistant", "content": "Hello"}]}
    assert render_conversation(tok, with_system) == render_conversation(tok, merged)


@pytest.mark.parametrize("messages", [
    [{"role": "assistant", "content": "I speak first"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}],
    [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "shell", "text": "ls"}]}],
    [],
])
def test_bad_role_order_or_content_is_a_clear_error(messages):
    with pytest.raises(ConversationError) as e:
        render_conversation(tokenizer(), {"messages": messages})
    problem, _, fix = str(e.value).partition("; ")
    assert isinstance(e.value, UserError) and problem and fix  # one sentence: the problem, then the fix


def test_max_tokens_crops_ids_and_mask_together():
    conv = {"messages": [{"role": "user", "content": "Hello " * 20}, {"role": "assistant", "content": "Hi " * 20}]}
    ids, mask = render_conversation(tokenizer(), conv, max_tokens=10)
    full_ids, full_mask = render_conversation(tokenizer(), conv)
    assert (ids, mask) == (full_ids[:10], full_mask[:10]) and len(full_ids) > 10


def test_render_for_completion_drops_the_reference_answer():
    tok = tokenizer()
    conv = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    prompt = render_for_completion(tok, conv)
    assert prompt == [tok.bos_token_id, sp("<|user_start|>"), *enc("2+2?"), sp("<|user_end|>"), sp("<|assistant_start|>")]
    assert render_for_completion(tok, {"messages": conv["messages"][:1]}) == prompt
