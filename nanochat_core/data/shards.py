"""Pretraining shards: the canonical layout, writing it, listing it, and reading it rank by rank.

A shard is `shard_{index:05d}.parquet` with one `text` column in row groups of 1,024 documents,
zstd-compressed: the layout of the FineWeb-Edu shards nanochat trains on, so the sample corpus and a
real download are read by the same code. The highest index in a directory is the validation shard.

The loader reads row groups, not files: rank r of W reads row groups r, r+W, r+2W, ... counted
across the files in order, and every yielded row group comes with the `Position` to resume from,
which the checkpoint stores so a resumed run reads exactly the row groups an uninterrupted one would.
Shards on an object store are read from a local copy fetched once per node (`open_parquet`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat_core import storage
from nanochat_core.errors import UserError
from nanochat_core.paths import join

ROW_GROUP_DOCS = 1024
SHARD_RE = re.compile(r"^shard_(\d{5})\.parquet$")
SCHEMA = pa.schema([("text", pa.string())])


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def shard_index(name_or_url: str) -> int | None:
    """The index in a canonical shard name (or URL ending in one), else None."""
    m = SHARD_RE.match(name_or_url.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def write_shard(docs: list[str], url: str) -> int:
    """One canonical shard, written atomically; returns its size in bytes."""
    table = pa.Table.from_pydict({"text": docs}, schema=SCHEMA)
    with storage.atomic_open(url, "wb") as f:
        pq.write_table(table, f, row_group_size=ROW_GROUP_DOCS, compression="zstd")
        nbytes = f.tell()
    return nbytes


def write_shards(docs: Iterable[str], out_dir: str, shard_chars: int) -> list[str]:
    """Pack documents in order into shards of about `shard_chars` characters; the last one is val.

    A shard closes once it holds `shard_chars` characters. The tail left at the end joins the last
    full shard when it is under half a shard, so the val shard is never a sliver of a few documents.
    Returns the shard URLs in index order.
    """
    if shard_chars < 1:
        raise UserError(f"shard_chars must be positive, got {shard_chars}; pass e.g. --shard-chars 2000000")
    urls: list[str] = []
    held: list[str] | None = None  # the last full shard, kept back until we know the tail's size
    current: list[str] = []
    chars = 0

    def flush(batch: list[str]) -> None:
        url = join(out_dir, shard_name(len(urls)))
        write_shard(batch, url)
        urls.append(url)

    for doc in docs:
        current.append(doc)
        chars += len(doc)
        if chars >= shard_chars:
            if held is not None:
                flush(held)
            held, current, chars = current, [], 0
    if held is not None and current and chars < shard_chars // 2:
        held, current = held + current, []
    for batch in (held, current):
        if batch:
            flush(batch)
    if not urls:
        raise UserError(f"no documents to write into {out_dir}; check the corpus sources")
    return urls


@dataclass
class ShardSet:
    train: list[str]
    val: str


def list_shards(data_dir: str) -> ShardSet:
    """The canonical shards in `data_dir` (path or URL), sorted; the highest index is val."""
    names = [n for n in storage.listdir(data_dir) if SHARD_RE.match(n)]
    if not names:
        raise UserError(
            f"no shards (shard_NNNNN.parquet) in {data_dir}; run `nanochat download` "
            "(or `nanochat corpus build` for the sample corpus) first"
        )
    urls = [join(data_dir, n) for n in sorted(names)]
    return ShardSet(train=urls[:-1], val=urls[-1])


def shards_of(ref: dict) -> ShardSet:
    """The shards a `shards` input ref holds: exactly the files its manifest lists (the download that made
    it fetched those; more may be arriving beside them), else every shard in its directory."""
    names = sorted(n for n in ref.get("manifest", {}) if SHARD_RE.match(n))
    if not names:
        return list_shards(ref["path"])
    urls = [join(ref["path"], n) for n in names]
    return ShardSet(train=urls[:-1], val=urls[-1])


def read_cache_dir() -> str:
    """Where remote shards are kept once read whole: <cache root>/shards (NANOCHAT_FLOW_CACHE moves it)."""
    from nanochat_core.data.packages import cache_root

    return str(cache_root() / "shards")


def open_parquet(url: str, read_cache: bool = False) -> pq.ParquetFile:
    """A ParquetFile on a path or URL; a file without a readable footer is a UserError naming it.

    `read_cache`: a remote shard is fetched once into the local read cache and read from disk, for
    readers that go through every row group (training loops over its shards for hours); without it
    only the footer and the row groups asked for are fetched (a row count, a check).
    """
    try:
        if read_cache and not storage.is_local(url):
            return pq.ParquetFile(storage.local_copy(url, read_cache_dir()))
        fs, path = storage.filesystem(url)
        return pq.ParquetFile(fs.open(path, "rb"))
    except FileNotFoundError:
        raise UserError(f"shard {url} does not exist; run `nanochat download` to fetch it") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(
            f"shard {url} is not a readable parquet file ({e}); delete it and run `nanochat download` again"
        ) from None


def shard_rows(url: str) -> int:
    """Rows in a shard, from its footer; raises UserError if the footer or `text` column is missing."""
    pf = open_parquet(url)
    if "text" not in pf.schema_arrow.names:
        raise UserError(f"shard {url} has no `text` column; it is not a pretraining shard")
    return pf.metadata.num_rows


def read_texts(pf: pq.ParquetFile, url: str, row_group: int) -> list:
    """The `text` column of one row group; a row group that does not decode is a UserError naming it
    (a corrupt middle passes the footer check and would otherwise end in pyarrow's OSError)."""
    try:
        return pf.read_row_group(row_group, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError, KeyError) as e:
        raise UserError(f"shard {url} row group {row_group} cannot be read ({e}); delete it and run "
                        "`nanochat download` again") from None


def shard_problem(path: str) -> str | None:
    """What makes a local parquet file unusable as a shard (footer, `text` column, any row group that
    does not decompress), or None. Every row group is read, so an accepted shard is one training can read."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        return f"no readable parquet footer ({e})"
    if "text" not in pf.schema_arrow.names:
        return "no `text` column"
    for row_group in range(pf.metadata.num_row_groups):
        try:
            pf.read_row_group(row_group, columns=["text"])
        except (pa.ArrowException, OSError, KeyError) as e:
            return f"row group {row_group} does not decode ({e})"
    return None


@dataclass
class Position:
    """Where a rank resumes: the next row group it reads (file, row group in that file) and the epoch."""

    file_index: int = 0
    row_group: int = 0
    epoch: int = 1


def iter_row_groups(
    files: list[str],
    rank: int = 0,
    world: int = 1,
    start: Position | None = None,
    loop: bool = False,
) -> Iterator[tuple[list[str], Position]]:
    """Rank `rank` of `world` reads row groups rank, rank+world, ... counted across the files in order.

    nanochat strides within each file; counting across files instead is the same on big shards and
    keeps every rank busy when shards hold fewer row groups than there are ranks (a 2M-character
    sample shard is a single row group of ~400 documents). A Position belongs to one rank and one
    world size: resume with the same ones.
    Yields (texts of one row group, Position to resume from after it): resuming from a yielded
    Position reads exactly what this iterator would have read next. Each pass over the files starts
    again at row group `rank` of the first file with the epoch bumped; without `loop` the iterator
    stops at the end of the pass it started in.
    """
    if not files:
        raise UserError("no shard files to read; run `nanochat download` first")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of size {world}")
    opened: dict[int, pq.ParquetFile] = {}

    def parquet(i: int) -> pq.ParquetFile:
        if i not in opened:
            opened.clear()  # one open file at a time; footers are cheap to re-read
            opened[i] = open_parquet(files[i], read_cache=True)
            if "text" not in opened[i].schema_arrow.names:
                raise UserError(f"shard {files[i]} has no `text` column; it is not a pretraining shard")
        return opened[i]

    def locate(file_index: int, row_group: int) -> tuple[int, int] | None:
        """Carry a row-group offset past the ends of files; None past the last file."""
        while file_index < len(files):
            n = parquet(file_index).metadata.num_row_groups
            if row_group < n:
                return file_index, row_group
            row_group -= n
            file_index += 1
        return None

    first = locate(0, rank)
    if first is None:
        raise UserError(
            f"rank {rank} of {world} has no row group to read in {len(files)} shard(s); "
            "use fewer processes or more shards"
        )
    pos = start or Position(0, rank, 1)
    here, epoch = locate(pos.file_index, pos.row_group), pos.epoch
    if here is None:
        here, epoch = first, epoch + 1
    start_epoch = epoch
    while True:
        file_index, row_group = here
        texts = read_texts(parquet(file_index), files[file_index], row_group)
        nxt, nxt_epoch = locate(file_index, row_group + world), epoch
        if nxt is None:
            nxt, nxt_epoch = first, epoch + 1
        yield texts, Position(nxt[0], nxt[1], nxt_epoch)
        if nxt_epoch != start_epoch and not loop:
            return
        here, epoch = nxt, nxt_epoch
