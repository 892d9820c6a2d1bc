"""Presets: the speedrun's variants as code, each derived from the d20 defaults in config.py.

    nanochat plan --preset d12 --nproc-per-node 1
"""

from __future__ import annotations

from typing import Callable

from nanochat_core.config import PipelineConfig
from nanochat_core.errors import UserError


def _derive(base: PipelineConfig, name: str, **stages: dict) -> PipelineConfig:
    """`base` with the given per-stage field updates, validated, renamed to `name`."""
    data = base.model_dump()
    data["preset"] = name
    for stage, fields in stages.items():
        data[stage].update(fields)
    return PipelineConfig.model_validate(data)


def d20() -> PipelineConfig:
    """The $100 speedrun: 561M parameters, 11.2B tokens, 8×H100 for ~4 hours."""
    return _derive(PipelineConfig(), "d20", base_train={"nproc_per_node": 8})


def d26() -> PipelineConfig:
    """~1.2B parameters; needs ~460 shards and half the device batch of d20 to fit 80 GB."""
    return _derive(
        d20(), "d26", download={"num_shards": 500}, base_train={"depth": 26, "device_batch_size": 16}
    )


def d32() -> PipelineConfig:
    """~1.9B parameters; ~730 shards."""
    return _derive(
        d20(), "d32", download={"num_shards": 800}, base_train={"depth": 32, "device_batch_size": 8}
    )


def d12() -> PipelineConfig:
    """One GPU: d20's total batch kept through gradient accumulation (8 steps at device batch 32)."""
    return _derive(
        d20(), "d12", download={"num_shards": 60}, base_train={"depth": 12, "nproc_per_node": 1}
    )


def d4_cpu() -> PipelineConfig:
    """The small-GPU / CPU report: depth 4, dim 128, head dim 64, seq 512, 100 iterations."""
    return _derive(
        d20(),
        "d4-cpu",
        download={"num_shards": 8},
        tok_train={"vocab_size": 8192, "max_chars": 50_000_000},
        base_train={
            "depth": 4,
            "aspect_ratio": 32,
            "head_dim": 64,
            "max_seq_len": 512,
            "device_batch_size": 1,
            "total_batch_size": 4096,
            "num_iterations": 100,
            "nproc_per_node": 1,
            "eval_every": 50,
            "eval_tokens": 65_536,
            "sample_every": -1,
            "device_type": "cpu",
        },
        plan={"gpu": "cpu"},
    )


def tiny() -> PipelineConfig:
    """The CPU smoke run of every stage: vocab 4,096, depth 2, seq 256, minutes on 2 cores."""
    return _derive(
        d20(),
        "tiny",
        corpus={"tiers": ["lit"]},
        download={"num_shards": 4},
        tok_train={"vocab_size": 4096, "max_chars": 5_000_000},
        tok_eval={"max_docs": 200},
        base_train={
            "depth": 2,
            "aspect_ratio": 64,
            "head_dim": 64,
            "max_seq_len": 256,
            "device_batch_size": 8,
            "total_batch_size": 4096,
            "num_iterations": 60,
            "nproc_per_node": 1,
            "eval_every": 30,
            "eval_tokens": 16_384,
            "sample_every": -1,
            "device_type": "cpu",
        },
        plan={"gpu": "cpu"},
    )


PRESETS: dict[str, Callable[[], PipelineConfig]] = {
    "tiny": tiny,
    "d4-cpu": d4_cpu,
    "d12": d12,
    "d20": d20,
    "d26": d26,
    "d32": d32,
}


def get_preset(name: str) -> PipelineConfig:
    """The preset called `name`, or a UserError listing the valid names."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
