"""The derived training plan (DESIGN.md §4): what a preset costs before a GPU is rented.

    nanochat plan --preset d20 --nproc-per-node 8
    nanochat plan --preset d12 --device-batch-size 8 --gpu a100 --json

Parameters are counted on the real GPT instantiated on the meta device; base_train derives its
gradient accumulation and horizon from this same function.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from nanochat_core.config import SAMPLE_SOURCE, BaseTrainConfig, PipelineConfig, PlanConfig
from nanochat_core.errors import UserError, exit_on_user_error
from nanochat_core.flags import config_from_args, stage_parser
from nanochat_core.hardware import get_device
from nanochat_core.presets import GPU_PRESETS

GIB = 1024**3
# Share of a device's memory the plan lets a run fill; the rest is the allocator's and CUDA's.
USABLE_MEMORY = 0.9


@dataclass(frozen=True)
class Plan:
    depth: int
    model_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_seq_len: int
    num_params: int
    wte_params: int
    world_size: int
    device_batch_size: int
    tokens_per_fwdbwd: int
    world_tokens_per_fwdbwd: int
    total_batch_size: int
    grad_accum_steps: int
    num_iterations: int
    iterations_from: str  # num_iterations | target_flops | target_param_data_ratio
    total_tokens: int
    tokens_per_param: float
    flops_per_token: int
    total_flops: float
    chars_per_token: float
    shards_needed: int
    num_shards: int
    epochs: float
    gpu: str
    mfu: float
    est_hours: float
    save_every: int  # steps between checkpoints, 0: only the final step (which is always saved)
    num_checkpoints: int
    est_cost_usd: float
    est_peak_mem_gb: float
    device_memory_gb: float
    suggested_device_batch_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def estimate_peak_mem_gb(num_params: int, wte_params: int, n_layer: int, model_dim: int,
                         padded_vocab: int, device_batch_size: int, max_seq_len: int) -> float:
    """Rough peak memory of one training process in GiB.

    fp32 weights and grads (8 B/param), optimizer state (AdamW: 8 B for embedding and lm_head;
    Muon: 4 B momentum for the matrices), bf16 activations at ~34·d bytes per token per layer
    (Korthikanti et al. 2022 without dropout masks' dominance, flash attention: no T² term), and
    bf16 logits for the batch. An estimate to choose a batch size, not a promise.
    """
    lm_head = padded_vocab * model_dim
    matrices = num_params - wte_params - lm_head
    states = 8 * num_params + 8 * (wte_params + lm_head) + 4 * matrices
    tokens = device_batch_size * max_seq_len
    activations = 34 * model_dim * n_layer * tokens
    logits = 2 * tokens * padded_vocab
    return (states + activations + logits) / GIB


def step_seconds(flops_per_token: float, tokens_per_step: int, world: int, assume: PlanConfig) -> float:
    """Estimated seconds per optimizer step on the plan's GPU at its MFU (6N-style FLOPs per token)."""
    return flops_per_token * tokens_per_step / (get_device(assume.gpu).peak_flops * world * assume.mfu)


def save_interval(train, num_iterations: int, seconds_per_step: float) -> int:
    """Steps between checkpoints of a CheckpointedConfig: its save_every, or else save_every_minutes of
    estimated training time rounded down to whole steps (at least 1); 0 when neither is set."""
    if train.save_every > 0:
        return train.save_every
    if train.save_every_minutes > 0:
        return max(1, min(num_iterations, int(train.save_every_minutes * 60 / seconds_per_step)))
    return 0


def checkpoint_steps(num_iterations: int, every: int) -> int:
    """How many checkpoints a run of `num_iterations` writes: every `every` steps, plus the final one."""
    return (num_iterations - 1) // every + 1 if every else 1


def make_plan(train: BaseTrainConfig, vocab_size: int, num_shards: int, assume: PlanConfig) -> Plan:
    from nanochat_core.model.gpt import GPTConfig, build_model  # torch stays out of config-only imports

    mcfg = GPTConfig.from_depth(
        train.depth, vocab_size, train.max_seq_len, train.aspect_ratio, train.head_dim, train.kv_head_ratio
    )
    model = build_model(mcfg, device="meta")
    num_params = model.num_params()
    wte_params = model.transformer.wte.weight.numel()
    flops_per_token = model.estimate_flops()

    world = train.world_size
    tokens_per_fwdbwd = train.device_batch_size * train.max_seq_len
    world_tokens = tokens_per_fwdbwd * world
    if train.total_batch_size % world_tokens:
        raise UserError(
            f"total batch {train.total_batch_size:,} tokens is not a multiple of device batch "
            f"{train.device_batch_size} × seq {train.max_seq_len} × {world} processes = {world_tokens:,} "
            f"tokens; set --total-batch-size to a multiple of {world_tokens:,} or change --device-batch-size"
        )
    grad_accum_steps = train.total_batch_size // world_tokens

    if train.num_iterations > 0:
        num_iterations, source = train.num_iterations, "num_iterations"
    elif train.target_flops > 0:
        num_iterations = round(train.target_flops / (flops_per_token * train.total_batch_size))
        source = "target_flops"
    elif train.target_param_data_ratio > 0:
        num_iterations = int(train.target_param_data_ratio * num_params // train.total_batch_size)
        source = "target_param_data_ratio"
    else:
        raise UserError(
            "no training horizon: set --num-iterations, --target-flops or --target-param-data-ratio "
            "to a positive value"
        )
    if num_iterations < 1:
        raise UserError(
            f"the {source} horizon gives {num_iterations} steps at {train.total_batch_size:,} tokens per "
            "step; raise it or lower --total-batch-size"
        )
    total_tokens = num_iterations * train.total_batch_size
    total_flops = float(flops_per_token) * total_tokens
    shards_needed = math.ceil(total_tokens * assume.chars_per_token / assume.chars_per_shard)
    tokens_available = num_shards * assume.chars_per_shard / assume.chars_per_token
    device = get_device(assume.gpu)
    seconds_per_step = step_seconds(flops_per_token, train.total_batch_size, world, assume)
    est_seconds = seconds_per_step * num_iterations
    save_every = save_interval(train, num_iterations, seconds_per_step)

    def peak(batch: int) -> float:
        return estimate_peak_mem_gb(num_params, wte_params, mcfg.n_layer, mcfg.n_embd,
                                    mcfg.padded_vocab_size, batch, train.max_seq_len)

    # Largest power-of-two device batch that fits in memory and still divides the total batch.
    suggested, batch = 0, 1
    while batch * train.max_seq_len * world <= train.total_batch_size:
        divides = train.total_batch_size % (batch * train.max_seq_len * world) == 0
        if divides and peak(batch) <= USABLE_MEMORY * device.memory_gb:
            suggested = batch
        batch *= 2

    return Plan(
        depth=train.depth, model_dim=mcfg.n_embd, num_heads=mcfg.n_head, num_kv_heads=mcfg.n_kv_head,
        head_dim=mcfg.head_dim, vocab_size=vocab_size, max_seq_len=train.max_seq_len,
        num_params=num_params, wte_params=wte_params, world_size=world,
        device_batch_size=train.device_batch_size, tokens_per_fwdbwd=tokens_per_fwdbwd,
        world_tokens_per_fwdbwd=world_tokens, total_batch_size=train.total_batch_size,
        grad_accum_steps=grad_accum_steps, num_iterations=num_iterations, iterations_from=source,
        total_tokens=total_tokens, tokens_per_param=total_tokens / num_params,
        flops_per_token=flops_per_token, total_flops=total_flops,
        chars_per_token=assume.chars_per_token, shards_needed=shards_needed, num_shards=num_shards,
        epochs=total_tokens / tokens_available, gpu=device.name, mfu=assume.mfu,
        est_hours=est_seconds / 3600, save_every=save_every,
        num_checkpoints=checkpoint_steps(num_iterations, save_every), est_cost_usd=est_seconds / 3600 * assume.usd_per_gpu_hour * world,
        est_peak_mem_gb=peak(train.device_batch_size), device_memory_gb=device.memory_gb,
        suggested_device_batch_size=suggested,
    )


def plan_for(cfg: PipelineConfig) -> Plan:
    """The plan of `cfg` on the processes base_train will get (devices_per_node when its own is unset)."""
    train = cfg.base_train.model_copy(update={"nproc_per_node": cfg.nproc("base_train") or 1})
    assume = cfg.plan
    if cfg.download.url_template == SAMPLE_SOURCE:
        # The sample corpus's shards hold corpus.shard_chars each, not a FineWeb shard's 250M: with the
        # FineWeb figure tiny's 4 shards looked like "0.00 epochs" of its data.
        assume = assume.model_copy(update={"chars_per_shard": cfg.corpus.shard_chars})
    return make_plan(train, cfg.tok_train.vocab_size, cfg.download.num_shards, assume)


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def checkpoint_line(p: Plan) -> str:
    if p.num_checkpoints == 1:
        return "at the end only: a crash loses the whole run (set --save-every-minutes)"
    minutes = p.est_hours * 60 * p.save_every / p.num_iterations
    if p.save_every == 1 and p.num_iterations > 1:  # one step outlasts --save-every-minutes
        return (f"after every step (each ~{minutes:.1f} min, longer than --save-every-minutes): "
                f"{p.num_checkpoints:,} saves")
    return (f"every {p.save_every:,} steps (~{minutes:.1f} min) and at the end: {p.num_checkpoints} saves; "
            f"a crash loses at most ~{minutes:.0f} min of training")


# Where the MFU default (PlanAssumptions.mfu) and the memory estimate come from. `bash scripts/gpu_check.sh`
# measures both on a lent card (step 1: MFU; step 3: memory at d20's shapes); a session that has run it
# on a GPU records the card, the date and the figures here. None has yet: the figures are assumptions
# (MFU 40%, nanochat's reported d20 figure; memory from the formula in estimate_peak_mem_gb).
MEASURED_ON: str | None = None


def figures_source() -> str:
    return (f"MFU and memory measured on {MEASURED_ON}" if MEASURED_ON else
            "MFU and memory are assumptions, not yet measured on a card (bash scripts/gpu_check.sh measures them)")


def format_plan(p: Plan, preset: str) -> str:
    """The readable table, in the order of the source document's worked examples."""
    fits = "fits" if p.est_peak_mem_gb <= USABLE_MEMORY * p.device_memory_gb else "DOES NOT FIT"
    lines = [
        f"plan for preset {preset}: {p.world_size} × {p.gpu}",
        "model",
        f"  depth {p.depth} → model_dim {p.model_dim}, {p.num_heads} heads of {p.head_dim} "
        f"({p.num_kv_heads} kv heads), vocab {p.vocab_size:,}, seq {p.max_seq_len}",
        f"  parameters {p.num_params:,} ({p.num_params / 1e6:.1f}M; token embedding {p.wte_params:,})",
        f"  FLOPs per token {p.flops_per_token:.3e}",
        "batch",
        f"  tokens per fwd/bwd {p.tokens_per_fwdbwd:,} per device ({p.device_batch_size} × {p.max_seq_len}), "
        f"{p.world_tokens_per_fwdbwd:,} across {p.world_size}",
        f"  total batch {p.total_batch_size:,} tokens → grad_accum_steps {p.grad_accum_steps}",
        "horizon",
        f"  num_iterations {p.num_iterations:,} (from {p.iterations_from})",
        f"  total tokens {_human(p.total_tokens)} = {p.tokens_per_param:.1f} tokens per parameter",
        f"  total FLOPs {p.total_flops:.3e}",
        "data",
        f"  shards needed {p.shards_needed:,} at {p.chars_per_token} chars/token; downloading {p.num_shards:,} "
        f"→ {p.epochs:.2f} epochs",
        "estimates",
        f"  time {p.est_hours:.2f} h ({p.est_hours * 60:.1f} min) at {p.mfu:.0%} MFU; cost ${p.est_cost_usd:,.2f}",
        f"  checkpoints {checkpoint_line(p)}",
        f"  peak memory ~{p.est_peak_mem_gb:.1f} GiB per device of {p.device_memory_gb:.0f} GiB ({fits}); "
        f"suggested --device-batch-size {p.suggested_device_batch_size or 'none fits: lower --max-seq-len or use a bigger device'}",
        f"  {figures_source()}",
    ]
    if preset in GPU_PRESETS and p.gpu == "cpu":
        lines.append(f"warning: preset {preset} is sized for GPUs: ~{p.est_hours:,.0f} h on {p.gpu}; its training stages "
                     "refuse a node without CUDA (use --preset tiny or d4-cpu, or force --device-type cpu)")
    if p.epochs > 1:
        lines.append(
            f"warning: {p.num_shards} shards hold only {1 / p.epochs:.0%} of the {_human(p.total_tokens)} "
            f"tokens, so the data repeats {p.epochs:.2f} times; download {p.shards_needed} or more shards"
        )
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(
        "nanochat plan",
        "Print the derived training plan: model size, batch, horizon, data, time, cost, memory.",
        {"base_train": None, "tok_train": ["vocab_size"], "download": ["num_shards"], "plan": None},
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ns = parser.parse_args(argv)
    cfg = config_from_args(ns)
    p = plan_for(cfg)
    print(json.dumps(p.to_dict(), indent=2) if ns.json else format_plan(p, cfg.preset))


if __name__ == "__main__":
    main()
