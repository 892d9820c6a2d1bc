"""Reinforcement learning on math word problems: sample, score, reinforce what scored.

    nanochat rl --preset tiny
    nanochat rl --preset d4-cpu --tasks math:4000 --num-samples 8
    torchrun --standalone --nproc_per_node=8 -m nanochat_core.stages.chat_rl --config cfg.json

nanochat's simplified GRPO, i.e. REINFORCE with a group baseline: for each question, sample
`num_samples` completions (temperature 1.0, top-k 50, tools on) from the current policy; reward 1 if
the `#### N` answer is right; advantage = reward − the group's mean (no std division, no KL, no
clipping: the run stays on-policy); the loss is −Σ advantage · log p(token) over the sampled tokens
(tool outputs are forced, never learned), normalised by the number of tokens. The learning rate is
`init_lr_frac` (0.05) of SFT's and decays linearly to 0. pass@k on GSM8K test (evaluation only) is
logged every `eval_every` steps and at the end. Offline the training problems are our generated ones
(`math:N`); with internet, `gsm8k-train` is GSM8K's train split as in nanochat.
Starts from its `model` input (run by hand: `<base>/chatsft_checkpoints/d<depth>`, or --model); writes
`<base>/chatrl_checkpoints/d<depth>/`.
"""

from __future__ import annotations

import time

import torch

from nanochat_core import artifacts, dist, hardware
from nanochat_core.chat_format import render_for_completion
from nanochat_core.checkpoint import start_fresh
from nanochat_core.config import PipelineConfig
from nanochat_core.data.packages import PackageUnavailable
from nanochat_core.engine import Engine
from nanochat_core.errors import UserError, exit_on_user_error, warn
from nanochat_core.paths import join, output_dir
from nanochat_core.post_train import StageRun, base_meta, build_mixture, dropped_tasks, load_start, make_optimizers
from nanochat_core.torch_stage import stage_main
from nanochat_core.tasks.math import GSM8K


def task_of(mixture, index: int):
    """The task that example `index` of a TaskMixture comes from (it knows how to score it)."""
    return mixture.tasks[mixture.index[index][0]]


def policy_gradient_loss(model, sequences, masks, advantages, device, autocast) -> tuple[torch.Tensor, int]:
    """−Σ advantage·log p over the sampled (mask 1) tokens of a padded batch, and that token count."""
    width = max(len(s) for s in sequences) - 1
    x = torch.zeros((len(sequences), width), dtype=torch.long)
    y = torch.full((len(sequences), width), -1, dtype=torch.long)
    for i, (seq, mask) in enumerate(zip(sequences, masks)):
        n = len(seq) - 1
        x[i, :n] = torch.tensor(seq[:-1])
        t = torch.tensor(seq[1:])
        t[torch.tensor(mask[1:]) == 0] = -1
        y[i, :n] = t
    x, y = x.to(device), y.to(device)
    with autocast():
        nll = model(x, y, loss_reduction="none").view(len(sequences), width)
    valid = (y >= 0).float()
    adv = torch.tensor(advantages, dtype=torch.float32, device=device)[:, None]
    return (nll.float() * adv * valid).sum(), int(valid.sum())


def sample_and_score(engine, tokenizer, task, conv, num_samples, rc, seed):
    prompt = render_for_completion(tokenizer, conv)
    seqs, masks = engine.generate_batch(prompt, num_samples, max_tokens=rc.max_new_tokens, temperature=rc.temperature,
                                        top_k=rc.top_k or None, seed=seed)
    rewards = [task.reward(conv, tokenizer.decode(s[len(prompt):])) for s in seqs]
    return seqs, masks, rewards


@torch.no_grad()
def pass_at_k(engine, tokenizer, rc, rt: dist.Runtime, k: int) -> dict[str, float]:
    """pass@1..k on the first `eval_examples` GSM8K test questions (striped over ranks)."""
    task = GSM8K("test", stop=rc.eval_examples)
    hits = torch.zeros(k + 1, device=rt.device)  # hits[j] = questions solved within the first j samples; [k] = count
    for i in range(rt.rank, len(task), rt.world):
        _, _, rewards = sample_and_score(engine, tokenizer, task, task[i], k, rc, seed=10_000 + i)
        for j in range(1, k + 1):
            hits[j - 1] += float(any(r > 0 for r in rewards[:j]))
        hits[k] += 1
    dist.all_reduce_sum(hits)
    n = max(1.0, float(hits[k]))
    return {f"pass@{j}": float(hits[j - 1]) / n for j in range(1, k + 1)}


def run(cfg: PipelineConfig, inputs: dict[str, dict]) -> dict:
    with dist.session(cfg.chat_rl.device_type) as rt:
        return train(cfg, inputs, rt)


def train(cfg: PipelineConfig, inputs: dict[str, dict], rt: dist.Runtime) -> dict:
    rc = cfg.chat_rl
    started = time.time()
    say = dist.Console(rt.master)
    src = inputs["model"]["path"]
    torch.manual_seed(rc.seed)
    mixture = build_mixture(rc.tasks, rc.seed)  # before the model: a bad task spec costs no model load
    model, tokenizer, start_meta = load_start("chat_rl", src, rc.step, rt.device)
    out = output_dir("chat_rl", cfg, depth=model.config.n_layer)
    if rc.examples_per_step % rt.world:
        raise UserError(f"--examples-per-step {rc.examples_per_step} does not split over {rt.world} processes; "
                        "pick a multiple of the process count")
    per_rank = rc.examples_per_step // rt.world
    N = rc.num_iterations if rc.num_iterations > 0 else len(mixture) // rc.examples_per_step
    if N < 1:
        raise UserError(f"{len(mixture)} problems are fewer than one step's {rc.examples_per_step}; add problems "
                        "or lower --examples-per-step")
    engine = Engine(model, tokenizer)
    autocast = hardware.autocast(rc.dtype, rt.device)
    start_fresh(out, rt.master, dist.barrier, say)
    ctx = StageRun("chat_rl", "rl", out, rt, autocast)
    metrics = ctx.metrics
    metrics.truncate_after(0)  # left by a run that crashed before its first checkpoint
    opt = make_optimizers(model, rc)
    say(f"rl: from {src} (step {start_meta['step']}), {len(mixture):,} problems, {N} steps of {rc.examples_per_step} "
        f"questions × {rc.num_samples} samples, {rc.max_new_tokens} new tokens")

    def evaluate(step: int) -> dict:
        if rc.eval_examples <= 0:
            return {}
        model.eval()
        try:
            scores = pass_at_k(engine, tokenizer, rc, rt, rc.num_samples)
        except PackageUnavailable as e:  # every rank sees the same registry answer
            warn(f"{e.reason}: no GSM8K pass@k during RL")
            return {}
        say(f"rl step {step:05d} | GSM8K test " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        metrics.write({"step": step, **{f"eval/{k}": v for k, v in scores.items()}})
        return scores

    scores, reward_sum, reward_count, seconds_training = {}, 0.0, 0, 0.0
    for step in range(N):
        t0 = time.perf_counter()
        lrm = 1.0 - step / N
        opt.set_schedule(lrm, 0.95)
        batch = []
        model.eval()
        for q in range(per_rank):
            index = (step * rc.examples_per_step + rt.rank * per_rank + q) % len(mixture)
            conv = mixture[index]
            batch.append(sample_and_score(engine, tokenizer, task_of(mixture, index), conv, rc.num_samples, rc,
                                          seed=rc.seed * 1_000_003 + index * 131 + step))
        model.train()
        # Advantages per question; then all samples in device-sized chunks, one backward per chunk.
        flat = []
        for seqs, masks, rewards in batch:
            mean = sum(rewards) / len(rewards)
            flat += [(s, m, r - mean) for s, m, r in zip(seqs, masks, rewards)]
        chunks = [flat[i: i + rc.device_batch_size] for i in range(0, len(flat), rc.device_batch_size)]
        total_tokens = max(1, sum(sum(m) for _, m, _ in flat))
        for chunk in chunks:
            loss, _ = policy_gradient_loss(model, [c[0] for c in chunk], [c[1] for c in chunk], [c[2] for c in chunk],
                                           rt.device, autocast)
            (loss / total_tokens).backward()  # normalised per sampled token of this rank's batch
        opt.step(1.0)
        opt.zero_grad()
        # This step's figures summed over ranks: rewards and how many, questions solved by at least one
        # sample and how many, and the sampled (trained) tokens.
        totals = torch.tensor([sum(sum(r) for _, _, r in batch), sum(len(r) for _, _, r in batch),
                               sum(float(any(x > 0 for x in r)) for _, _, r in batch), len(batch),
                               sum(sum(m) for _, m, _ in flat)], dtype=torch.float32, device=rt.device)
        summed = dict(zip(("reward_sum", "rewards", "solved", "questions", "sampled_tokens"),
                          dist.all_reduce_sum(totals).tolist()))
        reward_mean = summed["reward_sum"] / summed["rewards"]
        pass_k = summed["solved"] / summed["questions"]
        reward_sum, reward_count = reward_sum + summed["reward_sum"], reward_count + int(summed["rewards"])
        dt = time.perf_counter() - t0
        seconds_training += dt
        say(f"rl step {step + 1:05d}/{N:05d} | reward {reward_mean:.3f} | pass@{rc.num_samples} {pass_k:.3f} | "
            f"lrm {lrm:.2f} | dt {dt:.1f}s")
        metrics.write({"step": step + 1, "train/reward": reward_mean, f"train/pass@{rc.num_samples}": pass_k,
                       "train/sampled_tokens": summed["sampled_tokens"], "train/lr_mult": lrm, "train/dt_ms": dt * 1000})
        if step + 1 == N or (rc.eval_every > 0 and (step + 1) % rc.eval_every == 0):
            scores = evaluate(step + 1)
    ctx.meta = base_meta("chat_rl", N, model, start_meta, src, cfg, rc)
    ctx.checkpoint(N, model, opt, None, {})
    figures = {"step": N, "started_from": src, "mean_reward": reward_sum / max(1, reward_count),
               **{f"GSM8K {k}": v for k, v in scores.items()}, "train_time_s": seconds_training,
               "seconds": time.time() - started, "metrics_path": join(out, "metrics.jsonl"),
               "dropped_tasks": dropped_tasks(mixture)}
    ref = artifacts.make_ref("chat_rl", out, figures) if rt.master else {"path": out, **figures}
    say(f"rl done: {N} steps, mean reward {figures['mean_reward']:.3f}, {figures['seconds']:.0f}s; checkpoints in {out}")
    return ref


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    stage_main("chat_rl", argv, run)  # with --nproc-per-node N > 1 by hand: torchrun for the N processes


if __name__ == "__main__":
    main()
