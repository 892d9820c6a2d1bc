"""Where artifacts live: `NANOCHAT_BASE_DIR` (a path or an fsspec URL), default ~/.cache/nanochat.

The one place a default artifact path is spelled. Inside a pipeline run a stage reads its inputs from
the refs the flow hands it and only uses `output_dir` for where it writes; the defaults for the inputs
of a stage run alone on the command line (`nanochat base-train`) are the outputs of the stages upstream
(nanochat_core.stage_args).

    output_dir("base_train", cfg, depth=20)   # <base>/base_checkpoints/d20, or base_train.out if set
    family_root("sft")                        # <base>/chatsft_checkpoints (its d<depth> directories)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nanochat_core.registry import STAGES, family_dir

BASE_DIR_ENV = "NANOCHAT_BASE_DIR"


def base_dir() -> str:
    """The artifact root as a string: a local path (absolute) or an fsspec URL such as s3://bucket/x."""
    value = os.environ.get(BASE_DIR_ENV) or str(Path.home() / ".cache" / "nanochat")
    return value if "://" in value else str(Path(value).expanduser().resolve())


def join(root: str, *parts: str) -> str:
    """Join path parts onto a local path or URL with '/' (fsspec's separator everywhere)."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def output_dir(stage: str, cfg: Any, depth: int | None = None, source: str | None = None,
               root: str | None = None) -> str:
    """Where `stage` writes: its config's `out` when set, else its registry default under the base dir
    (or `root`). `depth` (checkpoint families, base_eval) and `source` (chat_eval) fill the placeholders.
    """
    section = getattr(cfg, STAGES[stage].section, None)
    explicit = getattr(section, "out", None)
    if explicit:
        return explicit
    return join(root or base_dir(), STAGES[stage].out.format(depth=depth, source=source))


def family_root(family: str, root: str | None = None) -> str:
    """The directory holding a family's d<depth> checkpoint directories."""
    return join(root or base_dir(), family_dir(family))


def tokenizer_dir(root: str | None = None) -> str:
    """Where tok_train writes the tokenizer (it has no `out` setting)."""
    return output_dir("tok_train", None, root=root)
