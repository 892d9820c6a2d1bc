"""Base-model evaluation: bits per byte on the train and val shards, a few greedy samples, and CORE.

    nanochat base-eval --preset tiny
    nanochat base-eval --preset d4-cpu --split-tokens 65536 --step 100
    nanochat base-eval --preset tiny --core --max-per-task 50        # + CORE; last line `CORE: 0.1234`,
                                                                     # the one above it `over 14 of 22 tasks; missing: ...`
    nanochat base-eval --preset tiny --core --random-init           # an untrained model: CORE ≈ 0
    torchrun --standalone --nproc_per_node=8 -m nanochat_core.stages.base_eval --config cfg.json

Inputs: `model` (a base checkpoint directory; the latest or `--step` checkpoint), `tokenizer`, `shards`
(the bpb splits: exactly the shards that ref lists) and, with --core, `eval_bundle`. Run by hand they
default to what base_train, tok_train, download and eval_bundle of the same preset wrote (or --model,
--tokenizer, --shards, --eval-bundle). Writes `samples.json` and `result.json` ({"path", "step",
"train_bpb", "val_bpb", "samples", "manifest", ...}) to `<base>/base_eval/d<depth>/`; with --core also
`core.csv`, `core.json` and the per-task table on the console.
"""

from __future__ import annotations

import json

import torch

from nanochat_core import artifacts, dist, hardware, storage
from nanochat_core.checkpoint import latest_step, load_model, read_meta
from nanochat_core.config import PipelineConfig
from nanochat_core.data.loader import shard_loader, val_files
from nanochat_core.data.shards import shards_of
from nanochat_core.errors import UserError, exit_on_user_error
from nanochat_core.evaluation import core_metrics, evaluate_core, format_core_csv
from nanochat_core.evaluation.bundle import CORE_LABELS
from nanochat_core.evaluation.core import core_coverage, format_core_table
from nanochat_core.model.bpb import evaluate_bpb
from nanochat_core.model.gpt import GPTConfig, build_model
from nanochat_core.model.samples import greedy_samples
from nanochat_core.paths import join, output_dir
from nanochat_core.stage_args import parse
from nanochat_core.tokenizer import Tokenizer, load_token_bytes


def run(cfg: PipelineConfig, inputs: dict[str, dict]) -> dict:
    with dist.session(cfg.base_eval.device_type) as rt:
        return evaluate(cfg, inputs, rt)


def evaluate(cfg: PipelineConfig, inputs: dict[str, dict], rt: dist.Runtime) -> dict:
    ec = cfg.base_eval
    say = dist.Console(rt.master)
    source, tok_dir = inputs["model"]["path"], inputs["tokenizer"]["path"]
    tokenizer = Tokenizer.load(tok_dir)
    if ec.random_init:
        model, meta = random_model(source, ec.step, rt.device), {"step": 0}
        source = f"random init of {source}'s shape"
    else:
        model, _, meta = load_model(source, ec.step, rt.device)
    shards = shards_of(inputs["shards"])
    depth, T, B = model.config.n_layer, model.config.sequence_len, ec.device_batch_size
    out = output_dir("base_eval", cfg, depth=depth)
    autocast = hardware.autocast(ec.dtype, rt.device)
    token_bytes = load_token_bytes(tok_dir, rt.device)
    steps = max(1, ec.split_tokens // (B * T * rt.world))
    say(f"evaluating {source} step {meta['step']} on {steps * B * T * rt.world:,} tokens per split")

    result: dict = {"path": out, "checkpoint": source, "step": meta["step"], "tokens_per_split": steps * B * T * rt.world}
    for split, files in (("train", shards.train), ("val", val_files(shards.val, rt.world))):
        loader = shard_loader(files, tokenizer, B, T, rt.rank, rt.world, rt.device)
        bpb = evaluate_bpb(model, loader, steps, token_bytes, autocast)
        result[f"{split}_bpb"] = bpb
        say(f"{split} bpb: {bpb:.4f}")

    samples = []
    if rt.master and ec.sample_tokens > 0:
        samples = greedy_samples(model, tokenizer, ec.sample_tokens, autocast)
        for text in samples:
            say(f"sample: {text!r}")
    result["samples"] = samples
    if ec.core:
        if "eval_bundle" not in inputs:
            raise UserError("--core needs the CORE eval bundle; run `nanochat eval-bundle build` or pass --eval-bundle")
        with autocast():
            scored = evaluate_core(model, tokenizer, inputs["eval_bundle"]["path"], cfg.core.max_per_task, rt.device)
        result.update(core=scored["core"], core_stderr=scored["core_stderr"], core_table=format_core_table(scored),
                      core_tasks=len(scored["tasks"]), core_of=len(CORE_LABELS), core_coverage=core_coverage(scored),
                      missing_tasks=scored["missing_tasks"], missing_reasons=scored["missing_reasons"],
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
    cfg, inputs = parse("base_eval", argv)
    ref = run(cfg, inputs)
    artifacts.emit(ref)
    if "core_table" in ref:
        print(ref["core_table"])  # its last line is `CORE: 0.1234`


def random_model(source: str, step: int | None, device):
    """An untrained GPT of the shape of the checkpoint at `source`, for the centering sanity check
    (seeded, so two runs score the same random model)."""
    step = latest_step(source) if step is None else step
    if step is None:
        raise UserError(f"--random-init takes the model shape from a checkpoint and {source} has none; "
                        "pass --model with a checkpoint directory")
    torch.manual_seed(0)
    return build_model(GPTConfig(**read_meta(source, step)["model_config"]), device)


if __name__ == "__main__":
    main()
