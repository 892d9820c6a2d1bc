"""Supervised fine-tuning: one conversation per row, loss only on what the assistant says.

    nanochat sft --preset tiny
    nanochat sft --preset d4-cpu --tasks identity,custom@my_convs.jsonl --num-epochs 2
    torchrun --standalone --nproc_per_node=8 -m nanochat_core.stages.chat_sft --config cfg.json

Starts from its `model` input (run by hand: `<base>/mid_checkpoints/d<depth>`, or --model). Each
micro-batch pads its conversations to the longest one; targets are -1 on user turns, tool outputs
and padding (chat_format's mask), so the loss is the mean over assistant tokens only. Writes
checkpoints, `metrics.jsonl` and `result.json` to `<base>/chatsft_checkpoints/d<depth>/`.
"""

from __future__ import annotations

import torch

from nanochat_core import dist, hardware
from nanochat_core.chat_format import render_conversation
from nanochat_core.config import PipelineConfig
from nanochat_core.errors import UserError, exit_on_user_error
from nanochat_core.paths import output_dir
from nanochat_core.post_train import (
    StageRun, dropped_tasks, build_mixture, load_start, sft_batch, split_val, train_supervised, val_loss_logger,
)
from nanochat_core.torch_stage import stage_main


def run(cfg: PipelineConfig, inputs: dict[str, dict]) -> dict:
    with dist.session(cfg.chat_sft.device_type) as rt:
        return train(cfg, inputs, rt)


def train(cfg: PipelineConfig, inputs: dict[str, dict], rt: dist.Runtime) -> dict:
    sc = cfg.chat_sft
    src = inputs["model"]["path"]
    torch.manual_seed(sc.seed)
    # The task files first: a bad --tasks is the user's to fix, and it should not wait for a model load.
    mixture = build_mixture(sc.tasks, sc.seed, sc.words_path)
    model, tokenizer, start_meta = load_start("chat_sft", src, sc.step, rt.device)
    out = output_dir("chat_sft", cfg, depth=model.config.n_layer)
    ctx = StageRun("chat_sft", "sft", out, rt, hardware.autocast(sc.dtype, rt.device), sc)
    say = ctx.say
    B = sc.device_batch_size
    if sc.examples_per_step % (B * rt.world):
        raise UserError(f"--examples-per-step {sc.examples_per_step} is not a multiple of device_batch_size × "
                        f"processes = {B * rt.world}; pick sizes that divide")
    accum = sc.examples_per_step // (B * rt.world)
    train_idx, val_idx = split_val(mixture, sc.val_examples)
    if len(train_idx) < sc.examples_per_step:
        raise UserError(f"the mixture has {len(train_idx)} training conversations, fewer than one step's "
                        f"{sc.examples_per_step}; add tasks or lower --examples-per-step")
    N = sc.num_iterations if sc.num_iterations > 0 else len(train_idx) // sc.examples_per_step * sc.num_epochs
    pad_id = tokenizer.encode_special("<|assistant_end|>")  # any id works: padded targets are -1
    mine = list(train_idx[rt.rank::rt.world])

    def rendered(i: int):
        return render_conversation(tokenizer, mixture[i], max_tokens=sc.max_seq_len + 1)

    def next_rows(cursor: int):
        rows = [rendered(mine[(cursor + i) % len(mine)]) for i in range(B)]
        return sft_batch(rows, pad_id, rt.device), cursor + B

    val_mine = list(val_idx[rt.rank::rt.world])

    def val_batches():
        return (sft_batch([rendered(i) for i in val_mine[j: j + B]], pad_id, rt.device) for j in range(0, len(val_mine), B))

    say(f"sft: from {src} (step {start_meta['step']}), {len(train_idx):,} conversations, {N} steps of "
        f"{sc.examples_per_step} ({accum} micro-batches of {B} per process)")
    # The cadence's estimate of a step counts every row at full length: padded SFT rows are shorter.
    return train_supervised(ctx, cfg, inputs, model, start_meta, next_rows, N, accum, sc.examples_per_step * sc.max_seq_len,
                            val_loss_logger(ctx, model, val_batches), started_from=src, conversations=len(train_idx),
                            dropped_tasks=dropped_tasks(mixture))


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    stage_main("chat_sft", argv, run, on_notice=True)


if __name__ == "__main__":
    main()
