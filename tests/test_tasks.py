"""Task loaders on the packaged data (counts and one exact example each), scoring on known answers,
mixtures, users' JSONL files, and the parquet code path that users with internet take."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chat_fixtures import tokenizer
from nanochat_core.chat_format import render_conversation
from nanochat_core.errors import UserError
from nanochat_core.tasks import TaskMixture, TaskSequence, build_task, extract_answer
from nanochat_core.tasks.chat import Chatterbot, CustomJSON, Identity, SmolTalk
from nanochat_core.tasks.code import HumanEval, extract_program
from nanochat_core.tasks.math import GSM8K, SyntheticMath, answer_parts, synthetic_problem
from nanochat_core.tasks.multiple_choice import ARC, MMLU, parse_arc_query
from nanochat_core.tasks.spelling import SimpleSpelling, SpellingBee, split_words

# --- packaged data: counts and one exact example -------------------------------------------------


def test_gsm8k_test_split_and_tool_calls():
    task = GSM8K("test")
    assert len(task) == 1319
    conv = task[0]
    assert conv["messages"][0]["content"].startswith("Janet’s ducks lay 16 eggs per day.")
    assert conv["messages"][1]["content"][:3] == [
        {"type": "text", "text": "Janet sells 16 - 3 - 4 = "},
        {"type": "python", "text": "16-3-4"}, {"type": "python_output", "text": "9"}]
    assert task.evaluate(conv, "so she makes\n#### 18") == 1
    assert task.evaluate(conv, "#### 17") == 0
    assert task.evaluate(conv, "eighteen dollars") == 0


def test_arc_and_mmlu_counts_and_examples():
    easy, challenge = ARC("ARC-Easy"), ARC("ARC-Challenge")
    assert (len(easy), len(challenge)) == (2376, 1172)
    conv = easy[0]
    assert conv["letters"] == ["A", "B", "C", "D"] and conv["messages"][1]["content"] == "A"
    assert "- Sunlight is the source of energy for nearly all ecosystems.=A" in conv["messages"][0]["content"]
    assert easy.evaluate(conv, "A") == 1 and easy.evaluate(conv, "B") == 0
    assert len(MMLU("test")) == 14042
    algebra = MMLU("test", subjects=["abstract_algebra"])
    assert len(algebra) == 100 and algebra[0]["messages"][1]["content"] == "B"
    assert "- 4=B" in algebra[0]["messages"][0]["content"]
    with pytest.raises(UserError, match="unknown MMLU subject"):
        MMLU("test", subjects=["astrology"])


def test_parse_arc_query_keeps_multiline_questions_and_five_choices():
    q, choices = parse_arc_query("Question: Line one\nline two?\n A. x\n B. y y\n C. z\n D. w\n E. v\nAnswer:")
    assert q == "Line one\nline two?" and choices == ["x", "y y", "z", "w", "v"]


def test_humaneval_chatterbot_identity_counts():
    he = HumanEval()
    assert len(he) == 164 and he[0]["task_id"] == "HumanEval/0" and he[0]["entry_point"] == "has_close_elements"
    chat = Chatterbot()
    assert len(chat) == 2026  # every English conversation has a reply
    assert chat[0]["messages"] == [
        {"role": "user", "content": "What is AI?"},
        {"role": "assistant", "content": "Artificial Intelligence is the branch of engineering and science devoted "
                                         "to constructing machines that think."}]
    ident = Identity()
    assert len(ident) == 24
    for conv in ident:
        render_conversation(tokenizer(), conv)  # every shipped conversation renders


def test_spelling_tasks_from_the_word_list():
    train, test = split_words("train"), split_words("test")
    assert len(train) > 40_000 and len(test) > 4_000 and not set(train) & set(test)
    bee = SpellingBee(50, "test", seed=1)
    assert len(bee) == 50 and bee[3] == SpellingBee(50, "test", seed=1)[3]  # deterministic per index
    for conv in bee:
        assert conv["word"] in test
        assert bee.evaluate(conv, f"#### {conv['word'].count(conv['letter'])}") == 1
    simple = SimpleSpelling(5, "train")
    word = simple[0]["messages"][1]["content"].split(":")[0]
    assert simple[0]["messages"][1]["content"] == f"{word}:{','.join(word)}" and word in train


def test_words_from_a_user_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("apple\nBanana\ncherry's\nkiwi\nab\ndate\n")
    assert set(split_words("train", str(path))) | set(split_words("test", str(path))) == {"apple", "kiwi", "date"}


# --- scoring and formats -------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("so #### 18", "18"), ("#### 1,234", "1234"), ("#### -7.", "-7"), ("#### 3\n#### 4", "4"), ("no answer", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_synthetic_math_is_consistent_and_deterministic():
    import re

    for seed in range(200):
        question, answer, final = synthetic_problem(seed)
        assert answer.endswith(f"#### {final}") and final >= 0
        for expr, result in re.findall(r"<<([^=]+)=([^>]+)>>", answer):
            value = eval(expr)  # our own generated arithmetic, not user input
            assert float(result) == value, (seed, expr, result)
    assert SyntheticMath(10, seed=1)[4] == SyntheticMath(10, seed=1)[4] != SyntheticMath(10, seed=2)[4]
    parts = answer_parts("a <<2*3=6>>6 b <<7>> c")
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text", "text", "text"]


def test_extract_program_prefers_a_code_block():
    prompt = "def f(x):\n"
    assert extract_program(prompt, "    return x\n") == "def f(x):\n    return x\n"
    assert extract_program(prompt, "Here:\n```python\ndef f(x):\n    return 2\n```") == "def f(x):\n    return 2\n"


# --- slicing and combining -------------------------------------------------------------------------


def test_slicing_mixture_and_sequence():
    a, b = SyntheticMath(10, seed=1), SyntheticMath(6, seed=2)
    sliced = SyntheticMath(10, seed=1, start=2, stop=9, step=3)
    assert len(sliced) == 3 and sliced[1] == a[5] and sliced[-1] == a[8]
    with pytest.raises(IndexError):
        sliced[3]
    seq = TaskSequence([a, b])
    assert len(seq) == 16 and seq[10] == b[0] and seq[9] == a[9]
    mix1, mix2 = TaskMixture([a, b], seed=7), TaskMixture([a, b], seed=7)
    assert [mix1[i] for i in range(16)] == [mix2[i] for i in range(16)]
    assert sorted(json.dumps(mix1[i]) for i in range(16)) == sorted(json.dumps(seq[i]) for i in range(16))
    assert [mix1[i] for i in range(16)] != [seq[i] for i in range(16)]


# --- users' files and the parquet path -------------------------------------------------------------


def test_custom_json_and_line_numbered_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                    + "\n\n" + json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) + "\n")
    assert len(CustomJSON(str(good))) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + "{not json\n")
    with pytest.raises(UserError, match="line 4 is not valid JSON"):
        CustomJSON(str(bad))
    order = tmp_path / "order.jsonl"
    order.write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(UserError, match="line 1: message 0 has role 'assistant'"):
        CustomJSON(str(order))
    with pytest.raises(UserError, match="does not exist"):
        CustomJSON(str(tmp_path / "missing.jsonl"))


def test_parquet_loaders_read_local_files(tmp_path):
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi!"}]
    pq.write_table(pa.table({"messages": [msgs, msgs[:1] + [{"role": "assistant", "content": "hey"}]]}),
                   tmp_path / "smol.parquet")
    assert SmolTalk(source=str(tmp_path / "smol.parquet"))[1]["messages"][1]["content"] == "hey"
    pq.write_table(pa.table({"question": ["2+3?"], "answer": ["2+3 = <<2+3=5>>5\n#### 5"]}), tmp_path / "gsm.parquet")
    conv = build_task(f"gsm8k-train@{tmp_path / 'gsm.parquet'}")[0]
    assert conv["messages"][1]["content"][1] == {"type": "python", "text": "2+3"}
    aux = {"train": [{"question": "q?", "subject": "", "choices": ["x", "y"], "answer": 1}]}
    pq.write_table(pa.table(aux), tmp_path / "aux.parquet")
    assert build_task(f"mmlu-aux@{tmp_path / 'aux.parquet'}")[0]["messages"][1]["content"] == "B"
    arc = {"id": ["a1"], "question": ["Why?"], "choices": [{"text": ["no", "yes", "maybe"], "label": ["1", "2", "3"]}],
           "answerKey": ["2"]}
    pq.write_table(pa.table(arc), tmp_path / "arc.parquet")
    conv = build_task(f"arc-easy-train@{tmp_path / 'arc.parquet'}")[0]
    assert conv["letters"] == ["A", "B", "C"] and conv["messages"][1]["content"] == "B"
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="is not a parquet file"):
        SmolTalk(source=str(tmp_path / "junk.parquet"))


def test_build_task_specs():
    assert len(build_task("math:30")) == 30 and len(build_task("identity:5")) == 5
    for spec, message in [("nonsense", "unknown task"), ("math:lots", "not a number"), ("custom", "needs a file")]:
        with pytest.raises(UserError, match=message):
            build_task(spec)


def test_humaneval_scores_in_the_sandbox():
    task = HumanEval(stop=3)
    for conv in task:
        body = conv["messages"][1]["content"][len(conv["prompt"]):]
        assert task.evaluate(conv, body) == 1  # the canonical solution passes its tests
        assert task.evaluate(conv, "    return None\n") == 0
    assert task.evaluate(task[0], "```python\nimport os\nos.system('true')\n```") == 0


def test_remote_urls_go_through_the_local_file_cache(tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv("NANOCHAT_FLOW_CACHE", str(tmp_path / "cache"))
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi!"}]
    pq.write_table(pa.table({"messages": [msgs]}), tmp_path / "smol.parquet")
    fs = fsspec.filesystem("memory")
    fs.pipe("/nanochat-test/smol.parquet", (tmp_path / "smol.parquet").read_bytes())
    try:
        assert SmolTalk(source="memory://nanochat-test/smol.parquet")[0]["messages"] == msgs
        assert any((tmp_path / "cache" / "task_data").iterdir())  # downloaded once, kept locally
        assert SmolTalk(source=f"file://{tmp_path / 'smol.parquet'}")[0]["messages"] == msgs
    finally:
        fs.rm("/nanochat-test", recursive=True)
