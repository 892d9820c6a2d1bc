"""From `--source`/`--checkpoint` to loaded models: one replica per device (times workers per device).

Checkpoint families live in the base dir as nanochat lays them out:
    base_checkpoints/d<depth>/  mid_checkpoints/d<depth>/  chatsft_checkpoints/d<depth>/  chatrl_checkpoints/d<depth>/
`--checkpoint` takes a directory, an fsspec URL, or an MLflow model URI (`models:/nanochat/3`,
`models:/nanochat@sft`): MLflow downloads that version's own copy of the checkpoint and tokenizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from nanochat_core import storage
from nanochat_core.config import InferenceConfig
from nanochat_core.errors import UserError
from nanochat_core.hardware import serving_devices, serving_dtype
from nanochat_core.paths import base_dir, family_root, join, tokenizer_dir
from nanochat_core.registry import FAMILIES

AUTO_ORDER = tuple(reversed(FAMILIES))  # rl, sft, mid, base: the most post-trained model is the one meant for chat


@dataclass
class Replica:
    """One model copy on one device; a pool hands it to one request at a time."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    index: int
    meta: dict = field(default_factory=dict)
    _engine: object = field(default=None, repr=False)

    @property
    def engine(self):
        if self._engine is None:
            from nanochat_core.engine import Engine

            self._engine = Engine(self.model, self.tokenizer)  # tools on: the calculator, sandboxed
        return self._engine

    @property
    def context_len(self) -> int:
        return self.model.config.sequence_len


def _depth_dirs(family_dir: str) -> dict[int, str]:
    if not storage.exists(family_dir):
        return {}
    out = {}
    for name in storage.listdir(family_dir):
        m = re.fullmatch(r"d(\d+)", name)
        if m:
            out[int(m.group(1))] = join(family_dir, name)
    return out


def checkpoint_dir(cfg: InferenceConfig, root: str | None = None) -> tuple[str, str]:
    """(checkpoint directory, a label for it such as `sft d20`) for the config's source."""
    if cfg.checkpoint:
        uri = cfg.checkpoint
        if uri.startswith("models:/"):
            from nanochat_core.mlflow_model import resolve_model_uri

            try:
                return resolve_model_uri(uri), uri
            except Exception as e:  # an unknown name/version/alias or an unreachable tracking store
                raise UserError(f"cannot resolve {uri} in the MLflow registry ({e}); check the model name, "
                                "version or alias (models:/nanochat/3, models:/nanochat@sft)") from None
        if not storage.exists(uri):
            raise UserError(f"checkpoint {uri} does not exist; pass a checkpoint directory, an fsspec URL or models:/nanochat/N")
        return uri, uri
    root = root or base_dir()
    families = AUTO_ORDER if cfg.source == "auto" else (cfg.source,)
    for family in families:
        depths = _depth_dirs(family_root(family, root))
        if not depths:
            continue
        if cfg.depth is not None:
            if cfg.depth not in depths:
                if cfg.source == "auto":
                    continue
                raise UserError(f"no d{cfg.depth} checkpoints for --source {family} in {root}; "
                                f"found depths {sorted(depths)}")
            return depths[cfg.depth], f"{family} d{cfg.depth}"
        depth = max(depths)  # like nanochat: the largest model present
        return depths[depth], f"{family} d{depth}"
    where = family_root(families[0], root) if len(families) == 1 else root
    raise UserError(f"no checkpoints for --source {cfg.source} in {where}; train one first "
                    "(`nanochat speedrun --preset tiny`) or pass --checkpoint")


def load_replicas(cfg: InferenceConfig, workers_per_device: int = 1, root: str | None = None) -> list[Replica]:
    """Load the checkpoint once per replica: one per device, `workers_per_device` on each."""
    from nanochat_core.checkpoint import load_model
    from nanochat_core.tokenizer import Tokenizer

    ckpt, label = checkpoint_dir(cfg, root)
    replicas: list[Replica] = []
    for device in serving_devices(cfg.device_type):
        for _ in range(workers_per_device):
            model, tokenizer, meta = load_model(ckpt, step=cfg.step, device=device)
            if tokenizer is None:  # the run's tokenizer moved: fall back to the base dir's
                tokenizer = Tokenizer.load(tokenizer_dir(root))
            model.to(serving_dtype(cfg.dtype, device))
            meta = {**meta, "checkpoint": ckpt, "label": label}
            replicas.append(Replica(model, tokenizer, device, len(replicas), meta))
    return replicas
