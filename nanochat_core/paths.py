"""Where artifacts live: `NANOCHAT_BASE_DIR` (a path or an fsspec URL), default ~/.cache/nanochat."""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR_ENV = "NANOCHAT_BASE_DIR"


def base_dir() -> str:
    """The artifact root as a string: a local path (absolute) or an fsspec URL such as s3://bucket/x."""
    value = os.environ.get(BASE_DIR_ENV) or str(Path.home() / ".cache" / "nanochat")
    return value if "://" in value else str(Path(value).expanduser().resolve())


def join(root: str, *parts: str) -> str:
    """Join path parts onto a local path or URL with '/' (fsspec's separator everywhere)."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
