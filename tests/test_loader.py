"""The tokenizing distributed loader: packing, rank striding, epochs, exact resume."""

import re

import torch

from nanochat_core.data.loader import shard_loader
from nanochat_core.data.shards import iter_row_groups, list_shards
from pretrain_data import make_pretraining_inputs

TAG = re.compile(r"#(\d{4}) ")


def setup(tmp_path):
    make_pretraining_inputs(str(tmp_path))
    from nanochat_core.tokenizer import Tokenizer

    return list_shards(str(tmp_path / "base_data")), Tokenizer.load(str(tmp_path / "tokenizer"))


def tags_in(batch: torch.Tensor, tokenizer) -> set[int]:
    """Document tags starting right after a BOS anywhere in the batch."""
    found = set()
    for row in batch.tolist():
        pieces, current = [], []
        for t in row:
            if t == tokenizer.bos_token_id:
                pieces.append(current)
                current = []
            else:
                current.append(t)
        pieces.append(current)
        for piece in pieces[1:]:  # the first piece precedes the row's first BOS (empty here)
            m = TAG.match(tokenizer.decode(piece[:8]))
            if m:
                found.add(int(m.group(1)))
    return found


def test_rows_are_bos_aligned_and_targets_shifted(tmp_path):
    shards, tok = setup(tmp_path)
    loader = shard_loader(shards.train, tok, batch_size=4, seq_len=64, buffer_docs=50)
    for _ in range(20):
        x, y = next(loader)
        assert x.shape == y.shape == (4, 64) and x.dtype == torch.long
        assert (x[:, 0] == tok.bos_token_id).all()
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_documents_are_kept_whole_when_they_fit(tmp_path):
    shards, tok = setup(tmp_path)
    loader = shard_loader(shards.train, tok, batch_size=8, seq_len=1024, buffer_docs=200)
    starts = 0
    for _ in range(10):
        x, _ = next(loader)
        starts += int((x == tok.bos_token_id).sum())
    # Best-fit packing: several documents per 1025-token row.
    assert starts > 1.5 * 8 * 10  # cropping one document per row would give exactly 80


def test_ranks_read_disjoint_row_groups_and_loop_over_epochs(tmp_path):
    shards, tok = setup(tmp_path)
    assert len(shards.train) >= 2
    expected = {}
    for rank in (0, 1):
        expected[rank] = set()
        for texts, _ in iter_row_groups(shards.train, rank=rank, world=2):
            expected[rank] |= {int(TAG.match(t).group(1)) for t in texts}
    assert expected[0] and expected[1] and not expected[0] & expected[1]
    seen = {}
    for rank in (0, 1):
        loader = shard_loader(shards.train, tok, batch_size=4, seq_len=128, rank=rank, world=2, buffer_docs=20)
        seen[rank] = set()
        for _ in range(200):
            x, _ = next(loader)
            seen[rank] |= tags_in(x, tok)
        assert seen[rank] <= expected[rank]
        assert loader.epoch >= 2  # 200 batches of 512 tokens exceed a rank's half of the data
    assert len(seen[0]) > 0.5 * len(expected[0])


def test_resume_from_state_is_exact(tmp_path):
    shards, tok = setup(tmp_path)
    kwargs = dict(batch_size=3, seq_len=100, rank=1, world=2, buffer_docs=30)
    straight = shard_loader(shards.train, tok, **kwargs)
    for _ in range(37):
        next(straight)
    state = straight.state_dict()
    expected = [next(straight) for _ in range(60)]  # crosses refills and an epoch boundary
    resumed = shard_loader(shards.train, tok, state=state, **kwargs)
    for (x1, y1), (x2, y2) in zip(expected, (next(resumed) for _ in range(60))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert resumed.epoch == straight.epoch
