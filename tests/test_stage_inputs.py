"""Stages read their inputs from the refs they are handed: a shards ref means exactly its files, a
stage handed other shards trains on those (never on <base>/base_data), and run alone a stage's inputs
default to what its upstream stages wrote."""

from __future__ import annotations

import json
import os
import shutil

from nanochat_core import artifacts, checkpoint
from nanochat_core.data.shards import SHARD_RE, iter_row_groups, shards_of, write_shards
from nanochat_core.paths import base_dir, join, output_dir
from nanochat_core.presets import tiny
from nanochat_core.registry import FAMILIES, STAGES
from nanochat_core.stage_args import parse, parser, ref_at, resolve
from nanochat_core.stages import base_train, tok_train
from pretrain_data import make_pretraining_inputs, stdlib_docs


def shards_ref(directory: str, names: list[str]) -> dict:
    """A ref like download's: the directory and the manifest of exactly `names`."""
    return {"path": directory, "manifest": artifacts.manifest(directory, names)}


def chars_in(urls: list[str]) -> int:
    return sum(len(doc) for texts, _ in iter_row_groups(urls) for doc in texts)


def test_a_shards_ref_means_exactly_the_files_it_lists(tmp_path):
    urls = write_shards(stdlib_docs(), str(tmp_path / "data"), 60_000)
    names = [u.rsplit("/", 1)[-1] for u in urls]
    assert len(names) >= 4
    listed = shards_of(shards_ref(str(tmp_path / "data"), [names[0], names[-1]]))
    assert listed.train == [urls[0]] and listed.val == urls[-1]
    # A bare directory (given by hand, no result.json) means every shard in it.
    assert shards_of({"path": str(tmp_path / "data")}).train == urls[:-1]


def test_tok_train_reads_only_the_listed_shards_while_more_arrive(tmp_path):
    """The flow hands tok_train download[:N] while the full download keeps writing into the same
    directory: whatever else is there, the tokenizer learns from the listed shards only."""
    data = str(tmp_path / "data")
    urls = write_shards(stdlib_docs(), data, 60_000)
    first = [urls[0].rsplit("/", 1)[-1], urls[-1].rsplit("/", 1)[-1]]
    cfg = tiny().model_copy(update={"tok_train": tiny().tok_train.model_copy(update={"vocab_size": 400,
                                                                                     "max_chars": 10**9})})
    ref = tok_train.run(cfg, {"shards": shards_ref(data, first)}, progress=False)
    assert ref["train_chars"] == chars_in(urls[:1]) < chars_in(urls[:-1])


def test_base_train_trains_on_the_shards_it_is_handed_not_base_data(tmp_path):
    base = base_dir()
    make_pretraining_inputs(base)
    other = str(tmp_path / "other_shards")
    shutil.copytree(join(base, "base_data"), other)
    shutil.rmtree(join(base, "base_data"))  # the default place is gone: only the ref can lead to data
    names = sorted(n for n in os.listdir(other) if SHARD_RE.match(n))
    cfg = tiny()
    cfg = cfg.model_copy(update={"base_train": cfg.base_train.model_copy(update=dict(
        depth=2, aspect_ratio=32, head_dim=16, max_seq_len=64, device_batch_size=4, total_batch_size=512,
        num_iterations=2, eval_every=-1, eval_tokens=512, compile=False))})
    ref = base_train.run(cfg, {"tokenizer": ref_at(join(base, "tokenizer")), "shards": shards_ref(other, names)})
    meta = checkpoint.read_meta(ref["path"], ref["step"])
    assert meta["data_dir"] == other and meta["shards"] == names
    assert ref["path"] == output_dir("base_train", cfg, depth=2)


def test_run_alone_inputs_default_to_the_upstream_outputs(tmp_path):
    cfg = tiny()
    inputs = resolve("mid_train", cfg)
    assert inputs == {"model": {"path": join(base_dir(), "base_checkpoints", "d2")}}
    assert resolve("chat_sft", cfg)["model"]["path"] == join(base_dir(), "mid_checkpoints", "d2")
    chat_eval_cfg = cfg.model_copy(update={"chat_eval": cfg.chat_eval.model_copy(update={"source": "rl"})})
    assert resolve("chat_eval", chat_eval_cfg)["model"]["path"] == join(base_dir(), "chatrl_checkpoints", "d2")
    # An optional input that is not there is left out; a required one is named, to fail with its path.
    assert "eval_bundle" not in resolve("base_eval", cfg) and "corpus" not in resolve("download", cfg)
    # A directory with a result.json is that stage's ref (with the exact files it holds).
    tok = join(base_dir(), "tokenizer")
    os.makedirs(tok)
    json.dump({"stage": "tok_train", "path": tok, "digest": "abc", "manifest": {}}, open(join(tok, "result.json"), "w"))
    assert resolve("tok_eval", cfg)["tokenizer"]["digest"] == "abc"
    # Flags name other directories.
    _, given = parse("tok_eval", ["--preset", "tiny", "--shards", str(tmp_path)])
    assert given["shards"] == {"path": str(tmp_path)} and given["tokenizer"]["digest"] == "abc"


def test_every_named_input_has_a_flag_and_every_model_stage_a_family():
    for stage in STAGES.values():
        flags = {a.dest for a in parser(stage.name)._actions}
        assert {f"input:{name}" for name in stage.inputs} <= flags
        if stage.starts_from:
            assert stage.starts_from in FAMILIES and "model" in stage.inputs
