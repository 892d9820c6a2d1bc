"""Base-model evaluation: bits per byte on the train and val shards, and a few greedy samples.

    nanochat base-eval --preset tiny
    nanochat base-eval --preset d4-cpu --split-tokens 65536 --step 100
    nanochat base-eval --preset tiny --core --max-per-task 50        # + CORE; last line `CORE: 0.1234`
    nanochat base-eval --preset tiny --core --random-init           # an untrained model: CORE ≈ 0
    torchrun --standalone --nproc_per_node=8 -m nanochat_core.stages.base_eval --config cfg.json

Reads the latest (or `--step`) checkpoint of `<base>/base_checkpoints/d<depth>/` and writes
`samples.json` and `result.json` ({"path", "step", "train_bpb", "val_bpb", "samples", "manifest", ...}) to `<base>/base_eval/d<depth>/`.
With --core, also CORE (nanochat_core.evaluation.core) on the eval bundle: `core.csv`, `core.json`,
and the per-task table on the console.
"""

from __future__ import annotations

import contextlib
import json

import torch

from nanochat_core import artifacts, dist, storage
from nanochat_core.checkpoint import base_checkpoint_dir, load_model
from nanochat_core.config import PipelineConfig, config_from_args, stage_parser
from nanochat_core.errors import exit_on_user_error
from nanochat_core.evaluation.core import format_core_table
from nanochat_core.paths import base_dir, join
from nanochat_core.stages.base_train import SAMPLE_PROMPTS, autocast_dtype, load_token_bytes, load_tokenizer


def run(cfg: PipelineConfig) -> dict:
    with dist.session(cfg.base_eval.device_type) as rt:
        return evaluate(cfg, rt)


def evaluate(cfg: PipelineConfig, rt: dist.Runtime) -> dict:
    from nanochat_core.data.loader import shard_loader, val_files
    from nanochat_core.data.shards import list_shards
    from nanochat_core.model.bpb import evaluate_bpb

    ec = cfg.base_eval
    say = dist.Console(rt.master)
    source = ec.source or base_checkpoint_dir(cfg.base_train.depth)
    if ec.random_init:
        model, tokenizer, meta = random_model(cfg, rt.device), None, {"step": 0}
        source = f"random init of depth {cfg.base_train.depth}"
    else:
        model, tokenizer, meta = load_model(source, ec.step, rt.device)
    tok_dir = meta.get("tokenizer_dir") if tokenizer is not None else None
    if tokenizer is None:
        tok_dir = cfg.base_train.tokenizer_dir or join(base_dir(), "tokenizer")
        tokenizer = load_tokenizer(tok_dir)
    data_dir = cfg.base_train.data_dir or meta.get("data_dir") or join(base_dir(), "base_data")
    shards = list_shards(data_dir)
    depth, T, B = model.config.n_layer, model.config.sequence_len, ec.device_batch_size
    out = ec.out or join(base_dir(), "base_eval", f"d{depth}")
    amp = autocast_dtype(ec.dtype, rt.device)
    autocast = (lambda: torch.autocast(rt.device.type, dtype=amp)) if amp else contextlib.nullcontext
    token_bytes = load_token_bytes(tok_dir, rt.device)
    steps = max(1, ec.split_tokens // (B * T * rt.world))
    say(f"evaluating {source} step {meta['step']} on {steps * B * T * rt.world:,} tokens per split")

    result: dict = {"path": out, "source": source, "step": meta["step"], "tokens_per_split": steps * B * T * rt.world}
    for split, files in (("train", shards.train), ("val", val_files(shards.val, rt.world))):
        loader = shard_loader(files, tokenizer, B, T, rt.rank, rt.world, rt.device)
        bpb = evaluate_bpb(model, loader, steps, token_bytes, autocast)
        result[f"{split}_bpb"] = bpb
        say(f"{split} bpb: {bpb:.4f}")

    samples = []
    if rt.master and ec.sample_tokens > 0:
        with autocast():
            for prompt in SAMPLE_PROMPTS:
                ids = tokenizer.encode(prompt, prepend=tokenizer.bos_token_id)
                new = list(model.generate(ids, max_tokens=ec.sample_tokens, temperature=0.0))
                samples.append(tokenizer.decode(ids[1:] + new))
                say(f"sample: {samples[-1]!r}")
    result["samples"] = samples
    if ec.core:
        from nanochat_core.evaluation import core_metrics, evaluate_core, format_core_csv
        from nanochat_core.evaluation.bundle import resolve_bundle_dir

        with autocast():
            scored = evaluate_core(model, tokenizer, resolve_bundle_dir(cfg), cfg.core.max_per_task, rt.device)
        result.update(core=scored["core"], core_stderr=scored["core_stderr"], core_table=format_core_table(scored),
                      tasks={label: r["centered"] for label, r in scored["tasks"].items()}, **core_metrics(scored))
        if rt.master:
            storage.write_text(join(out, "core.json"), json.dumps(scored, indent=2))
            storage.write_text(join(out, "core.csv"), format_core_csv(scored))
    if rt.master:
        storage.write_text(join(out, "samples.json"), json.dumps(samples, indent=2))
        return artifacts.make_ref("base_eval", out, {k: v for k, v in result.items() if k != "path"})
    return result


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(
        "nanochat base-eval",
        "Bits per byte of a base checkpoint on the train and val shards, plus greedy samples.",
        {"base_eval": None, "core": ["max_per_task", "bundle"],
         "base_train": ["depth", "data_dir", "tokenizer_dir"]},
    )
    ref = run(config_from_args(parser.parse_args(argv)))
    artifacts.emit(ref)
    if "core_table" in ref:
        print(ref["core_table"])  # its last line is `CORE: 0.1234`


def random_model(cfg: PipelineConfig, device):
    """An untrained GPT of the preset's shape, for the centering sanity check."""
    from nanochat_core.model.gpt import GPTConfig, build_model

    tok_dir = cfg.base_train.tokenizer_dir or join(base_dir(), "tokenizer")
    t = cfg.base_train
    torch.manual_seed(t.seed)
    mcfg = GPTConfig.from_depth(t.depth, load_tokenizer(tok_dir).vocab_size, t.max_seq_len, t.aspect_ratio,
                                t.head_dim, t.kv_head_ratio)
    return build_model(mcfg, device)


if __name__ == "__main__":
    main()
