"""The tokenizing distributed loader: parquet row groups in, (inputs, targets) batches out.

- Rank r of W reads row groups r, r+W, … (`shards.iter_row_groups`), forever, counting epochs.
- Each row group's texts are tokenized in one threaded batch call, every document prefixed with BOS.
- Rows of `seq_len + 1` tokens are packed best-fit from a buffer of documents: the longest document
  that fits the space left goes in next; when none fits, the shortest is cropped to fill the row and
  its tail is dropped. So every row starts with BOS, every document starts at a BOS, and there is
  no padding. Documents longer than a row are split into row-sized pieces on arrival, each led by
  a BOS, so long documents cannot pile up in the buffer and their text is kept rather than cropped.
- `state_dict()` is exact: the shard position after the last row group read plus the buffered
  documents themselves. A loader rebuilt from it yields exactly the batches the original would have.

    loader = shard_loader(list_shards(data_dir).train, tokenizer, B=8, T=512, rank=0, world=1)
    for inputs, targets in loader: ...
"""

from __future__ import annotations

import bisect
from dataclasses import asdict
from typing import Callable, Iterator

import torch

# Row-group source: given a start position (None = the beginning), yield (texts, position after).
RowGroupSource = Callable[[object], Iterator[tuple[list[str], object]]]


class TokenLoader:
    """Infinite iterator of (inputs, targets), each (B, T) int64 on `device`."""

    def __init__(self, source: RowGroupSource, tokenizer, batch_size: int, seq_len: int,
                 device: str | torch.device = "cpu", buffer_docs: int = 1000, num_threads: int = 4,
                 state: dict | None = None, position_cls=None):
        self.source, self.tokenizer = source, tokenizer
        self.B, self.T = batch_size, seq_len
        self.device = torch.device(device)
        self.buffer_docs, self.num_threads = buffer_docs, num_threads
        self.bos = tokenizer.bos_token_id
        self.position = None  # position after the last row group read (None: nothing read yet)
        self.epoch = 1
        self.lengths: list[int] = []  # ascending
        self.docs: list[list[int]] = []  # same order as lengths
        if state is not None:
            self.position = position_cls(**state["position"]) if state["position"] is not None else None
            self.epoch = getattr(self.position, "epoch", 1)
            flat, lengths = state["buffer_tokens"].tolist(), state["buffer_lengths"].tolist()
            offset = 0
            for n in lengths:  # saved in buffer order, so re-inserting keeps ties in the same order
                self._insert(flat[offset : offset + n])
                offset += n
        self._row_groups = self.source(self.position)

    # --- state --------------------------------------------------------------------------------

    def snapshot(self) -> tuple:
        """The state now, cheaply (a stage takes one every step, before it prefetches the next batch, so a
        checkpoint it decides on later still holds exactly the batches consumed): the buffer's lists are
        copied, not its documents, which are never changed in place. 4 µs for 1,000 documents, where
        `state_dict()` flattens every buffered token: 0.08 s for 1,000 documents of 1,000 tokens (measured
        on this 2-core machine with other work running, Dec 2026), a tenth of a d20 step."""
        return (asdict(self.position) if self.position is not None else None, list(self.docs), list(self.lengths))

    def state_dict(self, snapshot: tuple | None = None) -> dict:
        """The state now, or at `snapshot`."""
        position, docs, lengths = snapshot or self.snapshot()
        # The buffer as two flat tensors: compact in the checkpoint, and loadable with weights_only.
        return {
            "position": position,
            "buffer_tokens": torch.tensor([t for d in docs for t in d], dtype=torch.int32),
            "buffer_lengths": torch.tensor(lengths, dtype=torch.int64),
        }

    # --- packing ------------------------------------------------------------------------------

    def _insert(self, doc: list[int]) -> None:
        i = bisect.bisect_right(self.lengths, len(doc))
        self.lengths.insert(i, len(doc))
        self.docs.insert(i, doc)

    def _refill(self) -> None:
        texts, self.position = next(self._row_groups)
        self.epoch = getattr(self.position, "epoch", 1)
        row = self.T + 1
        for doc in self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.num_threads):
            if len(doc) <= row:
                self._insert(doc)
                continue
            self._insert(doc[:row])
            # Continuations of a long document get a BOS of their own so every row still starts
            # with one; the text is kept instead of being cropped away.
            for start in range(row, len(doc), row - 1):
                self._insert([self.bos] + doc[start : start + row - 1])

    def _take(self, i: int) -> list[int]:
        self.lengths.pop(i)
        return self.docs.pop(i)

    def next_rows(self) -> list[list[int]]:
        """B rows of exactly T+1 tokens."""
        rows = []
        for _ in range(self.B):
            row: list[int] = []
            space = self.T + 1
            while space > 0:
                while len(self.docs) < self.buffer_docs:
                    self._refill()
                i = bisect.bisect_right(self.lengths, space) - 1
                if i >= 0:
                    doc = self._take(i)  # the longest document that fits
                else:
                    doc = self._take(0)[:space]  # none fits: crop the shortest to fill the row
                row.extend(doc)
                space -= len(doc)
            rows.append(row)
        return rows

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.tensor(self.next_rows(), dtype=torch.long)  # (B, T+1)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            batch = batch.to(self.device)
        return batch[:, :-1], batch[:, 1:]


def shard_loader(files: list[str], tokenizer, batch_size: int, seq_len: int, rank: int = 0,
                 world: int = 1, device="cpu", state: dict | None = None, buffer_docs: int = 1000,
                 num_threads: int = 4) -> TokenLoader:
    """A TokenLoader over parquet shards in the canonical layout, striding row groups by rank."""
    from nanochat_core.data.shards import Position, iter_row_groups

    def source(start):
        return iter_row_groups(files, rank=rank, world=world, start=start, loop=True)

    return TokenLoader(source, tokenizer, batch_size, seq_len, device=device, buffer_docs=buffer_docs,
                       num_threads=num_threads, state=state, position_cls=Position)


def val_files(val_shard: str, world: int) -> list[str]:
    """The val shard listed often enough that every rank has a row group to read.

    A small val shard (the sample corpus's hold one or two row groups) would leave ranks past its
    row-group count with nothing; repeating the file gives them copies, which leaves bpb unbiased.
    """
    from nanochat_core.data.shards import open_parquet

    groups = open_parquet(val_shard).metadata.num_row_groups
    return [val_shard] * max(1, -(-world // max(groups, 1)))
