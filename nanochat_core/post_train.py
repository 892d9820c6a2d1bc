"""What midtraining, SFT and RL share: loading the starting model, the task mixture, batching
conversations, the optimizer pair, and writing checkpoints like base_train does.

    model, tokenizer, meta = load_start("mid_train", inputs["model"]["path"], step, device)
    ctx = StageRun("mid_train", "mid-train", out, rt, autocast, cfg.mid_train)
    evaluate = val_loss_logger(ctx, model, val_batches)    # masked val loss, printed and logged
    return train_supervised(ctx, cfg, inputs, model, meta, next_rows, N, accum, tokens_per_step, evaluate,
                            started_from=source, conversations=n)   # cadence, continue or start, loop, ref

Stage outputs (paths.output_dir): <base>/mid_checkpoints/d<depth>, chatsft_checkpoints/d<depth>,
chatrl_checkpoints/d<depth> (nanochat's names), at the depth of the model they start from; each is
readable by `checkpoint.load_model` because the meta carries the model config and the tokenizer directory.
Mid and SFT checkpoint every `save_every` steps (or `save_every_minutes` of estimated training) and
continue an unfinished run of the same settings and inputs exactly: model, optimizer, the batch
cursor and the RNG are in the checkpoint.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as tdist

from nanochat_core import artifacts, dist, notice
from nanochat_core.checkpoint import (
    continue_or_start, latest_step, load_model, load_model_state, load_rank_state, read_meta, run_key, save_checkpoint,
)
from nanochat_core.config import PipelineConfig, PostTrainConfig
from nanochat_core.data.packages import PackageUnavailable
from nanochat_core.errors import UserError, warn, with_reasons
from nanochat_core.model.optim import Optimizers, lr_multiplier, muon_momentum
from nanochat_core.paths import join
from nanochat_core.plan import save_interval, step_seconds
from nanochat_core.registry import FAMILIES, STAGES
from nanochat_core.tasks import TaskMixture, build_task


def load_start(stage: str, source: str, step: int | None, device):
    """(model in eval mode, tokenizer, meta) from the checkpoint directory `stage` starts from."""
    if latest_step(source) is None:
        family = STAGES[stage].starts_from
        before = f"`nanochat {FAMILIES[family].command}`" if family else "the stage that trains it"
        raise UserError(f"no complete checkpoint in {source}; run {before} first or pass --model")
    model, tokenizer, meta = load_model(source, step, device)
    if tokenizer is None:
        raise UserError(f"the tokenizer this checkpoint was trained with ({meta.get('tokenizer_dir')}) is gone; "
                        "run `nanochat tok-train` again or restore that directory")
    return model, tokenizer, meta


class Batches:
    """A stage's training batches as a stream that can stop and continue: `make(cursor)` returns
    (batch, next cursor), and the cursor is what a checkpoint keeps of the data position."""

    def __init__(self, make: Callable[[int], tuple]):
        self.make, self.cursor = make, 0

    def __call__(self):
        batch, self.cursor = self.make(self.cursor)
        return batch


@dataclass
class StageRun:
    """What a post-training stage's loop and its end share: who it is, where it writes, its sinks, and
    the facts its checkpoints record (the meta, less the step and the loop's figures)."""

    stage: str  # registry name (mid_train): the ref's stage
    label: str  # console prefix (mid-train)
    out: str  # checkpoint directory
    rt: dist.Runtime
    autocast: Callable
    sc: PostTrainConfig | None = None
    meta: dict = field(default_factory=dict)
    key: str = ""  # checkpoint.run_key of this run's settings and inputs
    save_every: int = 0  # steps between checkpoints (0: only the final one)
    resumed_from: int | None = None
    eval_owed: bool = False  # continued from a stop on notice, which skipped that step's evaluation
    say: dist.Console = field(init=False)
    metrics: dist.MetricsLog = field(init=False)
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.say = dist.Console(self.rt.master)
        self.metrics = dist.MetricsLog(join(self.out, "metrics.jsonl") if self.rt.master else None)

    def plan_checkpoints(self, cfg: PipelineConfig, inputs: dict[str, dict], model, start_meta: dict, source: str,
                         num_iterations: int, tokens_per_step: int) -> None:
        """Fix the run key, the checkpoint cadence (save_every_minutes through the plan's estimate of a
        step: `tokens_per_step` at the model's FLOPs per token) and the meta every checkpoint carries."""
        sc = self.sc
        self.key = run_key(self.stage, sc.run_settings(), self.rt.world, inputs)
        seconds = step_seconds(model.estimate_flops(), tokens_per_step, self.rt.world, cfg.plan)
        self.save_every = save_interval(sc, num_iterations, seconds)
        self.meta = {**base_meta(self.stage, 0, model, start_meta, source, cfg, sc),
                     "num_iterations": num_iterations, "run_key": self.key}
        if self.save_every and self.save_every < num_iterations:
            self.say(f"{self.label}: checkpoints every {self.save_every} steps and at step {num_iterations}")

    def resume_or_start(self, model, opt, batches: Batches) -> tuple[int, dict]:
        """(first step, loop figures): an unfinished run with this key in `out` continues from its latest
        checkpoint (model, optimizer, batch cursor, RNG, figures); else old checkpoints move aside."""
        rt = self.rt
        step = continue_or_start(self.out, self.key, rt.master, dist.barrier, self.say, force=self.sc.resume)
        self.resumed_from = step
        if step is None:
            self.metrics.truncate_after(0)  # left by a run that crashed before its first checkpoint
            return 0, {"train_loss": None, "val_loss": None, "train_time_s": 0.0, "tokens": 0}
        meta = read_meta(self.out, step)
        try:
            model.load_state_dict(load_model_state(self.out, step, rt.device))
        except RuntimeError:
            raise UserError(f"checkpoint {self.out} step {step} is a different model than --model; "
                            "drop --resume to start fresh") from None
        rank_state = load_rank_state(self.out, step, rt.rank, rt.device)
        opt.load_state_dict(rank_state["optim"])
        torch.set_rng_state(rank_state["rng"].cpu())
        batches.cursor = rank_state["cursor"]
        self.metrics.truncate_after(step)
        self.eval_owed = meta.get("stopped_at_step") == step
        self.say(f"{self.label}: resumed from step {step} of {self.out}")
        return step, meta["loop"]

    def checkpoint(self, step: int, model, opt, batches: Batches | None, loop: dict, stopped: bool = False) -> None:
        """Checkpoint in base_train's layout (meta written last); the model config and tokenizer dir in
        the meta make it loadable by `checkpoint.load_model`."""
        rt = self.rt
        rank_state = {"optim": opt.state_dict(), "rng": torch.get_rng_state(),
                      "cursor": batches.cursor if batches else 0}
        meta = {**self.meta, "step": step, "loop": loop, "time": time.time(),
                **({"stopped_at_step": step} if stopped else {})}
        notice.timed_save(lambda: save_checkpoint(
            self.out, step, rt.rank, model.state_dict() if rt.master else None, rank_state,
            meta if rt.master else None, barrier=dist.barrier, keep_last=self.sc.keep_last if self.sc else 1),
            notice.checkpoint_bytes(model, opt, rt.world))
        self.metrics.flush()


def make_optimizers(model, sc):
    """base_train's Muon + AdamW pair with every learning rate scaled by `init_lr_frac`."""
    f = sc.init_lr_frac
    return Optimizers(model, sc.embedding_lr * f, sc.unembedding_lr * f, sc.matrix_lr * f, 0.0)


def build_mixture(specs: list[str], seed: int, words_path: str | None = None):
    """The mixture of `specs`. A task whose package the registry no longer serves is left out with a
    warning (`mixture.dropped`: spec -> the registry's answer); the stage fails only if none is left."""
    if not specs:
        raise UserError("the task mixture is empty; pass --tasks with at least one task spec")
    tasks, dropped = [], {}
    for spec in specs:
        try:
            tasks.append(build_task(spec, seed=seed, words_path=words_path))
        except PackageUnavailable as e:
            dropped[spec] = e.reason
            warn(f"{e.reason}: task {spec} is left out of the mixture")
    if not tasks:
        raise UserError(f"no task of the mixture has data ({'; '.join(dropped.values())}); "
                        "pass --tasks with tasks whose data is at hand, e.g. custom@/path/conversations.jsonl")
    mixture = TaskMixture(tasks, seed=seed)
    mixture.dropped = dropped
    return mixture


def dropped_tasks(mixture) -> str | None:
    """The tasks a mixture lost and why, for the stage's ref (and so the report card); None if none."""
    return with_reasons(mixture.dropped) or None


def split_val(mixture, val_examples: int):
    """(train indices, val indices): the last `val_examples` of the shuffled mixture are held out."""
    n = len(mixture)
    val = min(val_examples, n // 10) if val_examples else 0
    return range(0, n - val), range(n - val, n)


def sft_batch(rows: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rendered (ids, mask) pairs -> (inputs, targets) padded to the longest row; targets are -1
    (ignored) wherever the next token is not trained (mask 0) and on padding."""
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        targets = torch.tensor(ids[1:])
        targets[torch.tensor(mask[1:]) == 0] = -1
        y[i, :n] = targets
    return x.to(device), y.to(device)


def all_reduce_min(value: int, device) -> int:
    """The smallest `value` across ranks (every rank must run the same number of steps)."""
    if tdist.is_available() and tdist.is_initialized():
        t = torch.tensor([value], dtype=torch.long, device=device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return int(t.item())
    return value


def base_meta(stage: str, step: int, model, start_meta: dict, source: str, cfg: PipelineConfig, stage_cfg) -> dict:
    return {
        "stage": stage, "step": step, "model_config": model.config.to_dict(), "user_config": stage_cfg.model_dump(),
        "preset": cfg.preset, "started_from": source, "started_from_step": start_meta.get("step"),
        "tokenizer_dir": start_meta.get("tokenizer_dir"), "time": time.time(),
    }


def train_supervised(ctx: StageRun, cfg: PipelineConfig, inputs: dict[str, dict], model, start_meta: dict,
                     next_rows: Callable[[int], tuple], N: int, accum: int, tokens_per_step: int, evaluate,
                     **provenance) -> dict:
    """mid_train's and chat_sft's run once their data is ready: the checkpoint cadence, continuing an
    unfinished run or starting fresh, the loop, the final checkpoint and the stage's ref."""
    ctx.plan_checkpoints(cfg, inputs, model, start_meta, provenance["started_from"], N, tokens_per_step)
    batches, opt = Batches(next_rows), make_optimizers(model, ctx.sc)
    start, stats = ctx.resume_or_start(model, opt, batches)
    stats = train_loop(ctx, model, opt, batches, N, accum, ctx.sc, evaluate, start, stats)
    if "stopped" in stats:
        return stats["stopped"]
    ctx.checkpoint(N, model, opt, batches, stats)
    out = ctx.out
    figures = {"step": N, **provenance, "train_loss": stats["train_loss"], "val_loss": stats["val_loss"],
               "trained_tokens": stats["tokens"], "train_time_s": stats["train_time_s"],
               "seconds": time.time() - ctx.started, "metrics_path": join(out, "metrics.jsonl"),
               "resumed_from": ctx.resumed_from}
    ref = artifacts.make_ref(ctx.stage, out, figures) if ctx.rt.master else {"path": out, **figures}
    ctx.say(f"{ctx.label} done: {N} steps, val loss {stats['val_loss']}, {figures['seconds']:.0f}s; checkpoints in {out}")
    return ref


def val_loss_logger(ctx: StageRun, model, batches_of: Callable[[], Iterable]) -> Callable[[int], float | None]:
    """`evaluate(step)` for train_loop: the masked loss over the held-out batches, printed and logged."""

    def evaluate(step: int) -> float | None:
        loss = masked_loss(model, batches_of(), ctx.autocast, ctx.rt.device)
        if loss is not None:
            ctx.say(f"{ctx.label} step {step:05d} | val loss {loss:.4f}")
            ctx.metrics.write({"step": step, "val/loss": loss})
        return loss

    return evaluate


@torch.no_grad()
def masked_loss(model, batches, autocast, device) -> float | None:
    """Mean loss per trained token over (inputs, targets) batches, summed across ranks."""
    total = torch.zeros(2, device=device)
    was_training = model.training
    model.eval()
    for x, y in batches:
        with autocast():
            loss = model(x, y, loss_reduction="sum")
        total[0] += loss.float()
        total[1] += (y >= 0).sum()
    model.train(was_training)
    dist.all_reduce_sum(total)
    return float(total[0] / total[1]) if total[1] > 0 else None


def train_loop(ctx: StageRun, model, opt, next_batch: Batches, num_iterations: int, accum: int, sc, evaluate=None,
               start: int = 0, stats: dict | None = None, grad_clip: float = 1.0) -> dict:
    """The optimizer loop mid and SFT share: `accum` micro-batches per step, each micro-batch's loss
    the mean over its trained tokens; lr decays linearly over the last `warmdown_ratio` of the steps.
    Steps `start`+1..N (a continued run passes its checkpoint's step and figures); `evaluate(step)`
    runs every `eval_every` steps and at the end; a checkpoint every `ctx.save_every` steps (the final
    one is train_supervised's). Returns the loop's figures; after a stop on notice (SIGTERM), also the
    stop's record under "stopped"."""
    rt, say, metrics, autocast, stage = ctx.rt, ctx.say, ctx.metrics, ctx.autocast, ctx.label
    N = num_iterations
    stats = stats or {"train_loss": None, "val_loss": None, "train_time_s": 0.0, "tokens": 0}
    if evaluate is not None and ctx.eval_owed and sc.eval_every > 0 and start % sc.eval_every == 0:
        stats["val_loss"] = evaluate(start)  # the evaluation the stop skipped
    model.train()
    for step in range(start, N):
        lrm = lr_multiplier(step, N, 0.0, sc.warmdown_ratio, 0.0)
        opt.set_schedule(lrm, muon_momentum(step))
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=rt.device)
        tokens = 0
        for _ in range(accum):
            x, y = next_batch()
            valid = int((y >= 0).sum())
            tokens += valid
            if valid == 0:  # nothing trained in this micro-batch (all prompt / padding)
                continue
            with autocast():
                loss = model(x, y, loss_reduction="sum") / valid
            loss_sum += loss.detach()
            (loss / accum).backward()
        # One all-reduce carries the loss and whether any rank has had notice: all stop after this step.
        step_loss, stopping = notice.reduce_with_loss(loss_sum / accum, rt)
        if not math.isfinite(step_loss):
            raise UserError(f"{stage}: the loss became {step_loss} at step {step + 1}; lower the learning "
                            "rates (--init-lr-frac) or check the task mixture")
        opt.step(grad_clip)
        opt.zero_grad()
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        stats["train_time_s"] += dt
        stats["tokens"] += tokens * rt.world
        stats["train_loss"] = step_loss
        say(f"{stage} step {step + 1:05d}/{N:05d} | loss {step_loss:.4f} | lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | "
            f"trained tok/s {tokens * rt.world / dt:.0f}")
        metrics.write({"step": step + 1, "train/loss": step_loss, "train/lr_mult": lrm, "train/dt_ms": dt * 1000,
                       "train/tok_per_sec": tokens * rt.world / dt})
        last = step + 1 == N
        if stopping and not last:  # (at the last step the run just finishes)
            save = functools.partial(ctx.checkpoint, step + 1, model, opt, next_batch, stats, stopped=True)
            return {**stats, "stopped": notice.stop_here(ctx.stage, ctx.out, step + 1, model, opt, rt, save, say)}
        if evaluate is not None and (last or (sc.eval_every > 0 and (step + 1) % sc.eval_every == 0)):
            stats["val_loss"] = evaluate(step + 1)
        if not last and ctx.save_every and (step + 1) % ctx.save_every == 0:
            ctx.checkpoint(step + 1, model, opt, next_batch, stats)
    return stats
