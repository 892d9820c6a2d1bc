"""The engine against references: KV-cache decoding vs recomputing the whole sequence every step,
and the tool round trip through the real sandboxed calculator on a GPT overfit to a tool-use reply."""

from __future__ import annotations

import pytest
import torch

from chat_fixtures import single_thread, tiny_model, tokenizer  # noqa: F401 (autouse fixture)
from nanochat_core.chat_format import render_conversation, render_for_completion
from nanochat_core.engine import Engine
from nanochat_core.errors import UserError


def uncached_greedy(model, tokens, max_tokens, stop_ids):
    ids = list(tokens)
    with torch.inference_mode():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids]))[0, -1]
            nxt = int(logits.argmax())
            if nxt in stop_ids:
                break
            ids.append(nxt)
    return ids


def test_kv_cache_generation_equals_uncached_at_temperature_zero():
    tok = tokenizer()
    model = tiny_model(tok.vocab_size, seed=1)
    engine = Engine(model, tok, tool=None)
    prompt = render_for_completion(tok, {"messages": [{"role": "user", "content": "The quick brown fox"}]})
    reference = uncached_greedy(model, prompt, 40, engine.stop_ids)
    sequences, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=40, temperature=0.0)
    assert len(reference) > len(prompt) + 5  # the comparison covers real decoding steps
    assert sequences == [reference] * 3
    assert masks[0] == [0] * len(prompt) + [1] * (len(reference) - len(prompt))


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    tok = tokenizer()
    model = tiny_model(tok.vocab_size, seed=2)
    engine = Engine(model, tok, tool=None)
    prompt = render_for_completion(tok, {"messages": [{"role": "user", "content": "Hello"}]})
    a, _ = engine.generate_batch(prompt, 4, max_tokens=20, temperature=1.0, seed=5)
    b, _ = engine.generate_batch(prompt, 4, max_tokens=20, temperature=1.0, seed=5)
    assert a == b and len({tuple(s) for s in a}) > 1  # reproducible, and the rows differ
    greedy, _ = engine.generate_batch(prompt, 1, max_tokens=20, temperature=0.0)
    top1, _ = engine.generate_batch(prompt, 1, max_tokens=20, temperature=1.0, top_k=1, seed=9)
    assert greedy == top1


def overfit(conversation, steps=300):
    """A tiny GPT trained until it reproduces `conversation` (every token, tool output included)."""
    tok = tokenizer()
    model = tiny_model(tok.vocab_size, seed=3)
    ids, _ = render_conversation(tok, conversation)
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if loss.item() < 0.01:
            break
    return model.eval(), ids


def tool_conversation(expr, output):
    parts = [{"type": "text", "text": "eggs: "}, {"type": "python", "text": expr},
             {"type": "python_output", "text": output}, {"type": "text", "text": " so #### 9"}]
    return {"messages": [{"role": "user", "content": "How many eggs?"}, {"role": "assistant", "content": parts}]}


def test_tool_call_round_trip_with_the_calculator():
    tok = tokenizer()
    # Train on a *wrong* tool output (7): the 9 in the generation can only come from the calculator.
    model, _ = overfit(tool_conversation("16-3-4", "7"))
    engine = Engine(model, tok)
    prompt = render_for_completion(tok, tool_conversation("16-3-4", "7"))
    sequences, masks = engine.generate_batch(prompt, 2, max_tokens=30, temperature=0.0)
    completion = sequences[0][len(prompt):]
    sp = tok.encode_special
    forced = [sp("<|output_start|>"), *tok.encode("9"), sp("<|output_end|>")]
    start = completion.index(sp("<|python_end|>")) + 1
    assert completion[start:start + len(forced)] == forced
    assert masks[0][len(prompt):][start:start + len(forced)] == [0] * len(forced)
    assert masks[0][len(prompt):][:start] == [1] * start  # text and the python call were sampled
    assert tok.decode(completion[:start]) == "eggs: <|python_start|>16-3-4<|python_end|>"
    assert sequences[0] == sequences[1]


def test_failing_tool_call_forces_an_error_string_and_generation_goes_on():
    tok = tokenizer()
    model, _ = overfit(tool_conversation("1/0", "9"))
    engine = Engine(model, tok)
    prompt = render_for_completion(tok, tool_conversation("1/0", "9"))
    text = engine.complete(prompt, max_tokens=60, temperature=0.0)
    assert "<|python_end|><|output_start|>error: ZeroDivisionError: division by zero<|output_end|>" in text


def test_prompt_longer_than_the_window_is_a_user_error():
    tok = tokenizer()
    model = tiny_model(tok.vocab_size, seq_len=16)
    with pytest.raises(UserError, match="exceed"):
        Engine(model, tok).generate_batch([tok.bos_token_id] * 150, max_tokens=20)
