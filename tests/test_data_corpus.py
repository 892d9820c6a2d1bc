"""The sample corpus builder on three small real sources (public-domain Debian packages, ~1.7 MB).

The packages come from the package cache (~/.cache/nanochat-flow/packages), downloaded with
`apt-get download` the first time; on a machine without apt-get or registry access the test skips.
"""

from __future__ import annotations

import json
import os
import time

import pyarrow.parquet as pq
import pytest

from nanochat_core.data.corpus import build_corpus
from nanochat_core.data.packages import fetch
from nanochat_core.data.shards import ROW_GROUP_DOCS, list_shards
from nanochat_core.data.sources import SOURCES, sources_for
from nanochat_core.errors import UserError
from nanochat_core.paths import output_dir

SMALL = [s for s in SOURCES if s.name in ("devils-dictionary", "jargon", "fortunes")]


@pytest.fixture(scope="module")
def small_sources():
    try:
        for s in SMALL:
            fetch(s.package)
    except UserError as e:
        pytest.skip(f"packages unavailable here: {e}")
    return SMALL


def texts(url: str) -> list[str]:
    return pq.read_table(url).column("text").to_pylist()


def test_build_layout_manifest_and_determinism(small_sources, tmp_path):
    a = build_corpus(["lit"], 200_000, str(tmp_path / "a"), sources=small_sources)
    b = build_corpus(["lit"], 200_000, str(tmp_path / "b"), sources=small_sources)
    assert not a["cached"] and a["num_shards"] >= 6
    shards = list_shards(str(tmp_path / "a"))
    files = shards.train + [shards.val]
    assert len(files) == a["num_shards"] and shards.val.endswith(a["val_shard"])
    all_docs = []
    for url in files:
        pf = pq.ParquetFile(url)
        assert pf.schema_arrow.names == ["text"]
        assert all(pf.metadata.row_group(g).num_rows <= ROW_GROUP_DOCS for g in range(pf.metadata.num_row_groups))
        all_docs += texts(url)
    assert sum(map(len, all_docs)) == a["total_chars"] and len(all_docs) == a["total_docs"]
    # Same packages, same seed: byte-identical text in the same order.
    assert [texts(u) for u in files] == [texts(str(tmp_path / "b" / os.path.basename(u))) for u in files]
    assert a["key"] == b["key"] and [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]

    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert {s["name"] for s in manifest["sources"]} == {"devils-dictionary", "jargon", "fortunes"}
    assert all(s["license"] and s["chars"] > 0 and s["package_file"].endswith(".deb") for s in manifest["sources"])
    # Documents are shuffled across sources: the first shard mixes them.
    assert any("--" in d for d in texts(files[0])) and any("hacker" in d.lower() for d in texts(files[0]))


def test_second_build_is_cached_and_a_changed_setting_rebuilds(small_sources, tmp_path):
    out = str(tmp_path / "c")
    first = build_corpus(["lit"], 200_000, out, sources=small_sources)
    start = time.perf_counter()
    again = build_corpus(["lit"], 200_000, out, sources=small_sources)
    assert again["cached"] and again["key"] == first["key"]
    assert time.perf_counter() - start < 5  # a cache check, not a rebuild
    bigger = build_corpus(["lit"], 400_000, out, sources=small_sources)
    assert not bigger["cached"] and bigger["num_shards"] < first["num_shards"]
    # Shards of the earlier, larger build are gone, so the val shard is this build's last.
    assert len(list_shards(out).train) + 1 == bigger["num_shards"]


def test_a_deleted_shard_invalidates_the_cache(small_sources, tmp_path):
    out = tmp_path / "d"
    build_corpus(["lit"], 200_000, str(out), sources=small_sources)
    os.remove(out / "shard_00002.parquet")
    rebuilt = build_corpus(["lit"], 200_000, str(out), sources=small_sources)
    assert not rebuilt["cached"] and (out / "shard_00002.parquet").exists()


def test_tiers_select_sources():
    assert {s.tier for s in sources_for(["lit"])} == {"lit"}
    assert {s.tier for s in sources_for(["lit", "docs"])} == {"lit", "docs"}
    assert all(s.license for s in SOURCES)
    with pytest.raises(UserError, match="no corpus sources"):
        build_corpus([], 200_000, "/nonexistent")


@pytest.mark.slow
def test_tiny_preset_builds_the_corpus_and_downloads_from_it(capsys):
    """What the tiny speedrun does first: `corpus build` (lit tier), then `download` via file://."""
    from nanochat_core.paths import base_dir
    from nanochat_core.stages import corpus as corpus_stage
    from nanochat_core.stages import download as download_stage

    try:
        for s in sources_for(["lit"]):
            fetch(s.package)
    except UserError as e:
        pytest.skip(f"packages unavailable here: {e}")
    corpus_stage.main(["--preset", "tiny"])
    manifest = json.loads(open(os.path.join(base_dir(), "sample_corpus", "manifest.json")).read())
    assert manifest["total_chars"] > 30e6 and manifest["num_shards"] >= 6
    download_stage.main(["--preset", "tiny"])
    shards = list_shards(output_dir("download", None))
    assert len(shards.train) == 4 and shards.val.endswith(manifest["val_shard"])
    downloaded = json.loads(open(os.path.join(output_dir("download", None), "manifest.json")).read())
    corpus_sha = {s["index"]: s["sha256"] for s in manifest["shards"]}
    assert all(e["sha256"] == corpus_sha[e["index"]] for e in downloaded["shards"])
