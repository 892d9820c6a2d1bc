"""A stage's command line: its config flags and its input refs, from the stage's registry record.

    cfg, inputs = parse("base_train", argv)    # in nanochat_core.stages.base_train.main

Flags: `--preset` / `--config`, then every field of the config sections the stage reads, then one flag
per named input (`--tokenizer DIR`, `--shards DIR`, `--model DIR`, `--eval-bundle DIR`, `--corpus DIR`).
Each input comes from, in order: the ref the launcher handed over (NANOCHAT_INPUTS_PATH, what the flow
runs), the flag, or the default, which is where the upstream stage of the same config writes
(paths.output_dir). A directory's ref is its `result.json` when it has one (the upstream stage's own
ref, with the exact files it holds), else just the directory.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from nanochat_core import artifacts, hardware, storage
from nanochat_core.config import PipelineConfig
from nanochat_core.errors import UserError
from nanochat_core.flags import add_config_flags, config_from_args, stage_parser
from nanochat_core.paths import join, output_dir
from nanochat_core.presets import GPU_PRESETS
from nanochat_core.registry import FAMILIES, STAGES, eval_ref_name

# The stage whose output each named input is, when the command line names none.
UPSTREAM = {"corpus": "corpus", "shards": "download", "tokenizer": "tok_train", "eval_bundle": "eval_bundle"}


def parser(stage: str, description: str | None = None) -> argparse.ArgumentParser:
    record = STAGES[stage]
    p = stage_parser(f"nanochat {record.command}", description or record.help[0].upper() + record.help[1:] + ".", {})
    for section in record.reads:
        if section in PipelineConfig.model_fields and section != "preset":
            add_config_flags(p, section)
    if record.inputs:
        group = p.add_argument_group("inputs (default: what the upstream stage of this config wrote)")
        for name in record.inputs:
            group.add_argument("--" + name.replace("_", "-"), dest=f"input:{name}", metavar="DIR", default=None,
                               help=f"the {name.replace('_', ' ')} directory or URL")
    return p


def parse(stage: str, argv: list[str] | None, p: argparse.ArgumentParser | None = None) -> tuple[PipelineConfig, dict]:
    ns = (p or parser(stage)).parse_args(argv)
    given = {k.removeprefix("input:"): v for k, v in vars(ns).items() if k.startswith("input:")}
    for key in given:
        delattr(ns, f"input:{key}")
    cfg = config_from_args(ns)
    if artifacts.inputs() is None:  # run by hand; under the launcher the parent process checked already
        preflight(stage, cfg)
    return cfg, resolve(stage, cfg, {k: v for k, v in given.items() if v})


def refuse_gpu_preset_on_cpu(cfg: PipelineConfig, stages: list[str], command: str) -> None:
    """A UserError when a GPU preset would run a model on a node without CUDA and `stages` do not say
    --device-type cpu: the stages that only prepare data (download, tok_train, corpus) never ask."""
    torch_stages = [s for s in stages if STAGES[s].devices == "node"]
    if cfg.preset not in GPU_PRESETS or hardware.node_devices() > 0:
        return
    if all(getattr(getattr(cfg, s), "device_type", "cpu") == "cpu" for s in torch_stages):
        return
    raise UserError(f"preset {cfg.preset} is sized for GPUs and this node has no CUDA device; use --preset "
                    f"tiny or d4-cpu, or force it with {command}")


def preflight(stage: str, cfg: PipelineConfig) -> None:
    """What a stage checks before any work: the preset fits the node, and its output location is
    writable and not another stage's directory."""
    refuse_gpu_preset_on_cpu(cfg, [stage], "--device-type cpu")
    out = output_dir(stage, cfg, depth=cfg.base_train.depth, source=cfg.chat_eval.source)
    storage.check_writable(out)
    owner = ref_at(out).get("stage")
    mine = {stage, eval_ref_name(cfg.chat_eval.source) if stage == "chat_eval" else stage}
    if owner is not None and owner not in mine:
        raise UserError(f"{out} holds the output of stage {owner} (its result.json); writing {stage} there "
                        "would overwrite it: pass another --out")


def resolve(stage: str, cfg: PipelineConfig, given: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """The input refs of `stage`: the launcher's, else `given` directories, else the defaults."""
    handed = artifacts.inputs()
    if handed is not None:
        return handed
    record, given = STAGES[stage], given or {}
    refs: dict[str, dict[str, Any]] = {}
    for name in record.inputs:
        path = given.get(name) or default_input(stage, name, cfg)
        if name in given or name not in record.optional or storage.exists(path):
            refs[name] = ref_at(path)
    return refs


def default_input(stage: str, name: str, cfg: PipelineConfig) -> str:
    if name == "model":
        # Which family a stage starts from is in its record; chat_eval's is its config's source.
        family = STAGES[stage].starts_from or cfg.chat_eval.source
        return output_dir(FAMILIES[family].name, cfg, depth=cfg.base_train.depth)
    return output_dir(UPSTREAM[name], cfg)


def ref_at(path: str) -> dict[str, Any]:
    """The ref of a directory: its result.json (the producing stage's ref), else a bare {"path"}."""
    stored = join(path, artifacts.RESULT_FILE)
    if storage.exists(stored):
        try:
            return {**json.loads(storage.read_text(stored)), "path": path}
        except (ValueError, OSError):
            pass  # an unreadable result.json: the directory itself is still usable
    return {"path": path}
