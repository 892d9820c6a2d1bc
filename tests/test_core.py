"""CORE scoring: the three task types on hand-made examples with a model whose answers are forced,
the centering arithmetic, few-shot rendering, bad task files, rank striping over gloo, and the
random-model sanity check (CORE ~ 0)."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from nanochat_core.errors import UserError
from nanochat_core.evaluation import core_metrics, evaluate_core, format_core_csv, format_core_table
from nanochat_core.evaluation.bundle import TaskSpec, core_yaml, jsonl, load_examples, load_tasks, meta_csv
from nanochat_core.evaluation.core import (
    centered,
    crop_left,
    encode_example,
    fewshot_for,
    render_language_modeling,
    render_multiple_choice,
    render_schema,
    score_example,
)
from nanochat_core.model.gpt import GPTConfig, build_model
from nanochat_core.presets import get_preset


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and BOS = 256: the Tokenizer interface CORE uses, with token
    boundaries a test can count by hand."""

    vocab_size = 257
    bos_token_id = 256

    def encode(self, text, prepend=None, num_threads=8):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        return ([prepend] if prepend is not None else []) + list(text.encode("utf-8"))


class BigramStub(torch.nn.Module):
    """Forced answers: after byte `a` the model puts logit 10 on `table[a]` and 0 elsewhere."""

    def __init__(self, table: dict[str, str], vocab_size: int = 257):
        super().__init__()
        self.next = torch.full((vocab_size,), -1, dtype=torch.long)
        for prev, nxt in table.items():
            self.next[ord(prev)] = ord(nxt)
        self.vocab_size = vocab_size

    def forward(self, idx):  # (B, T) -> (B, T, V)
        logits = torch.zeros(*idx.shape, self.vocab_size)
        favoured = self.next[idx]
        b, t = (favoured >= 0).nonzero(as_tuple=True)
        logits[b, t, favoured[b, t]] = 10.0
        return logits


@pytest.fixture(autouse=True)
def _one_thread():
    # Scoring is one small forward per example: on a shared 2-core machine a second intra-op thread
    # mostly waits at barriers (measured 8x slower per forward under load), so use one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TOK = ByteTokenizer()
MC = TaskSpec("mc", "x/mc.jsonl", "multiple_choice", 0, " ", 25.0)
SCHEMA = TaskSpec("schema", "x/schema.jsonl", "schema", 0, " ", 50.0)
LM = TaskSpec("lm", "x/lm.jsonl", "language_modeling", 0, " ", 0.0)


def score(model, item, task, shots=()):
    return score_example(model, encode_example(item, task, list(shots), TOK), task.task_type, TOK.bos_token_id, "cpu")


# --- the three task types ---------------------------------------------------------------------


def test_multiple_choice_picks_the_choice_the_model_prefers():
    model = BigramStub({"a": "c"})
    # All choices share "a"; only the last byte is scored, and the model expects "c" after "a".
    assert score(model, {"query": "Q", "choices": ["ab", "ac", "ad"], "gold": 1}, MC)
    assert not score(model, {"query": "Q", "choices": ["ab", "ac", "ad"], "gold": 0}, MC)


def test_multiple_choice_compares_mean_not_total_loss():
    # "kc": one surprising token then an expected one; "z": one surprising token. Mean loss prefers
    # "kc" ((bad + good) / 2 < bad), total loss would prefer "z" (bad < bad + good).
    model = BigramStub({"k": "c"})
    assert score(model, {"query": "Q", "choices": ["z", "kc"], "gold": 1}, MC)


def test_schema_picks_the_context_under_which_the_continuation_is_likely():
    model = BigramStub({"b": " "})
    item = {"context_options": ["xa", "xb"], "continuation": "z", "gold": 1}
    enc = encode_example(item, SCHEMA, [], TOK)
    # The shared suffix " z" is what is scored, in both rows.
    assert [e - s for s, e in zip(enc.starts, enc.ends)] == [2, 2]
    assert score(model, item, SCHEMA)
    assert not score(model, {**item, "gold": 0}, SCHEMA)


def test_language_modeling_needs_every_continuation_token_greedy():
    item = {"context": "abc ", "continuation": "de"}
    assert score(BigramStub({"c": " ", " ": "d", "d": "e"}), item, LM)
    assert not score(BigramStub({"c": " ", " ": "d", "d": "f"}), item, LM)  # last token wrong
    assert not score(BigramStub({"c": "x", " ": "d", "d": "e"}), item, LM)  # the delimiter is scored too


def test_language_modeling_scores_exactly_the_continuation_span():
    enc = encode_example({"context": "  abc  ", "continuation": "de"}, LM, [], TOK)
    # BOS + "abc" is the stripped prompt; " de" (delimiter + continuation) is scored.
    assert enc.rows == [[256, *b"abc de"]]
    assert (enc.starts, enc.ends) == ([4], [7])


def test_cropping_keeps_the_scored_span():
    enc = encode_example({"query": "long question", "choices": ["yes", "no"], "gold": 0}, MC, [], TOK)
    cropped = crop_left(enc, 6)
    assert all(len(r) <= 6 for r in cropped.rows)
    for row, s, e, full, fs in zip(cropped.rows, cropped.starts, cropped.ends, enc.rows, enc.starts):
        assert row[s:e] == full[fs:]


# --- prompts ----------------------------------------------------------------------------------


def test_fewshot_prompts_are_rendered_with_gold_answers_and_blank_lines():
    shots = [{"query": "Q1", "choices": ["a", "b"], "gold": 1}, {"query": "Q2", "choices": ["c", "d"], "gold": 0}]
    item = {"query": "Q3", "choices": ["e", "f"], "gold": 0}
    assert render_multiple_choice(item, "\nAnswer: ", shots) == [
        "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQ3\nAnswer: e",
        "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQ3\nAnswer: f",
    ]
    assert render_schema({"context_options": ["x", "y"], "continuation": "z", "gold": 0}, " ",
                         [{"context_options": ["p", "q"], "continuation": "r", "gold": 1}]) == ["q r\n\nx z", "q r\n\ny z"]
    assert render_language_modeling({"context": " c ", "continuation": "d"}, " ", [{"context": "a", "continuation": "b"}]) == (
        "a b\n\nc",
        "a b\n\nc d",
    )


def test_fewshot_examples_are_fixed_per_example_and_exclude_it():
    rows = [{"i": i} for i in range(50)]
    for idx in (0, 7, 49):
        shots = fewshot_for(rows, idx, 10)
        assert shots == fewshot_for(rows, idx, 10)
        assert rows[idx] not in shots and len(shots) == 10
        others = [i for i in range(50) if i != idx]
        assert shots == [rows[i] for i in random.Random(1234 + idx).sample(others, 10)]
    assert fewshot_for(rows, 3, 0) == []


# --- centering and the whole suite ------------------------------------------------------------


def test_centered_accuracy_arithmetic():
    assert centered(0.25, 0.25) == 0.0
    assert centered(1.0, 0.25) == 1.0
    assert math.isclose(centered(0.5, 0.25), 1 / 3)
    assert math.isclose(centered(0.5, 0.62), -0.12 / 0.38)
    assert centered(0.3, 0.0) == 0.3


def write_bundle(root: Path, tasks: dict[TaskSpec, list[dict]]) -> str:
    for task, rows in tasks.items():
        path = root / "eval_data" / task.dataset_uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(jsonl(rows))
    (root / "eval_meta_data.csv").write_text(meta_csv(list(tasks)))
    (root / "core.yaml").write_text(core_yaml(list(tasks)))
    return str(root)


def test_evaluate_core_averages_centered_accuracies(tmp_path):
    model = BigramStub({"a": "c", "b": " ", "c": " ", " ": "d", "d": "e"})
    bundle = write_bundle(
        tmp_path,
        {
            # accuracy 2/4 against chance 0.25 -> centered 1/3
            MC: [{"query": "Q", "choices": ["ab", "ac", "ad", "aa"], "gold": g} for g in (1, 1, 0, 2)],
            # accuracy 1/2 against 0.5 -> 0
            SCHEMA: [{"context_options": ["xa", "xb"], "continuation": "z", "gold": g} for g in (0, 1)],
            # accuracy 1/2 against 0 -> 0.5
            LM: [{"context": "abc", "continuation": "de"}, {"context": "abc", "continuation": "df"}],
        },
    )
    result = evaluate_core(model, TOK, bundle)
    tasks = result["tasks"]
    assert (tasks["mc"]["accuracy"], tasks["schema"]["accuracy"], tasks["lm"]["accuracy"]) == (0.5, 0.5, 0.5)
    assert math.isclose(tasks["mc"]["centered"], 1 / 3) and tasks["schema"]["centered"] == 0.0
    assert math.isclose(result["core"], (1 / 3 + 0 + 0.5) / 3)
    assert result["num_tasks"] == 3 and tasks["mc"]["examples"] == 4
    # binomial standard errors: sqrt(.25/4)/.75, sqrt(.25/2)/.5, sqrt(.25/2), averaged in quadrature
    assert math.isclose(result["core_stderr"], math.sqrt(0.25 / 4 / 0.75**2 + 0.25 / 2 / 0.25 + 0.25 / 2) / 3)
    table = format_core_table(result)
    assert table.splitlines()[-1] == f"CORE: {result['core']:.4f}"
    assert re.fullmatch(r"CORE: -?\d\.\d{4}", table.splitlines()[-1])
    assert format_core_csv(result).splitlines()[-1].startswith("CORE,")
    assert table.splitlines()[-2] == "over 3 of 22 tasks"  # a bundle without a manifest names nothing missing
    assert core_metrics(result) == {"eval/core": result["core"], "eval/core_tasks": 3,
                                    **{f"eval/{k}": r["centered"] for k, r in tasks.items()}}
    # max_per_task: the same fixed shuffle, then the first N
    assert evaluate_core(model, TOK, bundle, max_per_task=1)["tasks"]["mc"]["examples"] == 1


# --- bad input --------------------------------------------------------------------------------


def test_missing_field_names_the_file_and_line(tmp_path):
    bundle = write_bundle(tmp_path, {MC: [{"query": "Q", "choices": ["a", "b"], "gold": 0}, {"query": "Q", "choices": ["a", "b"]}]})
    with pytest.raises(UserError, match=r"mc\.jsonl line 2 has no 'gold' field"):
        evaluate_core(BigramStub({}), TOK, bundle)


def test_unknown_task_type_names_core_yaml(tmp_path):
    bundle = write_bundle(tmp_path, {MC: [{"query": "Q", "choices": ["a", "b"], "gold": 0}]})
    (tmp_path / "core.yaml").write_text((tmp_path / "core.yaml").read_text().replace("multiple_choice", "essay"))
    with pytest.raises(UserError, match=r"core\.yaml: task 'mc' has unknown icl_task_type 'essay'"):
        load_tasks(bundle)


def test_malformed_rows_name_the_file(tmp_path):
    bundle = write_bundle(tmp_path, {LM: [{"context": "a", "continuation": "b"}]})
    path = tmp_path / "eval_data" / LM.dataset_uri
    path.write_text('{"context": "a", "continuation": "b"}\n{not json\n')
    with pytest.raises(UserError, match=r"lm\.jsonl line 2 is not valid JSON"):
        load_examples(bundle, LM)
    path.write_text('{"context": "a", "continuation": 3}\n')
    with pytest.raises(UserError, match=r"lm\.jsonl line 1: 'continuation' should be a str"):
        load_examples(bundle, LM)
    bundle = write_bundle(tmp_path, {MC: [{"query": "Q", "choices": ["a", "b"], "gold": 2}]})
    with pytest.raises(UserError, match=r"mc\.jsonl line 1: gold 2 is not an index"):
        load_examples(bundle, MC)


def test_missing_bundle_says_how_to_build_it(tmp_path):
    with pytest.raises(UserError, match="nanochat eval-bundle build"):
        evaluate_core(BigramStub({}), TOK, str(tmp_path / "nowhere"))


# --- a real random model ----------------------------------------------------------------------


def tiny_random_model(seed: int = 0):
    b = get_preset("tiny").base_train
    torch.manual_seed(seed)
    return build_model(GPTConfig.from_depth(b.depth, 4096, b.max_seq_len, b.aspect_ratio, b.head_dim))


def synthetic_bundle(root: Path, n: int = 120) -> str:
    """Chance-level tasks of each type over random words: nothing a random model could know."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7))) for _ in range(400)]
    sentence = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    mc = TaskSpec("mc4", "s/mc4.jsonl", "multiple_choice", 2, "\nAnswer: ", 25.0)
    sc = TaskSpec("schema2", "s/schema2.jsonl", "schema", 0, " ", 50.0)
    lm = TaskSpec("lm", "s/lm.jsonl", "language_modeling", 2, " ", 0.0)
    return write_bundle(
        root,
        {
            mc: [{"query": sentence(8), "choices": [sentence(2) for _ in range(4)], "gold": rng.randrange(4)} for _ in range(n)],
            sc: [{"context_options": [sentence(5), sentence(5)], "continuation": sentence(3), "gold": rng.randrange(2)} for _ in range(n)],
            lm: [{"context": sentence(8), "continuation": sentence(1)} for _ in range(n // 4)],
        },
    )


def test_random_init_tiny_model_scores_core_near_zero(tmp_path):
    result = evaluate_core(tiny_random_model(), TOK, synthetic_bundle(tmp_path))
    # 120 examples per task: centered accuracy has a standard error of ~0.05 (MC) / ~0.09 (schema),
    # so CORE (their mean with the LM task's exact 0) has ~0.035; 0.12 is a 3.4-sigma bound.
    assert abs(result["core"]) < 0.12, format_core_table(result)
    assert result["tasks"]["lm"]["accuracy"] == 0.0


def _striped_worker(rank: int, world: int, port: int, bundle: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        result = evaluate_core(tiny_random_model(), TOK, bundle, max_per_task=24)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
        # Both ranks reach teardown together: gloo aborted rank 0 ("terminate called without an active
        # exception", SIGABRT) once in two full suites when it tore down while rank 1 was still at work.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_striping_gives_the_same_result_on_1_and_2_gloo_processes(tmp_path):
    bundle = synthetic_bundle(tmp_path / "bundle", n=24)
    single = evaluate_core(tiny_random_model(), TOK, bundle, max_per_task=24)
    out = tmp_path / "striped.json"
    mp.start_processes(_striped_worker, args=(2, free_port(), bundle, str(out)), nprocs=2, start_method="spawn")
    striped = json.loads(out.read_text())
    for label, r in single["tasks"].items():
        assert striped["tasks"][label]["accuracy"] == r["accuracy"], label
    assert striped["core"] == single["core"]


def test_evaluate_core_leaves_the_model_in_training_mode_if_it_was(tmp_path):
    model = tiny_random_model()
    model.train()
    evaluate_core(model, TOK, synthetic_bundle(tmp_path, n=8), max_per_task=4)
    assert model.training
    model.eval()
    evaluate_core(model, TOK, str(tmp_path), max_per_task=4)
    assert not model.training


def test_a_bundle_behind_an_fsspec_url_scores_like_a_local_one(tmp_path):
    from nanochat_core import storage

    local = synthetic_bundle(tmp_path / "local", n=8)
    url = f"memory://core-test-{tmp_path.name}"
    for f in Path(local).rglob("*"):
        if f.is_file():
            storage.write_bytes(f"{url}/{f.relative_to(local)}", f.read_bytes())
    model = BigramStub({"a": "b", "e": " "})
    remote, here = evaluate_core(model, TOK, url), evaluate_core(model, TOK, local)
    assert {k: r["accuracy"] for k, r in remote["tasks"].items()} == {k: r["accuracy"] for k, r in here["tasks"].items()}
    assert remote["num_tasks"] == 3 and remote["core"] == here["core"]
