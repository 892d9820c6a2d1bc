"""Stage `tok_train`: byte-level BPE on the first characters of the training shards.

    nanochat tok-train                                         # d20: vocab 65,536 on the first 2e9 chars
    nanochat tok-train --preset tiny                           # vocab 4,096 on 5M chars: seconds
    nanochat tok-train --max-chars 2e9 --doc-cap 10000 --vocab-size 65536
    python -m nanochat_core.stages.tok_train --config cfg.json

Reads the training shards its `shards` input lists (run by hand: <base>/base_data, or --shards) in
order, row group by row group,
each document cropped to --doc-cap characters, until --max-chars characters; the val shard is
never read. The text streams into the Rust trainer (tokenizer_rs) in batches, so memory stays
flat whatever --max-chars is. Writes <base>/tokenizer/{tokenizer.pkl, token_bytes.pt, result.json}.
"""

from __future__ import annotations

import sys
import time
from typing import Iterator

from tqdm import tqdm

from nanochat_core import artifacts
from nanochat_core.config import PipelineConfig
from nanochat_core.data.shards import iter_row_groups, shards_of
from nanochat_core.errors import UserError, exit_on_user_error
from nanochat_core.paths import output_dir
from nanochat_core.stage_args import parse
from nanochat_core.tokenizer import Tokenizer


def training_texts(files: list[str], max_chars: int, doc_cap: int) -> Iterator[str]:
    """Documents of `files` in order, each cropped to `doc_cap`, until `max_chars` characters."""
    seen = 0
    for texts, _ in iter_row_groups(files):
        for doc in texts:
            if doc is None:  # a null cell: nothing to learn from
                continue
            doc = doc[:doc_cap]
            seen += len(doc)
            yield doc
            if seen >= max_chars:
                return


def run(cfg: PipelineConfig, inputs: dict[str, dict], progress: bool | None = None) -> dict:
    tc = cfg.tok_train
    # Exactly the shards the ref lists: the flow hands the first few while the rest still download,
    # so what the tokenizer learns from is what its cache key says, however far the download got.
    shards = shards_of(inputs["shards"])
    if not shards.train:
        raise UserError(
            f"{inputs['shards']['path']} holds only the val shard; tokenizer training needs at least one "
            "training shard: run `nanochat download -n 1` or more"
        )
    stats = {"chars": 0, "docs": 0}
    progress = sys.stderr.isatty() if progress is None else progress

    bar = tqdm(total=tc.max_chars, unit="char", unit_scale=True, desc="tok_train: reading", disable=not progress)

    # Without a terminal (Prefect task logs, CI) a bar is noise: a line per quarter instead.
    quarters = iter([tc.max_chars * q // 4 for q in (1, 2, 3)] + [float("inf")])
    next_line = next(quarters)

    def counted(texts: Iterator[str]) -> Iterator[str]:
        nonlocal next_line
        for doc in texts:
            stats["docs"] += 1
            stats["chars"] += len(doc)
            if stats["docs"] % 1024 == 0:
                bar.update(min(stats["chars"], tc.max_chars) - bar.n)
            if not progress and stats["chars"] >= next_line:
                print(f"tok_train: read {stats['chars']:,} of {tc.max_chars:,} chars "
                      f"({time.perf_counter() - t0:.1f}s)", flush=True)
                next_line = next(quarters)
            yield doc

    with bar:
        t0 = time.perf_counter()
        texts = counted(training_texts(shards.train, tc.max_chars, tc.doc_cap))
        tokenizer = Tokenizer.train(texts, tc.vocab_size)
        seconds = time.perf_counter() - t0
        bar.update(min(stats["chars"], tc.max_chars) - bar.n)
    if stats["docs"] == 0 or stats["chars"] == 0:
        raise UserError(f"the training shards in {inputs['shards']['path']} hold no text; rebuild them")
    out = output_dir("tok_train", cfg)
    files = tokenizer.save(out)
    figures = {
        "vocab_size": tokenizer.vocab_size,
        "merges": tokenizer.vocab_size - 256 - len(tokenizer.get_special_tokens()),
        "train_chars": stats["chars"],
        "train_docs": stats["docs"],
        "train_bytes": tokenizer.train_stats["bytes"],
        "unique_chunks": tokenizer.train_stats["unique_chunks"],
        "train_seconds": round(seconds, 2),
        "chars_per_second": round(stats["chars"] / seconds) if seconds > 0 else None,
    }
    return artifacts.make_ref("tok_train", out, figures, files)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg, inputs = parse("tok_train", argv)
    ref = run(cfg, inputs)
    artifacts.emit(ref)
    if ref["vocab_size"] < cfg.tok_train.vocab_size:
        print(f"warning: the text ran out of pairs to merge: vocab {ref['vocab_size']:,} "
              f"instead of {cfg.tok_train.vocab_size:,}; give it more text (--max-chars)", file=sys.stderr)
    print(
        f"tokenizer: vocab {ref['vocab_size']:,} ({ref['merges']:,} merges) from {ref['train_chars']:,} chars "
        f"in {ref['train_docs']:,} docs; trained in {ref['train_seconds']:.2f}s "
        f"({ref['chars_per_second'] or 0:,} chars/s) -> {ref['path']}"
    )


if __name__ == "__main__":
    main()
