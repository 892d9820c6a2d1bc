"""Pretraining: the GPT on the tokenized shards, Muon + AdamW, one code path for 1 and N processes.

    nanochat base-train --preset tiny
    nanochat base-train --preset d4-cpu --num-iterations 200 --save-every 50
    nanochat base-train --preset d4-cpu --num-iterations 200 --save-every 50    # after a crash: continues
    nanochat base-train --preset d4-cpu --num-iterations 400 --resume    # continue with other settings
    torchrun --standalone --nproc_per_node=8 -m nanochat_core.stages.base_train --config cfg.json
    nanochat base-train --preset d20 --nproc-per-node 8      # the same: starts torchrun for the 8 processes

Reads its `tokenizer` and `shards` inputs (exactly the shards that ref lists; run by hand, by default
`<base>/tokenizer/` and `<base>/base_data/`, or --tokenizer / --shards); writes checkpoints,
`metrics.jsonl` and `result.json` to `<base>/base_checkpoints/d<depth>/` (or --out). Everything the run needs is derived from the
plan (nanochat_core.plan): model dims from the depth, grad accumulation from the batch sizes,
the horizon from num_iterations > target_flops > target_param_data_ratio.
On SIGTERM (a platform's notice, or the launcher's stop) every rank finishes the optimizer step it is in,
the checkpoint is written at that step and the stage exits with status 143; a re-run continues from it
with the losses of an uninterrupted run (nanochat_core.notice).
"""

from __future__ import annotations

import math
import time

import torch

from nanochat_core import artifacts, dist, hardware, notice
from nanochat_core.checkpoint import (
    continue_or_start,
    latest_step,
    load_model_state,
    load_rank_state,
    read_meta,
    run_key,
    save_checkpoint,
)
from nanochat_core.config import PipelineConfig
from nanochat_core.data.loader import shard_loader, val_files
from nanochat_core.data.shards import shards_of
from nanochat_core.errors import UserError, exit_on_user_error
from nanochat_core.model.bpb import evaluate_bpb
from nanochat_core.model.gpt import GPTConfig, build_model
from nanochat_core.model.optim import Optimizers, lr_multiplier, muon_momentum
from nanochat_core.model.samples import greedy_samples
from nanochat_core.paths import join, output_dir
from nanochat_core.plan import checkpoint_line, make_plan
from nanochat_core.torch_stage import stage_main
from nanochat_core.tokenizer import Tokenizer, load_token_bytes

EMA_BETA = 0.9  # smoothing of the logged loss_ema (debiased like Adam's moments)


# --- the run ----------------------------------------------------------------------------------


def run(cfg: PipelineConfig, inputs: dict[str, dict]) -> dict:
    """Train (or resume) and return {"path": checkpoint dir, "step", "val_bpb", ...}."""
    with dist.session(cfg.base_train.device_type) as rt:
        return train(cfg, inputs, rt)


def train(cfg: PipelineConfig, inputs: dict[str, dict], rt: dist.Runtime) -> dict:
    tc = cfg.base_train
    say = dist.Console(rt.master)
    tok_dir, data_dir = inputs["tokenizer"]["path"], inputs["shards"]["path"]
    ckpt_dir = output_dir("base_train", cfg, depth=tc.depth)
    tokenizer = Tokenizer.load(tok_dir)
    shards = shards_of(inputs["shards"])

    # The plan sees the world torchrun actually gave us, whatever the config said.
    if tc.world_size != rt.world:
        say(f"note: config says {tc.world_size} process(es), torchrun started {rt.world}; planning for {rt.world}")
    plan = make_plan(tc.model_copy(update={"nproc_per_node": rt.world, "nnodes": 1}),
                     tokenizer.vocab_size, len(shards.train), cfg.plan)
    N, B, T, accum = plan.num_iterations, tc.device_batch_size, tc.max_seq_len, plan.grad_accum_steps
    amp = hardware.training_dtype(tc.dtype, rt.device)
    autocast = hardware.autocast(tc.dtype, rt.device)

    torch.manual_seed(tc.seed)
    model_cfg = GPTConfig.from_depth(tc.depth, tokenizer.vocab_size, T, tc.aspect_ratio, tc.head_dim, tc.kv_head_ratio)
    model = build_model(model_cfg, rt.device)
    opt = Optimizers(model, tc.embedding_lr, tc.unembedding_lr, tc.matrix_lr, tc.weight_decay)

    # --- continue an unfinished run of these settings and inputs, or start fresh ----------------
    key = run_key("base_train", tc.run_settings(), rt.world, inputs)
    step, loader_state, eval_owed, loop = 0, None, False, {"loss_ema": 0.0, "total_time": 0.0, "val_bpb": None,
                                         "min_val_bpb": None, "last_line": None}
    resume_step = continue_or_start(ckpt_dir, key, rt.master, dist.barrier, say, force=tc.resume)
    if resume_step is not None:
        meta = read_meta(ckpt_dir, resume_step)
        if meta["model_config"] != model_cfg.to_dict():
            raise UserError(
                f"checkpoint {ckpt_dir} step {resume_step} is a different model ({_describe(meta['model_config'])}) "
                f"than this config ({_describe(model_cfg.to_dict())}); drop --resume to start fresh or fix the flags"
            )
        if meta["world_size"] != rt.world or meta["device_batch_size"] != B:
            raise UserError(
                f"checkpoint {ckpt_dir} step {resume_step} was written by {meta['world_size']} process(es) at "
                f"device batch {meta['device_batch_size']}; resume with the same --nproc-per-node and "
                "--device-batch-size so every rank's data position still applies"
            )
        model.load_state_dict(load_model_state(ckpt_dir, resume_step, rt.device))
        rank_state = load_rank_state(ckpt_dir, resume_step, rt.rank, rt.device)
        opt.load_state_dict(rank_state["optim"])
        torch.set_rng_state(rank_state["rng"].cpu())
        loader_state, loop, step = rank_state["loader"], meta["loop"], resume_step
        # A run stopped on notice skipped that step's evaluation to save sooner; it is made up below.
        eval_owed = meta.get("stopped_at_step") == step
        say(f"resumed from step {step} of {ckpt_dir}")
        if step >= N:
            say(loop["last_line"] or f"step {step:05d}/{N:05d} | finished")
            return _result(ckpt_dir, step, N, loop, plan, rt.master, resume_step)

    say(f"model: depth {tc.depth}, dim {model_cfg.n_embd}, {model_cfg.n_head} heads, vocab {tokenizer.vocab_size:,}, "
        f"{plan.num_params:,} parameters; {N} steps of {tc.total_batch_size:,} tokens "
        f"({B}×{T}×{rt.world} per micro-step, grad_accum_steps {accum}); "
        f"{'bf16 autocast' if amp else 'fp32'}{', compiled' if tc.compile else ''} on {rt.device}")

    fwd = torch.compile(model, dynamic=False) if tc.compile else model
    metrics = dist.MetricsLog(join(ckpt_dir, "metrics.jsonl") if rt.master else None)
    metrics.truncate_after(step)
    train_loader = shard_loader(shards.train, tokenizer, B, T, rt.rank, rt.world, rt.device,
                                state=loader_state, num_threads=tc.loader_threads)
    token_bytes = load_token_bytes(tok_dir, rt.device)
    eval_steps = max(1, tc.eval_tokens // (B * T * rt.world))
    flops_per_step = plan.flops_per_token * tc.total_batch_size
    peak = hardware.peak_flops(rt.device, cfg.plan.gpu) * rt.world
    if plan.save_every:
        say(f"checkpoints every {plan.save_every} steps and at step {N} (plan: {checkpoint_line(plan)})")

    def evaluate(at_step: int) -> None:
        model.eval()
        val_loader = shard_loader(val_files(shards.val, rt.world), tokenizer, B, T, rt.rank, rt.world, rt.device,
                                  num_threads=tc.loader_threads)
        bpb = evaluate_bpb(fwd, val_loader, eval_steps, token_bytes, autocast)
        model.train()
        loop["val_bpb"] = bpb
        loop["min_val_bpb"] = bpb if loop["min_val_bpb"] is None else min(loop["min_val_bpb"], bpb)
        say(f"step {at_step:05d}/{N:05d} | val bpb {bpb:.4f}")
        metrics.write({"step": at_step, "val/bpb": bpb})

    def sample(at_step: int) -> None:
        if not rt.master:
            return
        model.eval()
        for text in greedy_samples(model, tokenizer, 16, autocast):
            say(f"sample: {text!r}")
        model.train()

    def checkpoint(at_step: int, consumed: tuple, stopped: bool = False) -> None:
        loader_state = train_loader.state_dict(consumed)
        meta = {
            "step": at_step, "num_iterations": N, "run_key": key, "model_config": model_cfg.to_dict(), "user_config": tc.model_dump(),
            "preset": cfg.preset, "plan": plan.to_dict(), "world_size": rt.world, "device_batch_size": B,
            "total_batch_size": tc.total_batch_size, "max_seq_len": T, "loader_position": loader_state["position"],
            "loop": loop, "val_bpb": loop["val_bpb"], "tokenizer_dir": tok_dir, "data_dir": data_dir,
            "shards": [url.rsplit("/", 1)[-1] for url in [*shards.train, shards.val]],
            **({"stopped_at_step": at_step} if stopped else {}),
        }
        rank_state = {"optim": opt.state_dict(), "loader": loader_state, "rng": torch.get_rng_state()}
        notice.timed_save(lambda: save_checkpoint(
            ckpt_dir, at_step, rt.rank, model.state_dict() if rt.master else None, rank_state,
            meta if rt.master else None, barrier=dist.barrier, keep_last=tc.keep_last),
            notice.checkpoint_bytes(model, opt, rt.world))
        metrics.flush()

    def is_eval_step(s: int) -> bool:  # s = optimizer steps done
        return s == N or (tc.eval_every > 0 and s % tc.eval_every == 0)

    if step == 0 and tc.eval_every > 0:
        evaluate(0)
    elif eval_owed and is_eval_step(step):
        evaluate(step)

    # --- the loop ----------------------------------------------------------------------------
    model.train()
    first_step = True
    x, y = next(train_loader)
    while step < N:
        save_now = step + 1 == N or (plan.save_every > 0 and (step + 1) % plan.save_every == 0)
        lrm = lr_multiplier(step, N, tc.warmup_ratio, tc.warmdown_ratio, tc.final_lr_frac)
        opt.set_schedule(lrm, muon_momentum(step))
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=rt.device)
        for micro in range(accum):
            with autocast():
                loss = fwd(x, y)
            loss_sum += loss.detach()
            (loss / accum).backward()
            last = micro == accum - 1
            # The loader's state must describe exactly the batches consumed, so snapshot it before
            # prefetching the next step's first batch: every step, since notice can stop any of them.
            if last:
                consumed = train_loader.snapshot()
            x, y = next(train_loader)  # fetched while the device still runs the backward pass
        # One all-reduce carries the loss and whether any rank has had notice: all stop after this step.
        step_loss, stopping = notice.reduce_with_loss(loss_sum / accum, rt)
        if not math.isfinite(step_loss):
            kept = latest_step(ckpt_dir)
            raise UserError(
                f"the loss became {step_loss} at step {step + 1}; lower --matrix-lr / --embedding-lr or check the "
                f"data ({'checkpoint step ' + str(kept) + ' is intact' if kept is not None else 'no checkpoint was written'})"
            )
        grad_norm = opt.step(tc.grad_clip)
        opt.zero_grad()
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step += 1

        if not first_step:  # the first step of a process pays for compilation and warm-up
            loop["total_time"] += dt
        first_step = False
        loop["loss_ema"] = EMA_BETA * loop["loss_ema"] + (1 - EMA_BETA) * step_loss
        loss_ema = loop["loss_ema"] / (1 - EMA_BETA**step)
        tok_per_sec = tc.total_batch_size / dt
        mfu = 100 * flops_per_step / dt / peak
        epoch = train_loader.epoch
        eta_min = (N - step) * dt / 60
        line = (f"step {step:05d}/{N:05d} | loss {step_loss:.4f} | lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | "
                f"tok/s {tok_per_sec:.0f} | mfu {mfu:.1f} | epoch {epoch} | eta {eta_min:.1f}m")
        loop["last_line"] = line
        say(line)
        metrics.write({"step": step, "train/loss": step_loss, "train/loss_ema": loss_ema, "train/lr_mult": lrm,
                       "train/dt_ms": dt * 1000, "train/tok_per_sec": tok_per_sec, "train/mfu": mfu,
                       "train/epoch": epoch, "train/grad_norm": grad_norm, "train/total_time_s": loop["total_time"]})
        if stopping and step < N:  # (at the last step the run just finishes)
            # Evaluation and samples wait for the re-run: the notice is short.
            return notice.stop_here("base_train", ckpt_dir, step, model, opt, rt,
                                    lambda: checkpoint(step, consumed, stopped=True), say)
        if is_eval_step(step):
            evaluate(step)
        if tc.sample_every > 0 and (step % tc.sample_every == 0 or step == N):
            sample(step)
        if save_now:
            checkpoint(step, consumed)

    result = _result(ckpt_dir, step, N, loop, plan, rt.master, resume_step)
    if rt.master:
        say(f"done: {step} steps, min val bpb {loop['min_val_bpb']}, {loop['total_time'] / 60:.2f} min of training; "
            f"checkpoints in {ckpt_dir}")
    return result


def _describe(model_config: dict) -> str:
    return f"depth {model_config['n_layer']}, dim {model_config['n_embd']}, vocab {model_config['vocab_size']}"


def _result(ckpt_dir: str, step: int, N: int, loop: dict, plan, master: bool, resumed_from: int | None) -> dict:
    """The stage's ref (rank 0 also writes it as result.json, with the manifest of the checkpoint dir)."""
    figures = {
        "step": step, "num_iterations": N, "val_bpb": loop["val_bpb"], "min_val_bpb": loop["min_val_bpb"],
        "num_params": plan.num_params, "total_tokens": step * plan.total_batch_size,
        "total_training_time_s": loop["total_time"], "flops_per_token": plan.flops_per_token,
        "metrics_path": join(ckpt_dir, "metrics.jsonl"), "resumed_from": resumed_from,
    }
    return artifacts.make_ref("base_train", ckpt_dir, figures) if master else {"path": ckpt_dir, **figures}


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    stage_main("base_train", argv, run, on_notice=True)


if __name__ == "__main__":
    main()
