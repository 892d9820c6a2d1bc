"""Midtraining: teach the base model the chat format, multiple choice, tool use and spelling.

    nanochat mid-train --preset tiny
    nanochat mid-train --preset d4-cpu --tasks chatterbot,identity,math:4000 --num-iterations 50
    torchrun --standalone --nproc_per_node=8 -m nanochat_core.stages.mid_train --config cfg.json

Starts from its `model` input (run by hand: `<base>/base_checkpoints/d<depth>`, or --model), renders the
task mixture as conversations and packs them into rows of max_seq_len tokens, like pretraining does
with documents (nanochat's midtraining: loss on every token; the conversations carry the format).
Rank r takes examples r, r+W, ... of the shuffled mixture. Writes checkpoints, `metrics.jsonl` and
`result.json` to `<base>/mid_checkpoints/d<depth>/`.
"""

from __future__ import annotations

import torch

from nanochat_core import dist, hardware
from nanochat_core.chat_format import render_conversation
from nanochat_core.config import PipelineConfig
from nanochat_core.errors import UserError, exit_on_user_error
from nanochat_core.paths import output_dir
from nanochat_core.post_train import (
    StageRun, dropped_tasks, all_reduce_min, build_mixture, load_start, split_val, train_supervised, val_loss_logger,
)
from nanochat_core.torch_stage import stage_main


def packed_rows(tokenizer, mixture, indices, T: int) -> torch.Tensor:
    """The conversations at `indices`, rendered and concatenated, cut into rows of T+1 tokens that
    overlap by one (inputs row[:-1], targets row[1:]); the tail shorter than a row is dropped."""
    stream: list[int] = []
    for i in indices:
        ids, _ = render_conversation(tokenizer, mixture[i], max_tokens=1 << 30)
        stream.extend(ids)
    rows = (len(stream) - 1) // T
    if rows == 0:
        return torch.empty((0, T + 1), dtype=torch.long)
    data = torch.tensor(stream[: rows * T + 1], dtype=torch.long)
    return data.unfold(0, T + 1, T)


def run(cfg: PipelineConfig, inputs: dict[str, dict]) -> dict:
    with dist.session(cfg.mid_train.device_type) as rt:
        return train(cfg, inputs, rt)


def train(cfg: PipelineConfig, inputs: dict[str, dict], rt: dist.Runtime) -> dict:
    mc = cfg.mid_train
    src = inputs["model"]["path"]
    torch.manual_seed(mc.seed)
    # The task files first: a bad --tasks is the user's to fix, and it should not wait for a model load.
    mixture = build_mixture(mc.tasks, mc.seed, mc.words_path)
    model, tokenizer, start_meta = load_start("mid_train", src, mc.step, rt.device)
    out = output_dir("mid_train", cfg, depth=model.config.n_layer)
    ctx = StageRun("mid_train", "mid-train", out, rt, hardware.autocast(mc.dtype, rt.device), mc)
    say = ctx.say
    T, B = mc.max_seq_len, mc.device_batch_size
    if T > model.config.sequence_len * 10:
        raise UserError(f"--max-seq-len {T} is beyond what the model's rotary table covers "
                        f"({model.config.sequence_len * 10}); pass a smaller value")
    tokens_per_micro = B * T * rt.world
    if mc.total_batch_size % tokens_per_micro:
        raise UserError(f"--total-batch-size {mc.total_batch_size} is not a multiple of device_batch_size × max_seq_len "
                        f"× processes = {tokens_per_micro}; pick sizes that divide")
    accum = mc.total_batch_size // tokens_per_micro

    train_idx, val_idx = split_val(mixture, mc.val_examples)
    rows = packed_rows(tokenizer, mixture, train_idx[rt.rank::rt.world], T).to(rt.device)
    val_rows = packed_rows(tokenizer, mixture, val_idx[rt.rank::rt.world], T).to(rt.device)
    one_pass = all_reduce_min(len(rows) // (B * accum), rt.device)
    N = mc.num_iterations if mc.num_iterations > 0 else one_pass
    if N < 1 or len(rows) < B:
        raise UserError(f"the mixture ({len(mixture)} conversations) fills fewer rows than one optimizer step needs; "
                        "add tasks or lower --total-batch-size / --max-seq-len")
    say(f"mid-train: from {src} (step {start_meta['step']}), {len(train_idx):,} conversations "
        f"({len(rows):,} rows of {T} tokens on this rank), {N} steps × {accum} micro-batches of {B}")

    def next_rows(cursor: int):
        if cursor + B > len(rows):
            cursor = 0  # a further pass over the data (explicit --num-iterations beyond one pass)
        batch = rows[cursor: cursor + B]
        return (batch[:, :-1], batch[:, 1:]), cursor + B

    def val_batches():
        return ((val_rows[i: i + B, :-1], val_rows[i: i + B, 1:]) for i in range(0, len(val_rows), B))

    return train_supervised(ctx, cfg, inputs, model, start_meta, next_rows, N, accum, mc.total_batch_size,
                            val_loss_logger(ctx, model, val_batches), started_from=src, conversations=len(train_idx),
                            dropped_tasks=dropped_tasks(mixture))


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    stage_main("mid_train", argv, run, on_notice=True)


if __name__ == "__main__":
    main()
