"""Canonical shards: layout, listing, and the rank-strided, exactly resumable row-group iterator."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from itertools import islice

import pyarrow.parquet as pq
import pytest

from nanochat_core.data.shards import (
    Position,
    ShardSet,
    iter_row_groups,
    list_shards,
    shard_name,
    write_shards,
)
from nanochat_core.errors import UserError


def docs(n: int) -> list[str]:
    return [f"document {i} " + "x" * (i % 37) for i in range(n)]


def test_shard_name():
    assert shard_name(0) == "shard_00000.parquet"
    assert shard_name(1822) == "shard_01822.parquet"


def test_write_shards_layout(tmp_path):
    all_docs = docs(5000)
    urls = write_shards(all_docs, str(tmp_path), shard_chars=60_000)
    assert [os.path.basename(u) for u in urls] == [shard_name(i) for i in range(len(urls))]
    back = []
    for url in urls:
        pf = pq.ParquetFile(url)
        assert pf.schema_arrow.names == ["text"]
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        assert all(s == 1024 for s in sizes[:-1]) and 0 < sizes[-1] <= 1024
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
        back += pf.read().column("text").to_pylist()
    assert back == all_docs  # order kept, nothing lost or duplicated
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_write_shards_tail_never_makes_a_sliver_val(tmp_path):
    # 10 docs of 100 chars, shards of 300: 3 full shards and a 1-doc tail that joins the last one.
    urls = write_shards(["y" * 100] * 10, str(tmp_path), shard_chars=300)
    rows = [pq.ParquetFile(u).metadata.num_rows for u in urls]
    assert rows == [3, 3, 4]
    # A tail of at least half a shard stands as its own (val) shard.
    urls = write_shards(["y" * 100] * 11, str(tmp_path / "b"), shard_chars=300)
    assert [pq.ParquetFile(u).metadata.num_rows for u in urls] == [3, 3, 3, 2]


def test_list_shards_val_is_highest_and_ignores_other_files(tmp_path):
    write_shards(docs(400), str(tmp_path), shard_chars=3_000)
    (tmp_path / "shard_00099.parquet.tmp-123-abcdef12").write_bytes(b"partial")
    (tmp_path / "manifest.json").write_text("{}")
    shards = list_shards(str(tmp_path))
    assert isinstance(shards, ShardSet)
    assert shards.train == sorted(shards.train) and shards.val > shards.train[-1]
    names = [os.path.basename(u) for u in shards.train + [shards.val]]
    assert names == sorted(n for n in os.listdir(tmp_path) if n.endswith(".parquet"))


def test_list_shards_names_the_empty_directory(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)):
        list_shards(str(tmp_path))
    with pytest.raises(UserError, match="missing"):
        list_shards(str(tmp_path / "missing"))


@pytest.fixture
def files(tmp_path):
    """Shards of uneven row-group counts: 3, 1, 2 row groups (1024 docs each, short last ones)."""
    counts = [3 * 1024 - 5, 1000, 2 * 1024]
    urls, start = [], 0
    for i, n in enumerate(counts):
        url = str(tmp_path / shard_name(i))
        write_shards([f"{start + k}" for k in range(n)], str(tmp_path / f"s{i}"), shard_chars=10**9)
        os.replace(tmp_path / f"s{i}" / shard_name(0), url)
        urls.append(url)
        start += n
    return urls


def global_row_groups(files) -> list[tuple[int, int]]:
    return [(f, g) for f, url in enumerate(files) for g in range(pq.ParquetFile(url).metadata.num_row_groups)]


def first_doc_to_group(files) -> dict[str, tuple[int, int]]:
    return {pq.ParquetFile(u).read_row_group(g).column("text")[0].as_py(): (f, g)
            for f, u in enumerate(files) for g in range(pq.ParquetFile(u).metadata.num_row_groups)}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_stride_across_files_and_partition_each_epoch(files, world):
    groups = global_row_groups(files)  # 6 row groups in all
    where = first_doc_to_group(files)
    seen = []
    for rank in range(world):
        got = [where[texts[0]] for texts, _ in iter_row_groups(files, rank, world)]
        assert got == groups[rank::world]  # rank r reads global row groups r, r+W, ...
        seen += got
    assert sorted(seen) == groups  # every row group read by exactly one rank


def test_positions_point_at_the_next_row_group_and_bump_epochs(files):
    items = list(islice(iter_row_groups(files, rank=1, world=2, loop=True), 7))
    positions = [pos for _, pos in items]
    # rank 1 of 2 reads global groups 1, 3, 5 = (0,1), (1,0), (2,1); then epoch 2 starts again.
    assert positions[:3] == [Position(1, 0, 1), Position(2, 1, 1), Position(0, 1, 2)]
    assert positions[3:6] == [Position(1, 0, 2), Position(2, 1, 2), Position(0, 1, 3)]
    assert json.loads(json.dumps(asdict(positions[0]))) == {"file_index": 1, "row_group": 0, "epoch": 1}


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 0), (2, 1), (3, 2)])
def test_resume_from_any_position_is_exact(files, world, rank):
    reference = list(islice(iter_row_groups(files, rank, world, loop=True), 12))
    for k, (_, pos) in enumerate(reference):
        resumed = list(islice(iter_row_groups(files, rank, world, start=pos, loop=True), 12 - k - 1))
        assert resumed == reference[k + 1 :]


def test_without_loop_one_pass_then_stop(files):
    passes = list(iter_row_groups(files))
    assert len(passes) == 6 and passes[-1][1] == Position(0, 0, 2)
    # Resuming from the last position of a pass reads the whole next pass.
    assert len(list(iter_row_groups(files, start=passes[-1][1]))) == 6


def test_rank_without_row_groups_is_a_clear_error(files):
    with pytest.raises(UserError, match="rank 6 of 7 has no row group"):
        next(iter_row_groups(files, rank=6, world=7, loop=True))
    with pytest.raises(UserError, match="no shard files"):
        next(iter_row_groups([]))


def test_corrupt_shard_is_a_clear_error(files):
    with open(files[1], "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match="shard_00001.parquet is not a readable parquet file"):
        list(iter_row_groups(files))
