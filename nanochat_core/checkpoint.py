"""Checkpoints: write, find, resume, and load a trained model for later stages.

A checkpoint directory (e.g. `<base>/base_checkpoints/d20/`) holds per step:
    model_{step:06d}.pt            model weights (rank 0)
    optim_{step:06d}_rank{r}.pt    optimizer state, loader state and RNG of rank r (every rank)
    meta_{step:06d}.json           model config, user config, plan, loader position, loop state
Every file is written atomically through the storage layer and the meta file is written last, after
all ranks' files exist; it lists the step's other files. A step counts as complete only when its meta
is there and every file it lists is present and non-empty, so a crash mid-save, or a move on an object
store cut off half-way (objects move one by one), leaves the previous checkpoint as the latest complete one.

A training stage started again with the settings and inputs of an unfinished run in its directory (the
meta's `run_key`) continues that run from its latest checkpoint; any other start moves the old
checkpoints aside (`continue_or_start`).

    model, tokenizer, meta = load_model(paths.output_dir("base_train", cfg, depth=20))
"""

from __future__ import annotations

import io
import json
import pickle
import re
import time
from typing import Any

import torch

from nanochat_core import fencing, storage
from nanochat_core.artifacts import digest_of
from nanochat_core.errors import UserError
from nanochat_core.model.gpt import GPTConfig, build_model
from nanochat_core.paths import join
from nanochat_core.tokenizer import Tokenizer

META_RE = re.compile(r"^meta_(\d{6,})\.json$")


def model_file(step: int) -> str:
    return f"model_{step:06d}.pt"


def meta_file(step: int) -> str:
    return f"meta_{step:06d}.json"


def optim_file(step: int, rank: int) -> str:
    return f"optim_{step:06d}_rank{rank}.pt"


def _save_torch(url: str, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.write_bytes(url, buf.getvalue())


def _load_torch(url: str, device: str | torch.device = "cpu") -> Any:
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise UserError(f"checkpoint file {url} is missing; resume from an earlier step or retrain") from None
    try:
        return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, KeyError) as e:
        raise UserError(
            f"checkpoint file {url} is corrupt ({type(e).__name__}); delete that step's files to fall back "
            "to the previous checkpoint, or retrain"
        ) from None


def _meta_steps(sizes: dict[str, int]) -> list[int]:
    return sorted(int(m.group(1)) for m in map(META_RE.match, sizes) if m)


def _complete(ckpt_dir: str, step: int, sizes: dict[str, int]) -> bool:
    """Every file the step's meta lists is in `sizes` (the directory's listing) and non-empty. A meta
    without the list (written before it existed) needs its model file."""
    if not sizes.get(model_file(step)):
        return False
    try:
        files = json.loads(storage.read_text(join(ckpt_dir, meta_file(step)))).get("files")
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return False  # moved or deleted since the listing, or unreadable: not a step to trust
    return all(sizes.get(name, 0) > 0 for name in files or [model_file(step)])


def complete_steps(ckpt_dir: str) -> list[int]:
    """Steps whose meta (the commit marker) and every file it lists are present, ascending."""
    sizes = storage.file_sizes(ckpt_dir)
    return [step for step in _meta_steps(sizes) if _complete(ckpt_dir, step, sizes)]


def latest_step(ckpt_dir: str) -> int | None:
    """The newest complete step (reads metas from the newest down, stopping at the first complete one)."""
    sizes = storage.file_sizes(ckpt_dir)
    return next((step for step in reversed(_meta_steps(sizes)) if _complete(ckpt_dir, step, sizes)), None)


def unreadable_metas(ckpt_dir: str, after: int | None) -> list[str]:
    """The meta files newer than step `after` whose JSON does not parse."""
    bad = []
    for step in _meta_steps(storage.file_sizes(ckpt_dir)):
        if after is not None and step <= after:
            continue
        url = join(ckpt_dir, meta_file(step))
        try:
            json.loads(storage.read_text(url))
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad.append(url)
        except FileNotFoundError:
            pass  # moved aside since the listing
    return bad


def read_meta(ckpt_dir: str, step: int) -> dict:
    url = join(ckpt_dir, meta_file(step))
    try:
        return json.loads(storage.read_text(url))
    except FileNotFoundError:
        raise UserError(f"no checkpoint at step {step} in {ckpt_dir}; pick one of {complete_steps(ckpt_dir)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"checkpoint metadata {url} is corrupt; delete that step's files or retrain") from None


def save_checkpoint(ckpt_dir: str, step: int, rank: int, model_state: dict | None, rank_state: dict,
                    meta: dict | None, barrier=lambda: None, keep_last: int | None = None) -> None:
    """Every rank calls this: each writes its own rank file; rank 0 then writes model and meta.

    `model_state` and `meta` are only needed on rank 0. Older complete checkpoints beyond
    `keep_last` are deleted after the new one is committed. A rank whose flow run has moved on to another
    attempt raises `fencing.Fenced` before writing anything (nanochat_core/fencing.py).
    """
    fencing.check_owner(f"checkpoint step {step} of {ckpt_dir}")
    _save_torch(join(ckpt_dir, optim_file(step, rank)), rank_state)
    barrier()  # every rank's file exists before the meta commits the step
    if rank == 0:
        assert model_state is not None and meta is not None
        _save_torch(join(ckpt_dir, model_file(step)), model_state)
        rank_prefix = f"optim_{step:06d}_rank"
        files = sorted(n for n in storage.file_sizes(ckpt_dir) if n == model_file(step) or n.startswith(rank_prefix))
        storage.write_text(join(ckpt_dir, meta_file(step)), json.dumps({**meta, "files": files}, indent=2))
        if keep_last is not None:
            prune(ckpt_dir, keep_last)
    barrier()


def prune(ckpt_dir: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and leftovers of older failed saves."""
    steps = complete_steps(ckpt_dir)
    if len(steps) <= keep_last:
        return
    oldest_kept = steps[-keep_last]
    names = storage.listdir(ckpt_dir)
    # Metas first: a step stops counting before any of its files goes.
    for name in sorted(names, key=lambda n: not META_RE.match(n)):
        m = re.match(r"^(?:model|meta|optim)_(\d{6,})", name)
        if m and int(m.group(1)) < oldest_kept:
            storage.remove(join(ckpt_dir, name))


def move_aside(ckpt_dir: str) -> str | None:
    """Rename a directory holding checkpoints to `<dir>.<timestamp>` (a fresh run never overwrites)."""
    if not any(META_RE.match(n) or n.startswith(("model_", "optim_")) for n in storage.listdir(ckpt_dir)):
        return None
    aside = f"{ckpt_dir.rstrip('/')}.{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while storage.exists(aside):
        aside = f"{ckpt_dir.rstrip('/')}.{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        n += 1
    if storage.is_local(ckpt_dir) and storage.is_local(aside):
        storage.rename(ckpt_dir, aside)  # one rename of the directory: atomic
    else:
        _move_commits_last(ckpt_dir, aside)
    return aside


def _move_commits_last(src: str, dst: str) -> None:
    """Move a checkpoint directory on an object store, where objects move one by one (copy, delete).

    The order keeps every step whole wherever a kill stops it: the files that are not metas are copied
    first (the destination counts no step yet), then the metas, so a step commits at the destination
    only after its files are there; the source's metas are deleted before anything else of it, so its
    steps stop counting before any of their files leaves. Metas are copied before they are deleted, so
    a cut-off move loses no step: it is whole in one place or the other (or in both).
    """
    names = storage.listdir(src)
    metas = [n for n in names if META_RE.match(n)]
    rest = [n for n in names if not META_RE.match(n)]
    for group in (rest, metas):
        for name in group:
            storage.copy(join(src, name), join(dst, name))
    for name in metas + rest:
        storage.remove(join(src, name), recursive=True)


def run_key(stage: str, settings: dict, world: int, inputs: dict[str, dict]) -> str:
    """What a run must share with an unfinished one to continue it: the stage's trajectory settings
    (CheckpointedConfig.run_settings), the process count, and the digests of its inputs."""
    digests = {name: ref.get("digest") or ref.get("path") for name, ref in sorted(inputs.items())}
    return digest_of({"stage": stage, "settings": settings, "world": world, "inputs": digests})


def continue_or_start(ckpt_dir: str, key: str, master: bool, barrier, say, force: bool = False) -> int | None:
    """The step to continue from, or None for a fresh start (every rank calls this).

    The latest checkpoint is continued when its meta carries `key` and it is not the final step
    (`force`, the --resume flag: whatever run it belongs to). Otherwise the run starts fresh.
    """
    step = latest_step(ckpt_dir)
    for url in unreadable_metas(ckpt_dir, after=step):
        # The newest metadata does not parse (a disk that filled mid-write, a hand edit): the step before
        # it is what survived, and the user should know which file was passed over.
        say(f"warning: checkpoint metadata {url} is not valid JSON; "
            + (f"continuing from step {step}, the newest good checkpoint" if step is not None else
               "no earlier checkpoint is complete") + "; delete that file to silence this")
    if step is not None and not force:
        meta = read_meta(ckpt_dir, step)
        if meta.get("run_key") != key or step >= meta.get("num_iterations", step):
            step = None
    elif force and step is None:
        say(f"--resume: no complete checkpoint in {ckpt_dir}; starting from step 0")
    barrier()  # every rank has decided from the same files before any of them moves
    if step is None:
        start_fresh(ckpt_dir, master, barrier, say)
    return step


def start_fresh(ckpt_dir: str, master: bool, barrier, say) -> None:
    """A fresh run never overwrites: rank 0 moves the directory's checkpoints aside (every rank calls this)."""
    if master:
        aside = move_aside(ckpt_dir)
        if aside:
            say(f"{ckpt_dir} already held checkpoints of another or a finished run: moved them to {aside}")
        storage.makedirs(ckpt_dir)
    barrier()


def load_rank_state(ckpt_dir: str, step: int, rank: int, device="cpu") -> dict:
    return _load_torch(join(ckpt_dir, optim_file(step, rank)), device)


def load_model_state(ckpt_dir: str, step: int, device="cpu") -> dict:
    return _load_torch(join(ckpt_dir, model_file(step)), device)


def load_model(source: str, step: int | None = None, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer or None, meta) from a checkpoint directory or URL.

    The model is rebuilt from the config in the meta file, so callers need not know its depth.
    The tokenizer is the one the run trained with, when it is still where the meta says.
    """
    if step is None:
        step = latest_step(source)
        if step is None:
            raise UserError(f"no complete checkpoint in {source}; run `nanochat base-train` first or check the path")
    meta = read_meta(source, step)
    model_cfg = GPTConfig(**meta["model_config"])
    model = build_model(model_cfg, device=device)
    state = load_model_state(source, step, device)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise UserError(
            f"checkpoint {join(source, model_file(step))} does not match its own model config "
            f"(depth {model_cfg.n_layer}, vocab {model_cfg.vocab_size}); the files come from different runs"
        ) from None
    model.eval()
    tokenizer = None
    tok_dir = meta.get("tokenizer_dir")
    if tok_dir and storage.exists(join(tok_dir, "tokenizer.pkl")):
        tokenizer = Tokenizer.load(tok_dir)
    return model, tokenizer, meta
