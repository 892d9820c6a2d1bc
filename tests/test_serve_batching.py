"""Batched decoding against decoding alone: `BatchDecoder` rows (prompts of mixed lengths that join and
leave mid-way) against `Engine.generate` on each prompt by itself, in fp32; the pool's concurrent
replies against the unbatched `reply_pieces`; a failed step that the replica survives."""

from __future__ import annotations

import asyncio

import pytest
import torch
from serve_fixtures import make_tiny_checkpoint, tiny_gpt, tiny_tokenizer

from nanochat_core.config import ServingConfig
from nanochat_core.engine import BatchDecoder, BatchRow, Engine
from nanochat_core.serve.generation import SamplingParams, chat_job, reply_pieces
from nanochat_core.serve.loading import load_replicas
from nanochat_core.serve.pool import ReplicaPool

TEXTS = ["Hi", "The quick brown fox jumps over", "json " * 20, "pathlib and regular expressions " * 6,
         "emoji 🙂🚀 日本語 café", "x"]


@pytest.fixture(autouse=True)
def one_thread():
    # These models are tiny: one torch thread is faster than two contending on the 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine():
    tok = tiny_tokenizer()
    return Engine(tiny_gpt(tok.vocab_size, seq_len=256, dim=128, n_kv_head=2, seed=3), tok)  # 4 heads, 2 kv: GQA


def prompts(tok) -> list[list[int]]:
    return [[tok.bos_token_id, *tok.encode(t)] for t in TEXTS]


def alone(engine, prompt, max_tokens, **sampling) -> list[int]:
    return [column[0] for column, _ in engine.generate(prompt, 1, max_tokens=max_tokens, **sampling)]


def run_staggered(engine, prompts_, budgets, sampling: dict, cancel: int | None = None) -> dict[int, list[int]]:
    """Rows join two steps apart (each after its own prefill); row `cancel` is removed after 5 tokens."""
    decoder = BatchDecoder(engine, max_rows=4)  # fewer rows than prompts: some wait for a free row
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts_))}
    waiting, steps = list(range(len(prompts_))), 0
    while waiting or len(decoder):
        if waiting and decoder.free and steps % 2 == 0:
            i = waiting.pop(0)
            first, _ = decoder.add(BatchRow(i, budgets[i], seed=100 + i, **sampling), prompts_[i])
            got[i].append(first.token)
        for e in decoder.step():
            got[e.key].append(e.token)
        steps += 1
        if cancel is not None and len(got[cancel]) >= 5:
            decoder.remove(cancel)
            cancel = None
    return got


def test_batched_rows_equal_each_row_alone_at_temperature_zero(engine):
    ps = prompts(engine.tokenizer)
    assert len({len(p) for p in ps}) == len(ps) and max(len(p) for p in ps) > 60  # a real mix of lengths
    budgets = [40, 25, 40, 12, 40, 33]
    got = run_staggered(engine, ps, budgets, {"temperature": 0.0}, cancel=2)
    for i, (p, n) in enumerate(zip(ps, budgets)):
        reference = alone(engine, p, n, temperature=0.0)
        if i == 2:  # removed mid-way: what it had so far is still the reference's beginning
            assert got[i] == reference[: len(got[i])] and len(got[i]) == 5
        else:
            assert got[i] == reference, f"row {i} (prompt of {len(p)} tokens) diverged from decoding alone"
    assert sum(map(len, got.values())) > 150  # the comparison covers many batched steps


def test_batched_logits_match_the_models_own_forward(engine):
    """Row by row, the batched step's logits are the full forward's last position (fp32: 1e-5)."""
    ps = prompts(engine.tokenizer)[:4]
    decoder = BatchDecoder(engine, max_rows=4)
    seqs = []
    for i, p in enumerate(ps):
        first, _ = decoder.add(BatchRow(i, 50), p)
        seqs.append([*p, first.token])
    for _ in range(6):
        ids = torch.tensor([r.pending for r in decoder.rows])
        pos = torch.tensor([r.length for r in decoder.rows])
        with torch.inference_mode():
            logits = decoder._forward(ids, pos)
            for r, row_logits in zip(decoder.rows, logits):
                r.length += 1
                full = engine.model(torch.tensor([seqs[r.key]]))[0, -1]
                torch.testing.assert_close(row_logits, full, atol=1e-5, rtol=1e-5)
        for e in decoder._emit(decoder.rows, logits):
            seqs[e.key].append(e.token)


def test_seeded_sampling_in_a_batch_is_the_sample_alone(engine):
    ps = prompts(engine.tokenizer)
    budgets = [30] * len(ps)
    sampling = {"temperature": 1.0, "top_k": 50}
    got = run_staggered(engine, ps, budgets, sampling)
    for i, p in enumerate(ps):
        assert got[i] == alone(engine, p, 30, seed=100 + i, **sampling)


def test_prompt_logprobs_and_budget(engine):
    tok = engine.tokenizer
    p = prompts(tok)[1]
    decoder = BatchDecoder(engine, max_rows=2)
    first, scored = decoder.add(BatchRow("a", 0), p, prompt_logprobs=3)
    assert first is None and not len(decoder)  # max_tokens 0: scored, never joins the batch
    with torch.inference_mode():
        logp = engine.model(torch.tensor([p]))[0].log_softmax(-1)
    assert scored[0] is None and len(scored) == len(p)
    for t, (lp, top) in enumerate(scored[1:], start=1):
        assert lp == pytest.approx(float(logp[t - 1, p[t]]), abs=1e-5)
        assert [i for i, _ in top] == logp[t - 1].topk(3).indices.tolist()
    with pytest.raises(Exception, match="window"):
        decoder.add(BatchRow("b", 300), p)


def test_pool_replies_concurrently_as_each_alone(tmp_path):
    """Six chat requests at once through the pool (one replica, one batch) stream exactly the pieces
    each gets from the unbatched reply_pieces, and in the same order."""
    make_tiny_checkpoint(str(tmp_path), seq_len=256, dim=128)
    (replica,) = load_replicas(ServingConfig().inference, root=str(tmp_path))
    assert replica.model.transformer.wte.weight.dtype == torch.float32
    questions = [[{"role": "user", "content": t}] for t in TEXTS]
    params = SamplingParams(temperature=0.0, max_tokens=40)
    expected = [list(reply_pieces(replica, q, params)) for q in questions]
    pool = ReplicaPool([replica], max_batch=8)

    async def one(q):
        return [item async for item in pool.stream(chat_job(replica.tokenizer, q, params, replica.context_len))]

    async def all_at_once():
        return await asyncio.gather(*(one(q) for q in questions))

    got = asyncio.run(all_at_once())
    assert got == expected
    assert sum(f[-1].completion_tokens for f in got) > 60
    stats = pool.stats()
    assert stats["completed"] == len(questions) and stats["available"] == 1 and stats["workers"][0]["rows"] == 0


def test_a_failed_step_is_reported_and_the_replica_recovers(tmp_path, monkeypatch):
    make_tiny_checkpoint(str(tmp_path), seq_len=128)
    (replica,) = load_replicas(ServingConfig().inference, root=str(tmp_path))
    pool = ReplicaPool([replica])
    step = BatchDecoder.step
    calls = {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return step(self)

    monkeypatch.setattr(BatchDecoder, "step", flaky)
    question = [{"role": "user", "content": "Hello"}]
    params = SamplingParams(temperature=0.0, max_tokens=20)

    async def reply():
        return [item async for item in pool.stream(chat_job(replica.tokenizer, question, params, replica.context_len))]

    with pytest.raises(RuntimeError, match="simulated"):
        asyncio.run(reply())
    again = asyncio.run(reply())
    assert again == list(reply_pieces(replica, question, params))
    assert pool.stats()["failed"] == 1
