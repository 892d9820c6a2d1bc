"""Presets: the speedrun's variants as code, each derived from the d20 defaults in config.py.

    nanochat plan --preset d12 --nproc-per-node 1
"""

from __future__ import annotations

import contextvars
from typing import Annotated, Any, Callable

from pydantic import BeforeValidator

from nanochat_core.config import SAMPLE_SOURCE, PipelineConfig, TorchStageConfig
from nanochat_core.errors import UserError


# Set while a preset function validates what it derived: that data names the preset it is building, and
# PipelineConfig's validator must not build the same preset again from it (endless recursion).
_DERIVING = contextvars.ContextVar("deriving_preset", default=False)


def _derive(base: PipelineConfig, name: str, devices_per_node: int | None = None, device_type: str | None = None,
            **stages: dict) -> PipelineConfig:
    """`base` with the given per-stage field updates, validated, renamed to `name`; `device_type` goes to
    every torch stage's section at once."""
    data = base.model_dump()
    data["preset"] = name
    if devices_per_node is not None:
        data["devices_per_node"] = devices_per_node
    if device_type is not None:
        for section, field in PipelineConfig.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, TorchStageConfig):
                data[section]["device_type"] = device_type
    for stage, fields in stages.items():
        data[stage].update(fields)
    token = _DERIVING.set(True)
    try:
        return PipelineConfig.model_validate(data)
    finally:
        _DERIVING.reset(token)


def d20() -> PipelineConfig:
    """The $100 speedrun: 561M parameters, 11.2B tokens, 8×H100 for ~4 hours."""
    # A checkpoint every ~15 minutes of estimated training, so a node lost mid-run costs at most that much
    # (the step counts follow from the plan at run time: `nanochat plan --preset d20` prints them).
    every = {"save_every_minutes": 15}
    return _derive(PipelineConfig(devices_per_node=8), "d20", base_train=every, mid_train=every, chat_sft=every)


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
        d20(), "d12", devices_per_node=1, download={"num_shards": 60}, base_train={"depth": 12}
    )


def d4_cpu() -> PipelineConfig:
    """The small-GPU / CPU report: depth 4, dim 128, head dim 64, seq 512, 100 iterations."""
    return _derive(
        d20(),
        "d4-cpu",
        devices_per_node=1,  # the CPU is one device: each torch stage is one process with all cores
        device_type="cpu",
        download={"num_shards": 8, "url_template": SAMPLE_SOURCE},
        tok_train={"vocab_size": 8192, "max_chars": 50_000_000},
        base_train={
            "depth": 4,
            "aspect_ratio": 32,
            "head_dim": 64,
            "max_seq_len": 512,
            "device_batch_size": 1,
            "total_batch_size": 4096,
            "num_iterations": 100,
            "eval_every": 50,
            "eval_tokens": 65_536,
            "sample_every": -1,
        },
        base_eval={"split_tokens": 65_536, "device_batch_size": 8},
        plan={"gpu": "cpu"},
        eval_bundle={"method": "packages"},
        core={"max_per_task": 100},
        mid_train={"tasks": ["chatterbot", "identity", "identity", "math:4000", "spelling:3000", "spellingbee:1500"],
                   "max_seq_len": 512, "device_batch_size": 4, "total_batch_size": 4096, "val_examples": 100,
                   "eval_every": -1},
        chat_sft={"tasks": ["chatterbot:1000", "identity", "math:1000", "spelling:300", "spellingbee:300"],
                  "max_seq_len": 512, "examples_per_step": 16, "val_examples": 64, "eval_every": -1},
        chat_rl={"tasks": ["math:2000"], "examples_per_step": 4, "num_samples": 8, "max_new_tokens": 128,
                 "num_iterations": 20, "eval_every": -1, "eval_examples": 50},
        chat_eval={"max_problems": 100, "max_new_tokens": 256},
    )


def tiny() -> PipelineConfig:
    """The CPU smoke run of every stage: vocab 4,096, depth 2, seq 256, minutes on 2 cores."""
    return _derive(
        d20(),
        "tiny",
        devices_per_node=1,  # the CPU is one device: each torch stage is one process with all cores
        device_type="cpu",
        corpus={"tiers": ["lit"]},
        download={"num_shards": 4, "url_template": SAMPLE_SOURCE},
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
            "eval_every": 30,
            "eval_tokens": 16_384,
            "sample_every": -1,
            # 60 small steps: compiling (~30 s on 2 busy cores) costs more than it saves here.
            "compile": False,
        },
        base_eval={"split_tokens": 16_384, "device_batch_size": 8},
        plan={"gpu": "cpu"},
        eval_bundle={"method": "packages"},
        core={"max_per_task": 20},
        # Post-training at smoke-test size: each stage well under a minute on 2 cores, offline data only.
        mid_train={"tasks": ["chatterbot:300", "identity", "identity", "math:200", "spelling:150", "spellingbee:80"],
                   "max_seq_len": 256, "device_batch_size": 8, "total_batch_size": 4096, "val_examples": 40,
                   "eval_every": -1},
        chat_sft={"tasks": ["chatterbot:200", "identity", "math:200", "spelling:100", "spellingbee:100"],
                  "max_seq_len": 256, "examples_per_step": 16, "num_iterations": 20, "val_examples": 32,
                  "eval_every": -1},
        chat_rl={"tasks": ["math:64"], "examples_per_step": 2, "num_samples": 4, "max_new_tokens": 48,
                 "num_iterations": 4, "eval_every": -1, "eval_examples": 8},
        chat_eval={"max_problems": 16, "max_new_tokens": 48},
    )


PRESETS: dict[str, Callable[[], PipelineConfig]] = {
    "tiny": tiny,
    "d4-cpu": d4_cpu,
    "d12": d12,
    "d20": d20,
    "d26": d26,
    "d32": d32,
}


# Presets sized for GPU nodes: on a CPU they would run for months (d20: 21,400 steps of ~24 min) before
# anyone noticed, so the model-running stages refuse them there unless told --device-type cpu.
GPU_PRESETS = ("d12", "d20", "d26", "d32")


def get_preset(name: str) -> PipelineConfig:
    """The preset called `name`, or a UserError listing the valid names."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def from_parameters(value: Any) -> Any:
    """A config given as data (a flow parameter in the UI, `--param cfg=...`, prefect.yaml) that names a
    preset is that preset with the given fields over it: `{"preset": "d12", "base_train": {"depth": 10}}`
    is d12 at depth 10. Without a `preset` key the declared defaults apply, as for any pydantic model.
    PipelineConfig's own validator calls this, so `PipelineConfig(preset="d12")` is d12, never d20's
    values labelled d12; a full model_dump() overrides every field and round-trips unchanged."""
    if not isinstance(value, dict) or "preset" not in value or _DERIVING.get():
        return value
    if set(PipelineConfig.model_fields) <= set(value):
        # A full config (the launcher's --config JSON, a model_dump) names every field itself: the preset
        # would be built only to be overwritten, and a stage process would read every section doing it.
        return value
    name = value["preset"]
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    data = PRESETS[name]().model_dump()
    for key, given in value.items():
        if isinstance(given, dict) and isinstance(data.get(key), dict):
            section = PipelineConfig.model_fields[key].annotation if key in PipelineConfig.model_fields else None
            data[key] = section.merged(data[key], given) if hasattr(section, "merged") else {**data[key], **given}
        else:
            data[key] = given
    return data


# The flow's parameter type: a PipelineConfig whose `preset` field, when given, selects the preset.
PresetConfig = Annotated[PipelineConfig, BeforeValidator(from_parameters)]
