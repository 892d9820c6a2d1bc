"""The cache key of each stage covers exactly the config it reads, and a stage alone reads the inputs the
flow hands it. Both read the records the session speedrun's stage processes left (conftest.first_run,
tests/config_audit/sitecustomize.py), so they cost no run of their own."""

from __future__ import annotations

import pytest

from nanochat_core.presets import tiny
from nanochat_core.registry import STAGES

pytestmark = pytest.mark.slow


def test_each_stage_reads_exactly_the_config_its_cache_key_covers(config_reads):
    read: dict[str, set[str]] = {}
    for record in config_reads:
        read.setdefault(record["stage"], set()).update(record["read"])
    assert set(read) == set(STAGES), "every stage of the tiny speedrun left a record"
    for stage, fields in sorted(read.items()):
        assert "*" not in fields, f"{stage} dumped the whole pipeline config"
        sections = {field.split(".")[0] for field in fields}
        assert sections == set(STAGES[stage].reads), (
            f"{stage} read {sorted(fields)}; its registry record declares {STAGES[stage].reads}")


def test_a_stage_alone_reads_the_inputs_the_flow_handed_it(first_run, config_reads, monkeypatch):
    from nanochat_core.registry import FAMILIES
    from nanochat_core.stage_args import resolve

    base = first_run[0]
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.delenv("NANOCHAT_INPUTS_PATH", raising=False)
    checked = set()
    for record in config_reads:
        stage, handed = record["stage"], record["inputs"]
        if stage == "report":  # gathers every ref; run alone it scans the base dir instead
            continue
        cfg = tiny()
        if stage == "chat_eval":  # which family it scored: the stage that wrote its model
            family = next(f for f, s in FAMILIES.items() if s.name == handed["model"]["stage"])
            cfg = cfg.model_copy(update={"chat_eval": cfg.chat_eval.model_copy(update={"source": family})})
        alone = resolve(stage, cfg)
        assert {k: r["path"] for k, r in alone.items()} == {k: r["path"] for k, r in handed.items()}, stage
        for name in handed:
            if name == "shards" and stage in ("tok_train", "tok_eval"):
                # The flow hands the tokenizer the first shards while the rest download; alone it gets the
                # directory's full list, which starts with those same shards (and reads them in order).
                first, full = sorted(handed[name]["manifest"]), sorted(alone[name]["manifest"])
                assert full[:len(first) - 1] == first[:-1] and full[-1] == first[-1], stage  # + the same val
            else:
                assert alone[name].get("digest") == handed[name].get("digest"), (stage, name)
        checked.add(stage)
    assert checked == set(STAGES) - {"report"}
